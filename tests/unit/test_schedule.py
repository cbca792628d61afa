"""Schedule maths: stable spreading, fire times in local time, catch-up decisions."""

from __future__ import annotations

import dataclasses
import datetime as dt
from zoneinfo import ZoneInfo

import pytest

from virt_trimd.config.model import Config, ScheduleConfig
from virt_trimd.engine.schedule import build_trigger, catch_up_due, fire_times, spread_offset

TZ = ZoneInfo("Europe/Berlin")


def _sched(**kw: object) -> ScheduleConfig:
    base = ScheduleConfig(
        name="nightly",
        cron="30 2 * * *",
        every_seconds=None,
        window_seconds=3600,
        domains=("*",),
        exclude=(),
        concurrency=1,
        timeout_seconds=600,
        minimum_bytes=0,
        min_interval_seconds=0,
    )
    return dataclasses.replace(base, **kw)  # type: ignore[arg-type]


def test_spread_offset_is_stable_and_inside_the_window() -> None:
    offsets = [spread_offset("host-a", "nightly", f"uuid-{i}", 3600) for i in range(500)]
    assert offsets == [spread_offset("host-a", "nightly", f"uuid-{i}", 3600) for i in range(500)]
    assert all(0 <= o < 3600 for o in offsets)
    assert len(set(offsets)) == 500  # different across domains
    # spread over the whole window, not bunched: every 10-minute slice gets some
    assert {int(o // 600) for o in offsets} == set(range(6))


def test_spread_offset_differs_across_hosts_and_schedules() -> None:
    a = spread_offset("host-a", "nightly", "uuid-1", 3600)
    assert a != spread_offset("host-b", "nightly", "uuid-1", 3600)
    assert a != spread_offset("host-a", "weekly", "uuid-1", 3600)
    assert spread_offset("host-a", "nightly", "uuid-1", 0) == 0


def test_cron_fires_in_local_time_across_dst() -> None:
    after = dt.datetime(2026, 3, 28, 12, 0, tzinfo=TZ)  # DST starts on the 29th in Berlin
    times = list(fire_times(_sched(), TZ, after, 3))
    utc = [t.astimezone(dt.UTC).strftime("%m-%d %H:%M") for t in times]
    # 02:30 does not exist on the 29th: it fires at the same instant as 03:30 CEST.
    assert utc == ["03-29 01:30", "03-30 00:30", "03-31 00:30"]


@pytest.mark.parametrize("dow", ["0", "7", "sun"])
def test_crontab_sunday_means_sunday(dow: str) -> None:
    after = dt.datetime(2026, 11, 27, tzinfo=TZ)  # a Friday
    times = list(fire_times(_sched(cron=f"0 3 * * {dow}"), TZ, after, 3))
    assert [t.weekday() for t in times] == [6, 6, 6]


def test_interval_fire_times() -> None:
    after = dt.datetime(2026, 1, 1, tzinfo=TZ)
    times = list(fire_times(_sched(cron=None, every_seconds=6 * 3600), TZ, after, 2))
    assert [t - after for t in times] == [dt.timedelta(hours=6), dt.timedelta(hours=12)]


def test_build_trigger_kinds() -> None:
    now = dt.datetime(2026, 1, 1, 0, 0, tzinfo=TZ)
    cron = build_trigger(_sched(), TZ)
    assert cron is not None
    assert cron.get_next_fire_time(None, now) == dt.datetime(2026, 1, 1, 2, 30, tzinfo=TZ)
    every = build_trigger(_sched(cron=None, every_seconds=60), TZ)
    assert every is not None
    first = every.get_next_fire_time(None, now)
    assert first is not None
    assert every.get_next_fire_time(first, first) - first == dt.timedelta(seconds=60)
    # Growth triggers only: no time job, no fire times, nothing to catch up.
    growth_only = _sched(cron=None, every_seconds=None, growth_bytes=1 << 30)
    assert build_trigger(growth_only, TZ) is None
    assert list(fire_times(growth_only, TZ, now, 3)) == []


def test_catch_up_when_a_run_was_missed() -> None:
    sched = _sched()
    last = dt.datetime(2026, 1, 1, 2, 30, tzinfo=TZ).timestamp()
    same_day = dt.datetime(2026, 1, 1, 20, 0, tzinfo=TZ).timestamp()
    next_day = dt.datetime(2026, 1, 2, 9, 0, tzinfo=TZ).timestamp()
    assert catch_up_due(sched, TZ, last, same_day) is False
    assert catch_up_due(sched, TZ, last, next_day) is True
    assert catch_up_due(sched, TZ, None, next_day) is False  # never ran: nothing to catch up


def test_catch_up_interval() -> None:
    sched = _sched(cron=None, every_seconds=3600)
    assert catch_up_due(sched, TZ, 1000.0, 1000.0 + 3599) is False
    assert catch_up_due(sched, TZ, 1000.0, 1000.0 + 3601) is True


def test_default_config_has_no_schedules() -> None:
    assert Config.default().schedules == ()


def test_local_timezone_fires_without_warnings() -> None:
    # Debian 12's tzlocal 4 + APScheduler 3.9 printed a PytzUsageWarning at every fire.
    import warnings

    from virt_trimd.engine.schedule import local_timezone

    tz = local_timezone()
    sched = _sched()
    now = dt.datetime.now(tz)
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        trigger = build_trigger(sched, tz)
        assert trigger is not None
        fire = trigger.get_next_fire_time(None, now)
    assert fire is not None and fire > now
    assert (fire.hour, fire.minute) == (2, 30)
