"""Benchmark 4, scrape cost: /metrics latency and size for a large host.

The endpoint runs in its own process (`bench.scrape_server`, real State, collector and
webserver) so the client's Python does not share a GIL with it. Each scrape opens a
new TCP connection, sends the request, reads the whole body: what Prometheus's
scrape_duration_seconds covers. Two request kinds: Prometheus's own (OpenMetrics
Accept header, gzip) and a plain `curl`-style text request.
"""

from __future__ import annotations

import gzip
import http.client
import json
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import BenchResult, Row, at_most, env_with_package, proc_cpu_seconds, row

# What Prometheus 2.x sends (scrape/scrape.go acceptHeader, with OpenMetrics enabled).
PROMETHEUS_ACCEPT = (
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1"
)

KINDS: dict[str, dict[str, str]] = {
    "prometheus (OpenMetrics, gzip)": {
        "Accept": PROMETHEUS_ACCEPT,
        "Accept-Encoding": "gzip",
        "User-Agent": "Prometheus/2.45.0",
    },
    "plain text, no gzip": {"Accept": "text/plain", "User-Agent": "curl/7.88.1"},
}


def scrape_once(port: int, headers: dict[str, str]) -> tuple[float, int, bytes]:
    """(seconds, wire bytes, decoded body) of one GET /metrics on a fresh connection."""
    t0 = time.perf_counter()
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=10)
    try:
        conn.request("GET", "/metrics", headers=headers)
        resp = conn.getresponse()
        body = resp.read()
        status, encoding = resp.status, resp.getheader("Content-Encoding")
    finally:
        conn.close()
    elapsed = time.perf_counter() - t0
    if status != 200:
        raise RuntimeError(f"/metrics answered {status}")
    decoded = gzip.decompress(body) if encoding == "gzip" else body
    return elapsed, len(body), decoded


class ScrapeServer:
    """`python -m bench.scrape_server` in its own process."""

    def __init__(self, domains: int, disks: int, cache: bool) -> None:
        argv = [
            sys.executable,
            "-m",
            "bench.scrape_server",
            "--domains",
            str(domains),
            "--disks-per-domain",
            str(disks),
        ]
        if not cache:
            argv.append("--no-cache")
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_with_package()
        )
        assert self.proc.stdout is not None
        hello = json.loads(self.proc.stdout.readline())
        self.port, self.pid, self.series = (
            int(hello["port"]),
            int(hello["pid"]),
            int(hello["series"]),
        )

    def change(self) -> None:
        """Change the server's state and wait until it has."""
        assert self.proc.stdin is not None and self.proc.stdout is not None
        self.proc.stdin.write("change\n")
        self.proc.stdin.flush()
        if self.proc.stdout.readline().strip() != "ok":
            raise RuntimeError("scrape server did not acknowledge the change")

    def close(self) -> None:
        if self.proc.stdin:
            self.proc.stdin.close()
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def measure(
    server: ScrapeServer, headers: dict[str, str], scrapes: int, change: bool
) -> dict[str, Any]:
    """Latencies of `scrapes` scrapes (after a state change each, if `change`)."""
    for _ in range(3):  # warm-up: first connections, lazy imports, first render
        scrape_once(server.port, headers)
    cpu0 = proc_cpu_seconds(server.pid, children=False)
    latencies: list[float] = []
    wire = body = 0
    for _ in range(scrapes):
        if change:
            server.change()
        seconds, wire, decoded = scrape_once(server.port, headers)
        latencies.append(seconds)
        body = len(decoded)
    cpu = proc_cpu_seconds(server.pid, children=False) - cpu0
    return {
        "latencies_s": [round(x, 6) for x in latencies],
        "wire_bytes": wire,
        "body_bytes": body,
        "server_cpu_s_per_scrape": cpu / scrapes,
    }


REGIMES = (
    # (label, cached server?, change before every scrape?)
    ("cached, state unchanged", True, False),
    ("state changed before every scrape", True, True),
    ("no cache (render every scrape)", False, False),
)


def run(workdir: Path, smoke: bool) -> BenchResult:
    del workdir
    domains = 50 if smoke else 250
    disks = 4
    res = BenchResult("scrape")
    servers = {True: ScrapeServer(domains, disks, cache=True)}
    try:
        servers[False] = ScrapeServer(domains, disks, cache=False)
        series = servers[True].series
        res.samples.update(domains=domains, disks=domains * disks, series=series)
        what = f"{domains} domains, {domains * disks} disks, {series} series"
        for kind, headers in KINDS.items():
            for label, cached, change in REGIMES:
                scrapes = (
                    (100 if smoke else 1000) if not change and cached else (30 if smoke else 200)
                )
                m = measure(servers[cached], headers, scrapes, change)
                res.samples[f"{kind} / {label}"] = m
                target = None
                if domains >= 250 and cached and not change:
                    target = at_most(20.0, "p99 <= 20 ms")
                res.rows.append(
                    row(
                        "scrape",
                        f"{kind}, {label}: latency",
                        "ms",
                        m["latencies_s"],
                        scale=1000,
                        stat="p99",
                        target=target,
                        note=f"server CPU {m['server_cpu_s_per_scrape'] * 1000:.1f} ms/scrape",
                    )
                )
            m = res.samples[f"{kind} / {REGIMES[0][0]}"]
            res.rows.append(
                Row(
                    "scrape",
                    f"{kind}: size on the wire ({what})",
                    "KiB",
                    m["wire_bytes"] / 1024,
                    "each",
                    note=f"exposition {m['body_bytes'] / 1024:.0f} KiB decoded",
                )
            )
    finally:
        for server in servers.values():
            server.close()
    return res
