"""measure: real sparse files and real qemu-img, checked against independent os.stat."""

from __future__ import annotations

import os
import subprocess
from pathlib import Path

import pytest

from virt_trimd.host.measure import (
    CommandError,
    MeasureError,
    Measurer,
    limited_argv,
    qemu_img_info_argv,
    run_command,
)
from virt_trimd.records import QemuImgLimits

MiB = 1 << 20


def _sparse(path: Path, size: int, data_at: int = 0, data_len: int = 4 * MiB) -> None:
    with open(path, "wb") as f:
        f.truncate(size)
        f.seek(data_at)
        f.write(os.urandom(data_len))


def test_raw_allocation_matches_stat_and_needs_no_qemu_img(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    _sparse(img, 1 << 30)
    m = Measurer()
    alloc = m.allocation(str(img), "raw")
    st = os.stat(img)
    assert alloc.allocated_bytes == st.st_blocks * 512
    assert 4 * MiB <= alloc.allocated_bytes < 1 << 30  # sparse: far below the size
    assert alloc.file_bytes == alloc.virtual_bytes == 1 << 30
    assert m.qemu_img_runs == 0


def test_qcow2_virtual_size_from_qemu_img_and_cached(tmp_path: Path) -> None:
    img = tmp_path / "disk.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "3G"], check=True)
    m = Measurer()
    first = m.allocation(str(img), "qcow2")
    assert first.virtual_bytes == 3 << 30
    assert first.file_bytes == os.stat(img).st_size < MiB
    m.allocation(str(img), "qcow2")
    assert m.qemu_img_runs == 1  # second call served from the cache
    m.forget(set())
    m.allocation(str(img), "qcow2")
    assert m.qemu_img_runs == 2


def test_punching_a_hole_shows_in_allocation(tmp_path: Path) -> None:
    img = tmp_path / "disk.raw"
    _sparse(img, 64 * MiB, 0, 32 * MiB)
    m = Measurer()
    before = m.allocation(str(img), "raw").allocated_bytes
    subprocess.run(
        ["fallocate", "--punch-hole", "-o", "0", "-l", str(16 * MiB), str(img)], check=True
    )
    after = m.allocation(str(img), "raw").allocated_bytes
    assert before - after == 16 * MiB


def test_format_is_always_forced() -> None:
    argv = qemu_img_info_argv("/x -f raw", "qcow2")
    assert argv[argv.index("-f") + 1] == "qcow2" and argv[-2:] == ("--", "/x -f raw")
    limited = limited_argv(argv, QemuImgLimits(cpu_seconds=3, address_space_bytes=1234))
    assert "--cpu=3" in limited and "--as=1234" in limited and limited[-len(argv) :] == argv


def test_raw_file_posing_as_qcow2_is_not_probed(tmp_path: Path) -> None:
    # A guest can write a qcow2 header into its raw disk; with -f raw we never parse it.
    evil = tmp_path / "evil.raw"
    subprocess.run(
        [
            "qemu-img",
            "create",
            "-q",
            "-f",
            "qcow2",
            "-b",
            "/etc/shadow",
            "-F",
            "raw",
            str(evil),
            "1G",
        ],
        check=True,
    )
    m = Measurer()
    alloc = m.allocation(str(evil), "raw")
    assert alloc.virtual_bytes == os.stat(evil).st_size  # raw semantics, not 1G


def test_corrupt_qcow2_is_a_measure_error(tmp_path: Path) -> None:
    bad = tmp_path / "bad.qcow2"
    bad.write_bytes(b"QFI\xfb" + os.urandom(4096))
    with pytest.raises(MeasureError):
        Measurer().allocation(str(bad), "qcow2")


def test_missing_file_names_the_path(tmp_path: Path) -> None:
    with pytest.raises(MeasureError, match=r"gone\.qcow2"):
        Measurer().allocation(str(tmp_path / "gone.qcow2"), "qcow2")


def test_command_timeout_is_a_typed_error() -> None:
    with pytest.raises(CommandError, match="timed out"):
        run_command(["sleep", "5"], 0.2)


def test_address_space_limit_kills_a_greedy_child() -> None:
    argv = limited_argv(
        ["python3", "-c", "x = bytearray(512 * 1024 * 1024)"],
        QemuImgLimits(address_space_bytes=256 * MiB),
    )
    with pytest.raises(CommandError):
        run_command(argv, 30)
