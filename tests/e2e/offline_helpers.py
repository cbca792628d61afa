"""Shared by the offline (virt-sparsify) e2e tests: a guest that deleted garbage, then stopped.

libguestfs picks KVM when /dev/kvm exists and its appliance hangs on these machines;
the tests pass LIBGUESTFS_BACKEND_SETTINGS=force_tcg through the product's
`offline.environment`, never through the product's code.
"""

from __future__ import annotations

import hashlib
from pathlib import Path

import libvirt

import rig

MIB = 1 << 20
KEEP_MIB = 8
TCG_ENVIRONMENT = "[LIBGUESTFS_BACKEND_SETTINGS=force_tcg]"
OFFLINE_SECTION = f"offline:\n  timeout: 10m\n  environment: {TCG_ENVIRONMENT}\n"


def sha256(path: Path) -> str:
    """Checksum of a host file (an image that must not change)."""
    digest = hashlib.sha256()
    with path.open("rb") as fh:
        for block in iter(lambda: fh.read(4 * MIB), b""):
            digest.update(block)
    return digest.hexdigest()


def guest_checksums(dom: libvirt.virDomain) -> dict[str, str]:
    """sha256 of keep.bin on every mounted data disk, as the guest computes it."""
    out = rig.guest_exec(dom, ["/bin/sh", "-c", "sha256sum /mnt/*/keep.bin"])
    sums = {}
    for line in out.splitlines():
        digest, name = line.split()
        sums[name] = digest
    return sums


def write_keep_files_and_stop(handle: rig.GuestHandle) -> dict[str, str]:
    """In the booted guest (garbage deleted without discard): write keep.bin, sync, stop.

    Returns the guest's checksums of keep.bin, to compare after an offline reclaim.
    """
    rig.guest_exec(
        handle.dom,
        [
            "/bin/sh",
            "-c",
            f"for m in /mnt/*; do dd if=/dev/urandom of=$m/keep.bin bs=1M count={KEEP_MIB}"
            " 2>/dev/null; done; sync",
        ],
    )
    sums = guest_checksums(handle.dom)
    rig.guest_exec(handle.dom, ["/bin/sync"])
    handle.dom.destroy()
    return sums
