"""docs/json.md shows, for each --json command, exactly the keys the command emits."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest

from virt_trimd.audit.checks import audit_domain
from virt_trimd.audit.report import audit_to_json
from virt_trimd.cli.commands import history_json, summary_json
from virt_trimd.engine.status import (
    DiskStatus,
    DomainStatus,
    LastTrim,
    StatusReport,
    status_to_json,
)
from virt_trimd.records import (
    AgentChannel,
    Disk,
    DiskRecord,
    DomainInfo,
    FilesystemResult,
    Result,
    SweepSummary,
    TrimRecord,
)

DOC = Path(__file__).resolve().parents[2] / "docs" / "json.md"


def documented() -> dict[str, Any]:
    """Section heading -> the JSON example that follows it."""
    examples: dict[str, Any] = {}
    heading = None
    for block in re.split(r"^(## .*)$", DOC.read_text(), flags=re.M):
        if block.startswith("## "):
            heading = block
            continue
        match = re.search(r"```json\n(.*?)```", block, re.S)
        if heading is not None and match:
            examples[heading] = json.loads(match.group(1))
    return examples


def key_paths(value: Any, prefix: str = "") -> set[str]:
    """Every key path in a document; list items share `[]`."""
    paths: set[str] = set()
    if isinstance(value, dict):
        for key, sub in value.items():
            paths.add(prefix + key)
            paths |= key_paths(sub, prefix + key + ".")
    elif isinstance(value, list):
        for item in value:
            paths |= key_paths(item, prefix.rstrip(".") + "[].")
    return paths


def _record() -> TrimRecord:
    disk = DiskRecord(
        disk="sda",
        path="/img/web01.qcow2",
        format="qcow2",
        bus="scsi",
        discard="unmap",
        allocated_before=2,
        allocated_after=1,
        reclaimed_bytes=1,
        virtual_size=4,
        file_size=3,
        guest_used_bytes=1,
        residual_bytes=0,
        effective=True,
    )
    return TrimRecord(
        domain="web01",
        uuid="u",
        result=Result.SUCCESS,
        message="",
        duration_seconds=1.0,
        started_at="2026-11-01T02:30:00+00:00",
        schedule="nightly",
        filesystems=(FilesystemResult("/", 1, None),),
        disks=(disk,),
    )


def _audit() -> dict[str, Any]:
    disk = Disk(
        target="sda",
        bus="scsi",
        device="disk",
        source_type="file",
        source_path="/img/x",
        driver_format="qcow2",
        discard=None,
        detect_zeroes=None,
        controller_model="virtio-scsi",
    )
    dom = DomainInfo(
        name="web01",
        uuid="u",
        running=True,
        disks=(disk,),
        agent=AgentChannel(True, "connected"),
        machine="pc-q35-7.2",
    )
    return audit_to_json([audit_domain(dom, dom, (7, 2, 0))])


def _status() -> dict[str, Any]:
    disk = DiskStatus("vda", "/img/web01.qcow2", 5, 20, 1, 1, 1.0, True)
    dom = DomainStatus(
        domain="web01",
        uuid="u",
        state="running",
        ready=True,
        last_trim=LastTrim("2026-11-29T02:30:11+00:00", "success", 3, "ok"),
        last_success_ts=2.0,
        reclaimed_bytes={1: 0, 7: 3, 30: 4},
        allocated_bytes=5,
        growth_7d_bytes=1,
        reclaimable_bytes=1,
        next_run_ts=3.0,
        next_schedule="nightly",
        reasons=(),
        needs_attention=False,
        disks=(disk,),
    )
    return status_to_json(StatusReport(10.0, 9.0, False, (dom,), 3.0))


EMITTED = {
    "## `virt-trimd trim --json` and `virt-trimd run --once --json`": lambda: summary_json(
        SweepSummary((_record(),))
    ),
    "## `virt-trimd history --json`": lambda: history_json([_record()]),
    "## `virt-trimd audit --json`": _audit,
    "## `virt-trimd status --json` and `GET /api/v1/status`": _status,
}


def test_every_json_command_has_a_documented_shape() -> None:
    assert set(documented()) == set(EMITTED)


@pytest.mark.parametrize("heading", sorted(EMITTED))
def test_documented_keys_are_the_emitted_keys(heading: str) -> None:
    emitted = json.loads(json.dumps(EMITTED[heading]()))
    assert key_paths(documented()[heading]) == key_paths(emitted)


def test_one_word_for_a_domain_and_a_disk() -> None:
    """No document names a domain `name` or a disk `target`."""
    for example in documented().values():
        leaves = {path.rsplit(".", 1)[-1] for path in key_paths(example)}
        assert "name" not in leaves and "target" not in leaves
