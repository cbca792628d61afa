"""Write tests/integration/data/history-v1.sqlite3 with the v1 (release) history code."""

# Run once with the v1 code (commit 8aadcee):
#   PYTHONPATH=daemon python tests/integration/data/make_history_v1.py OUT
import shutil
import sys
import tempfile
from datetime import UTC, datetime
from pathlib import Path

from virt_trimd.engine.history import SCHEMA_VERSION, History
from virt_trimd.records import DiskRecord, FilesystemResult, Result, TrimRecord

assert SCHEMA_VERSION == 1
T0 = datetime(2026, 10, 1, 2, 30, tzinfo=UTC).timestamp()
tmp = Path(tempfile.mkdtemp())
with History(tmp) as h:
    for day in range(3):
        for dom, res, rec in (
            ("web01", Result.SUCCESS, 1 << 20),
            ("db01", Result.AGENT_UNAVAILABLE, 0),
        ):
            ts = T0 + day * 86400
            disks = (
                (
                    DiskRecord(
                        disk="vda",
                        path=f"/var/lib/libvirt/images/{dom}.qcow2",
                        format="qcow2",
                        bus="virtio",
                        discard="unmap",
                        allocated_before=(10 << 20) + rec,
                        allocated_after=10 << 20,
                        reclaimed_bytes=rec,
                        virtual_size=1 << 30,
                        file_size=20 << 20,
                    ),
                )
                if rec
                else ()
            )
            h.append(
                TrimRecord(
                    domain=dom,
                    uuid=f"uuid-{dom}",
                    result=res,
                    message="ok" if rec else "guest agent is not responding",
                    started_at=datetime.fromtimestamp(ts, UTC).isoformat(),
                    duration_seconds=1.5,
                    filesystems=(FilesystemResult("/", rec, None),) if rec else (),
                    disks=disks,
                    schedule="nightly",
                )
            )
        h.append_sweep("nightly", T0 + day * 86400, T0 + day * 86400 + 3, 2, 1 << 20)
shutil.copy(tmp / "history.sqlite3", sys.argv[1])
