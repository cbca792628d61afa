"""A sweep: pick domains, trim them with bounded concurrency, collect records.

Used by both the one-shot `trim` command and the daemon's schedules. Per-domain
locks shared across sweeps make sure two schedules never trim one domain at once.
"""

from __future__ import annotations

import logging
import math
import threading
import time
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Protocol

from virt_trimd.config.model import matches_globs
from virt_trimd.engine.trim import TrimOptions, utc_now_iso
from virt_trimd.records import DomainInfo, Result, SweepSummary, TrimRecord

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.sweep")


class Reclaimer(Protocol):
    """What a sweep drives: DomainTrimmer (agent) or engine.offline.OfflineReclaimer."""

    def trim(self, dom: DomainInfo, opts: TrimOptions) -> TrimRecord:
        """Reclaim one domain; never raises for guest trouble."""
        ...


def select_domains(
    domains: Iterable[DomainInfo], include: Sequence[str], exclude: Sequence[str] = ()
) -> list[DomainInfo]:
    """Domains whose name matches an include glob and no exclude glob, sorted by name."""
    picked = [d for d in domains if matches_globs(d.name, include, exclude)]
    return sorted(picked, key=lambda d: d.name)


@dataclass
class DomainLocks:
    """Per-domain (by UUID) non-blocking locks plus the last-trim times for min_interval."""

    last_trim: dict[str, float] = field(default_factory=dict)  # uuid -> epoch seconds
    _held: set[str] = field(default_factory=set)
    _lock: threading.Lock = field(default_factory=threading.Lock)

    def try_acquire(self, uuid: str) -> bool:
        """Take the domain's lock if free; False when another sweep is trimming it."""
        with self._lock:
            if uuid in self._held:
                return False
            self._held.add(uuid)
            return True

    def release(self, uuid: str, trimmed_at: float | None) -> None:
        """Free the domain; remember when it was last really trimmed."""
        with self._lock:
            self._held.discard(uuid)
            if trimmed_at is not None:
                self.last_trim[uuid] = trimmed_at

    def too_soon(self, uuid: str, min_interval_seconds: float, now: float) -> float | None:
        """Seconds since the last trim if that is less than min_interval, else None."""
        if min_interval_seconds <= 0:
            return None
        with self._lock:
            last = self.last_trim.get(uuid)
        if last is None or now - last >= min_interval_seconds:
            return None
        return now - last


@dataclass(frozen=True)
class SweepPlan:
    """How one sweep runs: how many at once, when each domain starts, what is too soon.

    `delay_for` gives each domain's start offset (spreading), counted from
    `started_monotonic` (when the schedule fired; now if None). `expected_seconds` (the
    last trim's duration, None if unknown) starts long trims first; see start_order.
    """

    concurrency: int = 1
    min_interval_seconds: float = 0.0
    delay_for: Callable[[DomainInfo], float] | None = None
    expected_seconds: Callable[[DomainInfo], float | None] | None = None
    started_monotonic: float | None = None


@dataclass
class SweepContext:
    """What a sweep shares with the daemon around it.

    `locks` hold domains across concurrent sweeps and remember last trims; `stop` cuts
    waits short and skips domains not yet started; `on_record` runs in the worker
    thread as each record completes (history, metrics).
    """

    locks: DomainLocks = field(default_factory=DomainLocks)
    stop: threading.Event = field(default_factory=threading.Event)
    on_record: Callable[[TrimRecord], None] | None = None
    wall_clock: Callable[[], float] = time.time
    # Runs in the worker thread just before a domain's trim starts (a progress line).
    on_start: Callable[[DomainInfo], None] | None = None


def run_sweep(
    trimmer: Reclaimer,
    domains: Sequence[DomainInfo],
    opts: TrimOptions,
    plan: SweepPlan | None = None,
    context: SweepContext | None = None,
) -> SweepSummary:
    """Trim `domains` as `plan` says, sharing `context`; return every record.

    Records come back in the order of `domains`.
    """
    plan = plan or SweepPlan()
    context = context or SweepContext()
    locks, stop, on_record, wall_clock = (
        context.locks,
        context.stop,
        context.on_record,
        context.wall_clock,
    )
    delay_for, min_interval_seconds = plan.delay_for, plan.min_interval_seconds
    # Offsets count from when the schedule fired, not from when listing finished.
    t0 = time.monotonic() if plan.started_monotonic is None else plan.started_monotonic

    def one(dom: DomainInfo) -> TrimRecord | None:
        if delay_for is not None:
            wait = delay_for(dom) - (time.monotonic() - t0)
            if wait > 0 and stop.wait(wait):
                return None
        if stop.is_set():
            return None
        if not locks.try_acquire(dom.uuid):
            return _skip(dom, opts, "skipped: another schedule is trimming this domain now")
        trimmed_at: float | None = None
        try:
            since = locks.too_soon(dom.uuid, min_interval_seconds, wall_clock())
            if since is not None:
                return _skip(
                    dom,
                    opts,
                    f"skipped: trimmed {since:.0f}s ago, min_interval is {min_interval_seconds:g}s",
                )
            if context.on_start is not None:
                context.on_start(dom)
            record = trimmer.trim(dom, opts)
            if record.result.fstrim_sent and not opts.dry_run:
                trimmed_at = wall_clock()
            return record
        except Exception:  # a bug must not kill the sweep; record it and go on
            log.exception("unexpected error trimming %s", dom.name)
            return TrimRecord(
                domain=dom.name,
                uuid=dom.uuid,
                result=Result.ERROR,
                message="internal error; see the log",
                started_at=utc_now_iso(),
                duration_seconds=0.0,
                schedule=opts.schedule,
                dry_run=opts.dry_run,
                method=opts.method,
                trigger=opts.trigger,
            )
        finally:
            locks.release(dom.uuid, trimmed_at)

    records: list[TrimRecord] = []
    rec_lock = threading.Lock()

    def worker(dom: DomainInfo) -> None:
        rec = one(dom)
        if rec is None:
            return
        if on_record is not None:
            try:
                on_record(rec)
            except Exception:
                log.exception("recording the trim of %s failed", dom.name)
        with rec_lock:
            records.append(rec)

    with ThreadPoolExecutor(
        max_workers=max(1, plan.concurrency), thread_name_prefix="trim"
    ) as pool:
        for fut in [
            pool.submit(worker, d) for d in start_order(domains, delay_for, plan.expected_seconds)
        ]:
            fut.result()
    order = {d.uuid: i for i, d in enumerate(domains)}
    records.sort(key=lambda r: order.get(r.uuid, 0))
    return SweepSummary(records=tuple(records))


def start_order(
    domains: Sequence[DomainInfo],
    delay_for: Callable[[DomainInfo], float] | None = None,
    expected_seconds: Callable[[DomainInfo], float | None] | None = None,
) -> list[DomainInfo]:
    """The order workers take domains in: by start offset, then longest expected first.

    Offset first, so a worker waiting for its slot in the window never holds up a
    domain due earlier. Among equal offsets (all of them without spreading), the
    longest trim last time goes first: with K workers, starting the long ones early
    keeps one of them from starting last and finishing alone (LPT scheduling). A
    domain with no known duration counts as longest, so a new large guest is not left
    to the end. Equal keys keep the given (name) order: sorted() is stable.
    """

    def key(dom: DomainInfo) -> tuple[float, float]:
        offset = delay_for(dom) if delay_for is not None else 0.0
        expected = expected_seconds(dom) if expected_seconds is not None else 0.0
        return offset, -(math.inf if expected is None else expected)

    return sorted(domains, key=key)


def _skip(dom: DomainInfo, opts: TrimOptions, message: str) -> TrimRecord:
    log.info("%s: %s", dom.name, message)
    return TrimRecord(
        domain=dom.name,
        uuid=dom.uuid,
        result=Result.SKIPPED,
        message=message,
        started_at=utc_now_iso(),
        duration_seconds=0.0,
        schedule=opts.schedule,
        dry_run=opts.dry_run,
        method=opts.method,
        trigger=opts.trigger,
    )
