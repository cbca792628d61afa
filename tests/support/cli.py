"""Running this checkout's `virt-trimd` as a subprocess, as an operator would."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]


def cli_env() -> dict[str, str]:
    """Environment that runs this checkout's package, whatever is installed."""
    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT / "daemon"), env.get("PYTHONPATH", "")])
    env.pop("NOTIFY_SOCKET", None)
    env.pop("JOURNAL_STREAM", None)
    return env


def virt_trimd(*args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    """Run `virt-trimd ARGS` from this checkout and capture its output."""
    return subprocess.run(
        [sys.executable, "-m", "virt_trimd", *args],
        capture_output=True,
        text=True,
        timeout=timeout,
        env=cli_env(),
        check=False,
    )
