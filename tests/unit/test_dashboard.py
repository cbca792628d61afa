"""The Grafana dashboard: importable JSON, variables, data sources, metric names in the contract."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from unit.promql_names import (
    CONTRACT_METRICS,
    dashboard_exprs,
    dashboard_metric_names,
    promql_metric_names,
)

DASHBOARD = Path(__file__).resolve().parents[2] / "config" / "grafana" / "virt-trimd.json"
DS_REF = "${datasource}"

__all__ = ["dashboard_metric_names"]  # re-exported for the end-to-end /metrics comparison


@pytest.fixture(scope="module")
def board() -> dict[str, Any]:
    data: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return data


def _panels(board: dict[str, Any]) -> list[dict[str, Any]]:
    out: list[dict[str, Any]] = []
    for panel in board["panels"]:
        out.append(panel)
        out.extend(panel.get("panels", []))
    return out


def _variables(board: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {v["name"]: v for v in board["templating"]["list"]}


def test_dashboard_is_importable_shape(board: dict[str, Any]) -> None:
    assert 36 <= board["schemaVersion"] <= 41
    assert board["uid"] == "virt-trimd" and board["title"]
    assert board["id"] is None  # Grafana assigns ids on import
    ids = [p["id"] for p in _panels(board)]
    assert len(ids) == len(set(ids)), "panel ids must be unique"
    for panel in _panels(board):
        pos = panel["gridPos"]
        assert pos["x"] >= 0 and pos["x"] + pos["w"] <= 24, panel["title"]
        assert pos["h"] > 0


def test_variables(board: dict[str, Any]) -> None:
    variables = _variables(board)
    ds = variables["datasource"]
    assert (ds["type"], ds["query"]) == ("datasource", "prometheus")

    instance = variables["instance"]
    assert instance["type"] == "query"
    assert instance["query"]["query"] == "label_values(virt_trimd_build_info, instance)"
    assert instance["multi"] and instance["includeAll"]
    assert instance["datasource"]["uid"] == DS_REF

    domain = variables["domain"]
    assert domain["query"]["query"] == (
        'label_values(virt_trimd_trims_total{instance=~"$instance"}, domain)'
    )
    assert domain["multi"] and domain["includeAll"]
    assert domain["datasource"]["uid"] == DS_REF


def test_every_panel_and_target_uses_the_datasource_variable(board: dict[str, Any]) -> None:
    panels = _panels(board)
    assert panels
    for panel in panels:
        assert panel["datasource"] == {"type": "prometheus", "uid": DS_REF}, panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == DS_REF, panel["title"]
            assert target["expr"].strip(), panel["title"]


def test_panels_honour_the_host_and_domain_filters(board: dict[str, Any]) -> None:
    for panel in _panels(board):
        for target in panel["targets"]:
            expr = target["expr"]
            assert 'instance=~"$instance"' in expr, (panel["title"], expr)
            if promql_metric_names(expr) - _NO_DOMAIN_LABEL:
                assert 'domain=~"$domain"' in expr, (panel["title"], expr)


# Series without a domain label: the domain variable cannot filter them.
_NO_DOMAIN_LABEL = frozenset(
    {
        "virt_trimd_trim_duration_seconds",
        "virt_trimd_next_run_timestamp_seconds",
        "virt_trimd_last_sweep_timestamp_seconds",
        "virt_trimd_sweep_reclaimed_bytes",
        "virt_trimd_libvirt_up",
        "virt_trimd_config_last_reload_successful",
        "virt_trimd_config_last_reload_success_timestamp_seconds",
        "virt_trimd_history_write_ok",
        "virt_trimd_history_write_errors_total",
        "virt_trimd_build_info",
    }
)


def test_required_panels_are_there(board: dict[str, Any]) -> None:
    exprs = "\n".join(dashboard_exprs(DASHBOARD))
    for needle in (
        "sum by (instance, domain) (increase(virt_trimd_reclaimed_bytes_total",
        "virt_trimd_disk_allocated_bytes{",
        "virt_trimd_disk_virtual_bytes{",
        "virt_trimd_disk_reclaimable_bytes{",
        "sum by (result) (increase(virt_trimd_trims_total",
        "time() - virt_trimd_last_success_timestamp_seconds",
        "virt_trimd_disk_trim_effective{",
        "virt_trimd_disk_discard_ready{",
        "histogram_quantile(0.9,",
        "virt_trimd_libvirt_up{",
        "virt_trimd_next_run_timestamp_seconds{",
    ):
        assert needle in exprs, needle
    table = next(p for p in _panels(board) if "does not reach" in p["title"])
    for target in table["targets"]:
        assert "virt_trimd_disk_info" in target["expr"]  # path/bus/discard come from the join


def test_dashboard_metric_names_are_in_the_contract() -> None:
    names = dashboard_metric_names(DASHBOARD)
    assert names - CONTRACT_METRICS == set()
    # The histogram's series are reported by their base name.
    assert "virt_trimd_trim_duration_seconds" in names
    assert not any(n.endswith(("_bucket", "_sum", "_count")) for n in names)
    # Sanity: the extractor finds the bulk of the contract, not an empty set.
    assert len(names) >= 18


@pytest.mark.parametrize(
    ("expr", "expected"),
    [
        ("up", {"up"}),
        ('absent(up{job="virt-trimd"})', {"up"}),
        (
            'sum by (instance, domain) (increase(virt_trimd_reclaimed_bytes_total{domain=~"a|b"}'
            "[$__range]))",
            {"virt_trimd_reclaimed_bytes_total"},
        ),
        (
            "histogram_quantile(0.99, sum by (le) (rate(virt_trimd_trim_duration_seconds_bucket"
            "[5m])))",
            {"virt_trimd_trim_duration_seconds"},
        ),
        (
            'label_replace(a_info and on (instance, disk) group_left (path) (b == bool 0), "x",'
            ' "y rate(z)", "", "")',
            {"a_info", "b"},
        ),
        ("time() - c offset 1d > 1e6 unless d", {"c", "d"}),
        ("max_over_time(e[1h:5m]) or vector(0)", {"e"}),
        ('{__name__="not_counted"}', set()),
    ],
)
def test_promql_metric_names(expr: str, expected: set[str]) -> None:
    assert promql_metric_names(expr) == expected
