"""`virt-trimd sparsify` on the real rig: real libvirtd, QEMU (TCG) and virt-sparsify.

Each virt-sparsify run boots the libguestfs appliance (~24 s, ~575 MB here), so the
cases share booted work where that keeps each honest: one shut-off domain with a qcow2
and a raw disk is sparsified once (two appliance boots), and the guest start attempted
during that run is the "started while sparsifying" case. The guards that must refuse
(shared, shareable, read-only, backing file, overlay, snapshots) refuse before any
appliance boots, so they cost no boot at all; the running-guest case reuses the data
guest after its verification boot.

libguestfs picks KVM when /dev/kvm exists and its appliance hangs here; the tests pass
LIBGUESTFS_BACKEND_SETTINGS=force_tcg through the product's `offline.environment`.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

import rig
from e2e.helpers import MIB, QCOW2_CLUSTER, record_of, stat_allocated
from e2e.offline_helpers import (
    OFFLINE_SECTION,
    guest_checksums,
    sha256,
    write_keep_files_and_stop,
)
from support.cli import cli_env, virt_trimd
from support.files import write_config

GARBAGE_MIB = 120

OFFLINE_CONFIG = "state_dir: {state_dir}\n" + OFFLINE_SECTION


def offline_config(directory: Path) -> Path:
    """A config whose libguestfs runs under TCG (see the module docstring)."""
    return write_config(
        directory / "config.yaml", OFFLINE_CONFIG.format(state_dir=directory / "state")
    )


def sparsify_json(config: Path, *args: str, timeout: float = 900) -> tuple[int, dict[str, Any]]:
    proc = virt_trimd("sparsify", "--config", str(config), "--json", *args, timeout=timeout)
    try:
        return proc.returncode, json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}") from exc


def held_by_ofd_lock(path: Path) -> bool:
    """True while some process holds an OFD lock (QEMU's image lock) on path's inode.

    Read from /proc/locks, so watching for the lock never takes it: a `qemu-img info`
    probe would itself hold the lock for a moment and could make the appliance fail.
    """
    ino = path.stat().st_ino
    for line in Path("/proc/locks").read_text().splitlines():
        fields = line.split()
        if "OFDLCK" in fields and any(f.endswith(f":{ino}") for f in fields):
            return True
    return False


@dataclass
class DataGuest:
    handle: rig.GuestHandle
    config: Path
    checksums: dict[str, str]


@pytest.fixture(scope="module")
def data_guest(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[DataGuest]:
    """A shut-off domain (qcow2 + raw) whose guest deleted its garbage without discard.

    Booted once so that the guest itself deletes garbage.bin (its mounts have no
    discard: the host keeps the blocks) and writes keep.bin, whose checksum the guest
    reports; then synced and stopped.
    """
    workdir = tmp_path_factory.mktemp("sparsify")
    spec = rig.GuestSpec(
        "sp-data",
        disks=(
            rig.DiskSpec(fmt="qcow2", bus="scsi", garbage_mib=GARBAGE_MIB, size_mib=512),
            rig.DiskSpec(fmt="raw", bus="virtio", garbage_mib=GARBAGE_MIB, size_mib=512),
        ),
    )
    try:
        (handle,) = rig.start_guests(libvirt_conn, [spec], workdir / "guests", rig_boot)
        checksums = write_keep_files_and_stop(handle)
        assert len(checksums) == 2, checksums
        yield DataGuest(handle, offline_config(workdir / "cfg"), checksums)
    finally:
        rig.destroy_guest(libvirt_conn, spec.domain_name)


def test_sparsify_reclaims_qcow2_and_raw_and_a_guest_started_meanwhile_fails_to_start(
    data_guest: DataGuest,
) -> None:
    handle = data_guest.handle
    images = handle.images
    assert not handle.dom.isActive()
    before = {str(p): stat_allocated(p) for p in images}
    sums_before = {str(p): sha256(p) for p in images}
    # Both images still hold the garbage the guest deleted.
    assert all(b >= GARBAGE_MIB * MIB for b in before.values()), before

    # Dry run: every check and a measurement, nothing written.
    code, doc = sparsify_json(data_guest.config, "--dry-run", handle.name)
    assert code == 0, doc
    rec = record_of(doc, handle.name)
    assert rec["result"] == "skipped" and rec["method"] == "sparsify", rec
    assert "dry run" in rec["message"]
    assert {str(p): sha256(p) for p in images} == sums_before

    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "virt_trimd",
            "sparsify",
            "--config",
            str(data_guest.config),
            "--json",
            handle.name,
        ],
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        env=cli_env(),
    )
    try:
        # While the appliance holds the first image, try to start the guest: QEMU must
        # refuse to share the image (its lock), so the start fails.
        deadline = time.monotonic() + 300
        while not held_by_ofd_lock(images[0]):
            assert proc.poll() is None, proc.communicate()
            assert time.monotonic() < deadline, "virt-sparsify never opened the image"
            time.sleep(0.1)
        with pytest.raises(libvirt.libvirtError) as started:
            handle.dom.create()
        assert "lock" in str(started.value), str(started.value)
        assert not handle.dom.isActive()
        out, err = proc.communicate(timeout=900)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, f"{out}\n{err}"
    rec = record_of(json.loads(out), handle.name)
    assert rec["result"] == "success", rec
    assert rec["method"] == "sparsify"
    for disk in rec["disks"]:
        after = stat_allocated(Path(disk["path"]))
        measured = before[disk["path"]] - after
        assert disk["allocated_after"] == after
        assert abs(disk["reclaimed_bytes"] - measured) <= QCOW2_CLUSTER, (disk, measured)
        assert measured >= (GARBAGE_MIB - 8) * MIB, (disk["format"], measured)
    assert {d["format"] for d in rec["disks"]} == {"qcow2", "raw"}

    # The filesystems are intact: the guest boots and reads back what it wrote.
    handle.dom.create()
    rig.wait_for_agent(handle.dom)
    assert guest_checksums(handle.dom) == data_guest.checksums

    # Running now: the command refuses it, and QEMU's lock stops virt-sparsify itself
    # (called directly, past our own state check) before it writes anything.
    allocated = {str(p): stat_allocated(p) for p in images}
    code, doc = sparsify_json(data_guest.config, handle.name)
    assert code == 0, doc
    rec = record_of(doc, handle.name)
    assert rec["result"] == "skipped" and "running" in rec["message"], rec
    assert rec["disks"] == [], rec

    from virt_trimd.host.sparsify import SparsifyError, run_sparsify
    from virt_trimd.records import SparsifyLimits

    limits = SparsifyLimits(
        timeout_seconds=120, environment=(("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg"),)
    )
    with pytest.raises(SparsifyError) as refused:
        run_sparsify(str(images[0]), "qcow2", limits)
    assert refused.value.kind == "locked", refused.value.message
    assert "in use by another process" in refused.value.message
    assert {str(p): stat_allocated(p) for p in images} == allocated
    handle.dom.destroy()


def _define(
    conn: libvirt.virConnect, boot: rig.BootFiles, name: str, images: list[Path], edit: str = ""
) -> str:
    """Define (never start) a rig domain on `images`; `edit` goes inside each <disk>."""
    disks = tuple(rig.DiskSpec(fmt="raw" if p.suffix == ".raw" else "qcow2") for p in images)
    spec = rig.GuestSpec(name, disks=disks)
    xml = rig.domain_xml(spec, boot, images, images[0].parent / f"{spec.domain_name}.log")
    if edit:
        xml = xml.replace("</disk>", f"{edit}</disk>")
    conn.defineXML(xml)
    return spec.domain_name


def _qemu_img(*args: str) -> None:
    subprocess.run(["qemu-img", *args], check=True, capture_output=True)


def test_guards_refuse_shared_shareable_readonly_backing_overlay_and_snapshots(
    libvirt_conn: libvirt.virConnect, rig_boot: rig.BootFiles, tmp_path: Path
) -> None:
    d = tmp_path / "images"
    d.mkdir()
    paths = {
        n: d / f"vtrimd-test-{n}.qcow2"
        for n in ("shared", "shareable", "readonly", "base", "base2", "snap")
    }
    # libvirt allows <shareable/> only on raw images.
    paths["shareable"] = paths["shareable"].with_suffix(".raw")
    for p in paths.values():
        _qemu_img("create", "-q", "-f", p.suffix[1:], str(p), "64M")
    # An overlay on `base` that no domain uses, beside it; and an overlay a domain uses.
    _qemu_img(
        "create",
        "-q",
        "-f",
        "qcow2",
        "-b",
        paths["base"].name,
        "-F",
        "qcow2",
        str(d / "vtrimd-test-unused-overlay.qcow2"),
    )
    overlay = d / "vtrimd-test-overlay.qcow2"
    _qemu_img("create", "-q", "-f", "qcow2", "-b", str(paths["base2"]), "-F", "qcow2", str(overlay))
    _qemu_img("snapshot", "-c", "s1", str(paths["snap"]))
    names: list[str] = []
    try:
        doms = {
            short: _define(libvirt_conn, rig_boot, short, images, edit)
            for short, images, edit in (
                ("sp-shared-a", [paths["shared"]], ""),
                ("sp-shared-b", [paths["shared"]], ""),
                ("sp-shareable", [paths["shareable"]], "<shareable/>"),
                ("sp-readonly", [paths["readonly"]], "<readonly/>"),
                ("sp-base", [paths["base"]], ""),
                ("sp-overlay", [overlay], ""),
                ("sp-snap", [paths["snap"]], ""),
            )
        }
        names += doms.values()
        files = [*paths.values(), overlay]
        sums = {p: sha256(p) for p in files}
        config = offline_config(tmp_path / "cfg")
        code, doc = sparsify_json(config, *names)
        assert code == 0, doc
        expected = {
            "sp-shared-a": f"also a disk of domain(s) {doms['sp-shared-b']}",
            "sp-shared-b": f"also a disk of domain(s) {doms['sp-shared-a']}",
            "sp-shareable": "shareable disk",
            "sp-readonly": "read-only disk",
            "sp-base": "backing file of",
            "sp-overlay": "overlay on a backing file",
            "sp-snap": "internal snapshot",
        }
        for short, reason in expected.items():
            rec = record_of(doc, doms[short])
            assert rec["result"] == "skipped", rec
            assert reason in rec["message"], rec
            (disk,) = rec["disks"]
            assert disk["not_measured"].startswith("not sparsified: "), disk
        assert "unused-overlay" in record_of(doc, doms["sp-base"])["message"]
        # The base of a domain's overlay is that overlay's backing file, too.
        assert {p: sha256(p) for p in files} == sums
    finally:
        for name in names:
            libvirt_conn.lookupByName(name).undefine()
