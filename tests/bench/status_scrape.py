"""Does the status page slow /metrics? `python -m bench.status_scrape [--scrapes N]`.

Two bench.scrape_server processes (real State, collector and webserver, 250 domains x
4 disks), one without the status pages (the release before them) and one with them
over 30 days of hourly censuses of the same 1,000 disks, are scraped in turn (see
measure) four ways: pages idle; `/` viewed once a second; `/` reloaded back to back;
and, as a control, `/healthz` requested back to back (what any busy client of the
port costs). Each scrape changes the state first, so every scrape renders (the worst
case, no exposition cache hit). Prints one JSON line of p50/p99.
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


class Server:
    """One bench.scrape_server process, optionally serving the status pages."""

    def __init__(self, history: Path | None) -> None:
        args = [sys.executable, "-m", "bench.scrape_server", "--domains", "250"]
        if history is not None:
            args += ["--status-history", str(history)]
        self.proc = subprocess.Popen(
            args, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_with_package()
        )
        self.stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        self.port = int(json.loads(self.stdout.readline())["port"])
        self.times: list[float] = []

    def scrape_after_change(self) -> None:
        """Change the state (so the body renders again), then time one scrape."""
        self.stdin.write("change\n")
        self.stdin.flush()
        self.stdout.readline()
        elapsed, _, _ = scrape_once(self.port, KINDS["prometheus (OpenMetrics, gzip)"])
        self.times.append(elapsed)

    def close(self) -> None:
        self.stdin.close()
        self.proc.wait(timeout=30)

    def summary(self) -> dict[str, float]:
        return {
            "p50_ms": round(percentile(self.times, 0.5) * 1000, 2),
            "p99_ms": round(percentile(self.times, 0.99) * 1000, 2),
        }


def measure(history: Path, scrapes: int, load_path: str | None, interval: float) -> dict[str, Any]:
    """Scrape a server without pages and one with them in turn, in the same seconds.

    The host is shared (other jobs load its two cores), so the two are interleaved
    scrape by scrape: drifting load hits both alike. With `load_path`, another client
    GETs that path of the server with pages every `interval` seconds meanwhile.
    """
    without, with_pages = Server(None), Server(history)
    stop = threading.Event()
    page_times: list[float] = []

    def load() -> None:
        while not stop.is_set():
            t0 = time.perf_counter()
            url = f"http://127.0.0.1:{with_pages.port}{load_path}"
            with urllib.request.urlopen(url, timeout=60) as r:
                r.read()
            page_times.append(time.perf_counter() - t0)
            stop.wait(interval)

    loader = threading.Thread(target=load, daemon=True)
    try:
        if load_path is not None:
            loader.start()
        for _ in range(scrapes):
            without.scrape_after_change()
            with_pages.scrape_after_change()
    finally:
        stop.set()
        if load_path is not None:
            loader.join(timeout=120)
        without.close()
        with_pages.close()
    out: dict[str, Any] = {"without_pages": without.summary(), "with_pages": with_pages.summary()}
    if page_times:
        out["load_p50_ms"] = round(percentile(page_times, 0.5) * 1000, 1)
        out["loads"] = len(page_times)
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
            "pages_idle": measure(state, args.scrapes, None, 0.0),
            "page_viewed_every_second": measure(state, args.scrapes, "/", 1.0),
            "page_reloaded_back_to_back": measure(state, args.scrapes, "/", 0.0),
            "control_healthz_back_to_back": measure(state, args.scrapes, "/healthz", 0.0),
        }
    print(json.dumps(result))
    return 0


if __name__ == "__main__":
    sys.exit(main())
