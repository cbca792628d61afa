"""Trim one domain: measure its images, ask the guest agent to fstrim, measure again.

Every failure ends in a TrimRecord with a `result`; nothing here raises for a
broken guest, agent or image, so a sweep always goes on to the next domain.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from datetime import UTC, datetime
from typing import TYPE_CHECKING

from virt_trimd.config.model import Config
from virt_trimd.host.agent import GuestFilesystem, HypervisorError, Outcome
from virt_trimd.host.domxml import trimmable_disks
from virt_trimd.host.measure import MeasureError, Measurer
from virt_trimd.records import (
    Disk,
    DiskRecord,
    DomainInfo,
    FilesystemResult,
    Method,
    Result,
    TrimRecord,
)

if TYPE_CHECKING:
    # Only for annotations: the engine receives a connected Hypervisor and never loads
    # libvirt itself, so its unit tests run without it.
    from virt_trimd.host.hypervisor import Hypervisor

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.trim")

# How long guest-ping may take before we call the agent unavailable. Short on
# purpose: a missing agent should not cost a whole fstrim timeout.
PING_TIMEOUT_SECONDS = 5.0
# How long to let libvirt finish stopping a domain whose agent vanished mid-call.
STOP_SETTLE_SECONDS = 2.0


@dataclass(frozen=True)
class TrimOptions:
    """Knobs for one domain trim."""

    timeout_seconds: float = 600.0
    minimum_bytes: int = 0
    dry_run: bool = False
    schedule: str | None = None
    check_block_jobs: bool = True
    min_residual_bytes: int = 64 << 20
    residual_ratio: float = 0.10
    # Carried into every record, also those the sweep writes itself (skips, errors).
    method: Method = Method.AGENT
    trigger: str | None = None  # None: the schedule's time; "growth", "reclaimable"

    @classmethod
    def from_config(
        cls,
        config: Config,
        *,
        timeout_seconds: float,
        minimum_bytes: int,
        schedule: str | None = None,
        dry_run: bool = False,
    ) -> TrimOptions:
        """Options for one sweep: the call's knobs plus the config's effectiveness rule."""
        return cls(
            timeout_seconds=timeout_seconds,
            minimum_bytes=minimum_bytes,
            dry_run=dry_run,
            schedule=schedule,
            min_residual_bytes=config.effectiveness.min_residual_bytes,
            residual_ratio=config.effectiveness.residual_ratio,
        )


_OUTCOME_RESULT = {
    Outcome.AGENT_UNAVAILABLE: Result.AGENT_UNAVAILABLE,
    Outcome.TIMEOUT: Result.TIMEOUT,
    Outcome.NOT_RUNNING: Result.NOT_RUNNING,
}


def result_for(outcome: Outcome) -> Result:
    """The record result for a hypervisor failure."""
    return _OUTCOME_RESULT.get(outcome, Result.ERROR)


def utc_now_iso() -> str:
    return datetime.now(UTC).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class DomainTrimmer:
    """Trims domains one at a time; safe to call from several threads."""

    def __init__(
        self,
        hypervisor: Hypervisor,
        measurer: Measurer,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.hypervisor = hypervisor
        self.measurer = measurer
        self._clock = clock

    def measure_disks(
        self,
        disks: Sequence[Disk],
        with_virtual: bool = True,
        file_ids: dict[str, tuple[int, int]] | None = None,
    ) -> list[DiskRecord]:
        """One DiskRecord per trimmable disk, with `allocated_before` filled in.

        `file_ids`, when given, receives target -> (st_dev, st_ino) of each measured
        image, so the after-trim measurement can tell whether it is the same file.
        """
        out: list[DiskRecord] = []
        for disk in trimmable_disks(tuple(disks)):
            rec = DiskRecord(
                disk=disk.target,
                path=disk.source_path,
                format=disk.driver_format,
                bus=disk.bus,
                discard=disk.discard,
            )
            if not disk.is_file:
                rec = replace(rec, not_measured=unmeasurable_reason(disk))
            else:
                assert disk.source_path is not None
                try:
                    alloc = self.measurer.allocation(
                        disk.source_path, disk.driver_format, with_virtual=with_virtual
                    )
                    rec = replace(
                        rec,
                        allocated_before=alloc.allocated_bytes,
                        file_size=alloc.file_bytes,
                        virtual_size=alloc.virtual_bytes,
                    )
                    if file_ids is not None and alloc.file_id is not None:
                        file_ids[disk.target] = alloc.file_id
                except MeasureError as exc:
                    rec = replace(rec, not_measured=str(exc))
            out.append(rec)
        return out

    def _measure_after(
        self, before: list[DiskRecord], file_ids: dict[str, tuple[int, int]] | None = None
    ) -> list[DiskRecord]:
        out: list[DiskRecord] = []
        for rec in before:
            if rec.allocated_before is None or rec.path is None:
                out.append(rec)
                continue
            try:
                st = self.measurer.stat(rec.path)
            except MeasureError as exc:
                out.append(replace(rec, not_measured=f"after trim: {exc}"))
                continue
            file_id = (file_ids or {}).get(rec.disk)
            if file_id is not None and file_id != (st.st_dev, st.st_ino):
                # QEMU still writes to the file it opened; the path now names another one
                # (restored backup, `mv`), and a difference of two files is no reclaim.
                out.append(
                    replace(
                        rec,
                        not_measured=(
                            f"after trim: the image file was replaced during the trim "
                            f"({rec.path} is now another file); reclaim not computed"
                        ),
                    )
                )
                continue
            after = st.st_blocks * 512
            out.append(
                replace(
                    rec,
                    allocated_after=after,
                    reclaimed_bytes=rec.allocated_before - after,
                    file_size=st.st_size,
                )
            )
        return out

    def trim(self, dom: DomainInfo, opts: TrimOptions) -> TrimRecord:
        """Trim one domain and return its record; never raises for guest trouble."""
        started_at = utc_now_iso()
        t0 = self._clock()

        def finish(
            result: Result,
            message: str,
            disks: Sequence[DiskRecord] = (),
            filesystems: Sequence[FilesystemResult] = (),
        ) -> TrimRecord:
            record = TrimRecord(
                domain=dom.name,
                uuid=dom.uuid,
                result=result,
                message=message,
                started_at=started_at,
                duration_seconds=round(self._clock() - t0, 6),
                filesystems=tuple(filesystems),
                disks=tuple(disks),
                schedule=opts.schedule,
                dry_run=opts.dry_run,
                trigger=opts.trigger,
            )
            log_record(record)
            return record

        if not dom.running:
            return finish(Result.NOT_RUNNING, "domain is not running; nothing to trim")

        file_ids: dict[str, tuple[int, int]] = {}
        before = self.measure_disks(dom.disks, file_ids=file_ids)
        if not dom.agent.configured:
            return finish(
                Result.AGENT_MISSING,
                "no guest agent channel (org.qemu.guest_agent.0) in the domain XML; "
                "run `virt-trimd audit` for the fix",
                before,
            )
        if dom.agent.state == "disconnected":
            return finish(
                Result.AGENT_UNAVAILABLE,
                "guest agent channel is disconnected: is qemu-guest-agent running in the guest?",
                before,
            )
        if opts.check_block_jobs:
            try:
                job = self.hypervisor.active_job(dom.uuid, tuple(d.disk for d in before))
            except HypervisorError as exc:
                message = exc.message
                if exc.outcome is Outcome.NO_DOMAIN:
                    message = f"domain disappeared before it could be trimmed: {exc.message}"
                return finish(result_for(exc.outcome), message, before)
            if job:
                # Trimming during an incremental backup marks the freed blocks
                # dirty and bloats the next increment.
                return finish(Result.SKIPPED, f"skipped: {job}", before)
        if opts.dry_run:
            return finish(Result.SKIPPED, "dry run: measured only, no trim sent", before)

        try:
            self.hypervisor.ping(dom.uuid, min(PING_TIMEOUT_SECONDS, opts.timeout_seconds))
            filesystems = self.hypervisor.fstrim(dom.uuid, opts.timeout_seconds, opts.minimum_bytes)
        except HypervisorError as exc:
            after = self._measure_after(before, file_ids)
            result = result_for(exc.outcome)
            message = exc.message
            if exc.outcome is Outcome.NO_DOMAIN:
                message = f"domain disappeared during trim: {exc.message}"
            elif exc.outcome is Outcome.TIMEOUT:
                message = f"guest-fstrim did not finish within {opts.timeout_seconds:g}s"
            elif exc.outcome in (
                Outcome.AGENT_UNAVAILABLE,
                Outcome.ERROR,
            ) and self._stopped_under_us(dom.uuid, exc.message):
                # libvirt says "Guest agent disappeared while executing command" when the
                # domain is destroyed or shut down under the call: not the agent's fault.
                result = Result.NOT_RUNNING
                message = f"domain stopped during the trim: {exc.message}"
            return finish(result, message, after)

        after = self._measure_after(before, file_ids)
        after = self._effectiveness(dom, after, opts)
        failed = [f for f in filesystems if f.error]
        result = Result.PARTIAL if failed else Result.SUCCESS
        reclaimed = sum(d.reclaimed_bytes or 0 for d in after)
        guest = sum(f.trimmed_bytes or 0 for f in filesystems)
        host_part = (
            f"host reclaimed {reclaimed} bytes"
            if any(d.reclaimed_bytes is not None for d in after) or not after
            else "host reclaimed: not measured"
        )
        message = (
            f"{len(filesystems)} filesystem(s) trimmed, guest reported {guest} bytes, {host_part}"
        )

        if failed:
            message += "; failed: " + ", ".join(f"{f.mountpoint}: {f.error}" for f in failed[:5])
        return finish(result, message, after, filesystems)

    def _stopped_under_us(self, uuid: str, message: str) -> bool:
        """True when, after an agent failure, the domain is gone or no longer active.

        A destroy kills QEMU first; the agent socket's end fails our pending call
        ("Guest agent disappeared while executing command") while libvirt may not yet
        have marked the domain inactive. After that message, give it a moment.
        """
        settle = STOP_SETTLE_SECONDS if "disappeared" in message else 0.0
        deadline = time.monotonic() + settle
        while self.hypervisor.is_active(uuid) is not False:
            if time.monotonic() >= deadline:
                return False
            time.sleep(0.1)
        return True

    def _effectiveness(
        self, dom: DomainInfo, disks: list[DiskRecord], opts: TrimOptions
    ) -> list[DiskRecord]:
        """Compare host allocation with what the guest says is in use, per disk."""
        try:
            fss = self.hypervisor.guest_filesystems(dom.uuid)
        except HypervisorError as exc:
            log.info("%s: guest filesystem info unavailable: %s", dom.name, exc.message)
            return disks
        used = guest_used_by_disk(fss)
        return [
            apply_effectiveness(d, used.get(d.disk), opts.min_residual_bytes, opts.residual_ratio)
            for d in disks
        ]


def guest_used_by_disk(filesystems: Sequence[GuestFilesystem]) -> dict[str, int]:
    """Sum guest `used-bytes` per libvirt disk target.

    A filesystem spanning several disks (LVM, md RAID) cannot be attributed to
    one image, so those disks get no number and their effectiveness stays unknown.
    """
    used: dict[str, int] = {}
    spanning: set[str] = set()
    for fs in filesystems:
        if fs.used_bytes is None or not fs.disks:
            continue
        if len(fs.disks) > 1:
            spanning.update(fs.disks)
            continue
        used[fs.disks[0]] = used.get(fs.disks[0], 0) + fs.used_bytes
    for target in spanning:
        used.pop(target, None)
    return used


def apply_effectiveness(
    disk: DiskRecord, guest_used: int | None, min_residual_bytes: int, residual_ratio: float
) -> DiskRecord:
    """Fill guest_used/residual/effective: ineffective when residual >= max(min, ratio*used)."""
    if guest_used is None or disk.allocated_after is None:
        return disk
    residual = disk.allocated_after - guest_used
    threshold = max(min_residual_bytes, int(residual_ratio * guest_used))
    return replace(
        disk, guest_used_bytes=guest_used, residual_bytes=residual, effective=residual < threshold
    )


def unmeasurable_reason(disk: Disk) -> str:
    """Why a disk that is not an image file has no allocation figure."""
    return f"{disk.source_type or 'unknown'} disk: only image files are measured"


def not_measured_text(disks: Sequence[DiskRecord]) -> str:
    """`sdb (/path): reason, ...` for the disks whose reclaim could not be measured."""
    return ", ".join(
        f"{d.disk} ({d.path or '-'}): {d.not_measured}" for d in disks if d.not_measured
    )


def log_record(record: TrimRecord, logger: logging.Logger = log) -> None:
    """The record's one journal line with DOMAIN, RESULT, METHOD, TRIGGER fields.

    Offline reclaims use it too (with their own logger, so `virt_trimd.offline` filters
    keep working): an image that could not be measured reads "not measured" for both.
    """
    level = logging.INFO
    if record.result.needs_attention:
        level = logging.WARNING
    unmeasured = not_measured_text(record.disks)
    fields: dict[str, object] = {
        "DOMAIN": record.domain,
        "RESULT": record.result.value,
        "METHOD": record.method.value,
        "TRIGGER": record.trigger or "schedule",
    }
    # An image the daemon cannot see (a sandbox hiding its directory, a vanished file)
    # is "not measured", never a reclaim of 0: a 0 would read as "trim had no effect".
    if unmeasured and not any(d.reclaimed_bytes is not None for d in record.disks):
        reclaimed = "reclaimed: not measured"
    else:
        reclaimed = f"reclaimed {record.reclaimed_bytes} bytes"
        fields["RECLAIMED_BYTES"] = record.reclaimed_bytes
    message = record.message
    if unmeasured:
        fields["NOT_MEASURED"] = unmeasured
        message += f"; not measured: {unmeasured}"
    offline = "offline " if record.method is Method.SPARSIFY else ""
    logger.log(
        level,
        "%s: %s%s, %s in %.1fs: %s",
        record.domain,
        offline,
        record.result.value,
        reclaimed,
        record.duration_seconds,
        message,
        extra=fields,
    )
    for disk in record.disks:
        if disk.reclaimed_bytes is not None:
            log.debug(
                "%s/%s: %s -> %s",
                record.domain,
                disk.disk,
                disk.allocated_before,
                disk.allocated_after,
                extra={
                    "DOMAIN": record.domain,
                    "DISK": disk.disk,
                    "RECLAIMED_BYTES": disk.reclaimed_bytes,
                },
            )
