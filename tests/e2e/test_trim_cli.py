"""`virt-trimd trim` against real guests, checked against independent os.stat."""

from __future__ import annotations

import datetime as dt
import json
import re
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

import rig
from e2e.helpers import MIB, QCOW2_CLUSTER, booted_guests, record_of, stat_allocated, trim_json
from rig import DiskSpec, GuestSpec
from support.cli import virt_trimd
from support.files import free_port, write_config
from virt_trimd.engine.history import History

SCSI = GuestSpec("cli-scsi", disks=(DiskSpec(fmt="qcow2", bus="scsi", discard="unmap"),))
TWO = GuestSpec(
    "cli-two",
    disks=(
        DiskSpec(fmt="qcow2", bus="virtio", discard="unmap", garbage_mib=120),
        DiskSpec(fmt="raw", bus="scsi", discard="unmap", garbage_mib=150),
    ),
)
NOAGENT = GuestSpec("cli-noagent", disks=(DiskSpec(garbage_mib=0, size_mib=128),), agent="none")
SILENT = GuestSpec(
    "cli-silent", disks=(DiskSpec(garbage_mib=0, size_mib=128),), agent="channel_only"
)
OFF = GuestSpec("cli-off", disks=(DiskSpec(garbage_mib=0, size_mib=128),))


@pytest.fixture(scope="module")
def guests(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, rig.GuestHandle]]:
    """All guests of this module, booted in parallel once; OFF is shut off after boot."""
    specs = [SCSI, TWO, NOAGENT, SILENT, OFF]
    with booted_guests(libvirt_conn, rig_boot, tmp_path_factory.mktemp("cli"), specs) as by_name:
        by_name["cli-off"].dom.destroy()
        yield by_name


def test_dry_run_measures_and_changes_nothing(guests: dict[str, rig.GuestHandle]) -> None:
    g = guests["cli-scsi"]
    image = g.images[0]
    before = stat_allocated(image)
    status, doc, _ = trim_json("--dry-run", g.name)
    after = stat_allocated(image)
    assert status == 0
    rec = record_of(doc, g.name)
    assert rec["result"] == "skipped" and rec["dry_run"] is True
    assert rec["filesystems"] == []
    (disk,) = rec["disks"]
    assert abs(disk["allocated_before"] - before) <= QCOW2_CLUSTER
    assert disk["allocated_after"] is None and disk["reclaimed_bytes"] is None
    assert after == before  # nothing on disk changed
    assert before >= 200 * MIB  # the garbage is still there to reclaim


def test_qcow2_virtio_scsi_reclaim_matches_os_stat(guests: dict[str, rig.GuestHandle]) -> None:
    g = guests["cli-scsi"]
    image = g.images[0]
    before = stat_allocated(image)
    status, doc, stderr = trim_json(g.name)
    after = stat_allocated(image)
    assert status == 0, stderr
    rec = record_of(doc, g.name)
    assert rec["result"] == "success", rec["message"]
    independent = before - after
    assert independent >= 150 * MIB, "the rig's garbage did not come back"
    (disk,) = rec["disks"]
    assert (disk["disk"], disk["bus"], disk["format"], disk["discard"]) == (
        "sda",
        "scsi",
        "qcow2",
        "unmap",
    )
    assert disk["path"] == str(image)
    assert abs(disk["reclaimed_bytes"] - independent) <= QCOW2_CLUSTER
    assert disk["allocated_after"] == after
    assert disk["virtual_size"] == 1024 * MIB
    assert disk["file_size"] == image.stat().st_size
    assert rec["reclaimed_bytes"] == disk["reclaimed_bytes"]
    assert doc["reclaimed_bytes"] == rec["reclaimed_bytes"]
    trimmed = [f for f in rec["filesystems"] if f["trimmed_bytes"]]
    assert trimmed and rec["guest_trimmed_bytes"] >= 150 * MIB
    assert rec["started_at"].endswith("Z") and rec["duration_seconds"] > 0


def test_two_disks_virtio_blk_and_raw(guests: dict[str, rig.GuestHandle]) -> None:
    g = guests["cli-two"]
    before = [stat_allocated(p) for p in g.images]
    status, doc, stderr = trim_json(g.name)
    after = [stat_allocated(p) for p in g.images]
    assert status == 0, stderr
    rec = record_of(doc, g.name)
    assert rec["result"] == "success", rec["message"]
    disks = {d["disk"]: d for d in rec["disks"]}
    assert set(disks) == {"vda", "sda"}
    assert (disks["vda"]["bus"], disks["vda"]["format"]) == ("virtio", "qcow2")
    assert (disks["sda"]["bus"], disks["sda"]["format"]) == ("scsi", "raw")
    for target, i, garbage in (("vda", 0, 120), ("sda", 1, 150)):
        independent = before[i] - after[i]
        assert independent >= (garbage - 30) * MIB, f"{target}: {independent}"
        assert abs(disks[target]["reclaimed_bytes"] - independent) <= QCOW2_CLUSTER
    assert disks["sda"]["virtual_size"] == disks["sda"]["file_size"] == 1024 * MIB
    assert rec["reclaimed_bytes"] == sum(d["reclaimed_bytes"] for d in rec["disks"])


def test_no_agent_channel_is_agent_missing(guests: dict[str, rig.GuestHandle]) -> None:
    g = guests["cli-noagent"]
    status, doc, _ = trim_json(g.name)
    rec = record_of(doc, g.name)
    assert rec["result"] == "agent_missing"
    assert "org.qemu.guest_agent.0" in rec["message"]
    assert status == 0  # missing agent is a configuration finding, not a failure
    assert rec["disks"][0]["allocated_before"] > 0


def test_channel_without_agent_is_unavailable_within_timeout(
    guests: dict[str, rig.GuestHandle],
) -> None:
    g = guests["cli-silent"]
    status, doc, _ = trim_json("--timeout", "20s", g.name, timeout=60)
    rec = record_of(doc, g.name)
    assert rec["result"] == "agent_unavailable", rec["message"]
    assert rec["duration_seconds"] < 20
    assert status == 1


def test_shut_off_domain_is_not_running(guests: dict[str, rig.GuestHandle]) -> None:
    g = guests["cli-off"]
    status, doc, _ = trim_json(g.name)
    assert record_of(doc, g.name)["result"] == "not_running"
    assert status == 0


def test_unknown_domain_is_a_usage_error(guests: dict[str, rig.GuestHandle]) -> None:
    proc = virt_trimd("trim", rig.TEST_PREFIX + "does-not-exist")
    assert proc.returncode == 2
    assert "unknown domain" in proc.stderr and "does-not-exist" in proc.stderr
    assert proc.stdout == ""


def test_table_output(guests: dict[str, rig.GuestHandle]) -> None:
    g = guests["cli-scsi"]
    proc = virt_trimd("trim", "--dry-run", g.name)
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.splitlines()
    assert lines[0].split() == ["DOMAIN", "DISK", "BEFORE", "AFTER", "RECLAIMED", "RESULT"]
    assert lines[1].split()[:2] == [g.name, "sda"] and lines[1].split()[-1] == "skipped"
    assert "MiB" in lines[1] and "total reclaimed" in proc.stdout


def test_all_selects_every_running_domain_and_measures_like_os_stat(
    guests: dict[str, rig.GuestHandle],
) -> None:
    """`--all --dry-run`: read-only for every domain, so it holds on a shared host.

    Other sessions' domains may be running: a dry run lists and measures them but sends
    no agent command, and only our own guests' numbers are compared.
    """
    images = {h.name: {p: stat_allocated(p) for p in h.images} for h in guests.values()}
    status, doc, stderr = trim_json("--all", "--dry-run", timeout=120)
    names = {r["domain"] for r in doc["domains"]}
    ours_running = {h.name for h in guests.values() if h.name != guests["cli-off"].name}
    assert ours_running <= names, stderr  # every running guest of ours was selected
    assert guests["cli-off"].name not in names  # running only: not the shut-off guest
    assert doc["reclaimed_bytes"] == sum(r["reclaimed_bytes"] for r in doc["domains"]) == 0
    for name in ours_running:
        rec = record_of(doc, name)
        assert rec["dry_run"] is True
        measured = {d["path"]: d["allocated_before"] for d in rec["disks"] if d["path"]}
        for path, allocated in images[name].items():
            assert abs(measured[str(path)] - allocated) <= QCOW2_CLUSTER, (name, path)
    assert record_of(doc, guests["cli-scsi"].name)["result"] == "skipped"
    assert record_of(doc, guests["cli-noagent"].name)["result"] == "agent_missing"
    assert status == 1  # cli-silent is agent_unavailable, dry run or not


GARBAGE = GuestSpec(
    "cli-garbage",
    disks=(DiskSpec(fmt="qcow2", bus="scsi", discard="unmap", garbage_mib=100),),
)


def test_trim_reclaims_its_own_garbage_as_os_stat_sees_it_two_at_once(
    guests: dict[str, rig.GuestHandle], guest_factory: rig.GuestFactory
) -> None:
    """A guest booted for this test alone holds 100 MiB of deleted garbage, whatever
    earlier tests trimmed; `--concurrency 2` runs its trim and another one at once."""
    (fresh,) = guest_factory(GARBAGE)
    other = guests["cli-scsi"]
    paths = [*fresh.images, *other.images]
    before = {p: stat_allocated(p) for p in paths}
    status, doc, stderr = trim_json("--concurrency", "2", fresh.name, other.name)
    after = {p: stat_allocated(p) for p in paths}
    assert status == 0, stderr
    rec = record_of(doc, fresh.name)
    assert rec["result"] == "success", rec
    independent = sum(before[p] - after[p] for p in fresh.images)
    assert independent >= 80 * MIB  # the garbage really went
    assert abs(rec["reclaimed_bytes"] - independent) <= QCOW2_CLUSTER * len(fresh.images)
    assert doc["reclaimed_bytes"] == sum(r["reclaimed_bytes"] for r in doc["domains"])
    # Two workers: each trim started before the other one ended.
    spans = [
        (dt.datetime.fromisoformat(r["started_at"]).timestamp(), r["duration_seconds"])
        for r in doc["domains"]
    ]
    (s1, d1), (s2, _) = sorted(spans)
    assert s2 < s1 + d1, spans


def test_bad_config_is_exit_2(tmp_path: Path) -> None:
    cfg = tmp_path / "bad.yaml"
    cfg.write_text("libvirt:\n  uri: 5\nbogus: 1\n")
    proc = virt_trimd("trim", "--config", str(cfg), "--all")
    assert proc.returncode == 2
    assert f"{cfg}:3: " in proc.stderr and "unknown key 'bogus'" in proc.stderr
    assert f"{cfg}:2: libvirt.uri" in proc.stderr


def test_block_job_running_means_skipped(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    g = guests["cli-two"]
    dest = tmp_path / "copy.qcow2"
    # A bandwidth-limited block copy stays in progress long enough to trim into it.
    g.dom.blockCopy(
        "vda",
        f"<disk type='file'><source file='{dest}'/><driver type='qcow2'/></disk>",
        {libvirt.VIR_DOMAIN_BLOCK_COPY_BANDWIDTH: 1024 * 1024},
        libvirt.VIR_DOMAIN_BLOCK_COPY_TRANSIENT_JOB,
    )
    try:
        assert g.dom.blockJobInfo("vda", 0), "the block copy job did not start"
        status, doc, _ = trim_json(g.name)
        rec = record_of(doc, g.name)
        assert rec["result"] == "skipped"
        assert "block copy" in rec["message"] and "vda" in rec["message"]
        assert rec["filesystems"] == []
        assert status == 0
    finally:
        g.dom.blockJobAbort("vda", 0)
    status, doc, _ = trim_json(g.name)
    assert record_of(doc, g.name)["result"] == "success"


def test_run_once_trims_records_history_and_prints_metrics(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    g = guests["cli-scsi"]
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        f"state_dir: {tmp_path / 'state'}\n"
        "schedules:\n"
        f"  - name: once\n    cron: '0 3 * * *'\n    window: 1h\n    domains: [{g.name}]\n"
    )
    proc = virt_trimd("run", "--once", "--config", str(cfg), "--print-metrics")
    assert proc.returncode == 0, proc.stderr
    assert f'virt_trimd_trims_total{{domain="{g.name}",result="success"}} 1.0' in proc.stdout
    assert 'virt_trimd_last_sweep_timestamp_seconds{schedule="once"}' in proc.stdout
    hist = virt_trimd("history", "--state-dir", str(tmp_path / "state"), "--json")
    assert hist.returncode == 0, hist.stderr
    (row,) = json.loads(hist.stdout)["trims"]
    assert (row["domain"], row["schedule"], row["result"]) == (g.name, "once", "success")
    # The closing census takes guest-used bytes from the trim record instead of asking
    # the agent again: reclaimable must be allocated minus that record's guest-used,
    # and allocated must match our own os.stat of the image.
    (disk,) = row["disks"]
    assert disk["guest_used_bytes"] is not None, disk

    def gauge(name: str) -> float:
        found = re.search(
            rf'^virt_trimd_disk_{name}{{disk="{disk["disk"]}",domain="{g.name}"}} (\S+)$',
            proc.stdout,
            re.M,
        )
        assert found is not None, (name, proc.stdout)
        return float(found.group(1))

    allocated = gauge("allocated_bytes")
    assert abs(allocated - rig.allocated_bytes(g.images[0])) <= 64 << 10
    assert gauge("reclaimable_bytes") == allocated - disk["guest_used_bytes"]
    table = virt_trimd(
        "history", "--state-dir", str(tmp_path / "state"), "--since", "1h", "--domain", g.name
    )
    assert table.returncode == 0 and g.name in table.stdout and "success" in table.stdout
    empty = virt_trimd(
        "history", "--state-dir", str(tmp_path / "state"), "--domain", "nope", "--json"
    )
    assert json.loads(empty.stdout) == {"trims": []}


def test_schedules_lists_fire_times_and_matching_domains(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    cfg = tmp_path / "config.yaml"
    cfg.write_text(
        "schedules:\n"
        "  - name: sundays\n    cron: '0 3 * * 0'\n"
        f"    domains: ['{rig.session_prefix()}cli-*']\n    exclude: ['*-silent']\n"
    )
    proc = virt_trimd("schedules", "--config", str(cfg), "--count", "2")
    assert proc.returncode == 0, proc.stderr
    nexts = [line.split("next: ")[1] for line in proc.stdout.splitlines() if "next: " in line]
    assert len(nexts) == 2
    assert all(dt.datetime.fromisoformat(n).weekday() == 6 for n in nexts)  # Sunday
    (domains_line,) = [line for line in proc.stdout.splitlines() if "domains (" in line]
    for name in ("cli-scsi", "cli-two", "cli-noagent"):
        assert rig.session_prefix() + name in domains_line
    assert "cli-silent" not in domains_line and "cli-off" not in domains_line  # excluded / off


def test_run_once_json_trims_every_schedule_and_records_it(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    """`run --once --json` (for cron users): every schedule's sweep now, one document."""
    g = guests["cli-two"]
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path / "config.yaml",
        f"state_dir: {state}\nmetrics:\n  listen: 127.0.0.1:{free_port()}\n"
        f"schedules:\n  - name: nightly\n    cron: '30 2 * * *'\n    window: 1h\n"
        f"    domains: [{g.name}]\n",
    )
    before = {p: stat_allocated(p) for p in g.images}
    proc = virt_trimd("run", "--once", "--json", "--config", str(cfg), timeout=120)
    after = {p: stat_allocated(p) for p in g.images}
    assert proc.returncode == 0, proc.stderr
    doc = json.loads(proc.stdout)
    rec = record_of(doc, g.name)
    assert [r["domain"] for r in doc["domains"]] == [g.name]  # the schedule's domains only
    assert rec["result"] == "success" and rec["schedule"] == "nightly", rec
    independent = sum(before[p] - after[p] for p in g.images)
    assert abs(rec["reclaimed_bytes"] - independent) <= QCOW2_CLUSTER * len(g.images)
    assert doc["reclaimed_bytes"] == rec["reclaimed_bytes"]
    with History(state, readonly=True) as hist:
        (stored,) = hist.query()
    assert (stored.domain, stored.result.value, stored.schedule) == (g.name, "success", "nightly")
