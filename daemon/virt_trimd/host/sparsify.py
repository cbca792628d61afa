"""Offline reclaim on the host: libguestfs's `virt-sparsify --in-place`, and image facts.

The only module that runs virt-sparsify. It also reads what the safety checks in
`engine/offline.py` need from image files: their identity, the qcow2 header (backing
file, internal snapshots, encryption, external data file) and whether another process
holds QEMU's image lock. It decides nothing: it runs what it is asked to and reports.

Facts about libguestfs 1.48 (Debian 12) that shape this module:
- an image held by a running QEMU makes `virt-sparsify --in-place` exit 1 with only
  "guestfs_launch failed"; the real cause (`Failed to get "write" lock`) shows only
  with `-v`. `qemu-img info` without `--force-share` asks for the same lock and says so
  in one line, so a failed run is explained by probing the lock afterwards;
- a qcow2 image sparsified with a wrong `--format raw` exits 0 and trims nothing, so
  the format always comes from the domain XML and success is judged by measurement;
- killed, it leaves `/tmp/libguestfsXXXXXX` socket directories behind (as root the
  socket directory is always under /tmp, whatever TMPDIR says).
"""

from __future__ import annotations

import contextlib
import itertools
import json
import logging
import os
import re
import shutil
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

from virt_trimd.records import QemuImgLimits, SparsifyLimits

# A new module's logger name, listed in docs/architecture.md.
log = logging.getLogger("virt_trimd.sparsify")

SPARSIFY_TOOL = "virt-sparsify"
# Formats virt-sparsify is given; anything else is skipped, never guessed.
SUPPORTED_FORMATS = ("qcow2", "raw")
# Whatever the run prints beyond this is dropped: the appliance's output is guest-influenced.
MAX_OUTPUT_BYTES = 64 * 1024
SOCKDIR_PREFIX = "libguestfs"
SOCKDIR_PARENT = Path("/tmp")
# How long a killed run's appliance may take to go before its sockets are judged in use.
SOCKDIR_SETTLE_SECONDS = 5.0
# How long a run may take to exit after SIGTERM before it gets SIGKILL.
TERM_GRACE_SECONDS = 10.0
QCOW2_MAGIC = b"QFI\xfb"
# qcow2 incompatible feature bit 2: guest data lives in an external data file.
QCOW2_INCOMPAT_DATA_FILE = 1 << 2
# Environment names an operator may set for libguestfs (config `offline.environment`).
ENVIRONMENT_NAME = re.compile(r"(LIBGUESTFS_[A-Z0-9_]+|SUPERMIN_[A-Z0-9_]+|TMPDIR)")


class SparsifyError(Exception):
    """One virt-sparsify run failed; `kind` is missing, locked, timeout, failed or refused.

    refused: the root helper's own safety checks turned the request down.
    """

    def __init__(self, kind: str, message: str) -> None:
        super().__init__(message)
        self.kind = kind
        self.message = message


@dataclass(frozen=True)
class SparsifyRun:
    """A finished virt-sparsify run that exited 0."""

    elapsed_seconds: float
    trimmed: tuple[str, ...]  # the devices it printed a "Trimming" line for


@dataclass(frozen=True)
class ImageFacts:
    """What the safety checks need to know about one image file."""

    file_id: tuple[int, int]  # (st_dev, st_ino)
    is_regular: bool
    qcow2: bool  # starts with the qcow2 magic
    backing_file: str | None = None  # as written in the qcow2 header
    snapshots: int = 0  # internal snapshots in the qcow2 header
    encrypted: bool = False  # qcow2 crypt_method != 0 (AES or LUKS)
    external_data_file: bool = False


@dataclass(frozen=True)
class OfflineState:
    """A domain's lifecycle state as the offline checks need it (Hypervisor.offline_state)."""

    active: bool  # running, paused, starting: QEMU exists
    state: str  # "shutoff", "running", "paused", ...
    managed_save: bool  # `virsh managedsave`: saved memory expects the disks as they are
    persistent: bool
    has_snapshots: bool = False  # libvirt snapshot metadata (internal or external)


_RUNS = itertools.count(1)
# The packaged root helper's socket (virt-trimd-sparsify.socket, group virt-trimd).
HELPER_SOCKET = "/run/virt-trimd/sparsify.sock"
# A request is one JSON line; anything longer is not one of ours.
HELPER_REQUEST_MAX = 8192
# How much longer than offline.timeout the daemon waits for the helper's answer.
HELPER_GRACE_SECONDS = 120.0
# /var/cache/<this>: libguestfs's appliance cache for runs in transient units.
GUESTFS_CACHE_NAME = "virt-trimd-guestfs"
# How much longer than RuntimeMaxSec= to wait for systemd-run before stopping the unit.
UNIT_STOP_GRACE_SECONDS = 60.0


def find_tool() -> str | None:
    """Path of virt-sparsify, or None when libguestfs-tools is not installed."""
    return shutil.which(SPARSIFY_TOOL)


def sparsify_argv(tool: str, path: str, fmt: str) -> tuple[str, ...]:
    """argv for an in-place sparsify of one image.

    `--format` always, from the domain XML: without it libguestfs probes, and a raw
    image whose guest wrote a qcow2 header would be opened as qcow2 with a backing
    file of the guest's choosing. `--` so that no path is read as an option.
    """
    return (tool, "--in-place", "--format", fmt, "--", path)


def limited_argv(argv: Sequence[str], limits: SparsifyLimits) -> tuple[str, ...]:
    """Wrap argv in nice, ionice (idle class) and prlimit (CPU seconds), where present.

    No RLIMIT_AS: the appliance's QEMU reserves far more address space than it uses
    (TCG's translation buffer alone is 1 GiB), so an address-space cap breaks it.
    """
    out: list[str] = []
    nice = shutil.which("nice")
    if nice is not None and limits.nice:
        out += [nice, "-n", str(limits.nice)]
    ionice = shutil.which("ionice")
    if ionice is not None:
        out += [ionice, "-c", "3"]
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        out += [prlimit, f"--cpu={limits.cpu_seconds}"]
    return (*out, *argv)


def under_systemd(environ: Mapping[str, str]) -> bool:
    """True when this process is a systemd service on a host booted with systemd."""
    return bool(environ.get("INVOCATION_ID")) and Path("/run/systemd/system").is_dir()


def use_helper(limits: SparsifyLimits, environ: Mapping[str, str]) -> bool:
    """Whether runs are asked of the packaged root helper (`offline.runner`).

    auto: when the daemon is an unprivileged systemd service and the helper's socket
    exists. Such a daemon cannot start a transient unit itself (systemd asks polkit
    for org.freedesktop.systemd1.manage-units, which root alone has by default), and
    granting it that would let it run anything as root: StartTransientUnit passes
    polkit no unit name to scope a rule by, and the caller picks the command.
    """
    if limits.runner == "helper":
        return True
    if limits.runner != "auto":
        return False
    return os.geteuid() != 0 and under_systemd(environ) and Path(HELPER_SOCKET).exists()


def use_systemd_run(limits: SparsifyLimits, environ: Mapping[str, str]) -> bool:
    """Whether runs go through a transient unit (`offline.runner`; auto: under systemd)."""
    if limits.runner == "systemd-run":
        return True
    if limits.runner in ("subprocess", "helper"):
        return False
    return under_systemd(environ) and shutil.which("systemd-run") is not None


def systemd_run_argv(unit: str, argv: Sequence[str], limits: SparsifyLimits) -> tuple[str, ...]:
    """argv that runs `argv` as a transient service outside the daemon's own sandbox.

    The daemon's unit may not write images and forbids W+X memory (TCG needs it) and
    more than 1 GiB, all of which the appliance needs; the transient unit gets bounds of
    its own instead. `RuntimeMaxSec=` kills the whole cgroup (the appliance's QEMU
    too) on timeout, and `PrivateTmp=` takes libguestfs's /tmp sockets with it.
    """
    props = [
        f"MemoryMax={limits.memory_bytes}",
        f"LimitCPU={limits.cpu_seconds}",
        f"Nice={limits.nice}",
        "IOSchedulingClass=idle",
        f"RuntimeMaxSec={max(1, round(limits.timeout_seconds))}",
        "KillMode=control-group",
        "PrivateTmp=yes",
        "NoNewPrivileges=yes",
        # No module loading, but not ProtectKernelModules=: that hides /usr/lib/modules,
        # which supermin copies into the appliance ("supermin exited with error status 1").
        "CapabilityBoundingSet=~CAP_SYS_MODULE",
        "ProtectKernelLogs=yes",
        "ProtectControlGroups=yes",
    ]
    operator = {name for name, _ in limits.environment}
    if "LIBGUESTFS_CACHEDIR" not in operator:
        # PrivateTmp= would hide libguestfs's default cache (/var/tmp) and rebuild the
        # supermin appliance at every run; systemd keeps (and creates) this one.
        props.append(f"CacheDirectory={GUESTFS_CACHE_NAME}")
    out = ["systemd-run", "--wait", "--pipe", "--collect", "--service-type=exec"]
    out += [f"--unit={unit}", "--setenv=LC_ALL=C"]
    if "LIBGUESTFS_CACHEDIR" not in operator:
        out += [f"--setenv=LIBGUESTFS_CACHEDIR=/var/cache/{GUESTFS_CACHE_NAME}"]
    out += [f"--setenv={name}={value}" for name, value in limits.environment]
    for prop in props:
        out += ["-p", prop]
    return (*out, "--", *argv)


def sparsify_environment(base: Mapping[str, str], limits: SparsifyLimits) -> dict[str, str]:
    """The run's environment: `base` plus the operator's libguestfs settings.

    Also LC_ALL=C, because the lock and "Trimming" lines are matched in English.
    """
    env = dict(base)
    env["LC_ALL"] = "C"
    for name, value in limits.environment:
        env[name] = value
    return env


def parse_trimmed(stdout: str) -> tuple[str, ...]:
    """The devices a run reports trimming ("[  20.9] Trimming /dev/sda")."""
    return tuple(m.group(1) for m in re.finditer(r"Trimming (\S+)", stdout))


def _sockdirs() -> set[str]:
    try:
        return {
            str(SOCKDIR_PARENT / name)
            for name in os.listdir(SOCKDIR_PARENT)
            if name.startswith(SOCKDIR_PREFIX)
        }
    except OSError:
        return set()


def _in_use(paths: Iterable[str]) -> set[str]:
    """Which of `paths` a live process names on its command line (a running appliance)."""
    wanted = set(paths)
    used: set[str] = set()
    for pid in os.listdir("/proc"):
        if not pid.isdigit():
            continue
        try:
            cmdline = Path("/proc", pid, "cmdline").read_bytes().decode(errors="replace")
        except OSError:
            continue
        used.update(p for p in wanted if p in cmdline)
    return used


def remove_stale_sockdirs(before: set[str], started_wall: float) -> list[str]:
    """Remove socket directories a killed run left in /tmp; return what was removed.

    Only directories that appeared during the run, that we own, and that no live
    process (another run's appliance) names: libguestfs cannot clean up after SIGKILL.
    """
    fresh = []
    for path in sorted(_sockdirs() - before):
        try:
            st = os.lstat(path)
        except OSError:
            continue
        if st.st_uid == os.geteuid() and st.st_mtime >= started_wall - 1:
            fresh.append(path)
    # The appliance's QEMU outlives a killed virt-sparsify by up to a second or two
    # (libguestfs's recovery process kills it when it sees its parent gone): wait for it,
    # but not for a directory another live run uses for as long as that runs.
    deadline = time.monotonic() + SOCKDIR_SETTLE_SECONDS
    busy = _in_use(fresh)
    while busy and time.monotonic() < deadline:
        time.sleep(0.25)
        busy = _in_use(fresh)
    removed = []
    for path in fresh:
        if path not in busy:
            shutil.rmtree(path, ignore_errors=True)
            removed.append(path)
    return removed


def _read_capped(data: bytes | None) -> str:
    return (data or b"")[-MAX_OUTPUT_BYTES:].decode(errors="replace")


def run_sparsify(
    path: str,
    fmt: str,
    limits: SparsifyLimits,
    qemu_img_limits: QemuImgLimits | None = None,
    tool: str | None = None,
) -> SparsifyRun:
    """Run virt-sparsify --in-place on one image; raise SparsifyError on any failure.

    The run gets its own process group, so a timeout takes the appliance's helpers
    down with it (SIGTERM, then SIGKILL after TERM_GRACE_SECONDS), and the socket
    directories it leaves are removed. A failure is explained by probing QEMU's image
    lock afterwards (kind "locked" when another process holds it).
    """
    if fmt not in SUPPORTED_FORMATS:
        raise SparsifyError("failed", f"format {fmt!r} is not one virt-sparsify is given")
    tool = tool or find_tool()
    if tool is None:
        raise SparsifyError(
            "missing",
            f"{SPARSIFY_TOOL} not found: install libguestfs-tools "
            "(apt-get install libguestfs-tools) for offline reclaim",
        )
    if use_helper(limits, os.environ):
        return run_via_helper(path, fmt, limits)
    unit: str | None = None
    wait_seconds = limits.timeout_seconds
    if use_systemd_run(limits, os.environ):
        unit = f"virt-trimd-sparsify-{os.getpid()}-{next(_RUNS)}"
        argv = systemd_run_argv(unit, sparsify_argv(tool, path, fmt), limits)
        # RuntimeMaxSec= stops the unit first; this only catches a hung systemd-run.
        wait_seconds += UNIT_STOP_GRACE_SECONDS
    else:
        argv = limited_argv(sparsify_argv(tool, path, fmt), limits)
    env = sparsify_environment(os.environ, limits)
    before = _sockdirs()
    started_wall = time.time()
    started = time.monotonic()
    log.info("%s: running %s", path, " ".join(argv))
    try:
        proc = subprocess.Popen(
            list(argv),
            stdin=subprocess.DEVNULL,  # an encrypted guest filesystem asks for a key: fail
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            env=env,
            start_new_session=True,
        )
    except OSError as exc:
        raise SparsifyError("missing", f"cannot run {tool}: {exc.strerror}") from exc
    try:
        out, err = proc.communicate(timeout=wait_seconds)
    except subprocess.TimeoutExpired:
        if unit is not None:
            subprocess.run(["systemctl", "stop", unit], check=False, capture_output=True)
        _stop_group(proc)
        removed = remove_stale_sockdirs(before, started_wall)
        if removed:
            log.info("%s: removed libguestfs leftovers %s", path, ", ".join(removed))
        raise SparsifyError(
            "timeout",
            f"virt-sparsify on {path} did not finish within {limits.timeout_seconds:g}s "
            "and was killed (offline.timeout)",
        ) from None
    elapsed = time.monotonic() - started
    stdout, stderr = _read_capped(out), _read_capped(err)
    log.debug("%s: virt-sparsify exit %s in %.1fs", path, proc.returncode, elapsed)
    if proc.returncode != 0 and unit is not None and "Finished with result: timeout" in stderr:
        raise SparsifyError(
            "timeout",
            f"virt-sparsify on {path} did not finish within {limits.timeout_seconds:g}s; "
            f"systemd stopped its unit {unit} (offline.timeout)",
        )
    if proc.returncode != 0:
        lock = image_lock_conflict(path, fmt, qemu_img_limits or QemuImgLimits())
        if lock is not None:
            raise SparsifyError(
                "locked",
                f"{path} is in use by another process (QEMU's image lock: {lock}); not touched",
            )
        if proc.returncode < 0:
            reason = f"killed by signal {-proc.returncode} (offline.cpu_seconds?)"
        else:
            lines = [ln for ln in stderr.strip().splitlines() if ln.strip()]
            reason = next((ln for ln in lines if "error" in ln), lines[0] if lines else "")
            reason = reason or f"exit status {proc.returncode}"
        raise SparsifyError("failed", f"virt-sparsify on {path} failed: {reason[:300]}")
    return SparsifyRun(elapsed_seconds=elapsed, trimmed=parse_trimmed(stdout))


def helper_request(path: str, fmt: str) -> bytes:
    """The one line the daemon sends the root helper: which image, in which format."""
    return json.dumps({"path": path, "format": fmt}).encode() + b"\n"


def parse_helper_request(line: bytes) -> tuple[str, str]:
    """(path, format) from a request line; ValueError when it is not a well-formed one."""
    if len(line) > HELPER_REQUEST_MAX:
        raise ValueError("request too long")
    req = json.loads(line)
    if not isinstance(req, dict) or set(req) != {"path", "format"}:
        raise ValueError("expected exactly the keys path and format")
    path, fmt = req["path"], req["format"]
    if not isinstance(path, str) or not path.startswith("/") or "\0" in path:
        raise ValueError("path must be an absolute path")
    if fmt not in SUPPORTED_FORMATS:
        raise ValueError(f"format must be one of {', '.join(SUPPORTED_FORMATS)}")
    return path, fmt


def helper_reply(outcome: SparsifyRun | SparsifyError) -> bytes:
    """The helper's one-line answer: the run, or the error's kind and message."""
    if isinstance(outcome, SparsifyRun):
        body: dict[str, object] = {
            "ok": True,
            "elapsed_seconds": outcome.elapsed_seconds,
            "trimmed": list(outcome.trimmed),
        }
    else:
        body = {"ok": False, "kind": outcome.kind, "message": outcome.message[:2000]}
    return json.dumps(body).encode() + b"\n"


def parse_helper_reply(data: bytes) -> SparsifyRun:
    """A SparsifyRun from the helper's answer; SparsifyError for its errors or garbage."""
    try:
        body = json.loads(data)
        if body["ok"] is True:
            return SparsifyRun(
                elapsed_seconds=float(body["elapsed_seconds"]),
                trimmed=tuple(str(t) for t in body["trimmed"]),
            )
        kind, message = str(body["kind"]), str(body["message"])
    except (ValueError, KeyError, TypeError) as exc:
        raise SparsifyError("failed", f"the offline helper gave no valid answer ({exc})") from None
    raise SparsifyError(kind if kind in HELPER_ERROR_KINDS else "failed", message)


HELPER_ERROR_KINDS = ("missing", "locked", "timeout", "failed", "refused")


def run_via_helper(
    path: str, fmt: str, limits: SparsifyLimits, socket_path: str = HELPER_SOCKET
) -> SparsifyRun:
    """Ask the packaged root helper (virt-trimd-sparsify@.service) to sparsify one image.

    The helper trusts nothing in the request but the path: it re-reads the domain from
    libvirt, repeats every safety check, takes the format and the limits from its own
    copy of the config, and runs virt-sparsify in a transient unit of its own.
    """
    log.info("%s: asking the offline helper (%s)", path, socket_path)
    started = time.monotonic()
    wait = limits.timeout_seconds + UNIT_STOP_GRACE_SECONDS + HELPER_GRACE_SECONDS
    try:
        with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
            sock.settimeout(30.0)
            sock.connect(socket_path)
            sock.sendall(helper_request(path, fmt))
            sock.shutdown(socket.SHUT_WR)
            sock.settimeout(wait)
            chunks: list[bytes] = []
            size = 0
            while size <= MAX_OUTPUT_BYTES:
                chunk = sock.recv(65536)
                if not chunk:
                    break
                chunks.append(chunk)
                size += len(chunk)
    except TimeoutError:
        raise SparsifyError(
            "timeout",
            f"the offline helper gave no answer for {path} within {wait:g}s (offline.timeout)",
        ) from None
    except OSError as exc:
        raise SparsifyError(
            "failed",
            f"cannot reach the offline helper at {socket_path} ({exc.strerror or exc}): "
            "is virt-trimd-sparsify.socket enabled? (docs/systemd.md)",
        ) from None
    run = parse_helper_reply(b"".join(chunks))
    log.debug("%s: helper answered in %.1fs", path, time.monotonic() - started)
    return run


def _stop_group(proc: subprocess.Popen[bytes]) -> None:
    for sig, wait in ((signal.SIGTERM, TERM_GRACE_SECONDS), (signal.SIGKILL, 30.0)):
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.communicate(timeout=wait)
            return
        except subprocess.TimeoutExpired:
            continue


def image_lock_conflict(path: str, fmt: str, limits: QemuImgLimits) -> str | None:
    """The lock error when another process holds QEMU's lock on `path`, else None.

    `qemu-img info` without `--force-share` takes the same image lock a writer needs
    ("Failed to get shared "write" lock" while a QEMU has the image open read-write).
    Other failures are not lock conflicts and return None.
    """
    argv: tuple[str, ...] = ("qemu-img", "info", "--output=json", "-f", fmt, "--", path)
    prlimit = shutil.which("prlimit")
    if prlimit is not None:
        argv = (prlimit, f"--cpu={limits.cpu_seconds}", f"--as={limits.address_space_bytes}", *argv)
    try:
        proc = subprocess.run(
            list(argv),
            capture_output=True,
            text=True,
            timeout=limits.timeout_seconds,
            check=False,
            stdin=subprocess.DEVNULL,
            env={**os.environ, "LC_ALL": "C"},
        )
    except (subprocess.TimeoutExpired, OSError):
        return None
    if proc.returncode == 0:
        return None
    for line in proc.stderr.splitlines():
        if "lock" in line:
            return line.split(": ", 1)[-1].strip()[:200]
    return None


def image_facts(path: str) -> ImageFacts:
    """Identity and qcow2 header facts of one file; raise OSError when unreadable.

    Reads the header itself rather than asking qemu-img: the same check runs over
    every file beside the image (is any of them an overlay on it?), and a header
    read cannot follow anything a guest wrote.
    """
    st = os.stat(path)
    regular = (st.st_mode & 0o170000) == 0o100000
    facts = ImageFacts(file_id=(st.st_dev, st.st_ino), is_regular=regular, qcow2=False)
    if not regular:
        return facts
    with open(path, "rb") as fh:
        header = fh.read(104)
        if len(header) < 72 or header[:4] != QCOW2_MAGIC:
            return facts
        version = struct.unpack(">I", header[4:8])[0]
        backing_offset, backing_size = struct.unpack(">QI", header[8:20])
        crypt = struct.unpack(">I", header[32:36])[0]
        snapshots = struct.unpack(">I", header[60:64])[0]
        incompat = (
            struct.unpack(">Q", header[72:80])[0] if version >= 3 and len(header) >= 80 else 0
        )
        backing: str | None = None
        if backing_offset and 0 < backing_size <= 1023:
            fh.seek(backing_offset)
            backing = fh.read(backing_size).decode(errors="replace")
    return ImageFacts(
        file_id=facts.file_id,
        is_regular=True,
        qcow2=True,
        backing_file=backing,
        snapshots=snapshots,
        encrypted=crypt != 0,
        external_data_file=bool(incompat & QCOW2_INCOMPAT_DATA_FILE),
    )


def backing_file_id(overlay: str, facts: ImageFacts) -> tuple[int, int] | None:
    """(st_dev, st_ino) of the file an overlay's header names, relative to the overlay."""
    if not facts.backing_file:
        return None
    name = facts.backing_file
    if ":" in name.split("/", 1)[0]:
        return None  # a protocol (nbd:, json:) rather than a file
    target = Path(name) if name.startswith("/") else Path(overlay).parent / name
    try:
        st = os.stat(target)
    except OSError:
        return None
    return (st.st_dev, st.st_ino)


def neighbours(path: str, limit: int = 2000) -> list[str]:
    """Regular files beside `path` (at most `limit`): candidates for overlays on it."""
    parent = Path(path).parent
    out: list[str] = []
    try:
        with os.scandir(parent) as entries:
            for entry in entries:
                if len(out) >= limit:
                    break
                if entry.is_file(follow_symlinks=False):
                    out.append(str(parent / entry.name))
    except OSError:
        return []
    return out
