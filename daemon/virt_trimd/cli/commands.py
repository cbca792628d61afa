"""Command-line entry point: parses arguments, calls the library, prints results.

The only module that prints. Exit status: 0 fine, 1 a domain or the daemon
failed, 2 usage or configuration error.
"""

from __future__ import annotations

import argparse
import dataclasses
import datetime as dt
import json
import logging
import os
import socket
import sys
import time
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any, TextIO

from virt_trimd import __version__
from virt_trimd.audit.checks import audit_domain
from virt_trimd.audit.discardfix import backup_xml, enable_discard_xml, unified_diff
from virt_trimd.audit.report import audit_to_json, format_audit_table
from virt_trimd.cli.progress import Progress
from virt_trimd.config.model import DEFAULT_CONFIG_PATH, Config, ConfigError, load_config
from virt_trimd.engine.history import History, HistoryError
from virt_trimd.engine.schedule import fire_times, local_timezone
from virt_trimd.engine.storage_group import group_warnings, members_digest, slot_of
from virt_trimd.engine.sweep import (
    Reclaimer,
    SweepContext,
    SweepPlan,
    run_sweep,
    select_domains,
)
from virt_trimd.engine.trim import DomainTrimmer, TrimOptions
from virt_trimd.escaping import SafeFormatter, escape_cell, escape_control, render_table
from virt_trimd.host.agent import HypervisorError, Outcome
from virt_trimd.host.domxml import parse_domain_xml
from virt_trimd.host.measure import Measurer
from virt_trimd.records import DomainInfo, Method, SweepSummary, TrimRecord
from virt_trimd.service import StartupError
from virt_trimd.units import format_bytes, format_duration, parse_duration, parse_size

if TYPE_CHECKING:
    from virt_trimd.host.hypervisor import Hypervisor

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.cli")

EXIT_OK = 0
EXIT_FAILED = 1
EXIT_USAGE = 2


class UsageError(Exception):
    """Bad arguments or configuration: exit status 2."""


class CommandFailed(Exception):
    """The command could not do its work (a file, libvirt, the history): exit status 1."""


def setup_logging(level: str, force_stderr: bool = False) -> None:
    """Configure the root logger once: journald under systemd, stderr otherwise."""
    root = logging.getLogger()
    root.handlers.clear()
    root.setLevel(level.upper())
    handler: logging.Handler | None = None
    # systemd sets JOURNAL_STREAM for services whose stderr goes to the journal.
    if not force_stderr and os.environ.get("JOURNAL_STREAM"):
        try:
            from systemd.journal import JournalHandler  # noqa: PLC0415  (only under systemd)

            handler = JournalHandler(SYSLOG_IDENTIFIER="virt-trimd")
            # Guest-chosen text in a message must not start lines of its own.
            handler.setFormatter(SafeFormatter("%(message)s"))
        except ImportError:
            handler = None
    if handler is None:
        handler = logging.StreamHandler(sys.stderr)
        handler.setFormatter(SafeFormatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root.addHandler(handler)
    # APScheduler logs every job start and end at INFO; our own lines say what matters.
    logging.getLogger("apscheduler").setLevel(max(root.level, logging.WARNING))


def cmd_sparsify_helper(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd sparsify-helper`: one offline request from the daemon, as root.

    Started by virt-trimd-sparsify.socket (Accept=yes) with the connection as stdin
    and stdout. Reads one request line, re-checks it against libvirt and this host's
    config, runs virt-sparsify in a transient unit, writes one answer line.
    """
    from virt_trimd.engine.offline import serve_helper_request  # noqa: PLC0415
    from virt_trimd.host.sparsify import (  # noqa: PLC0415
        HELPER_REQUEST_MAX,
        SparsifyError,
        helper_reply,
        parse_helper_request,
    )

    outcome: Any
    try:
        path, fmt = parse_helper_request(sys.stdin.buffer.readline(HELPER_REQUEST_MAX + 1))
    except ValueError as exc:
        outcome = SparsifyError("refused", f"malformed request: {exc}")
    else:
        config = _load(args, required=True)
        limits = config.offline.limits
        if limits.runner == "helper":
            # This is the helper: its own runs go through systemd-run, never back here.
            limits = dataclasses.replace(limits, runner="auto")
        hv = _hypervisor(config.libvirt_uri)
        try:
            hv.connect()
            outcome = serve_helper_request(hv, path, fmt, limits, config.qemu_img)
        except SparsifyError as exc:
            outcome = exc
        except HypervisorError as exc:
            outcome = SparsifyError("refused", f"libvirt: {exc.message}")
        finally:
            hv.close()
    if isinstance(outcome, SparsifyError):
        log.warning("offline request refused or failed: %s", outcome.message)
    out.write(helper_reply(outcome).decode())
    out.flush()
    return EXIT_OK


def _load(args: argparse.Namespace, required: bool = False) -> Config:
    path: Path | None = getattr(args, "config", None)
    if path is None and required:
        path = DEFAULT_CONFIG_PATH
    config = Config.default() if path is None else load_config(path)
    uri = getattr(args, "connect", None)
    if uri:
        config = dataclasses.replace(config, libvirt_uri=uri)
    return config


def _hypervisor(uri: str) -> Hypervisor:
    """A (not yet connected) libvirt adapter. Imported here, when a command needs libvirt,
    so `--version`, `check-config`, `history` and the CLI's unit tests never load it."""
    from virt_trimd.host.hypervisor import Hypervisor  # noqa: PLC0415

    return Hypervisor(uri)


# -- trim ---------------------------------------------------------------------------


def _resolve_domains(hv: Hypervisor, names: Sequence[str], all_running: bool) -> list[DomainInfo]:
    if all_running:
        return sorted((d for d in hv.list_domains() if d.running), key=lambda d: d.name)
    out: list[DomainInfo] = []
    unknown: list[str] = []
    for name in names:
        try:
            out.append(hv.domain(name))
        except HypervisorError as exc:
            if exc.outcome is Outcome.NO_DOMAIN:
                unknown.append(name)
            else:
                raise
    if unknown:
        raise UsageError(
            "unknown domain(s): "
            + ", ".join(repr(n) for n in unknown)
            + f" (not defined on {hv.uri}; `virsh list --all` shows what is)"
        )
    return out


def cmd_trim(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd trim`: trim named or all running domains once."""
    config = _load(args)
    if not args.all and not args.domains:
        raise UsageError("name at least one DOMAIN, or pass --all")
    if args.all and args.domains:
        raise UsageError("--all and DOMAIN names are mutually exclusive")
    timeout = config.agent_timeout_seconds
    if args.timeout is not None:
        try:
            timeout = parse_duration(args.timeout)
        except ValueError as exc:
            raise UsageError(f"--timeout: {exc}") from exc
        if timeout <= 0:
            raise UsageError("--timeout must be positive")
    minimum = 0
    if args.minimum is not None:
        try:
            minimum = parse_size(args.minimum)
        except ValueError as exc:
            raise UsageError(f"--minimum: {exc}") from exc
    hv = _hypervisor(config.libvirt_uri)
    try:
        hv.connect()
        domains = _resolve_domains(hv, args.domains, args.all)
        trimmer = DomainTrimmer(hv, Measurer(config.qemu_img))
        opts = TrimOptions.from_config(
            config, timeout_seconds=timeout, minimum_bytes=minimum, dry_run=args.dry_run
        )
        plan = SweepPlan(concurrency=args.concurrency)
        progress = Progress(len(domains), out, enabled=False if args.json else None)
        summary = _sweep_with_progress(trimmer, domains, opts, plan, progress)
    finally:
        hv.close()
    if args.json:
        json.dump(summary_json(summary), out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        out.write(format_table(summary.records))
    return EXIT_FAILED if summary.failed else EXIT_OK


def _sweep_with_progress(
    reclaimer: Reclaimer,
    domains: Sequence[DomainInfo],
    opts: TrimOptions,
    plan: SweepPlan,
    progress: Progress,
) -> SweepSummary:
    """run_sweep with a live progress line (trim --all, sparsify), erased at the end."""
    context = SweepContext(
        on_start=lambda dom: progress.start(dom.name),
        on_record=lambda rec: progress.done(rec.domain),
    )
    try:
        return run_sweep(reclaimer, domains, opts, plan, context)
    finally:
        progress.finish()


def cmd_sparsify(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd sparsify`: offline reclaim (virt-sparsify --in-place) of shut-off domains."""
    from virt_trimd.engine.offline import OfflineReclaimer  # noqa: PLC0415
    from virt_trimd.host.sparsify import find_tool  # noqa: PLC0415

    config = _load(args)
    if not args.all and not args.domains:
        raise UsageError("name at least one DOMAIN, or pass --all (every shut-off domain)")
    if args.all and args.domains:
        raise UsageError("--all and DOMAIN names are mutually exclusive")
    limits = config.offline.limits
    if args.timeout is not None:
        try:
            timeout = parse_duration(args.timeout)
        except ValueError as exc:
            raise UsageError(f"--timeout: {exc}") from exc
        if timeout <= 0:
            raise UsageError("--timeout must be positive")
        limits = dataclasses.replace(limits, timeout_seconds=timeout)
    if find_tool() is None and not args.dry_run:
        raise CommandFailed(
            "virt-sparsify not found: install libguestfs-tools (apt-get install "
            "libguestfs-tools) for offline reclaim"
        )
    hv = _hypervisor(config.libvirt_uri)
    try:
        hv.connect()
        if args.all:
            domains = sorted((d for d in hv.list_domains() if not d.running), key=lambda d: d.name)
        else:
            domains = _resolve_domains(hv, args.domains, all_running=False)
        measurer = Measurer(config.qemu_img)
        offline = dataclasses.replace(config.offline, limits=limits, concurrency=1)
        reclaimer = OfflineReclaimer(hv, DomainTrimmer(hv, measurer), offline)
        opts = TrimOptions.from_config(
            config, timeout_seconds=limits.timeout_seconds, minimum_bytes=0, dry_run=args.dry_run
        )
        opts = dataclasses.replace(opts, method=Method.SPARSIFY)
        progress = Progress(len(domains), out, enabled=False if args.json else None)
        summary = _sweep_with_progress(reclaimer, domains, opts, SweepPlan(), progress)
    finally:
        hv.close()
    if args.json:
        json.dump(summary_json(summary), out, indent=2, sort_keys=False)
        out.write("\n")
    else:
        out.write(format_table(summary.records))
    return EXIT_FAILED if summary.failed else EXIT_OK


def summary_json(summary: SweepSummary) -> dict[str, Any]:
    """The `trim --json` and `run --once --json` document (docs/json.md)."""
    return {
        "domains": [r.to_dict() for r in summary.records],
        "reclaimed_bytes": summary.reclaimed_bytes,
    }


def safe_cell(text: str, limit: int = 40) -> str:
    """A table cell: escaped (names may hold newlines and escapes) and cut to `limit`."""
    return escape_cell(text, limit)


def format_table(records: Sequence[TrimRecord]) -> str:
    """Readable before/after table, one row per disk."""
    header = ("DOMAIN", "DISK", "BEFORE", "AFTER", "RECLAIMED", "RESULT")
    rows: list[tuple[str, ...]] = []
    for rec in records:
        if not rec.disks:
            rows.append((safe_cell(rec.domain), "-", "-", "-", "-", rec.result.value))
        for d in rec.disks:
            reclaimed = format_bytes(d.reclaimed_bytes) if d.not_measured is None else "n/a"
            rows.append(
                (
                    safe_cell(rec.domain),
                    safe_cell(d.disk, 12),
                    format_bytes(d.allocated_before),
                    format_bytes(d.allocated_after),
                    reclaimed,
                    rec.result.value,
                )
            )
    lines = render_table(header, rows)
    total = sum(r.reclaimed_bytes for r in records)
    lines.append(f"total reclaimed: {format_bytes(total)} over {len(records)} domain(s)")
    notes = [
        f"{safe_cell(r.domain)}: {safe_cell(r.message, 200)}"
        for r in records
        if r.result.value not in ("success",)
    ]
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"


# -- check-config -----------------------------------------------------------------


def cmd_check_config(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd check-config`: validate the file, print every error."""
    path = args.config or DEFAULT_CONFIG_PATH
    config = load_config(path)
    web = config.metrics.web_config_file
    if web is not None:
        from virt_trimd.config.web import WebConfigError  # noqa: PLC0415
        from virt_trimd.web.server import load_web_config  # noqa: PLC0415

        try:
            load_web_config(web)
        except WebConfigError as exc:
            raise ConfigError([str(exc)]) from exc
    out.write(f"{path}: OK, {len(config.schedules)} schedule(s)\n")
    _describe_storage_group(config, out)
    return EXIT_OK


def _describe_storage_group(config: Config, out: TextIO) -> None:
    """This host's share of its storage group, and what looks wrong from here.

    Warnings go to stderr and keep the exit status 0: a host outside its group still
    works (it falls back to per-host spreading), and Ansible's validate step must not
    refuse a file for it.
    """
    group = config.storage_group
    if not group.members:
        return
    host = group.host or socket.gethostname()
    slot = slot_of(group, host)
    where = (
        f"share {slot.index + 1} of {slot.members}, from {slot.start_fraction:.1%} of each "
        f"window for {slot.length_fraction:.1%} of it"
        if slot is not None
        else "not a member"
    )
    out.write(
        escape_control(
            f"storage group {group.label} (members {members_digest(group.members)}): "
            f"{host}: {where}"
        )
        + "\n"
    )
    warnings = group_warnings(group, host)
    # Shares are fractions of each run's window; an interval counts from each daemon's
    # own start, so members' windows do not line up.
    warnings += [
        f"storage_group {group.label}: schedule {s.name} uses every:, whose windows start "
        "when each daemon started, so the members' shares do not line up; use cron"
        for s in config.schedules
        if s.every_seconds is not None and s.window_seconds > 0
    ]
    for warning in warnings:
        log.warning("%s", escape_control(warning))


# -- run / schedules / history -----------------------------------------------------


def cmd_run(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd run`: the daemon, or with --once every schedule's sweep now."""
    path = args.config or DEFAULT_CONFIG_PATH
    if not args.once:
        from virt_trimd.service.daemon import run_daemon  # noqa: PLC0415

        return run_daemon(path)
    config = load_config(path)
    if not config.schedules:
        raise UsageError(f"{path}: no schedules configured; nothing to run")
    from virt_trimd.service.daemon import run_once  # noqa: PLC0415

    summary, daemon = run_once(config, path)
    if args.json:
        json.dump(summary_json(summary), out, indent=2)
        out.write("\n")
    else:
        out.write(format_table(summary.records))
    if args.print_metrics:
        from prometheus_client import generate_latest  # noqa: PLC0415

        out.write("\n" + generate_latest(daemon.registry).decode())
    return EXIT_FAILED if summary.failed else EXIT_OK


def cmd_schedules(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd schedules`: next fire times and the running domains each matches."""
    config = _load(args, required=True)
    tz = local_timezone()
    now = dt.datetime.now(tz)
    domains: list[DomainInfo] | None = None
    hv = _hypervisor(config.libvirt_uri)
    try:
        hv.connect()
        domains = hv.list_domains()
    except HypervisorError as exc:
        out.write(f"(libvirt unavailable, domains not shown: {escape_control(exc.message)})\n")
    finally:
        hv.close()
    if not config.schedules:
        out.write("no schedules configured\n")
    for sched in config.schedules:
        how = (
            f"cron {sched.cron!r}"
            if sched.cron
            else f"every {format_duration(sched.every_seconds)}"
            if sched.every_seconds is not None
            else "growth triggers only"
        )
        if sched.growth_bytes is not None:
            how += f", growth {format_bytes(sched.growth_bytes)}"
        if sched.reclaimable_bytes is not None:
            how += f", reclaimable {format_bytes(sched.reclaimable_bytes)}"
        if sched.offline:
            how += ", offline"
        out.write(
            escape_control(
                f"{sched.name}: {how}, window {format_duration(sched.window_seconds)}, "
                f"concurrency {sched.concurrency}, timeout {format_duration(sched.timeout_seconds)}"
            )
            + "\n"
        )
        for when in fire_times(sched, tz, now, args.count):
            out.write(f"  next: {when.isoformat(timespec='seconds')}\n")
        if domains is not None:
            running = [d for d in domains if d.running]
            names = [
                safe_cell(d.name) for d in select_domains(running, sched.domains, sched.exclude)
            ]
            out.write(f"  domains ({len(names)}): {', '.join(names) or '-'}\n")
            if sched.offline:
                shut_off = [d for d in domains if not d.running]
                offline = [
                    safe_cell(d.name)
                    for d in select_domains(shut_off, sched.domains, sched.exclude)
                ]
                out.write(f"  shut off, offline ({len(offline)}): {', '.join(offline) or '-'}\n")
    return EXIT_OK


def cmd_history(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd history`: past trims from the SQLite store."""
    config = _load(args, required=args.config is not None)
    state_dir = args.state_dir or config.state_dir
    since_ts = None
    if args.since:
        try:
            since_ts = time.time() - parse_duration(args.since)
        except ValueError as exc:
            raise UsageError(f"--since: {exc}") from exc
    with History(state_dir, readonly=True) as hist:
        records = hist.query(domain=args.domain, since_ts=since_ts, limit=args.limit)
    if args.json:
        json.dump(history_json(records), out, indent=2)
        out.write("\n")
        return EXIT_OK
    out.write(format_history_table(records))
    return EXIT_OK


def history_json(records: Sequence[TrimRecord]) -> dict[str, Any]:
    """The `history --json` document (docs/json.md)."""
    return {"trims": [r.to_dict() for r in records]}


def format_history_table(records: Sequence[TrimRecord]) -> str:
    """`history` for people: one row per trim, names escaped."""
    header = ("STARTED", "DOMAIN", "SCHEDULE", "HOW", "RESULT", "RECLAIMED", "DURATION")
    rows = [
        (
            safe_cell(r.started_at, 40),
            safe_cell(r.domain),
            safe_cell(r.schedule or "-", 20),
            # method/trigger: "agent", "sparsify", "agent/growth"
            r.method.value + (f"/{safe_cell(r.trigger, 12)}" if r.trigger else ""),
            r.result.value,
            format_bytes(r.reclaimed_bytes),
            format_duration(r.duration_seconds),
        )
        for r in records
    ]
    return "".join(line + "\n" for line in render_table(header, rows))


# -- status ----------------------------------------------------------------------


def cmd_status(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd status`: the operator's view, read from the history only (read-only)."""
    import socket  # noqa: PLC0415

    from virt_trimd.cli.statusview import format_status  # noqa: PLC0415
    from virt_trimd.engine.status import (  # noqa: PLC0415
        build_status,
        schedule_next_runs,
        status_to_json,
    )

    # The packaged config when there is one: its schedules give the next runs.
    explicit = args.config is not None or DEFAULT_CONFIG_PATH.is_file()
    config = _load(args, required=explicit)
    state_dir = args.state_dir or config.state_dir
    tz = local_timezone()
    now = time.time()
    with History(state_dir, readonly=True) as hist:
        next_runs = schedule_next_runs(hist, config.schedules, tz, now)
        report = build_status(hist, config, now, hostname=socket.gethostname(), next_runs=next_runs)
    if args.json:
        json.dump(status_to_json(report), out, indent=2)
        out.write("\n")
    else:
        out.write(format_status(report, tz))
    return EXIT_FAILED if report.needs_attention or report.stale else EXIT_OK


# -- audit -----------------------------------------------------------------------


def cmd_audit(args: argparse.Namespace, out: TextIO) -> int:
    """`virt-trimd audit`: can discards reach the host? With --enable-discard, fix the XML."""
    config = _load(args)
    if args.enable_discard:
        if not args.domains:
            raise UsageError("--enable-discard needs DOMAIN names (it never edits all domains)")
        return _enable_discard(args, config, out)
    if args.dry_run:
        raise UsageError("--dry-run goes with --enable-discard")
    hv = _hypervisor(config.libvirt_uri)
    try:
        hv.connect()
        qemu = hv.qemu_version()
        if args.domains:
            infos = _resolve_domains(hv, args.domains, all_running=False)
        else:
            infos = sorted(hv.list_domains(), key=lambda d: d.name)
        audits = []
        progress = Progress(len(infos), out, enabled=False if args.json else None)
        try:
            for info in infos:
                progress.start(info.name)
                xml = hv.persistent_xml(info.name)
                persistent = parse_domain_xml(xml) if xml is not None else None
                audits.append(audit_domain(info if info.running else None, persistent, qemu))
                progress.done(info.name)
        finally:
            progress.finish()
    finally:
        hv.close()
    if args.json:
        json.dump(audit_to_json(audits), out, indent=2)
        out.write("\n")
    else:
        out.write(format_audit_table(audits))
    return EXIT_OK if all(a.ready for a in audits) else EXIT_FAILED


def _enable_discard(args: argparse.Namespace, config: Config, out: TextIO) -> int:
    hv = _hypervisor(config.libvirt_uri)
    changed_any = False
    try:
        hv.connect()
        _resolve_domains(hv, args.domains, all_running=False)  # unknown names: exit 2
        for name in args.domains:
            old = hv.inactive_xml(name)
            new, changed = enable_discard_xml(old)
            if not changed:
                out.write(f"{safe_cell(name)}: every file/block disk already has discard='unmap'\n")
                continue
            changed_any = True
            out.write(unified_diff(old, new, name))
            if args.dry_run:
                out.write(f"{safe_cell(name)}: dry run, nothing changed\n")
                continue
            backup = backup_xml(config.state_dir, name, old, dt.datetime.now(dt.UTC))
            hv.define_xml(new)
            out.write(
                f"{safe_cell(name)}: discard='unmap' set on {', '.join(changed)}; "
                f"previous definition saved to {backup}\n"
            )
    except (OSError, ValueError) as exc:  # the backup file, or XML enable_discard_xml refused
        raise CommandFailed(str(exc)) from exc
    finally:
        hv.close()
    if changed_any and not args.dry_run:
        out.write(
            "This takes effect at the next cold boot: `virsh shutdown DOMAIN`, wait, then "
            "`virsh start DOMAIN`. A reboot from inside the guest keeps the old QEMU process.\n"
        )
    return EXIT_OK


# -- argument parsing --------------------------------------------------------------


CONFIG_HELP = f"YAML configuration (default {DEFAULT_CONFIG_PATH})"


def build_parser() -> argparse.ArgumentParser:
    """The argparse tree for every subcommand."""
    parser = argparse.ArgumentParser(
        prog="virt-trimd",
        description="Scheduled guest fstrim for libvirt hosts, measured on the host.",
    )
    parser.add_argument("--version", action="version", version=f"virt-trimd {__version__}")
    parser.add_argument(
        "--log-level",
        default=None,
        choices=["DEBUG", "INFO", "WARNING", "ERROR"],
        help="log verbosity on stderr (default WARNING; `run` defaults to INFO)",
    )
    sub = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    p = sub.add_parser("trim", help="trim domains once and print what was reclaimed")
    p.add_argument("domains", nargs="*", metavar="DOMAIN")
    p.add_argument("--all", action="store_true", help="every running domain")
    p.add_argument("--connect", metavar="URI", help="libvirt URI (default from config)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--dry-run", action="store_true", help="measure only, send no trim")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument("--timeout", metavar="DURATION", help="per-guest fstrim timeout (e.g. 10m)")
    p.add_argument("--minimum", metavar="SIZE", help="guest-fstrim minimum extent (e.g. 1MiB)")
    p.add_argument(
        "--concurrency", type=int, default=1, metavar="N", help="guests trimmed at once (default 1)"
    )
    p.set_defaults(func=cmd_trim)

    p = sub.add_parser(
        "sparsify", help="reclaim shut-off domains offline with virt-sparsify --in-place"
    )
    p.add_argument("domains", nargs="*", metavar="DOMAIN")
    p.add_argument("--all", action="store_true", help="every shut-off domain")
    p.add_argument("--connect", metavar="URI", help="libvirt URI (default from config)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--dry-run", action="store_true", help="check and measure only, write nothing")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--timeout", metavar="DURATION", help="per-disk virt-sparsify timeout (default 30m)"
    )
    p.set_defaults(func=cmd_sparsify)

    p = sub.add_parser(
        "sparsify-helper",
        help="internal: one offline request from the daemon (virt-trimd-sparsify@.service)",
    )
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"YAML configuration (default {DEFAULT_CONFIG_PATH})",
    )
    p.set_defaults(func=cmd_sparsify_helper)

    p = sub.add_parser("run", help="the daemon (systemd service), or --once for cron")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"YAML configuration (default {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument(
        "--once",
        action="store_true",
        help="run every schedule's sweep now, ignoring windows, print, exit",
    )
    p.add_argument("--json", action="store_true", help="with --once: one JSON document")
    p.add_argument(
        "--print-metrics",
        action="store_true",
        help="with --once: also print the Prometheus exposition",
    )
    p.set_defaults(func=cmd_run)

    p = sub.add_parser("schedules", help="next fire times and matching domains")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"YAML configuration (default {DEFAULT_CONFIG_PATH})",
    )
    p.add_argument("--connect", metavar="URI", help="libvirt URI (default from config)")
    p.add_argument("--count", type=int, default=3, metavar="N", help="fire times to show")
    p.set_defaults(func=cmd_schedules)

    p = sub.add_parser("history", help="past trims from the history store")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration (state_dir)")
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="override state_dir")
    p.add_argument("--domain", metavar="NAME", help="only this domain")
    p.add_argument("--since", metavar="DURATION", help="only trims newer than this (e.g. 7d)")
    p.add_argument("--limit", type=int, metavar="N", help="at most N rows (newest)")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=cmd_history)

    p = sub.add_parser("status", help="what was reclaimed, what grows, what needs attention")
    p.add_argument("--config", type=Path, metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--state-dir", type=Path, metavar="DIR", help="override state_dir")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.set_defaults(func=cmd_status)

    p = sub.add_parser("audit", help="can discards reach the host? what to change")
    p.add_argument("domains", nargs="*", metavar="DOMAIN", help="default: every domain")
    p.add_argument("--connect", metavar="URI", help="libvirt URI (default from config)")
    p.add_argument("--config", type=Path, metavar="FILE", help="YAML configuration")
    p.add_argument("--json", action="store_true", help="one JSON document on stdout")
    p.add_argument(
        "--enable-discard",
        action="store_true",
        help="set discard='unmap' in the persistent definition of DOMAIN(s)",
    )
    p.add_argument(
        "--dry-run",
        action="store_true",
        help="with --enable-discard: print the diff, change nothing",
    )
    p.set_defaults(func=cmd_audit)

    p = sub.add_parser("check-config", help="validate the configuration file")
    p.add_argument(
        "--config",
        type=Path,
        metavar="FILE",
        help=f"YAML configuration (default {DEFAULT_CONFIG_PATH})",
    )
    p.set_defaults(func=cmd_check_config)
    return parser


def main(argv: Sequence[str] | None = None, out: TextIO | None = None) -> int:
    """Entry point of the `virt-trimd` console script."""
    parser = build_parser()
    args = parser.parse_args(argv)
    out = out or sys.stdout
    setup_logging(log_level(args))
    # The one place where errors become exit codes; commands raise, they never print them.
    try:
        return int(args.func(args, out))
    except ConfigError as exc:
        print(str(exc), file=sys.stderr)
        return EXIT_USAGE
    except UsageError as exc:
        print(f"virt-trimd: {escape_control(str(exc))}", file=sys.stderr)
        return EXIT_USAGE
    except HypervisorError as exc:
        print(f"virt-trimd: {escape_control(exc.message)}", file=sys.stderr)
        return EXIT_FAILED
    except StartupError as exc:
        print(f"virt-trimd: cannot start: {escape_control(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except (HistoryError, CommandFailed) as exc:
        print(f"virt-trimd: {escape_control(str(exc))}", file=sys.stderr)
        return EXIT_FAILED
    except KeyboardInterrupt:
        return 130


def log_level(args: argparse.Namespace) -> str:
    """--log-level if given (in any spelling argparse accepts), else INFO for `run`, WARNING."""
    if args.log_level is not None:
        return str(args.log_level)
    return "INFO" if args.command in ("run", "sparsify-helper") else "WARNING"


if __name__ == "__main__":
    sys.exit(main())
