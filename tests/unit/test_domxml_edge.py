"""domxml edge cases: disk shapes from libvirt's own test data, hostile XML, odd paths.

Every shape must parse without an exception into a Disk that says what it is; only
local image files are measured, cdrom and floppy are never trimmed, and a backing chain
is reported while the active layer is what gets measured.
"""

from __future__ import annotations

import time
from pathlib import Path

import pytest

from virt_trimd.engine.trim import DomainTrimmer
from virt_trimd.host.domxml import DomainXMLError, parse_domain_xml, trimmable_disks
from virt_trimd.host.hypervisor import Hypervisor
from virt_trimd.host.measure import Measurer
from virt_trimd.records import Disk

DATA = Path(__file__).parent / "data"


def _disks(name: str) -> dict[str, Disk]:
    dom = parse_domain_xml((DATA / name).read_text())
    return {d.target: d for d in dom.disks}


def _shape(d: Disk) -> tuple[str, str, str | None, str | None]:
    return (d.device, d.source_type, d.source_path, d.network_protocol)


def test_network_disks() -> None:
    dom = parse_domain_xml((DATA / "edge_network_disks.xml").read_text())
    assert (dom.name, dom.machine) == ("net-disks", "pc-i440fx-7.2")
    assert dom.agent.configured and dom.agent.state == "disconnected"
    disks = {d.target: d for d in dom.disks}
    assert {t: _shape(d) for t, d in disks.items()} == {
        "vda": ("disk", "network", "pool/image", "rbd"),
        "vdb": ("disk", "network", None, "nbd"),  # nbd export without a name
        "vdc": ("disk", "network", "bar", "nbd"),
        "sda": ("lun", "network", "iqn.1992-01.com.example:storage/1", "iscsi"),
        "vdd": ("disk", "network", "Volume/Image.qcow2", "gluster"),
        "hda": ("cdrom", "network", "/images/debian.iso", "https"),
        "vde": ("disk", "nvme", None, None),
        "vdf": ("disk", "vhostuser", None, None),
    }
    assert not any(d.is_file for d in dom.disks)
    assert disks["vda"].discard == "unmap" and disks["vda"].alias == "virtio-disk0"
    assert disks["sda"].controller_model == "virtio-scsi"
    assert disks["hda"].readonly
    assert [d.target for d in trimmable_disks(dom.disks)] == [
        "vda",
        "vdb",
        "vdc",
        "sda",
        "vdd",
        "vde",
        "vdf",
    ]


def test_local_disks_cdrom_floppy_volume_block() -> None:
    dom = parse_domain_xml((DATA / "edge_local_disks.xml").read_text())
    assert dom.name == "local \"disks\" & 'co' ü"
    assert dom.agent.configured and dom.agent.state == "connected"  # not the spice channel
    disks = {d.target: d for d in dom.disks}
    assert _shape(disks["vda"]) == ("disk", "block", "/dev/HostVG/QEMUGuest1", None)
    assert disks["vda"].backing_chain == ()  # <backingStore/> ends the chain
    assert _shape(disks["sda"]) == ("lun", "block", "/dev/sdfake", None)
    assert disks["sda"].controller_model == "virtio-scsi"  # controller index 1
    assert _shape(disks["sdb"]) == ("cdrom", "file", None, None)  # empty tray
    assert _shape(disks["sdc"])[:3] == (
        "cdrom",
        "file",
        "/var/lib/libvirt/images/debian 12 netinst.iso",
    )
    assert _shape(disks["fda"]) == ("floppy", "file", "/tmp/firmware.img", None)
    assert _shape(disks["fdb"]) == ("floppy", "dir", "/var/somefiles", None)
    assert _shape(disks["vdb"]) == ("disk", "volume", "default/web 01 é.qcow2", None)
    assert _shape(disks["sdd"]) == ("lun", "volume", "iscsi-pool/unit:0:0:1", None)
    assert disks["sdd"].controller_model == "lsilogic"
    assert _shape(disks["vdc"]) == ("disk", "volume", None, None)  # pool without volume
    assert disks["sdf"].bus == "usb" and disks["sdf"].is_file


def test_backing_chain_reported_nearest_first_active_layer_measured() -> None:
    vdd = _disks("edge_local_disks.xml")["vdd"]
    assert vdd.source_path == "/var/lib/libvirt/images/top layer.qcow2"
    assert vdd.backing_chain == (
        "/var/lib/libvirt/images/mid.qcow2",
        "/dev/vg/base-lv",
        "golden",
    )
    assert (vdd.discard, vdd.detect_zeroes, vdd.alias) == ("unmap", "unmap", "virtio-disk3")


def test_paths_with_quotes_entities_tab_newline_and_unicode() -> None:
    sde = _disks("edge_local_disks.xml")["sde"]
    assert sde.source_path == ("/srv/vm images/\"quoted\" & 'apos'\ttab\nnewline/日本語 диск.img")
    assert sde.is_file


def test_raw_tab_and_newline_in_an_attribute_read_as_spaces() -> None:
    # libvirt 9 escapes only <>&'" in attributes and writes a tab or newline raw (seen
    # with virsh dumpxml); every conforming XML parser turns those into spaces. A path
    # holding one cannot be recovered from libvirt's XML: the stat then fails cleanly.
    xml = (
        "<domain><name>t</name><uuid>u</uuid><devices><disk type='file' device='disk'>"
        "<source file='/tmp/a\tb\nc.img'/><target dev='vda' bus='virtio'/></disk>"
        "</devices></domain>"
    )
    (disk,) = parse_domain_xml(xml).disks
    assert disk.source_path == "/tmp/a b c.img"
    trimmer = DomainTrimmer(Hypervisor("test:///default"), Measurer())
    (rec,) = trimmer.measure_disks([disk])
    assert rec.not_measured == "cannot stat /tmp/a b c.img: No such file or directory"


def test_sourceless_targetless_and_empty_disks() -> None:
    dom = parse_domain_xml((DATA / "edge_local_disks.xml").read_text())
    empty = next(d for d in dom.disks if d.target == "vde")
    assert empty.source_path == "" and not empty.is_file
    untargeted = next(d for d in dom.disks if d.target == "")
    assert untargeted.bus == "" and untargeted.driver_format is None
    assert untargeted.source_path == "/var/lib/libvirt/images/no-target-no-driver.img"


def test_trimmable_and_measured_disks(tmp_path: Path) -> None:
    dom = parse_domain_xml((DATA / "edge_local_disks.xml").read_text())
    trimmable = [d.target for d in trimmable_disks(dom.disks)]
    assert trimmable == ["vda", "sda", "vdb", "sdd", "vdc", "vdd", "sde", "vde", "", "sdf"]
    # No file exists: every measurement is a recorded reason, never an exception.
    trimmer = DomainTrimmer(Hypervisor("test:///default"), Measurer())
    records = {r.disk: r for r in trimmer.measure_disks(dom.disks)}
    assert set(records) == set(trimmable)
    assert records["vda"].not_measured == "block disk: only image files are measured"
    assert records["sda"].not_measured == "block disk: only image files are measured"
    assert records["vdb"].not_measured == "volume disk: only image files are measured"
    assert records["vde"].not_measured == "file disk: only image files are measured"
    assert records["vdd"].not_measured == (
        "cannot stat /var/lib/libvirt/images/top layer.qcow2: No such file or directory"
    )
    assert all(r.allocated_before is None for r in records.values())
    net = parse_domain_xml((DATA / "edge_network_disks.xml").read_text())
    by = {r.disk: r.not_measured for r in trimmer.measure_disks(net.disks)}
    assert by["vda"] == "network disk: only image files are measured"
    assert by["vde"] == "nvme disk: only image files are measured"
    assert by["vdf"] == "vhostuser disk: only image files are measured"


# -- hostile XML ------------------------------------------------------------------------

_LAUGHS = (
    '<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY a "aaaaaaaaaaaaaaaaaaaaaaaaaaaaaaaa">'
    + "".join(f'<!ENTITY {chr(98 + i)} "{("&" + chr(97 + i) + ";") * 16}">' for i in range(8))
    + "]><domain><name>&j;</name><uuid>u</uuid></domain>"
)


def test_entity_expansion_bomb_is_refused_quickly() -> None:
    # 16^8 * 32 bytes if expanded. libvirt never emits a DTD; expat's amplification
    # limit refuses this long before it costs memory.
    t0 = time.process_time()
    with pytest.raises(DomainXMLError):
        parse_domain_xml(_LAUGHS)
    assert time.process_time() - t0 < 5


def test_external_entity_is_not_read(tmp_path: Path) -> None:
    secret = tmp_path / "secret.txt"
    secret.write_text("TOP-SECRET")
    xml = (
        f'<?xml version="1.0"?><!DOCTYPE domain [<!ENTITY x SYSTEM "file://{secret}">]>'
        "<domain><name>&x;</name><uuid>u</uuid></domain>"
    )
    # expat does not fetch external entities, so &x; stays undefined: the document is
    # refused, and the secret appears nowhere, not even in the error.
    with pytest.raises(DomainXMLError, match="undefined entity") as excinfo:
        parse_domain_xml(xml)
    assert "TOP-SECRET" not in str(excinfo.value)


@pytest.mark.parametrize(
    "xml",
    [
        "<domain/>",
        "<domain><devices><disk/></devices></domain>",
        "<domain><devices><disk type='file'><source/><target/><driver/></disk></devices></domain>",
        "<domain><devices><disk type='network'><source protocol='rbd'/></disk></devices></domain>",
        "<domain><devices><disk type='odd' device='odd'><source x='1'/></disk></devices></domain>",
        "<domain><devices><channel><target/></channel><channel/></devices></domain>",
        "<domain><devices><disk><backingStore><backingStore/></backingStore></disk></devices>"
        "</domain>",
    ],
)
def test_minimal_and_odd_documents_parse(xml: str) -> None:
    dom = parse_domain_xml(xml)
    # None of these documents names the domain, and no disk has a file source.
    assert (dom.name, dom.uuid) == ("", "")
    for disk in dom.disks:
        assert disk.source_path is None and not disk.is_file
