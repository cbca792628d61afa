"""Benchmark 2, overhead per guest: virt-trimd's per-domain time minus the raw
guest-fstrim agent round trip.

Two measurements on the same guests, each after fresh garbage:

* raw: `libvirt_qemu.qemuAgentCommand(dom, '{"execute":"guest-fstrim"}')` timed directly;
* virt-trimd: the real `DomainTrimmer.trim()` (real Hypervisor on qemu:///system, real
  Measurer), in this process, with the libvirt_qemu module the adapter calls wrapped
  in a stopwatch (calls pass through unchanged). The record's `duration_seconds`
  minus the guest-fstrim round trip inside that same trim is the overhead, paired,
  so guest-side variation in the fstrim itself cancels out.

Also times where the overhead goes (ping, job check, guest filesystem info, stats) and
what recording one trim costs after it (SQLite history append + State.observe_trim),
which the sweep pays per domain but the record's duration does not include.
"""

from __future__ import annotations

import json
import statistics
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import libvirt_qemu

import virt_trimd.host.hypervisor as hvmod
from bench.common import BenchResult, Row, at_most, row
from bench.guests import GuestPool
from virt_trimd.engine.history import History
from virt_trimd.engine.state import State
from virt_trimd.engine.trim import DomainTrimmer, TrimOptions
from virt_trimd.host.hypervisor import Hypervisor
from virt_trimd.host.measure import Measurer

FSTRIM = json.dumps({"execute": "guest-fstrim"})


class StopwatchAgent:
    """Stands in for the libvirt_qemu module: same calls, each agent command timed."""

    def __init__(self, real: Any) -> None:
        self._real = real
        self.calls: list[tuple[str, float]] = []

    def qemuAgentCommand(self, dom: Any, cmd: str, timeout: int, flags: int) -> Any:
        t0 = time.perf_counter()
        try:
            return self._real.qemuAgentCommand(dom, cmd, timeout, flags)
        finally:
            self.calls.append((json.loads(cmd)["execute"], time.perf_counter() - t0))

    def __getattr__(self, name: str) -> Any:
        return getattr(self._real, name)


def _stopwatch(fn: Callable[..., Any], sink: list[float]) -> Callable[..., Any]:
    def wrapped(*args: Any, **kwargs: Any) -> Any:
        t0 = time.perf_counter()
        try:
            return fn(*args, **kwargs)
        finally:
            sink.append(time.perf_counter() - t0)

    return wrapped


def run(pool: GuestPool, workdir: Path, smoke: bool) -> BenchResult:
    n = 1 if smoke else 8
    reps = 3 if smoke else 5
    res = BenchResult("overhead")
    handles = pool.ensure(n)
    hv = Hypervisor("qemu:///system")
    hv.connect()
    trimmer = DomainTrimmer(hv, Measurer())
    parts: dict[str, list[float]] = {
        k: []
        for k in ("active_job", "ping", "guest_filesystems", "measure_disks", "_measure_after")
    }
    for name in ("active_job", "ping", "guest_filesystems"):
        setattr(hv, name, _stopwatch(getattr(hv, name), parts[name]))
    for name in ("measure_disks", "_measure_after"):
        setattr(trimmer, name, _stopwatch(getattr(trimmer, name), parts[name]))
    agent = StopwatchAgent(libvirt_qemu)
    state = State()
    history = History(workdir / "overhead-state")
    raw: list[float] = []
    trim_total: list[float] = []
    inner_fstrim: list[float] = []
    overhead: list[float] = []
    recording: list[float] = []
    saved = getattr(hvmod, "libvirt_qemu")  # noqa: B009
    setattr(hvmod, "libvirt_qemu", agent)  # noqa: B010
    try:
        for _ in range(reps):
            pool.make_garbage(handles)
            for h in handles:
                t0 = time.perf_counter()
                libvirt_qemu.qemuAgentCommand(h.dom, FSTRIM, 120, 0)
                raw.append(time.perf_counter() - t0)
            pool.make_garbage(handles)
            for h in handles:
                info = hv.domain(h.name)  # a sweep gets this from its listing
                agent.calls.clear()
                rec = trimmer.trim(info, TrimOptions(timeout_seconds=120, schedule="bench"))
                if rec.result.value != "success":
                    raise RuntimeError(f"{h.name}: {rec.result.value}: {rec.message}")
                fstrim_rt = sum(t for c, t in agent.calls if c == "guest-fstrim")
                trim_total.append(rec.duration_seconds)
                inner_fstrim.append(fstrim_rt)
                overhead.append(rec.duration_seconds - fstrim_rt)
                t0 = time.perf_counter()
                history.append(rec)
                state.observe_trim(rec)
                recording.append(time.perf_counter() - t0)
    finally:
        setattr(hvmod, "libvirt_qemu", saved)  # noqa: B010
        history.close()
        hv.close()
    target = at_most(20.0, "<= 20 ms")
    res.rows = [
        row(
            "overhead",
            "per-domain trim time minus its own guest-fstrim round trip (paired)",
            "ms",
            overhead,
            scale=1000,
            spread="IQR",
            target=target,
        ),
        Row(
            "overhead",
            "median per-domain trim time - median raw guest-fstrim round trip",
            "ms",
            (statistics.median(trim_total) - statistics.median(raw)) * 1000,
            "difference of medians",
            n=len(raw),
            target=target,
        ),
        row(
            "overhead",
            "raw guest-fstrim round trip (qemuAgentCommand alone)",
            "ms",
            raw,
            scale=1000,
            spread="IQR",
        ),
        row(
            "overhead",
            "virt-trimd per-domain trim time (record duration)",
            "ms",
            trim_total,
            scale=1000,
            spread="IQR",
        ),
        row(
            "overhead",
            "guest-fstrim round trip inside virt-trimd's trim",
            "ms",
            inner_fstrim,
            scale=1000,
            spread="IQR",
        ),
    ]
    labels = {
        "ping": "of which: guest-ping (agent check)",
        "active_job": "of which: block job / backup check",
        "guest_filesystems": "of which: guest filesystem info (effectiveness)",
        "measure_disks": "of which: measure before (stat + virtual size)",
        "_measure_after": "of which: measure after (stat)",
    }
    for key, label in labels.items():
        res.rows.append(row("overhead", label, "ms", parts[key], scale=1000, spread="IQR"))
    res.rows.append(
        row(
            "overhead",
            "after the trim: history append + State.observe_trim",
            "ms",
            recording,
            scale=1000,
            spread="IQR",
        )
    )
    res.samples = {
        "guests": n,
        "raw_s": raw,
        "trim_s": trim_total,
        "inner_fstrim_s": inner_fstrim,
        "overhead_s": overhead,
        "recording_s": recording,
        "parts_s": parts,
    }
    return res
