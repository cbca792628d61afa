"""Running `virt-trimd run` as a real subprocess with a real NOTIFY_SOCKET."""

from __future__ import annotations

import signal
import subprocess
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import IO

import rig
from bench.common import env_with_package
from support.notify import NotifyReceiver


def daemon_config(  # noqa: PLR0913  (keyword-only knobs with defaults)
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
    names = ", ".join(repr(d) for d in domains) if domains else f"'{rig.session_prefix()}bench-*'"
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


class Daemon:
    """`python -m virt_trimd run --config FILE`, stderr to a log file."""

    def __init__(
        self, config: Path, log_path: Path, notify: NotifyReceiver | None, level: str = "INFO"
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
