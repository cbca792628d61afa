#!/usr/bin/env python3
"""`make demo`: boot a throwaway guest, trim it for real, show the table and metrics.

Everything is real: libvirtd, QEMU (TCG), a guest kernel running qemu-ga, a sparse
qcow2 image holding 200 MiB of deleted garbage. The guest is removed at the end.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT / "daemon"), str(ROOT / "tests")]

import libvirt  # noqa: E402

import rig  # noqa: E402
from rig import DiskSpec, GuestSpec  # noqa: E402
from virt_trimd.engine.history import History  # noqa: E402


def cli(*args: str) -> int:
    """Run virt-trimd from this checkout, output straight to the terminal."""
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"))
    print(f"\n$ virt-trimd {' '.join(args)}", flush=True)
    return subprocess.run(
        [sys.executable, "-m", "virt_trimd", *args], env=env, check=False
    ).returncode


# Garbage deleted at boot, and how far a qcow2 measurement may differ from os.stat's.
GARBAGE_BYTES = 200 << 20
QCOW2_CLUSTER = 64 << 10


def check_against_os_stat(state_dir: Path, domain: str, independent: int) -> int:
    """0 when virt-trimd's recorded reclaim is what os.stat saw, and most of the garbage."""
    with History(state_dir, readonly=True) as hist:
        records = hist.query(domain=domain)
    reported = sum(r.reclaimed_bytes for r in records if not r.dry_run)
    print(f"virt-trimd recorded {reported} bytes reclaimed; os.stat saw {independent}")
    if abs(reported - independent) > QCOW2_CLUSTER:
        print("demo FAILED: virt-trimd's number differs from os.stat's", file=sys.stderr)
        return 1
    if independent < GARBAGE_BYTES * 3 // 4:
        print(
            f"demo FAILED: only {independent} of {GARBAGE_BYTES} garbage bytes came back",
            file=sys.stderr,
        )
        return 1
    return 0


def main() -> int:
    rig.quiet_libvirt_errors()
    rig.ensure_libvirtd()
    boot = rig.build_boot_files(rig.default_cache_dir())
    conn = libvirt.open(rig.LIBVIRT_URI)
    spec = GuestSpec("demo", disks=(DiskSpec(fmt="qcow2", bus="scsi", discard="unmap"),))
    with tempfile.TemporaryDirectory(prefix="virt-trimd-demo-") as tmp:
        work = Path(tmp)
        try:
            print(
                "booting a throwaway TCG guest (qcow2 on virtio-scsi, discard=unmap; "
                "it deletes 200 MiB of garbage at boot)...",
                flush=True,
            )
            (guest,) = rig.start_guests(conn, [spec], work / "guest", boot)
            image = guest.images[0]
            before = os.stat(image).st_blocks * 512
            config = work / "config.yaml"
            config.write_text(
                f"state_dir: {work / 'state'}\n"
                "schedules:\n"
                "  - name: demo\n"
                "    every: 1d\n"
                f"    domains: [{guest.name!r}]\n"
                "    timeout: 2m\n"
            )
            status = cli("trim", "--dry-run", guest.name)
            status |= cli("run", "--once", "--config", str(config), "--print-metrics")
            after = os.stat(image).st_blocks * 512
            cli("history", "--state-dir", str(work / "state"))
            print(
                f"\nindependent os.stat of {image.name}: {before} -> {after} bytes "
                f"({(before - after) / 2**20:.1f} MiB given back to the host)"
            )
            return status | check_against_os_stat(work / "state", guest.name, before - after)
        finally:
            rig.destroy_guest(conn, spec.domain_name)
            conn.close()


if __name__ == "__main__":
    sys.exit(main())
