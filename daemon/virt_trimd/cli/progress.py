"""A live progress line for long commands (trim --all, audit): done/total, in flight, elapsed.

Only on a terminal: redirected output and --json get nothing extra. The line is
rewritten in place (CR, erase to end of line) and erased before the result is printed.
"""

from __future__ import annotations

import threading
import time
from typing import TextIO

from virt_trimd.escaping import escape_cell

_ERASE = "\r\x1b[K"


class Progress:
    """Thread-safe: sweep workers call `start` and `done` concurrently."""

    def __init__(self, total: int, out: TextIO, *, enabled: bool | None = None) -> None:
        self.total = total
        self._out = out
        isatty = getattr(out, "isatty", None)
        self.enabled = bool(isatty and isatty()) if enabled is None else enabled
        self._done = 0
        self._in_flight: list[str] = []
        self._t0 = time.monotonic()
        self._lock = threading.Lock()

    def start(self, name: str) -> None:
        """`name` begins."""
        with self._lock:
            self._in_flight.append(name)
            self._draw()

    def done(self, name: str) -> None:
        """`name` has finished (whatever its result)."""
        with self._lock:
            self._done += 1
            if name in self._in_flight:
                self._in_flight.remove(name)
            self._draw()

    def finish(self) -> None:
        """Erase the line, so what is printed next starts clean."""
        with self._lock:
            if self.enabled:
                self._out.write(_ERASE)
                self._out.flush()

    def _draw(self) -> None:
        if not self.enabled:
            return
        # Guest-chosen names are escaped and cut, so the line stays one terminal line.
        names = ", ".join(escape_cell(n, 32) for n in self._in_flight[:3])
        if len(self._in_flight) > 3:
            names += f" +{len(self._in_flight) - 3}"
        elapsed = time.monotonic() - self._t0
        self._out.write(f"{_ERASE}[{self._done}/{self.total}] {names or '-'} {elapsed:.0f}s")
        self._out.flush()
