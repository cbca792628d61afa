"""A stand-in host for the scale benchmark: N domains behind the real `Hypervisor` adapter.

Only the libvirt objects are stand-ins. `StandInConnection` and `StandInDomain` answer
what `host.hypervisor.Hypervisor` asks a `virConnect`/`virDomain` (listAllDomains,
XMLDesc, isActive, blockJobInfo, jobStats, guestInfo ...), with libvirt-shaped domain
XML that the real `parse_domain_xml` reads. `StandInHypervisor` is the real adapter
with one call replaced: `libvirt_qemu.qemuAgentCommand` (a C function that needs a real
domain) becomes a canned guest-agent reply after a fixed latency, by swapping the module
the adapter calls (the adapter's code itself is not copied or overridden). Everything the
adapter does around that call (the allow-list, the JSON, parse_agent_reply, the
deadline thread of guestInfo) still runs. Disks are real sparse raw files, so every
measurement is a real `os.stat` (raw: no qemu-img, which is not our code).
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from virt_trimd.host import hypervisor as hypervisor_module
from virt_trimd.host.hypervisor import Hypervisor

# What each image file holds: allocated bytes (written at offset 0) and apparent size.
IMAGE_ALLOCATED = 64 << 10
IMAGE_SIZE = 20 << 30
DISK_TARGETS = ("sda", "sdb", "sdc", "sdd", "sde", "sdf", "sdg", "sdh")

_DISK_XML = """    <disk type='file' device='disk'>
      <driver name='qemu' type='raw' discard='unmap'/>
      <source file='{path}' index='{index}'/>
      <backingStore/>
      <target dev='{target}' bus='scsi'/>
      <alias name='scsi0-0-0-{index}'/>
      <address type='drive' controller='0' bus='0' target='0' unit='{index}'/>
    </disk>
"""

_DOMAIN_XML = """<domain type='kvm' id='{id}'>
  <name>{name}</name>
  <uuid>{uuid}</uuid>
  <memory unit='KiB'>1048576</memory>
  <vcpu placement='static'>1</vcpu>
  <os>
    <type arch='x86_64' machine='pc-q35-7.2'>hvm</type>
    <boot dev='hd'/>
  </os>
  <devices>
    <emulator>/usr/bin/qemu-system-x86_64</emulator>
{disks}    <controller type='scsi' index='0' model='virtio-scsi'>
      <alias name='scsi0'/>
    </controller>
    <channel type='unix'>
      <source mode='bind' path='/run/libvirt/qemu/channel/{id}-{name}/org.qemu.guest_agent.0'/>
      <target type='virtio' name='org.qemu.guest_agent.0' state='connected'/>
      <alias name='channel0'/>
      <address type='virtio-serial' controller='0' bus='0' port='1'/>
    </channel>
  </devices>
</domain>
"""


def domain_name(i: int) -> str:
    return f"guest-{i:05d}.example.internal"


def domain_uuid(i: int) -> str:
    return f"00000000-0000-4000-8000-{i:012d}"


def make_images(directory: Path, domains: int, disks: int) -> list[list[str]]:
    """Sparse raw image files (IMAGE_ALLOCATED written of IMAGE_SIZE); made once, reused."""
    directory.mkdir(parents=True, exist_ok=True)
    block = b"\xa5" * IMAGE_ALLOCATED
    out: list[list[str]] = []
    for d in range(domains):
        paths = []
        for k in range(disks):
            path = directory / f"g{d:05d}-{DISK_TARGETS[k]}.img"
            if not path.exists():
                fd = os.open(path, os.O_WRONLY | os.O_CREAT, 0o600)
                try:
                    os.pwrite(fd, block, 0)
                    os.ftruncate(fd, IMAGE_SIZE)
                finally:
                    os.close(fd)
            paths.append(str(path))
        out.append(paths)
    return out


class StandInDomain:
    """A running domain as a virDomain would describe it; its agent answers after `latency`."""

    def __init__(self, index: int, paths: Sequence[str], latency: float) -> None:
        self.index = index
        self.uuid = domain_uuid(index)
        self._name = domain_name(index)
        self.latency = latency
        self.targets = DISK_TARGETS[: len(paths)]
        disks = "".join(
            _DISK_XML.format(path=p, index=k, target=self.targets[k]) for k, p in enumerate(paths)
        )
        self.xml = _DOMAIN_XML.format(id=index + 1, name=self._name, uuid=self.uuid, disks=disks)
        self.agent_calls = 0

    # -- the virDomain methods the adapter calls ----------------------------------------

    def name(self) -> str:
        return self._name

    def isActive(self) -> int:
        return 1

    def XMLDesc(self, flags: int = 0) -> str:
        del flags
        return self.xml

    def blockJobInfo(self, target: str, flags: int = 0) -> dict[str, Any]:
        del target, flags
        return {}

    def jobStats(self, flags: int = 0) -> dict[str, Any]:
        del flags
        return {"type": 0}  # VIR_DOMAIN_JOB_NONE

    def guestInfo(self, types: int, flags: int = 0) -> dict[str, Any]:
        """virDomainGetGuestInfo's filesystem part: one agent round trip."""
        del types, flags
        time.sleep(self.latency)
        info: dict[str, Any] = {"fs.count": len(self.targets)}
        for i, target in enumerate(self.targets):
            pre = f"fs.{i}."
            info.update(
                {
                    pre + "name": f"{target}1",
                    pre + "mountpoint": f"/mnt/{target}",
                    pre + "fstype": "ext4",
                    pre + "used-bytes": IMAGE_ALLOCATED // 2,
                    pre + "total-bytes": IMAGE_SIZE,
                    pre + "disk.count": 1,
                    pre + "disk.0.alias": target,
                }
            )
        return info

    def agent_reply(self, request: str) -> str:
        """What qemu-ga answers (as JSON text) to one request, after the latency."""
        self.agent_calls += 1
        time.sleep(self.latency)
        command = json.loads(request)["execute"]
        if command == "guest-fstrim":
            ret: Any = {
                "paths": [{"path": f"/mnt/{t}", "trimmed": 1 << 20, "minimum": 0}
                          for t in self.targets]
            }  # fmt: skip
        elif command == "guest-get-fsinfo":
            ret = [
                {"name": f"{t}1", "mountpoint": f"/mnt/{t}", "type": "ext4",
                 "used-bytes": IMAGE_ALLOCATED // 2, "total-bytes": IMAGE_SIZE, "disk": []}
                for t in self.targets
            ]  # fmt: skip
        else:
            ret = {}
        return json.dumps({"return": ret})


class StandInConnection:
    """The virConnect methods the adapter calls, over a fixed list of domains."""

    def __init__(self, domains: Sequence[StandInDomain]) -> None:
        self.domains = list(domains)
        self._by_uuid = {d.uuid: d for d in domains}
        self._by_name = {d.name(): d for d in domains}

    def listAllDomains(self, flags: int = 0) -> list[StandInDomain]:
        del flags
        return list(self.domains)

    def lookupByUUIDString(self, uuid: str) -> StandInDomain:
        return self._by_uuid[uuid]

    def lookupByName(self, name: str) -> StandInDomain:
        return self._by_name[name]

    def isAlive(self) -> int:
        return 1

    def getLibVersion(self) -> int:
        return 9_000_000

    def getVersion(self) -> int:
        return 7_002_000

    def close(self) -> int:
        return 0


class StandInLibvirtQemu:
    """Stands in for the `libvirt_qemu` module: the agent answers from the stand-in domain."""

    @staticmethod
    def qemuAgentCommand(dom: StandInDomain, request: str, timeout: int, flags: int) -> str:
        del timeout, flags
        return dom.agent_reply(request)


class StandInHypervisor(Hypervisor):
    """The real adapter over a StandInConnection, its agent calls answered by the stand-in.

    The adapter's own `agent_command` runs unchanged (allow-list, payload, timeout,
    error mapping, parse_agent_reply); only the module it calls into is swapped, which
    is safe because the scale worker is a process of its own.
    """

    def __init__(self, conn: StandInConnection) -> None:
        super().__init__("test:///scale-bench", opener=lambda _uri: conn)
        setattr(hypervisor_module, "libvirt_qemu", StandInLibvirtQemu)  # noqa: B010


def stand_in_host(
    image_dir: Path, domains: int, disks: int, latency: float
) -> tuple[StandInHypervisor, StandInConnection]:
    """The adapter and its connection over `domains` running guests of `disks` disks."""
    paths = make_images(image_dir, domains, disks)
    conn = StandInConnection([StandInDomain(i, paths[i], latency) for i in range(domains)])
    return StandInHypervisor(conn), conn
