"""Offline reclaim of one shut-off domain: the safety checks, then virt-sparsify per disk.

A shut-off guest has no agent to ask, so its images are sparsified on the host with
libguestfs's `virt-sparsify --in-place`, which boots an appliance that mounts each
guest filesystem read-write and runs fstrim. Anything else writing that image at the
same time would corrupt it, so safety is the feature. In this order:

1. the domain is shut off when picked (not running, paused or starting), has no
   managed save image and no libvirt snapshots, and is re-checked immediately before
   each disk;
2. a disk is skipped with the reason when it is not an image file, not qcow2 or raw
   (never guessed), read-only, `<shareable/>`, used by another defined domain, the
   backing file of another image (any domain's disk or any file beside it), itself an
   overlay, has internal snapshots, is encrypted, or keeps its data in an external file;
3. QEMU's image lock is probed right before the run (another process, a QEMU outside
   libvirt, holds it: skipped), and during the run it is what makes a guest started
   meanwhile fail to start instead of sharing the image;
4. success is judged by the measured allocation, not the exit code: a wrong format
   exits 0 and trims nothing.

The result is a TrimRecord with `method: sparsify`, in the same history and metrics as
agent trims. Nothing here raises for a broken domain or image.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, replace
from typing import TYPE_CHECKING

from virt_trimd.config.model import OfflineConfig
from virt_trimd.engine.trim import DomainTrimmer, TrimOptions, log_record, utc_now_iso
from virt_trimd.host.agent import HypervisorError
from virt_trimd.host.measure import MeasureError
from virt_trimd.host.sparsify import (
    SUPPORTED_FORMATS,
    ImageFacts,
    SparsifyError,
    SparsifyRun,
    backing_file_id,
    image_facts,
    image_lock_conflict,
    neighbours,
    run_sparsify,
)
from virt_trimd.records import (
    Disk,
    DiskRecord,
    DomainInfo,
    Method,
    QemuImgLimits,
    Result,
    SparsifyLimits,
    TrimRecord,
)

if TYPE_CHECKING:
    from virt_trimd.host.hypervisor import Hypervisor

# A new module's logger name, listed in docs/architecture.md.
log = logging.getLogger("virt_trimd.offline")


@dataclass(frozen=True)
class HostImages:
    """Who else uses which image file, gathered once per domain from every definition.

    `users` maps (st_dev, st_ino) to the names of the domains with a disk on that file;
    `backing_of` maps a file to the overlays (paths) whose header names it as backing.
    """

    users: dict[tuple[int, int], set[str]]
    backing_of: dict[tuple[int, int], set[str]]


FactsReader = Callable[[str], ImageFacts]
Runner = Callable[[str, str, SparsifyLimits, QemuImgLimits], SparsifyRun]
LockProbe = Callable[[str, str, QemuImgLimits], "str | None"]


def _default_runner(
    path: str, fmt: str, limits: SparsifyLimits, qemu_img: QemuImgLimits
) -> SparsifyRun:
    return run_sparsify(path, fmt, limits, qemu_img)


def host_images(
    domains: Sequence[DomainInfo],
    extra_files: Sequence[str] = (),
    facts: FactsReader = image_facts,
) -> HostImages:
    """Index every defined domain's file disks, and every overlay among them and `extra_files`.

    Unreadable files are left out: they cannot be anybody's overlay we could read.
    """
    users: dict[tuple[int, int], set[str]] = {}
    backing_of: dict[tuple[int, int], set[str]] = {}
    seen: set[str] = set()

    def overlay(path: str, info: ImageFacts) -> None:
        base = backing_file_id(path, info)
        if base is not None:
            backing_of.setdefault(base, set()).add(path)

    for dom in domains:
        for disk in dom.disks:
            if not disk.is_file or disk.source_path is None:
                continue
            try:
                info = facts(disk.source_path)
            except OSError:
                continue
            users.setdefault(info.file_id, set()).add(dom.name)
            seen.add(disk.source_path)
            overlay(disk.source_path, info)
            for link in disk.backing_chain:
                try:
                    backing_of.setdefault(facts(link).file_id, set()).add(disk.source_path)
                except OSError:
                    continue
    for path in extra_files:
        if path in seen:
            continue
        try:
            overlay(path, facts(path))
        except OSError:
            continue
    return HostImages(users=users, backing_of=backing_of)


def disk_refusal(
    domain: str, disk: Disk, info: ImageFacts | None, images: HostImages
) -> str | None:
    """Why this disk of a shut-off domain must not be sparsified in place, or None.

    Pure: `info` is the image's facts (None when it could not be read), `images` what
    every other definition and neighbouring file says.
    """
    if not disk.is_file:
        return f"{disk.source_type or 'unknown'} disk: only image files are sparsified"
    if disk.driver_format not in SUPPORTED_FORMATS:
        return (
            f"format {disk.driver_format or '(none in the XML)'}: only qcow2 and raw are "
            "sparsified, and a format is never guessed"
        )
    if disk.readonly:
        return "read-only disk (<readonly/>): never written"
    if disk.shareable:
        return "shareable disk (<shareable/>): other guests may write it at any time"
    if info is None:
        return "image cannot be read"
    if not info.is_regular:
        return "not a regular file"
    others = sorted(images.users.get(info.file_id, set()) - {domain})
    if others:
        return "also a disk of domain(s) " + ", ".join(others) + ": never written while shared"
    overlays = sorted(images.backing_of.get(info.file_id, set()))
    if overlays:
        shown = ", ".join(overlays[:3]) + (" ..." if len(overlays) > 3 else "")
        return f"backing file of {shown}: writing it would corrupt those images"
    if disk.driver_format == "qcow2":
        if not info.qcow2:
            return "the XML says qcow2 but the file has no qcow2 header"
        if info.backing_file or disk.backing_chain:
            return f"overlay on a backing file ({info.backing_file or disk.backing_chain[0]})"
        if info.snapshots:
            return f"{info.snapshots} internal snapshot(s) hold the clusters: nothing to gain"
        if info.encrypted:
            return "encrypted qcow2: libguestfs would need the key"
        if info.external_data_file:
            return "qcow2 with an external data file"
    return None


@dataclass(frozen=True)
class OfflineHooks:
    """The host calls an OfflineReclaimer makes, replaceable in tests."""

    runner: Runner = _default_runner
    lock_probe: LockProbe = image_lock_conflict
    facts: FactsReader = image_facts
    clock: Callable[[], float] = time.monotonic


class OfflineReclaimer:
    """Sparsifies shut-off domains; `trim(dom, opts)` has DomainTrimmer's shape for run_sweep.

    `slots` bounds runs across every caller (each appliance is ~575 MB and a CPU):
    the daemon shares one reclaimer between schedules.
    """

    def __init__(
        self,
        hypervisor: Hypervisor,
        trimmer: DomainTrimmer,
        offline: OfflineConfig,
        hooks: OfflineHooks | None = None,
    ) -> None:
        hooks = hooks or OfflineHooks()
        self.hypervisor = hypervisor
        self.trimmer = trimmer
        self.limits = offline.limits
        self.qemu_img = trimmer.measurer.limits
        self.slots = threading.BoundedSemaphore(max(1, offline.concurrency))
        self._runner = hooks.runner
        self._lock_probe = hooks.lock_probe
        self._facts = hooks.facts
        self._clock = hooks.clock
        # path -> the image's stat signature right after we sparsified it: an image not
        # written since has nothing new to give, and an appliance boot costs ~24 s.
        self._sparsified: dict[str, tuple[int, ...]] = {}

    def trim(self, dom: DomainInfo, opts: TrimOptions) -> TrimRecord:
        """Reclaim one shut-off domain offline and return its record; never raises."""
        started_at = utc_now_iso()
        t0 = self._clock()

        def finish(result: Result, message: str, disks: Sequence[DiskRecord] = ()) -> TrimRecord:
            record = TrimRecord(
                domain=dom.name,
                uuid=dom.uuid,
                result=result,
                message=message,
                started_at=started_at,
                duration_seconds=round(self._clock() - t0, 6),
                disks=tuple(disks),
                schedule=opts.schedule,
                dry_run=opts.dry_run,
                method=Method.SPARSIFY,
                trigger=opts.trigger,
            )
            log_record(record, log)
            return record

        if dom.running:
            return finish(Result.SKIPPED, _running_message("is running"))
        refusal = self._domain_refusal(dom)
        if refusal is not None:
            return finish(Result.SKIPPED, refusal)
        with self.slots:
            # Who shares what is read once a slot is ours, not when queued behind another
            # run: a definition added meanwhile must count.
            try:
                everyone = self.hypervisor.list_domains()
            except HypervisorError as exc:
                return finish(Result.ERROR, f"cannot list domains to check sharing: {exc.message}")
            return self._disks(dom, opts, everyone, finish)

    def _domain_refusal(self, dom: DomainInfo) -> str | None:
        return domain_refusal(self.hypervisor, dom)

    def _disks(
        self,
        dom: DomainInfo,
        opts: TrimOptions,
        everyone: Sequence[DomainInfo],
        finish: Callable[[Result, str, Sequence[DiskRecord]], TrimRecord],
    ) -> TrimRecord:
        wanted = [d for d in dom.disks if d.device in ("disk", "lun")]
        around = sorted(
            {n for d in wanted if d.is_file and d.source_path for n in neighbours(d.source_path)}
        )
        images = host_images(everyone, around, self._facts)
        measured = self.trimmer.measure_disks(dom.disks, with_virtual=True)
        by_target = {d.target: d for d in wanted}
        records: list[DiskRecord] = []
        notes: list[str] = []
        done = failed = 0
        timed_out = False
        for rec in measured:
            disk = by_target[rec.disk]
            info = None
            if disk.is_file and disk.source_path is not None:
                try:
                    info = self._facts(disk.source_path)
                except OSError:
                    info = None
            refusal = disk_refusal(dom.name, disk, info, images)
            if refusal is None and rec.allocated_before is None:
                refusal = rec.not_measured or "not measured"
            if refusal is not None:
                records.append(replace(rec, not_measured=f"not sparsified: {refusal}"))
                notes.append(f"{disk.target}: {refusal}")
                continue
            assert disk.source_path is not None and disk.driver_format is not None
            if self._unchanged(disk.source_path):
                reason = "unchanged since the last offline reclaim"
                records.append(replace(rec, not_measured=f"not sparsified: {reason}"))
                notes.append(f"{disk.target}: {reason}")
                continue
            # Re-checked right before each disk: the guest may have been started since.
            stop = self._started(dom)
            if stop is not None:
                records.append(replace(rec, not_measured=f"not sparsified: {stop}"))
                return finish(
                    Result.SKIPPED if not done else Result.PARTIAL,
                    "; ".join([*notes, stop]),
                    [*records, *self._rest(measured, records, stop)],
                )
            lock = self._lock_probe(disk.source_path, disk.driver_format, self.qemu_img)
            if lock is not None:
                reason = f"in use by another process (QEMU's image lock: {lock})"
                records.append(replace(rec, not_measured=f"not sparsified: {reason}"))
                notes.append(f"{disk.target}: {reason}")
                failed += 1
                continue
            if opts.dry_run:
                records.append(rec)
                continue
            try:
                run = self._runner(disk.source_path, disk.driver_format, self.limits, self.qemu_img)
            except SparsifyError as exc:
                message = exc.message
                if exc.kind == "locked" and self._started(dom) is not None:
                    message = f"the domain was started before {disk.target} was opened; not touched"
                timed_out = timed_out or exc.kind == "timeout"
                records.append(self._after(rec))
                notes.append(f"{disk.target}: {message}")
                failed += 1
                if exc.kind == "missing":
                    break
                continue
            after = self._after(rec)
            records.append(after)
            self._remember(disk.source_path)
            done += 1
            if not run.trimmed:
                notes.append(f"{disk.target}: virt-sparsify found no filesystem it could trim")
            log.debug("%s/%s: sparsified in %.1fs", dom.name, disk.target, run.elapsed_seconds)
        records += self._rest(measured, records, "not reached")
        if opts.dry_run:
            return finish(
                Result.SKIPPED, "; ".join(["dry run: checked and measured only", *notes]), records
            )
        reclaimed = sum(r.reclaimed_bytes or 0 for r in records)
        summary = f"{done} disk(s) sparsified, host reclaimed {reclaimed} bytes"
        message = "; ".join([summary, *notes])
        if timed_out and not done:
            return finish(Result.TIMEOUT, message, records)
        if failed:
            return finish(Result.PARTIAL if done else Result.ERROR, message, records)
        if not done:
            return finish(Result.SKIPPED, "; ".join(notes) or "no disk to sparsify", records)
        return finish(Result.SUCCESS, message, records)

    @staticmethod
    def _rest(
        measured: Sequence[DiskRecord], done: Sequence[DiskRecord], why: str
    ) -> list[DiskRecord]:
        seen = {r.disk for r in done}
        return [
            replace(r, not_measured=f"not sparsified: {why}")
            for r in measured
            if r.disk not in seen
        ]

    def _signature(self, path: str) -> tuple[int, ...] | None:
        try:
            st = self.trimmer.measurer.stat(path)
        except MeasureError:
            return None
        return (st.st_dev, st.st_ino, st.st_size, st.st_blocks, st.st_mtime_ns)

    def _unchanged(self, path: str) -> bool:
        sig = self._signature(path)
        return sig is not None and self._sparsified.get(path) == sig

    def _remember(self, path: str) -> None:
        sig = self._signature(path)
        if sig is not None:
            self._sparsified[path] = sig

    def _started(self, dom: DomainInfo) -> str | None:
        """Why to stop now (the domain is active, gone, or its state unknown), or None."""
        try:
            state = self.hypervisor.offline_state(dom.uuid)
        except HypervisorError as exc:
            return f"cannot re-check the domain's state ({exc.message}); stopped"
        if state.active:
            return f"the domain is {state.state} now; stopped before the next disk"
        return None

    def _after(self, rec: DiskRecord) -> DiskRecord:
        """The after-run measurement of one disk (also after a failed run: it may have written)."""
        if rec.path is None or rec.allocated_before is None:
            return rec
        try:
            st = self.trimmer.measurer.stat(rec.path)
        except MeasureError as exc:
            return replace(rec, not_measured=f"after sparsify: {exc}")
        after = st.st_blocks * 512
        return replace(
            rec,
            allocated_after=after,
            reclaimed_bytes=rec.allocated_before - after,
            file_size=st.st_size,
            not_measured=None,
        )


def domain_refusal(hypervisor: Hypervisor, dom: DomainInfo) -> str | None:
    """Why this domain must not be sparsified now (active, managed save, snapshots), or None."""
    try:
        state = hypervisor.offline_state(dom.uuid)
    except HypervisorError as exc:
        return f"cannot read the domain's state ({exc.message}); not touched"
    if state.active:
        return _running_message(f"is {state.state}")
    if state.managed_save:
        return (
            "skipped: has a managed save image (virsh managedsave); its saved memory "
            "expects the disks exactly as they are"
        )
    if state.has_snapshots:
        return "skipped: has libvirt snapshots; reverting one expects the disks as they were"
    return None


def serve_helper_request(  # noqa: PLR0913 - the request, both limits, and hooks for tests
    hypervisor: Hypervisor,
    path: str,
    fmt: str,
    limits: SparsifyLimits,
    qemu_img: QemuImgLimits,
    *,
    hooks: OfflineHooks | None = None,
) -> SparsifyRun:
    """The root helper's side of one request: re-check everything, then run virt-sparsify.

    The daemon that asks runs unprivileged and is trusted with nothing: the image must
    be a file disk of exactly one defined domain, that domain shut off (no managed save,
    no snapshots), the disk pass every check of `disk_refusal`, the format be the
    XML's, and no process hold QEMU's lock on it. Raises SparsifyError ("refused" for
    a failed check).
    """
    hooks = hooks or OfflineHooks()
    try:
        everyone = hypervisor.list_domains()
    except HypervisorError as exc:
        raise SparsifyError("refused", f"cannot list domains: {exc.message}") from None
    try:
        info = hooks.facts(path)
    except OSError as exc:
        raise SparsifyError("refused", f"{path}: cannot be read ({exc.strerror})") from None
    owners: list[tuple[DomainInfo, Disk]] = []
    for dom in everyone:
        for disk in dom.disks:
            if disk.device not in ("disk", "lun") or not disk.is_file or not disk.source_path:
                continue
            try:
                if hooks.facts(disk.source_path).file_id == info.file_id:
                    owners.append((dom, disk))
            except OSError:
                continue
    if len(owners) != 1:
        names = sorted({d.name for d, _ in owners})
        raise SparsifyError(
            "refused",
            f"{path} is not a disk of exactly one defined domain ({', '.join(names) or 'none'})",
        )
    dom, disk = owners[0]
    # From here on the XML's path, never the asker's: a path the daemon controls (a
    # symlink under its state directory) could be pointed elsewhere after the checks.
    path = disk.source_path or path
    info = hooks.facts(path)
    if disk.driver_format != fmt:
        raise SparsifyError(
            "refused", f"{path}: the XML of {dom.name} says {disk.driver_format}, not {fmt}"
        )
    # libvirt's state names it (paused, running...); the listing's flag is the fallback.
    refusal = domain_refusal(hypervisor, dom)
    if refusal is None and dom.running:
        refusal = _running_message("is running")
    images = host_images(everyone, neighbours(path), hooks.facts)
    refusal = refusal or disk_refusal(dom.name, disk, info, images)
    if refusal is not None:
        raise SparsifyError("refused", f"{dom.name}/{disk.target}: {refusal}")
    lock = hooks.lock_probe(path, fmt, qemu_img)
    if lock is not None:
        raise SparsifyError("locked", f"{path} is in use (QEMU's image lock: {lock}); not touched")
    log.info("%s/%s: checks passed, sparsifying %s", dom.name, disk.target, path)
    return hooks.runner(path, fmt, limits, qemu_img)


def _running_message(how: str) -> str:
    return (
        f"skipped: the domain {how}; offline reclaim only touches shut-off domains "
        "(running guests are trimmed through their agent)"
    )
