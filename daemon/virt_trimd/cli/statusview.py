"""`virt-trimd status` for people: a header with host totals, one row per domain, reasons."""

from __future__ import annotations

import datetime as dt

from virt_trimd.engine.status import StatusReport
from virt_trimd.escaping import escape_cell, render_table
from virt_trimd.records import stamp_ts
from virt_trimd.units import (
    format_bytes,
    format_duration,
    format_local_minute,
    format_signed_size,
    format_size_or_dash,
)


def _iso_when(stamp: str, tz: dt.tzinfo) -> str:
    try:
        return format_local_minute(stamp_ts(stamp), tz)
    except ValueError:
        return escape_cell(stamp, 25)


def freshness_line(report: StatusReport) -> str:
    """How old the data is, and a warning when the census has stopped."""
    if report.data_as_of_ts is None:
        return "data: no census recorded yet (is the daemon running with census_interval > 0?)"
    age = max(report.generated_ts - report.data_as_of_ts, 0.0)
    line = f"data: latest census {format_duration(round(age))} ago"
    if report.stale:
        line += " - STALE: the daemon is not recording (`systemctl status virt-trimd`)"
    return line


def format_status(report: StatusReport, tz: dt.tzinfo) -> str:
    """The whole `status` output; every guest-chosen text escaped."""
    lines = [
        freshness_line(report),
        (
            f"reclaimed: {format_bytes(report.total_reclaimed(1))} (1 day), "
            f"{format_bytes(report.total_reclaimed(7))} (7 days), "
            f"{format_bytes(report.total_reclaimed(30))} (30 days)"
        ),
        (
            f"allocated: {format_bytes(report.allocated_bytes)} "
            f"({format_signed_size(report.growth_7d_bytes)} over 7 days), "
            f"reclaimable now: {format_bytes(report.reclaimable_bytes)}"
        ),
        (
            f"domains: {len(report.domains)}, needing attention: {report.needs_attention}; "
            f"next run: {format_local_minute(report.next_run_ts, tz)}"
        ),
        "",
    ]
    header = (
        "DOMAIN",
        "STATE",
        "READY",
        "LAST TRIM",
        "RESULT",
        "RECL 1D",
        "RECL 7D",
        "RECL 30D",
        "ALLOCATED",
        "GROWTH 7D",
        "RECLAIMABLE",
        "NEXT RUN",
    )
    rows = []
    for d in report.domains:
        last = d.last_trim
        rows.append(
            (
                escape_cell(d.domain, 40),
                d.state,
                "-" if d.ready is None else ("yes" if d.ready else "no"),
                _iso_when(last.started_at, tz) if last else "-",
                last.result if last else "-",
                format_bytes(d.reclaimed_bytes[1]),
                format_bytes(d.reclaimed_bytes[7]),
                format_bytes(d.reclaimed_bytes[30]),
                format_size_or_dash(d.allocated_bytes),
                format_signed_size(d.growth_7d_bytes),
                format_size_or_dash(d.reclaimable_bytes),
                format_local_minute(d.next_run_ts, tz),
            )
        )
    lines.extend(render_table(header, rows))
    notes = [
        f"{escape_cell(d.domain, 40)}: {escape_cell(line, 200)}"
        for d in report.domains
        for line in d.reasons
    ]
    if notes:
        lines.append("")
        lines.extend(notes)
    return "\n".join(lines) + "\n"
