"""The fleet simulation's smoke run: small fleets, the real placement code, no clocks."""

from __future__ import annotations

from sim.fleet import NOISES, Night, main, markdown_table, share_violations, simulate
from virt_trimd.config.model import StorageGroupConfig


def test_same_cron_without_spreading_starts_every_host_at_once() -> None:
    same, _, _ = simulate(3, 4, Night(concurrency=2, noise=0.0))
    assert same.strategy == "same-cron"
    assert same.peak == 3 * 2
    assert min(t.start_seconds for t in same.trims) == 0.0


def test_storage_group_trims_start_inside_their_shares() -> None:
    for noise in NOISES:
        outcomes = simulate(10, 20, Night(concurrency=2, noise=noise))
        group_night = outcomes[-1]
        assert group_night.strategy == "storage-group" and group_night.at_once is not None
        group = StorageGroupConfig(
            name="shared",
            members=tuple(sorted({t.host for t in group_night.trims})),
            at_once=group_night.at_once,
        )
        assert len(group_night.trims) == 10 * 20
        assert share_violations(group_night, group) == []
        per_host = outcomes[1]
        assert group_night.peak <= per_host.peak
        assert all(o.late_hosts == 0 for o in outcomes if o.strategy == "storage-group")


def test_the_table_and_the_command() -> None:
    table = markdown_table(simulate(3, 4))
    assert table.count("\n") == 2 + 3
    assert main(["--smoke"]) == 0
