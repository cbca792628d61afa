"""Files the daemon reads: config files it accepts, ports it can bind."""

from __future__ import annotations

import os
import socket
from pathlib import Path


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def write_config(path: Path, text: str) -> Path:
    """A config file `run` accepts (0600: the daemon refuses group/other-writable files)."""
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)
    os.chmod(path, 0o600)
    return path


def write_web_config(directory: Path, text: str, name: str = "web-config.yml") -> Path:
    """An exporter-toolkit web config file in `directory`."""
    return write_config(directory / name, text)
