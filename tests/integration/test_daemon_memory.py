"""The daemon's use of what it already knows: history read back on start, fresh records."""

from __future__ import annotations

import dataclasses
import logging
import os
import time
from pathlib import Path
from typing import Any

import pytest

from support.records import trim_record
from virt_trimd.config.model import load_config
from virt_trimd.engine.history import History
from virt_trimd.records import AgentChannel, Disk, DiskRecord, DomainInfo, Result, TrimRecord
from virt_trimd.service.daemon import Daemon, guest_used_from_records


def _record(uuid: str, result: Result, duration: float, **fields: Any) -> TrimRecord:
    """This file names domains after their UUID: the daemon keys durations by UUID."""
    fields.setdefault("started_at", "2026-11-01T03:00:00Z")
    return trim_record(
        f"dom-{uuid}", result, uuid=uuid, duration_seconds=duration, schedule=None, **fields
    )


def _daemon(tmp_path: Path, retention: str = "400d", min_interval: str = "0") -> Daemon:
    cfg = tmp_path / "virt-trimd.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\nhistory_retention: {retention}\n"
        "schedules:\n  - name: nightly\n    every: 1d\n    domains: ['*']\n"
        f"    min_interval: {min_interval}\n"
    )
    return Daemon(load_config(cfg), cfg, hostname="host")


def test_last_durations_survive_a_restart_and_follow_new_trims(tmp_path: Path) -> None:
    first = _daemon(tmp_path)
    first.open_history()
    first.record(_record("u-long", Result.SUCCESS, 40.0))
    first.record(_record("u-short", Result.SUCCESS, 0.5))
    first.record(_record("u-short", Result.SKIPPED, 0.0))  # nothing was asked: no change
    first.record(_record("u-dry", Result.SUCCESS, 9.0, dry_run=True))
    first.record(_record("u-stuck", Result.AGENT_UNAVAILABLE, 5.0))  # held a worker 5 s
    assert first.last_duration == {"u-long": 40.0, "u-short": 0.5, "u-stuck": 5.0}
    assert first.history is not None
    first.history.close()

    second = _daemon(tmp_path)
    second.open_history()
    assert second.last_duration == {"u-long": 40.0, "u-short": 0.5, "u-stuck": 5.0}
    # Same start instant as the first: the later write wins.
    second.record(_record("u-long", Result.TIMEOUT, 60.0))
    assert second.last_duration["u-long"] == 60.0
    assert second.history is not None
    second.history.close()
    with History(tmp_path / "state") as hist:
        assert hist.last_duration_by_uuid()["u-long"] == 60.0


def test_start_prunes_history_past_retention_and_zero_keeps_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    with History(tmp_path / "state") as hist:
        for day in ("01", "02", "03"):
            hist.append(_record("u-a", Result.SUCCESS, 1.0, started_at=f"2020-01-{day}T03:00:00Z"))
        hist.append(_record("u-a", Result.SUCCESS, 1.0, started_at="2099-01-01T03:00:00Z"))

    keep = _daemon(tmp_path, retention="0")
    keep.open_history()
    assert keep.history is not None
    assert len(keep.history.query()) == 4
    keep.history.close()

    caplog.set_level(logging.INFO, logger="virt_trimd")
    prune = _daemon(tmp_path, retention="30d")
    prune.open_history()
    assert prune.history is not None
    assert [r.started_at for r in prune.history.query()] == ["2099-01-01T03:00:00Z"]
    prune.history.close()
    assert "history: deleted 3 trim record(s) older than 30d" in caplog.text


def test_closing_census_reuses_guest_used_from_the_trims(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """run --once's census takes guest-used bytes from the records, not a new agent call."""
    image = tmp_path / "web.raw"
    with image.open("wb") as f:
        f.write(b"\1" * (1 << 20))  # 1 MiB really allocated
    disk = Disk("vda", "virtio", "disk", "file", str(image), "raw", "unmap", None)
    dom = DomainInfo("web", "u-web", True, (disk,), AgentChannel(True, "connected"))
    daemon = _daemon(tmp_path)
    asked: list[str] = []

    def guest_filesystems(uuid: str) -> list[object]:
        asked.append(uuid)
        return []

    monkeypatch.setattr(daemon, "_list_domains", lambda: [dom])
    monkeypatch.setattr(daemon.hv, "guest_filesystems", guest_filesystems)
    rec = _record("u-web", Result.SUCCESS, 1.0)
    rec = dataclasses.replace(
        rec,
        domain="web",
        disks=(
            DiskRecord(
                disk="vda",
                path=str(image),
                format="raw",
                bus="virtio",
                discard="unmap",
                guest_used_bytes=300_000,
            ),
        ),
    )

    daemon.census(only={"web"}, known_used=guest_used_from_records([rec]))
    assert asked == []
    (state,) = daemon.state.snapshot().disks
    assert state.reclaimable_bytes == os.stat(image).st_blocks * 512 - 300_000

    daemon.census(only={"web"})  # without the records it asks the agent
    assert asked == ["u-web"]


def test_pruning_never_reaches_into_the_longest_min_interval(tmp_path: Path) -> None:
    """A retention shorter than min_interval must not let a domain be trimmed too soon."""
    now = time.time()
    started = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(now - 45 * 86400))
    with History(tmp_path / "state") as hist:
        hist.append(_record("u-a", Result.ERROR, 1.0, started_at="2020-01-01T03:00:00Z"))
        hist.append(_record("u-a", Result.PARTIAL, 1.0, started_at=started))
    daemon = _daemon(tmp_path, retention="30d", min_interval="60d")
    daemon.open_history()
    assert daemon.history is not None
    assert [r.started_at for r in daemon.history.query()] == [started]
    daemon.history.close()
    assert daemon.locks.too_soon("u-a", 60 * 86400, now) is not None


def test_restart_reads_a_zoneless_started_at_as_utc(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """min_interval after a restart must not depend on the host's zone (it did: local time)."""
    monkeypatch.setenv("TZ", "Pacific/Kiritimati")  # UTC+14: a local reading is 14 h off
    time.tzset()
    try:
        now = time.time()
        naive = time.strftime("%Y-%m-%dT%H:%M:%S", time.gmtime(now - 3600))  # no zone: UTC
        with History(tmp_path / "state") as hist:
            hist.append(_record("u-a", Result.SUCCESS, 10.0, started_at=naive))
        daemon = _daemon(tmp_path, min_interval="12h")
        daemon.open_history()
        assert daemon.history is not None
        daemon.history.close()
        since = daemon.locks.too_soon("u-a", 12 * 3600, now)
        assert since is not None
        assert since == pytest.approx(3600 - 10.0, abs=2.0)
    finally:
        monkeypatch.delenv("TZ")
        time.tzset()


def test_census_of_a_shut_off_domain_shows_the_last_guest_used_figure_from_history(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """A shut-off guest cannot be asked: the census says what the last trim read, and when."""
    image = tmp_path / "db.raw"
    with image.open("wb") as f:
        f.write(b"\1" * (1 << 20))
    disk = Disk("vda", "virtio", "disk", "file", str(image), "raw", "unmap", None)
    dom = DomainInfo("db", "u-db", False, (disk,), AgentChannel(True, None))
    used = DiskRecord("vda", str(image), "raw", "virtio", "unmap", guest_used_bytes=700_000)
    rec = dataclasses.replace(_record("u-db", Result.SUCCESS, 2.0), domain="db", disks=(used,))
    with History(tmp_path / "state") as hist:
        hist.append(rec)
    daemon = _daemon(tmp_path)
    daemon.open_history()
    monkeypatch.setattr(daemon, "_list_domains", lambda: [dom])
    daemon.census()
    (state,) = daemon.state.snapshot().disks
    assert state.allocated_bytes == os.stat(image).st_blocks * 512
    assert state.reclaimable_bytes is None  # not invented
    assert state.last_guest_used_bytes == 700_000
    assert state.last_guest_used_ts == rec.finished_ts
