"""Host side of the rig: required tools, running commands, starting libvirtd."""

from __future__ import annotations

import logging
import os
import shutil
import socket
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

log = logging.getLogger(__name__)

LIBVIRT_URI = "qemu:///system"
TEST_PREFIX = "vtrimd-test-"


def session_prefix() -> str:
    """TEST_PREFIX plus this session's tag, $VTRIMD_RIG_SESSION (empty by default).

    The e2e tier sets a tag per pytest run, so two runs on one libvirtd (two people, or
    a benchmark beside the tests) never want the same domain: the rig refuses to take
    over a guest a live process owns, and a shared name failed the later run's tests.
    """
    return TEST_PREFIX + os.environ.get("VTRIMD_RIG_SESSION", "")


REPO_ROOT = Path(__file__).resolve().parents[2]

_LIBVIRT_SOCK = Path("/run/libvirt/libvirt-sock")
_VIRTLOGD_SOCK = Path("/run/libvirt/virtlogd-sock")

# Which Debian package brings each tool, so a missing one names its fix.
TOOL_PACKAGES: dict[str, str] = {
    "qemu-img": "qemu-utils",
    "qemu-system-x86_64": "qemu-system-x86",
    "mkfs.ext4": "e2fsprogs",
    "cpio": "cpio",
    "depmod": "kmod",
    "modprobe": "kmod",
    "ldd": "libc-bin",
    "libvirtd": "libvirt-daemon-system",
    "virtlogd": "libvirt-daemon-system",
    "virsh": "libvirt-clients",
}


class RigError(RuntimeError):
    """The rig could not set up or observe the hypervisor; the message says what to do."""


def require_tools(*tools: str) -> None:
    """Raise RigError naming every missing tool and the package that provides it."""
    missing = [t for t in tools if shutil.which(t) is None and not Path(t).is_file()]
    if missing:
        pkgs = sorted({TOOL_PACKAGES.get(Path(t).name, "?") for t in missing})
        raise RigError(
            f"missing tools: {', '.join(missing)}; install Debian packages {' '.join(pkgs)} "
            f"(or run .ci/install-deps.sh)"
        )


def run(argv: Sequence[str | os.PathLike[str]], timeout_s: float = 300) -> str:
    """Run argv, return stdout; raise RigError with stderr on failure or timeout."""
    args = [str(a) for a in argv]
    log.debug("run: %s", " ".join(args))
    try:
        proc = subprocess.run(args, capture_output=True, text=True, timeout=timeout_s, check=False)
    except FileNotFoundError as exc:
        require_tools(args[0])
        raise RigError(f"cannot run {args[0]}: {exc}") from exc
    except subprocess.TimeoutExpired as exc:
        raise RigError(f"timed out after {timeout_s}s: {' '.join(args)}") from exc
    if proc.returncode != 0:
        raise RigError(
            f"command failed (exit {proc.returncode}): {' '.join(args)}\n{proc.stderr.strip()}"
        )
    return proc.stdout


def _socket_answers(path: Path) -> bool:
    """True when a unix stream socket at path accepts a connection."""
    if not path.exists():
        return False
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(2)
        try:
            sock.connect(str(path))
        except OSError:
            return False
    return True


def libvirtd_answers(uri: str = LIBVIRT_URI) -> bool:
    """True when libvirtd accepts a connection on uri and reports its version."""
    import libvirt

    try:
        conn = libvirt.open(uri)
    except libvirt.libvirtError:
        return False
    try:
        conn.getLibVersion()
        return True
    except libvirt.libvirtError:
        return False
    finally:
        conn.close()


# Group libvirt may use the read-write socket, as polkit allows on a real Debian host;
# the system tier's service (user virt-trimd, group libvirt) connects through it.
LIBVIRTD_CONF = Path(__file__).resolve().parent / "libvirtd.conf"


def ensure_virtlogd(timeout_s: float = 30) -> None:
    """Start virtlogd unless its socket accepts connections; wait until it does.

    Checked on its own, not only when libvirtd is down: libvirtd can outlive virtlogd
    (it leaves a stale socket file behind), and then every domain start fails with
    "Failed to connect socket to '/run/libvirt/virtlogd-sock'".
    """
    if _socket_answers(_VIRTLOGD_SOCK):
        return
    require_tools("virtlogd")
    for d in ("/var/log/libvirt", "/var/run/libvirt"):
        Path(d).mkdir(parents=True, exist_ok=True)
    log.warning("virtlogd does not answer on %s; starting it", _VIRTLOGD_SOCK)
    run(["virtlogd", "-d"], timeout_s=30)
    deadline = time.monotonic() + timeout_s
    while not _socket_answers(_VIRTLOGD_SOCK):
        if time.monotonic() > deadline:
            raise RigError(
                f"virtlogd did not answer on {_VIRTLOGD_SOCK} within {timeout_s}s; "
                "see /var/log/libvirt/virtlogd.log and try `virtlogd -v` in a terminal"
            )
        time.sleep(0.2)


def ensure_libvirtd(timeout_s: float = 30, uri: str = LIBVIRT_URI) -> None:
    """Start virtlogd and libvirtd unless each answers; wait until qemu:///system does.

    systemd is not PID 1 on the test machines, so nobody else starts them.
    Raises RigError when the daemons are missing or do not answer within timeout_s.
    """
    # libvirtd hands serial/QEMU logs to virtlogd; without it every domain start fails.
    ensure_virtlogd(timeout_s)
    if libvirtd_answers(uri):
        return
    require_tools("libvirtd")
    if not _socket_answers(_LIBVIRT_SOCK):
        log.info("starting libvirtd")
        run(["libvirtd", "-d", "-f", str(LIBVIRTD_CONF)], timeout_s=30)
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if libvirtd_answers(uri):
            return
        time.sleep(0.5)
    raise RigError(
        f"libvirtd did not answer on {uri} within {timeout_s}s; "
        "see /var/log/libvirt/ and try `libvirtd -v` in a terminal"
    )


def quiet_libvirt_errors() -> None:
    """Route libvirt's C-level error printing to logging instead of stderr.

    libvirt-python prints every libvirtError to stderr by default, which buries test output
    while the rig polls an agent that is still booting.
    """
    import libvirt

    def _handler(_ctx: object, err: tuple[object, ...]) -> None:
        log.debug("libvirt: %s", err[2] if len(err) > 2 else err)

    libvirt.registerErrorHandler(_handler, None)


def default_cache_dir() -> Path:
    """The rig cache: $VTRIMD_RIG_CACHE or .rig-cache/ at the repo root."""
    env = os.environ.get("VTRIMD_RIG_CACHE")
    return Path(env) if env else REPO_ROOT / ".rig-cache"
