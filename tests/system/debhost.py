"""Booted Debian containers with systemd as PID 1: the system tier's hosts.

A root is built once per (suite, package list, mirror) with mmdebstrap and cached under
CACHE_DIR; each container boots a fresh overlay of it (the cached root is never
written), with `systemd-nspawn -b`, and commands run inside with `nsenter`. Facts about
the test machines that shape this (their PID 1 is not systemd):
- `--register=no` (there is no machined to register with) and `--keep-unit`;
- `--timezone=copy`: otherwise /etc/localtime is a bind mount and tzdata (pulled in by
  python3-tzlocal) fails to install;
- the container shares the host's network, so the host scrapes it on loopback, and
  reaches the host's libvirtd through the bind-mounted /run/libvirt.
"""

from __future__ import annotations

import contextlib
import fcntl
import grp
import hashlib
import json
import logging
import os
import re
import shutil
import signal
import socket
import subprocess
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

log = logging.getLogger(__name__)

CACHE_DIR = Path(os.environ.get("VTRIMD_SYSTEM_CACHE", "/var/cache/virt-trimd-tests/roots"))
BASE_PACKAGES = ("systemd", "systemd-sysv", "dbus", "man-db", "ca-certificates")
INNER_ENV = (
    "PATH=/usr/sbin:/usr/bin:/sbin:/bin",
    "LANG=C.UTF-8",
    "DEBIAN_FRONTEND=noninteractive",
    "SYSTEMD_PAGER=",
    "SYSTEMD_COLORS=0",
)


class HostError(Exception):
    """A container could not be built, booted or driven; the message says why."""


def debian_mirror() -> str:
    """The Debian mirror this machine's apt already uses (VTRIMD_DEBIAN_MIRROR overrides)."""
    override = os.environ.get("VTRIMD_DEBIAN_MIRROR")
    if override:
        return override.rstrip("/")
    sources = [Path("/etc/apt/sources.list"), *sorted(Path("/etc/apt/sources.list.d").glob("*"))]
    for path in sources:
        try:
            text = path.read_text()
        except OSError:
            continue
        # deb822 ("URIs: ...") and one-line ("deb URI suite ...") formats.
        for match in re.finditer(
            r"(?m)^(?:URIs:\s*|deb\s+(?:\[[^]]*\]\s+)?)(\S+/debian)/?\s", text
        ):
            return match.group(1).rstrip("/")
    raise HostError("no Debian mirror in /etc/apt/sources.list*; set VTRIMD_DEBIAN_MIRROR")


def _root_key(suite: str, packages: Sequence[str], mirror: str) -> str:
    text = json.dumps([suite, sorted(packages), mirror, 1])
    return hashlib.sha256(text.encode()).hexdigest()[:12]


def build_root(suite: str, packages: Sequence[str] = BASE_PACKAGES) -> Path:
    """A cached Debian root for suite with packages; built with mmdebstrap when missing."""
    if shutil.which("mmdebstrap") is None:
        raise HostError("mmdebstrap is not installed; run .ci/install-deps.sh")
    mirror = debian_mirror()
    CACHE_DIR.mkdir(parents=True, exist_ok=True)
    root = CACHE_DIR / f"{suite}-{_root_key(suite, packages, mirror)}"
    with open(CACHE_DIR / ".lock", "w") as lock:
        # Two sessions on one machine build a root once, not twice into one directory.
        fcntl.flock(lock, fcntl.LOCK_EX)
        if (root / "etc" / "os-release").exists():
            return root
        tmp = root.with_name(root.name + f".tmp{os.getpid()}")
        shutil.rmtree(tmp, ignore_errors=True)
        argv = [
            "mmdebstrap",
            "--variant=apt",
            f"--include={','.join(packages)}",
            suite,
            str(tmp),
            f"deb {mirror} {suite} main",
        ]
        started = time.monotonic()
        proc = subprocess.run(argv, capture_output=True, text=True, timeout=900, check=False)
        if proc.returncode != 0:
            shutil.rmtree(tmp, ignore_errors=True)
            raise HostError(f"mmdebstrap {suite} failed: {proc.stderr[-2000:]}")
        tmp.rename(root)
        log.info("built %s root in %.0fs: %s", suite, time.monotonic() - started, root)
        return root


@dataclass
class DebianHost:
    """One booted container: an overlay of `root`, systemd as PID 1, driven by nsenter."""

    root: Path
    workdir: Path
    name: str
    binds: Sequence[Path] = ()
    leader: int = 0
    _nspawn: subprocess.Popen[bytes] | None = field(default=None, repr=False)

    @property
    def fs(self) -> Path:
        """The container's / as seen from the host (the overlay's merged directory)."""
        return self.workdir / "merged"

    def boot(self, timeout_s: float = 90) -> None:
        """Mount the overlay, start systemd-nspawn -b, wait until systemd is up."""
        for sub in ("upper", "work", "merged"):
            (self.workdir / sub).mkdir(parents=True, exist_ok=True)
        upper, work = self.workdir / "upper", self.workdir / "work"
        opts = f"lowerdir={self.root},upperdir={upper},workdir={work}"
        subprocess.run(["mount", "-t", "overlay", "overlay", "-o", opts, str(self.fs)], check=True)
        argv = [
            "systemd-nspawn",
            "-q",
            "-b",
            "-D",
            str(self.fs),
            f"--machine={self.name}",
            "--register=no",
            "--keep-unit",
            "--timezone=copy",
            "--bind=/run/libvirt",
            *(f"--bind={p}" for p in self.binds),
        ]
        console = open(self.workdir / "console.log", "wb")  # noqa: SIM115 - owned by Popen
        self._nspawn = subprocess.Popen(
            argv, stdin=subprocess.DEVNULL, stdout=console, stderr=subprocess.STDOUT
        )
        deadline = time.monotonic() + timeout_s
        while not self.leader:
            if self._nspawn.poll() is not None:
                raise HostError(f"systemd-nspawn exited: {self.console_tail()}")
            self.leader = self._find_leader()
            if time.monotonic() > deadline:
                raise HostError(f"no container init after {timeout_s}s: {self.console_tail()}")
            time.sleep(0.1)
        state = ""
        while not state:
            # Empty until the container's systemd answers on its private bus.
            left = max(1.0, deadline - time.monotonic())
            state = self.run(
                "systemctl", "is-system-running", "--wait", check=False, timeout_s=left
            ).stdout.strip()
            if not state and time.monotonic() > deadline:
                break
            if not state:
                time.sleep(0.2)
        if state not in ("running", "degraded"):
            raise HostError(f"container systemd is {state!r}: {self.console_tail()}")
        if state == "degraded":
            failed = self.run("systemctl", "--failed", "--no-legend", check=False).stdout
            log.warning("%s booted degraded: %s", self.name, failed.strip())

    def _find_leader(self) -> int:
        """The container's PID 1 as the host sees it: nspawn's child, once it is systemd.

        nspawn's first child is a helper that sets up namespaces before it forks the
        init; entering that one too early gets a half-made container.
        """
        assert self._nspawn is not None
        own_ns = os.readlink("/proc/self/ns/pid")
        for children in Path(f"/proc/{self._nspawn.pid}/task").glob("*/children"):
            with contextlib.suppress(OSError):
                for pid in children.read_text().split():
                    comm = Path(f"/proc/{pid}/comm").read_text().strip()
                    if comm == "systemd" and os.readlink(f"/proc/{pid}/ns/pid") != own_ns:
                        return int(pid)
        return 0

    def console_tail(self, lines: int = 30) -> str:
        """The last lines nspawn and the container's console printed."""
        try:
            text = (self.workdir / "console.log").read_text(errors="replace")
        except OSError:
            return "(no console log)"
        return "\n".join(text.splitlines()[-lines:])

    def run(
        self,
        *argv: str,
        check: bool = True,
        timeout_s: float = 300,
        input_text: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        """Run argv inside the container (all its namespaces, a clean environment)."""
        full = ["nsenter", "-t", str(self.leader), "-a", "env", "-i", *INNER_ENV, *argv]
        proc = subprocess.run(
            full,
            capture_output=True,
            text=True,
            timeout=timeout_s,
            check=False,
            input=input_text,
        )
        if check and proc.returncode != 0:
            raise HostError(
                f"{self.name}: {' '.join(argv)} exited {proc.returncode}:\n"
                f"{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
            )
        return proc

    def sh(self, script: str, check: bool = True, timeout_s: float = 300) -> str:
        """Run a shell script inside (sh -e); return its stdout."""
        return self.run("sh", "-ec", script, check=check, timeout_s=timeout_s).stdout

    def write(self, path: str, text: str, mode: int = 0o644) -> None:
        """Write a file inside the container, owned by root."""
        target = self.fs / path.lstrip("/")
        target.parent.mkdir(parents=True, exist_ok=True)
        target.write_text(text)
        target.chmod(mode)

    def copy_in(self, src: Path, dest_dir: str = "/root") -> str:
        """Copy a host file into the container; return its path inside."""
        target = self.fs / dest_dir.lstrip("/") / src.name
        target.parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(src, target)
        return f"{dest_dir.rstrip('/')}/{src.name}"

    def unit(self, unit: str, *props: str) -> dict[str, str]:
        """`systemctl show -p ...` as a dict."""
        names = props or ("ActiveState", "SubState", "NRestarts", "MainPID", "Result")
        out = self.run("systemctl", "show", unit, "-p", ",".join(names)).stdout
        return dict(line.split("=", 1) for line in out.splitlines() if "=" in line)

    def journal(self, unit: str, cursor: str | None = None) -> list[dict[str, object]]:
        """The unit's journal entries as JSON objects (after cursor, if given)."""
        argv = ["journalctl", "-u", unit, "-o", "json", "--no-pager"]
        if cursor:
            argv += ["--after-cursor", cursor]
        out = self.run(*argv).stdout
        return [json.loads(line) for line in out.splitlines() if line.strip()]

    def journal_text(self, unit: str, cursor: str | None = None) -> str:
        """The unit's journal as plain messages, one per line."""
        return "\n".join(str(e.get("MESSAGE", "")) for e in self.journal(unit, cursor))

    def diagnose(self, unit: str) -> str:
        """systemctl status and the journal's tail, for a failure message."""
        status = self.run("systemctl", "status", "--no-pager", "-l", unit, check=False).stdout
        return f"{status}\n--- journal ---\n{self.journal_text(unit)[-4000:]}"

    def wait_active(self, unit: str, timeout_s: float = 60) -> None:
        """Wait until unit is active (running); HostError with its status and journal."""
        try:
            wait_until(
                f"{unit} running", lambda: self.unit(unit)["SubState"] == "running", timeout_s
            )
        except HostError as exc:
            raise HostError(f"{exc}\n{self.diagnose(unit)}") from None

    def cursor(self) -> str:
        """The journal's current end, to read only what comes after."""
        out = self.run("journalctl", "-n", "1", "-o", "json", "--no-pager").stdout.strip()
        return str(json.loads(out.splitlines()[-1])["__CURSOR"]) if out else ""

    def shutdown(self, timeout_s: float = 60) -> None:
        """Power the container off (SIGTERM to nspawn), then unmount and remove the overlay."""
        if self._nspawn is not None and self._nspawn.poll() is None:
            self._nspawn.send_signal(signal.SIGTERM)
            try:
                self._nspawn.wait(timeout=timeout_s)
            except subprocess.TimeoutExpired:
                self._nspawn.kill()
                self._nspawn.wait(timeout=30)
        if os.path.ismount(self.fs):
            subprocess.run(["umount", "--lazy", str(self.fs)], check=False)
        shutil.rmtree(self.workdir, ignore_errors=True)


DEFAULT_METRICS_PORT = 9742
_PORT_LOCK = Path("/run/lock/virt-trimd-test-port-9742.lock")


@contextlib.contextmanager
def default_port(timeout_s: float = 600) -> Iterator[None]:
    """Hold the host's 127.0.0.1:9742 for one container at a time.

    The package starts its service on install with the shipped config, which listens on
    127.0.0.1:9742, and containers share the host's network: two at once (two releases,
    two fleet hosts, two test sessions) would collide and one service would crash-loop.
    Callers hold this from `apt install` until their config moves the daemon elsewhere.
    """
    _PORT_LOCK.parent.mkdir(parents=True, exist_ok=True)
    with open(_PORT_LOCK, "w") as lock:
        deadline = time.monotonic() + timeout_s
        while True:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
                break
            except BlockingIOError:
                if time.monotonic() > deadline:
                    raise HostError(f"{_PORT_LOCK} held for {timeout_s:g}s") from None
                time.sleep(0.5)
        wait_until(
            f"127.0.0.1:{DEFAULT_METRICS_PORT} to be free on the host",
            lambda: _port_free(DEFAULT_METRICS_PORT),
            60,
        )
        yield


def _port_free(port: int) -> bool:
    with socket.socket() as s:
        s.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
        try:
            s.bind(("127.0.0.1", port))
        except OSError:
            return False
        return True


def wait_until(what: str, predicate: object, timeout_s: float, interval_s: float = 0.5) -> object:
    """Poll predicate() until it returns something truthy; HostError naming `what` after timeout."""
    assert callable(predicate)
    deadline = time.monotonic() + timeout_s
    last: object = None
    while time.monotonic() < deadline:
        last = predicate()
        if last:
            return last
        time.sleep(interval_s)
    raise HostError(f"timed out after {timeout_s:g}s waiting for {what} (last: {last!r})")


@contextlib.contextmanager
def booted(
    suite: str, workdir: Path, binds: Sequence[Path] = (), name: str | None = None
) -> Iterator[DebianHost]:
    """A freshly booted container of suite; always shut down and removed afterwards."""
    host = DebianHost(
        root=build_root(suite),
        workdir=workdir,
        name=name or f"vtrimd-test-{suite}-{os.getpid()}",
        binds=binds,
    )
    try:
        host.boot()
        yield host
    finally:
        host.shutdown()


def add_libvirt_group(host: DebianHost) -> None:
    """Give the container the host's libvirt group (same number), as libvirt-daemon-system
    would on a real host: the socket's group is checked by number.

    Written into /etc/group directly: a minimal Debian 13 has no groupadd (passwd).
    """
    gid = grp.getgrnam("libvirt").gr_gid
    host.sh(f"echo 'libvirt:x:{gid}:' >>/etc/group && echo 'libvirt:!::' >>/etc/gshadow")
