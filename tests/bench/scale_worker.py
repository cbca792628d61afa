"""One size of the scale benchmark: `python -m bench.scale_worker --domains N --workdir DIR`.

A real `service.daemon.Daemon` (its State, History, DomainTrimmer, sweep, census,
collector, metrics server and status pages) over a stand-in host (bench.scale_host:
the real Hypervisor adapter on stand-in libvirt objects, real sparse image files).
In its own process, so its RSS is its own and scrapes from the parent do not share
its GIL. It

1. runs `--censuses` censuses and `--sweeps` sweeps of every domain and times them
   (process CPU, all threads, and wall), and every history append of the sweeps;
2. gives the RSS growth from before the first census to after the last sweep;
3. with `--year`, adds a synthetic year of history (see add_year) and times the
   status report (build_status + format_status, what `virt-trimd status` runs);
4. serves /metrics and / (page cache off, so every `/` renders) and prints one JSON
   line with all of the above and the port; then, until stdin closes, answers each
   line "change" (one domain's trim recorded, as during a sweep) or "census" (a whole
   census run) with "ok", and "status" with a JSON line of in-process status timings.
"""

from __future__ import annotations

import argparse
import dataclasses
import gc
import io
import json
import os
import shutil
import sqlite3
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.scale_host import stand_in_host
from virt_trimd.cli.statusview import format_status
from virt_trimd.config.model import load_config
from virt_trimd.engine import history as history_module
from virt_trimd.engine.history import History
from virt_trimd.engine.schedule import local_timezone
from virt_trimd.engine.status import build_status, schedule_next_runs
from virt_trimd.records import TrimRecord
from virt_trimd.service import statuspages
from virt_trimd.service.daemon import Daemon

DAY = 86_400
SCHEDULE = "nightly"


def rss_kib() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise RuntimeError("no VmRSS")


def config_text(state_dir: Path, concurrency: int) -> str:
    """The daemon's configuration: one nightly schedule over every domain, 5-minute census."""
    return (
        "libvirt:\n  uri: test:///scale-bench\n"
        "metrics:\n  listen: 127.0.0.1:9742\n"
        f"state_dir: {state_dir}\n"
        "history_retention: 400d\n"
        "census_interval: 5m\n"
        "schedules:\n"
        f"  - name: {SCHEDULE}\n"
        "    cron: '30 2 * * *'\n"
        "    window: 2h\n"
        "    domains: ['*']\n"
        f"    concurrency: {concurrency}\n"
        "    timeout: 2m\n"
    )


def timed_cpu(fn: Any) -> dict[str, float]:
    cpu0, wall0 = time.process_time(), time.perf_counter()
    fn()
    return {"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0}


def census_ticks(now: float) -> list[int]:
    """Sample times one disk keeps after a year at census_interval 5m (history.CENSUS_TIERS).

    Every census of the last day, then (the tiers) the latest of each hour to 30 days
    and of each day beyond, back 365 days. The newest day is left to the real censuses.
    """
    ticks: set[int] = set()
    t = int(now)
    (day_age, hour), (month_age, day) = history_module.CENSUS_TIERS
    for ts in range(t - day_age, t - 600, 300):
        ticks.add(ts)
    for ts in range(t - month_age, t - day_age, hour):
        ticks.add(ts // hour * hour + hour - 300)
    for ts in range(t - 365 * DAY, t - month_age, day):
        ticks.add(ts // day * day + day - 300)
    return sorted(ticks)


def add_year(state_dir: Path, records: Sequence[TrimRecord], now: float) -> dict[str, Any]:
    """A year of history beside what the real sweeps and censuses wrote.

    Trims: one per domain per day for 365 days (the row the sweep wrote for that
    domain, moved back a day at a time: same JSON size). Census: every disk the real
    census recorded gets the samples a year at a 5-minute census keeps after
    compaction (census_ticks), its allocation growing slowly. Written with plain SQL
    into the History's own schema, in one transaction (building it through append()
    would fsync 365 x N times). Then the real compaction runs over it, as the daemon's
    daily prune would.
    """
    t0 = time.perf_counter()
    db = sqlite3.connect(state_dir / history_module.DB_FILENAME, isolation_level=None)
    try:
        db.execute("BEGIN")
        rows = []
        for rec in records:
            text = json.dumps(rec.to_dict(), ensure_ascii=False, allow_nan=False)
            rows.append((rec, text, rec.started_ts))
        for days in range(365, 0, -1):
            batch = []
            for rec, text, ts in rows:
                when = ts - days * DAY
                stamp = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(when))
                stamp += rec.started_at[19:]
                batch.append(
                    (rec.domain, rec.uuid, rec.schedule, rec.result.value, 0, stamp, when,
                     rec.duration_seconds, rec.reclaimed_bytes,
                     text.replace(rec.started_at, stamp, 1))
                )  # fmt: skip
            db.executemany(
                "INSERT INTO trims (domain, uuid, schedule, result, dry_run, started_at,"
                " started_ts, duration_seconds, reclaimed_bytes, record_json)"
                " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
                batch,
            )
        db.executemany(
            "INSERT INTO sweeps (schedule, started_ts, finished_ts, domains, reclaimed_bytes)"
            " VALUES (?, ?, ?, ?, ?)",
            [
                (SCHEDULE, now - d * DAY, now - d * DAY + 600, len(rows), 0)
                for d in range(365, 0, -1)
            ],
        )
        ticks = census_ticks(now)
        disks = db.execute(
            "SELECT disk_id, allocated_bytes, virtual_bytes, reclaimable_bytes FROM census"
            " WHERE ts = (SELECT MAX(ts) FROM census)"
        ).fetchall()
        latest = int(now) - 600
        samples = 0
        for disk_id, alloc, virt, recl in disks:
            db.executemany(
                "INSERT OR IGNORE INTO census (disk_id, ts, allocated_bytes, virtual_bytes,"
                " reclaimable_bytes) VALUES (?, ?, ?, ?, ?)",
                (
                    (disk_id, ts, max((alloc or 0) - (latest - ts) // DAY * 128, 0), virt, recl)
                    for ts in ticks
                ),
            )  # fmt: skip
            samples += len(ticks)
        db.execute("COMMIT")
    finally:
        db.close()
    built = time.perf_counter() - t0
    with History(state_dir) as hist:
        t1 = time.perf_counter()
        hist.compact_census(now)
        compact = time.perf_counter() - t1
    size = (state_dir / history_module.DB_FILENAME).stat().st_size
    return {
        "trims": 365 * len(rows),
        "census_samples": samples,
        "census_samples_per_disk": len(ticks),
        "build_s": round(built, 2),
        "compact_s": round(compact, 3),
        "db_bytes": size,
    }


def status_times(daemon: Daemon, repeats: int) -> dict[str, Any]:
    """build_status + format_status on a read-only History, as `virt-trimd status` runs them."""
    tz = local_timezone()
    out: list[float] = []
    lines = 0
    for _ in range(repeats):
        t0 = time.perf_counter()
        now = time.time()
        with History(daemon.config.state_dir, readonly=True) as hist:
            next_runs = schedule_next_runs(hist, daemon.config.schedules, tz, now)
            report = build_status(hist, daemon.config, now, hostname="bench", next_runs=next_runs)
        buf = io.StringIO()
        buf.write(format_status(report, tz))
        out.append(time.perf_counter() - t0)
        lines = buf.getvalue().count("\n")
    return {"status_inproc_s": [round(x, 6) for x in out], "status_lines": lines}


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scale_worker")
    parser.add_argument("--domains", type=int, required=True)
    parser.add_argument("--disks", type=int, default=4)
    parser.add_argument("--workdir", type=Path, required=True)
    parser.add_argument("--latency", type=float, default=0.001, help="agent round trip, s")
    parser.add_argument("--concurrency", type=int, default=4)
    parser.add_argument("--censuses", type=int, default=3)
    parser.add_argument("--sweeps", type=int, default=2)
    parser.add_argument("--year", action="store_true", help="add a year of synthetic history")
    parser.add_argument("--status-repeats", type=int, default=5)
    parser.add_argument("--profile", type=Path, help="cProfile the censuses and sweeps here")
    parser.add_argument(
        "--tracemalloc", action="store_true", help="print what the censuses and sweeps kept"
    )
    args = parser.parse_args(argv)

    n = args.domains
    work = args.workdir
    state_dir = work / f"state-{n}"
    shutil.rmtree(state_dir, ignore_errors=True)  # a fresh history each run
    state_dir.mkdir(parents=True)
    cfg_path = work / f"config-{n}.yaml"
    cfg_path.write_text(config_text(state_dir, args.concurrency))
    config = load_config(cfg_path)
    config = dataclasses.replace(config, metrics=dataclasses.replace(config.metrics, listen_port=0))

    hv, conn = stand_in_host(work / "images", n, args.disks, args.latency)
    daemon = Daemon(config, cfg_path, hostname="bench")
    daemon.hv = hv
    daemon.trimmer.hypervisor = hv
    daemon.offline.hypervisor = hv
    daemon.open_history()
    daemon.state.set_config_reload(True)
    assert daemon.connect_libvirt()
    assert daemon.history is not None
    real_append = daemon.history.append
    appends: list[tuple[float, float]] = []

    def timed_append(rec: TrimRecord) -> None:
        c0, w0 = time.thread_time(), time.perf_counter()
        real_append(rec)
        appends.append((time.perf_counter() - w0, time.thread_time() - c0))

    daemon.history.append = timed_append  # type: ignore[method-assign,assignment]

    gc.collect()
    rss0 = rss_kib()
    if args.tracemalloc:
        import tracemalloc

        tracemalloc.start()
        traced0 = tracemalloc.take_snapshot()
    profiler = None
    if args.profile is not None:
        import cProfile

        profiler = cProfile.Profile()
        profiler.enable()
    censuses = [timed_cpu(daemon.census) for _ in range(args.censuses)]
    sweeps = []
    records: tuple[TrimRecord, ...] = ()
    for _ in range(args.sweeps):
        cpu0, wall0 = time.process_time(), time.perf_counter()
        summary = daemon.run_schedule(SCHEDULE, ignore_window=True)
        sweeps.append({"cpu_s": time.process_time() - cpu0, "wall_s": time.perf_counter() - wall0})
        assert summary is not None
        records = summary.records
        assert len(records) == n, f"sweep trimmed {len(records)} of {n}"
        assert all(r.result.value == "success" for r in records), records[0]
    if profiler is not None:
        profiler.disable()
        profiler.dump_stats(str(args.profile))
    gc.collect()
    rss1 = rss_kib()
    if args.tracemalloc:
        top = tracemalloc.take_snapshot().compare_to(traced0, "lineno")
        total = sum(x.size_diff for x in top)
        sys.stderr.write(f"tracemalloc: {total / n:.0f} B per domain kept\n")
        for stat in top[:15]:
            sys.stderr.write(f"  {stat.size_diff / n:8.0f} B/domain  {stat.traceback}\n")
    # The independent check: every disk's allocation in the state is os.stat's.
    snap = daemon.state.snapshot()
    expect = {p: os.stat(p).st_blocks * 512 for d in conn.domains for p in _paths(d)}
    assert len(snap.disks) == n * args.disks
    assert all(d.allocated_bytes == expect[d.path] for d in snap.disks if d.path)

    year: dict[str, Any] = {}
    if args.year:
        daemon.history.close()
        year = add_year(state_dir, records, time.time())
        daemon.history = History(state_dir)
    statuspages.RENDER_TTL_SECONDS = 0.0  # every GET / renders (the real page, no reuse)
    daemon.start_metrics()
    assert daemon.server is not None
    status = status_times(daemon, args.status_repeats) if args.year else {}
    hello = {
        "port": daemon.server.port,
        "pid": os.getpid(),
        "config": str(cfg_path),
        "domains": n,
        "disks": n * args.disks,
        "rss_before_kib": rss0,
        "rss_after_kib": rss1,
        "censuses": censuses,
        "sweeps": sweeps,
        "history_append_wall_s": [round(w, 6) for w, _ in appends],
        "history_append_cpu_s": [round(c, 6) for _, c in appends],
        "agent_calls": sum(d.agent_calls for d in conn.domains),
        "year": year,
        **status,
    }
    print(json.dumps(hello), flush=True)
    latest = {r.domain: r for r in records}
    names = sorted(latest)
    changes = 0
    for line in sys.stdin:
        cmd = line.strip()
        if cmd == "change":
            rec = latest[names[changes % len(names)]]
            changes += 1
            daemon.record(dataclasses.replace(rec, duration_seconds=rec.duration_seconds + 0.001))
            print("ok", flush=True)
        elif cmd == "census":  # every domain's disk series change (their timestamps)
            daemon.census()
            print("ok", flush=True)
        elif cmd == "status":
            print(json.dumps(status_times(daemon, args.status_repeats)), flush=True)
    daemon.server.shutdown()
    daemon.history.close()
    return 0


def _paths(dom: Any) -> list[str]:
    import re

    return re.findall(r"<source file='([^']+)'", dom.xml)


if __name__ == "__main__":
    sys.exit(main())
