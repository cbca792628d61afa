"""Crontab -> APScheduler translation, checked against APScheduler's real fire times."""

from __future__ import annotations

import calendar
import datetime
import itertools
import zoneinfo

import pytest
from apscheduler.triggers.cron import CronTrigger
from hypothesis import given, settings
from hypothesis import strategies as st

from virt_trimd.config.cron import crontab_fields, make_cron_trigger, shortest_period_seconds

UTC = datetime.UTC
# A Wednesday, so a week of fires crosses the weekend and the cron/APScheduler numbering gap.
START = datetime.datetime(2025, 1, 1, 0, 0, tzinfo=UTC)


def fires(expr: str, count: int, start: datetime.datetime = START) -> list[datetime.datetime]:
    """The next ``count`` fire times APScheduler itself computes for ``expr``."""
    trigger = make_cron_trigger(expr, start.tzinfo or UTC)
    out: list[datetime.datetime] = []
    previous: datetime.datetime | None = None
    now = start
    for _ in range(count):
        fire = trigger.get_next_fire_time(previous, now)
        assert fire is not None
        out.append(fire)
        previous = fire
        now = fire + datetime.timedelta(seconds=1)
    return out


def weekdays(expr: str, count: int = 21) -> set[str]:
    return {fire.strftime("%a") for fire in fires(expr, count)}


def test_sunday_is_zero() -> None:
    times = fires("0 3 * * 0", 6)
    assert {t.strftime("%a") for t in times} == {"Sun"}
    assert all((t.hour, t.minute) == (3, 0) for t in times)
    assert times[0] == datetime.datetime(2025, 1, 5, 3, 0, tzinfo=UTC)


def test_seven_is_sunday_too() -> None:
    assert fires("0 3 * * 7", 6) == fires("0 3 * * 0", 6)


@pytest.mark.parametrize(
    ("expr", "days"),
    [
        ("0 3 * * 1-5", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
        ("0 3 * * mon-fri", {"Mon", "Tue", "Wed", "Thu", "Fri"}),
        ("0 3 * * 5-7", {"Fri", "Sat", "Sun"}),
        ("0 3 * * 0-6", {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}),
        ("0 3 * * 0-7", {"Mon", "Tue", "Wed", "Thu", "Fri", "Sat", "Sun"}),
        ("0 3 * * */2", {"Sun", "Tue", "Thu", "Sat"}),
        ("0 3 * * 1-5/2", {"Mon", "Wed", "Fri"}),
        ("0 3 * * 0,6", {"Sat", "Sun"}),
        ("0 3 * * 6,7", {"Sat", "Sun"}),
        ("0 3 * * SUN,Wed", {"Sun", "Wed"}),
        ("0 3 * * sat-sun", None),  # names keep cron order: a backwards range
    ],
)
def test_day_of_week_translation(expr: str, days: set[str] | None) -> None:
    if days is None:
        with pytest.raises(ValueError, match="backwards"):
            crontab_fields(expr)
    else:
        assert weekdays(expr) == days


def test_weekday_field_names_apscheduler_days() -> None:
    assert crontab_fields("0 3 * * 1-5")["day_of_week"] == "mon-fri"
    assert crontab_fields("0 3 * * 5-7")["day_of_week"] == "fri-sun"
    assert crontab_fields("0 3 * * 0,1")["day_of_week"] == "mon,sun"
    assert crontab_fields("0 3 * * *")["day_of_week"] == "*"


def test_fields_for_a_plain_expression() -> None:
    assert crontab_fields("30 2 * * *") == {
        "minute": "30",
        "hour": "2",
        "day": "*",
        "month": "*",
        "day_of_week": "*",
    }
    assert crontab_fields("5/15 */2 1-10/3 jan-mar *") == {
        "minute": "5-59/15",
        "hour": "*/2",
        "day": "1-10/3",
        "month": "1-3",
        "day_of_week": "*",
    }


@pytest.mark.parametrize(
    ("expr", "minute"),
    [
        ("0-0/1 * * * *", "0"),  # not "0/1", which APScheduler reads as every minute
        ("*/60 * * * *", "0"),  # cron takes the first value; APScheduler would refuse
        ("5-6/2 * * * *", "5"),
        ("7/90 * * * *", "7"),
    ],
)
def test_steps_that_select_one_value(expr: str, minute: str) -> None:
    assert crontab_fields(expr)["minute"] == minute
    assert {t.minute for t in fires(expr, 3)} == {int(minute)}


def test_steps_ranges_and_lists_fire_where_cron_would() -> None:
    times = fires("5/20 1,13 * * *", 6)
    assert [(t.hour, t.minute) for t in times] == [
        (1, 5),
        (1, 25),
        (1, 45),
        (13, 5),
        (13, 25),
        (13, 45),
    ]


@pytest.mark.parametrize(
    ("macro", "first_fire"),
    [
        ("@hourly", datetime.datetime(2025, 1, 1, 1, 0, tzinfo=UTC)),
        ("@daily", datetime.datetime(2025, 1, 2, 0, 0, tzinfo=UTC)),
        ("@midnight", datetime.datetime(2025, 1, 2, 0, 0, tzinfo=UTC)),
        ("@weekly", datetime.datetime(2025, 1, 5, 0, 0, tzinfo=UTC)),  # Sunday
        ("@monthly", datetime.datetime(2025, 2, 1, 0, 0, tzinfo=UTC)),
        ("@yearly", datetime.datetime(2026, 1, 1, 0, 0, tzinfo=UTC)),
        ("@annually", datetime.datetime(2026, 1, 1, 0, 0, tzinfo=UTC)),
        ("@DAILY", datetime.datetime(2025, 1, 2, 0, 0, tzinfo=UTC)),
    ],
)
def test_macros(macro: str, first_fire: datetime.datetime) -> None:
    # One second past midnight so "now" itself is not a fire time.
    assert fires(macro, 1, START + datetime.timedelta(seconds=1))[0] == first_fire


def test_both_day_fields_restricted_is_refused() -> None:
    with pytest.raises(ValueError, match="restrict only one of day-of-month and day-of-week"):
        crontab_fields("0 3 1 * 1")
    with pytest.raises(ValueError, match="restrict only one"):
        crontab_fields("0 3 1-31 * 0-6")


def test_star_step_weekday_with_day_of_month_is_anded_like_cron() -> None:
    # cron treats a field starting with "*" as unrestricted and ANDs: the 13th that is
    # also a Friday... for "*/5" that means Sunday or Friday.
    times = fires("0 0 13 * */5", 3)
    assert all(t.day == 13 and t.strftime("%a") in {"Fri", "Sun"} for t in times)


@pytest.mark.parametrize(
    ("expr", "fragment"),
    [
        ("0 3 * *", "expected 5 fields"),
        ("0 0 3 * * *", "seconds, years and commands"),
        ("", "expected 5 fields"),
        ("60 * * * *", "minute field: 60 is out of range 0-59"),
        ("* 24 * * *", "hour field: 24 is out of range"),
        ("* * 0 * *", "day-of-month field: 0 is out of range"),
        ("* * * 13 *", "month field: 13 is out of range"),
        ("* * * * 8", "day-of-week field: 8 is out of range 0-7"),
        ("* * * * 1-", "cannot read"),
        ("5-1 * * * *", "backwards"),
        ("*/0 * * * *", "step must be at least 1"),
        ("* * L * *", "not a number"),
        ("* * * * 5L", "not a number"),
        ("* * ? * *", "cannot read"),
        ("* * * * 1#2", "cannot read"),
        ("* * * foo *", "not a number from 1 to 12 or a name"),
        ("1,,2 * * * *", "cannot read"),
        ("0 0 31 2 *", "never fires"),
        ("0 0 30,31 2 *", "never fires"),
        ("@reboot", "@reboot is not a schedule"),
        ("@often", "unknown cron macro"),
    ],
)
def test_rejects_non_standard_or_broken_expressions(expr: str, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment.replace("?", r"\?")):
        crontab_fields(expr)


def test_feb_29_is_allowed_and_fires_in_leap_years() -> None:
    times = fires("0 0 29 2 *", 2)
    assert [t.year for t in times] == [2028, 2032]


def test_trigger_uses_the_given_timezone() -> None:
    berlin = zoneinfo.ZoneInfo("Europe/Berlin")
    trigger = make_cron_trigger("0 3 * * 0", berlin)
    assert isinstance(trigger, CronTrigger)
    fire = trigger.get_next_fire_time(None, datetime.datetime(2025, 1, 1, tzinfo=berlin))
    assert fire is not None
    assert (fire.hour, fire.strftime("%a")) == (3, "Sun")
    assert fire.utcoffset() == datetime.timedelta(hours=1)


@pytest.mark.parametrize(
    ("expr", "seconds"),
    [
        ("* * * * *", 60),
        ("*/5 * * * *", 300),
        ("30 2 * * *", 86400),
        ("0 3 * * 1-5", 86400),
        ("0 3 * * 0", 7 * 86400),
        ("0,30 3 * * *", 1800),
        ("0 1,23 * * *", 2 * 3600),  # 23:00 to 01:00 next day
        ("0 0 1,31 * *", 86400),  # 31 Jan to 1 Feb
        ("0 0 29 2 *", 4 * 365 * 86400 + 86400),
        ("@monthly", 28 * 86400),
    ],
)
def test_shortest_period(expr: str, seconds: int) -> None:
    assert shortest_period_seconds(expr) == seconds


# -- an independent cron matcher, to compare APScheduler's fires with cron's meaning ------

NAMES = {
    **{n: i for i, n in enumerate(["sun", "mon", "tue", "wed", "thu", "fri", "sat"])},
    **{n.lower(): i for i, n in enumerate(calendar.month_abbr) if n},
}


def reference_values(field: str, low: int, high: int) -> set[int]:
    """Expand one cron field the way crontab(5) describes it."""
    values: set[int] = set()
    for part in field.split(","):
        base, _, step = part.partition("/")
        if base == "*":
            first, last = low, high
        elif "-" in base:
            a, b = base.split("-")
            first = NAMES[a] if a in NAMES else int(a)
            last = NAMES[b] if b in NAMES else int(b)
        else:
            first = NAMES[base] if base in NAMES else int(base)
            last = high if step else first
        values.update(range(first, last + 1, int(step) if step else 1))
    return values


def reference_matches(expr: str, moment: datetime.datetime) -> bool:
    minute, hour, dom, month, dow = expr.split()
    dows = {d % 7 for d in reference_values(dow, 0, 7)}
    day_ok = moment.day in reference_values(dom, 1, 31)
    weekday_ok = (moment.isoweekday() % 7) in dows
    return (
        moment.minute in reference_values(minute, 0, 59)
        and moment.hour in reference_values(hour, 0, 23)
        and moment.month in reference_values(month, 1, 12)
        and day_ok
        and weekday_ok
    )


def field(low: int, high: int) -> st.SearchStrategy[str]:
    number = st.integers(low, high)
    single = number.map(str)
    ranged = st.tuples(number, number).map(lambda ab: f"{min(ab)}-{max(ab)}")
    stepped = st.tuples(ranged, st.integers(1, 5)).map(lambda rs: f"{rs[0]}/{rs[1]}")
    star_step = st.integers(1, 5).map(lambda s: f"*/{s}")
    item = st.one_of(single, ranged, stepped, star_step)
    return st.one_of(st.just("*"), st.lists(item, min_size=1, max_size=3).map(",".join))


@st.composite
def expressions(draw: st.DrawFn) -> str:
    minute = draw(field(0, 59))
    hour = draw(st.one_of(st.just("*"), st.integers(0, 23).map(str), field(0, 23)))
    dow = draw(st.one_of(st.just("*"), field(0, 7)))
    # Keep day-of-month open when the weekday is restricted (cron's OR is refused anyway).
    dom = "*" if not dow.startswith("*") else draw(st.one_of(st.just("*"), field(1, 28)))
    return f"{minute} {hour} {dom} * {dow}"


@settings(max_examples=100, deadline=None)
@given(expressions())
def test_apscheduler_fires_exactly_when_cron_would(expr: str) -> None:
    horizon = START + datetime.timedelta(days=8)
    expected = [
        moment
        for moment in (START + datetime.timedelta(minutes=m) for m in range(8 * 24 * 60))
        if reference_matches(expr, moment)
    ]
    trigger = make_cron_trigger(expr, UTC)
    actual: list[datetime.datetime] = []
    previous: datetime.datetime | None = None
    now = START
    for _ in itertools.count():
        fire = trigger.get_next_fire_time(previous, now)
        if fire is None or fire >= horizon:
            break
        actual.append(fire)
        previous, now = fire, fire + datetime.timedelta(seconds=1)
    assert actual == expected
