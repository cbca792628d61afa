"""Benchmark 6, start-up: from exec to READY=1 on a real NOTIFY_SOCKET.

The clock starts just before fork/exec of `python -m virt_trimd run` and stops when
READY=1 arrives on the socket. The libvirt connection wait is excluded by pointing
the daemon at libvirt's `test:///default` driver: it is opened inside the process
(no socket, no libvirtd), so the daemon's whole start-up path runs (config, history,
metrics bind, connect, version query, scheduler, catch-up) with nothing to wait for.
The same start against qemu:///system, and the bare connect time, are reported too.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

from bench.common import BenchResult, at_most, env_with_package, row
from bench.daemon import Daemon, daemon_config
from support.files import free_port, write_config
from support.notify import NotifyReceiver


def time_to_ready(config: Path, workdir: Path) -> float:
    """Seconds from exec to READY=1 for one daemon start; stops the daemon afterwards."""
    notify = NotifyReceiver(workdir / "notify.sock")
    daemon = Daemon(config, workdir / "daemon.log", notify)
    try:
        ready_at = notify.wait_for("READY=1", 30, daemon.proc)
        return ready_at - daemon.started
    finally:
        code = daemon.stop()
        notify.close()
        if code != 0:
            raise RuntimeError(f"daemon exited {code}:\n{daemon.log()[-2000:]}")


def wall_of(argv: list[str]) -> float:
    t0 = time.perf_counter()
    subprocess.run(argv, check=True, capture_output=True, env=env_with_package())
    return time.perf_counter() - t0


def connect_seconds(uri: str) -> float:
    """In-process libvirt.open(uri) + getVersion, the wait the target excludes."""
    import libvirt

    t0 = time.perf_counter()
    conn = libvirt.open(uri)
    conn.getVersion()
    elapsed = time.perf_counter() - t0
    conn.close()
    return elapsed


def run(workdir: Path, smoke: bool) -> BenchResult:
    reps = 3 if smoke else 15
    res = BenchResult("startup")
    work = workdir / "startup"
    work.mkdir(parents=True, exist_ok=True)
    configs = {
        "test:///default": write_config(
            work / "test.yaml",
            daemon_config(work / "state-test", free_port(), [], uri="test:///default"),
        ),
        "qemu:///system": write_config(
            work / "qemu.yaml",
            daemon_config(work / "state-qemu", free_port(), [], uri="qemu:///system"),
        ),
    }
    samples: dict[str, list[float]] = {k: [] for k in configs}
    samples["python -c pass"] = []
    samples["virt-trimd --version"] = []
    for cfg in configs.values():
        time_to_ready(cfg, work)  # first start creates the history database; not counted
    for _ in range(reps):  # interleaved, so load changes hit every kind alike
        for uri, cfg in configs.items():
            samples[uri].append(time_to_ready(cfg, work))
        samples["python -c pass"].append(wall_of([sys.executable, "-c", "pass"]))
        samples["virt-trimd --version"].append(
            wall_of([sys.executable, "-m", "virt_trimd", "--version"])
        )
    try:
        samples["connect qemu:///system"] = [connect_seconds("qemu:///system") for _ in range(reps)]
    except Exception as exc:  # libvirtd down: the number is context only
        res.error = f"qemu:///system connect not measured: {exc}"
    res.rows = [
        row(
            "startup",
            "exec -> READY=1 (libvirt test:///default: no connection wait)",
            "ms",
            samples["test:///default"],
            scale=1000,
            target=at_most(1000.0, "<= 1 s"),
        ),
        row(
            "startup",
            "exec -> READY=1 (qemu:///system, connect included)",
            "ms",
            samples["qemu:///system"],
            scale=1000,
        ),
        row(
            "startup",
            "for comparison: `virt-trimd --version` (imports, argparse, exit)",
            "ms",
            samples["virt-trimd --version"],
            scale=1000,
        ),
        row(
            "startup",
            "for comparison: `python3 -c pass` (bare interpreter)",
            "ms",
            samples["python -c pass"],
            scale=1000,
        ),
    ]
    if "connect qemu:///system" in samples:
        res.rows.append(
            row(
                "startup",
                "libvirt.open(qemu:///system) + getVersion, in-process",
                "ms",
                samples["connect qemu:///system"],
                scale=1000,
            )
        )
    res.samples = {k: [round(v, 6) for v in vals] for k, vals in samples.items()}
    return res
