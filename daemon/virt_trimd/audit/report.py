"""The audit's two outputs: the table and details for people, the JSON document.

Every human-facing string goes through `virt_trimd.escaping`; the JSON speaks the
vocabulary of docs/json.md (`domain`, `disk`, as in trim records).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from virt_trimd.audit.checks import DomainAudit
from virt_trimd.escaping import escape_cell, escape_control, render_table


def _first_line(items: Sequence[str]) -> str:
    return items[0] if items else "-"


def format_audit_table(audits: Sequence[DomainAudit], reason_width: int = 72) -> str:
    """Human-readable audit: one row per agent and disk, then details and fixes.

    Names, paths and reasons come from domain XML that anyone defining a domain wrote:
    every cell and detail line is escaped, so none can move the operator's cursor.
    """
    header = ("DOMAIN", "DISK", "BUS", "DISCARD", "VERDICT", "REASON")
    rows: list[tuple[str, ...]] = []
    for a in audits:
        rows.append(
            (
                a.name,
                "(agent)",
                "-",
                "-",
                a.agent.verdict.value,
                escape_cell(_first_line(a.agent.reasons), reason_width),
            )
        )
        for d in a.disks:
            bus = d.bus + (f"/{d.controller_model}" if d.controller_model else "")
            discard = d.discard if d.discard_explicit else f"{d.discard}*"
            verdict = d.verdict.value + (" (pending)" if d.differs else "")
            rows.append(
                (
                    a.name,
                    d.target,
                    bus,
                    discard,
                    verdict,
                    escape_cell(_first_line(d.reasons), reason_width),
                )
            )
    lines = render_table(header, rows)
    if any(not d.discard_explicit for a in audits for d in a.disks):
        lines.append("* no discard attribute in the XML: libvirt's default, 'ignore'")
    details = [_details(a) for a in audits]
    body = "\n".join(lines)
    extra = "\n\n".join(d for d in details if d)
    ready = sum(a.ready for a in audits)
    summary = f"{ready} of {len(audits)} domain(s) ready for trim"
    return "\n\n".join(p for p in (body, extra, summary) if p) + "\n"


def _details(a: DomainAudit) -> str:
    out: list[str] = []
    state = "running" if a.running else "shut off"
    head = f"{a.name} ({state}, machine {a.machine or 'unknown'}): "
    head += "ready" if a.ready else "NOT ready"
    out.append(head)
    out.extend(f"  note: {n}" for n in a.notes)
    ag = a.agent
    if ag.reasons or ag.notes:
        out.append(f"  agent: {ag.verdict.value}")
        out.extend(f"    - {r}" for r in ag.reasons)
        out.extend(f"    note: {n}" for n in ag.notes)
        if ag.fix:
            out.append(f"    fix: {ag.fix}")
    for d in a.disks:
        src = d.source or "-"
        out.append(
            f"  {d.target}: {d.verdict.value} ({d.bus}, {d.source_type or '?'} {src}, "
            f"format {d.format or '?'}, discard={d.discard}, "
            f"detect_zeroes={d.detect_zeroes or 'off'})"
        )
        out.extend(f"    - {r}" for r in d.reasons)
        out.extend(f"    note: {n}" for n in d.notes)
        if d.fix:
            out.append(f"    fix: {d.fix}")
        if d.pending:
            out.append(f"    pending: {d.pending}")
    if a.next_step:
        out.append(f"  then: {a.next_step}")
    return "\n".join(escape_control(line) for line in out)


def audit_to_json(audits: Sequence[DomainAudit]) -> dict[str, Any]:
    """JSON-ready dict: {"ready": bool, "domains": [...]} with every field of every audit."""
    domains: list[dict[str, Any]] = []
    for a in audits:
        domains.append(
            {
                "domain": a.name,
                "running": a.running,
                "machine": a.machine,
                "ready": a.ready,
                "notes": list(a.notes),
                "next_step": a.next_step,
                "agent": {
                    "configured": a.agent.configured,
                    "state": a.agent.state,
                    "verdict": a.agent.verdict.value,
                    "reasons": list(a.agent.reasons),
                    "notes": list(a.agent.notes),
                    "fix": a.agent.fix,
                },
                "disks": [
                    {
                        "disk": d.target,
                        "device": d.device,
                        "bus": d.bus,
                        "controller_model": d.controller_model,
                        "source_type": d.source_type,
                        "source": d.source,
                        "format": d.format,
                        "discard": d.discard,
                        "discard_explicit": d.discard_explicit,
                        "detect_zeroes": d.detect_zeroes,
                        "verdict": d.verdict.value,
                        "reasons": list(d.reasons),
                        "notes": list(d.notes),
                        "fix": d.fix,
                        "differs": d.differs,
                        "persistent_verdict": (
                            None if d.persistent_verdict is None else d.persistent_verdict.value
                        ),
                        "pending": d.pending,
                    }
                    for d in a.disks
                ],
            }
        )
    return {"ready": all(a.ready for a in audits), "domains": domains}
