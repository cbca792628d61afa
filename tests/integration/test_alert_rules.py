"""Alert rules and dashboard queries, checked by the real promtool.

promtool comes with Debian's `prometheus` package. These tests fail (not skip) without
it: rules that were never parsed are not known to work.
"""

from __future__ import annotations

import json
import re
import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from unit.promql_names import (
    CONTRACT_METRICS,
    PROMETHEUS_SYNTHETIC,
    dashboard_exprs,
    rules_metric_names,
)

ROOT = Path(__file__).resolve().parents[2]
RULES = ROOT / "config" / "prometheus" / "virt-trimd-rules.yml"
RULE_TESTS = ROOT / "config" / "prometheus" / "virt-trimd-rules.test.yml"
DASHBOARD = ROOT / "config" / "grafana" / "virt-trimd.json"

EXPECTED_ALERTS = {
    "VirtTrimdTrimFailing",
    "VirtTrimdNoSuccessfulTrim",
    "VirtTrimdDiskNotDiscardReady",
    "VirtTrimdTrimIneffective",
    "VirtTrimdTriggerBackoff",
    "VirtTrimdLibvirtDown",
    "VirtTrimdConfigReloadFailed",
    "VirtTrimdHistoryNotWritable",
    "VirtTrimdDown",
}


def _promtool() -> str:
    path = shutil.which("promtool")
    if path is None:
        pytest.fail("promtool not found: install it with `apt-get install prometheus`")
    return path


def _run(cmd: list[str], cwd: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(cmd, cwd=cwd, capture_output=True, text=True, timeout=120, check=False)


def test_promtool_check_rules() -> None:
    promtool = _promtool()
    proc = _run([promtool, "check", "rules", str(RULES)], RULES.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert f"SUCCESS: {len(EXPECTED_ALERTS)} rules found" in proc.stdout


def test_promtool_test_rules() -> None:
    promtool = _promtool()
    proc = _run([promtool, "test", "rules", RULE_TESTS.name], RULE_TESTS.parent)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "SUCCESS" in proc.stdout


def test_rules_shape() -> None:
    doc = yaml.safe_load(RULES.read_text())
    (group,) = doc["groups"]
    assert group["name"] == "virt-trimd"
    rules = {r["alert"]: r for r in group["rules"]}
    assert set(rules) == EXPECTED_ALERTS
    for name, rule in rules.items():
        assert "for" in rule, name
        assert rule["labels"]["severity"] in {"info", "warning", "critical"}, name
        assert rule["annotations"]["summary"].strip(), name
        assert "$labels" in rule["annotations"]["description"], name


def test_every_alert_is_tested_firing_and_not_firing() -> None:
    doc = yaml.safe_load(RULE_TESTS.read_text())
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in doc["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == EXPECTED_ALERTS
    assert quiet == EXPECTED_ALERTS


def test_rule_metric_names_are_in_the_contract() -> None:
    names = rules_metric_names(RULES)
    assert names - CONTRACT_METRICS - PROMETHEUS_SYNTHETIC == set()
    assert "up" in names and "virt_trimd_trims_total" in names


def test_dashboard_queries_parse(tmp_path: Path) -> None:
    """Grafana variables substituted, every dashboard query must be valid PromQL."""
    promtool = _promtool()
    substitutions = {
        "$__rate_interval": "5m",
        "$__interval": "1m",
        "$__range": "1d",
        "$instance": ".*",
        "$domain": ".*",
    }
    rules = []
    for i, query in enumerate(dashboard_exprs(DASHBOARD)):
        expr = query
        for var, value in substitutions.items():
            expr = expr.replace(var, value)
        assert not re.search(r"\$\w", expr), f"unsubstituted variable in {expr}"
        rules.append({"record": f"dashboard:query_{i}", "expr": expr})
    assert len(rules) > 10
    path = tmp_path / "dashboard-queries.yml"
    path.write_text(json.dumps({"groups": [{"name": "dashboard", "rules": rules}]}))
    proc = _run([promtool, "check", "rules", str(path)], tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
