"""Discard audit: does a guest's TRIM reach the host image, and if not, what to change.

Pure logic over parsed domain XML (`ParsedDomain` / `DomainInfo`): no libvirt here.
A guest's discard frees host space only when every hop passes it on:

    guest fstrim -> guest driver -> emulated bus/device -> QEMU block layer -> image/host

The checks below name the hop that drops it and the exact XML change that fixes it.
The CLI (`virt-trimd audit`) prints through `audit.report`; the daemon
exports `discard_ready` as `virt_trimd_disk_discard_ready`; `discardfix` implements
`virt-trimd audit --enable-discard`.
"""

from __future__ import annotations

import enum
import re
import shlex
from dataclasses import dataclass, field
from typing import Protocol

from virt_trimd.host.domxml import AGENT_CHANNEL_NAME
from virt_trimd.records import AgentChannel, Disk

QemuVersion = tuple[int, int, int]

AGENT_CHANNEL_XML = (
    f"<channel type='unix'><target type='virtio' name='{AGENT_CHANNEL_NAME}'/></channel>"
)
AGENT_INSTALL_HINT = "install and start qemu-guest-agent in the guest"
COLD_BOOT_HINT = (
    "XML changes take effect at the next cold boot: `virsh shutdown {domain}`, then "
    "`virsh start {domain}` (a reboot inside the guest keeps the running QEMU process)"
)
BUS_FIX = (
    "move the disk to virtio-scsi: add <controller type='scsi' model='virtio-scsi'/> and "
    "set <target dev='sdX' bus='scsi'/>; for a Windows guest let it load the vioscsi driver "
    "first (add a small second disk on that bus and boot once) and never move the boot disk "
    "first - see docs/troubleshooting.md"
)

# Devices that never carry a trimmable guest filesystem.
SKIPPED_DEVICES = frozenset({"cdrom", "floppy"})
# The virtio-scsi controller models libvirt knows (the -transitional ones exist since 5.2).
_VIRTIO_SCSI_MODELS = frozenset({"virtio-scsi", "virtio-transitional", "virtio-non-transitional"})
# QEMU block drivers whose discard reaches the storage server.
_DISCARD_PROTOCOLS = frozenset({"rbd", "iscsi", "nbd", "gluster"})
# QEMU's curl driver (http, ftp, ...) is read-only: nothing to discard.
_READONLY_PROTOCOLS = frozenset({"http", "https", "ftp", "ftps", "tftp"})
_NO_DISCARD_BUSES = {
    # Linux's usb-storage skips the SCSI VPD pages that advertise UNMAP, so guests never
    # send discards to a QEMU usb-storage disk.
    "usb": "bus='usb': guests do not send discards to USB mass storage (Linux's usb-storage "
    "does not read the pages that advertise UNMAP)",
    "sd": "bus='sd': the emulated SD card does not pass discards to the image",
    "xen": "bus='xen' is a Xen paravirtual disk; under QEMU/KVM it has no discard path",
}
# Machine-type aliases resolve to the newest versioned type of the running QEMU.
_MACHINE_ALIASES = frozenset(
    {"pc", "q35", "virt", "pseries", "s390-ccw-virtio", "ubuntu", "ubuntu-q35"}
)
# Ubuntu's own machine types are named after the release; the QEMU each release shipped
# decides which upstream compat properties (hw_compat_X_Y) they carry.
_UBUNTU_MACHINES = {
    "trusty": (2, 0),
    "xenial": (2, 5),
    "yakkety": (2, 6),
    "zesty": (2, 8),
    "artful": (2, 10),
    "bionic": (2, 11),
    "cosmic": (2, 12),
    "disco": (3, 1),
    "eoan": (4, 0),
    "focal": (4, 2),
    "groovy": (5, 0),
    "hirsute": (5, 2),
    "impish": (6, 0),
    "jammy": (6, 2),
    "kinetic": (7, 0),
    "lunar": (7, 2),
    "mantic": (8, 0),
    "noble": (8, 2),
}
_VERSIONED_MACHINE = re.compile(
    r"(?P<family>[a-z0-9_]+(?:-[a-z0-9_]+)*?)-(?P<major>\d+)\.(?P<minor>\d+)(?:\.\d+)?(?:-[a-z]+)?"
)
_RHEL_MACHINE = re.compile(r"(?P<family>.*?)-?rhel(?P<major>\d+)\.(?P<minor>\d+)(?:\.\d+)?")
_UBUNTU_MACHINE = re.compile(r"(?P<family>pc-(?:i440fx|q35))-(?P<codename>[a-z]+)(?:-hpb)?")
# virtio-blk gained discard in QEMU 4.0; hw_compat_3_1 turns it off again
# ("virtio-blk-device", "discard", "false") for every machine type <= 3.1.
_VIRTIO_BLK_DISCARD_QEMU = (4, 0)
_LAST_MACHINE_WITHOUT_DISCARD = (3, 1)


class Verdict(enum.StrEnum):
    """Whether a guest's discards reach the host."""

    READY = "ready"
    NOT_READY = "not_ready"


class DomainDescription(Protocol):
    """What the audit reads from a parsed domain: `ParsedDomain` and `DomainInfo` both fit."""

    @property
    def name(self) -> str: ...
    @property
    def machine(self) -> str | None: ...
    @property
    def disks(self) -> tuple[Disk, ...]: ...
    @property
    def agent(self) -> AgentChannel: ...


@dataclass(frozen=True)
class AgentAudit:
    """Guest agent verdict: without an answering agent nobody asks the guest to trim."""

    configured: bool
    state: str | None  # connected / disconnected / None (not running or not reported)
    verdict: Verdict
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    fix: str | None = None


@dataclass(frozen=True)
class DiskAudit:
    """Verdict for one disk, from the definition QEMU runs now (live) when there is one.

    `discard` is "ignore" when the XML has no attribute (libvirt's default);
    `discard_explicit` says whether the XML spelled it out. `reasons` lists every
    reason the disk is not ready; `notes` are facts worth knowing that do not block.
    """

    target: str
    device: str
    bus: str
    controller_model: str | None
    source_type: str
    source: str | None
    format: str | None
    discard: str
    discard_explicit: bool
    detect_zeroes: str | None
    verdict: Verdict
    reasons: tuple[str, ...] = ()
    notes: tuple[str, ...] = ()
    fix: str | None = None
    differs: bool = False  # live and persistent definitions disagree about this disk
    persistent_verdict: Verdict | None = None  # None for transient domains / hot-plugged disks
    pending: str | None = None  # what the live/persistent difference means


@dataclass(frozen=True)
class DomainAudit:
    """Audit of one domain: agent, every trimmable disk, domain-level notes."""

    name: str
    running: bool
    machine: str | None
    agent: AgentAudit
    disks: tuple[DiskAudit, ...]
    notes: tuple[str, ...] = ()
    next_step: str | None = None  # how XML fixes take effect (cold boot), when any apply

    @property
    def ready(self) -> bool:
        """True when the agent and every audited disk are ready."""
        return self.agent.verdict is Verdict.READY and all(
            d.verdict is Verdict.READY for d in self.disks
        )


@dataclass(frozen=True)
class _Check:
    ready: bool
    reasons: tuple[str, ...]
    notes: tuple[str, ...]
    fix: str | None


# -- machine types --------------------------------------------------------------------


def virtio_blk_discard(
    machine: str | None, qemu_version: QemuVersion | None
) -> tuple[bool | None, str]:
    """Does virtio-blk offer discard to the guest on this machine type and QEMU?

    Returns (True/False, or None when it cannot be told, and the explanation).
    A versioned machine type X.Y only exists in QEMU >= X.Y, so it also bounds QEMU.
    """
    if qemu_version is not None and qemu_version[:2] < _VIRTIO_BLK_DISCARD_QEMU:
        ver = ".".join(map(str, qemu_version))
        return False, f"QEMU {ver} has no discard for virtio-blk (added in QEMU 4.0)"
    m = (machine or "").strip().lower()
    if not m:
        return _by_qemu(qemu_version, "the domain XML names no machine type")
    if m in _MACHINE_ALIASES:
        return _by_qemu(qemu_version, f"machine type '{m}' is an alias for QEMU's newest")
    rhel = _RHEL_MACHINE.fullmatch(m)
    if rhel:
        # RHEL 7's qemu-kvm predates virtio-blk discard and its rhel7.x machine types keep
        # it off; RHEL 8's types carry the 4.0 behaviour.
        if int(rhel["major"]) <= 7:
            return False, (
                f"machine type '{machine}' is a RHEL 7 type: virtio-blk discard stays off "
                "on it for compatibility"
            )
        return True, f"machine type '{machine}' (RHEL 8 or newer) has virtio-blk discard"
    ubuntu = _UBUNTU_MACHINE.fullmatch(m)
    if ubuntu and ubuntu["codename"] in _UBUNTU_MACHINES:
        return _by_machine_version(machine or m, _UBUNTU_MACHINES[ubuntu["codename"]])
    versioned = _VERSIONED_MACHINE.fullmatch(m)
    if versioned:
        return _by_machine_version(machine or m, (int(versioned["major"]), int(versioned["minor"])))
    return None, f"machine type '{machine}' is not one virt-trimd can date"


def _by_qemu(qemu_version: QemuVersion | None, what: str) -> tuple[bool | None, str]:
    if qemu_version is None:
        return None, f"{what} and the QEMU version is unknown"
    return True, f"{what}; QEMU {'.'.join(map(str, qemu_version))} has virtio-blk discard"


def _by_machine_version(machine: str, version: tuple[int, int]) -> tuple[bool, str]:
    if version <= _LAST_MACHINE_WITHOUT_DISCARD:
        return False, (
            f"machine type '{machine}' ({version[0]}.{version[1]}) is 3.1 or older: QEMU "
            "keeps discard off on virtio-blk for compatibility (hw_compat_3_1), so the guest "
            "never sees the feature"
        )
    return True, f"machine type '{machine}' is newer than 3.1: virtio-blk offers discard"


def _machine_fix(machine: str | None) -> str:
    m = machine or ""
    rhel = _RHEL_MACHINE.fullmatch(m.lower())
    if rhel and rhel["family"]:
        newer = f"{rhel['family']}-rhel8.0.0 or newer"
    else:
        versioned = _VERSIONED_MACHINE.fullmatch(m.lower()) or _UBUNTU_MACHINE.fullmatch(m.lower())
        newer = f"{versioned['family']}-4.0 or newer" if versioned else "a 4.0-or-newer type"
    return (
        f"raise the machine type to {newer} in <os><type machine='...'>, e.g. the newest "
        "`virsh capabilities` lists (this changes guest-visible hardware: test it first; "
        "Windows may ask for reactivation), or move the disk to virtio-scsi"
    )


# -- per-disk rules ----------------------------------------------------------------------


def _driver_fix(disk: Disk, domain: str) -> str:
    attrs = ["name='qemu'"]
    if disk.driver_format:
        attrs.append(f"type='{disk.driver_format}'")
    attrs.append("discard='unmap'")
    if disk.detect_zeroes:
        attrs.append(f"detect_zeroes='{disk.detect_zeroes}'")
    new = f"<driver {' '.join(attrs)}/> (keep its other attributes"
    if disk.source_type == "network":
        # enable_discard_xml skips network disks: whether a shared backend should get
        # discards is the storage owner's call.
        return new + "; `--enable-discard` leaves network disks alone, edit it by hand)"
    return new + f"; `virt-trimd audit --enable-discard {shlex.quote(domain)}` does this)"


@dataclass
class _Findings:
    """What the checks of one disk found so far: blocking reasons, notes, fixes."""

    reasons: list[str] = field(default_factory=list)
    notes: list[str] = field(default_factory=list)
    fixes: list[str] = field(default_factory=list)


def _check_disk(
    disk: Disk, machine: str | None, qemu_version: QemuVersion | None, domain: str = "DOMAIN"
) -> _Check:
    found = _Findings()
    reasons, notes, fixes = found.reasons, found.notes, found.fixes
    needs_discard_attr = True
    src = disk.source_type
    proto = disk.network_protocol or "unknown"

    if src == "dir":
        needs_discard_attr = False
        reasons.append(
            "type='dir' shows a host directory as a virtual FAT disk (QEMU vvfat), "
            "which has no discard"
        )
        fixes.append("copy the data onto an image-file disk")
    elif src == "network":
        if proto in _READONLY_PROTOCOLS:
            needs_discard_attr = False
            reasons.append(f"protocol '{proto}' is read-only in QEMU: there is nothing to discard")
        elif proto in _DISCARD_PROTOCOLS:
            notes.append(
                f"network disk ({proto}): discards go to the storage backend, so reclaim "
                "happens in the storage backend; virt-trimd cannot measure it"
            )
        else:
            notes.append(
                f"network disk ({proto}): whether QEMU's {proto} driver passes discards is not "
                "known to virt-trimd; reclaim happens in the storage backend; virt-trimd "
                "cannot measure it"
            )
    elif src == "block":
        notes.append(
            "block device: with discard='unmap' the host device (thin LV, SSD, LUN) gets "
            "the discard; virt-trimd measures image files only, so reclaim is not measured"
        )
    elif src == "vhostuser":
        needs_discard_attr = False
        notes.append(
            "vhost-user disk: the external vhost-user-blk backend decides what a discard "
            "does; the driver's discard attribute does not apply"
        )
    elif src not in ("file", "volume", "nvme"):
        notes.append(f"source type '{src or 'none'}' is not one virt-trimd knows")

    if needs_discard_attr and disk.discard != "unmap":
        if disk.discard is None:
            reasons.append(
                "no discard attribute on <driver> (libvirt's default is 'ignore'): QEMU "
                "drops the guest's discards and the image never shrinks"
            )
        else:
            reasons.append(
                f"discard='{disk.discard}' on <driver>: QEMU drops the guest's discards "
                "and the image never shrinks"
            )
        fixes.append(_driver_fix(disk, domain))

    _check_bus(disk, machine, qemu_version, found)

    if disk.detect_zeroes == "unmap":
        if disk.discard == "unmap":
            notes.append(
                "detect_zeroes='unmap': QEMU turns guest writes of zeroes into discards, "
                "so zero-filling frees host space too"
            )
        else:
            notes.append(
                "detect_zeroes='unmap' needs discard='unmap': until then libvirt runs it as 'on'"
            )
    elif disk.detect_zeroes == "on":
        notes.append(
            "detect_zeroes='on' stores zero writes efficiently but frees nothing; "
            "detect_zeroes='unmap' (with discard='unmap') would free host space for them"
        )

    return _Check(
        ready=not reasons,
        reasons=tuple(reasons),
        notes=tuple(notes),
        fix="; ".join(fixes) if fixes else None,
    )


def _check_bus(
    disk: Disk, machine: str | None, qemu_version: QemuVersion | None, found: _Findings
) -> None:
    """Add what the disk's bus means for discards to `found`."""
    reasons, notes, fixes = found.reasons, found.notes, found.fixes
    bus = disk.bus
    if bus == "virtio":
        ok, why = virtio_blk_discard(machine, qemu_version)
        if ok is False:
            reasons.append(why)
            fixes.append(_machine_fix(machine))
        elif ok is None:
            notes.append(f"{why}: assuming virtio-blk offers discard")
        notes.append(
            "virtio-blk discard needs a guest driver that uses it: Linux >= 5.0, "
            "or a virtio-win viostor with discard support"
        )
    elif bus == "scsi":
        model = disk.controller_model
        if model is None:
            notes.append(
                "the SCSI controller's model is not in this XML (libvirt picks lsilogic on "
                "x86 unless virtio-scsi is asked for); UNMAP is implemented by QEMU's "
                "scsi-hd device, so it works on any SCSI controller"
            )
        elif model not in _VIRTIO_SCSI_MODELS:
            notes.append(
                f"SCSI controller model '{model}': UNMAP is implemented by QEMU's scsi-hd "
                "device, not the controller, so it reaches the image; virtio-scsi is still "
                "the better controller (faster, drivers in current guests)"
            )
        if disk.device == "lun":
            notes.append("device='lun' passes the guest's SCSI commands through to the host device")
    elif bus == "sata":
        notes.append(
            "sata: QEMU's AHCI disk emulates ATA TRIM, so trims work, but in virt-trimd's "
            "tests a trim left ~16 MiB more allocated than the same disk on virtio-scsi"
        )
    elif bus == "ide":
        notes.append(
            "ide: QEMU emulates ATA TRIM, so trims work, but IDE handles one request at a "
            "time; virtio-scsi is the better bus"
        )
    elif bus in _NO_DISCARD_BUSES:
        reasons.append(_NO_DISCARD_BUSES[bus])
        fixes.append(BUS_FIX)
    else:
        notes.append(f"bus '{bus or 'none'}' is not one virt-trimd knows; checked the driver only")


def _skipped(disk: Disk) -> bool:
    return disk.device in SKIPPED_DEVICES or disk.readonly


def discard_ready(disk: Disk, machine: str | None, qemu_version: QemuVersion | None) -> bool | None:
    """For `virt_trimd_disk_discard_ready`: True/False, None for cdrom, floppy, read-only."""
    if _skipped(disk):
        return None
    return _check_disk(disk, machine, qemu_version).ready


# -- whole domain ------------------------------------------------------------------------


def _verdict(ready: bool) -> Verdict:
    return Verdict.READY if ready else Verdict.NOT_READY


def _audit_agent(
    current: DomainDescription, running: bool, persistent: DomainDescription | None
) -> AgentAudit:
    agent = current.agent
    quoted = shlex.quote(current.name)
    how = f"`virsh edit {quoted}`"
    if running:
        how += f", or hot-plug it with `virsh attach-device {quoted} channel.xml --live --config`"
    fix = f"add inside <devices>: {AGENT_CHANNEL_XML} ({how}); then {AGENT_INSTALL_HINT}"
    if not agent.configured:
        notes: tuple[str, ...] = ()
        if running and persistent is not None and persistent.agent.configured:
            notes = ("the persistent definition already has the channel: cold boot to apply",)
            fix = f"cold boot the domain; then {AGENT_INSTALL_HINT}"
        return AgentAudit(
            configured=False,
            state=None,
            verdict=Verdict.NOT_READY,
            reasons=(
                f"no guest agent channel ({AGENT_CHANNEL_NAME}) in the domain XML: "
                "virt-trimd cannot ask the guest to trim",
            ),
            notes=notes,
            fix=fix,
        )
    notes_list: list[str] = []
    if running and persistent is not None and not persistent.agent.configured:
        notes_list.append(
            "the channel is not in the persistent definition: it disappears at the next "
            f"cold boot; add {AGENT_CHANNEL_XML} there too"
        )
    if agent.state == "disconnected":
        return AgentAudit(
            configured=True,
            state=agent.state,
            verdict=Verdict.NOT_READY,
            reasons=("the agent channel is disconnected: nothing answers inside the guest",),
            notes=tuple(notes_list),
            fix=f"{AGENT_INSTALL_HINT} (Linux: systemctl enable --now qemu-guest-agent; "
            "Windows: the QEMU Guest Agent service from virtio-win)",
        )
    if agent.state is None:
        notes_list.append(
            "channel configured; whether the agent answers is known once the domain runs"
            if not running
            else "channel configured; libvirt did not report whether the agent is connected"
        )
    return AgentAudit(
        configured=True, state=agent.state, verdict=Verdict.READY, notes=tuple(notes_list)
    )


def _relevant(disk: Disk) -> tuple[object, ...]:
    return (
        disk.bus,
        disk.controller_model,
        disk.source_type,
        disk.driver_format,
        disk.discard or "ignore",
        disk.detect_zeroes,
        disk.device,
        disk.network_protocol,
    )


def _disk_audit(
    disk: Disk,
    check: _Check,
    persistent_check: _Check | None,
    differs: bool,
    pending: str | None,
) -> DiskAudit:
    return DiskAudit(
        target=disk.target,
        device=disk.device,
        bus=disk.bus,
        controller_model=disk.controller_model,
        source_type=disk.source_type,
        source=disk.source_path,
        format=disk.driver_format,
        discard=disk.discard or "ignore",
        discard_explicit=disk.discard is not None,
        detect_zeroes=disk.detect_zeroes,
        verdict=_verdict(check.ready),
        reasons=check.reasons,
        notes=check.notes,
        fix=check.fix,
        differs=differs,
        persistent_verdict=None if persistent_check is None else _verdict(persistent_check.ready),
        pending=pending,
    )


def _pending(check: _Check, persistent_check: _Check, changes: list[str]) -> str:
    what = ", ".join(changes)
    if not check.ready and persistent_check.ready:
        return f"the persistent definition is already fixed ({what}): cold boot to apply"
    if check.ready and not persistent_check.ready:
        return (
            f"the persistent definition differs ({what}) and is NOT ready: the next cold "
            "boot loses discard; fix the persistent definition"
        )
    return f"live and persistent definitions differ ({what}): cold boot to apply"


def _changes(
    live: Disk, persistent: Disk, live_machine: str | None, pers_machine: str | None
) -> list[str]:
    names = (
        "bus",
        "controller",
        "source type",
        "format",
        "discard",
        "detect_zeroes",
        "device",
        "protocol",
    )
    out = [
        f"{n}: {a} -> {b}"
        for n, a, b in zip(names, _relevant(live), _relevant(persistent), strict=True)
        if a != b
    ]
    if live.bus == "virtio" and live_machine != pers_machine:
        out.append(f"machine: {live_machine} -> {pers_machine}")
    return out


def audit_domain(
    live: DomainDescription | None,
    persistent: DomainDescription | None,
    qemu_version: QemuVersion | None,
) -> DomainAudit:
    """Audit one domain.

    `live` is the running definition (`virDomainGetXMLDesc(0)` of a running domain) or
    None when the domain is shut off; a `DomainInfo` with running=False counts as None.
    `persistent` is the inactive definition, None for a transient domain.
    Verdicts describe what QEMU runs now when running, else what the next boot runs.
    Raises ValueError when both are None.
    """
    if live is not None and getattr(live, "running", True) is False:
        live = None
    current = live if live is not None else persistent
    if current is None:
        raise ValueError("audit_domain needs a live or a persistent definition")
    running = live is not None
    notes: list[str] = []
    if running and persistent is None:
        notes.append(
            "transient domain (no persistent definition): --enable-discard cannot help; "
            "change whatever creates it"
        )
    if live is not None and persistent is not None and live.machine != persistent.machine:
        notes.append(
            f"machine type differs: running {live.machine}, persistent {persistent.machine} "
            "(cold boot to apply)"
        )

    pers_by_target = (
        {d.target: d for d in persistent.disks} if running and persistent is not None else {}
    )
    audits: list[DiskAudit] = []
    seen: set[str] = set()
    for disk in current.disks:
        if _skipped(disk):
            if disk.readonly and disk.device not in SKIPPED_DEVICES:
                notes.append(f"{disk.target}: read-only disk, nothing to trim")
            continue
        seen.add(disk.target)
        check = _check_disk(disk, current.machine, qemu_version, current.name)
        if not running or persistent is None:
            persistent_check = check if not running else None
            audits.append(_disk_audit(disk, check, persistent_check, False, None))
            continue
        pdisk = pers_by_target.get(disk.target)
        if pdisk is None:
            audits.append(
                _disk_audit(
                    disk,
                    check,
                    None,
                    True,
                    "hot-plugged: not in the persistent definition, gone after the next cold boot",
                )
            )
            continue
        pcheck = _check_disk(pdisk, persistent.machine, qemu_version, current.name)
        changes = _changes(disk, pdisk, current.machine, persistent.machine)
        pending = _pending(check, pcheck, changes) if changes else None
        audits.append(_disk_audit(disk, check, pcheck, bool(changes), pending))
    if running and persistent is not None:
        for pdisk in persistent.disks:
            if pdisk.target in seen or _skipped(pdisk):
                continue
            pcheck = _check_disk(pdisk, persistent.machine, qemu_version, current.name)
            audits.append(
                _disk_audit(
                    pdisk,
                    pcheck,
                    pcheck,
                    True,
                    "only in the persistent definition: it appears at the next cold boot",
                )
            )
    agent = _audit_agent(current, running, persistent)
    next_step: str | None = None
    if not agent.configured or any(d.fix or d.pending for d in audits):
        next_step = (
            COLD_BOOT_HINT.format(domain=shlex.quote(current.name))
            if running
            else "XML changes take effect when the domain next starts"
        )
    return DomainAudit(
        name=current.name,
        running=running,
        machine=current.machine,
        agent=agent,
        disks=tuple(audits),
        notes=tuple(notes),
        next_step=next_step,
    )


# -- output --------------------------------------------------------------------------------
