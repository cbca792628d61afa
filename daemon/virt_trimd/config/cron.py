"""Standard 5-field crontab expressions translated for APScheduler 3.x ``CronTrigger``.

Two differences make a literal copy of the fields wrong:

* cron numbers weekdays from Sunday=0 (and accepts 7 for Sunday), APScheduler from
  Monday=0, so ``0 3 * * 1-5`` handed over verbatim would run Tuesday to Saturday.
  Day-of-week is therefore expanded and emitted as APScheduler weekday *names*.
* when both day-of-month and day-of-week are restricted, cron fires when EITHER matches
  (crontab(5)); APScheduler requires BOTH. There is no faithful translation, so that
  combination is rejected. Like vixie cron and cronie, a field counts as restricted
  unless it starts with ``*``.
"""

from __future__ import annotations

import calendar
import datetime
import itertools
import re
from dataclasses import dataclass

from apscheduler.triggers.cron import CronTrigger

__all__ = ["MACROS", "crontab_fields", "make_cron_trigger", "shortest_period_seconds"]

MACROS: dict[str, str] = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@midnight": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}

_MONTH_NAMES = {name.lower(): number for number, name in enumerate(calendar.month_abbr) if name}
_CRON_WEEKDAY_NAMES = {"sun": 0, "mon": 1, "tue": 2, "wed": 3, "thu": 4, "fri": 5, "sat": 6}
# APScheduler's weekday names, indexed Monday=0 like datetime.weekday().
_APS_WEEKDAYS = ("mon", "tue", "wed", "thu", "fri", "sat", "sun")
_ITEM = re.compile(r"(?:(\*)|([a-z0-9]+)(?:-([a-z0-9]+))?)(?:/(\d+))?")
_FIELD_NAMES = "minute hour day-of-month month day-of-week"


@dataclass(frozen=True)
class _FieldSpec:
    label: str
    low: int
    high: int
    names: dict[str, int]


_MINUTE = _FieldSpec("minute", 0, 59, {})
_HOUR = _FieldSpec("hour", 0, 23, {})
_DAY = _FieldSpec("day-of-month", 1, 31, {})
_MONTH = _FieldSpec("month", 1, 12, _MONTH_NAMES)
_WEEKDAY = _FieldSpec("day-of-week", 0, 7, _CRON_WEEKDAY_NAMES)


@dataclass(frozen=True)
class _Field:
    """One parsed field: the values it selects and the APScheduler text for it."""

    values: frozenset[int]
    restricted: bool  # cron's notion: the field does not start with "*"
    text: str


@dataclass(frozen=True)
class _Parsed:
    minute: _Field
    hour: _Field
    day: _Field
    month: _Field
    weekdays: frozenset[int]  # cron numbering, Sunday=0, 7 folded into 0
    day_of_week: str


def _value(token: str, spec: _FieldSpec) -> int:
    if token.isdigit():
        number = int(token)
    elif token in spec.names:
        number = spec.names[token]
    else:
        names = f" or a name ({', '.join(spec.names)})" if spec.names else ""
        raise ValueError(
            f"{spec.label} field: {token!r} is not a number from {spec.low} to {spec.high}{names}"
        )
    if not spec.low <= number <= spec.high:
        raise ValueError(f"{spec.label} field: {number} is out of range {spec.low}-{spec.high}")
    return number


def _parse_field(text: str, spec: _FieldSpec) -> tuple[frozenset[int], list[str]]:
    """Return the selected values and normalized items (names as numbers, ``a/s`` spelled out)."""
    values: set[int] = set()
    items: list[str] = []
    for item in text.lower().split(","):
        match = _ITEM.fullmatch(item)
        if match is None:
            raise ValueError(
                f"{spec.label} field: cannot read {item!r}; standard cron syntax is "
                "*, */step, N, N-M, N-M/step and comma-separated lists of those"
            )
        star, first_token, last_token, step_token = match.groups()
        step = int(step_token) if step_token is not None else 1
        if step < 1:
            raise ValueError(f"{spec.label} field: step must be at least 1 in {item!r}")
        if star:
            first, last = spec.low, spec.high
        else:
            first = _value(first_token, spec)
            # "N/step" means "from N to the end", as in cronie.
            default_last = spec.high if step_token is not None else first
            last = _value(last_token, spec) if last_token is not None else default_last
            if first > last:
                raise ValueError(
                    f"{spec.label} field: range {item!r} runs backwards; "
                    "write it from the lower to the higher value"
                )
        values.update(range(first, last + 1, step))
        if step > last - first:
            # Only the first value fits; APScheduler refuses such steps outright.
            items.append(str(first))
        elif star:
            items.append("*" if step_token is None else f"*/{step}")
        else:
            # Always spell out both ends: APScheduler reads "a/s" as "a to the end".
            items.append(f"{first}-{last}" if step_token is None else f"{first}-{last}/{step}")
    return frozenset(values), items


def _field(text: str, spec: _FieldSpec) -> _Field:
    values, items = _parse_field(text, spec)
    return _Field(values, not text.startswith("*"), ",".join(items))


def _aps_weekdays(cron_days: frozenset[int]) -> str:
    """Name the days for APScheduler, folding runs of three or more into ``a-b`` ranges."""
    monday_first = sorted((day - 1) % 7 for day in cron_days)
    if len(monday_first) == 7:
        return "*"
    runs: list[list[int]] = []
    for index in monday_first:
        if runs and runs[-1][-1] == index - 1:
            runs[-1].append(index)
        else:
            runs.append([index])
    parts: list[str] = []
    for run in runs:
        if len(run) >= 3:
            parts.append(f"{_APS_WEEKDAYS[run[0]]}-{_APS_WEEKDAYS[run[-1]]}")
        else:
            parts.extend(_APS_WEEKDAYS[index] for index in run)
    return ",".join(parts)


def _parse(expr: str) -> _Parsed:
    if not isinstance(expr, str):
        raise ValueError(f"expected a crontab expression as a string, got {expr!r}")
    stripped = expr.strip()
    if stripped.startswith("@"):
        macro = MACROS.get(stripped.lower())
        if macro is None:
            raise ValueError(
                f"unknown cron macro {stripped!r}; supported: {', '.join(MACROS)}"
                + (" (@reboot is not a schedule)" if stripped.lower() == "@reboot" else "")
            )
        stripped = macro
    fields = stripped.split()
    if len(fields) != 5:
        hint = (
            "; seconds, years and commands are not part of the expression"
            if len(fields) > 5
            else ""
        )
        raise ValueError(f"expected 5 fields ({_FIELD_NAMES}), got {len(fields)} in {expr!r}{hint}")
    minute = _field(fields[0], _MINUTE)
    hour = _field(fields[1], _HOUR)
    day = _field(fields[2], _DAY)
    month = _field(fields[3], _MONTH)
    weekday = _field(fields[4], _WEEKDAY)
    if day.restricted and weekday.restricted:
        raise ValueError(
            f"{expr!r}: restrict only one of day-of-month and day-of-week; cron would run "
            "when EITHER matches, which virt-trimd cannot express. Set one of them to '*' "
            "(or write two schedules)"
        )
    if not any(min(day.values) <= _longest_month(number) for number in month.values):
        raise ValueError(f"{expr!r} never fires: no selected month has that day of the month")
    weekdays = frozenset(day % 7 for day in weekday.values)
    return _Parsed(minute, hour, day, month, weekdays, _aps_weekdays(weekdays))


def _longest_month(month: int) -> int:
    return 29 if month == 2 else calendar.monthrange(2001, month)[1]


def crontab_fields(expr: str) -> dict[str, str]:
    """Translate ``"m h dom mon dow"`` (or an @macro) into ``CronTrigger`` keyword arguments.

    Returns keys minute, hour, day, month, day_of_week. Raises ValueError naming the
    offending field for anything that is not standard cron, for restricting both
    day-of-month and day-of-week, and for dates that never occur (``0 0 31 2 *``).
    """
    parsed = _parse(expr)
    return {
        "minute": parsed.minute.text,
        "hour": parsed.hour.text,
        "day": parsed.day.text,
        "month": parsed.month.text,
        "day_of_week": parsed.day_of_week,
    }


def make_cron_trigger(expr: str, timezone: datetime.tzinfo | str) -> CronTrigger:
    """Build a ``CronTrigger`` that fires when cron would, in ``timezone``.

    Raises ValueError as crontab_fields does.
    """
    return CronTrigger(**crontab_fields(expr), timezone=timezone)


# 28 Gregorian years contain every (month, day, weekday) combination, 29 February included,
# as long as no century year without a leap day falls inside; 2000-2027 qualifies.
_CYCLE_START_YEAR = 2000
_CYCLE_YEARS = 28


def shortest_period_seconds(expr: str) -> float:
    """Return the shortest nominal time between two consecutive fires of ``expr``.

    Nominal means wall-clock arithmetic: daylight-saving shifts are ignored, because
    callers compare the period with configured windows, not with real elapsed time.
    Raises ValueError as crontab_fields does.
    """
    parsed = _parse(expr)
    times = sorted(h * 3600 + m * 60 for h in parsed.hour.values for m in parsed.minute.values)
    shortest = min((b - a for a, b in itertools.pairwise(times)), default=None)
    fire_days: list[int] = []
    for year in range(_CYCLE_START_YEAR, _CYCLE_START_YEAR + _CYCLE_YEARS):
        for month in sorted(parsed.month.values):
            days_in_month = calendar.monthrange(year, month)[1]
            for day in sorted(parsed.day.values):
                if day > days_in_month:
                    continue
                date = datetime.date(year, month, day)
                if (date.weekday() + 1) % 7 in parsed.weekdays:
                    fire_days.append(date.toordinal())
    # The last fire of one firing day to the first fire of the next.
    # The last fire of one firing day to the first fire of the next; the calendar repeats
    # after the cycle, so the last firing day is followed by the first one of the next cycle.
    cycle_days = (
        datetime.date(_CYCLE_START_YEAR + _CYCLE_YEARS, 1, 1).toordinal()
        - datetime.date(_CYCLE_START_YEAR, 1, 1).toordinal()
    )
    fire_days.append(fire_days[0] + cycle_days)
    overnight = min(
        (b - a) * 86400 - times[-1] + times[0] for a, b in itertools.pairwise(fire_days)
    )
    return float(overnight if shortest is None else min(shortest, overnight))
