"""Storage groups: disjoint, stable shares of the window without a coordinator."""

from __future__ import annotations

import dataclasses
import io
import textwrap
from pathlib import Path

import pytest

from virt_trimd.cli.commands import EXIT_OK, EXIT_USAGE, main
from virt_trimd.config.model import ConfigError, StorageGroupConfig, load_config, parse_config
from virt_trimd.engine.schedule import spread_offset
from virt_trimd.engine.storage_group import (
    StorageSlot,
    SweepLayout,
    group_warnings,
    members_digest,
    overrun_seconds,
    ring_order,
    slot_of,
    slot_offsets,
    sweep_offsets,
)

HOSTS = [f"hv{i:03d}" for i in range(50)]


def _group(members: list[str], at_once: int = 1, name: str = "ceph-a") -> StorageGroupConfig:
    return StorageGroupConfig(name=name, members=tuple(members), at_once=at_once)


def _covers(slot: StorageSlot, point: float) -> bool:
    """True if the circular share contains ``point`` (a fraction of the window)."""
    return (point - slot.start_fraction) % 1.0 < slot.length_fraction


def _slots(group: StorageGroupConfig) -> dict[str, StorageSlot]:
    slots = {h: slot_of(group, h) for h in group.members}
    assert all(s is not None for s in slots.values())
    return {h: s for h, s in slots.items() if s is not None}


@pytest.mark.parametrize(("n", "at_once"), [(1, 1), (3, 1), (10, 3), (50, 1), (50, 7), (4, 9)])
def test_shares_cover_every_moment_exactly_at_once_times(n: int, at_once: int) -> None:
    slots = _slots(_group(HOSTS[:n], at_once))
    # Sample between share boundaries (multiples of 1/n) to avoid edge rounding.
    for k in range(4 * n):
        point = (k + 0.5) / (4 * n)
        covering = sum(_covers(s, point) for s in slots.values())
        assert covering == min(at_once, n), (point, covering)


def test_the_layout_does_not_depend_on_how_the_inventory_lists_the_members() -> None:
    forward = _slots(_group(HOSTS))
    backward = _slots(_group(list(reversed(HOSTS))))
    assert forward == backward
    assert ring_order("ceph-a", HOSTS) == ring_order("ceph-a", reversed(HOSTS))
    assert members_digest(HOSTS) == members_digest(reversed(HOSTS))
    assert members_digest(HOSTS) != members_digest(HOSTS[:-1])
    # ... but it does depend on the group, so two groups are not laid out alike.
    assert ring_order("ceph-a", HOSTS) != ring_order("nfs-b", HOSTS)


@pytest.mark.parametrize("change", ["add", "remove"])
def test_one_member_more_or_less_moves_every_other_share_by_less_than_a_share(
    change: str,
) -> None:
    before = _slots(_group(HOSTS))
    after = _slots(_group([*HOSTS, "hv-new"] if change == "add" else HOSTS[1:]))
    share = 1 / len(HOSTS)
    order_before = [h for h in ring_order("ceph-a", HOSTS) if h in after]
    order_after = [h for h in ring_order("ceph-a", after) if h in before]
    assert order_before == order_after  # the others keep their ring order
    for host in set(before) & set(after):
        moved = abs(before[host].start_fraction - after[host].start_fraction)
        assert min(moved, 1 - moved) < share * 1.05, host
        # ... and still overlaps where it was (on the circle: one start is in the other).
        assert _covers(before[host], after[host].start_fraction) or _covers(
            after[host], before[host].start_fraction
        ), host


def test_a_host_outside_the_group_has_no_share() -> None:
    assert slot_of(_group(HOSTS), "elsewhere") is None
    assert slot_of(StorageGroupConfig(), "hv000") is None


def test_guests_are_placed_evenly_inside_the_share_and_keep_their_place() -> None:
    group = _group(HOSTS[:4])
    slot = slot_of(group, "hv002")
    assert slot is not None
    uuids = [f"uuid-{i}" for i in range(10)]
    offsets = slot_offsets(slot, SweepLayout("hv002", "nightly", uuids, 3600))
    backwards = SweepLayout("hv002", "nightly", list(reversed(uuids)), 3600)
    assert offsets == slot_offsets(slot, backwards)
    start, length = slot.seconds(3600)
    assert length == 900
    assert all(_covers(slot, o / 3600) for o in offsets.values())
    gaps = sorted((o - start) % 3600 for o in offsets.values())
    assert gaps == pytest.approx([90.0 * i for i in range(10)])


def test_a_share_that_wraps_continues_at_the_window_start() -> None:
    slot = StorageSlot("g", 1, 3, 2, start_fraction=2 / 3, length_fraction=2 / 3)
    offsets = slot_offsets(slot, SweepLayout("h", "s", ["a", "b", "c", "d"], 3000))
    assert sorted(offsets.values()) == pytest.approx([0.0, 500.0, 2000.0, 2500.0])


def test_without_a_window_everything_starts_at_once() -> None:
    slot = slot_of(_group(HOSTS[:2]), "hv000")
    assert slot is not None
    assert slot_offsets(slot, SweepLayout("hv000", "s", ["a", "b"], 0)) == {"a": 0.0, "b": 0.0}


def test_warnings_for_what_one_host_can_see() -> None:
    assert group_warnings(_group(["hv01", "hv02"]), "hv01") == []
    assert group_warnings(StorageGroupConfig(), "hv01") == []
    (outside,) = group_warnings(_group(["hv01", "hv02"]), "hv03")
    assert "('hv03') is not in members" in outside and "storage_group.host" in outside
    (twice,) = group_warnings(_group(["hv01", "HV01.example.com", "hv02"]), "hv01")
    assert "same host listed twice" in twice
    (dup_warning, *_) = group_warnings(_group(["hv01", "hv01", "hv02"]), "hv01")
    assert "more than once" in dup_warning
    (all_at_once,) = group_warnings(_group(["hv01", "hv02"], at_once=2), "hv01")
    assert "every member may trim at any time" in all_at_once


def test_config_reads_the_group() -> None:
    config = parse_config(
        "storage_group:\n  name: ceph-a\n  members: [hv01, hv02]\n  host: hv01\n  at_once: 2\n"
    )
    assert config.storage_group == StorageGroupConfig("ceph-a", ("hv01", "hv02"), "hv01", 2)
    assert parse_config("").storage_group == StorageGroupConfig()
    unnamed = parse_config("storage_group:\n  members: [hv01]\n").storage_group
    assert unnamed.label == "default" and slot_of(unnamed, "hv01") is not None


@pytest.mark.parametrize(
    ("text", "fragment"),
    [
        ("storage_group:\n  name: 'a b'\n", "F:2: storage_group.name: use 1 to 64 letters"),
        ("storage_group:\n  at_once: 0\n", "F:2: storage_group.at_once: must be at least 1"),
        ("storage_group:\n  members: ['']\n", "must not be empty"),
        ("storage_group:\n  member: [hv01]\n", "F:2: storage_group: unknown key 'member'"),
    ],
)
def test_config_errors_have_file_and_line(tmp_path: Path, text: str, fragment: str) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(text)
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert fragment in str(info.value).replace(str(path), "F"), str(info.value)


def test_check_config_shows_the_share_and_warns_but_passes(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "c.yaml"
    path.write_text(
        textwrap.dedent(
            """\
            storage_group:
              name: ceph-a
              members: [hv01, hv02, hv03, hv04]
              host: hv09
            """
        )
    )
    path.chmod(0o600)
    out = io.StringIO()
    assert main(["check-config", "--config", str(path)], out=out) == EXIT_OK
    digest = members_digest(["hv01", "hv02", "hv03", "hv04"])
    assert f"storage group ceph-a (members {digest}): " in out.getvalue()
    assert "hv09: not a member" in out.getvalue()
    assert "('hv09') is not in members" in capsys.readouterr().err
    path.write_text(path.read_text().replace("hv09", "hv03"))
    out = io.StringIO()
    assert main(["check-config", "--config", str(path)], out=out) == EXIT_OK
    assert "hv03: share " in out.getvalue() and "of 4, from" in out.getvalue()
    path.write_text(path.read_text() + "schedules:\n  - {name: often, every: 1h, window: 30m}\n")
    assert main(["check-config", "--config", str(path)], out=io.StringIO()) == EXIT_OK
    assert "schedule often uses every:" in capsys.readouterr().err
    path.write_text(path.read_text().replace("name: ceph-a", "name: 'x y'"))
    assert main(["check-config", "--config", str(path)], out=io.StringIO()) == EXIT_USAGE


def test_sweep_offsets_fall_back_to_per_host_spreading_outside_the_group() -> None:
    uuids = [f"uuid-{i}" for i in range(5)]
    group = _group(["hv01", "hv02"])
    slot, offsets = sweep_offsets(group, SweepLayout("elsewhere", "nightly", uuids, 3600))
    assert slot is None
    assert offsets == {u: spread_offset("elsewhere", "nightly", u, 3600) for u in uuids}
    slot, offsets = sweep_offsets(group, SweepLayout("hv01", "nightly", uuids, 3600))
    assert slot is not None and slot == slot_of(group, "hv01")
    assert offsets == slot_offsets(slot, SweepLayout("hv01", "nightly", uuids, 3600))
    # storage_group.host names this host in members when its hostname differs.
    renamed = dataclasses.replace(group, host="hv02")
    slot, _ = sweep_offsets(renamed, SweepLayout("node-7.local", "nightly", uuids, 3600))
    assert slot == slot_of(group, "hv02")
    # Without a window nothing is spread, in or out of a group.
    assert sweep_offsets(group, SweepLayout("hv01", "nightly", uuids, 0)) == (
        None,
        dict.fromkeys(uuids, 0.0),
    )


def test_guests_get_room_in_proportion_to_their_last_trim() -> None:
    slot = StorageSlot("g", 0, 2, 1, start_fraction=0.0, length_fraction=0.5)
    layout = SweepLayout("h", "s", ["a", "b", "c"], 1200, {"a": 10.0, "b": 30.0})
    offsets = slot_offsets(slot, layout)
    order = sorted(offsets, key=offsets.__getitem__)
    room = {
        u: later - offsets[u]
        for u, later in zip(order, [offsets[u] for u in order[1:]] + [600.0], strict=True)
    }
    # c has no history and counts as the average (20 s); the share (600 s) is filled.
    assert room == pytest.approx({"a": 100.0, "b": 300.0, "c": 200.0})
    assert overrun_seconds(slot, layout) == 0.0
    busy = SweepLayout("h", "s", ["a", "b"], 1200, {"a": 400.0, "b": 500.0})
    assert overrun_seconds(slot, busy) == pytest.approx(300.0)
    assert overrun_seconds(slot, busy, concurrency=2) == 0.0
