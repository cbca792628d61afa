"""No human-facing output carries a raw control character from a name, path or message.

Domain names and image paths are chosen by whoever defines a domain, messages and
mountpoints partly by the guest. Each output is fed ESC, CR and newlines and must come
out with every line printable and the hostile text visible in escaped form.
"""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import pytest

from virt_trimd.audit.checks import audit_domain
from virt_trimd.audit.report import format_audit_table
from virt_trimd.cli import commands as cli
from virt_trimd.records import AgentChannel, Disk, DiskRecord, DomainInfo, Result, TrimRecord

NAME = "web\x1b[2J\rnew\nline"
PATH = "/var/lib/libvirt/images/\x1b]0;owned\x07x.qcow2"
MESSAGE = "agent said \x1b[31mred\r\nforged line"
ESCAPED_NAME = "web\\x1b[2J\\rnew\\nline"


def _assert_clean(text: str) -> None:
    assert "\x1b" not in text and "\r" not in text and "\x07" not in text
    for line in text.splitlines():
        assert line.isprintable(), repr(line)


def _disk() -> Disk:
    return Disk(
        target="sd\x1ba",
        bus="scsi",
        device="disk",
        source_type="file",
        source_path=PATH,
        driver_format="qcow2",
        discard=None,
        detect_zeroes=None,
    )


def _domain() -> DomainInfo:
    return DomainInfo(
        name=NAME,
        uuid="u-1",
        running=True,
        disks=(_disk(),),
        agent=AgentChannel(configured=True, state="connected"),
        machine="pc-q35-7.2",
    )


def _record() -> TrimRecord:
    disk = DiskRecord(
        disk="sd\x1ba",
        path=PATH,
        format="qcow2",
        bus="scsi",
        discard=None,
        allocated_before=2 << 20,
        allocated_after=1 << 20,
        reclaimed_bytes=1 << 20,
    )
    return TrimRecord(
        domain=NAME,
        uuid="u-1",
        result=Result.PARTIAL,
        message=MESSAGE,
        started_at="2026-11-01T03:00:00Z",
        duration_seconds=1.0,
        disks=(disk,),
        schedule="nightly",
    )


def test_audit_table_and_details_are_escaped() -> None:
    text = format_audit_table([audit_domain(_domain(), _domain(), (7, 2, 0))])
    _assert_clean(text)
    assert ESCAPED_NAME in text and "\\x1b]0;owned\\x07" in text


def test_trim_table_is_escaped() -> None:
    text = cli.format_table([_record()])
    _assert_clean(text)
    assert ESCAPED_NAME in text and "\\x1b[31mred\\r\\nforged" in text


def test_history_table_is_escaped() -> None:
    text = cli.format_history_table([_record()])
    _assert_clean(text)
    assert ESCAPED_NAME in text


class _FakeHypervisor:
    """Stands in for libvirt: `schedules` only lists domains."""

    def __init__(self, _uri: str) -> None:
        pass

    def connect(self) -> None:
        pass

    def close(self) -> None:
        pass

    def list_domains(self) -> list[DomainInfo]:
        return [_domain()]


def test_schedules_output_is_escaped(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text("schedules:\n  - name: nightly\n    every: 1d\n")
    fake: Any = _FakeHypervisor
    monkeypatch.setattr("virt_trimd.host.hypervisor.Hypervisor", fake)
    out = io.StringIO()
    assert cli.main(["schedules", "--config", str(cfg)], out=out) == 0
    _assert_clean(out.getvalue())
    assert ESCAPED_NAME in out.getvalue()
