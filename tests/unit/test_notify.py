"""Notifier against a real AF_UNIX datagram socket standing in for systemd."""

from __future__ import annotations

import logging
import os
import socket
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest

from virt_trimd.service.notify import Notifier, notify_socket_address


class Listener:
    """A bound datagram socket playing the service manager's notify socket."""

    def __init__(self, sock: socket.socket, env_value: str) -> None:
        self.sock = sock
        self.env_value = env_value

    def recv(self) -> bytes:
        return self.sock.recv(4096)

    def nothing_pending(self) -> bool:
        self.sock.setblocking(False)
        try:
            self.sock.recv(4096)
        except BlockingIOError:
            return True
        finally:
            self.sock.setblocking(True)
        return False


@pytest.fixture(params=["path", "abstract"])
def listener(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Listener]:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.settimeout(5)
    if request.param == "path":
        address = str(tmp_path / "notify.sock")
        env_value = address
    else:
        name = f"virt-trimd-test-{uuid.uuid4().hex}"
        address = "\0" + name
        env_value = "@" + name
    sock.bind(address)
    monkeypatch.setenv("NOTIFY_SOCKET", env_value)
    try:
        yield Listener(sock, env_value)
    finally:
        sock.close()


def test_ready_stopping_status_watchdog_datagrams(listener: Listener) -> None:
    notifier = Notifier()
    assert notifier.ready() is True
    assert listener.recv() == b"READY=1"
    assert notifier.ready("watching 3 domains")
    assert listener.recv() == b"READY=1\nSTATUS=watching 3 domains"
    assert notifier.status("sweep nightly: 2/5 done")
    assert listener.recv() == b"STATUS=sweep nightly: 2/5 done"
    assert notifier.watchdog()
    assert listener.recv() == b"WATCHDOG=1"
    assert notifier.stopping()
    assert listener.recv() == b"STOPPING=1"
    assert listener.nothing_pending()


def test_reloading_carries_monotonic_usec(listener: Listener) -> None:
    notifier = Notifier()
    before = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    assert notifier.reloading()
    after = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    first, second = listener.recv().split(b"\n")
    assert first == b"RELOADING=1"
    key, value = second.split(b"=")
    assert key == b"MONOTONIC_USEC"
    assert before <= int(value) <= after


def test_status_newlines_cannot_inject_assignments(listener: Listener) -> None:
    notifier = Notifier()
    assert notifier.status("line one\nREADY=1")
    assert listener.recv() == b"STATUS=line one READY=1"


def test_noop_when_notify_socket_unset(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("NOTIFY_SOCKET", raising=False)
    notifier = Notifier()
    assert notifier.enabled is False
    assert notifier.ready() is False
    assert notifier.reloading() is False
    assert notifier.stopping() is False
    assert notifier.status("x") is False
    assert notifier.watchdog() is False


def test_missing_socket_is_logged_once_not_raised(
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    caplog: pytest.LogCaptureFixture,
) -> None:
    monkeypatch.setenv("NOTIFY_SOCKET", str(tmp_path / "gone.sock"))
    notifier = Notifier()
    with caplog.at_level(logging.WARNING, logger="virt_trimd.notify"):
        assert notifier.watchdog() is False
        assert notifier.watchdog() is False
    warnings = [r for r in caplog.records if "cannot notify systemd" in r.getMessage()]
    assert len(warnings) == 1
    assert "WATCHDOG" in warnings[0].getMessage()


def test_notify_socket_address_forms() -> None:
    assert notify_socket_address("/run/systemd/notify") == "/run/systemd/notify"
    assert notify_socket_address("@abstract") == "\0abstract"
    with pytest.raises(ValueError, match="vsock"):
        notify_socket_address("vsock:2:1234")


def test_watchdog_interval_is_half_of_watchdog_usec(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    assert Notifier.watchdog_interval() == 30.0
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid()))
    assert Notifier.watchdog_interval() == 30.0


def test_watchdog_interval_none_for_other_pid(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("WATCHDOG_USEC", "60000000")
    # systemd sets WATCHDOG_PID to the main process; a child that inherited it must not ping.
    monkeypatch.setenv("WATCHDOG_PID", str(os.getpid() + 1))
    assert Notifier.watchdog_interval() is None


@pytest.mark.parametrize("value", [None, "", "0", "abc", "-5"])
def test_watchdog_interval_none_when_not_usable(
    monkeypatch: pytest.MonkeyPatch, value: str | None
) -> None:
    monkeypatch.delenv("WATCHDOG_PID", raising=False)
    if value is None:
        monkeypatch.delenv("WATCHDOG_USEC", raising=False)
    else:
        monkeypatch.setenv("WATCHDOG_USEC", value)
    assert Notifier.watchdog_interval() is None


def test_a_notify_socket_nobody_reads_never_blocks(listener: Listener) -> None:
    """The kernel queues max_dgram_qlen datagrams; past that, sends are dropped and counted.

    Run in a child process: libsystemd's blocking sd_notify held the GIL while it waited,
    so it froze every thread (the /metrics server too), and a thread here would hang the
    test run instead of failing it.
    """
    qlen = int(Path("/proc/sys/net/unix/max_dgram_qlen").read_text())
    total = qlen + 50
    code = (
        "from virt_trimd.service.notify import Notifier\n"
        "n = Notifier()\n"
        f"sent = sum(n.watchdog() for _ in range({total}))\n"
        "print(sent, n.dropped)\n"
    )
    env = {**os.environ, "NOTIFY_SOCKET": listener.env_value}
    # Not a speed target: a blocked send never returns, so any generous bound tells.
    child = subprocess.run(
        [sys.executable, "-c", code],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert child.returncode == 0, child.stderr
    sent, dropped = map(int, child.stdout.split())
    assert sent + dropped == total
    assert dropped >= total - qlen - 1 > 0
    queued = 0
    while not listener.nothing_pending():
        queued += 1
    assert queued == sent  # every datagram sent is there, none half-sent
    # Once the reader has caught up, notifications flow again.
    notifier = Notifier()
    assert notifier.ready() is True
    assert listener.recv() == b"READY=1"
