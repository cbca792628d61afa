"""Under systemd, log records go to journald with DOMAIN/RESULT/RECLAIMED_BYTES fields.

No journald runs on this rig (systemd is not PID 1), so the test binds the journal's
native socket itself and reads what systemd-python's JournalHandler really sends.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

JOURNAL_SOCKET = Path("/run/systemd/journal/socket")
ROOT = Path(__file__).resolve().parents[2]


def _parse_native(datagram: bytes) -> dict[str, str]:
    """Journal native protocol: KEY=value lines, or KEY\\n<le64 size><data>\\n for binary."""
    fields: dict[str, str] = {}
    i = 0
    while i < len(datagram):
        nl = datagram.index(b"\n", i)
        line = datagram[i:nl]
        if b"=" in line:
            key, _, value = line.partition(b"=")
            fields[key.decode()] = value.decode()
            i = nl + 1
        else:
            size = int.from_bytes(datagram[nl + 1 : nl + 9], "little")
            fields[line.decode()] = datagram[nl + 9 : nl + 9 + size].decode()
            i = nl + 9 + size + 1
    return fields


@pytest.fixture
def journal() -> Iterator[socket.socket]:
    if JOURNAL_SOCKET.exists():
        pytest.skip("a real journald owns /run/systemd/journal/socket here; not intercepting it")
    JOURNAL_SOCKET.parent.mkdir(parents=True, exist_ok=True)
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    sock.bind(str(JOURNAL_SOCKET))
    sock.settimeout(10)
    try:
        yield sock
    finally:
        sock.close()
        JOURNAL_SOCKET.unlink(missing_ok=True)


def test_trim_logs_structured_fields_to_journald(journal: socket.socket) -> None:
    env = dict(os.environ, PYTHONPATH=str(ROOT / "daemon"), JOURNAL_STREAM="8:12345")
    proc = subprocess.run(
        [
            sys.executable,
            "-m",
            "virt_trimd",
            "--log-level",
            "INFO",
            "trim",
            "--connect",
            "test:///default",
            "test",
        ],
        capture_output=True,
        text=True,
        env=env,
        timeout=60,
        check=False,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""  # everything went to the journal, nothing to stderr
    records = []
    journal.settimeout(2)
    try:
        while True:
            records.append(_parse_native(journal.recv(1 << 20)))
    except TimeoutError:
        pass
    trims = [r for r in records if r.get("RESULT")]
    assert len(trims) == 1, records
    (rec,) = trims
    assert rec["DOMAIN"] == "test"
    assert rec["RESULT"] == "agent_missing"
    # test:///default's disk image does not exist on this host: not measured, never 0.
    assert "RECLAIMED_BYTES" not in rec
    assert "cannot stat" in rec["NOT_MEASURED"]
    assert "reclaimed: not measured" in rec["MESSAGE"]
    assert rec["SYSLOG_IDENTIFIER"] == "virt-trimd"
    assert rec["PRIORITY"] == "6"  # info
    assert "agent_missing" in rec["MESSAGE"]
