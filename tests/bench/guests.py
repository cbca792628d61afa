"""The benchmark's own rig guests, `vtrimd-test-bench-NN`, and fresh garbage in them.

Guests are booted on demand (N=1, then up to 8, then up to 20) in small batches, so
TCG boots do not starve each other on a 2-core host. Half have a qcow2 disk on
virtio-scsi, half a raw disk on virtio-blk, all with discard='unmap'.

Garbage: before every measured sweep each guest writes GARBAGE_MIB of zeros to a file
on each data disk, fsyncs, deletes it and syncs (the rig mounts without `discard`),
so the host image holds GARBAGE_MIB more than the guest uses until a trim. No
detect_zeroes in the rig XML, so zeros are allocated like any data.
"""

from __future__ import annotations

import logging
import os
import shutil
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import rig
from rig import DiskSpec, GuestHandle, GuestSpec

log = logging.getLogger(__name__)

PREFIX = rig.session_prefix() + "bench-"
GARBAGE_MIB = 128
MEMORY_MIB = 160
BOOT_BATCH = 4
MIB = 1 << 20
# Where libvirt keeps real images. The packaged unit's PrivateTmp hides /tmp and /var/tmp
# from the service, so guests the `system` benchmark's containers measure live here.
IMAGES = Path("/var/lib/libvirt/images")


def spec_for(index: int) -> GuestSpec:
    """Guest `index` (1-based): alternately qcow2/scsi and raw/virtio, 512 MiB disk."""
    if index % 2:
        disk = DiskSpec(fmt="qcow2", bus="scsi", discard="unmap", garbage_mib=0, size_mib=512)
    else:
        disk = DiskSpec(fmt="raw", bus="virtio", discard="unmap", garbage_mib=0, size_mib=512)
    return GuestSpec(f"bench-{index:02d}", disks=(disk,), memory_mib=MEMORY_MIB)


def garbage_command(mib: int) -> list[str]:
    return [
        "/bin/sh",
        "-c",
        "for m in /mnt/*; do "
        f"dd if=/dev/zero of=$m/bench-garbage bs=1M count={mib} conv=fsync 2>/dev/null "
        "|| exit 1; done; rm -f /mnt/*/bench-garbage; sync",
    ]


class GuestPool:
    """Boots, feeds garbage to and finally removes the benchmark guests."""

    def __init__(self, workdir: Path) -> None:
        # Under IMAGES when it exists (one directory per process, removed by close()),
        # else in the scratch directory.
        if IMAGES.is_dir():
            self.workdir = IMAGES / f"{PREFIX}{os.getpid()}"
        else:
            self.workdir = workdir / "guests"
        self.handles: list[GuestHandle] = []
        self._conn: Any = None
        self._boot: rig.BootFiles | None = None
        self.boot_seconds: dict[int, float] = {}
        self._pending: list[str] = []
        # Guests a benchmark made itself (e.g. sparsify's shut-off one), removed in close().
        self.extra_domains: list[str] = []

    def open(self) -> None:
        """Connect to qemu:///system and build (or reuse) the rig boot files; RigError."""
        import libvirt

        rig.quiet_libvirt_errors()
        rig.ensure_libvirtd()
        self._boot = rig.build_boot_files(rig.default_cache_dir())
        self._conn = libvirt.open(rig.LIBVIRT_URI)
        rig.cleanup_test_domains(self._conn)  # only guests of exited processes

    @property
    def conn(self) -> Any:
        if self._conn is None:
            self.open()
        return self._conn

    def ensure(self, count: int) -> list[GuestHandle]:
        """The first `count` benchmark guests, booting the missing ones; RigError."""
        conn = self.conn
        assert self._boot is not None
        while len(self.handles) < count:
            first = len(self.handles) + 1
            last = min(count, first + BOOT_BATCH - 1)
            specs = [spec_for(i) for i in range(first, last + 1)]
            t0 = time.monotonic()
            # Named before they start, so close() removes them even if the boot fails.
            self._pending = [s.domain_name for s in specs]
            self.handles += rig.start_guests(conn, specs, self.workdir, self._boot, timeout_s=300)
            self._pending = []
            self.boot_seconds[last] = round(time.monotonic() - t0, 1)
            log.info("booted %s in %.1fs", [s.domain_name for s in specs], time.monotonic() - t0)
        return self.handles[:count]

    def make_garbage(self, handles: list[GuestHandle], mib: int = GARBAGE_MIB) -> None:
        """Fresh garbage in every guest (in parallel); RigError if an image did not grow."""
        before = {img: rig.allocated_bytes(img) for h in handles for img in h.images}

        def one(h: GuestHandle) -> None:
            rig.guest_exec(h.dom, garbage_command(mib), timeout_s=300)

        with ThreadPoolExecutor(max_workers=4) as pool:
            list(pool.map(one, handles))
        short = [
            f"{img.name}: +{(rig.allocated_bytes(img) - b) // MIB} MiB"
            for img, b in before.items()
            if rig.allocated_bytes(img) - b < mib * MIB * 0.8
        ]
        if short:
            raise rig.RigError("garbage did not reach the host images: " + ", ".join(short))

    def other_running_domains(self) -> list[str]:
        """Running domains that are not this pool's: other people's, seen by the census."""
        mine = {h.name for h in self.handles}
        active = self.conn.listAllDomains(1)  # VIR_CONNECT_LIST_DOMAINS_ACTIVE
        return sorted(d.name() for d in active if d.name() not in mine)

    def close(self) -> None:
        """Destroy every benchmark guest this process started."""
        if self._conn is None:
            return
        names = [h.name for h in self.handles] + self._pending + self.extra_domains
        for name in names:
            try:
                rig.destroy_guest(self._conn, name)
            except rig.RigError as exc:
                log.warning("cleanup: %s", exc)
        self.handles = []
        self.extra_domains = []
        self._conn.close()
        self._conn = None
        if self.workdir.is_relative_to(IMAGES):
            shutil.rmtree(self.workdir, ignore_errors=True)
