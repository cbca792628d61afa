"""Benchmark 5, idle footprint: the daemon with N running guests, between sweeps.

The daemon runs as a subprocess (real NOTIFY_SOCKET, qemu:///system, a nightly cron
schedule over the benchmark guests, census every 5 minutes: the default). After
READY=1 and its start-up census, /proc/PID is sampled every second for the window:
VmRSS, RssAnon and utime+stime (children included: qemu-img runs count). /metrics is
scraped every 15 s, as a Prometheus would. CPU % = CPU seconds / window seconds.
"""

from __future__ import annotations

import statistics
import time
import urllib.request
from pathlib import Path

from bench.common import (
    BenchResult,
    Row,
    at_most,
    proc_cpu_seconds,
    proc_pss_kib,
    proc_status_kib,
    row,
)
from bench.daemon import Daemon, daemon_config
from bench.guests import PREFIX, GuestPool
from support.files import free_port, write_config
from support.notify import NotifyReceiver

SCRAPE_EVERY_S = 15.0
MB = 1e6


def _scrape(port: int) -> int:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        return len(resp.read())


def _wait_census(port: int, guests: int, timeout: float) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            text = resp.read().decode()
        seen = sum(
            1
            for line in text.splitlines()
            if line.startswith("virt_trimd_disk_allocated_bytes{") and PREFIX in line
        )
        if seen >= guests:
            return
        time.sleep(0.5)
    raise RuntimeError(f"start-up census did not cover {guests} guests in {timeout}s")


def run(
    pool: GuestPool | None, workdir: Path, smoke: bool, guests: int | None = None
) -> BenchResult:
    if guests is None:
        guests = (1 if pool is not None else 0) if smoke else 20
    window = 10.0 if smoke else 300.0
    res = BenchResult("idle")
    if guests and pool is not None:
        pool.ensure(guests)
    work = workdir / "idle"
    port = free_port()
    cfg = write_config(
        work / "idle.yaml",
        daemon_config(work / "state", port, [f"{PREFIX}*"], concurrency=4),
    )
    notify = NotifyReceiver(work / "notify.sock")
    daemon = Daemon(cfg, work / "daemon.log", notify)
    samples: list[dict[str, float]] = []
    try:
        notify.wait_for("READY=1", 60, daemon.proc)
        if guests:
            _wait_census(port, guests, 60)
        time.sleep(2.0)
        pid = daemon.pid
        start_cpu = proc_cpu_seconds(pid)
        t0 = time.monotonic()
        next_scrape = t0
        scrapes = 0
        while (now := time.monotonic()) - t0 < window:
            if now >= next_scrape:
                _scrape(port)
                scrapes += 1
                next_scrape += SCRAPE_EVERY_S
            st = proc_status_kib(pid)
            samples.append({"t": now - t0, "cpu_s": proc_cpu_seconds(pid), **st})
            time.sleep(1.0)
        elapsed = time.monotonic() - t0
        cpu = proc_cpu_seconds(pid) - start_cpu
        final = proc_status_kib(pid)
        pss = proc_pss_kib(pid)
    finally:
        code = daemon.stop()
        notify.close()
    if code != 0:
        res.error = f"daemon exited {code}"
    kib = 1024 / MB
    rss = [s["VmRSS"] * kib for s in samples]
    res.rows = [
        row(
            "idle",
            f"VmRSS over {window:.0f} s, {guests} guests",
            "MB",
            rss,
            target=at_most(45.0, "<= 45 MB"),
        ),
        Row(
            "idle",
            "VmHWM (peak RSS since exec) at end",
            "MB",
            final["VmHWM"] * kib,
            "at end",
            target=at_most(45.0, "<= 45 MB"),
        ),
        Row(
            "idle",
            "CPU over the window",
            "%",
            cpu / elapsed * 100,
            "mean",
            n=1,
            target=at_most(0.2, "<= 0.2 %"),
            note=f"{cpu:.2f} s CPU in {elapsed:.0f} s; {scrapes} scrapes",
        ),
        Row("idle", "RssAnon (private) at end", "MB", final["RssAnon"] * kib, "at end"),
        Row(
            "idle",
            "PSS (shared libraries split among users) at end",
            "MB",
            (pss or 0) * kib,
            "at end",
        ),
        Row("idle", "start-up CPU (exec to window start)", "s", start_cpu, "once"),
    ]
    res.samples = {
        "guests": guests,
        "window_s": elapsed,
        "cpu_s": cpu,
        "start_cpu_s": start_cpu,
        "final_status_kib": final,
        "pss_kib": pss,
        "rss_median_mb": statistics.median(rss) if rss else None,
        "trace": samples,
    }
    return res
