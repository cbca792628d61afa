"""Helpers shared by the product's end-to-end tests: run the real CLI as a subprocess."""

from __future__ import annotations

import json
import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import libvirt

import rig
from support.cli import virt_trimd

QCOW2_CLUSTER = 64 * 1024
MIB = 1 << 20


def trim_json(*args: str, timeout: float = 300) -> tuple[int, dict[str, Any], str]:
    """Run `virt-trimd trim --json ARGS`; return exit status, parsed JSON and stderr."""
    proc = virt_trimd("trim", "--json", *args, timeout=timeout)
    try:
        doc = json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(
            f"stdout is not one JSON document (exit {proc.returncode}):\n"
            f"{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        ) from exc
    return proc.returncode, doc, proc.stderr


def stat_allocated(path: Path) -> int:
    """Independent measurement: what the host filesystem holds for the image."""
    return os.stat(path).st_blocks * 512


def record_of(doc: dict[str, Any], domain: str) -> dict[str, Any]:
    """The record for one domain in a `--json` document."""
    matches = [r for r in doc["domains"] if r["domain"] == domain]
    assert len(matches) == 1, (
        f"{domain} not exactly once in {[r['domain'] for r in doc['domains']]}"
    )
    record: dict[str, Any] = matches[0]
    return record


@contextmanager
def booted_guests(
    conn: libvirt.virConnect, boot: rig.BootFiles, workdir: Path, specs: Sequence[rig.GuestSpec]
) -> Iterator[dict[str, rig.GuestHandle]]:
    """Boot `specs` in parallel, yield them by spec name, always destroy them afterwards."""
    try:
        handles = rig.start_guests(conn, specs, workdir, boot)
        yield {h.spec.name: h for h in handles}
    finally:
        for spec in specs:
            rig.destroy_guest(conn, spec.domain_name)
