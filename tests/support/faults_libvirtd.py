"""A private libvirtd for fault tests that kill and restart libvirtd.

Other people's tests share the system libvirtd (qemu:///system); killing it would break
them. Instead this starts a *session-mode* libvirtd as the unprivileged user `nobody`,
with HOME and every XDG directory inside one private temporary directory. It is the same
libvirtd binary and QEMU driver, reached by virt-trimd over a unix socket URI
(`qemu+unix:///session?socket=...`); killing it touches nobody else. Its QEMU guests run
as `nobody` too, so the rig's root-only `<seclabel>` is dropped and their files are
chowned to `nobody`.

Like the system libvirtd, a restarted session libvirtd reattaches to the QEMU processes
that kept running while it was down.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import re
import shutil
import signal
import subprocess
import tempfile
import time
from pathlib import Path

import libvirt

import rig

USER = "nobody"


class PrivateLibvirtd:
    """`libvirtd` in session mode as `nobody`, rooted in a fresh directory under /tmp."""

    def __init__(self) -> None:
        pw = pwd.getpwnam(USER)
        self.uid, self.gid = pw.pw_uid, pw.pw_gid
        # Not pytest's tmp_path: that is 0700 root, and nobody must reach its files.
        # Short: the agent channel socket lives 60+ characters below XDG_CONFIG_HOME and
        # a unix socket path has at most 107.
        self.base = Path(tempfile.mkdtemp(prefix="vtp", dir="/tmp"))
        self.run_dir = self.base / "run"
        self.guests_dir = self.base / "guests"
        for d in (self.run_dir, self.base / "h", self.base / "c", self.guests_dir):
            d.mkdir(mode=0o700)
        self._chown(self.base)
        self.socket = self.run_dir / "libvirt" / "libvirt-sock"
        self.uri = f"qemu+unix:///session?socket={self.socket}"
        self.log_path = self.base / "libvirtd.log"
        self.proc: subprocess.Popen[bytes] | None = None
        self.starts = 0

    def _chown(self, path: Path) -> None:
        for dirpath, _dirs, files in os.walk(path):
            os.chown(dirpath, self.uid, self.gid)
            for f in files:
                os.chown(os.path.join(dirpath, f), self.uid, self.gid)

    def _env(self) -> dict[str, str]:
        home = self.base / "h"
        return {
            "HOME": str(home),
            "XDG_RUNTIME_DIR": str(self.run_dir),
            "XDG_CONFIG_HOME": str(self.base / "c"),
            "XDG_CACHE_HOME": str(home / ".cache"),
            "PATH": "/usr/sbin:/usr/bin:/sbin:/bin",
        }

    def start(self, timeout_s: float = 30) -> None:
        """Start libvirtd and wait until it answers on its socket."""
        assert self.proc is None or self.proc.poll() is not None, "already running"
        self.starts += 1
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                ["libvirtd"],
                user=self.uid,
                group=self.gid,
                extra_groups=[],
                env=self._env(),
                cwd=self.base,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise rig.RigError(
                    f"private libvirtd exited {self.proc.returncode}; see {self.log_path}"
                )
            try:
                libvirt.open(self.uri).close()
                return
            except libvirt.libvirtError:
                time.sleep(0.2)
        raise rig.RigError(f"private libvirtd did not answer within {timeout_s}s")

    def kill(self, sig: signal.Signals = signal.SIGKILL) -> None:
        """Send sig to libvirtd (SIGKILL: a crash) and wait for it to be gone."""
        assert self.proc is not None
        self.proc.send_signal(sig)
        self.proc.wait(30)

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def connect(self) -> libvirt.virConnect:
        return libvirt.open(self.uri)

    def start_guest(
        self, conn: libvirt.virConnect, spec: rig.GuestSpec, boot: rig.BootFiles
    ) -> rig.GuestHandle:
        """Like rig.start_guest, for a QEMU running as nobody: no root seclabel, files chowned."""
        images = []
        for i, disk in enumerate(spec.disks):
            img = self.guests_dir / f"{spec.domain_name}-disk{i}.{disk.fmt}"
            rig.make_disk_image(img, disk.fmt, disk.size_mib, disk.garbage_mib, label=f"data{i}")
            images.append(img)
        console = self.guests_dir / f"{spec.domain_name}.console.log"
        self._chown(self.guests_dir)
        xml = rig.domain_xml(spec, boot, images, console)
        xml = re.sub(r"<seclabel.*?</seclabel>", "", xml, flags=re.S)
        dom = conn.defineXML(xml)
        dom.create()
        return rig.GuestHandle(
            spec=spec, dom=dom, workdir=self.guests_dir, images=images, console_log=console
        )

    def close(self) -> None:
        """Destroy every domain of this libvirtd, stop it and the virtlogd it spawned."""
        if not self.running:
            with contextlib.suppress(rig.RigError):
                self.start()
        if self.running:
            try:
                conn = self.connect()
                for dom in conn.listAllDomains(0):
                    with contextlib.suppress(libvirt.libvirtError):
                        if dom.isActive():
                            dom.destroy()
                    with contextlib.suppress(libvirt.libvirtError):
                        dom.undefine()
                conn.close()
            except libvirt.libvirtError:
                pass
            self.kill(signal.SIGTERM)
        # QEMU left behind by a libvirtd that could not be restarted, and the session
        # virtlogd libvirtd spawned: all are ours, found by the pid files in our run dir.
        for pidfile in self.run_dir.rglob("*.pid"):
            with contextlib.suppress(ValueError, OSError):
                pid = int(pidfile.read_text().strip())
                if Path(f"/proc/{pid}").exists() and os.stat(f"/proc/{pid}").st_uid == self.uid:
                    os.kill(pid, signal.SIGKILL)
        shutil.rmtree(self.base, ignore_errors=True)
