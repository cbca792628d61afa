"""Fleet recording rules, checked by the real promtool (Debian's `prometheus` package)."""

from __future__ import annotations

import yaml

from integration.test_alert_rules import ROOT, _promtool, _run
from unit.promql_names import CONTRACT_METRICS, PROMETHEUS_SYNTHETIC, rules_metric_names

FLEET_RULES = ROOT / "config" / "prometheus" / "virt-trimd-fleet-rules.yml"
FLEET_TESTS = ROOT / "config" / "prometheus" / "virt-trimd-fleet-rules.test.yml"


def _rules() -> list[dict[str, str]]:
    (group,) = yaml.safe_load(FLEET_RULES.read_text())["groups"]
    assert group["name"] == "virt-trimd-fleet"
    rules: list[dict[str, str]] = group["rules"]
    return rules


def _records() -> dict[str, str]:
    return {r["record"]: r["expr"] for r in _rules() if "record" in r}


def test_promtool_checks_and_tests_the_fleet_rules() -> None:
    promtool = _promtool()
    check = _run([promtool, "check", "rules", str(FLEET_RULES)], FLEET_RULES.parent)
    assert check.returncode == 0, check.stdout + check.stderr
    tested = _run([promtool, "test", "rules", FLEET_TESTS.name], FLEET_TESTS.parent)
    assert tested.returncode == 0 and "SUCCESS" in tested.stdout, tested.stdout + tested.stderr


def test_every_record_is_tested_and_named_by_its_level() -> None:
    records = _records()
    tests = yaml.safe_load(FLEET_TESTS.read_text())["tests"]
    tested = {check["expr"] for case in tests for check in case.get("promql_expr_test", [])}
    assert tested == set(records)
    for name, expr in records.items():
        level = name.split(":", 1)[0]
        assert level in {"instance", "job"}, name
        # A job-level record must not keep per-host labels; an instance-level one must.
        assert "by (job, instance)" in expr if level == "instance" else "by (job)" in expr


def test_fleet_rules_use_only_contract_metrics() -> None:
    names = rules_metric_names(FLEET_RULES) - set(_records())
    assert names - CONTRACT_METRICS - PROMETHEUS_SYNTHETIC == set()


def test_every_fleet_alert_is_tested_firing_and_not_firing() -> None:
    alerts = {r["alert"] for r in _rules() if "alert" in r}
    assert alerts == {"VirtTrimdStorageGroupDisagrees", "VirtTrimdStorageGroupShareClaimedTwice"}
    firing: set[str] = set()
    quiet: set[str] = set()
    for case in yaml.safe_load(FLEET_TESTS.read_text())["tests"]:
        for check in case.get("alert_rule_test", []):
            (firing if check.get("exp_alerts") else quiet).add(check["alertname"])
    assert firing == quiet == alerts
