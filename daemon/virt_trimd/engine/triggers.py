"""Growth triggers: fire a schedule for one running domain when a census says it filled up.

A guest that writes and deletes 50 GiB on Tuesday should not wait for Sunday's cron.
At each census the daemon asks `due()` per running domain and schedule: `growth` (the
images' allocated bytes grew by that much since the domain's last successful trim) or
`reclaimable` (allocated minus guest-used, as the census measured it). The trim then goes
through the ordinary sweep path (per-domain lock, min_interval, timeout), recorded with
`trigger: growth` or `trigger: reclaimable`.

A guest that cannot be helped (discards do not reach the host, the agent fails) would be
re-triggered at every census forever, so `Backoff` leaves a domain alone after a
triggered trim that did not help, doubling up to a day, and forgets it after one that did.
Pure logic: the daemon supplies measurements and the clock.
"""

from __future__ import annotations

import threading
from dataclasses import dataclass, field

from virt_trimd.config.model import ScheduleConfig
from virt_trimd.records import Result, TrimRecord
from virt_trimd.units import format_bytes

MAX_BACKOFF_SECONDS = 86400.0
# A triggered trim that gave back less than this share of the growth threshold did not help.
HELPED_FRACTION = 0.25


@dataclass(frozen=True)
class Due:
    """A trigger that fired: which one and the sentence the journal and history get."""

    trigger: str  # "growth" or "reclaimable"
    reason: str


def due(
    sched: ScheduleConfig,
    allocated_bytes: int | None,
    baseline_bytes: int | None,
    reclaimable_bytes: int | None,
) -> Due | None:
    """Which of `sched`'s triggers fires for one domain's census figures, or None.

    `baseline_bytes` is the allocation right after the domain's last successful trim
    (None when unknown: growth cannot be judged yet); `reclaimable_bytes` is None when
    the agent did not say what the guest uses.
    """
    if (
        sched.growth_bytes is not None
        and allocated_bytes is not None
        and baseline_bytes is not None
    ):
        grown = allocated_bytes - baseline_bytes
        if grown >= sched.growth_bytes:
            return Due(
                "growth",
                f"allocation grew by {format_bytes(grown)} since the last trim "
                f"(growth: {format_bytes(sched.growth_bytes)})",
            )
    limit = sched.reclaimable_bytes
    if limit is not None and reclaimable_bytes is not None and reclaimable_bytes >= limit:
        return Due(
            "reclaimable",
            f"{format_bytes(reclaimable_bytes)} reclaimable (reclaimable: {format_bytes(limit)})",
        )
    return None


def baseline_after(record: TrimRecord) -> int | None:
    """The growth baseline a record sets: its images' allocation after a trim that helped.

    None when it sets none: a dry run, a trim that failed, or one that was ineffective
    (the guest is still as full; the backoff, not a reset baseline, keeps triggers from
    firing at every census), or one whose disks were not measured afterwards.
    """
    if record.dry_run or record.result not in (Result.SUCCESS, Result.PARTIAL):
        return None
    if any(d.effective is False for d in record.disks):
        return None
    after = [d.allocated_after for d in record.disks if d.allocated_after is not None]
    return sum(after) if after else None


def could_not_help(record: TrimRecord, threshold_bytes: int | None) -> str | None:
    """Why a triggered trim did not help (so back off), or None when it did."""
    if not record.result.agent_answered:
        return f"the triggered trim ended in {record.result.value}"
    if any(d.effective is False for d in record.disks):
        return "the triggered trim was ineffective: discards do not reach the host"
    if threshold_bytes is not None and record.reclaimed_bytes < HELPED_FRACTION * threshold_bytes:
        return (
            f"the triggered trim reclaimed only {format_bytes(record.reclaimed_bytes)} "
            f"of a {format_bytes(threshold_bytes)} trigger"
        )
    return None


@dataclass
class Backoff:
    """Per domain (UUID): until when triggers leave it alone, and how often it failed."""

    base_seconds: float = 300.0
    _until: dict[str, float] = field(default_factory=dict)
    _level: dict[str, int] = field(default_factory=dict)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def until(self, uuid: str, now: float) -> float | None:
        """The end of `uuid`'s backoff if it is still on, else None."""
        with self._lock:
            end = self._until.get(uuid)
        return end if end is not None and end > now else None

    def active(self, now: float) -> int:
        """How many domains are backing off now."""
        with self._lock:
            return sum(1 for end in self._until.values() if end > now)

    def failed(self, uuid: str, now: float) -> float:
        """A triggered trim did not help: back off longer; return until when."""
        with self._lock:
            level = self._level.get(uuid, 0)
            self._level[uuid] = level + 1
            end = now + min(self.base_seconds * float(2**level), MAX_BACKOFF_SECONDS)
            self._until[uuid] = end
            return end

    def helped(self, uuid: str) -> None:
        """A trim helped: the domain may be triggered again at once."""
        with self._lock:
            self._until.pop(uuid, None)
            self._level.pop(uuid, None)
