"""Hostile images: whoever controls an image's bytes controls what qemu-img reads.

Real qemu-img on real files crafted to hurt: a looping and a very long backing chain,
a backing file that would block whoever opens it, corrupted qcow2 headers, and an
"image" that never ends. The Measurer runs `qemu-img info -f FMT` under prlimit and a
timeout, without --backing-chain; every case must end in a number or a MeasureError
with a short one-line message, and a DomainTrimmer must turn errors into `not_measured`.
"""

from __future__ import annotations

import json
import os
import struct
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest

from virt_trimd.engine.trim import DomainTrimmer
from virt_trimd.host.hypervisor import Hypervisor
from virt_trimd.host.measure import MeasureError, Measurer, parse_qemu_img_info
from virt_trimd.records import Disk, QemuImgLimits

MiB = 1 << 20
# Small enough that a hang shows up as "timed out" quickly; qemu-img needs milliseconds.
LIMITS = QemuImgLimits(timeout_seconds=5.0, cpu_seconds=5, address_space_bytes=1 << 30)


def _qcow2(path: Path, *extra: str, size: str = "64M") -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), size],
        check=True,
        capture_output=True,
    )
    return path


def _rebase_unsafe(path: Path, backing: Path | str, fmt: str = "qcow2") -> None:
    """Point path's backing file at `backing` without opening anything (-u)."""
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-F", fmt, "-b", str(backing), "-f", "qcow2", str(path)],
        check=True,
        capture_output=True,
    )


def _measurer() -> Measurer:
    return Measurer(LIMITS)


# -- backing chains: never followed --------------------------------------------------


def test_looping_backing_chain_is_not_followed(tmp_path: Path) -> None:
    a = _qcow2(tmp_path / "a.qcow2")
    b = _qcow2(tmp_path / "b.qcow2", "-F", "qcow2", "-b", str(a))
    _rebase_unsafe(a, b)  # a -> b -> a
    # Following the chain is what would fail ("creates an infinite loop").
    chain = subprocess.run(
        ["qemu-img", "info", "--backing-chain", "-f", "qcow2", str(a)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert chain.returncode != 0 and "infinite loop" in chain.stderr
    alloc = _measurer().allocation(str(a), "qcow2")
    assert alloc.virtual_bytes == 64 * MiB
    assert alloc.allocated_bytes == os.stat(a).st_blocks * 512


def test_very_long_backing_chain_costs_one_open(tmp_path: Path) -> None:
    prev = _qcow2(tmp_path / "l0.qcow2", size="16M")
    for i in range(1, 300):
        prev = _qcow2(tmp_path / f"l{i}.qcow2", "-u", "-F", "qcow2", "-b", str(prev), size="16M")
    m = _measurer()
    assert m.allocation(str(prev), "qcow2").virtual_bytes == 16 * MiB
    assert m.qemu_img_runs == 1


def test_backing_file_that_blocks_when_opened_is_never_opened(tmp_path: Path) -> None:
    # A FIFO blocks whoever opens it for reading; so would a hostile NFS path. qemu-img
    # info without --backing-chain must not touch it, or this ends in our timeout.
    fifo = tmp_path / "trap.fifo"
    os.mkfifo(fifo)
    img = _qcow2(tmp_path / "top.qcow2", "-u", "-F", "raw", "-b", str(fifo))
    alloc = _measurer().allocation(str(img), "qcow2")
    assert alloc.virtual_bytes == 64 * MiB


def test_image_that_never_ends_is_cut_off_by_the_timeout(tmp_path: Path) -> None:
    fifo = tmp_path / "endless.qcow2"
    os.mkfifo(fifo)
    m = Measurer(QemuImgLimits(timeout_seconds=1.0, cpu_seconds=5))
    with pytest.raises(MeasureError, match=r"qemu-img timed out after 1s"):
        m.allocation(str(fifo), "qcow2")


# -- corrupted headers -----------------------------------------------------------------

# Offsets in the qcow2 header (docs/interop/qcow2.txt), big-endian.
_FIELDS: dict[str, tuple[int, str]] = {
    "backing_file_offset": (8, ">Q"),
    "backing_file_size": (16, ">I"),
    "cluster_bits": (20, ">I"),
    "size": (24, ">Q"),
    "l1_size": (36, ">I"),
    "l1_table_offset": (40, ">Q"),
    "refcount_table_offset": (48, ">Q"),
    "refcount_table_clusters": (56, ">I"),
    "nb_snapshots": (60, ">I"),
    "snapshots_offset": (64, ">Q"),
    "incompatible_features": (72, ">Q"),
    "header_length": (100, ">I"),
}


def _patched(path: Path, **fields: int) -> Path:
    data = bytearray(path.read_bytes())
    for name, value in fields.items():
        offset, fmt = _FIELDS[name]
        struct.pack_into(fmt, data, offset, value)
    path.write_bytes(bytes(data))
    return path


CORRUPTIONS: dict[str, Callable[[Path], Path]] = {
    "cluster size 2^31": lambda p: _patched(p, cluster_bits=31),
    "L1 table of 2^31 entries": lambda p: _patched(p, l1_size=0x7FFFFFFF),
    "L1 table offset not cluster-aligned": lambda p: _patched(p, l1_table_offset=12345),
    "refcount table of 2^32 clusters": lambda p: _patched(p, refcount_table_clusters=0xFFFFFFFF),
    "2^32 snapshots": lambda p: _patched(p, nb_snapshots=0xFFFFFFFF, snapshots_offset=1 << 16),
    "backing name of 4 GiB": lambda p: _patched(
        p, backing_file_offset=512, backing_file_size=0xFFFFFFFF
    ),
    "unknown incompatible feature": lambda p: _patched(p, incompatible_features=1 << 63),
    "header length 4 GiB": lambda p: _patched(p, header_length=0xFFFFFFFF),
    "truncated after the magic": lambda p: (p.write_bytes(b"QFI\xfb\x00\x00\x00\x03"), p)[1],
    "random bytes after the magic": lambda p: (p.write_bytes(b"QFI\xfb" + os.urandom(8192)), p)[1],
}


@pytest.mark.parametrize("corruption", sorted(CORRUPTIONS))
def test_corrupted_qcow2_header_is_a_short_measure_error(tmp_path: Path, corruption: str) -> None:
    img = CORRUPTIONS[corruption](_qcow2(tmp_path / "bad.qcow2"))
    with pytest.raises(MeasureError) as info:
        _measurer().allocation(str(img), "qcow2")
    message = str(info.value)
    assert message.startswith("qemu-img info failed: "), message
    assert "timed out" not in message  # refused, not hung
    assert "\n" not in message and len(message) <= 600  # one log line, bounded


@pytest.mark.parametrize("size", [1 << 60, (1 << 63) - 512])
def test_absurd_virtual_size_is_refused(tmp_path: Path, size: int) -> None:
    """A guest-written header claiming exabytes gives no virtual size, never the number."""
    img = _patched(_qcow2(tmp_path / "huge.qcow2"), size=size)
    with pytest.raises(MeasureError, match=r"qemu-img info failed: .*Image is too big"):
        _measurer().allocation(str(img), "qcow2")


@pytest.mark.parametrize("size", [(1 << 60) + 1, 1 << 62, (1 << 63) - 512])
def test_an_implausible_virtual_size_printed_by_qemu_img_is_refused(size: int) -> None:
    """Should a qemu-img print such a size, the parser refuses it too (bound: 1 EiB)."""
    with pytest.raises(MeasureError, match="implausible virtual-size"):
        parse_qemu_img_info(json.dumps({"virtual-size": size, "format": "qcow2"}))
    assert parse_qemu_img_info(json.dumps({"virtual-size": 1 << 60})) == 1 << 60


# -- the trimmer turns all of it into not_measured -------------------------------------


def test_trimmer_records_hostile_images_as_not_measured(tmp_path: Path) -> None:
    loop_a = _qcow2(tmp_path / "loop-a.qcow2")
    loop_b = _qcow2(tmp_path / "loop-b.qcow2", "-u", "-F", "qcow2", "-b", str(loop_a))
    _rebase_unsafe(loop_a, loop_b)
    corrupt = _patched(_qcow2(tmp_path / "corrupt.qcow2"), cluster_bits=31)
    endless = tmp_path / "endless.qcow2"
    os.mkfifo(endless)
    disks = [
        Disk("sda", "scsi", "disk", "file", str(loop_a), "qcow2", "unmap", None),
        Disk("sdb", "scsi", "disk", "file", str(corrupt), "qcow2", "unmap", None),
        Disk("sdc", "scsi", "disk", "file", str(endless), "qcow2", "unmap", None),
        Disk("sdd", "scsi", "disk", "file", str(tmp_path / "gone.qcow2"), "qcow2", "unmap", None),
    ]
    measurer = Measurer(QemuImgLimits(timeout_seconds=1.0))
    trimmer = DomainTrimmer(Hypervisor("test:///default"), measurer)
    records = {r.disk: r for r in trimmer.measure_disks(disks)}
    assert records["sda"].not_measured is None
    assert records["sda"].allocated_before == os.stat(loop_a).st_blocks * 512
    for target, expected in (
        ("sdb", "qemu-img info failed"),
        ("sdc", "timed out"),
        ("sdd", "cannot stat"),
    ):
        rec = records[target]
        assert rec.allocated_before is None and rec.not_measured, rec
        assert expected in rec.not_measured, rec
