"""Host-side measurement of disk images: the only module that runs qemu-img.

Allocated bytes come from `os.stat` (`st_blocks * 512`): that is what falls when
QEMU punches holes after a guest discard. libvirt's bulk-stats `allocation` is
the highest written offset for qcow2 and never falls, so it is useless here.
"""

from __future__ import annotations

import json
import logging
import os
import shutil
import subprocess
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass

from virt_trimd.host.agent import MAX_SANE_BYTES
from virt_trimd.records import Allocation, QemuImgLimits

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.measure")


class MeasureError(Exception):
    """An image could not be measured; the message says why."""


class CommandError(MeasureError):
    """An external command failed, timed out or was killed by its limits."""


def qemu_img_info_argv(path: str, fmt: str) -> tuple[str, ...]:
    """argv for `qemu-img info` on the active layer only.

    `-f` is always given: letting qemu-img probe the format of a guest-writable
    raw image lets the guest pose as qcow2 with a backing file of its choosing.
    `--force-share` because a running QEMU holds the image lock. No
    `--backing-chain`: a hostile chain must not make us open arbitrary files.
    """
    return ("qemu-img", "info", "--output=json", "--force-share", "-f", fmt, "--", path)


def limited_argv(argv: Sequence[str], limits: QemuImgLimits) -> tuple[str, ...]:
    """Wrap argv in util-linux prlimit (as OpenStack does for qemu-img info).

    prlimit sets the limits and execs, so it is safe from threads, unlike
    subprocess's preexec_fn.
    """
    prlimit = shutil.which("prlimit")
    if prlimit is None:
        return tuple(argv)
    return (
        prlimit,
        f"--cpu={limits.cpu_seconds}",
        f"--as={limits.address_space_bytes}",
        *argv,
    )


def run_command(argv: Sequence[str], timeout_seconds: float) -> str:
    """Run argv, return stdout; raise CommandError with stderr on any failure."""
    started = time.monotonic()
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=timeout_seconds,
            check=False,
            stdin=subprocess.DEVNULL,
        )
    except subprocess.TimeoutExpired as exc:
        raise CommandError(f"{argv[-1]}: qemu-img timed out after {timeout_seconds:g}s") from exc
    except OSError as exc:
        raise CommandError(f"cannot run {argv[0]}: {exc.strerror}") from exc
    elapsed = time.monotonic() - started
    log.debug("ran %s in %.3fs, exit %s", " ".join(argv), elapsed, proc.returncode)
    if proc.returncode != 0:
        detail = (proc.stderr or "").strip().splitlines()
        reason = detail[-1] if detail else f"exit status {proc.returncode}"
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (resource limit?)"
        raise CommandError(f"qemu-img info failed: {reason[:500]}")
    return proc.stdout


Runner = Callable[[Sequence[str], float], str]


@dataclass(frozen=True)
class _CacheKey:
    path: str
    dev: int
    ino: int
    fmt: str


class Measurer:
    """Measures image files; caches virtual sizes, which rarely change.

    The cache key is the file identity (device, inode) plus format, and entries
    expire after `cache_ttl_seconds` so a `virsh blockresize` shows up within
    that time. Raw images need no qemu-img at all: their virtual size is st_size.
    """

    def __init__(
        self,
        limits: QemuImgLimits | None = None,
        runner: Runner = run_command,
        cache_ttl_seconds: float = 3600.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.limits = limits or QemuImgLimits()
        self._runner = runner
        self._ttl = cache_ttl_seconds
        self._clock = clock
        self._cache: dict[_CacheKey, tuple[float, int]] = {}
        self._lock = threading.Lock()
        self.qemu_img_runs = 0

    def stat(self, path: str) -> os.stat_result:
        """os.stat, with a MeasureError that names the path."""
        try:
            return os.stat(path)
        except OSError as exc:
            raise MeasureError(f"cannot stat {path}: {exc.strerror}") from exc

    def allocation(self, path: str, fmt: str | None, with_virtual: bool = True) -> Allocation:
        """Measure one image: allocated and file bytes from stat, virtual size from qemu-img."""
        st = self.stat(path)
        virtual = self.virtual_size(path, fmt, st) if with_virtual else None
        return Allocation(
            allocated_bytes=st.st_blocks * 512,
            file_bytes=st.st_size,
            virtual_bytes=virtual,
            file_id=(st.st_dev, st.st_ino),
        )

    def virtual_size(self, path: str, fmt: str | None, st: os.stat_result) -> int | None:
        """Virtual disk size in bytes, or None when it cannot be known safely."""
        if fmt in (None, "", "raw"):
            # qemu-img reports st_size for raw files; no need to spawn it.
            return st.st_size
        key = _CacheKey(path, st.st_dev, st.st_ino, fmt)
        now = self._clock()
        with self._lock:
            hit = self._cache.get(key)
            if hit is not None and now - hit[0] < self._ttl:
                return hit[1]
        argv = limited_argv(qemu_img_info_argv(path, fmt), self.limits)
        self.qemu_img_runs += 1
        out = self._runner(argv, self.limits.timeout_seconds)
        virtual = parse_qemu_img_info(out)
        with self._lock:
            self._cache[key] = (now, virtual)
        return virtual

    def forget(self, keep_paths: set[str]) -> None:
        """Drop cache entries of images no longer attached to any domain."""
        with self._lock:
            for key in [k for k in self._cache if k.path not in keep_paths]:
                del self._cache[key]


def parse_qemu_img_info(text: str) -> int:
    """Pull `virtual-size` out of `qemu-img info --output=json`; raise MeasureError."""
    try:
        doc = json.loads(text)
    except ValueError as exc:
        raise MeasureError("qemu-img info printed something that is not JSON") from exc
    size = doc.get("virtual-size") if isinstance(doc, dict) else None
    if isinstance(size, bool) or not isinstance(size, int) or size < 0:
        raise MeasureError("qemu-img info gave no usable virtual-size")
    if size > MAX_SANE_BYTES:
        # The image header is guest-written. Today's qemu-img refuses such images itself
        # ("Image is too big"); this holds should another version print the number.
        raise MeasureError(f"qemu-img info gave an implausible virtual-size ({size} bytes)")
    return size
