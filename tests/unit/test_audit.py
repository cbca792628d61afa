"""audit: discard readiness rules, live/persistent differences, the XML fix, backups, output."""

from __future__ import annotations

import json
import os
import stat
import xml.etree.ElementTree as ET
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path

import pytest

from virt_trimd.audit.checks import (
    AGENT_CHANNEL_XML,
    AGENT_INSTALL_HINT,
    DomainAudit,
    Verdict,
    audit_domain,
    discard_ready,
    virtio_blk_discard,
)
from virt_trimd.audit.discardfix import backup_xml, enable_discard_xml, safe_filename, unified_diff
from virt_trimd.audit.report import audit_to_json, format_audit_table
from virt_trimd.host.domxml import ParsedDomain, parse_domain_xml
from virt_trimd.records import AgentChannel, DomainInfo

DATA = Path(__file__).parent / "data"
QEMU_72 = (7, 2, 0)
AGENT_CONNECTED = (
    "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0' "
    "state='connected'/></channel>"
)
UNMAP_QCOW2 = "<driver name='qemu' type='qcow2' discard='unmap'/>"


def disk_xml(  # noqa: PLR0913  (keyword-only XML attributes with defaults)
    target: str,
    bus: str,
    driver: str | None = UNMAP_QCOW2,
    *,
    kind: str = "file",
    device: str = "disk",
    source: str | None = None,
    extra: str = "",
) -> str:
    """One libvirt <disk> element."""
    if source is None:
        source = {
            "file": f"<source file='/var/lib/libvirt/images/{target}.qcow2'/>",
            "block": f"<source dev='/dev/vg0/{target}'/>",
            "volume": f"<source pool='default' volume='{target}.qcow2'/>",
            "network": f"<source protocol='rbd' name='pool/{target}'/>",
        }.get(kind, "")
    return (
        f"<disk type='{kind}' device='{device}'>{driver or ''}{source}"
        f"<target dev='{target}' bus='{bus}'/>{extra}</disk>"
    )


def domain_xml(
    *disks: str,
    machine: str | None = "pc-q35-7.2",
    channel: str | None = AGENT_CONNECTED,
    controllers: str = "",
    name: str = "guest1",
) -> str:
    """A libvirt-shaped <domain> document around the given disks."""
    os_el = f"<os><type arch='x86_64' machine='{machine}'>hvm</type></os>" if machine else ""
    return (
        f"<domain type='kvm'><name>{name}</name><uuid>00000000-0000-0000-0000-000000000001"
        f"</uuid>{os_el}<devices>{''.join(disks)}{controllers}{channel or ''}</devices></domain>"
    )


def parse(*disks: str, **kw: object) -> ParsedDomain:
    return parse_domain_xml(domain_xml(*disks, **kw))  # type: ignore[arg-type]


def one_disk(*disks: str, qemu: tuple[int, int, int] | None = QEMU_72, **kw: object) -> DomainAudit:
    """Audit a running domain whose live and persistent XML are the same."""
    dom = parse(*disks, **kw)
    return audit_domain(dom, dom, qemu)


VIRTIO_SCSI = "<controller type='scsi' index='0' model='virtio-scsi'/>"


# -- the discard attribute -----------------------------------------------------------------


def test_virtio_disk_with_unmap_on_new_machine_is_ready() -> None:
    audit = one_disk(disk_xml("vda", "virtio"))
    (disk,) = audit.disks
    assert disk.verdict is Verdict.READY
    assert disk.reasons == () and disk.fix is None
    assert (disk.discard, disk.discard_explicit) == ("unmap", True)
    assert audit.ready and audit.next_step is None


def test_missing_discard_means_libvirts_default_ignore() -> None:
    audit = one_disk(disk_xml("vda", "virtio", "<driver name='qemu' type='qcow2'/>"))
    (disk,) = audit.disks
    assert disk.verdict is Verdict.NOT_READY
    assert (disk.discard, disk.discard_explicit) == ("ignore", False)
    assert any("no discard attribute" in r and "'ignore'" in r for r in disk.reasons)
    assert disk.fix is not None
    assert "<driver name='qemu' type='qcow2' discard='unmap'/>" in disk.fix
    assert "virt-trimd audit --enable-discard guest1" in disk.fix
    assert not audit.ready
    assert audit.next_step is not None and "virsh shutdown guest1" in audit.next_step


def test_explicit_discard_ignore_is_not_ready() -> None:
    driver = "<driver name='qemu' type='raw' discard='ignore' detect_zeroes='on'/>"
    (disk,) = one_disk(disk_xml("sda", "scsi", driver), controllers=VIRTIO_SCSI).disks
    assert disk.verdict is Verdict.NOT_READY
    assert (disk.discard, disk.discard_explicit) == ("ignore", True)
    assert disk.reasons == (
        "discard='ignore' on <driver>: QEMU drops the guest's discards and the image never shrinks",
    )
    # The suggested element keeps the format and the detect_zeroes the disk already has.
    assert disk.fix is not None
    assert "<driver name='qemu' type='raw' discard='unmap' detect_zeroes='on'/>" in disk.fix


def test_every_reason_is_listed() -> None:
    """A virtio disk without discard on an old machine type has two independent problems."""
    no_discard = "<driver name='qemu' type='qcow2'/>"
    (disk,) = one_disk(disk_xml("vda", "virtio", no_discard), machine="pc-i440fx-2.12").disks
    assert len(disk.reasons) == 2
    assert "no discard attribute" in disk.reasons[0]
    assert disk.reasons[1].startswith("machine type 'pc-i440fx-2.12' (2.12) is 3.1 or older")
    assert "hw_compat_3_1" in disk.reasons[1]
    assert disk.fix is not None and "discard='unmap'" in disk.fix
    assert "pc-i440fx-4.0 or newer" in disk.fix


# -- virtio-blk: QEMU version and machine type ------------------------------------------------


@pytest.mark.parametrize(
    "machine",
    [
        "pc-i440fx-3.1",
        "pc-q35-3.1",
        "pc-i440fx-2.12",
        "pc-q35-2.6",
        "pc-1.2",
        "pc-i440fx-rhel7.6.0",
        "pc-q35-rhel7.6.0",
        "pc-i440fx-bionic",
        "pc-q35-disco-hpb",
        "pseries-2.12-sxxm",
        "virt-3.1",
    ],
)
def test_old_machine_types_disable_virtio_blk_discard(machine: str) -> None:
    (virtio,) = one_disk(disk_xml("vda", "virtio"), machine=machine).disks
    assert virtio.verdict is Verdict.NOT_READY
    assert any(machine in r for r in virtio.reasons)
    assert virtio.fix is not None and "virtio-scsi" in virtio.fix
    # The machine-type compat property only concerns virtio-blk: SCSI on the same machine works.
    (scsi,) = one_disk(disk_xml("sda", "scsi"), machine=machine, controllers=VIRTIO_SCSI).disks
    assert scsi.verdict is Verdict.READY


@pytest.mark.parametrize(
    "machine",
    [
        "pc-i440fx-4.0",
        "pc-q35-4.0",
        "pc-q35-7.2",
        "pc-q35-10.1",
        "pc-q35-rhel8.6.0",
        "pc-q35-rhel9.2.0",
        "pc-q35-focal",
        "pc-i440fx-jammy-hpb",
        "virt-7.2",
        "s390-ccw-virtio-7.2",
        "q35",
        "pc",
    ],
)
def test_new_machine_types_pass_virtio_blk_discard(machine: str) -> None:
    (disk,) = one_disk(disk_xml("vda", "virtio"), machine=machine).disks
    assert disk.verdict is Verdict.READY, disk.reasons


def test_machine_rule_parsing_directly() -> None:
    assert virtio_blk_discard("pc-q35-3.1", None)[0] is False
    assert virtio_blk_discard("pc-q35-4.0", None)[0] is True
    assert virtio_blk_discard("PC-Q35-4.0", None)[0] is True
    assert virtio_blk_discard("pc-i440fx-rhel7.6.0", None)[0] is False
    assert virtio_blk_discard("pc-i440fx-rhel8.0.0", None)[0] is True
    # An alias resolves to the newest type of the running QEMU: only the version tells.
    assert virtio_blk_discard("q35", None)[0] is None
    assert virtio_blk_discard("q35", (3, 1, 0))[0] is False
    assert virtio_blk_discard(None, QEMU_72)[0] is True
    assert virtio_blk_discard("microvm", QEMU_72)[0] is None
    assert virtio_blk_discard("pc-i440fx-galactic", QEMU_72)[0] is None


def test_qemu_older_than_4_0_has_no_virtio_blk_discard() -> None:
    (disk,) = one_disk(disk_xml("vda", "virtio"), machine="pc", qemu=(3, 1, 0)).disks
    assert disk.verdict is Verdict.NOT_READY
    assert any("QEMU 3.1.0" in r and "4.0" in r for r in disk.reasons)


@pytest.mark.parametrize(("machine", "qemu"), [("microvm", QEMU_72), ("q35", None), (None, None)])
def test_undatable_machine_is_ready_with_a_note(
    machine: str | None, qemu: tuple[int, int, int] | None
) -> None:
    (disk,) = one_disk(disk_xml("vda", "virtio"), machine=machine, qemu=qemu).disks
    assert disk.verdict is Verdict.READY
    assert any("assuming virtio-blk offers discard" in n for n in disk.notes)


# -- buses ------------------------------------------------------------------------------------


@pytest.mark.parametrize("model", ["virtio-scsi", "virtio-non-transitional"])
def test_virtio_scsi_is_ready_without_notes_about_the_controller(model: str) -> None:
    ctl = f"<controller type='scsi' index='0' model='{model}'/>"
    (disk,) = one_disk(disk_xml("sda", "scsi"), controllers=ctl).disks
    assert disk.verdict is Verdict.READY
    assert disk.controller_model == model
    assert not any("controller" in n for n in disk.notes)


def test_lsilogic_passes_unmap_with_a_note() -> None:
    ctl = "<controller type='scsi' index='0' model='lsilogic'/>"
    (disk,) = one_disk(disk_xml("sda", "scsi"), controllers=ctl).disks
    assert disk.verdict is Verdict.READY
    assert any("'lsilogic'" in n and "scsi-hd" in n for n in disk.notes)


def test_scsi_disk_without_controller_element_is_ready_with_a_note() -> None:
    (disk,) = one_disk(disk_xml("sda", "scsi")).disks
    assert disk.verdict is Verdict.READY and disk.controller_model is None
    assert any("not in this XML" in n for n in disk.notes)


def test_sata_and_ide_emulate_trim() -> None:
    sata, ide = one_disk(disk_xml("sda", "sata"), disk_xml("hda", "ide")).disks
    assert sata.verdict is Verdict.READY and ide.verdict is Verdict.READY
    assert any("16 MiB" in n for n in sata.notes)
    assert any("ATA TRIM" in n for n in ide.notes)


@pytest.mark.parametrize("bus", ["usb", "sd", "xen"])
def test_buses_without_a_discard_path(bus: str) -> None:
    (disk,) = one_disk(disk_xml("sdx", bus)).disks
    assert disk.verdict is Verdict.NOT_READY
    assert any(f"bus='{bus}'" in r for r in disk.reasons)
    assert disk.fix is not None and "virtio-scsi" in disk.fix
    assert "never move the boot disk first" in disk.fix


def test_unknown_bus_is_ready_with_a_note() -> None:
    (disk,) = one_disk(disk_xml("nvme0", "nvme")).disks
    assert disk.verdict is Verdict.READY
    assert any("'nvme' is not one virt-trimd knows" in n for n in disk.notes)


# -- source types -------------------------------------------------------------------------------


def test_network_rbd_with_unmap_is_ready_but_not_measurable() -> None:
    (disk,) = one_disk(disk_xml("vdb", "virtio", kind="network")).disks
    assert disk.verdict is Verdict.READY
    assert disk.source_type == "network"
    assert any(
        "reclaim happens in the storage backend; virt-trimd cannot measure it" in n
        for n in disk.notes
    )


def test_network_disk_without_discard_is_fixed_by_hand_only() -> None:
    raw = "<driver name='qemu' type='raw'/>"
    (disk,) = one_disk(disk_xml("vdb", "virtio", raw, kind="network")).disks
    assert disk.verdict is Verdict.NOT_READY
    assert disk.fix is not None and "leaves network disks alone" in disk.fix


def test_read_only_network_protocol_is_not_ready() -> None:
    src = "<source protocol='https' name='/images/x.iso'><host name='h'/></source>"
    (disk,) = one_disk(disk_xml("vdb", "virtio", kind="network", source=src)).disks
    assert disk.verdict is Verdict.NOT_READY
    assert any("'https' is read-only" in r for r in disk.reasons)


def test_block_disk_needs_unmap_and_is_not_measured() -> None:
    ready, not_ready = one_disk(
        disk_xml("vda", "virtio", kind="block"),
        disk_xml("vdb", "virtio", "<driver name='qemu' type='raw'/>", kind="block"),
    ).disks
    assert ready.verdict is Verdict.READY
    assert any("reclaim is not measured" in n for n in ready.notes)
    assert not_ready.verdict is Verdict.NOT_READY


def test_volume_disk_follows_the_file_rules() -> None:
    ready, not_ready = one_disk(
        disk_xml("sda", "sata", kind="volume"),
        disk_xml("sdb", "sata", "<driver name='qemu' type='qcow2'/>", kind="volume"),
    ).disks
    assert ready.verdict is Verdict.READY and ready.source == "default/sda.qcow2"
    assert not_ready.verdict is Verdict.NOT_READY


def test_dir_disk_cannot_discard() -> None:
    src = "<source dir='/srv/share'/>"
    (disk,) = one_disk(
        disk_xml("hdd", "ide", "<driver name='qemu' type='fat'/>", kind="dir", source=src)
    ).disks
    assert disk.verdict is Verdict.NOT_READY
    assert any("vvfat" in r for r in disk.reasons)
    assert not any("discard attribute" in r for r in disk.reasons)


# -- detect_zeroes ------------------------------------------------------------------------------


def test_detect_zeroes_notes() -> None:
    both = "<driver name='qemu' type='qcow2' discard='unmap' detect_zeroes='unmap'/>"
    only_dz = "<driver name='qemu' type='qcow2' detect_zeroes='unmap'/>"
    good, bad = one_disk(disk_xml("vda", "virtio", both), disk_xml("vdb", "virtio", only_dz)).disks
    assert good.detect_zeroes == "unmap" and good.verdict is Verdict.READY
    assert any("turns guest writes of zeroes into discards" in n for n in good.notes)
    assert bad.verdict is Verdict.NOT_READY
    assert any("runs it as 'on'" in n for n in bad.notes)


# -- skipped devices ----------------------------------------------------------------------------


def test_cdrom_floppy_and_read_only_disks_are_skipped() -> None:
    audit = one_disk(
        disk_xml("vda", "virtio"),
        disk_xml("sdc", "sata", None, device="cdrom", extra="<readonly/>"),
        disk_xml("fda", "fdc", None, device="floppy"),
        disk_xml("vdz", "virtio", "<driver name='qemu' type='raw'/>", extra="<readonly/>"),
    )
    assert [d.target for d in audit.disks] == ["vda"]
    assert any("vdz: read-only" in n for n in audit.notes)
    assert audit.ready


def test_discard_ready_matches_the_audit() -> None:
    dom = parse(
        disk_xml("vda", "virtio"),
        disk_xml("vdb", "virtio", "<driver name='qemu' type='raw'/>"),
        disk_xml("sdc", "sata", None, device="cdrom"),
        disk_xml("vdz", "virtio", extra="<readonly/>"),
        machine="pc-q35-7.2",
    )
    got = {d.target: discard_ready(d, dom.machine, QEMU_72) for d in dom.disks}
    assert got == {"vda": True, "vdb": False, "sdc": None, "vdz": None}
    assert discard_ready(dom.disks[0], "pc-i440fx-3.1", None) is False
    audit = audit_domain(dom, dom, QEMU_72)
    for d in audit.disks:
        assert (d.verdict is Verdict.READY) == got[d.target]


# -- the guest agent ----------------------------------------------------------------------------


def test_missing_agent_channel_gives_the_exact_snippet() -> None:
    audit = one_disk(disk_xml("vda", "virtio"), channel=None)
    assert AGENT_CHANNEL_XML == (
        "<channel type='unix'><target type='virtio' name='org.qemu.guest_agent.0'/></channel>"
    )
    assert audit.agent.verdict is Verdict.NOT_READY and not audit.agent.configured
    assert audit.agent.fix is not None
    assert AGENT_CHANNEL_XML in audit.agent.fix
    assert AGENT_INSTALL_HINT == "install and start qemu-guest-agent in the guest"
    assert AGENT_INSTALL_HINT in audit.agent.fix
    assert not audit.ready


def test_disconnected_agent_is_not_ready() -> None:
    chan = AGENT_CONNECTED.replace("connected", "disconnected")
    audit = one_disk(disk_xml("vda", "virtio"), channel=chan)
    assert audit.agent.verdict is Verdict.NOT_READY
    assert audit.agent.state == "disconnected"
    assert any("disconnected" in r for r in audit.agent.reasons)
    assert audit.agent.fix is not None and AGENT_INSTALL_HINT in audit.agent.fix


def test_shut_off_domain_with_channel_is_ready_with_a_note() -> None:
    chan = AGENT_CONNECTED.replace(" state='connected'", "")
    dom = parse(disk_xml("vda", "virtio"), channel=chan)
    audit = audit_domain(None, dom, QEMU_72)
    assert not audit.running
    assert audit.agent.verdict is Verdict.READY
    assert any("once the domain runs" in n for n in audit.agent.notes)


def test_agent_channel_only_in_persistent_definition() -> None:
    live = parse(disk_xml("vda", "virtio"), channel=None)
    persistent = parse(disk_xml("vda", "virtio"))
    audit = audit_domain(live, persistent, QEMU_72)
    assert audit.agent.verdict is Verdict.NOT_READY
    assert any("already has the channel" in n for n in audit.agent.notes)


# -- live versus persistent -----------------------------------------------------------------------


def test_persistent_already_fixed_needs_a_cold_boot() -> None:
    live = parse(disk_xml("vda", "virtio", "<driver name='qemu' type='qcow2'/>"))
    persistent = parse(disk_xml("vda", "virtio"))
    audit = audit_domain(live, persistent, QEMU_72)
    (disk,) = audit.disks
    assert disk.verdict is Verdict.NOT_READY  # QEMU runs the live definition
    assert disk.differs and disk.persistent_verdict is Verdict.READY
    assert disk.pending is not None
    assert "already fixed" in disk.pending and "discard: ignore -> unmap" in disk.pending
    assert audit.next_step is not None
    assert "virsh shutdown guest1" in audit.next_step and "virsh start guest1" in audit.next_step
    assert "reboot inside the guest" in audit.next_step


def test_persistent_that_would_lose_discard_is_flagged() -> None:
    live = parse(disk_xml("vda", "virtio"))
    persistent = parse(disk_xml("vda", "virtio", "<driver name='qemu' type='qcow2'/>"))
    (disk,) = audit_domain(live, persistent, QEMU_72).disks
    assert disk.verdict is Verdict.READY and disk.persistent_verdict is Verdict.NOT_READY
    assert disk.pending is not None and "NOT ready" in disk.pending


def test_machine_type_raised_in_persistent_definition() -> None:
    live = parse(disk_xml("vda", "virtio"), machine="pc-i440fx-2.12")
    persistent = parse(disk_xml("vda", "virtio"), machine="pc-i440fx-7.2")
    audit = audit_domain(live, persistent, QEMU_72)
    (disk,) = audit.disks
    assert disk.verdict is Verdict.NOT_READY and disk.persistent_verdict is Verdict.READY
    assert disk.pending is not None and "machine: pc-i440fx-2.12 -> pc-i440fx-7.2" in disk.pending
    assert any("machine type differs" in n for n in audit.notes)


def test_identical_definitions_do_not_differ() -> None:
    (disk,) = one_disk(disk_xml("vda", "virtio")).disks
    assert not disk.differs and disk.pending is None
    assert disk.persistent_verdict is Verdict.READY


def test_hot_plugged_and_persistent_only_disks() -> None:
    live = parse(disk_xml("vda", "virtio"), disk_xml("vdb", "virtio"))
    persistent = parse(disk_xml("vda", "virtio"), disk_xml("vdc", "virtio"))
    audit = audit_domain(live, persistent, QEMU_72)
    by_target = {d.target: d for d in audit.disks}
    assert list(by_target) == ["vda", "vdb", "vdc"]
    assert not by_target["vda"].differs
    assert by_target["vdb"].differs and by_target["vdb"].persistent_verdict is None
    assert by_target["vdb"].pending is not None and "hot-plugged" in by_target["vdb"].pending
    assert by_target["vdc"].pending is not None
    assert "only in the persistent definition" in by_target["vdc"].pending


def test_transient_domain() -> None:
    live = parse(disk_xml("vda", "virtio"))
    audit = audit_domain(live, None, QEMU_72)
    assert audit.running
    assert any("transient" in n for n in audit.notes)
    assert audit.disks[0].persistent_verdict is None


def test_domain_info_that_is_not_running_counts_as_shut_off() -> None:
    parsed = parse(disk_xml("vda", "virtio", "<driver name='qemu' type='qcow2'/>"))
    info = DomainInfo(
        name=parsed.name,
        uuid=parsed.uuid,
        running=False,
        disks=parsed.disks,
        agent=AgentChannel(configured=True, state=None),
        machine=parsed.machine,
    )
    audit = audit_domain(info, parsed, QEMU_72)
    assert not audit.running
    assert audit.next_step == "XML changes take effect when the domain next starts"


def test_audit_needs_a_definition() -> None:
    with pytest.raises(ValueError, match="live or a persistent"):
        audit_domain(None, None, QEMU_72)


# -- enable_discard_xml -------------------------------------------------------------------------


def _element_dump(el: ET.Element, *, drop_discard: bool) -> list[tuple[str, dict[str, str], str]]:
    """Every element in document order with its attributes and text, optionally without discard."""
    out = []
    for node in el.iter():
        attrs = dict(node.attrib)
        if drop_discard and node.tag == "driver":
            attrs.pop("discard", None)
        out.append((str(node.tag), attrs, (node.text or "").strip()))
    return out


def test_enable_discard_round_trip_changes_only_discard() -> None:
    original = (DATA / "audit_inactive_mixed.xml").read_text()
    new, changed = enable_discard_xml(original)
    assert changed == ["sda", "vda", "vdb"]

    old_root, new_root = ET.fromstring(original), ET.fromstring(new)
    # vdb had no <driver>: one element was added; drop it, and everything else is identical.
    added = new_root.find("devices/disk/target[@dev='vdb']/../driver")
    assert added is not None and added.attrib == {"name": "qemu", "discard": "unmap"}
    new_dump = [
        e
        for e in _element_dump(new_root, drop_discard=True)
        if e != ("driver", {"name": "qemu"}, "")
    ]
    assert new_dump == _element_dump(old_root, drop_discard=True)

    # Buses, formats and the other attributes are untouched; discard is unmap where changed.
    old_parsed, new_parsed = parse_domain_xml(original), parse_domain_xml(new)
    for before, after in zip(old_parsed.disks, new_parsed.disks, strict=True):
        assert (before.bus, before.driver_format, before.device) == (
            after.bus,
            after.driver_format,
            after.device,
        )
        expected = "unmap" if before.target in changed else before.discard
        assert after.discard == expected
    by_target = {d.target: d for d in new_parsed.disks}
    assert by_target["vdc"].discard is None  # read-only: skipped
    assert by_target["sdc"].discard is None  # cdrom: skipped
    assert by_target["vdd"].discard is None  # network: skipped
    assert by_target["sdb"].detect_zeroes == "unmap"


def test_enable_discard_keeps_every_other_byte() -> None:
    original = (DATA / "audit_inactive_mixed.xml").read_text()
    new, _ = enable_discard_xml(original)
    diff = unified_diff(original, new, "win2022")
    minus = [ln for ln in diff.splitlines() if ln.startswith("-") and not ln.startswith("---")]
    plus = [ln for ln in diff.splitlines() if ln.startswith("+") and not ln.startswith("+++")]
    assert minus == [
        "-      <driver name='qemu' type='qcow2' cache='none' io='native'/>",
        "-      <driver name='qemu' type='raw' cache='none' io='native' discard='ignore'/>",
    ]
    assert plus == [
        "+      <driver name='qemu' type='qcow2' cache='none' io='native' discard='unmap'/>",
        "+      <driver name='qemu' type='raw' cache='none' io='native' discard='unmap'/>",
        "+      <driver name='qemu' discard='unmap'/>",
    ]
    # Quoting, escapes, namespaces and the secret-bearing attributes survive verbatim.
    assert "passwd='s3cr&lt;t&apos;'" in new
    assert (
        '<libosinfo:libosinfo xmlns:libosinfo="http://libosinfo.org/xmlns/libvirt/domain/1.0">'
        in new
    )
    assert "<qemu:arg value='ICH9-LPC.disable_s3=1'/>" in new


def test_enable_discard_is_idempotent() -> None:
    original = (DATA / "audit_inactive_mixed.xml").read_text()
    once, _ = enable_discard_xml(original)
    twice, changed = enable_discard_xml(once)
    assert changed == [] and twice == once


def test_enable_discard_handles_odd_but_valid_tags() -> None:
    xml = (
        "<domain type='kvm'><name>x</name><devices>"
        '<disk type="file" device="disk"><driver name="qemu" type="raw" io="a>b" />'
        '<source file="/x"/><target dev="vda" bus="virtio"/></disk>'
        "<disk type='file'><driver name='qemu' discard = \"ignore\"/>"
        "<target dev='vdb' bus='virtio'/></disk></devices></domain>"
    )
    new, changed = enable_discard_xml(xml)
    assert changed == ["vda", "vdb"]
    drivers = [d.attrib for d in ET.fromstring(new).iter("driver")]
    assert drivers == [
        {"name": "qemu", "type": "raw", "io": "a>b", "discard": "unmap"},
        {"name": "qemu", "discard": "unmap"},
    ]


@pytest.mark.parametrize("text", ["", "<domain", "<network><name>n</name></network>"])
def test_enable_discard_rejects_non_domain_xml(text: str) -> None:
    with pytest.raises(ValueError):
        enable_discard_xml(text)


def test_unified_diff() -> None:
    assert unified_diff("a\nb\n", "a\nb\n", "d") == ""
    diff = unified_diff("a\nb", "a\nc", "d")
    assert diff.startswith("--- d (now)\n+++ d (new)\n")
    assert "-b\n" in diff and "+c\n" in diff


# -- backups ---------------------------------------------------------------------------------------

NOW = datetime(2024, 5, 1, 3, 15, 0, tzinfo=UTC)


def test_backup_file_and_directory_permissions(tmp_path: Path) -> None:
    old_umask = os.umask(0o022)
    try:
        path = backup_xml(tmp_path, "web01", "<domain/>\n", NOW)
    finally:
        os.umask(old_umask)
    assert path.parent == tmp_path / "xml-backups"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700
    assert path.read_text() == "<domain/>\n"
    assert path.name.startswith("web01-") and path.name.endswith("-20240501T031500Z.xml")


def test_backup_tightens_an_existing_directory(tmp_path: Path) -> None:
    (tmp_path / "xml-backups").mkdir(mode=0o755)
    os.chmod(tmp_path / "xml-backups", 0o755)
    path = backup_xml(tmp_path, "web01", "<domain/>", NOW)
    assert stat.S_IMODE(path.parent.stat().st_mode) == 0o700


def test_backup_timestamp_is_utc(tmp_path: Path) -> None:
    local = NOW.astimezone(timezone(timedelta(hours=2)))
    path = backup_xml(tmp_path, "web01", "<domain/>", local)
    assert path.name.endswith("-20240501T031500Z.xml")
    with pytest.raises(ValueError, match="timezone-aware"):
        backup_xml(tmp_path, "web01", "<domain/>", datetime(2024, 5, 1))


@pytest.mark.parametrize("name", ["a/b", "../../etc/passwd", "web 01 ü", "..", "ü", "-x", "a\nb"])
def test_backup_names_are_safe(tmp_path: Path, name: str) -> None:
    path = backup_xml(tmp_path, name, "<domain/>", NOW)
    assert path.parent == tmp_path / "xml-backups"
    assert path.exists()
    assert not path.name.startswith(".")
    assert all(c.isascii() and (c.isalnum() or c in "._-") for c in path.name)


def test_safe_filename_keeps_names_apart() -> None:
    assert safe_filename("a/b") != safe_filename("a_b")
    assert safe_filename("web01").startswith("web01-")
    assert len(safe_filename("x" * 500)) <= 80 + 9


def test_backup_never_overwrites(tmp_path: Path) -> None:
    first = backup_xml(tmp_path, "web01", "one", NOW)
    second = backup_xml(tmp_path, "web01", "two", NOW)
    assert first != second
    assert (first.read_text(), second.read_text()) == ("one", "two")


# -- output ---------------------------------------------------------------------------------


def _sample_audits() -> list[DomainAudit]:
    live = parse(
        disk_xml("vda", "virtio", "<driver name='qemu' type='qcow2'/>"),
        disk_xml("sda", "scsi"),
        controllers=VIRTIO_SCSI,
        name="web01",
    )
    persistent = parse(
        disk_xml("vda", "virtio"), disk_xml("sda", "scsi"), controllers=VIRTIO_SCSI, name="web01"
    )
    legacy = parse(disk_xml("hda", "usb"), channel=None, name="legacy", machine="pc-i440fx-2.12")
    return [audit_domain(live, persistent, QEMU_72), audit_domain(None, legacy, QEMU_72)]


def test_table_has_one_row_per_agent_and_disk_then_details() -> None:
    text = format_audit_table(_sample_audits())
    lines = text.splitlines()
    assert lines[0].split() == ["DOMAIN", "DISK", "BUS", "DISCARD", "VERDICT", "REASON"]
    rows = {tuple(ln.split()[:2]) for ln in lines[1:6]}
    assert rows == {
        ("web01", "(agent)"),
        ("web01", "vda"),
        ("web01", "sda"),
        ("legacy", "(agent)"),
        ("legacy", "hda"),
    }
    vda_row = next(ln for ln in lines if ln.startswith("web01") and " vda " in ln)
    assert (
        "ignore*" in vda_row
        and "not_ready (pending)" in vda_row
        and "no discard attribute" in vda_row
    )
    assert "scsi/virtio-scsi" in text
    assert "fix: <driver name='qemu' type='qcow2' discard='unmap'/>" in text
    assert "pending: the persistent definition is already fixed" in text
    assert AGENT_CHANNEL_XML in text
    assert text.rstrip().endswith("0 of 2 domain(s) ready for trim")


def test_json_is_serialisable_and_complete() -> None:
    data = audit_to_json(_sample_audits())
    assert json.loads(json.dumps(data)) == data
    assert data["ready"] is False
    web01, legacy = data["domains"]
    assert web01["domain"] == "web01" and web01["running"] is True
    vda = web01["disks"][0]
    assert vda["disk"] == "vda" and vda["verdict"] == "not_ready"
    assert vda["persistent_verdict"] == "ready" and vda["differs"] is True
    assert vda["discard"] == "ignore" and vda["discard_explicit"] is False
    assert legacy["agent"]["configured"] is False
    assert legacy["disks"][0]["reasons"] and legacy["disks"][0]["fix"]
