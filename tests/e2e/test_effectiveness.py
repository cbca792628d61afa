"""Measured effectiveness against real guests: a disk at discard='ignore' must be flagged.

The guest reports bytes trimmed on every disk, but QEMU drops the discards of the
ignore disk, so its image keeps the garbage. virt-trimd compares the host allocation
(os.stat) with what the guest says it uses (guestInfo, mapped to libvirt targets) and
must call that disk ineffective while the working ones stay effective, in the CLI's
JSON record and in the daemon's /metrics.

The disks are laid out so that guest device names cross the libvirt targets: the SATA
disk (target sda) is the guest's sdc and the last SCSI disk (target sdc) the guest's
sda. Each disk holds a different amount of kept data, so attributing a filesystem to
the wrong disk shows up as a wrong guest_used_bytes. The test finds each disk's guest
filesystem on its own, by size (every disk has a different one), never through
libvirt's mapping.
"""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

import rig
from e2e.daemon_proc import DaemonProc, sample, scrape, wait_for
from e2e.helpers import MIB, QCOW2_CLUSTER, record_of, stat_allocated, trim_json
from rig import DiskSpec, GuestSpec
from support.files import free_port, write_config

# Spec order decides libvirt targets: sata and scsi share the sd* names.
SATA_OK = DiskSpec(fmt="qcow2", bus="sata", discard="unmap", garbage_mib=50, size_mib=256)
IGNORED = DiskSpec(fmt="qcow2", bus="scsi", discard="ignore", garbage_mib=200, size_mib=1024)
WORKING = DiskSpec(fmt="qcow2", bus="scsi", discard="unmap", garbage_mib=200, size_mib=768)
GUEST = GuestSpec("eff", disks=(SATA_OK, IGNORED, WORKING))
TARGETS = {"sata": "sda", "ignored": "sdb", "working": "sdc"}
# MiB of data written after boot and kept (not named garbage*), different per disk.
KEEP_MIB = {"sata": 8, "ignored": 16, "working": 24}
MIN_RESIDUAL = 64 * MIB  # the default effectiveness.min_residual
# Filesystem metadata a fresh ext4 counts as used (24 KiB here) plus slack for the
# agent's own rounding; what the guest uses beyond the kept data.
USED_SLACK = 1 * MIB
# The census walks every domain on the host, other sessions' too; a guest whose agent
# is stalled costs libvirt's 5 s guest-sync on each pass.
CENSUS_WAIT = 90


@dataclass(frozen=True)
class Disk:
    role: str
    target: str
    image: Path
    mountpoint: str  # in the guest, found by filesystem size
    keep_bytes: int


@dataclass
class Rig:
    handle: rig.GuestHandle
    disks: dict[str, Disk]
    before_trim: dict[str, int]  # os.stat allocation after the kept data was written


def _guest_fsinfo(dom: libvirt.virDomain) -> dict[str, dict[str, Any]]:
    """guest-get-fsinfo straight from the agent (no libvirt mapping), by mountpoint."""
    return {fs["mountpoint"]: fs for fs in rig.agent_command(dom, "guest-get-fsinfo")}


def guest_used(dom: libvirt.virDomain, mountpoint: str) -> int:
    """What the agent says is in use on one guest filesystem."""
    return int(_guest_fsinfo(dom)[mountpoint]["used-bytes"])


@pytest.fixture(scope="module")
def eff(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Rig]:
    try:
        (h,) = rig.start_guests(libvirt_conn, [GUEST], tmp_path_factory.mktemp("eff"), rig_boot)
        # Every disk has its own size, so sorting disks and filesystems by size pairs them.
        fss = sorted(_guest_fsinfo(h.dom).values(), key=lambda f: int(f["total-bytes"]))
        assert len(fss) == 3, fss
        roles = sorted(
            zip(("sata", "ignored", "working"), GUEST.disks, h.images, strict=True),
            key=lambda r: r[1].size_mib,
        )
        disks: dict[str, Disk] = {}
        for (role, _spec, image), fs in zip(roles, fss, strict=True):
            disks[role] = Disk(role, TARGETS[role], image, fs["mountpoint"], KEEP_MIB[role] * MIB)
        # The crossing this test relies on: the guest does not name disks like libvirt.
        assert disks["sata"].mountpoint != "/mnt/sda", disks
        for d in disks.values():
            rig.guest_exec(
                h.dom,
                [
                    "/bin/sh",
                    "-c",
                    f"dd if=/dev/urandom of={d.mountpoint}/keep.bin bs=1M "
                    f"count={d.keep_bytes // MIB} 2>/dev/null && sync",
                ],
            )
        before = {role: stat_allocated(d.image) for role, d in disks.items()}
        yield Rig(h, disks, before)
    finally:
        rig.destroy_guest(libvirt_conn, GUEST.domain_name)


def test_cli_flags_the_ignore_disk_and_not_the_working_ones(eff: Rig) -> None:
    g, disks = eff.handle, eff.disks
    before = eff.before_trim
    assert before["ignored"] >= 200 * MIB and before["working"] >= 200 * MIB, before
    status, doc, stderr = trim_json(g.name)
    after = {role: stat_allocated(d.image) for role, d in disks.items()}
    assert status == 0, stderr
    rec = record_of(doc, g.name)
    assert rec["result"] == "success", rec["message"]
    by_target = {d["disk"]: d for d in rec["disks"]}
    assert set(by_target) == set(TARGETS.values())
    trimmed = {f["mountpoint"]: f["trimmed_bytes"] for f in rec["filesystems"]}
    fsinfo = _guest_fsinfo(g.dom)

    for role, d in disks.items():
        r = by_target[d.target]
        assert r["path"] == str(d.image)
        assert r["allocated_after"] == after[role], (role, r)
        assert abs(r["reclaimed_bytes"] - (before[role] - after[role])) <= QCOW2_CLUSTER
        # Attribution: libvirt's alias mapping, checked against the size-found filesystem.
        agent_used = int(fsinfo[d.mountpoint]["used-bytes"])
        assert abs(r["guest_used_bytes"] - agent_used) <= USED_SLACK, (role, r, agent_used)
        assert d.keep_bytes <= r["guest_used_bytes"] <= d.keep_bytes + USED_SLACK, (role, r)
        assert r["residual_bytes"] == r["allocated_after"] - r["guest_used_bytes"]
        # The guest believes it trimmed every one of them, the ignored disk included.
        assert (trimmed.get(d.mountpoint) or 0) > 0, (role, trimmed)

    ign = by_target[TARGETS["ignored"]]
    assert ign["discard"] == "ignore"
    assert ign["effective"] is False, ign
    assert ign["residual_bytes"] >= MIN_RESIDUAL, ign
    # The guest reported ~1 GB trimmed; the host, measured on its own, freed nothing.
    assert trimmed[disks["ignored"].mountpoint] >= 500 * MIB
    assert abs(before["ignored"] - after["ignored"]) <= QCOW2_CLUSTER, (before, after)
    assert after["ignored"] >= 200 * MIB

    print(
        "effectiveness:",
        {r: (before[r], after[r], by_target[TARGETS[r]]["residual_bytes"]) for r in disks},
    )
    for role, garbage in (("working", 200), ("sata", 50)):
        r = by_target[TARGETS[role]]
        assert r["discard"] == "unmap"
        assert before[role] - after[role] >= (garbage - 30) * MIB, (role, before, after)
        assert r["effective"] is True, r
        assert r["residual_bytes"] < MIN_RESIDUAL, r


def test_thresholds_come_from_the_config(eff: Rig, tmp_path: Path) -> None:
    """The same measurements judged with effectiveness.min_residual raised above them."""
    g, ign = eff.handle, eff.disks["ignored"]
    residual = stat_allocated(ign.image) - guest_used(g.dom, ign.mountpoint)
    assert residual >= 150 * MIB
    cfg = write_config(
        tmp_path / "config.yaml",
        f"state_dir: {tmp_path / 'state'}\n"
        "effectiveness:\n  min_residual: 1GiB\n  residual_ratio: 0.1\n",
    )
    status, doc, stderr = trim_json("--config", str(cfg), g.name)
    assert status == 0, stderr
    by_target = {d["disk"]: d for d in record_of(doc, g.name)["disks"]}
    r = by_target[ign.target]
    assert abs(r["residual_bytes"] - residual) <= USED_SLACK, (r, residual)
    assert r["effective"] is True, r  # 194 MiB left is below a 1 GiB threshold


def test_daemon_exports_effective_ready_and_reclaimable(eff: Rig, tmp_path: Path) -> None:
    g, disks = eff.handle, eff.disks
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        f"metrics:\n  listen: 127.0.0.1:{port}\n"
        f"state_dir: {tmp_path / 'state'}\n"
        "census_interval: 1s\n"
        "shutdown_grace: 3s\n"
        "schedules:\n"
        f"  - name: eff\n    every: 2s\n    domains: [{g.name}]\n    min_interval: 1h\n",
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        wait_for(
            lambda: sample(scrape(port), "virt_trimd_trims_total", domain=g.name, result="success"),
            90,
            "a successful trim by the daemon",
        )

        def series(metric: str) -> dict[str, float | None]:
            m = scrape(port)
            return {role: sample(m, metric, domain=g.name, disk=t) for role, t in TARGETS.items()}

        # A census runs every second after the trim: effectiveness must survive it.
        expected_effective = {"sata": 1.0, "ignored": 0.0, "working": 1.0}
        for _ in range(4):
            assert series("virt_trimd_disk_trim_effective") == expected_effective, d.log()[-3000:]
            time.sleep(1)

        wait_for(
            lambda: (
                series("virt_trimd_disk_discard_ready")
                == {"sata": 1.0, "ignored": 0.0, "working": 1.0}
            ),
            CENSUS_WAIT,
            "discard_ready from the census",
        )

        # reclaimable = allocated (os.stat) - guest used (the agent, size-found fs).
        ign = disks["ignored"]

        def reclaimable_matches() -> tuple[float, int] | None:
            got = series("virt_trimd_disk_reclaimable_bytes")["ignored"]
            independent = stat_allocated(ign.image) - guest_used(g.dom, ign.mountpoint)
            if got is None or abs(got - independent) > USED_SLACK:
                return None
            return got, independent

        matched = wait_for(reclaimable_matches, CENSUS_WAIT, "reclaimable == os.stat - used")
        assert matched is not None
        got, independent = matched
        assert got >= 150 * MIB, (got, independent)
        print(f"reclaimable {ign.target}: exported {got:.0f}, os.stat - guest used {independent}")
        # The working disks hold only their kept data once a census has seen them trimmed.
        wait_for(
            lambda: all(
                v is not None and v < MIN_RESIDUAL
                for role, v in series("virt_trimd_disk_reclaimable_bytes").items()
                if role != "ignored"
            ),
            CENSUS_WAIT,
            "small reclaimable bytes on the working disks",
        )
    finally:
        code = d.stop()
    assert code == 0, d.log()
