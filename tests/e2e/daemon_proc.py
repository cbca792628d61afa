"""Run `virt-trimd run` as a real subprocess with a real NOTIFY_SOCKET, and scrape it."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

from prometheus_client.parser import text_string_to_metric_families

from support.cli import cli_env
from support.notify import NotifyReceiver

T = TypeVar("T")


class DaemonProc:
    """`python -m virt_trimd run --config FILE` with stderr captured to a log file."""

    def __init__(self, config: Path, workdir: Path, watchdog_usec: int | None = None) -> None:
        self.config = config
        self.log_path = workdir / "daemon.log"
        self.notify = NotifyReceiver(workdir / "notify.sock")
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
