"""A history file with trims and censuses of three domains, for status, the page and Chromium."""

from __future__ import annotations

from datetime import UTC, datetime
from pathlib import Path

from virt_trimd.engine.history import CensusDomain, History
from virt_trimd.engine.state import DiskState
from virt_trimd.records import DiskRecord, Result, TrimRecord

DAY = 86_400
GIB = 1 << 30


def disk(domain: str, allocated: int, reclaimable: int | None, ready: bool = True) -> DiskState:
    return DiskState(
        domain=domain,
        disk="vda",
        path=f"/img/{domain}.qcow2",
        format="qcow2",
        bus="virtio",
        discard="unmap" if ready else None,
        allocated_bytes=allocated,
        virtual_bytes=20 * GIB,
        file_bytes=allocated,
        discard_ready=ready,
        reclaimable_bytes=reclaimable,
    )


def trim(domain: str, ts: float, reclaimed: int, result: Result = Result.SUCCESS) -> TrimRecord:
    return TrimRecord(
        domain=domain,
        uuid=f"uuid-{domain}",
        result=result,
        message="trimmed 1 filesystem(s)" if result is Result.SUCCESS else "agent <b>gone</b>",
        started_at=datetime.fromtimestamp(ts, UTC).isoformat(),
        duration_seconds=1.0,
        disks=(
            DiskRecord(
                disk="vda",
                path=f"/img/{domain}.qcow2",
                format="qcow2",
                bus="virtio",
                discard="unmap",
                allocated_before=5 * GIB + reclaimed,
                allocated_after=5 * GIB,
                reclaimed_bytes=reclaimed,
            ),
        ),
        schedule="nightly",
    )


def populate_history(state: Path, now: float) -> None:
    with History(state) as hist:
        # web01: trimmed 2 days and 20 days ago, grew 1 GiB over the last 7 days.
        hist.append(trim("web01", now - 2 * DAY, 300 << 20))
        hist.append(trim("web01", now - 20 * DAY, 700 << 20))
        hist.append(trim("web01", now - 40 * DAY, 1 << 30))  # outside every window
        # db01: its latest trim failed.
        hist.append(trim("db01", now - 3600, 0, Result.AGENT_UNAVAILABLE))
        for ts, web_alloc in ((now - 8 * DAY, 4 * GIB), (now - 600, 5 * GIB)):
            hist.append_census(
                ts,
                [
                    CensusDomain(
                        "web01", "uuid-web01", True, "connected", (disk("web01", web_alloc, GIB),)
                    ),
                    CensusDomain(
                        "db01", "uuid-db01", True, "connected", (disk("db01", 2 * GIB, None),)
                    ),
                    CensusDomain(
                        "<script>x", "uuid-x", False, None, (disk("<script>x", GIB, None, False),)
                    ),
                ],
            )


def status_config(tmp_path: Path, state: Path) -> Path:
    path = tmp_path / "config.yaml"
    path.write_text(
        f"state_dir: {state}\nschedules:\n  - name: nightly\n    cron: '30 2 * * *'\n"
        "    domains: ['*']\n    exclude: ['db*']\n"
    )
    return path
