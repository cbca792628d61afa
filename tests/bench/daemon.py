"""Running `virt-trimd run` as a real subprocess with a real NOTIFY_SOCKET."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

from bench.common import env_with_package


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, text: str) -> Path:
    """A config file `run` accepts (not writable by group or others)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def daemon_config(
    state_dir: Path,
    port: int,
    domains: Sequence[str],
    *,
    uri: str = "qemu:///system",
    concurrency: int = 1,
    cron: str | None = "30 2 * * *",
    every: str | None = None,
    census_interval: str | None = None,
) -> str:
    """A config with one schedule over exactly `domains` (nothing else on the host)."""
    when = f"cron: {cron!r}" if every is None else f"every: {every}"
    names = ", ".join(repr(d) for d in domains) if domains else "'vtrimd-test-bench-*'"
    text = (
        f"libvirt:\n  uri: {uri}\n"
        f"metrics:\n  listen: 127.0.0.1:{port}\n"
        f"state_dir: {state_dir}\n"
        "shutdown_grace: 5s\n"
    )
    if census_interval is not None:
        text += f"census_interval: {census_interval}\n"
    text += (
        "schedules:\n"
        "  - name: bench\n"
        f"    {when}\n"
        f"    domains: [{names}]\n"
        f"    concurrency: {concurrency}\n"
        "    timeout: 2m\n"
    )
    return text


class NotifySocket:
    """The AF_UNIX datagram socket systemd would give a Type=notify service.

    Drained by a thread, as systemd drains its own: a datagram socket nobody reads
    fills after ~10 messages, and then the daemon's sd_notify() blocks.
    """

    def __init__(self, path: Path) -> None:
        path.unlink(missing_ok=True)
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._cond = threading.Condition()
        self._closed = False
        self._thread = threading.Thread(target=self._drain, name="notify", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        while not self._closed:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            now = time.monotonic()
            with self._cond:
                self.messages.extend((now, m) for m in data.decode(errors="replace").splitlines())
                self._cond.notify_all()

    def wait_for(self, line: str, timeout: float, proc: subprocess.Popen[bytes]) -> float:
        """time.monotonic() at which `line` (e.g. READY=1) arrived; RuntimeError if not."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, msg in self.messages:
                    if msg == line:
                        return at
                if proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode} before {line}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"no {line} within {timeout}s")
                self._cond.wait(min(remaining, 0.2))

    def close(self) -> None:
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)


class Daemon:
    """`python -m virt_trimd run --config FILE`, stderr to a log file."""

    def __init__(
        self, config: Path, log_path: Path, notify: NotifySocket | None, level: str = "INFO"
    ) -> None:
        env = env_with_package()
        if notify is not None:
            env["NOTIFY_SOCKET"] = str(notify.path)
        self.log_path = log_path
        self._log: IO[str] = open(log_path, "w")  # noqa: SIM115 - closed in stop()
        self.started = time.monotonic()
        self.proc: subprocess.Popen[bytes] = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "virt_trimd",
                "--log-level",
                level,
                "run",
                "--config",
                str(config),
            ],
            stdin=subprocess.DEVNULL,
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def stop(self, timeout: float = 30) -> int:
        """SIGTERM, wait; SIGKILL after timeout. Returns the exit status."""
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        return code

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")
