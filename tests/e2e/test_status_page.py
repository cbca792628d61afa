"""`status`, /api/v1/status and the status page against real guests, seen in Chromium.

Totals are checked against the test's own os.stat of the images; growth against the
census figures the test measured itself. The screenshot is kept in test-artefacts/.
"""

from __future__ import annotations

import json
import re
import shutil
import urllib.request
from pathlib import Path
from typing import Any

import libvirt

import rig
from e2e.daemon_proc import DaemonProc, wait_for
from e2e.helpers import MIB, QCOW2_CLUSTER, booted_guests, stat_allocated
from rig import DiskSpec, GuestSpec
from support.browser import distinct_colours, rendered_dom, screenshot
from support.cli import virt_trimd
from support.files import free_port, write_config
from virt_trimd.units import format_bytes

ARTEFACTS = Path(__file__).resolve().parents[2] / "test-artefacts"
A = GuestSpec("status-a", disks=(DiskSpec(fmt="qcow2", bus="scsi", garbage_mib=200),))
B = GuestSpec("status-b", disks=(DiskSpec(fmt="raw", bus="virtio", garbage_mib=150),))
GROW_MIB = 64


def status_json(config: Path) -> tuple[int, dict[str, Any]]:
    proc = virt_trimd("status", "--config", str(config), "--json")
    assert proc.stdout, proc.stderr
    doc: dict[str, Any] = json.loads(proc.stdout)
    return proc.returncode, doc


def api(port: int) -> dict[str, Any]:
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/api/v1/status", timeout=10) as r:
        doc: dict[str, Any] = json.loads(r.read())
        return doc


def by_domain(doc: dict[str, Any]) -> dict[str, dict[str, Any]]:
    return {d["domain"]: d for d in doc["domains"]}


def test_status_page_and_cli_against_real_guests(
    libvirt_conn: libvirt.virConnect, rig_boot: rig.BootFiles, tmp_path: Path
) -> None:
    port = free_port()
    config = write_config(
        tmp_path / "config.yaml",
        f"state_dir: {tmp_path / 'state'}\n"
        f"metrics:\n  listen: 127.0.0.1:{port}\n"
        "census_interval: 5m\n"
        "schedules:\n"
        "  - name: nightly\n"
        "    cron: '0 3 * * *'\n"
        f"    domains: ['{rig.session_prefix()}status-*']\n",
    )
    with booted_guests(libvirt_conn, rig_boot, tmp_path / "guests", [A, B]) as guests:
        a, b = guests["status-a"], guests["status-b"]
        images = {a.name: a.images[0], b.name: b.images[0]}
        before = {name: stat_allocated(p) for name, p in images.items()}
        once = virt_trimd("run", "--once", "--config", str(config), "--json")
        assert once.returncode == 0, once.stderr
        after = {name: stat_allocated(p) for name, p in images.items()}
        reclaimed = {name: before[name] - after[name] for name in images}
        assert reclaimed[a.name] >= 150 * MIB and reclaimed[b.name] >= 100 * MIB, reclaimed

        # The daemon is down: status reads the history alone and says the data is fresh.
        code, doc = status_json(config)
        doms = by_domain(doc)
        assert code == 0, doc
        for name in images:
            assert abs(doms[name]["reclaimed_1d_bytes"] - reclaimed[name]) <= QCOW2_CLUSTER
            assert abs(doms[name]["allocated_bytes"] - after[name]) <= QCOW2_CLUSTER
            assert doms[name]["state"] == "running" and doms[name]["ready"] is True
            assert doms[name]["last_trim"]["result"] == "success"
            assert doms[name]["next_schedule"] == "nightly" and doms[name]["next_run_at"]
        total = doc["totals"]["reclaimed_1d_bytes"]
        assert abs(total - sum(reclaimed.values())) <= 2 * QCOW2_CLUSTER
        assert doc["totals"]["reclaimed_30d_bytes"] == total
        assert doc["stale"] is False and doc["data_age_seconds"] < 600

        # The guest writes; the daemon's first census (at start) measures the growth.
        rig.guest_exec(
            a.dom,
            [
                "/bin/sh",
                "-c",
                f"for m in /mnt/*; do dd if=/dev/urandom of=$m/grow.bin bs=1M"
                f" count={GROW_MIB} 2>/dev/null; done; sync",
            ],
        )
        grown = stat_allocated(images[a.name])
        assert grown - after[a.name] >= (GROW_MIB - 4) * MIB
        first_census = doc["data_as_of"]
        daemon = DaemonProc(config, tmp_path)
        try:
            daemon.wait_ready()
            live = wait_for(
                lambda: (d := api(port))["data_as_of"] != first_census and d,
                120,
                "the daemon's first census",
            )
            doms = by_domain(live)
            growth = doms[a.name]["growth_7d_bytes"]
            assert abs(growth - (grown - after[a.name])) <= QCOW2_CLUSTER, (growth, grown)
            assert abs(doms[b.name]["growth_7d_bytes"]) <= QCOW2_CLUSTER
            assert abs(doms[a.name]["allocated_bytes"] - grown) <= QCOW2_CLUSTER
            # The page's API and the CLI agree on what the history holds.
            _, cli = status_json(config)
            for name in images:
                assert (
                    by_domain(cli)[name]["reclaimed_1d_bytes"] == doms[name]["reclaimed_1d_bytes"]
                )
                assert by_domain(cli)[name]["growth_7d_bytes"] == growth or name != a.name

            url = f"http://127.0.0.1:{port}/"
            png = screenshot(url, tmp_path / "status-page.png")
            ARTEFACTS.mkdir(exist_ok=True)
            shutil.copy(png, ARTEFACTS / "status-page.png")
            assert distinct_colours(png) >= 8, "the screenshot is blank"
            dom = rendered_dom(url)
            for name in images:
                assert name in dom
            assert format_bytes(live["totals"]["reclaimed_1d_bytes"]) in dom
            chart = re.search(r'<svg id="reclaim-chart".*?</svg>', dom, re.S)
            assert chart, "no reclaim chart in the rendered page"
            heights = [
                float(h) for h in re.findall(r'<rect[^>]* height="([0-9.]+)"', chart.group(0))
            ]
            assert len(heights) == 30 and max(heights) > 0, "the reclaim chart is empty"
            assert dom.count('class="disk-chart"') >= 2
        finally:
            assert daemon.stop() == 0, daemon.log()
