"""`virt-trimd audit` against real domains: verdicts, and --enable-discard end to end.

The fix is checked the way a user would: `virsh dumpxml --inactive` and the live XML
before and after, the backup file on disk, a cold boot through libvirt, and a trim whose
reclaim the host's own os.stat confirms.
"""

from __future__ import annotations

import json
import os
import stat
import subprocess
import xml.etree.ElementTree as ET
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import libvirt
import pytest

import rig
from e2e.helpers import MIB, QCOW2_CLUSTER, booted_guests, record_of, stat_allocated, trim_json
from rig import DiskSpec, GuestSpec
from support.cli import virt_trimd
from support.files import write_config


def small(bus: rig.Bus, discard: rig.Discard | None) -> DiskSpec:
    """A 128 MiB disk without garbage: enough for an audit."""
    return DiskSpec(bus=bus, discard=discard, garbage_mib=0, size_mib=128)


# Disk targets follow spec order (scsi/sata share sd*, virtio uses vd*).
IGNORE = GuestSpec(
    "aud-ignore",
    disks=(
        small("scsi", "ignore"),  # sda: explicit ignore
        small("virtio", None),  # vda: attribute absent
    ),
)
NOAGENT = GuestSpec("aud-noagent", disks=(small("scsi", "unmap"),), agent="none")
READY = GuestSpec(
    "aud-ready",
    disks=(
        small("scsi", "unmap"),
        small("virtio", "unmap"),
        small("sata", "unmap"),
    ),
)
# The domain --enable-discard fixes: every bus, explicit ignore and a missing attribute.
FIX = GuestSpec(
    "aud-fix",
    disks=(
        DiskSpec(fmt="qcow2", bus="scsi", discard="ignore", garbage_mib=150, size_mib=512),
        DiskSpec(fmt="qcow2", bus="virtio", discard=None, garbage_mib=100, size_mib=256),
        DiskSpec(fmt="raw", bus="sata", discard="ignore", garbage_mib=100, size_mib=256),
    ),
)
FIX_TARGETS = ("sda", "vda", "sdb")
FIX_GARBAGE_MIB = (150, 100, 100)  # each above the 64 MiB residual threshold


@pytest.fixture(scope="module")
def guests(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, rig.GuestHandle]]:
    with booted_guests(
        libvirt_conn, rig_boot, tmp_path_factory.mktemp("aud"), [IGNORE, NOAGENT, READY, FIX]
    ) as by_name:
        yield by_name


def audit_json(*args: str) -> tuple[int, dict[str, Any]]:
    proc = virt_trimd("audit", "--json", *args)
    try:
        doc = json.loads(proc.stdout)
    except ValueError as exc:
        raise AssertionError(
            f"exit {proc.returncode}\n{proc.stdout}\n--- stderr ---\n{proc.stderr}"
        ) from exc
    return proc.returncode, doc


def domain_of(doc: dict[str, Any], name: str) -> dict[str, Any]:
    (dom,) = [d for d in doc["domains"] if d["domain"] == name]
    assert isinstance(dom, dict)
    return dom


def disks_of(dom: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["disk"]: d for d in dom["disks"]}


def virsh_xml(name: str, *flags: str) -> str:
    """`virsh dumpxml` as a user runs it: the independent view of the definitions."""
    return subprocess.run(
        ["virsh", "-c", rig.LIBVIRT_URI, "dumpxml", *flags, name],
        capture_output=True,
        text=True,
        check=True,
        timeout=30,
    ).stdout


def drivers(xml: str) -> dict[str, tuple[str | None, str | None]]:
    """{target: (bus, driver discard)} of every disk in a domain XML."""
    out: dict[str, tuple[str | None, str | None]] = {}
    for disk in ET.fromstring(xml).iterfind("./devices/disk"):
        target = disk.find("target")
        driver = disk.find("driver")
        assert target is not None
        out[target.get("dev", "?")] = (
            target.get("bus"),
            driver.get("discard") if driver is not None else None,
        )
    return out


def test_not_ready_verdicts_name_every_reason(guests: dict[str, rig.GuestHandle]) -> None:
    ign, noag = guests["aud-ignore"], guests["aud-noagent"]
    status, doc = audit_json(ign.name, noag.name)
    assert status == 1
    assert doc["ready"] is False

    d = domain_of(doc, ign.name)
    assert d["running"] is True and d["ready"] is False
    assert d["agent"]["verdict"] == "ready" and d["agent"]["state"] == "connected"
    disks = disks_of(d)
    assert set(disks) == {"sda", "vda"}
    sda, vda = disks["sda"], disks["vda"]
    assert (sda["bus"], sda["controller_model"]) == ("scsi", "virtio-scsi")
    assert (sda["discard"], sda["discard_explicit"]) == ("ignore", True)
    assert sda["verdict"] == "not_ready"
    assert len(sda["reasons"]) == 1 and "discard='ignore'" in sda["reasons"][0], sda
    assert (vda["bus"], vda["discard"], vda["discard_explicit"]) == ("virtio", "ignore", False)
    assert vda["verdict"] == "not_ready"
    assert len(vda["reasons"]) == 1 and "no discard attribute" in vda["reasons"][0], vda
    for disk in (sda, vda):
        assert disk["source_type"] == "file" and disk["format"] == "qcow2"
        assert disk["source"] in {str(p) for p in ign.images}
        assert "discard='unmap'" in disk["fix"] and "--enable-discard" in disk["fix"]
    assert "cold boot" in d["next_step"]

    n = domain_of(doc, noag.name)
    assert n["ready"] is False
    assert n["agent"]["configured"] is False and n["agent"]["verdict"] == "not_ready"
    (reason,) = n["agent"]["reasons"]
    assert "no guest agent channel (org.qemu.guest_agent.0)" in reason
    assert "org.qemu.guest_agent.0" in n["agent"]["fix"]
    # Its disk is fine: the agent is the only thing missing.
    assert [x["verdict"] for x in n["disks"]] == ["ready"]

    # The human table says the same, one row per agent and disk.
    table = virt_trimd("audit", ign.name, noag.name)
    assert table.returncode == 1
    rows = [line.split() for line in table.stdout.splitlines()]
    assert [ign.name, "sda", "scsi/virtio-scsi", "ignore", "not_ready"] == rows[2][:5]
    assert "0 of 2 domain(s) ready for trim" in table.stdout


def test_ready_guest_is_ready(guests: dict[str, rig.GuestHandle]) -> None:
    g = guests["aud-ready"]
    status, doc = audit_json(g.name)
    assert status == 0, doc
    assert doc["ready"] is True
    d = domain_of(doc, g.name)
    assert d["agent"]["verdict"] == "ready" and d["agent"]["state"] == "connected"
    disks = disks_of(d)
    assert {t: (x["bus"], x["verdict"]) for t, x in disks.items()} == {
        "sda": ("scsi", "ready"),
        "vda": ("virtio", "ready"),
        "sdb": ("sata", "ready"),
    }
    assert all(x["reasons"] == [] and x["fix"] is None for x in disks.values())
    assert d["next_step"] is None


def test_enable_discard_fixes_the_definition_then_a_cold_boot_makes_trim_work(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    g = guests["aud-fix"]
    state_dir = tmp_path / "state"
    cfg = write_config(tmp_path / "config.yaml", f"state_dir: {state_dir}\n")
    backups = state_dir / "xml-backups"
    inactive0 = virsh_xml(g.name, "--inactive")
    secure0 = virsh_xml(g.name, "--inactive", "--security-info")
    live0 = virsh_xml(g.name)
    assert drivers(inactive0) == {
        "sda": ("scsi", "ignore"),
        "vda": ("virtio", None),
        "sdb": ("sata", "ignore"),
    }

    # The guest trims, the host frees nothing: the problem this command fixes.
    before = [stat_allocated(p) for p in g.images]
    status, doc, stderr = trim_json(g.name)
    assert status == 0, stderr
    rec = record_of(doc, g.name)
    assert rec["result"] == "success" and rec["guest_trimmed_bytes"] > 0
    assert all(d["effective"] is False for d in rec["disks"]), rec["disks"]
    assert [stat_allocated(p) for p in g.images] == before

    # --dry-run: a diff, and nothing changed anywhere.
    dry = virt_trimd("audit", "--config", str(cfg), "--enable-discard", "--dry-run", g.name)
    assert dry.returncode == 0, dry.stderr
    minus = [ln for ln in dry.stdout.splitlines() if ln.startswith("-") and "<driver" in ln]
    plus = [ln for ln in dry.stdout.splitlines() if ln.startswith("+") and "<driver" in ln]
    assert len(minus) == len(plus) == 3, dry.stdout
    assert all("discard='unmap'" in ln for ln in plus)
    assert "dry run, nothing changed" in dry.stdout
    assert virsh_xml(g.name, "--inactive") == inactive0
    assert virsh_xml(g.name) == live0
    assert not backups.exists()

    # For real: the persistent definition only, with a backup and the same diff.
    fix = virt_trimd("audit", "--config", str(cfg), "--enable-discard", g.name)
    assert fix.returncode == 0, fix.stderr
    assert [ln for ln in fix.stdout.splitlines() if ln.startswith(("-", "+"))] == [
        ln for ln in dry.stdout.splitlines() if ln.startswith(("-", "+"))
    ]
    assert "next cold boot" in fix.stdout
    inactive1 = virsh_xml(g.name, "--inactive")
    assert drivers(inactive1) == {t: (bus, "unmap") for t, (bus, _) in drivers(inactive0).items()}
    # Only the driver lines differ; everything else is byte for byte the old definition.
    old_lines, new_lines = inactive0.splitlines(), inactive1.splitlines()
    assert len(old_lines) == len(new_lines)
    changed = [(a, b) for a, b in zip(old_lines, new_lines, strict=True) if a != b]
    assert len(changed) == 3 and all("<driver" in a and "<driver" in b for a, b in changed)
    live1 = virsh_xml(g.name)
    assert live1 == live0
    assert drivers(live1) == drivers(live0)  # still ignore / absent until the cold boot

    (backup,) = backups.iterdir()
    assert backup.suffix == ".xml"
    assert stat.S_IMODE(os.stat(backup).st_mode) == 0o600
    assert stat.S_IMODE(os.stat(backups).st_mode) == 0o700
    # virsh prints one more newline after </domain> than libvirt's XMLDesc returns.
    assert backup.read_text().rstrip("\n") == secure0.rstrip("\n")

    # The audit now says: fixed in the definition, waiting for a cold boot.
    status, doc = audit_json(g.name)
    assert status == 1
    for t, disk in disks_of(domain_of(doc, g.name)).items():
        assert disk["verdict"] == "not_ready" and disk["persistent_verdict"] == "ready", t
        assert disk["differs"] and "cold boot" in disk["pending"], disk

    # Cold boot through libvirt: destroy, start, wait for the agent.
    g.dom.destroy()
    g.dom.create()
    rig.wait_ready(g)
    live2 = virsh_xml(g.name)
    assert drivers(live2) == {t: (bus, "unmap") for t, (bus, _) in drivers(live0).items()}
    status, doc = audit_json(g.name)
    assert status == 0 and doc["ready"] is True, doc

    before = [stat_allocated(p) for p in g.images]
    status, doc, stderr = trim_json(g.name)
    after = [stat_allocated(p) for p in g.images]
    assert status == 0, stderr
    rec = record_of(doc, g.name)
    assert rec["result"] == "success", rec["message"]
    by_target = {d["disk"]: d for d in rec["disks"]}
    reclaimed = []
    for i, (target, garbage) in enumerate(zip(FIX_TARGETS, FIX_GARBAGE_MIB, strict=True)):
        independent = before[i] - after[i]
        reclaimed.append(independent)
        assert independent >= (garbage - 30) * MIB, (target, before[i], after[i])
        assert abs(by_target[target]["reclaimed_bytes"] - independent) <= QCOW2_CLUSTER
        assert by_target[target]["effective"] is True, by_target[target]
        assert by_target[target]["discard"] == "unmap"
    print(f"after --enable-discard and a cold boot, os.stat reclaimed {reclaimed}")
