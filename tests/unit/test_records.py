"""The result groupings and the timestamps of a record, defined once on the record types."""

from __future__ import annotations

import math

import pytest

from virt_trimd.records import Result, SweepSummary, TrimRecord


def _rec(
    result: Result = Result.SUCCESS, started_at: str = "2026-11-01T03:00:00Z", duration: float = 2.5
) -> TrimRecord:
    return TrimRecord(
        domain="d",
        uuid="u",
        result=result,
        message="",
        started_at=started_at,
        duration_seconds=duration,
    )


def test_groupings_partition_the_results_as_documented() -> None:
    assert {r for r in Result if r.needs_attention} == {
        Result.ERROR,
        Result.TIMEOUT,
        Result.AGENT_UNAVAILABLE,
    }
    assert {r for r in Result if not r.attempted} == {
        Result.SKIPPED,
        Result.NOT_RUNNING,
        Result.AGENT_MISSING,
    }
    assert {r for r in Result if r.fstrim_sent} == {Result.SUCCESS, Result.PARTIAL, Result.TIMEOUT}
    assert {r for r in Result if r.agent_answered} == {Result.SUCCESS, Result.PARTIAL}
    # Whatever reached the guest's fstrim was attempted.
    assert all(r.attempted for r in Result if r.fstrim_sent)


def test_sweep_fails_exactly_when_a_record_needs_attention() -> None:
    for result in Result:
        assert SweepSummary((_rec(Result.SUCCESS), _rec(result))).failed is result.needs_attention


@pytest.mark.parametrize(
    "stamp",
    [
        "2026-11-01T03:00:00Z",
        "2026-11-01T03:00:00+00:00",
        "2026-11-01T03:00:00",
        "2026-11-01T04:00:00+01:00",
    ],
)
def test_started_ts_is_utc_whatever_the_spelling(stamp: str) -> None:
    assert _rec(started_at=stamp).started_ts == 1793502000.0


def test_finished_ts_adds_only_a_sane_duration() -> None:
    assert _rec(duration=2.5).finished_ts == 1793502002.5
    assert _rec(duration=-4.0).finished_ts == 1793502000.0
    assert _rec(duration=math.nan).finished_ts == 1793502000.0


def test_started_ts_refuses_a_stamp_that_is_not_iso() -> None:
    with pytest.raises(ValueError):
        _ = _rec(started_at="yesterday").started_ts
