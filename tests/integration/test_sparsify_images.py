"""host/sparsify against real files: qcow2 headers qemu-img wrote, lock probes, leftovers."""

from __future__ import annotations

import subprocess
import time
from pathlib import Path

import pytest

from virt_trimd.host import sparsify
from virt_trimd.host.sparsify import SparsifyError, image_facts, image_lock_conflict, run_sparsify
from virt_trimd.records import QemuImgLimits, SparsifyLimits


def test_image_facts_reads_the_qcow2_header(tmp_path: Path) -> None:
    import subprocess

    base = tmp_path / "base.qcow2"
    over = tmp_path / "over.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(base), "16M"], check=True)
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", "-b", "base.qcow2", "-F", "qcow2", str(over)],
        check=True,
    )
    subprocess.run(["qemu-img", "snapshot", "-c", "s1", str(base)], check=True)
    facts = image_facts(str(base))
    assert facts.qcow2 and facts.snapshots == 1 and facts.backing_file is None
    assert image_facts(str(over)).backing_file == "base.qcow2"
    raw = tmp_path / "x.raw"
    raw.write_bytes(b"\0" * 4096)
    assert not image_facts(str(raw)).qcow2


def test_lock_probe_sees_a_qemu_holding_the_image(tmp_path: Path) -> None:
    img = tmp_path / "held.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "16M"], check=True)
    assert image_lock_conflict(str(img), "qcow2", QemuImgLimits()) is None
    qemu = subprocess.Popen(
        [
            "qemu-system-x86_64", "-machine", "none", "-S", "-display", "none",
            "-monitor", "none", "-serial", "none",
            "-drive", f"file={img},format=qcow2,if=none,id=d0",
        ]
    )  # fmt: skip
    try:
        deadline = time.monotonic() + 30
        conflict = None
        while conflict is None and time.monotonic() < deadline and qemu.poll() is None:
            conflict = image_lock_conflict(str(img), "qcow2", QemuImgLimits())
            time.sleep(0.1)
        assert conflict is not None and "lock" in conflict
    finally:
        qemu.terminate()
        qemu.wait()


def test_stale_socket_dirs_of_a_killed_run_are_removed(tmp_path: Path, monkeypatch: object) -> None:

    assert isinstance(monkeypatch, pytest.MonkeyPatch)
    monkeypatch.setattr(sparsify, "SOCKDIR_PARENT", tmp_path)
    (tmp_path / "libguestfsOLD").mkdir()
    before = sparsify._sockdirs()
    started = time.time()
    (tmp_path / "libguestfsNEW").mkdir()
    (tmp_path / "libguestfsNEW" / "guestfsd.sock").touch()
    (tmp_path / "unrelated").mkdir()
    removed = sparsify.remove_stale_sockdirs(before, started)
    assert removed == [str(tmp_path / "libguestfsNEW")]
    assert (tmp_path / "libguestfsOLD").exists() and (tmp_path / "unrelated").exists()


def test_a_run_past_its_timeout_is_killed_and_leaves_nothing_in_tmp(tmp_path: Path) -> None:
    """A real virt-sparsify stopped during its appliance boot: no sockets, no QEMU left."""
    img = tmp_path / "slow.qcow2"
    subprocess.run(["qemu-img", "create", "-q", "-f", "qcow2", str(img), "64M"], check=True)
    before = sparsify._sockdirs()
    limits = SparsifyLimits(
        timeout_seconds=3, environment=(("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"),)
    )
    with pytest.raises(SparsifyError) as stopped:
        run_sparsify(str(img), "qcow2", limits)
    assert stopped.value.kind == "timeout", stopped.value.message
    # libguestfs's own recovery process takes the appliance's QEMU down within a second.
    deadline = time.monotonic() + 30
    while sparsify._in_use([str(img)]) and time.monotonic() < deadline:
        time.sleep(0.2)
    assert not sparsify._in_use([str(img)]), "a process still names the image"
    assert sparsify._sockdirs() - before == set()
    assert image_lock_conflict(str(img), "qcow2", QemuImgLimits()) is None
