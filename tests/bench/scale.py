"""Benchmark `scale`: how our own code's cost grows with the host (issue 14, item 4).

For each size (100, 1,000 and 5,000 domains of 4 disks; --smoke: 100 only) one
`bench.scale_worker` process runs the real Daemon over a stand-in host (the real
Hypervisor adapter on stand-in libvirt objects whose agent answers after 1 ms, real
sparse raw image files measured by os.stat): censuses and sweeps (CPU per domain),
RSS growth per domain, the cost of each history append, then (up to YEAR_UP_TO
domains) a synthetic year of history (scale_worker.add_year) for the status report.
This process then scrapes the worker's real metrics server (scrape.scrape_once: a
new connection per request, the whole body read; Prometheus's OpenMetrics+gzip
request and a plain one) cached, right after one domain's trim and right after a
whole census, GETs `/` (the page cache turned off, so each GET renders), and runs
`virt-trimd status` as a command. Growth rows compare per-domain figures between
sizes: 1.0 is linear.
"""

from __future__ import annotations

import itertools
import json
import os
import subprocess
import sys
import time
import urllib.request
from pathlib import Path
from typing import IO, Any

from bench.common import (
    BenchResult,
    Row,
    Summary,
    at_most,
    env_with_package,
    proc_status_kib,
    row,
)
from bench.scrape import KINDS, scrape_once

FULL_SIZES = (100, 1000, 5000)
SMOKE_SIZES = (100,)
DISKS = 4
AGENT_LATENCY_S = 0.001
# Sizes that get the synthetic year of history (status, `/`): at 5,000 domains it would
# be 8 GiB and minutes to build, and the status target is set at 1,000.
YEAR_UP_TO = 1000


class Worker:
    """One bench.scale_worker process and its hello line."""

    def __init__(self, domains: int, workdir: Path, smoke: bool) -> None:
        argv = [
            sys.executable, "-m", "bench.scale_worker", "--domains", str(domains),
            "--disks", str(DISKS), "--workdir", str(workdir), "--latency", str(AGENT_LATENCY_S),
            "--status-repeats", "1" if smoke else "5",
        ]  # fmt: skip
        if domains <= YEAR_UP_TO:
            argv.append("--year")
        if smoke:
            argv += ["--censuses", "2", "--sweeps", "1"]
        self.proc = subprocess.Popen(
            argv, stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env_with_package()
        )
        self.stdin: IO[str] = self.proc.stdin  # type: ignore[assignment]
        self.stdout: IO[str] = self.proc.stdout  # type: ignore[assignment]
        line = self.stdout.readline()
        if not line:
            self.proc.wait(60)
            raise RuntimeError(f"scale worker for {domains} domains exited {self.proc.returncode}")
        self.hello: dict[str, Any] = json.loads(line)
        self.port = int(self.hello["port"])

    def change(self, what: str = "change") -> None:
        self.stdin.write(what + "\n")
        self.stdin.flush()
        if self.stdout.readline().strip() != "ok":
            raise RuntimeError("scale worker did not acknowledge the change")

    def close(self) -> None:
        self.stdin.close()
        try:
            self.proc.wait(60)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait()


def _get(port: int, path: str) -> float:
    t0 = time.perf_counter()
    with urllib.request.urlopen(f"http://127.0.0.1:{port}{path}", timeout=120) as resp:
        body = resp.read()
        if resp.status != 200 or not body:
            raise RuntimeError(f"GET {path}: {resp.status}")
    return time.perf_counter() - t0


def _status_cli(config: str, repeats: int) -> list[float]:
    """Wall seconds of `python -m virt_trimd status --config FILE` (exit 0 or 1 are answers)."""
    out = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        proc = subprocess.run(
            [sys.executable, "-m", "virt_trimd", "status", "--config", config],
            capture_output=True, text=True, env=env_with_package(), timeout=600, check=False,
        )  # fmt: skip
        out.append(time.perf_counter() - t0)
        if proc.returncode not in (0, 1) or "guest-00000" not in proc.stdout:
            raise RuntimeError(f"virt-trimd status exited {proc.returncode}: {proc.stderr[-500:]}")
    return out


def measure_size(domains: int, workdir: Path, smoke: bool) -> dict[str, Any]:
    """Everything for one size: the worker's own figures plus the HTTP and CLI ones."""
    worker = Worker(domains, workdir, smoke)
    try:
        m: dict[str, Any] = dict(worker.hello)
        cached_n, change_n = (20, 5) if smoke else (300, 60)
        for kind, headers in KINDS.items():
            for _ in range(3):
                scrape_once(worker.port, headers)
            cached, body = [], 0
            for _ in range(cached_n):
                s, _, decoded = scrape_once(worker.port, headers)
                cached.append(s)
                body = len(decoded)
            changed = []
            for _ in range(change_n):
                worker.change()
                changed.append(scrape_once(worker.port, headers)[0])
            m[f"{kind} / cached"] = [round(x, 6) for x in cached]
            m[f"{kind} / after change"] = [round(x, 6) for x in changed]
            after_census = []
            for _ in range(1 if smoke else 3):
                worker.change("census")
                after_census.append(scrape_once(worker.port, headers)[0])
            m[f"{kind} / after census"] = [round(x, 6) for x in after_census]
            m[f"{kind} / body_bytes"] = body
        # After both formats were scraped: the exposition caches are part of the cost.
        m["rss_after_scrapes_kib"] = proc_status_kib(worker.proc.pid)["VmRSS"]
        if m["year"]:
            m["page_s"] = [round(_get(worker.port, "/"), 6) for _ in range(2 if smoke else 5)]
            m["status_cli_s"] = [round(x, 6) for x in _status_cli(m["config"], 1 if smoke else 5)]
    finally:
        worker.close()
    return m


def _per_domain(m: dict[str, Any], key: str) -> list[float]:
    return [x["cpu_s"] / m["domains"] for x in m[key]]


def _rss_per_domain(m: dict[str, Any]) -> float:
    return float((m["rss_after_kib"] - m["rss_before_kib"]) * 1024 / m["domains"])


def rows_for(m: dict[str, Any]) -> list[Row]:
    """The rows of one size; targets where issue 14 sets them (some only at 1,000)."""
    n = m["domains"]
    at = f"{n} dom x {DISKS}"
    at_1000 = n == 1000
    out = [
        row("scale", f"{at}: sweep CPU per domain", "ms", _per_domain(m, "sweeps"), scale=1000,
            target=at_most(2.0, "<= 2 ms"),
            note=f"sweep wall {Summary.of([x['wall_s'] for x in m['sweeps']]).median:.1f} s "
                 f"at concurrency 4, agent {AGENT_LATENCY_S * 1000:g} ms per call"),
        row("scale", f"{at}: census CPU per domain", "ms", _per_domain(m, "censuses"), scale=1000,
            target=at_most(2.0, "<= 2 ms")),
        Row("scale", f"{at}: RSS growth per domain", "KB", _rss_per_domain(m) / 1000, "each",
            target=at_most(20.0, "<= 20 KB"),
            note=f"VmRSS {m['rss_before_kib']} -> {m['rss_after_kib']} KiB over the censuses "
                 "and sweeps"),
        Row("scale", f"{at}: RSS growth per domain, /metrics caches included", "KB",
            (m["rss_after_scrapes_kib"] - m["rss_before_kib"]) * 1024 / n / 1000, "each",
            note="after both formats were scraped (exposition text kept per format)"),
        row("scale", f"{at}: history append per record (fsync'd)", "ms",
            m["history_append_wall_s"], scale=1000, spread="IQR",
            note=f"CPU median {Summary.of(m['history_append_cpu_s']).median * 1000:.2f} ms"),
    ]  # fmt: skip
    for kind in KINDS:
        short = "OpenMetrics+gzip" if kind.startswith("prometheus") else "plain"
        out.append(
            row("scale", f"{at}: /metrics {short}, cached", "ms", m[f"{kind} / cached"],
                scale=1000, stat="p99",
                target=at_most(20.0, "p99 <= 20 ms") if at_1000 else None,
                note=f"{m[f'{kind} / body_bytes'] / 1024:.0f} KiB exposition")
        )  # fmt: skip
        for stat in ("median", "p99"):
            out.append(
                row("scale", f"{at}: /metrics {short}, first after a change ({stat})", "ms",
                    m[f"{kind} / after change"], scale=1000, stat=stat,
                    target=at_most(50.0, f"{stat} <= 50 ms") if at_1000 else None)
            )  # fmt: skip
        out.append(
            row("scale", f"{at}: /metrics {short}, first after a whole census", "ms",
                m[f"{kind} / after census"], scale=1000,
                note="a census changes every disk's series (allocation, timestamps)")
        )  # fmt: skip
    year = m["year"]
    if not year:
        return out
    what = f"a year: {year['trims']} trims, {year['census_samples']} census samples"
    out += [
        row("scale", f"{at}: status report in-process, {what}", "ms", m["status_inproc_s"],
            scale=1000, target=at_most(300.0, "<= 300 ms") if at_1000 else None,
            note=f"history {year['db_bytes'] / 2**20:.0f} MiB"),
        row("scale", f"{at}: `virt-trimd status` command, a year", "ms", m["status_cli_s"],
            scale=1000, target=at_most(300.0, "<= 300 ms") if at_1000 else None,
            note="whole process: interpreter start, imports, report"),
        row("scale", f"{at}: GET / (status page renders), a year", "ms", m["page_s"], scale=1000),
    ]  # fmt: skip
    return out


def growth_rows(sizes: dict[int, dict[str, Any]]) -> list[Row]:
    """Per-domain cost at each size over the one before: 1.0 is linear."""
    out: list[Row] = []
    ns = sorted(sizes)
    for small, big in itertools.pairwise(ns):
        a, b = sizes[small], sizes[big]
        ratio = big / small

        def per(m: dict[str, Any], key: str, total: bool = False) -> float:
            values = m[key] if not total else [x["cpu_s"] for x in m[key]]
            return Summary.of(values).median

        pairs = {
            "sweep CPU per domain": (per(a, "sweeps", True) / small, per(b, "sweeps", True) / big),
            "census CPU per domain": (
                per(a, "censuses", True) / small,
                per(b, "censuses", True) / big,
            ),
            "RSS per domain": (_rss_per_domain(a), _rss_per_domain(b)),
            "history append": (per(a, "history_append_wall_s"), per(b, "history_append_wall_s")),
            "first scrape after a change (OpenMetrics+gzip) per domain": (
                per(a, f"{next(iter(KINDS))} / after change") / small,
                per(b, f"{next(iter(KINDS))} / after change") / big,
            ),
        }
        if a["year"] and b["year"]:
            pairs["status report per domain"] = (
                per(a, "status_inproc_s") / small,
                per(b, "status_inproc_s") / big,
            )
        # What each further domain costs, without the fixed part of the growth (SQLite's
        # page cache, worker threads) that the per-domain figure of a small size carries.
        grow_a = (a["rss_after_kib"] - a["rss_before_kib"]) * 1024
        grow_b = (b["rss_after_kib"] - b["rss_before_kib"]) * 1024
        out.append(
            Row("scale", f"marginal RSS per domain {small}->{big}", "KB",
                (grow_b - grow_a) / (big - small) / 1000, "each",
                target=at_most(20.0, "<= 20 KB"),
                note="RSS growth difference between the sizes / domains added")
        )  # fmt: skip
        for what, (x, y) in pairs.items():
            value = y / x if x > 0 else float("nan")
            out.append(
                Row("scale", f"growth {small}->{big} domains (x{ratio:g}): {what}", "x", value,
                    "ratio", note="1.0 = linear; >1.3 grows faster than the host")
            )  # fmt: skip
    return out


def run(workdir: Path, smoke: bool) -> BenchResult:
    res = BenchResult("scale")
    # VTRIMD_SCALE_SIZES=100,1000 picks sizes of a full run (a quick look at one size).
    chosen = os.environ.get("VTRIMD_SCALE_SIZES")
    sizes: tuple[int, ...] = SMOKE_SIZES if smoke else FULL_SIZES
    if chosen and not smoke:
        sizes = tuple(int(x) for x in chosen.split(","))
    measured: dict[int, dict[str, Any]] = {}
    for n in sizes:
        measured[n] = measure_size(n, workdir / "scale", smoke)
        res.rows += rows_for(measured[n])
    res.rows += growth_rows(measured)
    res.samples = {str(n): m for n, m in measured.items()}
    res.samples["sizes"] = list(sizes)
    return res
