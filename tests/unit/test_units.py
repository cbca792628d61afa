"""Durations and sizes: what people write in YAML, and what the CLI prints back."""

from __future__ import annotations

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from virt_trimd.units import (
    MAX_DURATION_SECONDS,
    MAX_SIZE_BYTES,
    format_bytes,
    format_duration,
    parse_duration,
    parse_size,
)


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("30s", 30.0),
        ("10m", 600.0),
        ("2h", 7200.0),
        ("1d", 86400.0),
        ("1w", 604800.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1d2h3m4s", 93784.0),
        ("500ms", 0.5),
        ("1.5h", 5400.0),
        ("1m500ms", 60.5),
        ("90", 90.0),
        (" 90 ", 90.0),
        ("2.5", 2.5),
        ("0", 0.0),
        ("0s", 0.0),
        (0, 0.0),
        (45, 45.0),
        (0.25, 0.25),
    ],
)
def test_parse_duration_accepts(text: str | int | float, seconds: float) -> None:
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-1s", "negative"),
        ("-5", "negative"),
        (-1, "negative"),
        (-0.5, "negative"),
        ("", "empty"),
        ("   ", "empty"),
        ("10x", "cannot read"),
        ("m", "cannot read"),
        ("1e3", "cannot read"),
        ("ten minutes", "cannot read"),
        ("30m1h", "largest first"),
        ("1h1h", "largest first"),
        ("nan", "cannot read"),
        (math.nan, "finite"),
        (math.inf, "finite"),
        ("99999d", "ten years"),
        (10**400, "ten years"),
        ("9" * 100, "too long"),
        (True, "expected a duration"),
        (None, "expected a duration"),
        ([1], "expected a duration"),
    ],
)
def test_parse_duration_rejects_with_a_hint(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment) as info:
        parse_duration(text)  # type: ignore[arg-type]
    if fragment not in ("too long",):
        assert "e.g." in str(info.value)


@pytest.mark.parametrize(
    ("text", "size"),
    [
        ("64MiB", 64 * 2**20),
        ("1GiB", 2**30),
        ("512KiB", 512 * 2**10),
        ("1TiB", 2**40),
        ("1PiB", 2**50),
        # Bare letters are 1024-based, as qemu-img reads them.
        ("1K", 1024),
        ("1M", 2**20),
        ("1G", 2**30),
        ("1T", 2**40),
        # Letter + B is SI.
        ("1KB", 1000),
        ("1kB", 1000),
        ("1MB", 10**6),
        ("1GB", 10**9),
        ("1TB", 10**12),
        ("1gb", 10**9),
        ("1gib", 2**30),
        ("1.5GiB", 3 * 2**29),
        ("1.5 GiB", 3 * 2**29),
        ("0.5B", 0),  # fractions round down to whole bytes
        ("100B", 100),
        ("4096", 4096),
        ("0", 0),
        (4096, 4096),
        (0, 0),
        (MAX_SIZE_BYTES, MAX_SIZE_BYTES),
    ],
)
def test_parse_size_accepts(text: str | int, size: int) -> None:
    assert parse_size(text) == size


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("-1", "negative"),
        ("-1GiB", "negative"),
        (-1, "negative"),
        ("", "cannot read"),
        ("G", "cannot read"),
        ("1XB", "cannot read"),
        ("1.5.5G", "cannot read"),
        ("1 GiB extra", "cannot read"),
        ("1e9", "cannot read"),
        (MAX_SIZE_BYTES + 1, "too large"),
        ("8EiB", "cannot read"),  # no exabytes: beyond 64-bit anyway
        ("9" * 100, "too long"),
        (True, "expected a size"),
        (1.0, "expected a size"),
        (None, "expected a size"),
    ],
)
def test_parse_size_rejects(text: object, fragment: str) -> None:
    with pytest.raises(ValueError, match=fragment):
        parse_size(text)  # type: ignore[arg-type]


def test_parse_size_rejects_values_beyond_64_bits() -> None:
    with pytest.raises(ValueError, match="too large"):
        parse_size("8192PiB")


@pytest.mark.parametrize(
    ("n", "text"),
    [
        (None, "-"),
        (0, "0 B"),
        (1, "1 B"),
        (1023, "1023 B"),
        (1024, "1.0 KiB"),
        (1536, "1.5 KiB"),
        (2**20 - 1, "1.0 MiB"),  # rounds up into the next unit, not "1024.0 KiB"
        (3 * 2**29, "1.5 GiB"),
        (-12 * 2**20, "-12.0 MiB"),
        (-512, "-512 B"),
        (5 * 2**40, "5.0 TiB"),
        (2**63 - 1, "8.0 EiB"),
    ],
)
def test_format_bytes(n: int | None, text: str) -> None:
    assert format_bytes(n) == text


@pytest.mark.parametrize(
    ("seconds", "text"),
    [
        (0, "0s"),
        (0.25, "250ms"),
        (0.0001, "0.1ms"),
        (1.5, "1.5s"),
        (30, "30s"),
        (59.9999, "1m"),
        (60, "1m"),
        (90, "1m30s"),
        (5400, "1h30m"),
        (86400, "1d"),
        (93784, "1d2h3m4s"),
        (-3, "-3s"),
        (math.nan, "-"),
        (math.inf, "-"),
    ],
)
def test_format_duration(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=0, max_value=MAX_DURATION_SECONDS))
def test_format_duration_reads_back_for_whole_seconds(seconds: int) -> None:
    assert parse_duration(format_duration(seconds)) == seconds


@given(st.integers(min_value=0, max_value=MAX_SIZE_BYTES))
def test_plain_byte_counts_round_trip(size: int) -> None:
    assert parse_size(str(size)) == size == parse_size(size)


@given(st.text(max_size=30))
def test_parsers_raise_only_value_error(text: str) -> None:
    for parse in (parse_duration, parse_size):
        try:
            result = parse(text)
        except ValueError:
            continue
        assert result >= 0
