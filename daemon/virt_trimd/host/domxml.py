"""Pure parsing of libvirt domain XML into `Disk` and `AgentChannel` records.

No libvirt import here: the input is the XML text `virDomainGetXMLDesc` returns,
so unit tests feed it libvirt-shaped samples.
"""

from __future__ import annotations

import logging
import xml.etree.ElementTree as ET
from dataclasses import dataclass

from virt_trimd.records import AgentChannel, Disk

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.domxml")

AGENT_CHANNEL_NAME = "org.qemu.guest_agent.0"


class DomainXMLError(ValueError):
    """The domain XML could not be parsed."""


@dataclass(frozen=True)
class ParsedDomain:
    """What one domain XML document says about trimming."""

    name: str
    uuid: str
    machine: str | None
    disks: tuple[Disk, ...]
    agent: AgentChannel


def parse_domain_root(xml_text: str) -> ET.Element:
    """The `<domain>` element of a domain document; raise DomainXMLError (a ValueError)."""
    try:
        root = ET.fromstring(xml_text)
    except ET.ParseError as exc:
        raise DomainXMLError(f"domain XML does not parse: {exc}") from exc
    if root.tag != "domain":
        raise DomainXMLError(f"expected <domain>, got <{root.tag}>")
    return root


def parse_domain_xml(xml_text: str) -> ParsedDomain:
    """Parse a `<domain>` document.

    Raises DomainXMLError when the text is not a domain document.
    """
    root = parse_domain_root(xml_text)
    name = (root.findtext("name") or "").strip()
    uuid = (root.findtext("uuid") or "").strip()
    os_type = root.find("os/type")
    machine = os_type.get("machine") if os_type is not None else None
    controllers = _scsi_controller_models(root)
    disks = tuple(_parse_disk(el, controllers) for el in root.findall("devices/disk"))
    return ParsedDomain(
        name=name, uuid=uuid, machine=machine, disks=disks, agent=_parse_agent(root)
    )


def _scsi_controller_models(root: ET.Element) -> dict[str, str | None]:
    """Map SCSI controller index -> model (None when libvirt picked the default)."""
    models: dict[str, str | None] = {}
    for ctl in root.findall("devices/controller"):
        if ctl.get("type") == "scsi":
            models[ctl.get("index", "0")] = ctl.get("model")
    return models


def _parse_disk(el: ET.Element, scsi_models: dict[str, str | None]) -> Disk:
    target = el.find("target")
    driver = el.find("driver")
    source = el.find("source")
    alias = el.find("alias")
    source_type = el.get("type", "")
    bus = (target.get("bus") if target is not None else None) or ""
    path: str | None = None
    protocol: str | None = None
    if source is not None:
        if source_type == "file":
            path = source.get("file")
        elif source_type == "block":
            path = source.get("dev")
        elif source_type == "dir":
            path = source.get("dir")
        elif source_type == "network":
            protocol = source.get("protocol")
            path = source.get("name")
        elif source_type == "volume":
            pool, vol = source.get("pool"), source.get("volume")
            path = f"{pool}/{vol}" if pool and vol else None
    controller_model: str | None = None
    if bus == "scsi":
        address = el.find("address")
        ctl_index = address.get("controller", "0") if address is not None else "0"
        controller_model = scsi_models.get(ctl_index)
    return Disk(
        target=(target.get("dev") if target is not None else None) or "",
        bus=bus,
        device=el.get("device", "disk"),
        source_type=source_type,
        source_path=path,
        driver_format=driver.get("type") if driver is not None else None,
        discard=driver.get("discard") if driver is not None else None,
        detect_zeroes=driver.get("detect_zeroes") if driver is not None else None,
        alias=alias.get("name") if alias is not None else None,
        controller_model=controller_model,
        network_protocol=protocol,
        backing_chain=_backing_chain(el),
        readonly=el.find("readonly") is not None,
        shareable=el.find("shareable") is not None,
    )


def _backing_chain(disk: ET.Element) -> tuple[str, ...]:
    """Paths of the backing files libvirt reports in `<backingStore>`, nearest first."""
    chain: list[str] = []
    node = disk.find("backingStore")
    # Bounded: a hostile or broken XML cannot make us loop; libvirt itself caps chains.
    while node is not None and len(chain) < 64:
        src = node.find("source")
        if src is None:
            break
        path = src.get("file") or src.get("dev") or src.get("name")
        if path:
            chain.append(path)
        node = node.find("backingStore")
    return tuple(chain)


def _parse_agent(root: ET.Element) -> AgentChannel:
    for chan in root.findall("devices/channel"):
        target = chan.find("target")
        if target is None or target.get("name") != AGENT_CHANNEL_NAME:
            continue
        # `state` is only present in the live XML of a running domain.
        return AgentChannel(configured=True, state=target.get("state"))
    return AgentChannel(configured=False, state=None)


def trimmable_disks(disks: tuple[Disk, ...]) -> tuple[Disk, ...]:
    """Disks that can hold a guest filesystem the agent can trim (not cdrom/floppy)."""
    return tuple(d for d in disks if d.device in ("disk", "lun"))
