"""Plain data that flows from a trim to history, metrics and the CLI.

Nothing here touches libvirt, the filesystem or the clock: every other module
can import it, and it can be rebuilt from JSON (history) without surprises.
"""

from __future__ import annotations

import dataclasses
import enum
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any


class Result(enum.StrEnum):
    """How one domain's trim ended."""

    SUCCESS = "success"
    PARTIAL = "partial"  # the agent answered but at least one filesystem failed
    AGENT_MISSING = "agent_missing"  # no org.qemu.guest_agent.0 channel in the XML
    AGENT_UNAVAILABLE = "agent_unavailable"  # channel exists, nobody answers
    TIMEOUT = "timeout"
    NOT_RUNNING = "not_running"
    SKIPPED = "skipped"  # deliberately not trimmed (block job, min_interval, dry run)
    ERROR = "error"

    # The groupings below are the only ones: every part asks the result, none keeps a set.

    @property
    def needs_attention(self) -> bool:
        """Someone has to look: `trim` exits 1, the log line is a warning."""
        return self in (Result.ERROR, Result.TIMEOUT, Result.AGENT_UNAVAILABLE)

    @property
    def attempted(self) -> bool:
        """Something was asked of the guest, so the duration means something.

        Not for `skipped`, `not_running` and `agent_missing` (no channel, nothing sent):
        their ~0 s would drag duration metrics and the longest-first order down.
        """
        return self not in (Result.SKIPPED, Result.NOT_RUNNING, Result.AGENT_MISSING)

    @property
    def fstrim_sent(self) -> bool:
        """The guest ran, or was asked to run, fstrim: the trim counts for min_interval."""
        return self in (Result.SUCCESS, Result.PARTIAL, Result.TIMEOUT)

    @property
    def agent_answered(self) -> bool:
        """guest-fstrim came back, so the guest's filesystem usage was read too."""
        return self in (Result.SUCCESS, Result.PARTIAL)


def stamp_ts(stamp: str) -> float:
    """An ISO 8601 stamp of a record in epoch seconds; raises ValueError if it is none.

    A stamp without a zone is UTC (what records always write), never the host's local
    time: history rows written on a host in another zone must mean the same.
    """
    moment = datetime.fromisoformat(stamp)
    if moment.tzinfo is None:
        moment = moment.replace(tzinfo=UTC)
    return moment.timestamp()


@dataclass(frozen=True)
class Disk:
    """One disk of a domain, as parsed from the domain XML."""

    target: str  # target dev, e.g. "sda", "vdb"
    bus: str  # virtio, scsi, sata, ide, usb, ...
    device: str  # disk, cdrom, floppy, lun
    source_type: str  # file, block, network, volume, or "" when absent
    source_path: str | None  # file path, block device, or None
    driver_format: str | None  # qcow2, raw, ...
    discard: str | None  # "unmap", "ignore", or None (libvirt default = ignore)
    detect_zeroes: str | None
    alias: str | None = None  # "scsi0-0-0-0", used by guestInfo disk mapping
    controller_model: str | None = None  # model of the controller a scsi disk hangs off
    network_protocol: str | None = None  # rbd, nbd, iscsi... for network disks
    backing_chain: tuple[str, ...] = ()  # paths of backing files the XML names
    readonly: bool = False
    shareable: bool = False  # <shareable/>: several domains may write it at once

    @property
    def is_file(self) -> bool:
        """True when the disk is an image file on a host filesystem we can stat."""
        return self.source_type == "file" and bool(self.source_path)


@dataclass(frozen=True)
class AgentChannel:
    """The guest agent virtio-serial channel, if the domain has one."""

    configured: bool
    state: str | None  # "connected", "disconnected" or None (inactive / not reported)


@dataclass(frozen=True)
class DomainInfo:
    """What the adapter tells us about one domain."""

    name: str
    uuid: str
    running: bool
    disks: tuple[Disk, ...]
    agent: AgentChannel
    machine: str | None = None  # e.g. pc-q35-7.2


@dataclass(frozen=True)
class Allocation:
    """One host-side measurement of an image file."""

    allocated_bytes: int  # st_blocks * 512: what the host filesystem really holds
    file_bytes: int  # st_size
    virtual_bytes: int | None  # qemu-img virtual-size, None when unknown
    file_id: tuple[int, int] | None = None  # (st_dev, st_ino): which file was measured


@dataclass(frozen=True)
class QemuImgLimits:
    """Bounds for one qemu-img run (guest-controlled input); the config's `qemu_img`."""

    timeout_seconds: float = 30.0
    cpu_seconds: int = 10
    address_space_bytes: int = 1 << 30


@dataclass(frozen=True)
class SparsifyLimits:
    """Bounds for one `virt-sparsify --in-place` run; the config's `offline` section.

    `environment` is extra environment for libguestfs (NAME, VALUE) pairs, e.g.
    LIBGUESTFS_BACKEND_SETTINGS=force_tcg where KVM hangs the appliance.
    """

    timeout_seconds: float = 1800.0
    cpu_seconds: int = 3600
    nice: int = 10
    environment: tuple[tuple[str, str], ...] = ()
    memory_bytes: int = 2 << 30  # MemoryMax= of the transient unit (systemd only)
    runner: str = "auto"  # "auto", "helper", "systemd-run" or "subprocess"


class Method(enum.StrEnum):
    """How a record's space was (to be) reclaimed."""

    AGENT = "agent"  # guest-fstrim through the guest agent of a running domain
    SPARSIFY = "sparsify"  # virt-sparsify --in-place on a shut-off domain's images


@dataclass(frozen=True)
class FilesystemResult:
    """One entry of guest-fstrim's `paths` array."""

    mountpoint: str
    trimmed_bytes: int | None  # absent on Windows guests
    error: str | None


@dataclass(frozen=True)
class DiskRecord:
    """Before/after numbers for one disk of a trimmed domain."""

    disk: str
    path: str | None
    format: str | None
    bus: str
    discard: str | None
    allocated_before: int | None = None
    allocated_after: int | None = None
    reclaimed_bytes: int | None = None  # before - after; negative if the guest wrote
    virtual_size: int | None = None
    file_size: int | None = None
    not_measured: str | None = None  # reason, for block/network disks or stat errors
    guest_used_bytes: int | None = None
    residual_bytes: int | None = None
    effective: bool | None = None


@dataclass(frozen=True)
class TrimRecord:
    """The outcome of trimming one domain once."""

    domain: str
    uuid: str
    result: Result
    message: str
    started_at: str  # ISO 8601, UTC; a stamp without a zone is UTC too
    duration_seconds: float
    filesystems: tuple[FilesystemResult, ...] = ()
    disks: tuple[DiskRecord, ...] = ()
    schedule: str | None = None
    dry_run: bool = False
    method: Method = Method.AGENT
    trigger: str | None = None  # why it ran: None for a schedule's time, "growth", ...

    @property
    def reclaimed_bytes(self) -> int:
        """Sum of measured per-disk reclaim (may be negative if guests wrote)."""
        return sum(d.reclaimed_bytes or 0 for d in self.disks)

    @property
    def started_ts(self) -> float:
        """`started_at` in epoch seconds. Raises ValueError if it is not ISO 8601.

        A stamp without a zone is UTC (what `started_at` always is), never the host's
        local time: history rows written on a host in another zone must mean the same.
        """
        return stamp_ts(self.started_at)

    @property
    def finished_ts(self) -> float:
        """`started_ts` plus the duration (a negative or non-finite one counts as 0)."""
        duration = self.duration_seconds
        return self.started_ts + (duration if math.isfinite(duration) and duration > 0 else 0.0)

    @property
    def guest_trimmed_bytes(self) -> int:
        """Sum of what the guest said it trimmed (null entries count as 0)."""
        return sum(f.trimmed_bytes or 0 for f in self.filesystems)

    def to_dict(self) -> dict[str, Any]:
        """JSON-ready dict, totals included."""
        out = dataclasses.asdict(self)
        out["result"] = self.result.value
        out["method"] = self.method.value
        out["reclaimed_bytes"] = self.reclaimed_bytes
        out["guest_trimmed_bytes"] = self.guest_trimmed_bytes
        return out

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> TrimRecord:
        """Inverse of `to_dict`; ignores derived totals and unknown keys."""
        fs_fields = {f.name for f in dataclasses.fields(FilesystemResult)}
        disk_fields = {f.name for f in dataclasses.fields(DiskRecord)}
        return cls(
            domain=str(data["domain"]),
            uuid=str(data["uuid"]),
            result=Result(data["result"]),
            message=str(data.get("message", "")),
            started_at=str(data["started_at"]),
            duration_seconds=float(data.get("duration_seconds", 0.0)),
            filesystems=tuple(
                FilesystemResult(**{k: v for k, v in f.items() if k in fs_fields})
                for f in _seq(data.get("filesystems"))
            ),
            disks=tuple(
                DiskRecord(**{k: v for k, v in d.items() if k in disk_fields})
                for d in _seq(data.get("disks"))
            ),
            schedule=data.get("schedule"),
            dry_run=bool(data.get("dry_run", False)),
            # Records written before offline reclaim existed were all agent trims.
            method=Method(data.get("method") or Method.AGENT.value),
            trigger=data.get("trigger"),
        )


def _seq(value: Any) -> Sequence[Mapping[str, Any]]:
    return value if isinstance(value, list) else []


@dataclass(frozen=True)
class SweepSummary:
    """What one sweep (one schedule firing, or one `trim` command) did."""

    records: tuple[TrimRecord, ...] = field(default_factory=tuple)

    @property
    def reclaimed_bytes(self) -> int:
        """Total measured reclaim over all domains."""
        return sum(r.reclaimed_bytes for r in self.records)

    @property
    def failed(self) -> bool:
        """True if any record's result needs an operator's attention."""
        return any(r.result.needs_attention for r in self.records)
