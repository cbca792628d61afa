"""The daemon's growth triggers at census: real images, real census, a fake trimmer.

What the e2e test (tests/e2e/test_growth_trigger.py) cannot reach cheaply: the
reclaimable trigger, min_interval holding a trigger back, and a helpful trim ending
the backoff and moving the growth baseline.
"""

from __future__ import annotations

import dataclasses
import os
import threading
import time
from pathlib import Path

import pytest

from virt_trimd.config.model import load_config
from virt_trimd.engine.trim import TrimOptions
from virt_trimd.host.agent import GuestFilesystem
from virt_trimd.records import AgentChannel, Disk, DiskRecord, DomainInfo, Result, TrimRecord
from virt_trimd.service.daemon import Daemon

MIB = 1 << 20


class FakeTrimmer:
    """Stands in for DomainTrimmer: reports what the image holds, as `effective` says."""

    def __init__(self, image: Path, effective: bool, shrink_to: int | None = None) -> None:
        self.image = image
        self.effective = effective
        self.shrink_to = shrink_to
        self.calls: list[TrimOptions] = []

    def trim(self, dom: DomainInfo, opts: TrimOptions) -> TrimRecord:
        self.calls.append(opts)
        before = os.stat(self.image).st_blocks * 512
        if self.shrink_to is not None:
            with self.image.open("r+b") as fh:
                fh.truncate(self.shrink_to)
        after = os.stat(self.image).st_blocks * 512
        disk = DiskRecord(
            "vda", str(self.image), "raw", "virtio", "unmap",
            allocated_before=before, allocated_after=after, reclaimed_bytes=before - after,
            effective=self.effective,
        )  # fmt: skip
        return TrimRecord(
            dom.name, dom.uuid, Result.SUCCESS, "", "2026-11-01T03:00:00Z", 1.0,
            disks=(disk,), schedule=opts.schedule, trigger=opts.trigger,
        )  # fmt: skip


def _image(path: Path, mib: int) -> Path:
    with path.open("wb") as fh:
        fh.write(os.urandom(mib * MIB))
    return path


def _setup(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, schedule: str, used: int = 0
) -> tuple[Daemon, DomainInfo, Path]:
    image = _image(tmp_path / "web.raw", 8)
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nschedules:\n  - name: g\n{schedule}")
    daemon = Daemon(load_config(cfg), cfg, hostname="host")
    disk = Disk("vda", "virtio", "disk", "file", str(image), "raw", "unmap", None)
    dom = DomainInfo("web", "u-web", True, (disk,), AgentChannel(True, "connected"))
    monkeypatch.setattr(daemon, "_list_domains", lambda: [dom])
    fs = GuestFilesystem("/", "ext4", ("vda",), used, 64 * MIB)
    monkeypatch.setattr(daemon.hv, "guest_filesystems", lambda uuid: [fs])
    return daemon, dom, image


def _census(daemon: Daemon) -> None:
    """One census, then wait for the triggered trim it may have started."""
    daemon.census()
    for thread in threading.enumerate():
        if thread.name.startswith("trigger-"):
            thread.join(30)


def test_reclaimable_trigger_then_backoff_after_an_ineffective_trim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, _dom, image = _setup(tmp_path, monkeypatch, "    reclaimable: 4MiB\n", used=1 * MIB)
    fake = FakeTrimmer(image, effective=False)
    daemon.trimmer = fake  # type: ignore[assignment]
    _census(daemon)
    assert [o.trigger for o in fake.calls] == ["reclaimable"]
    # An ineffective trim does not move the growth baseline: the guest is as full.
    assert daemon.growth_baseline["u-web"] == 8 * MIB
    assert daemon.state.snapshot().trigger_backoff_until_ts.keys() == {"web"}
    assert "1 domain(s) in trigger backoff" in daemon._status_text()
    _census(daemon)
    _census(daemon)
    assert len(fake.calls) == 1  # backing off, though still as reclaimable


def test_min_interval_holds_a_trigger_back(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    daemon, dom, image = _setup(
        tmp_path, monkeypatch, "    reclaimable: 4MiB\n    min_interval: 1h\n", used=0
    )
    fake = FakeTrimmer(image, effective=True)
    daemon.trimmer = fake  # type: ignore[assignment]
    daemon.locks.release(dom.uuid, trimmed_at=time.time())
    _census(daemon)
    assert fake.calls == []


def test_growth_from_the_first_census_and_a_helpful_trim_moves_the_baseline(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, _dom, image = _setup(tmp_path, monkeypatch, "    every: 1d\n    growth: 4MiB\n")
    fake = FakeTrimmer(image, effective=True, shrink_to=0)
    daemon.trimmer = fake  # type: ignore[assignment]
    _census(daemon)  # first sight: the baseline, no trim
    assert fake.calls == [] and daemon.growth_baseline["u-web"] == 8 * MIB
    with image.open("ab") as fh:
        fh.write(os.urandom(2 * MIB))
    _census(daemon)
    assert fake.calls == []  # grew 2 MiB of 4
    with image.open("ab") as fh:
        fh.write(os.urandom(3 * MIB))
    _census(daemon)
    assert [o.trigger for o in fake.calls] == ["growth"]
    assert daemon.growth_baseline["u-web"] == 0  # after the trim that gave it back
    assert daemon.state.snapshot().trigger_backoff_until_ts == {}
    # Keys are (domain, method, trigger, result).
    assert daemon.state.snapshot().reclaims_total == {("web", "agent", "growth", "success"): 1}
    _census(daemon)
    assert len(fake.calls) == 1


def test_a_trigger_only_schedule_installs_no_time_job(tmp_path: Path) -> None:
    cfg = tmp_path / "c.yaml"
    cfg.write_text(f"state_dir: {tmp_path / 'state'}\nschedules:\n  - name: g\n    growth: 1GiB\n")
    config = load_config(cfg)
    daemon = Daemon(dataclasses.replace(config, census_interval_seconds=0), cfg, hostname="h")
    daemon.start_scheduler()
    try:
        assert daemon.scheduler is not None
        assert [j.id for j in daemon.scheduler.get_jobs()] == ["history-prune"]
    finally:
        daemon.scheduler.shutdown(wait=False)  # type: ignore[union-attr]


def _restart(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, dom: DomainInfo) -> Daemon:
    """A new daemon over the same config, state directory and (untouched) image."""
    cfg = tmp_path / "c.yaml"
    daemon = Daemon(load_config(cfg), cfg, hostname="host")
    monkeypatch.setattr(daemon, "_list_domains", lambda: [dom])
    fs = GuestFilesystem("/", "ext4", ("vda",), 0, 64 * MIB)
    monkeypatch.setattr(daemon.hv, "guest_filesystems", lambda uuid: [fs])
    daemon.open_history()
    return daemon


def test_a_restart_keeps_the_growth_baseline_of_the_last_helpful_trim(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    daemon, dom, image = _setup(tmp_path, monkeypatch, "    every: 1d\n    growth: 4MiB\n")
    daemon.open_history()
    fake = FakeTrimmer(image, effective=True, shrink_to=0)
    daemon.trimmer = fake  # type: ignore[assignment]
    _census(daemon)  # baseline 8 MiB
    with image.open("ab") as fh:
        fh.write(os.urandom(5 * MIB))
    _census(daemon)  # grew 5 MiB: trimmed down to 0, which the history keeps
    assert [o.trigger for o in fake.calls] == ["growth"]
    assert daemon.history is not None
    daemon.history.close()

    restarted = _restart(tmp_path, monkeypatch, dom)
    assert restarted.growth_baseline == {"u-web": 0}
    # An ineffective trim after it must not become the baseline after the next restart.
    with image.open("ab") as fh:
        fh.write(os.urandom(3 * MIB))
    restarted.record(FakeTrimmer(image, effective=False).trim(dom, fake.calls[0]))
    assert restarted.history is not None
    restarted.history.close()

    again = _restart(tmp_path, monkeypatch, dom)
    assert again.growth_baseline == {"u-web": 0}
    # 3 MiB above the restored baseline: not yet. 2 MiB more and the trigger fires, where
    # a baseline taken at the first census after the restart would wait for 4 MiB more.
    trimmer = FakeTrimmer(image, effective=True)
    again.trimmer = trimmer  # type: ignore[assignment]
    _census(again)
    assert trimmer.calls == []
    with image.open("ab") as fh:
        fh.write(os.urandom(2 * MIB))
    _census(again)
    assert [o.trigger for o in trimmer.calls] == ["growth"]
    assert again.history is not None
    again.history.close()
