"""Durations and sizes as people write them in YAML, and back again for output.

Sizes: ``KiB``/``MiB``/``GiB``/``TiB``/``PiB`` and the bare letters ``K``/``M``/``G``/``T``/``P``
are powers of 1024 (bare letters follow qemu-img, which reads ``1G`` as 1 GiB);
``kB``/``KB``/``MB``/``GB``/``TB``/``PB`` are powers of 1000 (SI). Units are case-insensitive,
``B`` is optional, a plain number is bytes. Fractions are rounded down to whole bytes.

Durations: ``ms``, ``s``, ``m``, ``h``, ``d``, ``w``, combinable from the largest unit to the
smallest (``1h30m``, ``1d12h``); a plain number is seconds.
"""

from __future__ import annotations

import datetime as dt
import math
import re
from fractions import Fraction

__all__ = [
    "MAX_DURATION_SECONDS",
    "MAX_SIZE_BYTES",
    "format_bytes",
    "format_duration",
    "parse_duration",
    "parse_size",
]

# Ten years: longer is a typo, and libvirt takes agent timeouts as a C int of seconds.
MAX_DURATION_SECONDS = 10 * 365 * 86400
# Sizes end up in SQLite INTEGER columns and setrlimit(), both signed 64-bit at most.
MAX_SIZE_BYTES = 2**63 - 1

# Longer texts are not durations or sizes; the cap also keeps Fraction() away from
# numbers with thousands of digits.
_MAX_TEXT = 64

_DURATION_UNITS: dict[str, Fraction] = {
    "w": Fraction(7 * 86400),
    "d": Fraction(86400),
    "h": Fraction(3600),
    "m": Fraction(60),
    "s": Fraction(1),
    "ms": Fraction(1, 1000),
}
_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)\s*(ms|w|d|h|m|s)\s*")
_NUMBER = re.compile(r"\d+(?:\.\d+)?")
_DURATION_HINT = "use e.g. 30s, 10m, 2h, 1d, 1h30m, 500ms, or a number of seconds"

_SIZE_UNITS: dict[str, int] = {"": 1, "b": 1}
for _power, _letter in enumerate("kmgtp", start=1):
    _SIZE_UNITS[_letter] = 1024**_power
    _SIZE_UNITS[_letter + "ib"] = 1024**_power
    _SIZE_UNITS[_letter + "b"] = 1000**_power
_SIZE_RE = re.compile(r"(\d+(?:\.\d+)?)\s*([a-z]*)")
_SIZE_HINT = "use e.g. 512KiB, 64MiB, 1GiB, 1TiB, 1G (1024-based), 1GB (1000-based), or bytes"


def parse_duration(text: str | int | float) -> float:
    """Return seconds for ``"30s"``, ``"1h30m"``, ``"500ms"``, ``90`` ...

    Raises ValueError, with a hint at the accepted forms, for negative, non-finite,
    over-long (more than ten years) or unreadable values.
    """
    if isinstance(text, bool) or not isinstance(text, str | int | float):
        raise ValueError(f"expected a duration such as 10m, got {text!r}; {_DURATION_HINT}")
    if isinstance(text, int):
        # Compare as int first: float() of a huge int raises OverflowError.
        return _checked_duration(float(max(min(text, MAX_DURATION_SECONDS + 1), -1)), repr(text))
    if isinstance(text, float):
        return _checked_duration(text, repr(text))
    stripped = text.strip()
    if len(stripped) > _MAX_TEXT:
        raise ValueError(f"duration {stripped[:20]!r}... is too long to be a duration")
    if not stripped:
        raise ValueError(f"empty duration; {_DURATION_HINT}")
    if stripped.startswith("-"):
        raise ValueError(f"duration {text!r} is negative; {_DURATION_HINT}")
    if _NUMBER.fullmatch(stripped):
        return _checked_duration(float(Fraction(stripped)), repr(text))
    total = Fraction(0)
    position = 0
    previous_unit: str | None = None
    while position < len(stripped):
        match = _DURATION_PART.match(stripped, position)
        if match is None:
            raise ValueError(f"cannot read duration {text!r}; {_DURATION_HINT}")
        number, unit = match.groups()
        if previous_unit is not None and _DURATION_UNITS[unit] >= _DURATION_UNITS[previous_unit]:
            raise ValueError(
                f"cannot read duration {text!r}: write units once each, largest first "
                f"(e.g. 1h30m); {_DURATION_HINT}"
            )
        total += Fraction(number) * _DURATION_UNITS[unit]
        previous_unit = unit
        position = match.end()
    return _checked_duration(float(total), repr(text))


def _checked_duration(seconds: float, shown: str) -> float:
    if not math.isfinite(seconds):
        raise ValueError(f"duration {shown} is not a finite number; {_DURATION_HINT}")
    if seconds < 0:
        raise ValueError(f"duration {shown} is negative; {_DURATION_HINT}")
    if seconds > MAX_DURATION_SECONDS:
        raise ValueError(f"duration {shown} is longer than ten years; {_DURATION_HINT}")
    return seconds


def parse_size(text: str | int) -> int:
    """Return bytes for ``"64MiB"``, ``"1G"``, ``"1GB"``, ``4096`` ...

    Raises ValueError, with a hint at the accepted forms, for negative, too large
    (beyond signed 64-bit) or unreadable values.
    """
    if isinstance(text, bool) or not isinstance(text, str | int):
        raise ValueError(f"expected a size such as 64MiB, got {text!r}; {_SIZE_HINT}")
    if isinstance(text, int):
        return _checked_size(text, repr(text))
    stripped = text.strip()
    if len(stripped) > _MAX_TEXT:
        raise ValueError(f"size {stripped[:20]!r}... is too long to be a size")
    if stripped.startswith("-"):
        raise ValueError(f"size {text!r} is negative; {_SIZE_HINT}")
    match = _SIZE_RE.fullmatch(stripped.lower())
    if match is None or match.group(2) not in _SIZE_UNITS:
        raise ValueError(f"cannot read size {text!r}; {_SIZE_HINT}")
    number, unit = match.groups()
    return _checked_size(math.floor(Fraction(number) * _SIZE_UNITS[unit]), repr(text))


def _checked_size(size_bytes: int, shown: str) -> int:
    if size_bytes < 0:
        raise ValueError(f"size {shown} is negative; {_SIZE_HINT}")
    if size_bytes > MAX_SIZE_BYTES:
        raise ValueError(f"size {shown} is too large (more than 2^63-1 bytes)")
    return size_bytes


_BINARY_PREFIXES = ("KiB", "MiB", "GiB", "TiB", "PiB", "EiB")


def format_bytes(n: int | None) -> str:
    """Render a byte count for people: ``"0 B"``, ``"512 B"``, ``"1.5 GiB"``, ``"-12.0 MiB"``.

    None (not measured) renders as ``"-"``; negative counts keep their sign because a
    trim can leave an image larger than before (a reclaim of -12 MiB is news).
    """
    if n is None:
        return "-"
    sign = "-" if n < 0 else ""
    magnitude = abs(n)
    if magnitude < 1024:
        return f"{sign}{magnitude} B"
    value = magnitude / 1024
    index = 0
    # Compare the rounded value so 1048575 B reads "1.0 MiB", not "1024.0 KiB".
    while round(value, 1) >= 1024 and index < len(_BINARY_PREFIXES) - 1:
        value /= 1024
        index += 1
    return f"{sign}{value:.1f} {_BINARY_PREFIXES[index]}"


def format_duration(seconds: float) -> str:
    """Render seconds for people in the syntax parse_duration reads back.

    ``0.25`` -> ``"250ms"``, ``1.5`` -> ``"1.5s"``, ``5400`` -> ``"1h30m"``,
    ``93784`` -> ``"1d2h3m4s"``. Anything of a minute or more is rounded to whole seconds;
    negative values get a leading ``-``; NaN and infinities render as ``"-"``.
    """
    if not math.isfinite(seconds):
        return "-"
    if seconds < 0:
        return "-" + format_duration(-seconds)
    if seconds == 0:
        return "0s"
    if seconds < 1:
        milliseconds = round(seconds * 1000, 3)
        if milliseconds < 1000:
            return f"{_trim_number(milliseconds)}ms"
    if seconds < 60:
        rounded = round(seconds, 3)
        if rounded < 60:
            return f"{_trim_number(rounded)}s"
    remaining = round(seconds)
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        count, remaining = divmod(remaining, size)
        if count:
            parts.append(f"{count}{unit}")
    return "".join(parts)


def _trim_number(value: float) -> str:
    """``1.500`` -> ``"1.5"``, ``2.0`` -> ``"2"``: no trailing zeros in a duration."""
    return f"{value:.3f}".rstrip("0").rstrip(".")


def format_local_minute(ts: float | None, tz: dt.tzinfo) -> str:
    """Epoch seconds as `YYYY-MM-DD HH:MM` in tz (the status views); None as "-"."""
    if ts is None:
        return "-"
    return dt.datetime.fromtimestamp(ts, tz).strftime("%Y-%m-%d %H:%M")


def format_size_or_dash(value: int | None) -> str:
    """format_bytes, with "-" for unknown."""
    return "-" if value is None else format_bytes(value)


def format_signed_size(value: int | None) -> str:
    """A growth: "+1.5 GiB", "-200.0 MiB", "0 B"; "-" for unknown."""
    if value is None:
        return "-"
    return ("+" if value > 0 else "") + format_bytes(value)
