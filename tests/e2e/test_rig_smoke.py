"""The rig's own proof: garbage + guest fstrim through libvirt shrinks a real image.

These check the rig, not virt-trimd: if they fail, every product e2e test is suspect.
"""

from __future__ import annotations

import json
import time
from collections.abc import Callable

import libvirt
import libvirt_qemu
import pytest

import rig
from rig import DiskSpec, GuestSpec

MIB = 1024 * 1024


def test_guest_fstrim_reclaims_deleted_garbage(
    guest_factory: rig.GuestFactory, record_property: Callable[[str, object], None]
) -> None:
    spec = GuestSpec(
        "smoke-trim",
        disks=(DiskSpec(fmt="qcow2", bus="scsi", discard="unmap", garbage_mib=200),),
    )
    t0 = time.monotonic()
    (guest,) = guest_factory(spec)
    boot_seconds = time.monotonic() - t0
    image = guest.images[0]

    assert rig.agent_command(guest.dom, "guest-ping", timeout_s=5) == {}
    before = rig.allocated_bytes(image)
    # The guest deleted the garbage at boot, but nothing has trimmed yet: still allocated.
    assert before >= 200 * MIB, f"garbage not allocated in {image}: {before} bytes"

    fstrim = json.dumps({"execute": "guest-fstrim"})
    reply = libvirt_qemu.qemuAgentCommand(guest.dom, fstrim, 120, 0)
    after = rig.allocated_bytes(image)

    paths = json.loads(reply)["return"]["paths"]
    assert [p for p in paths if "error" in p] == []
    reclaimed = before - after
    record_property("boot_to_ready_seconds", round(boot_seconds, 1))
    record_property("allocated_before_bytes", before)
    record_property("allocated_after_bytes", after)
    record_property("reclaimed_bytes", reclaimed)
    print(f"boot+images {boot_seconds:.1f}s; {before} -> {after} bytes, reclaimed {reclaimed}")
    assert reclaimed >= 150 * MIB


def test_channel_without_agent_fails_fast(guest_factory: rig.GuestFactory) -> None:
    spec = GuestSpec(
        "smoke-noagent", disks=(DiskSpec(garbage_mib=10, size_mib=128),), agent="channel_only"
    )
    (guest,) = guest_factory(spec)  # waits for the boot marker on the console

    t0 = time.monotonic()
    with pytest.raises(libvirt.libvirtError) as err:
        rig.agent_command(guest.dom, "guest-ping", timeout_s=5)
    assert time.monotonic() - t0 < 10
    assert err.value.get_error_code() == libvirt.VIR_ERR_AGENT_UNRESPONSIVE


def test_guestinfo_maps_filesystems_to_disks_on_every_bus(
    guest_factory: rig.GuestFactory,
) -> None:
    # Distinct sizes identify each disk independently of guest device names, which do
    # not follow the libvirt targets (the guest may call the SATA disk sdc).
    disks = (
        DiskSpec(fmt="raw", bus="sata", garbage_mib=0, size_mib=160),
        DiskSpec(fmt="qcow2", bus="scsi", garbage_mib=0, size_mib=224),
        DiskSpec(fmt="qcow2", bus="virtio", garbage_mib=0, size_mib=288),
    )
    (guest,) = guest_factory(GuestSpec("smoke-fsinfo", disks=disks))
    info = guest.dom.guestInfo(libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM, 0)

    target_by_size = {d.size_mib: t for d, t in zip(disks, ("sda", "sdb", "vda"), strict=True)}
    mapped = {}
    for i in range(info["fs.count"]):
        size_mib = round(info[f"fs.{i}.total-bytes"] / MIB)
        # ext4 overhead: match the nearest disk size above the filesystem's usable size.
        disk_size = min(s for s in target_by_size if s >= size_mib)
        mapped[target_by_size[disk_size]] = info.get(f"fs.{i}.disk.0.alias")
    assert mapped == {"sda": "sda", "sdb": "sdb", "vda": "vda"}
