"""Run `virt-trimd run` as a real subprocess with a real NOTIFY_SOCKET, and scrape it."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from e2e.helpers import cli_env

T = TypeVar("T")


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class Notifications:
    """An AF_UNIX datagram socket the daemon sends sd_notify messages to."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
        self.sock.bind(str(path))
        self.sock.settimeout(0.2)
        self.messages: list[tuple[float, str]] = []
        self._lock = threading.Lock()
        self._stop = False
        self._thread = threading.Thread(target=self._read, daemon=True)
        self._thread.start()

    def _read(self) -> None:
        while not self._stop:
            try:
                data = self.sock.recv(65536)
            except TimeoutError:
                continue
            except OSError:
                return
            with self._lock:
                for line in data.decode().splitlines():
                    self.messages.append((time.monotonic(), line))

    def lines(self) -> list[str]:
        with self._lock:
            return [m for _, m in self.messages]

    def times_of(self, line: str) -> list[float]:
        with self._lock:
            return [t for t, m in self.messages if m == line]

    def close(self) -> None:
        self._stop = True
        self._thread.join(2)
        self.sock.close()


class DaemonProc:
    """`python -m virt_trimd run --config FILE` with stderr captured to a log file."""

    def __init__(self, config: Path, workdir: Path, watchdog_usec: int | None = None) -> None:
        self.config = config
        self.log_path = workdir / "daemon.log"
        self.notify = Notifications(workdir / "notify.sock")
        env = cli_env()
        env["NOTIFY_SOCKET"] = str(self.notify.path)
        if watchdog_usec is not None:
            env["WATCHDOG_USEC"] = str(watchdog_usec)
        self._log = open(self.log_path, "w")  # noqa: SIM115 - closed in stop()
        self.proc = subprocess.Popen(
            [
                sys.executable,
                "-m",
                "virt_trimd",
                "--log-level",
                "DEBUG",
                "run",
                "--config",
                str(config),
            ],
            stdout=self._log,
            stderr=subprocess.STDOUT,
            env=env,
        )
        self.port: int | None = None

    def log(self) -> str:
        return self.log_path.read_text(errors="replace")

    def wait_ready(self, timeout: float = 30) -> None:
        wait_for(
            lambda: "READY=1" in self.notify.lines() or self.proc.poll() is not None,
            timeout,
            "READY=1",
        )
        assert self.proc.poll() is None, f"daemon exited {self.proc.returncode}:\n{self.log()}"

    def signal(self, sig: signal.Signals) -> None:
        self.proc.send_signal(sig)

    def stop(self, timeout: float = 60) -> int:
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
        try:
            code = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            code = self.proc.wait()
        self._log.close()
        self.notify.close()
        return code


def scrape(port: int) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """GET /metrics over real HTTP; {(sample name, sorted labels): value}."""
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
        text = resp.read().decode()
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for fam in text_string_to_metric_families(text):
        for s in fam.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    """One sample's value from a scrape, None when absent."""
    return metrics.get((name, tuple(sorted(labels.items()))))


def wait_for(pred: Callable[[], T], timeout: float, what: str, interval: float = 0.25) -> T:
    """Poll pred until truthy; AssertionError naming `what` on timeout."""
    deadline = time.monotonic() + timeout
    last: T = pred()
    while not last:
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)
        last = pred()
    return last


def write_config(path: Path, text: str) -> Path:
    """Write a config file the daemon will accept (not group/other writable)."""
    path.write_text(text)
    os.chmod(path, 0o600)
    return path
