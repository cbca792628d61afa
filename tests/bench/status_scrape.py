"""Does the status page slow /metrics? `python -m bench.status_scrape [--scrapes N]`.

The endpoint (bench.scrape_server: real State, collector, webserver, 250 domains x 4
disks) runs in its own process three ways: without the status pages (the release
before them); with the pages over a history of 30 days of hourly censuses of the
same 1,000 disks; and with the pages while another client loads `/` back to back (an
operator with the page open). Each scrape changes the state first, so every scrape
renders (the worst case, no exposition cache hit). Prints one JSON line of p50/p99.
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import threading
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from bench.common import env_with_package
from bench.scrape import KINDS, scrape_once
from virt_trimd.engine.history import CensusDomain, History
from virt_trimd.engine.state import DiskState

DAY = 86_400


def build_history(state_dir: Path, domains: int, disks_per_domain: int) -> float:
    """30 days of hourly censuses of every disk; returns the seconds it took."""
    t0 = time.perf_counter()
    now = time.time()
    with History(state_dir) as hist:
        for hour in range(30 * 24, -1, -1):
            ts = now - hour * 3600
            hist.append_census(
                ts,
                [
                    CensusDomain(
                        f"guest-{d:04d}.example.internal",
                        f"00000000-0000-4000-8000-{d:012d}",
                        True,
                        "connected",
                        tuple(
                            DiskState(
                                domain=f"guest-{d:04d}.example.internal",
                                disk=f"sd{chr(97 + i)}",
                                path=f"/var/lib/libvirt/images/g{d}-{i}.qcow2",
                                format="qcow2",
                                bus="scsi",
                                discard="unmap",
                                allocated_bytes=(20 << 30) + hour * 4096 * (d % 7),
                                virtual_bytes=100 << 30,
                                file_bytes=21 << 30,
                                discard_ready=True,
                                reclaimable_bytes=40 << 20,
                            )
                            for i in range(disks_per_domain)
                        ),
                    )
                    for d in range(domains)
                ],
            )
        hist.compact_census(now)
    return time.perf_counter() - t0


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def measure(history: Path | None, scrapes: int, page_load: bool) -> dict[str, Any]:
    args = [sys.executable, "-m", "bench.scrape_server", "--domains", "250"]
    if history is not None:
        args += ["--status-history", str(history)]
    proc = subprocess.Popen(
        args,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
        env=env_with_package(),
    )
    stdin: IO[str] = proc.stdin  # type: ignore[assignment]
    stdout: IO[str] = proc.stdout  # type: ignore[assignment]
    port = int(json.loads(stdout.readline())["port"])
    stop = threading.Event()
    page_times: list[float] = []

    def load_page() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            with urllib.request.urlopen(f"http://127.0.0.1:{port}/", timeout=60) as r:
                r.read()
            page_times.append(time.perf_counter() - t0)

    loader = threading.Thread(target=load_page, daemon=True)
    if page_load:
        loader.start()
    headers = KINDS["prometheus (OpenMetrics, gzip)"]
    times: list[float] = []
    try:
        for _ in range(scrapes):
            stdin.write("change\n")
            stdin.flush()
            stdout.readline()
            elapsed, _, _ = scrape_once(port, headers)
            times.append(elapsed)
    finally:
        stop.set()
        if page_load:
            loader.join(timeout=120)
        stdin.close()
        proc.wait(timeout=30)
    out: dict[str, Any] = {
        "p50_ms": round(percentile(times, 0.5) * 1000, 2),
        "p99_ms": round(percentile(times, 0.99) * 1000, 2),
    }
    if page_times:
        out["page_p50_ms"] = round(percentile(page_times, 0.5) * 1000, 1)
        out["pages_loaded"] = len(page_times)
    return out


def main() -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.status_scrape")
    parser.add_argument("--scrapes", type=int, default=500)
    args = parser.parse_args()
    with tempfile.TemporaryDirectory(prefix="vtrimd-bench-status-") as tmp:
        state = Path(tmp) / "state"
        built = build_history(state, 250, 4)
        result = {
            "history_build_seconds": round(built, 1),
            "without_pages": measure(None, args.scrapes, page_load=False),
            "with_pages_idle": measure(state, args.scrapes, page_load=False),
            "with_pages_under_load": measure(state, args.scrapes, page_load=True),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
