"""Pure trim logic: effectiveness thresholds, guest-used attribution, the journal line."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest

from virt_trimd.engine.trim import apply_effectiveness, guest_used_by_disk, log_record
from virt_trimd.host.agent import GuestFilesystem
from virt_trimd.records import DiskRecord, Method, Result, TrimRecord

MiB = 1 << 20


def _disk(after: int | None) -> DiskRecord:
    return DiskRecord(
        disk="sda",
        path="/x",
        format="qcow2",
        bus="scsi",
        discard="unmap",
        allocated_before=after,
        allocated_after=after,
        reclaimed_bytes=0,
    )


def test_effective_when_residual_below_both_thresholds() -> None:
    d = apply_effectiveness(_disk(300 * MiB), 260 * MiB, 64 * MiB, 0.10)
    assert (d.guest_used_bytes, d.residual_bytes, d.effective) == (260 * MiB, 40 * MiB, True)


def test_ineffective_at_exactly_min_residual() -> None:
    d = apply_effectiveness(_disk(100 * MiB + 64 * MiB), 100 * MiB, 64 * MiB, 0.10)
    assert d.effective is False


def test_ratio_threshold_wins_for_large_disks() -> None:
    used = 10_000 * MiB  # 10 % = 1000 MiB > 64 MiB
    assert apply_effectiveness(_disk(used + 900 * MiB), used, 64 * MiB, 0.10).effective is True
    assert apply_effectiveness(_disk(used + 1000 * MiB), used, 64 * MiB, 0.10).effective is False


def test_unknown_stays_unknown() -> None:
    assert apply_effectiveness(_disk(100), None, 64 * MiB, 0.1).effective is None
    assert apply_effectiveness(_disk(None), 5, 64 * MiB, 0.1).effective is None


def test_guest_used_sums_partitions_and_drops_spanning_filesystems() -> None:
    fss = [
        GuestFilesystem("/", "ext4", ("sda",), 100, 1000),
        GuestFilesystem("/boot", "ext4", ("sda",), 20, 100),
        GuestFilesystem("/lvm", "xfs", ("vdb", "vdc"), 50, 100),
        GuestFilesystem("/vdc-alone", "xfs", ("vdc",), 7, 100),
        GuestFilesystem("/nodisk", "tmpfs", (), 3, 10),
        GuestFilesystem("/unknown", "ext4", ("vdd",), None, None),
    ]
    assert guest_used_by_disk(fss) == {"sda": 120}


def _record(*disks: DiskRecord) -> TrimRecord:
    return TrimRecord(
        domain="web1",
        uuid="u",
        result=Result.SUCCESS,
        message="1 filesystem(s) trimmed",
        started_at="2024-05-01T02:00:00+00:00",
        duration_seconds=1.0,
        disks=disks,
    )


def test_unseen_image_is_logged_as_not_measured_never_as_zero(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # PrivateTmp hides /tmp from the service: the stat fails, the trim itself works.
    hidden = DiskRecord(
        disk="sda",
        path="/tmp/guest.qcow2",
        format="qcow2",
        bus="scsi",
        discard="unmap",
        not_measured="cannot stat /tmp/guest.qcow2: No such file or directory",
    )
    with caplog.at_level(logging.INFO, logger="virt_trimd"):
        log_record(_record(hidden))
    [rec] = caplog.records
    line = rec.getMessage()
    assert "reclaimed: not measured" in line
    assert "reclaimed 0" not in line
    assert "sda (/tmp/guest.qcow2): cannot stat /tmp/guest.qcow2" in line
    assert not hasattr(rec, "RECLAIMED_BYTES")
    assert "/tmp/guest.qcow2" in rec.__dict__["NOT_MEASURED"]


def test_partly_measured_domain_logs_bytes_and_the_unmeasured_disk(
    caplog: pytest.LogCaptureFixture,
) -> None:
    seen = replace(_disk(5 * MiB), allocated_before=9 * MiB, reclaimed_bytes=4 * MiB)
    hidden = DiskRecord(
        disk="sdb", path="/dev/vg/x", format="raw", bus="scsi", discard="unmap",
        not_measured="block disk: only image files are measured",
    )  # fmt: skip
    with caplog.at_level(logging.INFO, logger="virt_trimd"):
        log_record(_record(seen, hidden))
    [rec] = caplog.records
    assert f"reclaimed {4 * MiB} bytes" in rec.getMessage()
    assert rec.__dict__["RECLAIMED_BYTES"] == 4 * MiB
    assert "not measured: sdb (/dev/vg/x): block disk" in rec.getMessage()


def test_offline_records_share_the_line_and_its_not_measured_rule(
    caplog: pytest.LogCaptureFixture,
) -> None:
    # engine/offline.py logs through log_record with its own logger; it used to print
    # "reclaimed 0 bytes" for an image it could not measure.
    hidden = DiskRecord(
        disk="vda", path="/tmp/off.qcow2", format="qcow2", bus="virtio", discard="unmap",
        not_measured="cannot stat /tmp/off.qcow2: No such file or directory",
    )  # fmt: skip
    record = replace(_record(hidden), method=Method.SPARSIFY)
    with caplog.at_level(logging.INFO, logger="virt_trimd"):
        log_record(record, logging.getLogger("virt_trimd.offline"))
    [rec] = caplog.records
    assert rec.name == "virt_trimd.offline"
    assert rec.getMessage().startswith("web1: offline success, reclaimed: not measured")
    assert rec.__dict__["METHOD"] == "sparsify"
    assert "RECLAIMED_BYTES" not in rec.__dict__
