"""Record builders: plausible TrimRecords and DiskRecords, any field overridable by name."""

from __future__ import annotations

import dataclasses
from datetime import UTC, datetime
from typing import Any

from virt_trimd.records import DiskRecord, FilesystemResult, Result, TrimRecord

GIB = 1 << 30
STARTED_AT = "2024-05-01T02:00:00+00:00"


def iso(ts: float) -> str:
    """Epoch seconds as the ISO 8601 UTC stamp records carry."""
    return datetime.fromtimestamp(ts, UTC).isoformat()


def disk_record(
    disk: str = "vda", before: int | None = 6 * GIB, after: int | None = 5 * GIB, **fields: Any
) -> DiskRecord:
    """A measured qcow2 disk on virtio that went from `before` to `after` bytes."""
    base = DiskRecord(
        disk=disk,
        path=f"/var/lib/libvirt/images/{disk}.qcow2",
        format="qcow2",
        bus="virtio",
        discard="unmap",
        allocated_before=before,
        allocated_after=after,
        reclaimed_bytes=None if before is None or after is None else before - after,
        virtual_size=20 * GIB,
        file_size=7 * GIB,
        effective=True,
    )
    return dataclasses.replace(base, **fields)


def trim_record(domain: str = "web1", result: Result = Result.SUCCESS, **fields: Any) -> TrimRecord:
    """A record of `domain` (UUID `u-<domain>`) by schedule `nightly`, 2 s, no disks."""
    base = TrimRecord(
        domain=domain,
        uuid=f"u-{domain}",
        result=result,
        message="",
        started_at=STARTED_AT,
        duration_seconds=2.0,
        schedule="nightly",
    )
    return dataclasses.replace(base, **fields)


def full_record(
    domain: str = "web1", result: Result = Result.SUCCESS, started_ts: float = 0.0, **fields: Any
) -> TrimRecord:
    """A record with every optional part filled: two filesystems, a measured and an
    unmeasured disk, so a round trip (history, JSON) has something to lose."""
    return trim_record(
        domain,
        result,
        **{
            "uuid": "6f1c8a52-1f0b-4c8e-9a53-3c2a9d8e0b11",
            "message": "trimmed 2 filesystems",
            "started_at": iso(started_ts),
            "duration_seconds": 2.5,
            "filesystems": (
                FilesystemResult("/", 2_147_483_648, None),
                FilesystemResult("/boot", None, "FITRIM: operation not supported"),
            ),
            "disks": (
                disk_record(
                    "vda",
                    6 * GIB,
                    5 * GIB,
                    path=f"/var/lib/libvirt/images/{domain}.qcow2",
                    file_size=6 * GIB,
                    guest_used_bytes=4 * GIB,
                    residual_bytes=GIB,
                ),
                DiskRecord(
                    disk="sdb",
                    path=None,
                    format="raw",
                    bus="scsi",
                    discard=None,
                    not_measured="network disk (rbd)",
                ),
            ),
            **fields,
        },
    )
