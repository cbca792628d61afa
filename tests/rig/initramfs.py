"""Build (and cache) the guest kernel + busybox initramfs that runs the real qemu-ga."""

from __future__ import annotations

import gzip
import hashlib
import logging
import lzma
import os
import re
import shutil
import subprocess
import tempfile
from dataclasses import dataclass
from pathlib import Path

from rig.host import RigError, require_tools, run

log = logging.getLogger(__name__)

BUSYBOX = Path("/bin/busybox")
QEMU_GA = Path("/usr/sbin/qemu-ga")
BOOT_DIR = Path("/boot")
MODULES_DIR = Path("/usr/lib/modules")

# crc32c_generic: ext4 needs crc32c and the TCG CPU (qemu64) lacks SSE4.2, so
# crc32c-intel fails to load and nothing else provides it.
MODULES = (
    "virtio_pci",
    "virtio_scsi",
    "sd_mod",
    "virtio_blk",
    "virtio_console",
    "crc32c_generic",
    "ext4",
    "libata",
    "ahci",
)

# Markers the rig looks for in the serial console log.
READY_MARKER = "VTRIMD-RIG-READY"
AGENT_MARKER = "VTRIMD-RIG-AGENT"

# Bump when the build procedure changes in a way the hashed inputs do not capture.
_BUILD_VERSION = "3"

INIT_SCRIPT = r"""#!/bin/sh
# virt-trimd test rig init: mount data disks, delete garbage, run qemu-ga.
export PATH=/bin:/sbin
mount -t proc proc /proc
mount -t sysfs sysfs /sys
mount -t devtmpfs devtmpfs /dev
exec </dev/console >/dev/console 2>&1
mkdir -p /run /tmp /mnt /dev/virtio-ports
mount -t tmpfs tmpfs /run
mount -t tmpfs tmpfs /tmp
echo "rig: init on $(uname -r)"

for m in $(cat /etc/rig-modules); do
    # Already-loaded or CPU-unsupported modules (crc32c-intel on TCG) fail harmlessly.
    insmod "/lib/modules/$(uname -r)/$m" 2>/dev/null
done

arg() { for w in $(cat /proc/cmdline); do case "$w" in "$1"=*) echo "${w#*=}";; esac; done; }
want=$(arg vtrimd.disks); want=${want:-0}
# SCSI and ATA probing is asynchronous: wait until every disk the host defined is there.
i=0
while :; do
    n=$(ls -d /sys/block/sd* /sys/block/vd* 2>/dev/null | wc -l)
    [ "$n" -ge "$want" ] && break
    i=$((i + 1)); [ $i -ge 300 ] && { echo "rig: only $n of $want disks after 30s"; break; }
    sleep 0.1
done

for b in /sys/block/sd* /sys/block/vd*; do
    [ -e "$b" ] || continue
    d=${b##*/}
    mkdir -p "/mnt/$d"
    # No -o discard: deleted blocks must stay allocated on the host until fstrim.
    if mount -t ext4 "/dev/$d" "/mnt/$d"; then
        rm -f /mnt/$d/garbage*
        echo "rig: mounted /dev/$d at /mnt/$d"
    else
        rmdir "/mnt/$d"
    fi
done
# Commit the journal so the freed blocks are free on disk and a trim can hand them back.
sync
echo ready > /run/ready
echo "VTRIMD-RIG-READY"

if grep -q vtrimd.noagent /proc/cmdline; then
    echo "rig: vtrimd.noagent, not starting qemu-ga"
    while :; do sleep 3600; done
fi

# udev is absent, so find the agent's virtio port by name ourselves.
port=""
i=0
while [ -z "$port" ]; do
    for p in /sys/class/virtio-ports/*; do
        [ "$(cat "$p/name" 2>/dev/null)" = org.qemu.guest_agent.0 ] && port=/dev/${p##*/}
    done
    [ -n "$port" ] && break
    i=$((i + 1)); [ $i -ge 300 ] && { echo "rig: no org.qemu.guest_agent.0 port"; break; }
    sleep 0.1
done
[ -n "$port" ] && ln -sf "$port" /dev/virtio-ports/org.qemu.guest_agent.0
if grep -q vtrimd.agentstall /proc/cmdline; then
    # Hold the port open without answering: libvirt sees a connected agent that hangs.
    echo "rig: vtrimd.agentstall, holding $port open without an agent"
    exec 3<>"$port"
    while :; do sleep 3600; done
fi
echo "VTRIMD-RIG-AGENT $port"
while :; do
    qemu-ga -m virtio-serial -p "$port" -t /run -f /run/qemu-ga.pid
    echo "rig: qemu-ga exited with $?, restarting"
    sleep 1
done
"""


@dataclass(frozen=True)
class BootFiles:
    """Direct-kernel-boot inputs for a guest: kernel image and initramfs."""

    kernel: Path
    initrd: Path


def guest_kernel_version() -> str:
    """The newest kernel that has both /boot/vmlinuz-VER and /usr/lib/modules/VER.

    The host may run a different kernel (uname -r), so the guest uses what
    linux-image-amd64 installed.
    """
    versions = [
        p.name.removeprefix("vmlinuz-")
        for p in BOOT_DIR.glob("vmlinuz-*")
        if (MODULES_DIR / p.name.removeprefix("vmlinuz-")).is_dir()
    ]
    if not versions:
        raise RigError(
            f"no guest kernel: need /boot/vmlinuz-VER with {MODULES_DIR}/VER; "
            "install Debian package linux-image-amd64"
        )

    def _key(v: str) -> list[int]:
        return [int(x) for x in re.findall(r"\d+", v)]

    return max(versions, key=_key)


def _file_digest(path: Path) -> str:
    return hashlib.sha256(path.read_bytes()).hexdigest()


def _module_paths(kver: str) -> list[Path]:
    """Absolute .ko paths for MODULES and their dependencies, in load order, no repeats."""
    seen: dict[Path, None] = {}
    for mod in MODULES:
        out = run(["modprobe", "-S", kver, "--show-depends", mod])
        for line in out.splitlines():
            parts = line.split()
            # "builtin NAME" lines need nothing; "insmod PATH [params]" lines do.
            if len(parts) >= 2 and parts[0] == "insmod":
                seen.setdefault(Path(parts[1]), None)
    return list(seen)


def _shared_libs(binary: Path) -> list[Path]:
    """Shared objects (and the dynamic loader) that binary needs, as ldd reports them."""
    libs: list[Path] = []
    for line in run(["ldd", binary]).splitlines():
        m = re.search(r"(?:=>\s*)?(/\S+)\s+\(0x", line)
        if m:
            libs.append(Path(m.group(1)))
    if not libs:
        raise RigError(f"ldd found no libraries for {binary}; is it a dynamic executable?")
    return libs


def _copy_module(src: Path, dest_dir: Path, kver: str) -> str:
    """Copy one module under dest_dir/lib/modules/kver, uncompressed; return its relative path."""
    rel = src.relative_to(_modules_root(src, kver))
    data = src.read_bytes()
    # busybox insmod cannot read compressed modules.
    if src.suffix == ".xz":
        data, rel = lzma.decompress(data), rel.with_suffix("")
    elif src.suffix == ".gz":
        data, rel = gzip.decompress(data), rel.with_suffix("")
    elif src.suffix == ".zst":
        data = subprocess.run(["zstd", "-dc", src], capture_output=True, check=True).stdout
        rel = rel.with_suffix("")
    target = dest_dir / "lib" / "modules" / kver / rel
    target.parent.mkdir(parents=True, exist_ok=True)
    target.write_bytes(data)
    return str(rel)


def _modules_root(path: Path, kver: str) -> Path:
    for parent in path.parents:
        if parent.name == kver:
            return parent
    raise RigError(f"module {path} is not under a modules/{kver} directory")


def _stage(root: Path, kver: str) -> None:
    """Lay out the initramfs tree under root."""
    for d in ("bin", "dev", "proc", "sys", "run", "tmp", "mnt", "etc", "var", "lib64"):
        (root / d).mkdir(exist_ok=True)
    (root / "sbin").symlink_to("bin")
    (root / "var" / "run").symlink_to("../run")
    shutil.copy2(BUSYBOX, root / "bin" / "busybox")
    applets = run([BUSYBOX, "--list"]).split()
    for applet in applets:
        link = root / "bin" / applet
        if applet != "busybox" and not link.exists():
            link.symlink_to("busybox")
    shutil.copy2(QEMU_GA, root / "bin" / "qemu-ga")
    for lib in _shared_libs(QEMU_GA):
        target = root / lib.relative_to("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(lib, target)  # follows symlinks: the soname path gets the real file

    order = [_copy_module(p, root, kver) for p in _module_paths(kver)]
    (root / "etc" / "rig-modules").write_text("\n".join(order) + "\n")
    for name in ("modules.order", "modules.builtin", "modules.builtin.modinfo"):
        src = MODULES_DIR / kver / name
        if src.exists():
            shutil.copy2(src, root / "lib" / "modules" / kver / name)
    # modules.dep lets `modprobe` work inside the guest when debugging by hand.
    run(["depmod", "-b", root, kver])

    init = root / "init"
    init.write_text(INIT_SCRIPT)
    init.chmod(0o755)
    (root / "etc" / "passwd").write_text("root:x:0:0:root:/:/bin/sh\n")
    (root / "etc" / "group").write_text("root:x:0:\n")
    # The kernel opens /dev/console before /init runs; without the node init starts
    # with no stdio. mknod needs root; /init re-opens the console as a fallback.
    try:
        os.mknod(root / "dev" / "console", 0o600 | 0o020000, os.makedev(5, 1))
    except PermissionError:
        log.warning("not root: initramfs has no /dev/console node")


def _pack(root: Path, out: Path) -> None:
    """Write root as an uncompressed newc cpio archive (TCG decompresses slowly)."""
    names = sorted(str(p.relative_to(root)) for p in root.rglob("*"))
    # A unique temporary name: two test processes may build the same cache entry at once.
    fd, tmp_name = tempfile.mkstemp(dir=out.parent, prefix=out.name + ".")
    tmp = Path(tmp_name)
    with os.fdopen(fd, "wb") as fh:
        proc = subprocess.run(
            ["cpio", "--quiet", "-o", "-H", "newc", "-R", "0:0"],
            input="\n".join([".", *names]).encode() + b"\n",
            cwd=root,
            stdout=fh,
            stderr=subprocess.PIPE,
            check=False,
        )
    if proc.returncode != 0:
        tmp.unlink(missing_ok=True)
        raise RigError(f"cpio failed: {proc.stderr.decode().strip()}")
    tmp.chmod(0o644)
    tmp.replace(out)


def build_boot_files(cache_dir: Path, kver: str | None = None) -> BootFiles:
    """Return the guest kernel and initramfs, building them into cache_dir if needed.

    The cache key hashes the kernel version and image, busybox, qemu-ga, the module
    list and the init script, so upgrading any of them rebuilds. Raises RigError when
    a required package is missing.
    """
    require_tools("modprobe", "depmod", "cpio", "ldd", str(BUSYBOX), str(QEMU_GA))
    kver = kver or guest_kernel_version()
    vmlinuz = BOOT_DIR / f"vmlinuz-{kver}"
    h = hashlib.sha256()
    for part in (_BUILD_VERSION, kver, INIT_SCRIPT, " ".join(MODULES)):
        h.update(part.encode())
        h.update(b"\0")
    for f in (vmlinuz, BUSYBOX, QEMU_GA):
        h.update(_file_digest(f).encode())
    out_dir = cache_dir / "boot" / h.hexdigest()[:16]
    boot = BootFiles(kernel=out_dir / "vmlinuz", initrd=out_dir / "initrd.cpio")
    if boot.kernel.exists() and boot.initrd.exists():
        return boot

    log.info("building guest boot files for %s in %s", kver, out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out_dir, prefix="stage-") as stage:
        root = Path(stage)
        _stage(root, kver)
        _pack(root, boot.initrd)
    # A private copy, so a kernel upgrade cannot change a defined domain's kernel underneath it.
    fd, tmp_kernel = tempfile.mkstemp(dir=out_dir, prefix="vmlinuz.")
    os.close(fd)
    shutil.copy2(vmlinuz, tmp_kernel)
    Path(tmp_kernel).replace(boot.kernel)
    return boot
