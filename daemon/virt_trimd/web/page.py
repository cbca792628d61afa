"""The status page at `/`: the `status` report as server-rendered HTML with inline SVG charts.

No JavaScript, no stylesheet or font from anywhere (hosts are often offline, and the
Content-Security-Policy the server sends forbids other origins anyway). Every text that
comes from a guest or an operator (domain names, paths, messages) goes through
`html.escape`; the document is well-formed XML too, so a strict parser can check it.
"""

from __future__ import annotations

import datetime as dt
import html
from collections.abc import Iterable, Sequence

from virt_trimd.engine.status import DiskSeries, DomainStatus, StatusCharts, StatusReport
from virt_trimd.records import stamp_ts
from virt_trimd.units import (
    format_bytes,
    format_duration,
    format_local_minute,
    format_signed_size,
    format_size_or_dash,
)

# No script, no other origin; inline styles only (the page's one <style> element).
CONTENT_SECURITY_POLICY = (
    "default-src 'none'; style-src 'unsafe-inline'; img-src 'self' data:; "
    "base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
)

_STYLE = """
body{font-family:system-ui,sans-serif;margin:0 auto;max-width:72rem;padding:0.75rem;
color:#1b1f24;background:#fff}
h1{font-size:1.4rem;margin:0.2rem 0}h2{font-size:1.1rem;margin:1.2rem 0 0.4rem}
.fresh{color:#555}.stale{color:#a40000;font-weight:bold}
.totals{display:flex;flex-wrap:wrap;gap:0.5rem;padding:0;margin:0.6rem 0;list-style:none}
.totals li{border:1px solid #d0d7de;border-radius:6px;padding:0.4rem 0.7rem;min-width:8rem}
.totals b{display:block;font-size:1.15rem}
.scroll{overflow-x:auto}
table{border-collapse:collapse;font-size:0.9rem;width:100%}
th,td{text-align:left;padding:0.25rem 0.5rem;border-bottom:1px solid #eaeef2;white-space:nowrap}
td.num,th.num{text-align:right}
tr.attn td{background:#fff4e5}
ul.reasons{margin:0.2rem 0 0 1rem;padding:0}
.charts{display:flex;flex-wrap:wrap;gap:0.8rem}
figure{margin:0;flex:1 1 20rem;max-width:34rem}
figcaption{font-size:0.85rem;color:#333}
svg{width:100%;height:auto;background:#f6f8fa;border-radius:4px}
#reclaim-chart{max-width:44rem}
.legend-alloc{color:#0a58ca}.legend-used{color:#198754}
"""


def _e(text: object) -> str:
    return html.escape(str(text), quote=True)


def _iso_when(stamp: str, tz: dt.tzinfo) -> str:
    try:
        return format_local_minute(stamp_ts(stamp), tz)
    except ValueError:
        return stamp


def render_status_page(
    report: StatusReport, charts: StatusCharts, tz: dt.tzinfo, *, version: str, hostname: str
) -> bytes:
    """The whole page, UTF-8."""
    parts = [
        "<!DOCTYPE html>\n",
        '<html lang="en"><head><meta charset="utf-8"/>',
        '<meta name="viewport" content="width=device-width, initial-scale=1"/>',
        f"<title>virt-trimd on {_e(hostname)}</title>",
        f"<style>{_STYLE}</style></head><body>",
        f"<h1>virt-trimd on {_e(hostname)}</h1>",
        _freshness(report, tz),
        _totals(report, tz),
        "<h2>Reclaimed per day (last 30 days)</h2>",
        _reclaim_chart(charts.reclaimed_by_day),
        "<h2>Domains</h2>",
        _domain_table(report.domains, tz),
        "<h2>Allocated against guest-used, per disk (last 30 days)</h2>",
        _disk_charts(charts.disks, tz),
        f'<p class="fresh">virt-trimd {_e(version)} · <a href="metrics">/metrics</a> · ',
        '<a href="api/v1/status">/api/v1/status</a></p>',
        "</body></html>\n",
    ]
    return "".join(parts).encode("utf-8")


def _freshness(report: StatusReport, tz: dt.tzinfo) -> str:
    if report.data_as_of_ts is None:
        return '<p class="stale">No census recorded yet.</p>'
    age = format_duration(round(max(report.generated_ts - report.data_as_of_ts, 0.0)))
    text = f"Latest census {_e(format_local_minute(report.data_as_of_ts, tz))} ({_e(age)} ago)"
    if report.stale:
        return f'<p class="stale">{text}: stale, the census is not running.</p>'
    return f'<p class="fresh">{text}.</p>'


def _totals(report: StatusReport, tz: dt.tzinfo) -> str:
    items = [
        ("Reclaimed, 1 day", format_bytes(report.total_reclaimed(1))),
        ("Reclaimed, 7 days", format_bytes(report.total_reclaimed(7))),
        ("Reclaimed, 30 days", format_bytes(report.total_reclaimed(30))),
        ("Allocated now", format_bytes(report.allocated_bytes)),
        ("Growth, 7 days", format_signed_size(report.growth_7d_bytes)),
        ("Reclaimable now", format_bytes(report.reclaimable_bytes)),
        ("Domains", str(len(report.domains))),
        ("Need attention", str(report.needs_attention)),
        ("Next run", format_local_minute(report.next_run_ts, tz)),
    ]
    cells = "".join(f"<li>{_e(label)}<b>{_e(value)}</b></li>" for label, value in items)
    return f'<ul class="totals" id="totals">{cells}</ul>'


def _domain_table(domains: Sequence[DomainStatus], tz: dt.tzinfo) -> str:
    head = (
        "<tr><th>Domain</th><th>State</th><th>Ready</th><th>Last trim</th><th>Result</th>"
        '<th class="num">Reclaimed 1d</th><th class="num">7d</th><th class="num">30d</th>'
        '<th class="num">Allocated</th><th class="num">Growth 7d</th>'
        '<th class="num">Reclaimable</th><th>Next run</th></tr>'
    )
    rows = []
    for d in sorted(domains, key=lambda x: x.domain):
        last = d.last_trim
        ready = "-" if d.ready is None else ("yes" if d.ready else "no")
        cells = [
            _e(d.domain),
            _e(d.state.replace("_", " ")),
            ready,
            _e(_iso_when(last.started_at, tz)) if last else "-",
            _e(last.result) if last else "-",
        ]
        nums = [
            format_bytes(d.reclaimed_bytes[1]),
            format_bytes(d.reclaimed_bytes[7]),
            format_bytes(d.reclaimed_bytes[30]),
            format_size_or_dash(d.allocated_bytes),
            format_signed_size(d.growth_7d_bytes),
            format_size_or_dash(d.reclaimable_bytes),
        ]
        row = "".join(f"<td>{c}</td>" for c in cells)
        row += "".join(f'<td class="num">{_e(n)}</td>' for n in nums)
        row += f"<td>{_e(format_local_minute(d.next_run_ts, tz))}</td>"
        klass = ' class="attn"' if d.needs_attention else ""
        rows.append(f"<tr{klass}>{row}</tr>")
        if d.reasons:
            reasons = "".join(f"<li>{_e(r)}</li>" for r in d.reasons)
            rows.append(f'<tr{klass}><td colspan="12"><ul class="reasons">{reasons}</ul></td></tr>')
    body = "".join(rows) or '<tr><td colspan="12">No domains recorded yet.</td></tr>'
    table = f'<table id="domains"><thead>{head}</thead><tbody>{body}</tbody></table>'
    return f'<div class="scroll">{table}</div>'


def _reclaim_chart(days: Sequence[tuple[dt.date, int]]) -> str:
    width, height, pad = 600, 160, 24
    top = max((max(v, 0) for _, v in days), default=0)
    bars = []
    if days:
        slot = (width - 2 * pad) / len(days)
        for i, (day, value) in enumerate(days):
            h = 0.0 if top <= 0 else (height - 2 * pad) * max(value, 0) / top
            x = pad + i * slot
            y = height - pad - h
            bars.append(
                f'<rect x="{x + 1:.1f}" y="{y:.1f}" width="{max(slot - 2, 1):.1f}" '
                f'height="{h:.1f}" fill="#0a58ca"><title>{_e(day.isoformat())}: '
                f"{_e(format_bytes(value))}</title></rect>"
            )
    first = days[0][0].isoformat() if days else ""
    last = days[-1][0].isoformat() if days else ""
    labels = (
        f'<text x="{pad}" y="{height - 6}" font-size="11">{_e(first)}</text>'
        f'<text x="{width - pad}" y="{height - 6}" font-size="11" text-anchor="end">'
        f"{_e(last)}</text>"
        f'<text x="{pad}" y="14" font-size="11">max {_e(format_bytes(top))}/day</text>'
    )
    axis = (
        f'<line x1="{pad}" y1="{height - pad}" x2="{width - pad}" y2="{height - pad}" '
        'stroke="#8c959f"/>'
    )
    return (
        f'<svg id="reclaim-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 {width} '
        f'{height}" role="img" aria-label="bytes reclaimed per day">'
        f"{axis}{''.join(bars)}{labels}</svg>"
    )


def _polyline(points: Iterable[tuple[float, float]], colour: str) -> str:
    coords = " ".join(f"{x:.1f},{y:.1f}" for x, y in points)
    if not coords:
        return ""
    return f'<polyline fill="none" stroke="{colour}" stroke-width="2" points="{coords}"/>'


def _disk_charts(series: Sequence[DiskSeries], tz: dt.tzinfo) -> str:
    if not series:
        return "<p>No census samples yet.</p>"
    figures = []
    width, height, pad = 320, 120, 8
    for s in series:
        pts = s.points
        if len(pts) == 1:
            # One census so far: draw it as a level across the chart, not an invisible dot.
            pts = (pts[0], (pts[0][0] + 1.0, pts[0][1], pts[0][2]))
        t0, t1 = pts[0][0], pts[-1][0]
        span = max(t1 - t0, 1.0)
        top = max(max(a, u or 0) for _, a, u in pts) or 1

        def xy(
            ts: float, value: int, t0: float = t0, span: float = span, top: int = top
        ) -> tuple[float, float]:
            x = pad + (width - 2 * pad) * (ts - t0) / span
            return x, height - pad - (height - 2 * pad) * value / top

        alloc = _polyline((xy(ts, a) for ts, a, _ in pts), "#0a58ca")
        used = _polyline((xy(ts, u) for ts, _, u in pts if u is not None), "#198754")
        latest = pts[-1]
        caption = (
            f"{_e(s.domain)} / {_e(s.disk)}: "
            f'<span class="legend-alloc">allocated {_e(format_bytes(latest[1]))}</span>, '
            f'<span class="legend-used">guest used {_e(format_size_or_dash(latest[2]))}</span>'
            f" ({_e(format_local_minute(t0, tz))} to {_e(format_local_minute(t1, tz))})"
        )
        figures.append(
            f'<figure><svg class="disk-chart" xmlns="http://www.w3.org/2000/svg" viewBox="0 0 '
            f'{width} {height}" role="img" aria-label="allocated and guest-used bytes">'
            f"{alloc}{used}</svg><figcaption>{caption}</figcaption></figure>"
        )
    return f'<div class="charts">{"".join(figures)}</div>'
