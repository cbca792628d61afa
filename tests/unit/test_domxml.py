"""domxml: libvirt-shaped XML -> Disk and AgentChannel."""

from __future__ import annotations

from pathlib import Path

import pytest

from virt_trimd.host.domxml import DomainXMLError, parse_domain_xml, trimmable_disks

DATA = Path(__file__).parent / "data"


def _load(name: str) -> str:
    return (DATA / name).read_text()


def test_live_scsi_domain_disks_and_agent() -> None:
    dom = parse_domain_xml(_load("domain_scsi_live.xml"))
    assert dom.name == "web01"
    assert dom.uuid == "6f1b9a52-4d2e-4f3c-9a61-0d7a3b2c1e10"
    assert dom.machine == "pc-q35-7.2"
    assert dom.agent.configured and dom.agent.state == "connected"
    by_target = {d.target: d for d in dom.disks}
    sda = by_target["sda"]
    assert (sda.bus, sda.source_type, sda.driver_format) == ("scsi", "file", "qcow2")
    assert sda.source_path == "/var/lib/libvirt/images/web 01 ü.qcow2"
    assert (sda.discard, sda.detect_zeroes) == ("unmap", "unmap")
    assert sda.controller_model == "virtio-scsi"
    assert sda.alias == "scsi0-0-0-0"
    assert sda.backing_chain == (
        "/var/lib/libvirt/images/base.qcow2",
        "/var/lib/libvirt/images/base.raw",
    )
    assert sda.is_file
    vdb = by_target["vdb"]
    assert vdb.discard is None and vdb.bus == "virtio" and vdb.driver_format == "raw"
    assert vdb.backing_chain == ()
    assert by_target["vdc"].source_type == "block"
    assert by_target["vdc"].source_path == "/dev/vg0/web01-log"
    assert not by_target["vdc"].is_file
    vdd = by_target["vdd"]
    assert (vdd.source_type, vdd.network_protocol, vdd.source_path) == (
        "network",
        "rbd",
        "pool/web01-rbd",
    )
    assert by_target["sdb"].source_type == "volume"
    assert by_target["sdb"].source_path == "default/web01-vol.qcow2"
    cdrom = by_target["sdc"]
    assert cdrom.device == "cdrom" and cdrom.source_path is None and cdrom.readonly


def test_trimmable_disks_drop_cdrom() -> None:
    dom = parse_domain_xml(_load("domain_scsi_live.xml"))
    assert [d.target for d in trimmable_disks(dom.disks)] == ["sda", "vdb", "vdc", "vdd", "sdb"]


def test_no_agent_channel_and_disk_without_source() -> None:
    dom = parse_domain_xml(_load("domain_noagent.xml"))
    assert not dom.agent.configured and dom.agent.state is None
    hdb = dom.disks[1]
    assert hdb.source_path is None and hdb.source_type == "file" and not hdb.is_file
    assert hdb.driver_format is None and hdb.discard is None


def test_inactive_xml_has_channel_without_state() -> None:
    xml = _load("domain_scsi_live.xml").replace(" state='connected'", "")
    assert parse_domain_xml(xml).agent.state is None


@pytest.mark.parametrize("text", ["", "<domain", "<network><name>x</name></network>"])
def test_garbage_is_a_clear_error(text: str) -> None:
    with pytest.raises(DomainXMLError):
        parse_domain_xml(text)


def test_backing_chain_is_bounded() -> None:
    inner = "<backingStore/>"
    for i in range(200):
        inner = f"<backingStore type='file'><source file='/b{i}'/>{inner}</backingStore>"
    xml = (
        "<domain><name>d</name><uuid>u</uuid><devices><disk type='file' device='disk'>"
        f"<source file='/a'/>{inner}<target dev='vda' bus='virtio'/></disk></devices></domain>"
    )
    assert len(parse_domain_xml(xml).disks[0].backing_chain) == 64
