"""Metric names used by the Grafana dashboard and the alert rules, and the daemon's contract.

Shared by tests/unit/test_dashboard.py, tests/integration/test_alert_rules.py and the
end-to-end test that compares these names with a live daemon's /metrics. Import it as
`promql_names` from tests/unit, or as `unit.promql_names` (tests/ is on sys.path).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import yaml

# Every series name the daemon exposes (histograms by their base name).
CONTRACT_METRICS = frozenset(
    {
        "virt_trimd_reclaimed_bytes_total",
        "virt_trimd_guest_trimmed_bytes_total",
        "virt_trimd_trims_total",
        "virt_trimd_trim_duration_seconds",
        "virt_trimd_last_trim_duration_seconds",
        "virt_trimd_last_success_timestamp_seconds",
        "virt_trimd_disk_allocated_bytes",
        "virt_trimd_disk_virtual_bytes",
        "virt_trimd_disk_file_bytes",
        "virt_trimd_disk_info",
        "virt_trimd_disk_discard_ready",
        "virt_trimd_disk_trim_effective",
        "virt_trimd_disk_reclaimable_bytes",
        "virt_trimd_disk_last_guest_used_bytes",
        "virt_trimd_disk_last_guest_used_timestamp_seconds",
        "virt_trimd_reclaims_total",
        "virt_trimd_trigger_backoff_until_timestamp_seconds",
        "virt_trimd_next_run_timestamp_seconds",
        "virt_trimd_last_sweep_timestamp_seconds",
        "virt_trimd_sweep_reclaimed_bytes",
        "virt_trimd_libvirt_up",
        "virt_trimd_config_last_reload_successful",
        "virt_trimd_config_last_reload_success_timestamp_seconds",
        "virt_trimd_history_write_ok",
        "virt_trimd_history_write_errors_total",
        "virt_trimd_build_info",
        "virt_trimd_storage_group_info",
    }
)
HISTOGRAMS = frozenset({"virt_trimd_trim_duration_seconds"})
# Series Prometheus itself synthesises for every scrape target.
PROMETHEUS_SYNTHETIC = frozenset({"up", "scrape_duration_seconds", "scrape_samples_scraped"})

_KEYWORDS = frozenset(
    {
        "and",
        "or",
        "unless",
        "bool",
        "offset",
        "by",
        "without",
        "on",
        "ignoring",
        "group_left",
        "group_right",
        "inf",
        "nan",
        "atan2",
        "start",
        "end",
    }
)
_STRING = re.compile(r'"(?:[^"\\]|\\.)*"|\'(?:[^\'\\]|\\.)*\'|`[^`]*`')
_GRAFANA_VAR = re.compile(r"\$\{[^}]*\}|\$\w+")
_BRACES = re.compile(r"\{[^}]*\}")
_BRACKETS = re.compile(r"\[[^\]]*\]")
_LABEL_LIST = re.compile(
    r"\b(?:by|without|on|ignoring|group_left|group_right)\s*\([^)]*\)", re.IGNORECASE
)
_IDENT = re.compile(r"(?<![\w.:])([A-Za-z_:][A-Za-z0-9_:]*)(?![\w:])(\s*\()?")


def normalize_metric_name(name: str) -> str:
    """Map a histogram's _bucket/_sum/_count series to the histogram's base name."""
    for suffix in ("_bucket", "_sum", "_count"):
        base = name.removesuffix(suffix)
        if base != name and base in HISTOGRAMS:
            return base
    return name


def promql_metric_names(expr: str) -> set[str]:
    """Metric names a PromQL expression selects (functions, keywords, labels excluded)."""
    text = _STRING.sub('""', expr)
    text = _GRAFANA_VAR.sub(" ", text)
    text = _BRACES.sub(" ", text)
    text = _BRACKETS.sub(" ", text)
    text = _LABEL_LIST.sub(" ", text)
    names: set[str] = set()
    for match in _IDENT.finditer(text):
        word, call = match.group(1), match.group(2)
        if call or word.lower() in _KEYWORDS:
            continue
        names.add(normalize_metric_name(word))
    return names


def _walk_panels(panels: list[dict[str, Any]]) -> Iterator[dict[str, Any]]:
    for panel in panels:
        yield panel
        yield from _walk_panels(panel.get("panels", []))


def dashboard_exprs(path: Path) -> list[str]:
    """Every PromQL expression in a dashboard: panel targets and variable queries."""
    board = json.loads(path.read_text())
    exprs: list[str] = []
    for panel in _walk_panels(board.get("panels", [])):
        exprs.extend(t["expr"] for t in panel.get("targets", []) if t.get("expr"))
    for var in board.get("templating", {}).get("list", []):
        if var.get("type") != "query":
            continue
        query = var.get("query")
        text = query.get("query", "") if isinstance(query, dict) else str(query or "")
        # label_values(metric{...}, label): the selector is PromQL, the label is not.
        m = re.fullmatch(r"\s*label_values\((.*),\s*\w+\s*\)\s*", text, re.DOTALL)
        exprs.append(m.group(1) if m else text)
    return exprs


def dashboard_metric_names(path: Path) -> set[str]:
    """Metric names the dashboard's queries use, histogram series mapped to their base."""
    names: set[str] = set()
    for expr in dashboard_exprs(path):
        names |= promql_metric_names(expr)
    return names


def rules_metric_names(path: Path) -> set[str]:
    """Metric names used by the `expr` of every rule in a Prometheus rules file."""
    doc = yaml.safe_load(path.read_text())
    names: set[str] = set()
    for group in doc.get("groups", []):
        for rule in group.get("rules", []):
            names |= promql_metric_names(str(rule["expr"]))
    return names
