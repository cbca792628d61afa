"""The operator's view: what was reclaimed, what grows, what needs attention, what runs next.

Built from the history database alone (trims, sweeps and the census series), so
`virt-trimd status` works while the daemon is down; the daemon's status page and
`/api/v1/status` build the same report from its own connection, with the scheduler's
real next fire times. Nothing here writes anything.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from virt_trimd.config.model import Config, ScheduleConfig, matches_globs
from virt_trimd.engine.history import CensusPoint, History, TrimSummary
from virt_trimd.engine.schedule import fire_times, spread_offset
from virt_trimd.records import Result

DAY_SECONDS = 86_400
RECLAIM_WINDOWS_DAYS = (1, 7, 30)
GROWTH_WINDOW_SECONDS = 7 * DAY_SECONDS
CHART_DAYS = 30
# Per-disk charts on the page: the largest disks first, each thinned to this many points
# (a phone screen has fewer pixels than 30 days of hourly samples).
CHART_DISKS = 24
CHART_POINTS = 180


@dataclass(frozen=True)
class LastTrim:
    """A domain's latest trim (dry runs excluded)."""

    started_at: str
    result: str
    reclaimed_bytes: int
    message: str


@dataclass(frozen=True)
class DiskStatus:
    """One disk at its latest census, with its growth over the growth window."""

    disk: str
    path: str | None
    allocated_bytes: int | None
    virtual_bytes: int | None
    reclaimable_bytes: int | None
    growth_7d_bytes: int | None
    growth_since_ts: float | None
    discard_ready: bool | None


@dataclass(frozen=True)
class DomainStatus:
    """One domain's line of the report."""

    domain: str
    uuid: str | None
    state: str  # running, shut_off, unknown (in the trims only, not in the latest census)
    ready: bool | None  # every disk discard-ready, None when the census never saw it
    last_trim: LastTrim | None
    last_success_ts: float | None
    reclaimed_bytes: Mapping[int, int]  # days -> net bytes reclaimed in that many days
    allocated_bytes: int | None
    growth_7d_bytes: int | None
    reclaimable_bytes: int | None
    next_run_ts: float | None
    next_schedule: str | None
    reasons: tuple[str, ...]  # why it is not trimmed, or not trimmed well; one line each
    needs_attention: bool  # a reason someone must act on (not e.g. "shut off")
    disks: tuple[DiskStatus, ...]


@dataclass(frozen=True)
class StatusReport:
    """The whole report; `status_to_json` is its document (docs/json.md)."""

    generated_ts: float
    data_as_of_ts: float | None  # the latest census
    stale: bool  # no census for more than two census intervals: is the daemon running?
    domains: tuple[DomainStatus, ...]
    next_run_ts: float | None

    def total_reclaimed(self, days: int) -> int:
        """Net bytes reclaimed over all domains in the last `days` days."""
        return sum(d.reclaimed_bytes[days] for d in self.domains)

    @property
    def allocated_bytes(self) -> int:
        """Host bytes the images hold now (disks with a measurement)."""
        return sum(d.allocated_bytes or 0 for d in self.domains)

    @property
    def reclaimable_bytes(self) -> int:
        """Bytes the images hold beyond what the guests use (where the agent said)."""
        return sum(d.reclaimable_bytes or 0 for d in self.domains)

    @property
    def growth_7d_bytes(self) -> int:
        """Allocation growth over the growth window, all disks."""
        return sum(d.growth_7d_bytes or 0 for d in self.domains)

    @property
    def needs_attention(self) -> int:
        """Domains someone must look at."""
        return sum(1 for d in self.domains if d.needs_attention)


@dataclass(frozen=True)
class DiskSeries:
    """Allocated and guest-used bytes of one disk over the chart window."""

    domain: str
    disk: str
    points: tuple[tuple[float, int, int | None], ...]  # (ts, allocated, guest used)


@dataclass(frozen=True)
class StatusCharts:
    """What the page draws: reclaim per day and per-disk allocation over time."""

    reclaimed_by_day: tuple[tuple[dt.date, int], ...]  # oldest first, CHART_DAYS days
    disks: tuple[DiskSeries, ...]


def schedule_next_runs(
    history: History, schedules: Sequence[ScheduleConfig], tz: dt.tzinfo, now: float
) -> dict[str, float]:
    """Next fire of each schedule as the config says (for when the daemon is not asked).

    Cron schedules are exact. An `every` schedule counts from the daemon's start, so
    its next run is estimated as its latest sweep plus the interval (absent when unknown).
    """
    after = dt.datetime.fromtimestamp(now, tz)
    last = history.last_sweep_by_schedule()
    out: dict[str, float] = {}
    for sched in schedules:
        if sched.every_seconds is not None:
            if sched.name in last:
                nxt = last[sched.name] + sched.every_seconds
                out[sched.name] = max(nxt, now)
            continue
        for when in fire_times(sched, tz, after, 1):
            out[sched.name] = when.timestamp()
    return out


def build_status(
    history: History,
    config: Config,
    now: float,
    *,
    hostname: str,
    next_runs: Mapping[str, float],
) -> StatusReport:
    """The report as the history holds it at `now`. Raises HistoryError."""
    census_ts = history.latest_census_ts()
    census_domains = {d.domain: d for d in history.census_domains()}
    disks_by_domain: dict[str, list[DiskStatus]] = {}
    latest = history.census_at(now)
    baseline = history.census_at(now - GROWTH_WINDOW_SECONDS)
    first = history.census_first_after(now - GROWTH_WINDOW_SECONDS)
    ready_by_domain: dict[str, list[bool | None]] = {}
    for k in history.census_disks():
        key = (k.domain, k.disk)
        point = latest.get(key)
        base = baseline.get(key) or first.get(key)
        growth = None
        if (
            point is not None
            and base is not None
            and None
            not in (
                point.allocated_bytes,
                base.allocated_bytes,
            )
        ):
            growth = (point.allocated_bytes or 0) - (base.allocated_bytes or 0)
        disks_by_domain.setdefault(k.domain, []).append(
            DiskStatus(
                disk=k.disk,
                path=k.path,
                allocated_bytes=point.allocated_bytes if point else None,
                virtual_bytes=point.virtual_bytes if point else None,
                reclaimable_bytes=point.reclaimable_bytes if point else None,
                growth_7d_bytes=growth,
                growth_since_ts=base.ts if base is not None and growth is not None else None,
                discard_ready=k.discard_ready,
            )
        )
        ready_by_domain.setdefault(k.domain, []).append(k.discard_ready)

    reclaimed_by_domain = history.reclaimed_by_domain(now, RECLAIM_WINDOWS_DAYS)
    last_trims = history.latest_trim_summary_by_domain()
    last_success = history.last_success_by_domain()
    recent_trimmed = set(reclaimed_by_domain)
    names = sorted(set(census_domains) | recent_trimmed)

    domains: list[DomainStatus] = []
    for name in names:
        seen = census_domains.get(name)
        disks = tuple(disks_by_domain.get(name, ()))
        state = "unknown" if seen is None else ("running" if seen.running else "shut_off")
        readiness = ready_by_domain.get(name)
        ready = None if not readiness or None in readiness else all(bool(r) for r in readiness)
        record = last_trims.get(name)
        uuid = seen.uuid if seen is not None else (record.uuid if record else None)
        reclaimed = reclaimed_by_domain.get(name) or dict.fromkeys(RECLAIM_WINDOWS_DAYS, 0)
        next_ts, next_sched = _next_run(config, name, uuid, hostname, next_runs)
        if state != "running":
            next_ts, next_sched = None, None
        status = DomainStatus(
            domain=name,
            uuid=uuid,
            state=state,
            ready=ready,
            last_trim=_last_trim(record),
            last_success_ts=last_success.get(name),
            reclaimed_bytes=reclaimed,
            allocated_bytes=_sum_known(d.allocated_bytes for d in disks),
            growth_7d_bytes=_sum_known(d.growth_7d_bytes for d in disks),
            reclaimable_bytes=_sum_known(d.reclaimable_bytes for d in disks),
            next_run_ts=next_ts,
            next_schedule=next_sched,
            reasons=(),
            needs_attention=False,
            disks=disks,
        )
        reasons, act = _reasons(status, record, seen.agent_state if seen else None)
        domains.append(dataclasses.replace(status, reasons=reasons, needs_attention=act))
    interval = config.census_interval_seconds
    # With the census disabled nothing is recorded on purpose: not stale, just absent.
    stale = interval > 0 and (census_ts is None or now - census_ts > 2 * interval + 60)
    upcoming = [d.next_run_ts for d in domains if d.next_run_ts is not None]
    return StatusReport(
        generated_ts=now,
        data_as_of_ts=census_ts,
        stale=stale,
        domains=tuple(domains),
        next_run_ts=min(upcoming) if upcoming else min(next_runs.values(), default=None),
    )


def _sum_known(values: Any) -> int | None:
    known = [v for v in values if v is not None]
    return sum(known) if known else None


def _last_trim(record: TrimSummary | None) -> LastTrim | None:
    if record is None:
        return None
    return LastTrim(record.started_at, record.result.value, record.reclaimed_bytes, record.message)


def _next_run(
    config: Config,
    domain: str,
    uuid: str | None,
    hostname: str,
    next_runs: Mapping[str, float],
) -> tuple[float | None, str | None]:
    best: tuple[float, str] | None = None
    for sched in config.schedules:
        if sched.name not in next_runs or not matches_globs(domain, sched.domains, sched.exclude):
            continue
        # The domain starts at its stable offset inside the window, as the sweep does.
        offset = spread_offset(hostname, sched.name, uuid or "", sched.window_seconds)
        when = next_runs[sched.name] + offset
        if best is None or when < best[0]:
            best = (when, sched.name)
    return (None, None) if best is None else best


def _reasons(
    status: DomainStatus, record: TrimSummary | None, agent_state: str | None
) -> tuple[tuple[str, ...], bool]:
    """Why a domain is not trimming, or not trimming well, and whether anyone must act."""
    lines: list[str] = []
    act = False
    if status.state == "shut_off":
        lines.append("shut off: schedules trim running domains only")
    elif status.state == "unknown":
        lines.append("not in the latest census (undefined, or the daemon has not seen it yet)")
    elif status.next_schedule is None:
        lines.append("no schedule selects it")
    if status.state == "running" and agent_state not in (None, "connected"):
        lines.append(f"guest agent {agent_state}: trims cannot reach the guest")
        act = True
    if status.ready is False:
        bad = ", ".join(d.disk for d in status.disks if d.discard_ready is False)
        lines.append(f"not discard-ready: {bad} (see `virt-trimd audit`)")
        act = True
    if record is not None and record.result is not Result.SUCCESS:
        lines.append(f"last trim {record.result.value}: {record.message}")
        act = act or record.result.needs_attention or record.result is Result.PARTIAL
    return tuple(lines), act


def build_charts(history: History, now: float, tz: dt.tzinfo) -> StatusCharts:
    """Chart data for the page over the last CHART_DAYS days (days in `tz`). Raises HistoryError."""
    today = dt.datetime.fromtimestamp(now, tz).date()
    days = [today - dt.timedelta(days=i) for i in range(CHART_DAYS - 1, -1, -1)]
    per_day = dict.fromkeys(days, 0)
    for _, ts, reclaimed in history.reclaim_rows(now - (CHART_DAYS + 1) * DAY_SECONDS):
        day = dt.datetime.fromtimestamp(ts, tz).date()
        if day in per_day:
            per_day[day] += reclaimed
    current = {(d.domain, d.disk) for d in history.census_disks()}
    latest = history.census_at(now)
    # Only the largest disks are charted: read the series of those alone.
    largest = sorted(
        (key for key in current if key in latest),
        key=lambda key: (-(latest[key].allocated_bytes or 0), key),
    )[:CHART_DISKS]
    series = history.census_series(now - CHART_DAYS * DAY_SECONDS, largest)
    ranked = [(key, series[key]) for key in largest if series.get(key)]
    charts = [
        DiskSeries(
            domain=key[0],
            disk=key[1],
            points=tuple(
                (p.ts, p.allocated_bytes, _guest_used(p))
                for p in _thin(pts, CHART_POINTS)
                if p.allocated_bytes is not None
            ),
        )
        for key, pts in sorted(ranked, key=lambda item: item[0])
    ]
    return StatusCharts(tuple((d, per_day[d]) for d in days), tuple(charts))


def _guest_used(point: CensusPoint) -> int | None:
    if point.allocated_bytes is None or point.reclaimable_bytes is None:
        return None
    return point.allocated_bytes - point.reclaimable_bytes


def _thin(points: Sequence[CensusPoint], limit: int) -> list[CensusPoint]:
    if len(points) <= limit:
        return list(points)
    step = math.ceil(len(points) / limit)
    # Keep the newest sample: the chart's right edge is "now".
    return list(points[::-1][::step][::-1])


def _iso(ts: float | None) -> str | None:
    if ts is None:
        return None
    return dt.datetime.fromtimestamp(ts, dt.UTC).isoformat(timespec="seconds")


def status_to_json(report: StatusReport) -> dict[str, Any]:
    """The `status --json` and `/api/v1/status` document (docs/json.md)."""
    age = None if report.data_as_of_ts is None else report.generated_ts - report.data_as_of_ts
    return {
        "generated_at": _iso(report.generated_ts),
        "data_as_of": _iso(report.data_as_of_ts),
        "data_age_seconds": None if age is None else round(age, 1),
        "stale": report.stale,
        "totals": {
            "domains": len(report.domains),
            "needs_attention": report.needs_attention,
            "allocated_bytes": report.allocated_bytes,
            "reclaimable_bytes": report.reclaimable_bytes,
            "growth_7d_bytes": report.growth_7d_bytes,
            **{f"reclaimed_{n}d_bytes": report.total_reclaimed(n) for n in RECLAIM_WINDOWS_DAYS},
            "next_run_at": _iso(report.next_run_ts),
        },
        "domains": [_domain_json(d) for d in report.domains],
    }


def _domain_json(d: DomainStatus) -> dict[str, Any]:
    last = d.last_trim
    return {
        "domain": d.domain,
        "uuid": d.uuid,
        "state": d.state,
        "ready": d.ready,
        "last_trim": None
        if last is None
        else {
            "started_at": last.started_at,
            "result": last.result,
            "reclaimed_bytes": last.reclaimed_bytes,
            "message": last.message,
        },
        "last_success_at": _iso(d.last_success_ts),
        **{f"reclaimed_{n}d_bytes": d.reclaimed_bytes[n] for n in RECLAIM_WINDOWS_DAYS},
        "allocated_bytes": d.allocated_bytes,
        "growth_7d_bytes": d.growth_7d_bytes,
        "reclaimable_bytes": d.reclaimable_bytes,
        "next_run_at": _iso(d.next_run_ts),
        "next_schedule": d.next_schedule,
        "needs_attention": d.needs_attention,
        "reasons": list(d.reasons),
        "disks": [
            {
                "disk": k.disk,
                "path": k.path,
                "allocated_bytes": k.allocated_bytes,
                "virtual_bytes": k.virtual_bytes,
                "reclaimable_bytes": k.reclaimable_bytes,
                "growth_7d_bytes": k.growth_7d_bytes,
                "growth_since": _iso(k.growth_since_ts),
                "discard_ready": k.discard_ready,
            }
            for k in d.disks
        ],
    }
