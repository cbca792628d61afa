"""A fleet of two hosts: the Ansible role rolls virt-trimd out to booted Debian 12 and
13 containers, reconfigures them, survives a bad variable; each daemon trims its own
guest inside its share of one storage group; a real Prometheus sums the fleet.

The two containers, their guests and the daemons are booted once for the module and
carry the steps in order, as a real rollout would (and to stay inside CI's time).
Figures are checked against what the product did not compute: the test's own os.stat
of each image, systemd's unit properties, ansible-playbook's own recap, and the
shares computed here from the inventory the test wrote.
"""

from __future__ import annotations

import base64
import datetime as dt
import json
import os
import re
import urllib.error
import urllib.request
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import libvirt
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rig
from e2e.prom_helpers import PrometheusProc
from support.files import free_port
from system.ansible_run import PlayResult, run_playbook, write_inventory
from system.conftest import Debs
from system.debhost import DebianHost, add_libvirt_group, booted, wait_until
from unit.promql_names import dashboard_exprs
from virt_trimd.config.model import StorageGroupConfig
from virt_trimd.engine.storage_group import members_digest, slot_of

# The first run installs python3, python3-apt and the .deb's dependencies from the
# mirror on two hosts at once, as test_package's apt steps do.
pytestmark = pytest.mark.timeout(900)

CLUSTER = 64 * 1024
UNIT = "virt-trimd.service"
CONFIG = "/etc/virt-trimd/config.yaml"
HISTORY = "/var/lib/virt-trimd/history.sqlite3"
GROUP = "shared_storage"
SUITES = ("bookworm", "trixie")
# Every minute, guests spread over 50 s of it: two members with at_once 1 get 25 s each.
TRIM_CRON = "* * * * *"
WINDOW_SECONDS = 50
ROOT = Path(__file__).resolve().parents[2]
FLEET_RULES = ROOT / "config" / "prometheus" / "virt-trimd-fleet-rules.yml"
DASHBOARD = ROOT / "config" / "grafana" / "virt-trimd.json"


@dataclass
class Member:
    """One host of the fleet: its container, its guest, its metrics port."""

    host: DebianHost
    guest: rig.GuestHandle
    port: int
    schedule: dict[str, Any]
    allocated_before: int = 0
    extra_vars: dict[str, Any] = field(default_factory=dict)

    @property
    def name(self) -> str:
        return self.host.name

    def get(self, auth: tuple[str, str] | None = None) -> tuple[int, str]:
        """GET /metrics, optionally with basic auth: (HTTP status, body)."""
        request = urllib.request.Request(f"http://127.0.0.1:{self.port}/metrics")
        if auth is not None:
            token = base64.b64encode(f"{auth[0]}:{auth[1]}".encode()).decode()
            request.add_header("Authorization", f"Basic {token}")
        try:
            with urllib.request.urlopen(request, timeout=10) as response:
                return response.status, response.read().decode()
        except urllib.error.HTTPError as exc:
            return exc.code, ""

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        status, text = self.get()
        assert status == 200, status
        return {
            (s.name, tuple(sorted(s.labels.items()))): s.value
            for fam in text_string_to_metric_families(text)
            for s in fam.samples
        }

    def metric(self, name: str, **labels: str) -> float | None:
        return self.scrape().get((name, tuple(sorted(labels.items()))))

    def trims(self) -> list[dict[str, Any]]:
        """The successful trims in the daemon's history: start and duration."""
        out = self.host.run(
            "python3",
            "-c",
            "import json,sqlite3,sys; c=sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True);"
            "print(json.dumps([dict(zip(('domain','started_ts','duration','reclaimed'), r)) "
            'for r in c.execute("SELECT domain, started_ts, duration_seconds, reclaimed_bytes'
            " FROM trims WHERE result='success' ORDER BY started_ts\")]))",
            HISTORY,
        ).stdout
        rows: list[dict[str, Any]] = json.loads(out)
        return rows


@dataclass
class Fleet:
    """What the steps share: the members, the inventory, the debs, earlier results."""

    members: list[Member]
    inventory: Path
    workdir: Path
    debs: Debs
    notes: dict[str, Any] = field(default_factory=dict)

    def write_inventory(self) -> None:
        """The inventory: group variables, and each member's port, schedule and extras."""
        host_vars = {
            m.name: {
                "virt_trimd_metrics_listen": f"127.0.0.1:{m.port}",
                "virt_trimd_schedules": [m.schedule],
                **m.extra_vars,
            }
            for m in self.members
        }
        group_vars = {
            "virt_trimd_deb": str(self.debs.current),
            "virt_trimd_storage_group": GROUP,
            "virt_trimd_storage_group_at_once": 1,
            "virt_trimd_settings": {"census_interval": "5m"},
        }
        write_inventory(
            self.inventory, [m.host for m in self.members], group_vars, host_vars, GROUP
        )

    def play(self) -> PlayResult:
        self.write_inventory()
        return run_playbook(self.inventory, self.workdir)

    def group(self) -> StorageGroupConfig:
        """The storage group as the role renders it, computed here from the inventory."""
        return StorageGroupConfig(GROUP, tuple(sorted(m.name for m in self.members)), None, 1)


def _schedule(guest: str, cron: str = "0 3 * * 0", window: str = "1h") -> dict[str, Any]:
    return {
        "name": "fleet",
        "cron": cron,
        "window": window,
        "domains": [guest],
        "timeout": "2m",
        "min_interval": "1h",
    }


@pytest.fixture(scope="module")
def fleet(
    debs: Debs,
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    image_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Fleet]:
    """Two booted hosts (Debian 12 and 13), each with a rig guest holding 200 MiB of garbage."""
    specs = [
        rig.GuestSpec(f"fleet-{suite}", disks=(rig.DiskSpec(fmt="qcow2", garbage_mib=200),))
        for suite in SUITES
    ]
    for spec in specs:
        rig.destroy_guest(libvirt_conn, spec.domain_name)
    workdir = tmp_path_factory.mktemp("fleet")
    try:
        guests = rig.start_guests(libvirt_conn, specs, image_root / "fleet", rig_boot)
        names = [f"vtrimd-test-fleet{i}-{os.getpid()}" for i in range(2)]
        with (
            booted(SUITES[0], workdir / "h0", [image_root], names[0]) as h0,
            booted(SUITES[1], workdir / "h1", [image_root], names[1]) as h1,
        ):
            members = []
            for host, guest in zip((h0, h1), guests, strict=True):
                add_libvirt_group(host)
                members.append(Member(host, guest, free_port(), _schedule(guest.name)))
            yield Fleet(members, workdir / "inventory.yml", workdir, debs)
    finally:
        for spec in specs:
            rig.destroy_guest(libvirt_conn, spec.domain_name)


def _assert_ok(result: PlayResult, *hosts: str) -> None:
    assert result.returncode == 0, result.output[-6000:]
    assert set(result.recap) == set(hosts), result.recap
    assert all(r["failed"] == 0 and r["unreachable"] == 0 for r in result.recap.values())


def test_first_run_installs_and_starts_both(fleet: Fleet) -> None:
    result = fleet.play()
    names = [m.name for m in fleet.members]
    _assert_ok(result, *names)
    for member in fleet.members:
        host = member.host
        assert result.changed(member.name) > 0
        version = host.run("virt-trimd", "--version").stdout.strip()
        assert version == f"virt-trimd {fleet.debs.version}"
        assert host.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
        host.wait_active(UNIT)
        # The package did not start the daemon on the shipped 127.0.0.1:9742 (two hosts
        # on one network would collide there): it only ever ran the rendered file.
        assert host.unit(UNIT)["NRestarts"] == "0"
        journal = host.journal_text(UNIT)
        assert not re.search(r"[^0-9]9742\b", journal), journal
        assert "Address already in use" not in journal, journal
        # The daemon serves the port the inventory gave it (read at start: the role
        # restarted it after installing).
        wait_until(
            f"{member.name} on port {member.port}",
            lambda m=member: m.metric("virt_trimd_next_run_timestamp_seconds", schedule="fleet"),
            60,
        )
        slot = slot_of(fleet.group(), member.name)
        assert slot is not None
        shown = host.run("virt-trimd", "check-config", "--config", CONFIG).stdout
        assert f"{member.name}: share {slot.index + 1} of 2" in shown, shown
        digest = members_digest(fleet.group().members)
        assert f"(members {digest})" in shown, shown
        labels = {"group": GROUP, "members": digest, "share": str(slot.index + 1)}
        info = member.metric("virt_trimd_storage_group_info", **labels, shares="2", at_once="1")
        assert info == 1, member.scrape()
    fleet.notes["pids"] = {m.name: m.host.unit(UNIT)["MainPID"] for m in fleet.members}


def test_second_run_changes_nothing(fleet: Fleet) -> None:
    result = fleet.play()
    _assert_ok(result, *(m.name for m in fleet.members))
    assert {m.name: result.changed(m.name) for m in fleet.members} == {
        m.name: 0 for m in fleet.members
    }, result.output[-4000:]
    assert {m.name: m.host.unit(UNIT)["MainPID"] for m in fleet.members} == fleet.notes["pids"]


def test_changed_variable_reloads_and_each_host_trims_its_own_guest_in_its_share(
    fleet: Fleet,
) -> None:
    """A new schedule is rendered, validated and reloaded (same PID); each daemon then
    trims its own guest, its counter equals the test's os.stat delta, and the two
    hosts' trims start inside their own shares and never overlap (at_once 1)."""
    for member in fleet.members:
        member.allocated_before = rig.allocated_bytes(member.guest.images[0])
        member.schedule = _schedule(member.guest.name, TRIM_CRON, f"{WINDOW_SECONDS}s")
    result = fleet.play()
    _assert_ok(result, *(m.name for m in fleet.members))
    assert "RUNNING HANDLER [virt_trimd : Reload virt-trimd]" in result.output
    assert "RUNNING HANDLER [virt_trimd : Restart virt-trimd]" not in result.output
    for member in fleet.members:
        assert result.changed(member.name) == 2, result.output[-4000:]  # file + reload
        assert member.host.unit(UNIT)["MainPID"] == fleet.notes["pids"][member.name]
        assert TRIM_CRON in member.host.fs.joinpath(CONFIG.lstrip("/")).read_text()

    deltas: dict[str, int] = {}
    for member in fleet.members:
        key = {"domain": member.guest.name, "disk": "sda"}
        counter = wait_until(
            f"the trim of {member.guest.name}",
            lambda m=member, k=key: m.metric("virt_trimd_reclaimed_bytes_total", **k) or None,
            240,
            interval_s=1,
        )
        after = rig.allocated_bytes(member.guest.images[0])
        delta = member.allocated_before - after
        assert delta > 150 * 1024 * 1024, (member.name, member.allocated_before, after)
        assert abs(float(counter) - delta) <= CLUSTER, (member.name, counter, delta)  # type: ignore[arg-type]
        deltas[member.name] = delta
    fleet.notes["deltas"] = deltas

    # The shares, computed here from the inventory, against the daemons' own history.
    spans = []
    for member in fleet.members:
        slot = slot_of(fleet.group(), member.name)
        assert slot is not None
        share_start, share_length = slot.seconds(WINDOW_SECONDS)
        (trim,) = member.trims()
        started = dt.datetime.fromtimestamp(trim["started_ts"])
        into_minute = started.second + started.microsecond / 1e6
        # One guest per host: it is placed at its share's start; listing the domains
        # and pinging the agent come before the trim's recorded start.
        assert share_start <= into_minute < share_start + share_length, (
            member.name,
            into_minute,
            share_start,
            share_length,
        )
        spans.append((trim["started_ts"], trim["started_ts"] + trim["duration"]))
    (_, first_end), (second_start, _) = sorted(spans)
    assert first_end <= second_start, spans  # at_once 1: never two trims on the storage at once


def test_prometheus_sums_the_fleet(fleet: Fleet, tmp_path: Path) -> None:
    """The real Prometheus scrapes both daemons; the fleet recording rule's total is
    the sum of the test's own os.stat deltas."""
    targets = [f"127.0.0.1:{m.port}" for m in fleet.members]
    prom = PrometheusProc(tmp_path / "prom", "virt-trimd", targets, [FLEET_RULES])
    try:
        prom.wait_ready()

        def fleet_total() -> float | None:
            """The recorded total, once it covers both hosts (rules lag scrapes a cycle)."""
            hosts = prom.query("count(count by (instance) (virt_trimd_reclaimed_bytes_total))")
            recorded = prom.query('job:virt_trimd_reclaimed_bytes_total:sum{job="virt-trimd"}')
            raw = prom.query('sum(virt_trimd_reclaimed_bytes_total{job="virt-trimd"})')
            if not (hosts and recorded and raw) or float(hosts[0]["value"][1]) != 2:
                return None
            value = float(recorded[0]["value"][1])
            return value if value == float(raw[0]["value"][1]) else None

        total = wait_until("the fleet total over both hosts", fleet_total, 60)
        expected = sum(fleet.notes["deltas"].values())
        assert abs(float(total) - expected) <= 2 * CLUSTER, (total, expected)  # type: ignore[arg-type]
        per_host = {
            r["metric"]["instance"]: float(r["value"][1])
            for r in prom.query("instance:virt_trimd_disks_not_ready:count")
        }
        assert per_host == dict.fromkeys(targets, 0.0), per_host
        up = prom.query('count(up{job="virt-trimd"} == 1)')
        assert float(up[0]["value"][1]) == 2
        # The dashboard over many hosts: its instance variable lists both, and every
        # panel's query, with both picked, is valid PromQL that the real server runs.
        hosts = {
            r["metric"]["instance"]
            for r in prom.query("count by (instance) (virt_trimd_build_info)")
        }
        assert hosts == set(targets)
        picked = {"$instance": "|".join(targets), "$domain": ".*",
                  "$__range": "1h"}  # fmt: skip
        for template in dashboard_exprs(DASHBOARD):
            expr = template
            for variable, value in picked.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, expr
            prom.query(expr)
        reachable = prom.query(
            'min by (instance) (virt_trimd_libvirt_up{instance=~"' + picked["$instance"] + '"})'
        )
        assert {r["metric"]["instance"] for r in reachable} == set(targets)
        # The members agree: one member-list digest, two distinct shares.
        shares = prom.query("count by (members, share) (virt_trimd_storage_group_info)")
        assert sorted(r["metric"]["share"] for r in shares) == ["1", "2"], shares
        assert {r["metric"]["members"] for r in shares} == {members_digest(fleet.group().members)}
    finally:
        prom.stop()


def test_invalid_variable_fails_at_validation_and_the_service_keeps_its_schedules(
    fleet: Fleet,
) -> None:
    bad, good = fleet.members
    config_before = bad.host.fs.joinpath(CONFIG.lstrip("/")).read_bytes()
    bad.schedule = {**bad.schedule, "concurrency": "many"}
    result = fleet.play()
    assert result.returncode != 0
    assert result.recap[bad.name]["failed"] == 1
    assert result.recap[good.name] == {**result.recap[good.name], "failed": 0, "changed": 0}
    # check-config's message, with the rendered file's line, in the play's output.
    assert re.search(r":\d+: schedules\[0\]\.concurrency: expected an integer", result.output), (
        result.output[-4000:]
    )
    assert bad.host.fs.joinpath(CONFIG.lstrip("/")).read_bytes() == config_before
    props = bad.host.unit(UNIT)
    assert (props["ActiveState"], props["SubState"]) == ("active", "running")
    assert props["MainPID"] == fleet.notes["pids"][bad.name]
    assert bad.metric("virt_trimd_next_run_timestamp_seconds", schedule="fleet") is not None
    assert bad.metric("virt_trimd_config_last_reload_successful") == 1


def test_web_config_turns_on_basic_auth_and_a_rerun_changes_nothing(fleet: Fleet) -> None:
    """virt_trimd_web_config writes the web config (root:virt-trimd 0640), points
    metrics.web_config_file at it and restarts: /metrics then wants the password."""
    import bcrypt

    bad, good = fleet.members
    bad.schedule = {k: v for k, v in bad.schedule.items() if k != "concurrency"}
    password = "fleet-secret"
    hashed = bcrypt.hashpw(password.encode(), bcrypt.gensalt(rounds=4)).decode()
    good.extra_vars = {"virt_trimd_web_config": {"basic_auth_users": {"prometheus": hashed}}}
    result = fleet.play()
    _assert_ok(result, bad.name, good.name)
    assert "RUNNING HANDLER [virt_trimd : Restart virt-trimd]" in result.output
    assert result.changed(bad.name) == 0  # its file is what it was before the bad run
    good.host.wait_active(UNIT)
    wait_until("basic auth on /metrics", lambda: good.get()[0] == 401 or None, 60)
    status, body = good.get(("prometheus", password))
    assert status == 200 and "virt_trimd_build_info" in body
    assert good.get(("prometheus", "wrong"))[0] == 401
    mode = good.host.run("stat", "-c", "%U:%G %a", "/etc/virt-trimd/web-config.yml").stdout
    assert mode.strip() == "root:virt-trimd 640"
    assert fleet.play().changed(good.name) == 0
