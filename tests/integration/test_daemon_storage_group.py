"""The daemon inside a storage group: its share, the offsets its sweeps use, the metric.

libvirt's test:///default driver stands in for a host; nothing is trimmed.
"""

from __future__ import annotations

import logging
from pathlib import Path

import pytest

from support.files import write_config
from virt_trimd.config.model import load_config
from virt_trimd.engine.storage_group import SweepLayout, members_digest, slot_of, sweep_offsets
from virt_trimd.records import AgentChannel, DomainInfo
from virt_trimd.service.daemon import Daemon

GROUP = (
    "storage_group:\n  name: ceph-a\n  members: [hv01, hv02, hv03]\n  host: {host}\n"
    "schedules:\n  - {{name: nightly, cron: '30 2 * * *', window: 1h, concurrency: 1}}\n"
)


def domain_info(name: str, uuid: str) -> DomainInfo:
    return DomainInfo(name, uuid, True, (), AgentChannel(configured=True, state="connected"))


def _daemon(tmp_path: Path, host: str) -> Daemon:
    cfg = write_config(
        tmp_path / "config.yaml",
        f"state_dir: {tmp_path / 'state'}\nlibvirt:\n  uri: test:///default\n"
        + GROUP.format(host=host),
    )
    return Daemon(load_config(cfg), cfg, hostname="node-7.example")


def test_a_member_starts_its_guests_in_its_share_and_exports_it(
    tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    daemon = _daemon(tmp_path, "hv02")
    sched = daemon.config.schedules[0]
    guests = [domain_info(f"vm{i}", uuid=f"uuid-{i}") for i in range(4)]
    daemon.last_duration.update({"uuid-0": 600.0, "uuid-1": 700.0})
    with caplog.at_level(logging.INFO, logger="virt_trimd"):
        offsets = daemon._sweep_offsets(sched, guests, 3600)
    slot = slot_of(daemon.config.storage_group, "hv02")
    assert slot is not None and daemon.storage_slot() == slot
    layout = SweepLayout("node-7.example", "nightly", [g.uuid for g in guests], 3600,
                         daemon.last_duration)  # fmt: skip
    assert offsets == sweep_offsets(daemon.config.storage_group, layout)[1]
    start, length = slot.seconds(3600)
    assert all((o - start) % 3600 < length for o in offsets.values())
    # 600 + 700 s at concurrency 1 does not fit a 1200 s share: the log says so.
    assert f"share {slot.index + 1} of 3" in caplog.text
    assert "took 100s more than this host's 1200s share" in caplog.text

    daemon.publish_storage_group()
    digest = members_digest(["hv01", "hv02", "hv03"])
    assert daemon.state.snapshot().storage_group == ("ceph-a", digest, slot.index + 1, 3, 1)


def test_a_host_outside_its_group_spreads_over_the_whole_window(tmp_path: Path) -> None:
    daemon = _daemon(tmp_path, "hv09")
    sched = daemon.config.schedules[0]
    guests = [domain_info(f"vm{i}", uuid=f"uuid-{i}") for i in range(20)]
    offsets = daemon._sweep_offsets(sched, guests, 3600)
    assert daemon.storage_slot() is None
    assert max(offsets.values()) - min(offsets.values()) > 1800  # not one share's 1200 s
    daemon.publish_storage_group()
    assert daemon.state.snapshot().storage_group is None
