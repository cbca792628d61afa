"""An AF_UNIX datagram socket standing in for systemd's NOTIFY_SOCKET, drained by a thread."""

from __future__ import annotations

import socket
import subprocess
import threading
import time
from pathlib import Path


class NotifyReceiver:
    """Collects sd_notify lines with their arrival time, as systemd would receive them.

    Drained continuously, as systemd drains its own socket: one nobody reads fills after
    `net.unix.max_dgram_qlen` datagrams (tests of that case bind their own socket).
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

    def lines(self) -> list[str]:
        """Every line received so far, in order."""
        with self._cond:
            return [m for _, m in self.messages]

    def times_of(self, line: str) -> list[float]:
        """time.monotonic() of each arrival of exactly `line`."""
        with self._cond:
            return [t for t, m in self.messages if m == line]

    def wait_for(
        self, line: str, timeout: float, proc: subprocess.Popen[bytes] | None = None
    ) -> float:
        """Arrival time of the first `line`; RuntimeError on timeout or when `proc` exits."""
        deadline = time.monotonic() + timeout
        with self._cond:
            while True:
                for at, msg in self.messages:
                    if msg == line:
                        return at
                if proc is not None and proc.poll() is not None:
                    raise RuntimeError(f"daemon exited {proc.returncode} before {line}")
                remaining = deadline - time.monotonic()
                if remaining <= 0:
                    raise RuntimeError(f"no {line} within {timeout}s")
                self._cond.wait(min(remaining, 0.2))

    def close(self) -> None:
        """Stop draining, close and remove the socket."""
        self._closed = True
        self._thread.join(2)
        self.sock.close()
        self.path.unlink(missing_ok=True)
