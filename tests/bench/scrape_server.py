"""A metrics endpoint holding synthetic state: `python -m bench.scrape_server --domains 250`.

State goes in through the daemon's own `State` methods (observe_trim, observe_census,
observe_sweep, set_next_run ...) and comes out through the real `TrimdCollector` and
the real `start_metrics_server`; nothing of libvirt is involved or mocked. Prints one
JSON line {"port", "pid", "series"} when serving, then serves until stdin closes.

Wired like the daemon: `cache_key=state.snapshot` and the ExpositionCache renderer
(unless --no-cache, which renders the whole registry every scrape). Each line
"change" on stdin changes the state (a schedule's next run time, as after a sweep)
and is answered "ok" on stdout, so the next scrape has to render again.
"""

from __future__ import annotations

import argparse
import datetime as dt
import json
import os
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

from prometheus_client import CollectorRegistry, generate_latest

from virt_trimd import __version__
from virt_trimd.config.model import Config
from virt_trimd.engine.history import History
from virt_trimd.engine.state import DiskState, State
from virt_trimd.records import DiskRecord, FilesystemResult, Result, SweepSummary, TrimRecord
from virt_trimd.service.statuspages import status_pages
from virt_trimd.web.collector import ExpositionCache, TrimdCollector
from virt_trimd.web.server import Page, start_metrics_server

GIB = 1 << 30
MIB = 1 << 20


def _disk_names(count: int) -> list[str]:
    return [f"sd{chr(ord('a') + i % 26)}{'' if i < 26 else i // 26}" for i in range(count)]


def populate(state: State, domains: int, disks_per_domain: int) -> None:
    """Fill state as a host with `domains` guests of `disks_per_domain` disks each would."""
    now = time.time()
    schedules = ["nightly", "hourly-small", "weekly-deep"]
    records: list[TrimRecord] = []
    for d in range(domains):
        name = f"guest-{d:04d}.example.internal"
        uuid = f"00000000-0000-4000-8000-{d:012d}"
        disks = []
        fss = []
        census = []
        for i, target in enumerate(_disk_names(disks_per_domain)):
            path = f"/var/lib/libvirt/images/{name}-{target}.qcow2"
            before = (20 + d % 7 + i) * GIB
            after = before - (d % 5 + 1) * 300 * MIB
            disks.append(
                DiskRecord(
                    disk=target,
                    path=path,
                    format="qcow2",
                    bus="scsi",
                    discard="unmap",
                    allocated_before=before,
                    allocated_after=after,
                    reclaimed_bytes=before - after,
                    virtual_size=100 * GIB,
                    file_size=before + 2 * MIB,
                    guest_used_bytes=after - 100 * MIB,
                    residual_bytes=100 * MIB,
                    effective=d % 11 != 0,
                )
            )
            fss.append(FilesystemResult(f"/mnt/{target}", before - after + 17 * MIB, None))
            census.append(
                DiskState(
                    domain=name,
                    disk=target,
                    path=path,
                    format="qcow2",
                    bus="scsi",
                    discard="unmap" if d % 13 else None,
                    allocated_bytes=after,
                    virtual_bytes=100 * GIB,
                    file_bytes=before + 2 * MIB,
                    discard_ready=d % 13 != 0,
                    reclaimable_bytes=40 * MIB,
                )
            )
        started = time.strftime("%Y-%m-%dT%H:%M:%S.000Z", time.gmtime(now - 3600 - d))
        ok = TrimRecord(
            domain=name,
            uuid=uuid,
            result=Result.SUCCESS,
            message="",
            started_at=started,
            duration_seconds=0.5 + (d % 40) * 0.7,
            filesystems=tuple(fss),
            disks=tuple(disks),
            schedule=schedules[d % len(schedules)],
        )
        state.observe_trim(ok)
        records.append(ok)
        if d % 9 == 0:  # some domains also have failures on record: more trims_total series
            state.observe_trim(
                TrimRecord(
                    domain=name,
                    uuid=uuid,
                    result=Result.AGENT_UNAVAILABLE,
                    message="guest agent not connected",
                    started_at=started,
                    duration_seconds=5.0,
                    schedule=schedules[0],
                )
            )
        state.observe_census(name, census)
    for i, sched in enumerate(schedules):
        state.set_next_run(sched, now + 3600 * (i + 1))
        state.observe_sweep(sched, SweepSummary(tuple(records[i :: len(schedules)])), now - 60)
    state.set_libvirt_up(True)
    state.set_config_reload(True)
    state.set_history_ok(True)


@dataclass
class _StatusSource:
    """The attributes of the Daemon the status pages read (service.statuspages)."""

    history: History | None
    config: Config
    state: State
    hostname: str
    tz: dt.tzinfo


def _status_pages(state: State, history_dir: Path) -> dict[str, Page]:
    source = _StatusSource(History(history_dir), Config.default(), state, "bench", dt.UTC)
    return status_pages(source)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m bench.scrape_server")
    parser.add_argument("--domains", type=int, default=250)
    parser.add_argument("--disks-per-domain", type=int, default=4)
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0)
    parser.add_argument("--no-cache", action="store_true", help="render on every scrape")
    parser.add_argument(
        "--status-history", type=Path, metavar="DIR", help="also serve / and /api/v1/status"
    )
    args = parser.parse_args(argv)
    state = State()
    populate(state, args.domains, args.disks_per_domain)
    registry = CollectorRegistry(auto_describe=False)
    collector = TrimdCollector(state, __version__)
    registry.register(collector)
    series = sum(
        1
        for line in generate_latest(registry).decode().splitlines()
        if line and not line.startswith("#")
    )
    server = start_metrics_server(
        registry,
        args.host,
        args.port,
        cache_key=None if args.no_cache else state.snapshot,
        renderer=None if args.no_cache else ExpositionCache(collector).render,
    )
    if args.status_history is not None:
        server.serve_pages(_status_pages(state, args.status_history))
    print(json.dumps({"port": server.port, "pid": os.getpid(), "series": series}), flush=True)
    for line in sys.stdin:  # serve until the parent closes our stdin
        if line.strip() == "change":
            state.set_next_run("nightly", time.time())
            print("ok", flush=True)
    server.shutdown()
    return 0


if __name__ == "__main__":
    sys.exit(main())
