"""Pure trim maths: effectiveness thresholds and guest-used attribution."""

from __future__ import annotations

from virt_trimd.engine.trim import apply_effectiveness, guest_used_by_disk
from virt_trimd.host.agent import GuestFilesystem
from virt_trimd.records import DiskRecord

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
