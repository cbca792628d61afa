"""sd_notify(3) glue: readiness, reload, stop, status and watchdog messages to systemd.

Every method is a no-op (returns False) when NOTIFY_SOCKET is unset, i.e. when the
daemon runs outside a `Type=notify` service, so callers never need to check.

Messages go out as one AF_UNIX datagram each, sent non-blocking. libsystemd's
sd_notify blocks when the receiver's queue is full (the kernel queues only
`net.unix.max_dgram_qlen` datagrams, 10 by default), and a service manager that stops
reading then froze the main loop: no watchdog, no reload, SIGTERM ignored. A datagram
that cannot be sent at once is dropped and counted instead; systemd loses nothing it
relies on (a missed WATCHDOG=1 is followed by the next one, READY=1 by a timeout).
"""

from __future__ import annotations

import logging
import os
import socket
import time
from collections.abc import Callable

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.notify")

_Sender = Callable[[str], bool]


def notify_socket_address(value: str) -> str:
    """NOTIFY_SOCKET value -> address for socket.connect (AF_UNIX); raise ValueError.

    `@name` is a Linux abstract socket, spelled with a leading NUL byte in the address.
    Other schemes systemd knows (vsock: since systemd 254) are refused here.
    """
    if value.startswith("@") and len(value) > 1:
        return "\0" + value[1:]
    if value.startswith("/"):
        return value
    raise ValueError(f"unsupported NOTIFY_SOCKET address {value!r}")


def send_datagram(message: str) -> bool:
    """Send one notification as sd_notify does, but never wait for the receiver.

    Returns False when NOTIFY_SOCKET is unset; raises BlockingIOError when the
    receiver's queue is full, another OSError or ValueError on other failures.
    """
    value = os.environ.get("NOTIFY_SOCKET")
    if not value:
        return False
    address = notify_socket_address(value)
    kind = socket.SOCK_DGRAM | socket.SOCK_CLOEXEC | socket.SOCK_NONBLOCK
    with socket.socket(socket.AF_UNIX, kind) as sock:
        sock.sendto(message.encode("utf-8"), address)
    return True


def monotonic_usec() -> int:
    """CLOCK_MONOTONIC in microseconds, the clock systemd compares MONOTONIC_USEC= with."""
    return time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000


class Notifier:
    """Tells systemd about the daemon's state; every method returns whether a message went out.

    Failures to send are counted in `dropped`, logged (once until the next success) and
    never raised or waited on: a lost watchdog ping should not take the daemon down
    with it, and systemd notices anyway.
    """

    def __init__(self, sender: _Sender = send_datagram) -> None:
        """`sender` sends one message; tests may pass another."""
        self._send_raw = sender
        self._failing = False
        self.dropped = 0  # notifications not sent: receiver full, gone, or bad address

    @property
    def enabled(self) -> bool:
        """True when running under a service manager that listens (NOTIFY_SOCKET set)."""
        return bool(os.environ.get("NOTIFY_SOCKET"))

    def send(self, *assignments: str) -> bool:
        """Send raw `KEY=value` assignments as one datagram; False when unset or failed."""
        if not self.enabled:
            return False
        message = "\n".join(assignments)
        try:
            sent = self._send_raw(message)
        except (OSError, ValueError) as exc:
            self.dropped += 1
            if not self._failing:
                why = "its queue is full" if isinstance(exc, BlockingIOError) else str(exc)
                log.warning(
                    "cannot notify systemd (%s), dropped: %s", message.split("=", 1)[0], why
                )
            self._failing = True
            return False
        self._failing = False
        return sent

    def ready(self, status: str | None = None) -> bool:
        """READY=1: startup finished, or a reload finished (after `reloading()`)."""
        if status is None:
            return self.send("READY=1")
        return self.send("READY=1", _status_line(status))

    def reloading(self) -> bool:
        """RELOADING=1 with MONOTONIC_USEC=; follow with `ready()` once the reload is done.

        Type=notify-reload (systemd >= 253) requires MONOTONIC_USEC= to match the
        reload to the request; older systemd ignores the extra field.
        """
        return self.send("RELOADING=1", f"MONOTONIC_USEC={monotonic_usec()}")

    def stopping(self) -> bool:
        """STOPPING=1: shutdown has begun (systemd then shows the unit as deactivating)."""
        return self.send("STOPPING=1")

    def status(self, text: str) -> bool:
        """STATUS=text, shown by `systemctl status`."""
        return self.send(_status_line(text))

    def watchdog(self) -> bool:
        """WATCHDOG=1: the main loop is alive; send every `watchdog_interval()` seconds."""
        return self.send("WATCHDOG=1")

    @staticmethod
    def watchdog_interval() -> float | None:
        """Seconds between watchdog pings (half of WATCHDOG_USEC), or None when not asked.

        None unless WATCHDOG_USEC is a positive integer and WATCHDOG_PID is unset or
        names this process (a child that inherited the variables must not ping).
        """
        usec_text = os.environ.get("WATCHDOG_USEC")
        if not usec_text:
            return None
        pid_text = os.environ.get("WATCHDOG_PID")
        if pid_text:
            try:
                if int(pid_text) != os.getpid():
                    return None
            except ValueError:
                log.warning("ignoring watchdog: WATCHDOG_PID=%r is not a number", pid_text)
                return None
        try:
            usec = int(usec_text)
        except ValueError:
            log.warning("ignoring watchdog: WATCHDOG_USEC=%r is not a number", usec_text)
            return None
        if usec <= 0:
            return None
        return usec / 2 / 1_000_000


def _status_line(text: str) -> str:
    # A newline would end the assignment and let the rest pose as another one.
    return "STATUS=" + " ".join(text.splitlines())
