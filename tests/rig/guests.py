"""Rig guests: domain XML, start/stop through libvirt, waiting for boot and the agent."""

from __future__ import annotations

import base64
import json
import logging
import os
import time
import xml.etree.ElementTree as ET
from collections.abc import Callable, Iterable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal
from xml.sax.saxutils import escape, quoteattr

import libvirt
import libvirt_qemu

from rig.host import TEST_PREFIX, RigError, ensure_virtlogd, session_prefix
from rig.images import ImageFormat, make_disk_image
from rig.initramfs import READY_MARKER, BootFiles

log = logging.getLogger(__name__)

Bus = Literal["scsi", "virtio", "sata"]
Discard = Literal["unmap", "ignore"]
AgentMode = Literal["running", "channel_only", "stalled", "none"]

RIG_NS = "https://virt-trimd.invalid/test-rig"
_AGENT_CHANNEL = "org.qemu.guest_agent.0"


@dataclass(frozen=True)
class DiskSpec:
    """One ext4 data disk; the guest deletes its garbage_mib MiB of garbage at boot."""

    fmt: ImageFormat = "qcow2"
    bus: Bus = "scsi"
    discard: Discard | None = "unmap"
    garbage_mib: int = 200
    size_mib: int = 1024


@dataclass(frozen=True)
class GuestSpec:
    """A rig guest. The domain is named session_prefix() + name.

    agent: "running" starts qemu-ga; "channel_only" keeps the channel in the XML but boots
    with vtrimd.noagent so nobody opens it (libvirt: agent not connected); "stalled" has
    the guest hold the port open without answering (libvirt: agent connected, commands
    time out); "none" has no channel at all (libvirt: agent not configured).
    """

    name: str
    disks: tuple[DiskSpec, ...] = (DiskSpec(),)
    agent: AgentMode = "running"
    memory_mib: int = 256

    @property
    def domain_name(self) -> str:
        return session_prefix() + self.name


@dataclass
class GuestHandle:
    """A started rig guest: its libvirt domain and the files the rig made for it."""

    spec: GuestSpec
    dom: libvirt.virDomain
    workdir: Path
    images: list[Path]
    console_log: Path
    started_at: float = field(default_factory=time.monotonic)

    @property
    def name(self) -> str:
        return self.spec.domain_name


Owner = Literal["process", "cli"]


def _start_ticks(pid: int | None = None) -> str:
    """Start time of pid (default: this process) in clock ticks since boot, or "" if gone.

    With the pid it identifies a process even after the pid is reused.
    """
    try:
        stat = Path(f"/proc/{pid or os.getpid()}/stat").read_text()
    except OSError:
        return ""
    # Field 22; the command name (field 2) may contain spaces, so split after its ')'.
    return stat.rsplit(")", 1)[1].split()[19]


# What the e2e `guest_factory` fixture yields: call with GuestSpecs, get ready guests.
GuestFactory = Callable[..., list[GuestHandle]]


def _target_devs(disks: Sequence[DiskSpec]) -> list[str]:
    """Target names: scsi and sata share the sd* namespace in libvirt, virtio uses vd*."""
    sd = vd = 0
    names = []
    for d in disks:
        if d.bus == "virtio":
            names.append("vd" + chr(ord("a") + vd))
            vd += 1
        else:
            names.append("sd" + chr(ord("a") + sd))
            sd += 1
    return names


def console_log_path(workdir: Path, spec: GuestSpec) -> Path:
    return workdir / f"{spec.domain_name}.console.log"


def domain_xml(
    spec: GuestSpec,
    boot: BootFiles,
    image_paths: Sequence[Path],
    console_log: Path | None = None,
    owner: Owner = "process",
) -> str:
    """Libvirt XML for spec: TCG, q35, direct kernel boot, no network, no graphics.

    console_log (the serial console file) defaults to one beside the first image.
    owner "process" records this process as the guest's owner (see cleanup_test_domains);
    "cli" marks a guest that lives until `python -m rig down`.
    """
    if len(image_paths) != len(spec.disks):
        raise RigError(f"{len(spec.disks)} disks in spec but {len(image_paths)} image paths")
    if console_log is None:
        if not image_paths:
            raise RigError("a guest without disks needs an explicit console_log path")
        console_log = console_log_path(image_paths[0].parent, spec)
    # Not `quiet`: the kernel log costs no measurable boot time under TCG and is what
    # explains an early failure (OOM unpacking the initramfs, a missing driver).
    # panic=-1 + on_reboot=destroy: a panicking guest stops instead of hanging.
    # no_timer_check: on a loaded host a starved TCG vCPU misses the IO-APIC timer test
    # and the kernel panics at boot ("IO-APIC + timer doesn't work!", seen in a full run
    # beside two other rigs); VM images skip that check for the same reason.
    cmdline = f"console=ttyS0 panic=-1 no_timer_check vtrimd.disks={len(spec.disks)}"
    if spec.agent == "channel_only":
        cmdline += " vtrimd.noagent"
    elif spec.agent == "stalled":
        cmdline += " vtrimd.agentstall"
    devices: list[str] = []
    if any(d.bus == "scsi" for d in spec.disks):
        devices.append("<controller type='scsi' index='0' model='virtio-scsi'/>")
    for disk, dev, path in zip(spec.disks, _target_devs(spec.disks), image_paths, strict=True):
        discard = f" discard='{disk.discard}'" if disk.discard else ""
        devices.append(
            "<disk type='file' device='disk'>"
            f"<driver name='qemu' type='{disk.fmt}'{discard}/>"
            f"<source file={quoteattr(str(path))}/>"
            f"<target dev='{dev}' bus='{disk.bus}'/>"
            "</disk>"
        )
    if spec.agent != "none":
        devices.append(
            f"<channel type='unix'><target type='virtio' name='{_AGENT_CHANNEL}'/></channel>"
        )
    devices += [
        f"<serial type='file'><source path={quoteattr(str(console_log))}/>"
        "<target port='0'/></serial>",
        "<memballoon model='none'/>",
    ]
    workdir = console_log.parent
    if owner == "cli":
        owner_xml = "<rig:owner kind='cli'/>"
    else:
        owner_xml = f"<rig:owner kind='process' pid='{os.getpid()}' start='{_start_ticks()}'/>"
    devices_xml = "\n    ".join(devices)
    return f"""<domain type='qemu'>
  <name>{escape(spec.domain_name)}</name>
  <metadata>
    <rig:rig xmlns:rig='{RIG_NS}'>
      <rig:workdir>{escape(str(workdir))}</rig:workdir>
      {owner_xml}
    </rig:rig>
  </metadata>
  <memory unit='MiB'>{spec.memory_mib}</memory>
  <vcpu>1</vcpu>
  <os>
    <type arch='x86_64' machine='q35'>hvm</type>
    <kernel>{escape(str(boot.kernel))}</kernel>
    <initrd>{escape(str(boot.initrd))}</initrd>
    <cmdline>{escape(cmdline)}</cmdline>
  </os>
  <features><acpi/></features>
  <clock offset='utc'/>
  <on_poweroff>destroy</on_poweroff>
  <on_reboot>destroy</on_reboot>
  <on_crash>destroy</on_crash>
  <devices>
    {devices_xml}
  </devices>
  <!-- QEMU as root without relabelling: rig files live in private tmp dirs
       (pytest's are 0700) that the default libvirt-qemu user cannot traverse. -->
  <seclabel type='static' model='dac' relabel='no'><label>+0:+0</label></seclabel>
</domain>
"""


def _tail(path: Path, lines: int = 30) -> str:
    try:
        text = path.read_text(errors="replace")
    except OSError as exc:
        return f"(cannot read {path}: {exc})"
    return "\n".join(text.splitlines()[-lines:])


def _console_log_of(dom: libvirt.virDomain) -> Path | None:
    root = ET.fromstring(dom.XMLDesc(0))
    src = root.find("./devices/serial/source")
    return Path(src.get("path", "")) if src is not None and src.get("path") else None


def boot_failure(dom: libvirt.virDomain, what: str) -> RigError:
    """A RigError for dom that names its log files and quotes the console tail."""
    name = dom.name()
    console = _console_log_of(dom)
    qemu_log = Path("/var/log/libvirt/qemu") / f"{name}.log"
    msg = f"{name}: {what}\nqemu log: {qemu_log}\nconsole log: {console}"
    if console is not None:
        msg += f"\n--- console tail ---\n{_tail(console)}"
    if qemu_log.exists():
        msg += f"\n--- qemu log tail ---\n{_tail(qemu_log, 10)}"
    return RigError(msg)


def agent_command(dom: libvirt.virDomain, execute: str, timeout_s: int = 10, **args: Any) -> Any:
    """Send one guest agent command through libvirt and return its "return" value.

    Raises libvirt.libvirtError when the agent is not connected or does not answer.
    """
    cmd: dict[str, Any] = {"execute": execute}
    if args:
        cmd["arguments"] = args
    reply = libvirt_qemu.qemuAgentCommand(dom, json.dumps(cmd), timeout_s, 0)
    return json.loads(reply).get("return")


def guest_exec(dom: libvirt.virDomain, argv: Sequence[str], timeout_s: float = 60) -> str:
    """Run argv in the guest through the agent; return its stdout, raise RigError on failure."""
    started = agent_command(
        dom, "guest-exec", path=argv[0], arg=list(argv[1:]), **{"capture-output": True}
    )
    pid = started["pid"]
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        status = agent_command(dom, "guest-exec-status", pid=pid)
        if status.get("exited"):
            out = base64.b64decode(status.get("out-data", "")).decode(errors="replace")
            err = base64.b64decode(status.get("err-data", "")).decode(errors="replace")
            if status.get("exitcode", 0) != 0:
                raise RigError(f"guest command {argv} exited {status.get('exitcode')}: {err}")
            return out
        time.sleep(0.2)
    raise RigError(f"guest command {argv} still running after {timeout_s}s")


def wait_for_boot(dom: libvirt.virDomain, timeout_s: float = 90) -> None:
    """Wait until the guest's init has mounted its disks and deleted the garbage.

    Reads the ready marker from the serial console log, so it works without an agent.
    Raises RigError (with the console tail) if the domain stops or timeout_s passes.
    """
    console = _console_log_of(dom)
    if console is None:
        raise RigError(f"{dom.name()} has no serial file console; cannot see it boot")
    deadline = time.monotonic() + timeout_s
    while time.monotonic() < deadline:
        if not dom.isActive():
            raise boot_failure(dom, "domain stopped while booting")
        try:
            if READY_MARKER in console.read_text(errors="replace"):
                return
        except FileNotFoundError:
            pass
        time.sleep(0.25)
    raise boot_failure(dom, f"no {READY_MARKER} on the console within {timeout_s}s")


def wait_for_agent(dom: libvirt.virDomain, timeout_s: float = 90) -> None:
    """Poll guest-ping until the agent answers; raise RigError with the console tail if not."""
    deadline = time.monotonic() + timeout_s
    last = ""
    while time.monotonic() < deadline:
        if not dom.isActive():
            raise boot_failure(dom, "domain stopped before the guest agent answered")
        try:
            agent_command(dom, "guest-ping", timeout_s=2)
            return
        except libvirt.libvirtError as exc:
            last = str(exc)
        time.sleep(0.25)
    raise boot_failure(dom, f"guest agent silent for {timeout_s}s (last error: {last})")


def start_guest(
    conn: libvirt.virConnect,
    spec: GuestSpec,
    workdir: Path,
    boot: BootFiles,
    owner: Owner = "process",
) -> GuestHandle:
    """Create spec's images in workdir, define the persistent domain and start it.

    A rig domain of the same name is destroyed first, so `up` can be repeated. Does not
    wait for boot; see wait_for_boot / wait_for_agent / start_guests.
    """
    destroy_guest(conn, spec.domain_name)
    workdir.mkdir(parents=True, exist_ok=True)
    images = []
    for i, disk in enumerate(spec.disks):
        img = workdir / f"{spec.domain_name}-disk{i}.{disk.fmt}"
        make_disk_image(img, disk.fmt, disk.size_mib, disk.garbage_mib, label=f"data{i}")
        images.append(img)
    console = console_log_path(workdir, spec)
    console.unlink(missing_ok=True)
    xml = domain_xml(spec, boot, images, console, owner)
    dom = conn.defineXML(xml)
    try:
        try:
            dom.create()
        except libvirt.libvirtError as exc:
            # virtlogd is host plumbing, not under test: if it died under a running
            # libvirtd, start it again and retry once instead of failing every test after.
            if "virtlogd-sock" not in str(exc):
                raise
            log.warning("%s: %s; restarting virtlogd", spec.domain_name, exc)
            ensure_virtlogd()
            dom.create()
    except (libvirt.libvirtError, RigError) as exc:
        raise boot_failure(dom, f"start failed: {exc}") from exc
    log.info("started %s (workdir %s)", spec.domain_name, workdir)
    return GuestHandle(spec=spec, dom=dom, workdir=workdir, images=images, console_log=console)


def wait_ready(handle: GuestHandle, timeout_s: float = 90) -> None:
    """Wait for what the spec promises: the agent if it runs one, else the boot marker."""
    if handle.spec.agent == "running":
        wait_for_agent(handle.dom, timeout_s)
    wait_for_boot(handle.dom, timeout_s)


def start_guests(  # noqa: PLR0913  (two keyword-only knobs with defaults)
    conn: libvirt.virConnect,
    specs: Iterable[GuestSpec],
    workdir: Path,
    boot: BootFiles,
    *,
    timeout_s: float = 120,
    owner: Owner = "process",
) -> list[GuestHandle]:
    """Start every spec, then wait for all of them (boot and agent) in parallel.

    Images are made in parallel too (mkfs and qemu-img are I/O bound). Any guest that
    fails to come up raises RigError; already started guests are left for cleanup.
    """
    specs = list(specs)
    names = [s.domain_name for s in specs]
    if len(set(names)) != len(names):
        raise RigError(f"duplicate guest names in {names}")
    with ThreadPoolExecutor(max_workers=max(1, len(specs))) as pool:
        handles = list(pool.map(lambda s: start_guest(conn, s, workdir, boot, owner), specs))
        list(pool.map(lambda h: wait_ready(h, timeout_s), handles))
    return handles


def _rig_metadata(dom: libvirt.virDomain) -> ET.Element | None:
    try:
        meta = dom.metadata(libvirt.VIR_DOMAIN_METADATA_ELEMENT, RIG_NS, 0)
    except libvirt.libvirtError:
        return None
    return ET.fromstring(meta)


def _find(root: ET.Element, tag: str) -> ET.Element | None:
    # libvirt hands the element back without its namespace prefix.
    node = root.find(tag)
    return node if node is not None else root.find(f"{{{RIG_NS}}}{tag}")


def _rig_workdir(dom: libvirt.virDomain) -> Path | None:
    root = _rig_metadata(dom)
    node = _find(root, "workdir") if root is not None else None
    return Path(node.text) if node is not None and node.text else None


def guest_owner(dom: libvirt.virDomain) -> str:
    """ "cli", "live" (owning process still runs), "self" (this process) or "stale"."""
    root = _rig_metadata(dom)
    node = _find(root, "owner") if root is not None else None
    if node is None:
        return "stale"
    if node.get("kind") == "cli":
        return "cli"
    pid = int(node.get("pid", "0"))
    if pid == os.getpid():
        return "self"
    alive = pid > 0 and _start_ticks(pid) == node.get("start")
    return "live" if alive else "stale"


def _rig_files(dom: libvirt.virDomain) -> list[Path]:
    """Disk images and console log of dom that lie in the workdir the rig recorded."""
    workdir = _rig_workdir(dom)
    if workdir is None:
        return []
    root = ET.fromstring(dom.XMLDesc(0))
    paths = [
        Path(src.get("file") or src.get("path") or "")
        for src in root.findall("./devices/disk/source") + root.findall("./devices/serial/source")
    ]
    return [p for p in paths if p.is_relative_to(workdir) and p.name.startswith(TEST_PREFIX)]


def destroy_guest(conn: libvirt.virConnect, name: str, force: bool = False) -> None:
    """Destroy and undefine the rig domain `name` and delete the files the rig made for it.

    Refuses names without TEST_PREFIX, and (unless force) domains owned by another live
    process: test sessions of several people may share one libvirtd. A missing domain is
    not an error.
    """
    if not name.startswith(TEST_PREFIX):
        raise RigError(f"refusing to touch {name!r}: not a rig domain ({TEST_PREFIX}*)")
    try:
        dom = conn.lookupByName(name)
        if not force and guest_owner(dom) == "live":
            raise RigError(
                f"{name} belongs to another running process; pick another name, or remove "
                "it with `PYTHONPATH=tests python3 -m rig down --all`"
            )
        files = _rig_files(dom)
        if dom.isActive():
            try:
                dom.destroy()
            except libvirt.libvirtError:
                # It may have stopped by itself (panic=-1, on_crash=destroy) meanwhile.
                if dom.isActive():
                    raise
        flags = (
            libvirt.VIR_DOMAIN_UNDEFINE_MANAGED_SAVE
            | libvirt.VIR_DOMAIN_UNDEFINE_SNAPSHOTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_CHECKPOINTS_METADATA
            | libvirt.VIR_DOMAIN_UNDEFINE_NVRAM
        )
        dom.undefineFlags(flags)
    except libvirt.libvirtError as exc:
        # Someone else (another cleanup) removed it first: that is what we wanted.
        if exc.get_error_code() == libvirt.VIR_ERR_NO_DOMAIN:
            return
        raise RigError(f"cannot remove {name}: {exc}") from exc
    for f in files:
        f.unlink(missing_ok=True)


def cleanup_test_domains(
    conn: libvirt.virConnect, include_cli: bool = False, include_live: bool = False
) -> list[str]:
    """Remove rig domains (TEST_PREFIX*) that nobody uses any more; return their names.

    By default that is guests of processes that have exited (or of this process).
    include_cli adds guests from `python -m rig up`; include_live adds guests of other
    running processes (another test session), which is rarely what you want.
    """
    wanted = {"stale", "self"}
    if include_cli:
        wanted.add("cli")
    if include_live:
        wanted.add("live")
    removed = []
    for dom in conn.listAllDomains(0):
        try:
            name = dom.name()
            if not name.startswith(TEST_PREFIX) or guest_owner(dom) not in wanted:
                continue
        except libvirt.libvirtError:
            continue  # vanished while we looked
        destroy_guest(conn, name, force=True)
        removed.append(name)
    return removed
