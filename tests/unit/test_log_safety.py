"""Guest-chosen text comes out safe: one log line per record, valid JSON, exact labels.

Domain names may hold quotes, tabs, backslashes and any Unicode (libvirt refuses only
newlines); guest mountpoints and agent error texts may hold anything at all. None of it
may forge a log line, break the JSON of `--json`/history, or a Prometheus exposition.
"""

from __future__ import annotations

import io
import json
import logging
import re
from collections.abc import Iterator

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from virt_trimd.cli.commands import setup_logging
from virt_trimd.engine.state import State
from virt_trimd.engine.trim import log_record
from virt_trimd.escaping import SafeFormatter, escape_control
from virt_trimd.host.agent import parse_fstrim_return
from virt_trimd.records import DiskRecord, Result, TrimRecord
from virt_trimd.web.collector import TrimdCollector

FORGED = "2026-01-01 00:00:00,000 CRITICAL virt_trimd.service: forged by a guest"
DOMAIN = "web 'q' \"dq\" \\ é ü 日本 \t tab"  # what libvirt accepts in a name
MOUNTPOINT = f"/mnt/x\n{FORGED}\r\x1b[2J\x1b[31mred\u202eevil\u2028sep\x00nul"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")


def test_escape_control() -> None:
    assert escape_control("plain é 日本 'q' \"dq\" \\") == "plain é 日本 'q' \"dq\" \\"
    assert escape_control("a\nb\rc\td") == "a\\nb\\rc\\td"
    assert escape_control("\x1b[31m\x00\x7f") == "\\x1b[31m\\x00\\x7f"
    assert escape_control("\u202e\u2028\u2029\u200b") == "\\u202e\\u2028\\u2029\\u200b"
    assert escape_control("\U000e0001") == "\\U000e0001"
    assert escape_control(MOUNTPOINT).isprintable()


@pytest.fixture
def stderr_log() -> Iterator[io.StringIO]:
    """The daemon's own stderr logging setup, writing into a buffer."""
    buf = io.StringIO()
    setup_logging("DEBUG", force_stderr=True)
    root = logging.getLogger()
    (handler,) = root.handlers
    assert isinstance(handler, logging.StreamHandler)
    handler.setStream(buf)
    yield buf
    root.handlers.clear()


def _hostile_record() -> TrimRecord:
    filesystems = parse_fstrim_return(
        {
            "paths": [
                {"path": MOUNTPOINT, "error": f"trim failed\n{FORGED}"},
                {"path": '/"quoted"', "trimmed": 4096},
            ]
        }
    )
    return TrimRecord(
        domain=DOMAIN,
        uuid="u",
        result=Result.PARTIAL,
        message="; ".join(f"{f.mountpoint}: {f.error}" for f in filesystems),
        started_at="2026-01-01T00:00:00.000Z",
        duration_seconds=1.0,
        filesystems=filesystems,
        disks=(
            DiskRecord(
                disk="sda",
                path=f"/img/{DOMAIN}\n.qcow2",
                format="qcow2",
                bus="scsi",
                discard="unmap",
                allocated_before=2,
                allocated_after=1,
                reclaimed_bytes=1,
            ),
        ),
    )


def test_trim_log_lines_cannot_be_forged(stderr_log: io.StringIO) -> None:
    log_record(_hostile_record())
    lines = stderr_log.getvalue().splitlines()
    assert len(lines) == 2  # the record and its per-disk debug line
    assert all(LINE.match(line) for line in lines), lines
    assert not any(line.startswith(FORGED) for line in lines)
    assert "\x1b" not in stderr_log.getvalue() and "\u202e" not in stderr_log.getvalue()
    assert DOMAIN.replace("\t", "\\t") in lines[0]  # readable, not mangled
    assert "forged by a guest" in lines[0]  # still there to read, on the guest's line


def test_traceback_lines_are_indented_and_escaped(stderr_log: io.StringIO) -> None:
    try:
        raise RuntimeError(f"agent said\n{FORGED}\x1b[2J")
    except RuntimeError:
        logging.getLogger("virt_trimd.sweep").exception("unexpected error trimming %s", DOMAIN)
    first, *rest = stderr_log.getvalue().splitlines()
    assert LINE.match(first)
    assert rest and all(line.startswith("  ") for line in rest), rest
    assert "\x1b" not in stderr_log.getvalue()


def test_journal_messages_are_escaped_too(monkeypatch: pytest.MonkeyPatch) -> None:
    # systemd-python is a dependency of the package: missing, this must fail, not skip.
    import systemd.journal  # noqa: F401

    monkeypatch.setenv("JOURNAL_STREAM", "8:1234")
    setup_logging("INFO")
    try:
        (handler,) = logging.getLogger().handlers
        assert isinstance(handler.formatter, SafeFormatter)
        record = logging.LogRecord(
            "virt_trimd.trim", logging.INFO, "f", 1, "%s", (MOUNTPOINT,), None
        )
        message = handler.format(record)
    finally:
        logging.getLogger().handlers.clear()
    assert "\n" not in message and message.isprintable()


def test_formatter_leaves_the_record_alone() -> None:
    record = logging.LogRecord("x", logging.INFO, "f", 1, "%s", (MOUNTPOINT,), None)
    SafeFormatter("%(message)s").format(record)
    assert record.getMessage() == MOUNTPOINT  # other handlers still see the real text


def test_json_round_trips_hostile_text_exactly() -> None:
    record = _hostile_record()
    for text in (
        json.dumps(record.to_dict()),
        json.dumps(record.to_dict(), ensure_ascii=False),  # what history stores
    ):
        assert "\n" not in text and "\x1b" not in text
        back = TrimRecord.from_dict(json.loads(text))
        assert back == record
        assert back.filesystems[0].mountpoint == MOUNTPOINT


def test_prometheus_labels_round_trip_hostile_text_exactly() -> None:
    state = State()
    state.observe_trim(_hostile_record())
    registry = CollectorRegistry(auto_describe=False)
    registry.register(TrimdCollector(state, "0"))
    text = generate_latest(registry).decode()
    samples = [s for fam in text_string_to_metric_families(text) for s in fam.samples]
    # One line per sample, HELP and TYPE: nothing in a label broke a line.
    assert len(text.splitlines()) == len(samples) + 2 * len(
        list(text_string_to_metric_families(text))
    )
    guest = {
        s.labels["mountpoint"]: s.value
        for s in samples
        if s.name == "virt_trimd_guest_trimmed_bytes_total"
    }
    assert guest == {'/"quoted"': 4096.0}
    trims = [s for s in samples if s.name == "virt_trimd_trims_total"]
    assert [(s.labels["domain"], s.labels["result"]) for s in trims] == [(DOMAIN, "partial")]
    (info,) = [s for s in samples if s.name == "virt_trimd_disk_info"]
    assert info.labels["path"] == f"/img/{DOMAIN}\n.qcow2"
