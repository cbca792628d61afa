"""The always-on daemon: owns the main loop, signals, reloads, sd_notify and watchdog.

Signal handlers only set flags; the main loop acts on them. A reload validates
the new file first and swaps schedules only when it is valid (tuned does the
opposite and stops working on a bad file).
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import logging
import os
import select
import signal
import socket
import sys
import threading
import time
from collections.abc import Callable, Collection, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import TYPE_CHECKING, NoReturn

from virt_trimd import __version__
from virt_trimd.audit.checks import discard_ready
from virt_trimd.config.model import (
    Config,
    ConfigError,
    ScheduleConfig,
    check_file_permissions,
    load_config,
)
from virt_trimd.engine.history import CensusDomain, History, HistoryError
from virt_trimd.engine.offline import OfflineReclaimer
from virt_trimd.engine.schedule import build_trigger, catch_up_due, local_timezone
from virt_trimd.engine.state import DiskState, State
from virt_trimd.engine.storage_group import (
    StorageSlot,
    SweepLayout,
    members_digest,
    overrun_seconds,
    slot_of,
    sweep_offsets,
)
from virt_trimd.engine.sweep import (
    DomainLocks,
    SweepContext,
    SweepPlan,
    run_sweep,
    select_domains,
)
from virt_trimd.engine.triggers import Backoff, Due, baseline_after, could_not_help, due
from virt_trimd.engine.trim import (
    DomainTrimmer,
    TrimOptions,
    guest_used_by_disk,
    unmeasurable_reason,
)
from virt_trimd.host.agent import HypervisorError, Outcome
from virt_trimd.host.domxml import trimmable_disks
from virt_trimd.host.hypervisor import Hypervisor
from virt_trimd.host.measure import MeasureError, Measurer
from virt_trimd.host.sparsify import find_tool
from virt_trimd.records import DomainInfo, Method, Result, SweepSummary, TrimRecord
from virt_trimd.service import StartupError
from virt_trimd.service.notify import Notifier
from virt_trimd.units import format_bytes, format_duration

if TYPE_CHECKING:
    from apscheduler.schedulers.background import BackgroundScheduler
    from prometheus_client import CollectorRegistry

    from virt_trimd.web.collector import TrimdCollector
    from virt_trimd.web.server import MetricsServer

# The scheduler, prometheus_client and the web server are imported where they are first
# used: `run --once` needs none of them (unless --print-metrics), and importing them
# cost `run --once` about 60 ms of its ~300 ms start-up (docs/BENCHMARKS.md).

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.service")

LOOP_TICK_SECONDS = 1.0
LIBVIRT_CHECK_SECONDS = 5.0
MAX_RECONNECT_BACKOFF_SECONDS = 60.0
# How many of the newest history records seed the last guest-used figures at start.
LAST_GUEST_USED_RECORDS = 5000
# Successful trims read back per domain to find its last helpful one (growth baseline).
GROWTH_BASELINE_CANDIDATES = 4


@dataclass
class _Flags:
    """Set by signal handlers, read by the main loop. Plain attributes: no locks."""

    reload: bool = False
    stop: bool = False


class Daemon:
    """Everything `virt-trimd run` keeps alive, wired together."""

    def __init__(
        self,
        config: Config,
        config_path: Path | None,
        notifier: Notifier | None = None,
        hostname: str | None = None,
    ) -> None:
        self.config = config
        self.config_path = config_path
        self.notifier = notifier or Notifier()
        self.hostname = hostname or socket.gethostname()
        self.tz: dt.tzinfo = local_timezone()
        self.state = State()
        self.hv = Hypervisor(config.libvirt_uri)
        self.measurer = Measurer(config.qemu_img)
        self.trimmer = DomainTrimmer(self.hv, self.measurer)
        # Shared by every schedule: its semaphore bounds virt-sparsify runs host-wide.
        self.offline = OfflineReclaimer(self.hv, self.trimmer, config.offline)
        self.locks = DomainLocks()
        # Growth triggers: allocation after each domain's last successful trim (by UUID),
        # and the backoff for domains a triggered trim could not help.
        self.growth_baseline: dict[str, int] = {}
        # (domain, disk) -> (guest-used bytes, when): the census shows it for shut-off
        # domains, whose agent cannot be asked; restored from history at start.
        self.last_guest_used: dict[tuple[str, str], tuple[int, float]] = {}
        self.backoff = Backoff(base_seconds=max(config.census_interval_seconds, 60.0))
        self.stop_event = threading.Event()
        self.flags = _Flags()
        self.history: History | None = None
        self.server: MetricsServer | None = None
        self.scheduler: BackgroundScheduler | None = None
        self._sweep_locks: dict[str, threading.Lock] = {}
        # UUID -> seconds its last trim attempt held a worker (any result but skipped or
        # not_running): sweeps start the long ones first.
        self.last_duration: dict[str, float] = {}
        self._qemu_version: tuple[int, int, int] | None = None
        self._last_summary: str = "no sweep yet"
        self._next_libvirt_check = 0.0
        self._census_installed = False
        # (domain, disk) -> reason last warned about, so a census every 5 minutes
        # warns once per cause instead of flooding the journal.
        self._unmeasured_warned: dict[tuple[str, str], str] = {}
        self._reconnect_backoff = 1.0
        # The signal wakeup socket pair (install_signal_handlers); the loop reads _wakeup.
        self._wakeup: socket.socket | None = None
        self._wakeup_writer: socket.socket | None = None

    @functools.cached_property
    def registry(self) -> CollectorRegistry:
        """The registry the metrics endpoint and `run --once --print-metrics` render."""
        from prometheus_client import CollectorRegistry  # noqa: PLC0415

        registry = CollectorRegistry(auto_describe=False)
        registry.register(self.collector)
        return registry

    @functools.cached_property
    def collector(self) -> TrimdCollector:
        """The one collector of the registry, also behind the exposition cache."""
        from virt_trimd.web.collector import TrimdCollector  # noqa: PLC0415

        return TrimdCollector(self.state, __version__)

    # -- start-up ------------------------------------------------------------------

    def open_history(self) -> None:
        """Open the history store; failure is logged and exported, not fatal."""
        try:
            self.history = History(self.config.state_dir)
        except HistoryError as exc:
            log.error("history unavailable, trimming goes on without it: %s", exc)
            self.state.set_history_ok(False)
            self.history = None
            return
        try:
            self.state.restore_last_success(self.history.last_success_by_domain())
            self.last_duration.update(self.history.last_duration_by_uuid())
            horizon = self._min_interval_horizon()
            if horizon > 0:
                for rec in self.history.query(since_ts=time.time() - horizon):
                    if rec.result.fstrim_sent and not rec.dry_run:
                        self.locks.release(rec.uuid, rec.finished_ts)
        except HistoryError as exc:
            log.error("cannot read history: %s", exc)
        self._restore_last_guest_used()
        self._restore_growth_baselines()
        self.prune_history()

    def _restore_growth_baselines(self) -> None:
        """Seed growth baselines from each domain's last helpful trim in history.

        Without this a restart would count growth from the first census after it, and a
        guest that had grown most of its threshold before the restart would have to grow
        all of it again. Only with a growth trigger configured (a reload that adds one
        calls this again); only the newest few successful trims per domain are read
        (about 0.15 s at 1,000 domains with a year of daily trims).
        """
        if self.history is None or not any(s.growth_bytes for s in self.config.schedules):
            return
        try:
            candidates = self.history.latest_successes_by_uuid(GROWTH_BASELINE_CANDIDATES)
        except HistoryError as exc:
            log.error("cannot read history: %s", exc)
            return
        for uuid, records in candidates.items():  # newest first
            for rec in records:
                baseline = baseline_after(rec)
                if baseline is not None:
                    self.growth_baseline[uuid] = baseline
                    break

    def _restore_last_guest_used(self) -> None:
        """Seed last_guest_used from the newest records (bounded read)."""
        if self.history is None:
            return
        try:
            records = self.history.query(limit=LAST_GUEST_USED_RECORDS)
        except HistoryError as exc:
            log.error("cannot read history: %s", exc)
            return
        for rec in records:  # oldest first: newer ones overwrite
            self._note_guest_used(rec)

    def _note_guest_used(self, rec: TrimRecord) -> None:
        if rec.dry_run:
            return
        try:
            when = rec.finished_ts
        except ValueError:
            return
        for d in rec.disks:
            if d.guest_used_bytes is not None:
                self.last_guest_used[(rec.domain, d.disk)] = (d.guest_used_bytes, when)

    def _min_interval_horizon(self) -> float:
        """The longest min_interval of any schedule: how far back history must stay."""
        return max((s.min_interval_seconds for s in self.config.schedules), default=0.0)

    def prune_history(self) -> None:
        """Delete history older than history_retention (never what start-up reads back)."""
        retention = self.config.history_retention_seconds
        if self.history is None:
            return
        try:
            # Thinning is not retention: it runs even when everything is kept.
            self.history.compact_census(time.time())
        except HistoryError as exc:
            log.error("cannot compact the census series: %s", exc)
        if retention <= 0:
            return
        # open_history restores min_interval from the trims inside the longest one.
        horizon = self._min_interval_horizon()
        try:
            deleted = self.history.prune(time.time() - max(retention, horizon))
        except HistoryError as exc:
            # Not fatal and not a write failure of a trim: the next day's run tries again.
            log.error("cannot prune history: %s", exc)
            return
        if deleted:
            log.info(
                "history: deleted %d trim record(s) older than %s",
                deleted,
                format_duration(retention),
            )

    def start_metrics(self) -> None:
        """Bind the metrics port; raises StartupError so a taken port fails the start."""
        from virt_trimd.config.web import WebConfigError  # noqa: PLC0415
        from virt_trimd.web.collector import ExpositionCache  # noqa: PLC0415
        from virt_trimd.web.server import MetricsServerError, start_metrics_server  # noqa: PLC0415

        m = self.config.metrics
        try:
            # The registry holds only TrimdCollector, a function of the state snapshot:
            # scrapes between changes reuse the encoded body instead of re-rendering.
            self.server = start_metrics_server(
                self.registry,
                m.listen_host,
                m.listen_port,
                m.web_config_file,
                cache_key=self.state.snapshot,
                # A change (one trim of a sweep) re-encodes that domain's series only.
                renderer=ExpositionCache(self.collector).render,
            )
        except WebConfigError as exc:
            # A bad web config is a configuration error: exit 2, systemd does not restart.
            raise ConfigError([str(exc)]) from exc
        except MetricsServerError as exc:
            raise StartupError(str(exc)) from exc
        from virt_trimd.service.statuspages import status_pages  # noqa: PLC0415

        self.server.serve_pages(status_pages(self))
        log.info("metrics on %s", self.server.url)

    def connect_libvirt(self) -> bool:
        """Try to (re)connect; export libvirt_up; never raises."""
        try:
            self.hv.connect()
            if self._qemu_version is None:
                self._qemu_version = self.hv.qemu_version()
        except HypervisorError as exc:
            log.warning("libvirt unavailable: %s", exc.message)
            self.state.set_libvirt_up(False)
            return False
        self.state.set_libvirt_up(True)
        return True

    def start_scheduler(self) -> None:
        """Start APScheduler with one job per schedule plus the census."""
        from apscheduler.schedulers.background import BackgroundScheduler  # noqa: PLC0415

        self.scheduler = BackgroundScheduler(
            timezone=self.tz,
            job_defaults={"coalesce": True, "max_instances": 1, "misfire_grace_time": 300},
            executors={"default": {"type": "threadpool", "max_workers": 8}},
        )
        self.scheduler.start()
        self._install_jobs()

    def _install_jobs(self) -> None:
        assert self.scheduler is not None
        self.scheduler.remove_all_jobs()
        for sched in self.config.schedules:
            self._sweep_locks.setdefault(sched.name, threading.Lock())
            trigger = build_trigger(sched, self.tz)
            if trigger is None:
                continue  # fires only on growth triggers, at census
            self.scheduler.add_job(
                self.run_schedule,
                trigger,
                args=[sched.name],
                id=f"schedule:{sched.name}",
                name=sched.name,
            )
        if self.config.census_interval_seconds > 0:
            # The first census runs at start; after a reload (which removed every job)
            # the next one waits a full interval, so a SIGHUP storm is not a census storm.
            first = dt.datetime.now(self.tz)
            if self._census_installed:
                first += dt.timedelta(seconds=self.config.census_interval_seconds)
            self.scheduler.add_job(
                self.census,
                "interval",
                seconds=self.config.census_interval_seconds,
                id="census",
                next_run_time=first,
            )
            self._census_installed = True
        if any(s.offline for s in self.config.schedules) and find_tool() is None:
            log.error(
                "a schedule has offline: true but virt-sparsify is not installed: install "
                "libguestfs-tools (apt-get install libguestfs-tools); shut-off domains "
                "are not reclaimed until then"
            )
        # Pruning also runs in open_history at start, so the first daily run is a day on.
        self.scheduler.add_job(self.prune_history, "interval", days=1, id="history-prune")
        self.state.retain_schedules([s.name for s in self.config.schedules])
        self._refresh_next_runs()

    def catch_up(self) -> None:
        """Run, once, every schedule that fell due while the daemon was down."""
        if self.history is None or self.scheduler is None:
            return
        try:
            last = self.history.last_sweep_by_schedule()
        except HistoryError as exc:
            log.error("cannot read history for catch-up: %s", exc)
            return
        now = time.time()
        for sched in self.config.schedules:
            if catch_up_due(sched, self.tz, last.get(sched.name), now):
                log.info(
                    "schedule %s missed a run while the daemon was down; running now", sched.name
                )
                self.scheduler.add_job(
                    self.run_schedule,
                    "date",
                    run_date=dt.datetime.now(self.tz),
                    args=[sched.name],
                    id=f"catchup:{sched.name}",
                    replace_existing=True,
                )

    # -- work ----------------------------------------------------------------------

    def _schedule(self, name: str) -> ScheduleConfig | None:
        return next((s for s in self.config.schedules if s.name == name), None)

    def _list_domains(self) -> list[DomainInfo] | None:
        try:
            domains = self.hv.list_domains()
        except HypervisorError as exc:
            log.warning("cannot list domains: %s", exc.message)
            self.state.set_libvirt_up(False)
            return None
        self.state.set_libvirt_up(True)
        self.state.retain_domains([d.name for d in domains])
        return domains

    def storage_slot(self) -> StorageSlot | None:
        """This host's share of its storage group's windows; None outside a group."""
        group = self.config.storage_group
        return slot_of(group, group.host or self.hostname)

    def publish_storage_group(self) -> None:
        """Export this host's share, so Prometheus can compare the members' views."""
        slot = self.storage_slot()
        group = self.config.storage_group
        self.state.set_storage_group(
            None
            if slot is None
            else (slot.group, members_digest(group.members), slot.index + 1, slot.members,
                  slot.at_once)
        )  # fmt: skip

    def _sweep_offsets(
        self, sched: ScheduleConfig, picked: Sequence[DomainInfo], window: float
    ) -> dict[str, float]:
        layout = SweepLayout(
            self.hostname, sched.name, [d.uuid for d in picked], window, self.last_duration
        )
        slot, offsets = sweep_offsets(self.config.storage_group, layout)
        if slot is not None:
            start, length = slot.seconds(window)
            log.info(
                "schedule %s: storage group %s, share %d of %d: %.0fs to %.0fs of the window",
                sched.name,
                slot.group,
                slot.index + 1,
                slot.members,
                start,
                start + length,
            )
            over = overrun_seconds(slot, layout, sched.concurrency)
            if over > 0:
                log.warning(
                    "schedule %s: at concurrency %d the last trims of these guests took %.0fs "
                    "more than this host's %.0fs share of storage group %s, so the sweep "
                    "will run into other members' shares: raise storage_group.at_once or "
                    "the schedule's concurrency",
                    sched.name,
                    sched.concurrency,
                    over,
                    length,
                    slot.group,
                )
        return offsets

    def run_schedule(self, name: str, ignore_window: bool = False) -> SweepSummary | None:
        """One sweep of one schedule; never raises."""
        lock = self._sweep_locks.setdefault(name, threading.Lock())
        if not lock.acquire(blocking=False):
            log.info("schedule %s is still running; this run is skipped", name)
            return None
        try:
            sched = self._schedule(name)
            if sched is None or self.stop_event.is_set():
                return None
            return self._sweep(sched, ignore_window)
        except Exception:
            log.exception("sweep of schedule %s failed", name)
            return None
        finally:
            lock.release()
            self._refresh_next_runs()

    def _sweep(self, sched: ScheduleConfig, ignore_window: bool) -> SweepSummary | None:
        started = time.time()
        started_monotonic = time.monotonic()
        domains = self._list_domains()
        if domains is None:
            return None
        picked = select_domains((d for d in domains if d.running), sched.domains, sched.exclude)
        log.info("schedule %s: %d running domain(s) match", sched.name, len(picked))
        window = 0.0 if ignore_window else sched.window_seconds

        # A member of a storage group starts its guests inside its share of the window;
        # any other host spreads them by their hashes (storage_group.sweep_offsets).
        offsets = self._sweep_offsets(sched, picked, window)

        def delay_for(dom: DomainInfo) -> float:
            return offsets.get(dom.uuid, 0.0)

        opts = TrimOptions.from_config(
            self.config,
            timeout_seconds=sched.timeout_seconds,
            minimum_bytes=sched.minimum_bytes,
            schedule=sched.name,
        )
        plan = SweepPlan(
            concurrency=sched.concurrency,
            min_interval_seconds=sched.min_interval_seconds,
            delay_for=delay_for if window > 0 else None,
            expected_seconds=lambda dom: self.last_duration.get(dom.uuid),
            started_monotonic=started_monotonic,
        )
        context = SweepContext(locks=self.locks, stop=self.stop_event, on_record=self.record)
        summary = run_sweep(self.trimmer, picked, opts, plan, context)
        if sched.offline and not self.stop_event.is_set():
            offline = self._offline_sweep(sched, domains, opts, plan, context)
            summary = SweepSummary(records=summary.records + offline.records)
        finished = time.time()
        self.state.observe_sweep(sched.name, summary, finished)
        if self.history is not None and not self.stop_event.is_set():
            try:
                self.history.append_sweep(
                    sched.name, started, finished, len(summary.records), summary.reclaimed_bytes
                )
            except HistoryError as exc:
                log.error("cannot write sweep to history: %s", exc)
                self.state.set_history_ok(False)
        self._last_summary = (
            f"last sweep {sched.name}: {len(summary.records)} domain(s), "
            f"{format_bytes(summary.reclaimed_bytes)} reclaimed"
        )
        log.info("%s", self._last_summary)
        return summary

    def _offline_sweep(
        self,
        sched: ScheduleConfig,
        domains: list[DomainInfo],
        opts: TrimOptions,
        plan: SweepPlan,
        context: SweepContext,
    ) -> SweepSummary:
        """The schedule's shut-off domains, sparsified after its running ones were trimmed.

        Same locks and min_interval as the agent trims (one domain, one reclaim at a
        time, whichever the method); concurrency and timeout are the offline section's.
        """
        shut_off = select_domains(
            (d for d in domains if not d.running), sched.domains, sched.exclude
        )
        log.info("schedule %s: %d shut-off domain(s) match (offline)", sched.name, len(shut_off))
        offline_plan = dataclasses.replace(
            plan, concurrency=self.config.offline.concurrency, delay_for=None
        )
        offline_opts = dataclasses.replace(opts, method=Method.SPARSIFY)
        return run_sweep(self.offline, shut_off, offline_opts, offline_plan, context)

    def _check_triggers(self, dom: DomainInfo, disks: list[DiskState]) -> None:
        """At census: start a triggered trim of `dom` if a schedule's growth trigger fires.

        One trigger per domain per census, never while the domain backs off, is inside a
        min_interval, or while its schedule is sweeping (the sweep trims it anyway). The
        trim runs in a thread holding the schedule's sweep lock, so shutdown waits for it
        within shutdown_grace like for a sweep.
        """
        measured = [d.allocated_bytes for d in disks if d.allocated_bytes is not None]
        allocated = sum(measured) if measured else None
        known = [d.reclaimable_bytes for d in disks if d.reclaimable_bytes is not None]
        reclaimable = sum(known) if known else None
        if allocated is not None:
            # Growth is counted from the first census that saw the domain when no trim
            # has been seen yet: before that, nothing says what it was.
            self.growth_baseline.setdefault(dom.uuid, allocated)
        baseline = self.growth_baseline.get(dom.uuid)
        now = time.time()
        for sched in self.config.schedules:
            if not sched.triggered or not sched.matches(dom.name):
                continue
            hit = due(sched, allocated, baseline, reclaimable)
            if hit is None:
                continue
            until = self.backoff.until(dom.uuid, now)
            if until is not None:
                log.debug("%s: %s, but backing off until %.0f", dom.name, hit.reason, until)
                return
            if self.locks.too_soon(dom.uuid, sched.min_interval_seconds, now) is not None:
                return
            lock = self._sweep_locks.setdefault(sched.name, threading.Lock())
            if self.stop_event.is_set() or not lock.acquire(blocking=False):
                return
            log.info(
                "schedule %s: %s: %s; trimming now",
                sched.name,
                dom.name,
                hit.reason,
                extra={"DOMAIN": dom.name, "SCHEDULE": sched.name, "TRIGGER": hit.trigger},
            )
            threading.Thread(
                target=self._triggered_trim,
                args=(sched, dom, hit, lock),
                name=f"trigger-{sched.name}",
                daemon=True,
            ).start()
            return

    def _triggered_trim(
        self, sched: ScheduleConfig, dom: DomainInfo, hit: Due, lock: threading.Lock
    ) -> None:
        """Trim one domain for a trigger (lock held by the caller), then back off or not."""
        try:
            opts = TrimOptions.from_config(
                self.config,
                timeout_seconds=sched.timeout_seconds,
                minimum_bytes=sched.minimum_bytes,
                schedule=sched.name,
            )
            opts = dataclasses.replace(opts, trigger=hit.trigger)
            plan = SweepPlan(min_interval_seconds=sched.min_interval_seconds)
            context = SweepContext(locks=self.locks, stop=self.stop_event, on_record=self.record)
            summary = run_sweep(self.trimmer, [dom], opts, plan, context)
            threshold = sched.growth_bytes if hit.trigger == "growth" else sched.reclaimable_bytes
            for rec in summary.records:
                if rec.result is Result.SKIPPED:
                    continue
                why = could_not_help(rec, threshold)
                if why is None:
                    self.backoff.helped(dom.uuid)
                    self.state.set_trigger_backoff(dom.name, None)
                    continue
                until = self.backoff.failed(dom.uuid, time.time())
                self.state.set_trigger_backoff(dom.name, until)
                log.warning(
                    "%s: %s; triggers leave it alone until %s",
                    dom.name,
                    why,
                    dt.datetime.fromtimestamp(until, self.tz).isoformat(timespec="seconds"),
                    extra={"DOMAIN": dom.name, "TRIGGER": hit.trigger},
                )
        except Exception:
            log.exception("triggered trim of %s failed", dom.name)
        finally:
            lock.release()

    def record(self, rec: TrimRecord) -> None:
        """Store one trim: history first (crash safety), then in-memory metrics."""
        if self.history is not None:
            try:
                self.history.append(rec)
                self.state.set_history_ok(True)
            except HistoryError as exc:
                log.error("cannot write history: %s", exc)
                self.state.set_history_ok(False)
        else:
            self.state.set_history_ok(False)
        if rec.result.attempted and not rec.dry_run:
            self.last_duration[rec.uuid] = rec.duration_seconds
        self._note_guest_used(rec)
        # Growth counts from the last trim that really gave space back.
        baseline = baseline_after(rec)
        if baseline is not None:
            self.growth_baseline[rec.uuid] = baseline
        self.state.observe_trim(rec)

    def _warn_not_measured(self, domain: str, disk: str, reason: str) -> None:
        if self._unmeasured_warned.get((domain, disk)) == reason:
            return
        self._unmeasured_warned[(domain, disk)] = reason
        log.warning(
            "%s/%s: allocation not measured: %s",
            domain,
            disk,
            reason,
            extra={"DOMAIN": domain, "DISK": disk, "NOT_MEASURED": reason},
        )

    def census(
        self,
        only: Collection[str] | None = None,
        known_used: Mapping[str, Mapping[str, int]] | None = None,
    ) -> None:
        """Refresh allocation, readiness and reclaimable gauges without trimming.

        `only` limits it to those domain names (run --once: the domains it swept).
        `known_used` gives, by domain name, guest-used bytes per disk target already
        read this run (by the trims' effectiveness checks): those guests are not asked
        again.
        """
        domains = self._list_domains()
        if domains is None:
            return
        if only is None:
            names = {d.name for d in domains}
            for key in [k for k in self.last_guest_used if k[0] not in names]:
                del self.last_guest_used[key]
        else:
            domains = [d for d in domains if d.name in only]
        paths: set[str] = set()
        census_ts = time.time()
        seen: list[CensusDomain] = []
        for dom in domains:
            if self.stop_event.is_set():
                return
            used: Mapping[str, int] = {}
            if known_used is not None and dom.name in known_used:
                used = known_used[dom.name]
            elif dom.running and dom.agent.configured and dom.agent.state == "connected":
                try:
                    used = guest_used_by_disk(self.hv.guest_filesystems(dom.uuid))
                except HypervisorError as exc:
                    log.debug("%s: no guest filesystem info: %s", dom.name, exc.message)
            disks: list[DiskState] = []
            for disk in trimmable_disks(dom.disks):
                alloc = None
                reason: str | None = None
                if disk.is_file and disk.source_path:
                    paths.add(disk.source_path)
                    try:
                        alloc = self.measurer.allocation(disk.source_path, disk.driver_format)
                    except MeasureError as exc:
                        reason = str(exc)
                        log.debug("%s/%s: %s", dom.name, disk.target, exc)
                        self._warn_not_measured(dom.name, disk.target, reason)
                else:
                    reason = unmeasurable_reason(disk)
                allocated = alloc.allocated_bytes if alloc else None
                guest_used = used.get(disk.target)
                if guest_used is not None:
                    self.last_guest_used[(dom.name, disk.target)] = (guest_used, time.time())
                last_used = self.last_guest_used.get((dom.name, disk.target))
                disks.append(
                    DiskState(
                        domain=dom.name,
                        disk=disk.target,
                        path=disk.source_path,
                        format=disk.driver_format,
                        bus=disk.bus,
                        discard=disk.discard,
                        allocated_bytes=allocated,
                        virtual_bytes=alloc.virtual_bytes if alloc else None,
                        file_bytes=alloc.file_bytes if alloc else None,
                        discard_ready=discard_ready(disk, dom.machine, self._qemu_version),
                        reclaimable_bytes=(
                            allocated - guest_used
                            if allocated is not None and guest_used is not None
                            else None
                        ),
                        not_measured=reason,
                        last_guest_used_bytes=last_used[0] if last_used else None,
                        last_guest_used_ts=last_used[1] if last_used else None,
                    )
                )
            self.state.observe_census(dom.name, disks)
            seen.append(
                CensusDomain(dom.name, dom.uuid, dom.running, dom.agent.state, tuple(disks))
            )
            if dom.running and only is None:
                self._check_triggers(dom, disks)
        self.measurer.forget(paths)
        self._record_census(census_ts, seen, complete=only is None)

    def _record_census(self, ts: float, domains: list[CensusDomain], *, complete: bool) -> None:
        """Keep the census in the history's series (status, the page); never raises."""
        if self.history is None:
            return
        try:
            self.history.append_census(ts, domains, complete=complete)
        except HistoryError as exc:
            log.error("cannot write census to history: %s", exc)
            self.state.set_history_ok(False)
            return
        # history_write_ok is "the latest write succeeded": a census is a write too.
        self.state.set_history_ok(True)

    # -- main loop -----------------------------------------------------------------

    def _refresh_next_runs(self) -> None:
        if self.scheduler is None:
            return
        for sched in self.config.schedules:
            job = self.scheduler.get_job(f"schedule:{sched.name}")
            nxt = job.next_run_time if job is not None else None
            self.state.set_next_run(sched.name, nxt.timestamp() if nxt else None)

    def _status_text(self) -> str:
        next_runs = []
        if self.scheduler is not None:
            for job in self.scheduler.get_jobs():
                if job.id.startswith("schedule:") and job.next_run_time is not None:
                    next_runs.append(job.next_run_time)
        nxt = min(next_runs).strftime("%Y-%m-%d %H:%M %Z") if next_runs else "none"
        backing_off = self.backoff.active(time.time())
        tail = f"; {backing_off} domain(s) in trigger backoff" if backing_off else ""
        return f"next run {nxt}; {self._last_summary}{tail}"

    def reload(self) -> None:
        """Validate the config file, then swap; keep the old schedules on any error."""
        from virt_trimd.config.web import WebConfigError  # noqa: PLC0415
        from virt_trimd.web.server import load_web_config  # noqa: PLC0415

        self.notifier.reloading()
        try:
            if self.config_path is None:
                raise ConfigError([])
            new = load_config(self.config_path)
            web = new.metrics.web_config_file
            web_config = load_web_config(web) if web is not None else None
        except WebConfigError as exc:
            log.error("reload rejected: %s", exc)
            log.error("configuration reload failed; keeping the previous schedules")
            self.state.set_config_reload(False)
            self.notifier.ready()
            return
        except ConfigError as exc:
            for line in exc.errors:
                log.error("reload rejected: %s", line)
            log.error("configuration reload failed; keeping the previous schedules")
            self.state.set_config_reload(False)
            self.notifier.ready()
            return
        old = self.config
        if (new.metrics, new.libvirt_uri, new.state_dir) != (
            old.metrics,
            old.libvirt_uri,
            old.state_dir,
        ):
            log.warning(
                "metrics, libvirt.uri and state_dir changes take effect at restart; "
                "schedules and limits are reloaded now"
            )
            new = _keep_restart_only(new, old)
        if self.server is not None and web == self.config.metrics.web_config_file:
            # Same file, possibly renewed certificate or changed passwords.
            self.server.apply_web_config(web_config)
        self.config = new
        self.measurer.limits = new.qemu_img
        if new.offline != old.offline:
            # A run in progress keeps the old reclaimer (and its slot) until it ends.
            self.offline = OfflineReclaimer(self.hv, self.trimmer, new.offline)
        if self.scheduler is not None:
            self._install_jobs()
        if not any(s.growth_bytes for s in old.schedules):
            self._restore_growth_baselines()
        self.state.set_config_reload(True)
        self.publish_storage_group()
        log.info("configuration reloaded: %d schedule(s)", len(new.schedules))
        self.notifier.ready()

    def _check_libvirt(self, now: float) -> None:
        if now < self._next_libvirt_check:
            return
        if self.hv.is_alive():
            self.state.set_libvirt_up(True)
            self._reconnect_backoff = 1.0
            self._next_libvirt_check = now + LIBVIRT_CHECK_SECONDS
            return
        self.state.set_libvirt_up(False)
        if self.connect_libvirt():
            log.info("reconnected to %s", self.hv.uri)
            self._reconnect_backoff = 1.0
            self._next_libvirt_check = now + LIBVIRT_CHECK_SECONDS
        else:
            self._next_libvirt_check = now + self._reconnect_backoff
            self._reconnect_backoff = min(
                self._reconnect_backoff * 2, MAX_RECONNECT_BACKOFF_SECONDS
            )

    def loop(self) -> None:
        """Main loop: watchdog, flags, libvirt liveness, status. Returns on stop."""
        tick = LOOP_TICK_SECONDS
        interval = self.notifier.watchdog_interval()
        if interval is not None:
            tick = min(tick, interval)
        last_status = ""
        while not self.flags.stop:
            self.notifier.watchdog()
            if self.flags.reload:
                self.flags.reload = False
                self.reload()
            if self.flags.stop:
                break
            self._check_libvirt(time.monotonic())
            status = self._status_text()
            if status != last_status:
                self.notifier.status(status)
                last_status = status
            self._wait(tick)

    def _wait(self, seconds: float) -> None:
        """Sleep up to `seconds`; a signal ends the wait at once (via the wakeup socket)."""
        if self._wakeup is None:
            time.sleep(seconds)
            return
        readable, _, _ = select.select([self._wakeup], [], [], seconds)
        if readable:
            with contextlib.suppress(BlockingIOError):
                while self._wakeup.recv(4096):
                    pass

    def shutdown(self) -> bool:
        """Stop scheduling, let running trims finish within the grace period, close.

        Returns False when trims were still running as the grace period ended.
        """
        self.notifier.stopping()
        log.info(
            "stopping: waiting up to %gs for running trims", self.config.shutdown_grace_seconds
        )
        self.stop_event.set()
        finished = True
        if self.scheduler is not None:
            self.scheduler.pause()
            deadline = time.monotonic() + self.config.shutdown_grace_seconds
            for lock in list(self._sweep_locks.values()):
                remaining = deadline - time.monotonic()
                if remaining <= 0 or not lock.acquire(timeout=remaining):
                    log.warning("grace period over; exiting with trims still running")
                    finished = False
                    break
                lock.release()
            self.scheduler.shutdown(wait=False)
        if self.server is not None:
            self.server.shutdown()
        if self.history is not None:
            self.history.close()
        if finished:
            # virConnectClose waits for calls in flight on the connection; with a
            # guest-agent call stuck past the grace period we exit without it.
            self.hv.close()
        return finished

    def install_signal_handlers(self) -> None:
        """SIGHUP reloads, SIGTERM/SIGINT stop; handlers only set flags.

        Python runs a handler in the main thread between two bytecodes, possibly while
        that thread holds a lock; a handler that takes a lock (threading.Event.set does)
        then deadlocks the main loop, which a burst of SIGHUPs did, leaving SIGTERM
        unanswered. So handlers only assign attributes, and the loop is woken by the
        byte the interpreter itself writes to the wakeup socket for every signal.
        """
        reader, writer = socket.socketpair()
        reader.setblocking(False)
        writer.setblocking(False)
        signal.set_wakeup_fd(writer.fileno(), warn_on_full_buffer=False)
        self._wakeup, self._wakeup_writer = reader, writer

        def on_hup(_sig: int, _frame: FrameType | None) -> None:
            self.flags.reload = True

        def on_term(_sig: int, _frame: FrameType | None) -> None:
            # The loop sees this at once and shutdown() sets stop_event for the workers.
            self.flags.stop = True

        signal.signal(signal.SIGHUP, on_hup)
        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, on_term)


def _keep_restart_only(new: Config, old: Config) -> Config:
    return dataclasses.replace(
        new, metrics=old.metrics, libvirt_uri=old.libvirt_uri, state_dir=old.state_dir
    )


def load_for_run(path: Path) -> Config:
    """Load and validate the config for `run`; refuse files others may write."""
    config = load_config(path)
    problems = check_file_permissions(path)
    if problems:
        raise ConfigError(problems)
    return config


def run_daemon(config_path: Path, notifier_factory: Callable[[], Notifier] = Notifier) -> NoReturn:
    """`virt-trimd run`: start everything, loop until SIGTERM, shut down, exit 0.

    Raises ConfigError or StartupError when it cannot start.
    """
    config = load_for_run(config_path)
    daemon = Daemon(config, config_path, notifier_factory())
    daemon.install_signal_handlers()
    daemon.open_history()
    daemon.start_metrics()
    daemon.state.set_config_reload(True)
    daemon.publish_storage_group()
    daemon.connect_libvirt()
    daemon.start_scheduler()
    daemon.catch_up()
    daemon.notifier.ready()
    log.info("virt-trimd %s running: %d schedule(s)", __version__, len(config.schedules))
    try:
        daemon.loop()
    finally:
        finished = daemon.shutdown()
    log.info("stopped" if finished else "stopped with a trim still running")
    # History is closed and the listener is down. A libvirt call still in flight (a
    # trim past the grace period, a census on a slow agent) cannot be cancelled, and
    # interpreter exit would join the executor threads stuck in it (concurrent.futures
    # joins them, daemon threads or not), so leave without waiting for them.
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(0)


def guest_used_from_records(records: Collection[TrimRecord]) -> dict[str, dict[str, int]]:
    """Guest-used bytes by disk from trims whose effectiveness check read them."""
    known: dict[str, dict[str, int]] = {}
    for rec in records:
        if rec.result.agent_answered:
            used = {d.disk: d.guest_used_bytes for d in rec.disks if d.guest_used_bytes is not None}
            if used:
                known[rec.domain] = used
    return known


def run_once(config: Config, config_path: Path | None) -> tuple[SweepSummary, Daemon]:
    """`virt-trimd run --once`: every schedule's sweep now, windows ignored."""
    daemon = Daemon(config, config_path)
    daemon.open_history()
    daemon.state.set_config_reload(True)
    if not daemon.connect_libvirt():
        raise HypervisorError(Outcome.CONNECTION, f"cannot connect to {config.libvirt_uri}")
    records: list[TrimRecord] = []
    for sched in config.schedules:
        summary = daemon.run_schedule(sched.name, ignore_window=True)
        if summary is not None:
            records.extend(summary.records)
    # Only the swept domains: asking every guest on the host for its filesystems
    # costs up to libvirt's 5 s agent sync per guest whose agent is stuck. And not
    # again those whose trim just read them (two agent round trips per guest saved).
    daemon.census(only={r.domain for r in records}, known_used=guest_used_from_records(records))
    if daemon.history is not None:
        daemon.history.close()
    daemon.hv.close()
    return SweepSummary(records=tuple(records)), daemon
