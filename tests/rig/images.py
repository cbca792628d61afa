"""Disk images for rig guests: ext4 with a file of garbage that the guest deletes at boot."""

from __future__ import annotations

import os
import tempfile
from pathlib import Path
from typing import Literal

from rig.host import RigError, require_tools, run

ImageFormat = Literal["qcow2", "raw"]

MIB = 1024 * 1024


def allocated_bytes(path: Path) -> int:
    """Bytes the host filesystem has allocated for path (st_blocks * 512)."""
    return os.stat(path).st_blocks * 512


def _write_random(path: Path, mib: int) -> None:
    # Random, not zeros: qemu-img convert skips zero clusters and ext4 would not
    # need a trim to give them back, so the test would prove nothing.
    with path.open("wb") as fh:
        for _ in range(mib):
            fh.write(os.urandom(MIB))


def make_disk_image(
    path: Path,
    fmt: ImageFormat,
    size_mib: int = 1024,
    garbage_mib: int = 200,
    label: str = "data",
) -> None:
    """Create an ext4 image at path holding garbage.bin of garbage_mib MiB of random data.

    raw images stay sparse; qcow2 images are converted from a temporary raw file.
    Raises RigError when mkfs/qemu-img fail or the garbage does not fit.
    """
    if fmt not in ("qcow2", "raw"):
        raise RigError(f"unknown image format {fmt!r}: use 'qcow2' or 'raw'")
    # Only the obvious case: mkfs reports the subtler ones (ext4 metadata overhead).
    if garbage_mib >= size_mib:
        raise RigError(f"{garbage_mib} MiB of garbage does not fit a {size_mib} MiB image")
    require_tools("mkfs.ext4", "qemu-img")
    path.parent.mkdir(parents=True, exist_ok=True)
    raw = path if fmt == "raw" else path.with_name(path.name + ".tmp.raw")
    try:
        with tempfile.TemporaryDirectory(dir=path.parent, prefix=".content-") as content:
            if garbage_mib > 0:
                _write_random(Path(content) / "garbage.bin", garbage_mib)
            raw.unlink(missing_ok=True)
            with raw.open("wb") as fh:
                fh.truncate(size_mib * MIB)
            # nodiscard: mkfs must not punch the file; lazy init off: otherwise the guest
            # kernel zeroes inode tables in the background after mount and the host
            # allocation drifts while a test measures it.
            run(
                [
                    "mkfs.ext4",
                    "-q",
                    "-F",
                    "-L",
                    label,
                    "-E",
                    "nodiscard,lazy_itable_init=0,lazy_journal_init=0",
                    "-d",
                    content,
                    raw,
                ]
            )
        if fmt == "qcow2":
            run(["qemu-img", "convert", "-f", "raw", "-O", "qcow2", raw, path])
        else:
            # mkfs writes the journal and inode tables as explicit zeros (~48 MiB per GiB);
            # punch them out so a raw image starts as sparse as its qcow2 twin.
            run(["fallocate", "--dig-holes", raw])
    finally:
        if raw != path:
            raw.unlink(missing_ok=True)
