"""In-memory state the metrics collector renders: updated by the daemon, read at scrape time.

The daemon's worker threads call the `observe_*`/`set_*` methods; the collector calls
`snapshot()`, which copies under one lock and returns immutable data, so a scrape
never waits on libvirt or qemu-img and never sees a half-applied trim.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
import time
from collections.abc import Collection, Mapping, Sequence
from dataclasses import dataclass
from types import MappingProxyType
from typing import TypeVar

from virt_trimd.records import DiskRecord, Result, SweepSummary, TrimRecord

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.state")

_T = TypeVar("_T")

# Upper bounds (seconds) of the trim duration histogram: an idle small guest answers in
# well under a second, a multi-TB thin volume can take most of an hour.
DURATION_BUCKETS: tuple[float, ...] = (
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
    30.0,
    60.0,
    120.0,
    300.0,
    600.0,
    1800.0,
    3600.0,
    math.inf,
)


@dataclass(frozen=True)
class DiskState:
    """What is currently known about one disk of one domain.

    `discard` is the domain XML's driver discard attribute, None when absent.
    The optional fields are None while unknown; the collector then omits the series.
    """

    domain: str
    disk: str
    path: str | None
    format: str | None
    bus: str
    discard: str | None
    allocated_bytes: int | None
    virtual_bytes: int | None
    file_bytes: int | None
    discard_ready: bool | None = None
    effective: bool | None = None
    reclaimable_bytes: int | None = None
    # Why allocated_bytes is unknown (the image cannot be stat'ed, not a file, ...).
    not_measured: str | None = None
    # What the guest last said it uses on this disk, and when (epoch seconds): all that
    # is known of a shut-off domain, whose agent cannot be asked.
    last_guest_used_bytes: int | None = None
    last_guest_used_ts: float | None = None


@dataclass(frozen=True)
class HistogramState:
    """Non-cumulative bucket counts aligned with `bounds`, plus sum and count."""

    bounds: tuple[float, ...]
    counts: tuple[int, ...]
    sum: float

    @property
    def count(self) -> int:
        """Number of observations."""
        return sum(self.counts)


@dataclass(frozen=True)
class StateSnapshot:
    """An immutable copy of State at one instant; what one scrape renders.

    Keys are label values; tuple keys are (domain, disk), (domain, mountpoint) or
    (domain, result) in the order of the metric's labels.
    """

    reclaimed_bytes_total: Mapping[tuple[str, str], int]
    guest_trimmed_bytes_total: Mapping[tuple[str, str], int]
    trims_total: Mapping[tuple[str, str], int]
    trim_duration: HistogramState
    last_trim_duration_seconds: Mapping[str, float]
    last_success_ts: Mapping[str, float]
    disks: tuple[DiskState, ...]
    next_run_ts: Mapping[str, float]
    last_sweep_ts: Mapping[str, float]
    sweep_reclaimed_bytes: Mapping[str, int]
    libvirt_up: bool
    config_reload_ok: bool
    config_reload_success_ts: float | None
    history_write_ok: bool
    history_write_errors_total: int
    # (domain, method, trigger, result): how and why, beside trims_total's result alone.
    reclaims_total: Mapping[tuple[str, str, str, str], int] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    # domain -> until when growth triggers leave it alone (it could not be helped).
    trigger_backoff_until_ts: Mapping[str, float] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )
    # (group, members digest, share 1-based, shares, at_once) of this host; None outside one.
    storage_group: tuple[str, str, int, int, int] | None = None
    # domain -> a number that changes whenever any of the domain's series does: what the
    # exposition's per-domain cache (web.collector.ExpositionCache) is keyed by. Every
    # domain with a series here has a version.
    domain_versions: Mapping[str, int] = dataclasses.field(
        default_factory=lambda: MappingProxyType({})
    )


class State:
    """Thread-safe metrics state. All methods are cheap and never block on I/O."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._reclaimed: dict[tuple[str, str], int] = {}
        self._guest_trimmed: dict[tuple[str, str], int] = {}
        self._trims: dict[tuple[str, str], int] = {}
        self._reclaims: dict[tuple[str, str, str, str], int] = {}
        self._backoff: dict[str, float] = {}
        self._duration_counts = [0] * len(DURATION_BUCKETS)
        self._duration_sum = 0.0
        self._last_duration: dict[str, float] = {}
        self._last_success: dict[str, float] = {}
        self._disks: dict[str, dict[str, DiskState]] = {}
        self._next_run: dict[str, float] = {}
        self._last_sweep: dict[str, float] = {}
        self._sweep_reclaimed: dict[str, int] = {}
        # libvirt is down until the daemon says it connected; a missing "up" would hide
        # the outage from an `== 0` alert.
        self._libvirt_up = False
        self._config_ok = False
        self._config_success_ts: float | None = None
        # No write has failed yet: 1 until a write does.
        self._history_ok = True
        self._history_errors = 0
        self._storage_group: tuple[str, str, int, int, int] | None = None
        self._versions: dict[str, int] = {}
        self._version = 0

    def _touch(self, domain: str) -> None:
        """Mark `domain`'s series changed (the lock is held)."""
        self._version += 1
        self._versions[domain] = self._version

    def observe_trim(self, record: TrimRecord, now: float | None = None) -> None:
        """Account one trim record.

        Dry runs change nothing on the host, so they change no metric. Otherwise:
        trims_total[domain, result] += 1; per measured disk, reclaimed_bytes_total grows
        by the positive part of its reclaim (a guest that wrote more than it trimmed
        must not make a counter go down) and its gauges take the after-trim numbers;
        guest_trimmed_bytes_total grows per mountpoint the guest reported a size for.
        Duration is observed only when an fstrim was attempted. Only `success` sets
        last_success (to started_at + duration; `now` when started_at is unparseable):
        `partial` means a filesystem failed, and alerts on a stale success must see it.
        """
        if record.dry_run:
            log.debug("dry-run record for %s not counted", record.domain)
            return
        domain = record.domain
        with self._lock:
            self._touch(domain)
            key = (domain, record.result.value)
            self._trims[key] = self._trims.get(key, 0) + 1
            how = (domain, record.method.value, record.trigger or "schedule", record.result.value)
            self._reclaims[how] = self._reclaims.get(how, 0) + 1
            for fs in record.filesystems:
                if fs.trimmed_bytes is None:
                    continue  # Windows guests report no size
                fs_key = (domain, fs.mountpoint)
                self._guest_trimmed[fs_key] = self._guest_trimmed.get(fs_key, 0) + max(
                    fs.trimmed_bytes, 0
                )
            for disk in record.disks:
                self._apply_disk_record(domain, disk)
            if not record.result.attempted:
                return
            duration = record.duration_seconds
            if math.isfinite(duration) and duration >= 0:
                self._observe_duration(duration)
                self._last_duration[domain] = duration
            if record.result is Result.SUCCESS:
                finished = _finished_ts(record, now)
                self._last_success[domain] = max(finished, self._last_success.get(domain, finished))

    def _apply_disk_record(self, domain: str, disk: DiskRecord) -> None:
        # A disk that could not be measured keeps its description and says why; its
        # sizes are unknown now, never 0 (the collector then omits those series).
        measured = disk.not_measured is None
        if measured and disk.allocated_after is None:
            return
        if measured and disk.reclaimed_bytes is not None:
            key = (domain, disk.disk)
            # Create the series at 0 even for a zero reclaim, so rate() sees the first rise.
            self._reclaimed[key] = self._reclaimed.get(key, 0) + max(disk.reclaimed_bytes, 0)
        disks = self._disks.setdefault(domain, {})
        old = disks.get(disk.disk) if measured else None
        kept = disks.get(disk.disk)
        disks[disk.disk] = DiskState(
            domain=domain,
            disk=disk.disk,
            path=disk.path,
            format=disk.format,
            bus=disk.bus,
            discard=disk.discard,
            allocated_bytes=disk.allocated_after if measured else None,
            virtual_bytes=_newer(disk.virtual_size, old.virtual_bytes)
            if old
            else disk.virtual_size,
            file_bytes=_newer(disk.file_size, old.file_bytes) if old else disk.file_size,
            discard_ready=kept.discard_ready if kept else None,
            effective=_newer(disk.effective, old.effective) if old else disk.effective,
            reclaimable_bytes=old.reclaimable_bytes if old else None,
            last_guest_used_bytes=kept.last_guest_used_bytes if kept else None,
            last_guest_used_ts=kept.last_guest_used_ts if kept else None,
            not_measured=disk.not_measured,
        )

    def _observe_duration(self, seconds: float) -> None:
        for i, bound in enumerate(DURATION_BUCKETS):
            if seconds <= bound:
                self._duration_counts[i] += 1
                break
        self._duration_sum += seconds

    def observe_census(self, domain: str, disks: Sequence[DiskState]) -> None:
        """Replace `domain`'s disk gauges with `disks` (an empty sequence removes them).

        Counters of disks that are gone stay until the domain itself goes (retain_domains).
        Raises ValueError if a DiskState belongs to another domain.
        """
        for disk in disks:
            if disk.domain != domain:
                raise ValueError(f"census of {domain!r} got disk {disk.disk!r} of {disk.domain!r}")
        with self._lock:
            self._touch(domain)
            if disks:
                previous = self._disks.get(domain, {})
                # A census cannot judge effectiveness (that needs a trim); keep the
                # verdict of the latest trim instead of blanking it every census.
                self._disks[domain] = {
                    d.disk: (
                        dataclasses.replace(d, effective=previous[d.disk].effective)
                        if d.effective is None and d.disk in previous
                        else d
                    )
                    for d in disks
                }
            else:
                self._disks.pop(domain, None)

    def retain_domains(self, names: Collection[str]) -> None:
        """Drop every series of domains not in `names`: vanished guests leave the metrics."""
        keep = set(names)
        with self._lock:
            for pairs in (self._reclaimed, self._guest_trimmed, self._trims):
                for key in [k for k in pairs if k[0] not in keep]:
                    del pairs[key]
            for key4 in [k for k in self._reclaims if k[0] not in keep]:
                del self._reclaims[key4]
            for by_domain in (
                self._last_duration,
                self._last_success,
                self._disks,
                self._backoff,
                self._versions,
            ):
                for name in [n for n in by_domain if n not in keep]:
                    del by_domain[name]

    def set_trigger_backoff(self, domain: str, until_ts: float | None) -> None:
        """Growth triggers skip `domain` until `until_ts`; None ends the backoff."""
        with self._lock:
            self._touch(domain)
            if until_ts is None:
                self._backoff.pop(domain, None)
            else:
                self._backoff[domain] = until_ts

    def restore_last_success(self, mapping: Mapping[str, float]) -> None:
        """Seed last-success timestamps (from History at start); a newer value wins."""
        with self._lock:
            for domain, ts in mapping.items():
                self._touch(domain)
                self._last_success[domain] = max(ts, self._last_success.get(domain, ts))

    def set_next_run(self, schedule: str, ts: float | None) -> None:
        """Set when `schedule` fires next; None (paused, no next fire) removes the series."""
        with self._lock:
            if ts is None:
                self._next_run.pop(schedule, None)
            else:
                self._next_run[schedule] = ts

    def retain_schedules(self, names: Collection[str]) -> None:
        """Drop every series of schedules not in `names` (removed by a config reload)."""
        keep = set(names)
        with self._lock:
            for by_schedule in (self._next_run, self._last_sweep, self._sweep_reclaimed):
                for name in [n for n in by_schedule if n not in keep]:
                    del by_schedule[name]

    def observe_sweep(self, schedule: str, summary: SweepSummary, finished_ts: float) -> None:
        """Record a completed sweep: its finish time and net reclaim (negative if guests wrote)."""
        with self._lock:
            self._last_sweep[schedule] = finished_ts
            self._sweep_reclaimed[schedule] = summary.reclaimed_bytes

    def set_libvirt_up(self, up: bool) -> None:
        """Whether the last libvirt connection attempt or call succeeded."""
        with self._lock:
            self._libvirt_up = up

    def set_config_reload(self, ok: bool, ts: float | None = None) -> None:
        """Record a config load; on success also its time (`ts`, default now)."""
        with self._lock:
            self._config_ok = ok
            if ok:
                self._config_success_ts = time.time() if ts is None else ts

    def set_history_ok(self, ok: bool) -> None:
        """Record the outcome of one history write; a failure also counts an error."""
        with self._lock:
            self._history_ok = ok
            if not ok:
                self._history_errors += 1

    def set_storage_group(self, info: tuple[str, str, int, int, int] | None) -> None:
        """This host's storage group share: (group, members digest, share, shares, at_once)."""
        with self._lock:
            self._storage_group = info

    def snapshot(self) -> StateSnapshot:
        """An immutable copy of everything, taken under the lock."""
        with self._lock:
            return StateSnapshot(
                reclaimed_bytes_total=MappingProxyType(dict(self._reclaimed)),
                guest_trimmed_bytes_total=MappingProxyType(dict(self._guest_trimmed)),
                trims_total=MappingProxyType(dict(self._trims)),
                trim_duration=HistogramState(
                    bounds=DURATION_BUCKETS,
                    counts=tuple(self._duration_counts),
                    sum=self._duration_sum,
                ),
                last_trim_duration_seconds=MappingProxyType(dict(self._last_duration)),
                last_success_ts=MappingProxyType(dict(self._last_success)),
                disks=tuple(
                    disk
                    for _, by_disk in sorted(self._disks.items())
                    for _, disk in sorted(by_disk.items())
                ),
                next_run_ts=MappingProxyType(dict(self._next_run)),
                last_sweep_ts=MappingProxyType(dict(self._last_sweep)),
                sweep_reclaimed_bytes=MappingProxyType(dict(self._sweep_reclaimed)),
                libvirt_up=self._libvirt_up,
                config_reload_ok=self._config_ok,
                config_reload_success_ts=self._config_success_ts,
                history_write_ok=self._history_ok,
                history_write_errors_total=self._history_errors,
                reclaims_total=MappingProxyType(dict(self._reclaims)),
                trigger_backoff_until_ts=MappingProxyType(dict(self._backoff)),
                storage_group=self._storage_group,
                domain_versions=MappingProxyType(dict(self._versions)),
            )


def _newer(new: _T | None, old: _T | None) -> _T | None:
    return old if new is None else new


def _finished_ts(record: TrimRecord, now: float | None) -> float:
    try:
        return record.finished_ts
    except ValueError:
        log.warning(
            "trim of %s has unparseable started_at %r; using the current time",
            record.domain,
            record.started_at,
        )
        return time.time() if now is None else now
