"""Schedules: triggers, stable spreading offsets, catch-up decisions.

Pure functions over ScheduleConfig plus APScheduler trigger objects; the
service owns the running BackgroundScheduler.
"""

from __future__ import annotations

import datetime as dt
import hashlib
from collections.abc import Iterator

from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.interval import IntervalTrigger

from virt_trimd.config.cron import make_cron_trigger
from virt_trimd.config.model import ScheduleConfig


def local_timezone() -> dt.tzinfo:
    """The host's time zone, as the installed APScheduler wants it.

    tzlocal 4 (Debian 12) returns a pytz-deprecation shim whose localize() APScheduler
    3.9 (Debian 12) calls at every fire, printing a PytzUsageWarning into the journal;
    APScheduler before 3.10 wants real pytz zones, later ones take zoneinfo.
    """
    from importlib.metadata import version  # noqa: PLC0415

    from tzlocal import get_localzone, get_localzone_name  # noqa: PLC0415

    name = get_localzone_name()
    major_minor = tuple(int(p) for p in version("APScheduler").split(".")[:2])
    if name is None:
        return get_localzone()
    if major_minor < (3, 10):
        import pytz  # type: ignore[import-untyped,unused-ignore]  # noqa: PLC0415

        return pytz.timezone(name)  # type: ignore[no-any-return,unused-ignore]
    from zoneinfo import ZoneInfo  # noqa: PLC0415

    return ZoneInfo(name)


def build_trigger(sched: ScheduleConfig, tz: dt.tzinfo) -> BaseTrigger | None:
    """The APScheduler trigger for a schedule (cron in host local time, or interval).

    None for a schedule that only fires on growth triggers (engine/triggers.py).
    """
    if sched.cron is not None:
        return make_cron_trigger(sched.cron, tz)
    if sched.every_seconds is None:
        return None
    return IntervalTrigger(seconds=sched.every_seconds, timezone=tz)


def spread_offset(hostname: str, schedule: str, uuid: str, window_seconds: float) -> float:
    """Stable start offset of a domain inside the schedule's window, in seconds.

    A hash of (host, schedule, domain UUID): the same every run, different across
    domains and across hosts, so hosts that share storage do not all trim at once.
    """
    if window_seconds <= 0:
        return 0.0
    digest = hashlib.sha256(f"{hostname}\0{schedule}\0{uuid}".encode()).digest()
    fraction = int.from_bytes(digest[:8], "big") / 2**64
    return fraction * window_seconds


def fire_times(
    sched: ScheduleConfig, tz: dt.tzinfo, after: dt.datetime, count: int
) -> Iterator[dt.datetime]:
    """The next `count` fire times strictly after `after`."""
    if sched.every_seconds is not None:
        # An interval schedule counts from daemon start; show the cadence from `after`.
        for i in range(1, count + 1):
            yield after + dt.timedelta(seconds=sched.every_seconds * i)
        return
    trigger = build_trigger(sched, tz)
    if trigger is None:
        return
    prev: dt.datetime | None = None
    now = after + dt.timedelta(microseconds=1)
    for _ in range(count):
        nxt = trigger.get_next_fire_time(prev, now)
        if nxt is None:
            return
        yield nxt
        prev = nxt
        now = nxt + dt.timedelta(seconds=1)


def catch_up_due(
    sched: ScheduleConfig, tz: dt.tzinfo, last_sweep_ts: float | None, now_ts: float
) -> bool:
    """True when a run fell due while the daemon was down (systemd Persistent=true).

    Decided from the stored history: with no completed sweep on record there is
    nothing to catch up, as systemd does for a timer that never fired.
    """
    if last_sweep_ts is None:
        return False
    last = dt.datetime.fromtimestamp(last_sweep_ts, tz)
    nxt = next(fire_times(sched, tz, last, 1), None)
    return nxt is not None and nxt.timestamp() <= now_ts
