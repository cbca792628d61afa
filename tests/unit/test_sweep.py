"""Sweep selection, per-domain locking, min_interval and bounded concurrency."""

from __future__ import annotations

import dataclasses
import threading
import time
from typing import Any

from virt_trimd.engine.sweep import (
    DomainLocks,
    SweepContext,
    SweepPlan,
    run_sweep,
    select_domains,
    start_order,
)
from virt_trimd.engine.trim import TrimOptions
from virt_trimd.records import AgentChannel, DomainInfo, Result, TrimRecord


def _dom(name: str) -> DomainInfo:
    return DomainInfo(
        name=name,
        uuid=f"uuid-{name}",
        running=True,
        disks=(),
        agent=AgentChannel(True, "connected"),
    )


class FakeTrimmer:
    """Stands in for DomainTrimmer: records overlap, sleeps, returns success."""

    def __init__(self, seconds: float = 0.05, fail: str | None = None) -> None:
        self.seconds = seconds
        self.fail = fail
        self.active = 0
        self.peak = 0
        self.lock = threading.Lock()
        self.calls: list[str] = []

    def trim(self, dom: DomainInfo, opts: TrimOptions) -> TrimRecord:
        with self.lock:
            self.active += 1
            self.peak = max(self.peak, self.active)
            self.calls.append(dom.name)
        try:
            if dom.name == self.fail:
                raise RuntimeError("bug")
            time.sleep(self.seconds)
            return TrimRecord(
                domain=dom.name,
                uuid=dom.uuid,
                result=Result.SUCCESS,
                message="",
                started_at="2026-01-01T00:00:00Z",
                duration_seconds=self.seconds,
            )
        finally:
            with self.lock:
                self.active -= 1


_CONTEXT_FIELDS = {f.name for f in dataclasses.fields(SweepContext)}


def _sweep(trimmer: FakeTrimmer, doms: list[DomainInfo], **kw: Any) -> list[TrimRecord]:
    """run_sweep with plan and context fields given as keywords, as the tests read best."""
    plan = SweepPlan(**{k: v for k, v in kw.items() if k not in _CONTEXT_FIELDS})
    context = SweepContext(**{k: v for k, v in kw.items() if k in _CONTEXT_FIELDS})
    fake: Any = trimmer
    return list(run_sweep(fake, doms, TrimOptions(), plan, context).records)


def test_select_domains_globs() -> None:
    doms = [_dom(n) for n in ("web1", "web2", "db1", "scratch-1")]
    assert [d.name for d in select_domains(doms, ["*"], ["scratch-*"])] == ["db1", "web1", "web2"]
    assert [d.name for d in select_domains(doms, ["web*", "db1"], ["web2"])] == ["db1", "web1"]
    assert select_domains(doms, []) == []


def test_concurrency_is_bounded_and_reached() -> None:
    t = FakeTrimmer(0.1)
    recs = _sweep(t, [_dom(f"d{i}") for i in range(8)], concurrency=3)
    assert len(recs) == 8 and t.peak == 3
    assert [r.domain for r in recs] == [f"d{i}" for i in range(8)]


def test_a_crashing_trim_is_recorded_and_the_sweep_goes_on() -> None:
    t = FakeTrimmer(0.0, fail="d1")
    recs = _sweep(t, [_dom("d0"), _dom("d1"), _dom("d2")], concurrency=1)
    assert [r.result for r in recs] == [Result.SUCCESS, Result.ERROR, Result.SUCCESS]


def test_domain_locked_by_another_sweep_is_skipped() -> None:
    locks = DomainLocks()
    assert locks.try_acquire("uuid-a")
    recs = _sweep(FakeTrimmer(0), [_dom("a"), _dom("b")], locks=locks)
    assert [r.result for r in recs] == [Result.SKIPPED, Result.SUCCESS]
    assert "another schedule" in recs[0].message


def test_min_interval_holds_across_sweeps() -> None:
    locks = DomainLocks()
    now = [1000.0]
    first = _sweep(
        FakeTrimmer(0),
        [_dom("a")],
        locks=locks,
        min_interval_seconds=3600,
        wall_clock=lambda: now[0],
    )
    assert first[0].result is Result.SUCCESS
    now[0] += 60
    second = _sweep(
        FakeTrimmer(0),
        [_dom("a")],
        locks=locks,
        min_interval_seconds=3600,
        wall_clock=lambda: now[0],
    )
    assert second[0].result is Result.SKIPPED and "min_interval" in second[0].message
    now[0] += 3600
    third = _sweep(
        FakeTrimmer(0),
        [_dom("a")],
        locks=locks,
        min_interval_seconds=3600,
        wall_clock=lambda: now[0],
    )
    assert third[0].result is Result.SUCCESS


def test_stop_skips_domains_waiting_for_their_offset() -> None:
    stop = threading.Event()
    t = FakeTrimmer(0)
    timer = threading.Timer(0.2, stop.set)
    timer.start()
    recs = _sweep(
        t,
        [_dom("now"), _dom("later")],
        stop=stop,
        delay_for=lambda d: 0.0 if d.name == "now" else 30.0,
    )
    timer.join()
    assert [r.domain for r in recs] == ["now"] and t.calls == ["now"]


def test_offsets_are_honoured() -> None:
    t = FakeTrimmer(0)
    t0 = time.monotonic()
    recs = _sweep(
        t, [_dom("b"), _dom("a")], concurrency=2, delay_for=lambda d: 0.3 if d.name == "b" else 0.0
    )
    assert t.calls == ["a", "b"] and len(recs) == 2
    assert time.monotonic() - t0 >= 0.3


def test_start_order_runs_the_longest_known_trims_first() -> None:
    doms = [_dom(n) for n in ("a", "b", "c", "d", "e")]
    last = {"uuid-a": 1.0, "uuid-b": 5.0, "uuid-d": 5.0, "uuid-e": 0.2}  # c never trimmed
    order = start_order(doms, expected_seconds=lambda d: last.get(d.uuid))
    # Unknown first (it may be the largest), then longest first, ties in the given order.
    assert [d.name for d in order] == ["c", "b", "d", "a", "e"]
    assert [d.name for d in start_order(doms)] == ["a", "b", "c", "d", "e"]


def test_start_order_keeps_spread_offsets_first() -> None:
    doms = [_dom(n) for n in ("a", "b", "c")]
    offsets = {"uuid-a": 10.0, "uuid-b": 0.0, "uuid-c": 0.0}
    last = {"uuid-a": 99.0, "uuid-b": 1.0, "uuid-c": 2.0}
    order = start_order(doms, lambda d: offsets[d.uuid], lambda d: last[d.uuid])
    assert [d.name for d in order] == ["c", "b", "a"]


def test_sweep_starts_long_trims_first_and_returns_records_in_name_order() -> None:
    t = FakeTrimmer(0.0)
    doms = [_dom(n) for n in ("a", "b", "c")]
    last = {"uuid-a": 0.1, "uuid-b": 0.3, "uuid-c": 0.2}
    recs = _sweep(t, doms, concurrency=1, expected_seconds=lambda d: last[d.uuid])
    assert t.calls == ["b", "c", "a"]
    assert [r.domain for r in recs] == ["a", "b", "c"]
