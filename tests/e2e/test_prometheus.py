"""A real Prometheus scrapes the real daemon; its PromQL answers match the host's os.stat.

Also: every metric name the Grafana dashboard and the alert rules use is one the live
daemon exposes, and the alert rules load and evaluate in a real Prometheus against the
daemon's series (the not-ready and ineffective alerts go pending for the ignore disk).
"""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import libvirt
import pytest

import rig
from e2e.daemon_proc import DaemonProc, sample, scrape, wait_for
from e2e.helpers import MIB, QCOW2_CLUSTER, stat_allocated
from e2e.prom_helpers import PrometheusProc
from rig import DiskSpec, GuestSpec
from support.cli import ROOT
from support.files import free_port, write_config
from unit.promql_names import (
    CONTRACT_METRICS,
    PROMETHEUS_SYNTHETIC,
    dashboard_metric_names,
    normalize_metric_name,
    rules_metric_names,
)

DASHBOARD = ROOT / "config" / "grafana" / "virt-trimd.json"
RULES = ROOT / "config" / "prometheus" / "virt-trimd-rules.yml"
JOB = "virt-trimd"

GUEST = GuestSpec(
    "prom",
    disks=(
        DiskSpec(fmt="qcow2", bus="scsi", discard="unmap", garbage_mib=200),  # sda: reclaims
        DiskSpec(fmt="qcow2", bus="scsi", discard="ignore", garbage_mib=100, size_mib=256),  # sdb
    ),
)


@dataclass
class Trimmed:
    """A daemon that has trimmed GUEST once and run a census since."""

    handle: rig.GuestHandle
    daemon: DaemonProc
    port: int
    before: list[int]  # os.stat allocation per image before the daemon started
    after: list[int]  # ... once its trim had finished

    @property
    def reclaimed(self) -> int:
        return sum(self.before) - sum(self.after)


@pytest.fixture(scope="module")
def trimmed(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Trimmed]:
    workdir = tmp_path_factory.mktemp("prom")
    daemon: DaemonProc | None = None
    try:
        (h,) = rig.start_guests(libvirt_conn, [GUEST], workdir / "guests", rig_boot)
        before = [stat_allocated(p) for p in h.images]
        port = free_port()
        cfg = write_config(
            workdir / "config.yaml",
            f"metrics:\n  listen: 127.0.0.1:{port}\n"
            f"state_dir: {workdir / 'state'}\n"
            "census_interval: 1s\n"
            "shutdown_grace: 3s\n"
            "schedules:\n"
            f"  - name: prom\n    every: 2s\n    domains: [{h.name}]\n    min_interval: 1h\n",
        )
        daemon = DaemonProc(cfg, workdir)
        daemon.wait_ready()
        d = daemon
        wait_for(
            lambda: sample(scrape(port), "virt_trimd_trims_total", domain=h.name, result="success"),
            90,
            "a successful trim by the daemon",
        )
        after = [stat_allocated(p) for p in h.images]

        # A census after the trim: the working disk's reclaimable drops to its few MiB.
        def census_after_trim() -> bool:
            m = scrape(port)
            left = sample(m, "virt_trimd_disk_reclaimable_bytes", domain=h.name, disk="sda")
            return left is not None and left < 64 * MIB

        # The census walks every domain on the host (other sessions' stalled agents too).
        wait_for(census_after_trim, 90, "a census after the trim")
        yield Trimmed(h, d, port, before, after)
    finally:
        try:
            if daemon is not None:
                code = daemon.stop()
                assert code == 0, daemon.log()
        finally:
            rig.destroy_guest(libvirt_conn, GUEST.domain_name)


@pytest.fixture
def prometheus(trimmed: Trimmed, tmp_path: Path) -> Iterator[PrometheusProc]:
    prom = PrometheusProc(
        tmp_path / "prometheus", JOB, [f"127.0.0.1:{trimmed.port}"], rule_files=[RULES]
    )
    try:
        prom.wait_ready()
        yield prom
    finally:
        prom.stop()


def test_promql_through_prometheus_returns_the_os_stat_reclaim(
    trimmed: Trimmed, prometheus: PrometheusProc
) -> None:
    name = trimmed.handle.name
    independent = trimmed.reclaimed
    assert trimmed.before[0] - trimmed.after[0] >= 150 * MIB, (trimmed.before, trimmed.after)
    assert trimmed.before[1] == trimmed.after[1]  # discard='ignore': nothing comes back

    seen: list[float] = []

    def reclaimed_in_prometheus() -> float | None:
        result = prometheus.query(f'sum(virt_trimd_reclaimed_bytes_total{{domain="{name}"}})')
        if not result:
            return None
        seen.append(float(result[0]["value"][1]))
        return seen[-1] if abs(seen[-1] - independent) <= QCOW2_CLUSTER else None

    try:
        got = wait_for(reclaimed_in_prometheus, 60, "the reclaim counter in Prometheus")
    except AssertionError as exc:
        raise AssertionError(
            f"{exc}: os.stat says {independent}, Prometheus said {seen[-3:]}\n{prometheus.log()}"
        ) from exc
    print(f"Prometheus: {got:.0f} bytes reclaimed; os.stat: {independent}")

    (up,) = prometheus.query(f'up{{job="{JOB}"}}')
    assert up["metric"]["instance"] == f"127.0.0.1:{trimmed.port}"
    assert up["value"][1] == "1"
    assert prometheus.query(f'up{{job="{JOB}"}} == 1')

    # The alert rules load and evaluate cleanly against the daemon's real series...
    def rules_evaluated() -> bool:
        rules = prometheus.rules()
        return bool(rules) and all(r["health"] == "ok" for r in rules)

    wait_for(rules_evaluated, 30, "every rule evaluated with health ok")
    assert {r["name"] for r in prometheus.rules()} >= {
        "VirtTrimdDiskNotDiscardReady",
        "VirtTrimdTrimIneffective",
        "VirtTrimdDown",
    }

    # ...and flag exactly the ignore disk (pending: their `for:` is an hour).
    def disk_alerts() -> set[tuple[str, str, str]]:
        return {
            (a["labels"]["alertname"], a["labels"].get("disk", ""), a["state"])
            for a in prometheus.alerts()
            if a["labels"].get("domain") == name
        }

    expected = {
        ("VirtTrimdDiskNotDiscardReady", "sdb", "pending"),
        ("VirtTrimdTrimIneffective", "sdb", "pending"),
    }
    wait_for(lambda: disk_alerts() == expected, 30, f"alerts {expected}")
    (alert,) = [
        a for a in prometheus.alerts() if a["labels"]["alertname"] == "VirtTrimdTrimIneffective"
    ]
    assert alert["labels"]["discard"] == "ignore" and alert["labels"]["bus"] == "scsi"
    assert not [a for a in prometheus.alerts() if a["labels"]["alertname"] == "VirtTrimdDown"]
    assert prometheus.stop() == 0, prometheus.log()


def test_dashboard_and_rules_use_only_metrics_the_daemon_exposes(trimmed: Trimmed) -> None:
    metrics = scrape(trimmed.port)
    sample_names = {name for name, _ in metrics}
    exposed = {normalize_metric_name(n) for n in sample_names}
    # The state is rich enough that every family has samples, histograms in three parts;
    # except the trigger backoff, which needs a guest growth triggers could not help
    # (tests/e2e/test_growth_trigger.py scrapes it from a live daemon), and the storage
    # group's info, which needs a daemon in a group (tests/system/test_fleet.py).
    expected = CONTRACT_METRICS - {
        "virt_trimd_trigger_backoff_until_timestamp_seconds",
        "virt_trimd_storage_group_info",
    }
    assert exposed == expected, (
        f"missing {sorted(expected - exposed)}, extra {sorted(exposed - expected)}"
    )
    exposed |= {"virt_trimd_trigger_backoff_until_timestamp_seconds"}
    for part in ("_bucket", "_sum", "_count"):
        assert "virt_trimd_trim_duration_seconds" + part in sample_names

    dashboard = dashboard_metric_names(DASHBOARD)
    rules = rules_metric_names(RULES)
    assert "virt_trimd_reclaimed_bytes_total" in dashboard and "up" in rules  # extractor works
    assert not dashboard - exposed, f"dashboard uses unexposed {sorted(dashboard - exposed)}"
    assert not rules - exposed - PROMETHEUS_SYNTHETIC, (
        f"rules use unexposed {sorted(rules - exposed - PROMETHEUS_SYNTHETIC)}"
    )


def _dashboard_queries() -> list[tuple[str, str]]:
    """(panel title, expr) of every target of every panel, rows' panels included."""
    doc = json.loads(DASHBOARD.read_text())
    found: list[tuple[str, str]] = []

    def walk(panels: list[dict[str, Any]]) -> None:
        for panel in panels:
            found.extend(
                (str(panel.get("title")), str(t["expr"]))
                for t in panel.get("targets", [])
                if t.get("expr")
            )
            walk(panel.get("panels", []))

    walk(doc["panels"])
    return found


def test_every_dashboard_panel_query_returns_data(
    trimmed: Trimmed, prometheus: PrometheusProc
) -> None:
    """Grafana cannot be installed here, so its panels' PromQL runs against the real
    Prometheus instead, with the variables set as a user picking this host and domain."""
    instance = f"127.0.0.1:{trimmed.port}"
    # increase() and rate() need two samples of each series inside their range.
    wait_for(
        lambda: prometheus.query(
            f'count_over_time(virt_trimd_build_info{{instance="{instance}"}}[5m]) >= 3'
        ),
        60,
        "three scrapes in Prometheus",
    )
    # Grafana puts a regex-escaped value in a PromQL string, so each backslash doubled.
    values = {
        "$instance": re.escape(instance).replace("\\", "\\\\"),
        "$domain": re.escape(trimmed.handle.name).replace("\\", "\\\\"),
        "$__range": "5m",
    }
    queries = _dashboard_queries()
    assert len(queries) >= 20, queries
    # Panels that are empty on a healthy host by design, each shown with data elsewhere:
    # a backoff needs a guest growth triggers could not help (test_growth_trigger.py).
    empty_when_healthy = {"Growth triggers backing off"}
    assert empty_when_healthy <= {title for title, _ in queries}
    empty = []
    for title, template in queries:
        if title in empty_when_healthy:
            continue
        expr = template
        for var, value in values.items():
            expr = expr.replace(var, value)
        assert "$" not in expr, f"{title}: unknown variable in {expr}"
        if not prometheus.query(expr):
            empty.append(f"{title}: {expr}")
    assert not empty, "panels without data:\n" + "\n".join(empty)
    # The variables' own queries (label_values) find this host and the domain.
    assert prometheus.query(f'virt_trimd_build_info{{instance="{instance}"}}')
    assert prometheus.query(
        f'virt_trimd_trims_total{{instance="{instance}", domain="{trimmed.handle.name}"}}'
    )
