"""Growth triggers on the real rig: a guest that fills up between censuses is trimmed at the
next census, with no schedule time at all; a guest whose discards never reach the host is
trimmed once and then left alone (backoff), not at every census."""

from __future__ import annotations

import json
import signal
import time
from pathlib import Path

import libvirt

import rig
from e2e.daemon_proc import DaemonProc, sample, scrape, wait_for
from e2e.helpers import MIB, QCOW2_CLUSTER, booted_guests, stat_allocated
from rig import DiskSpec, GuestSpec
from support.cli import virt_trimd
from support.files import free_port, write_config

READY = GuestSpec("gr-ready", disks=(DiskSpec(fmt="qcow2", garbage_mib=0, size_mib=512),))
NOT_READY = GuestSpec(
    "gr-notready", disks=(DiskSpec(fmt="qcow2", discard="ignore", garbage_mib=0, size_mib=512),)
)
JUNK_MIB = 96
CENSUS_SECONDS = 3


def _write_and_delete_junk(dom: libvirt.virDomain) -> None:
    """Garbage the guest writes, syncs and deletes; its mount has no discard."""
    rig.guest_exec(
        dom,
        [
            "/bin/sh",
            "-c",
            f"dd if=/dev/urandom of=/mnt/sda/junk bs=1M count={JUNK_MIB} 2>/dev/null; sync;"
            " rm /mnt/sda/junk; sync",
        ],
        timeout_s=300,
    )


def test_growth_trigger_trims_between_schedules_and_backs_off_when_it_cannot_help(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path: Path,
) -> None:
    with booted_guests(libvirt_conn, rig_boot, tmp_path / "guests", [READY, NOT_READY]) as by:
        ready, not_ready = by["gr-ready"], by["gr-notready"]
        port = free_port()
        state = tmp_path / "state"
        cfg = write_config(
            tmp_path / "config.yaml",
            f"metrics:\n  listen: 127.0.0.1:{port}\nstate_dir: {state}\n"
            f"census_interval: {CENSUS_SECONDS}s\n"
            # Triggers only: no cron, no every, so any trim here is a triggered one.
            f"schedules:\n  - name: grow\n    domains: [{ready.name}, {not_ready.name}]\n"
            f"    growth: {JUNK_MIB // 2}MiB\n",
        )
        d = DaemonProc(cfg, tmp_path)
        try:
            d.wait_ready()

            def censused() -> bool:
                m = scrape(port)
                return all(
                    sample(m, "virt_trimd_disk_allocated_bytes", domain=g.name, disk="sda")
                    for g in (ready, not_ready)
                )

            wait_for(censused, 60, "a census of both guests (the growth baselines)")
            # Between two censuses: the daemon is stopped while the guests write and
            # delete, so no census sees the junk before it is deleted.
            d.signal(signal.SIGSTOP)
            try:
                for g in (ready, not_ready):
                    _write_and_delete_junk(g.dom)
                before = {g.name: stat_allocated(g.images[0]) for g in (ready, not_ready)}
            finally:
                d.signal(signal.SIGCONT)

            def growth(domain: str, result: str = "success") -> float | None:
                return sample(
                    scrape(port),
                    "virt_trimd_reclaims_total",
                    domain=domain,
                    method="agent",
                    trigger="growth",
                    result=result,
                )

            wait_for(
                lambda: growth(ready.name) == 1 and growth(not_ready.name) == 1,
                180,
                "a growth-triggered trim of both guests",
            )
            measured = before[ready.name] - stat_allocated(ready.images[0])
            counted = sample(
                scrape(port), "virt_trimd_reclaimed_bytes_total", domain=ready.name, disk="sda"
            )
            assert counted is not None and abs(counted - measured) <= QCOW2_CLUSTER, (
                counted,
                measured,
            )
            assert measured >= (JUNK_MIB - 8) * MIB, measured
            backoff = sample(
                scrape(port),
                "virt_trimd_trigger_backoff_until_timestamp_seconds",
                domain=not_ready.name,
            )
            assert backoff is not None and backoff > time.time(), backoff
            # Several more censuses: the not-ready guest still shows its growth (discards
            # never reach the host) but is not triggered again while it backs off.
            time.sleep(5 * CENSUS_SECONDS)
            m = scrape(port)
            assert growth(not_ready.name) == 1
            assert growth(ready.name) == 1
            assert sample(m, "virt_trimd_next_run_timestamp_seconds", schedule="grow") is None
            assert "allocation grew by" in d.log() and "trimming now" in d.log()
            assert "triggers leave it alone until" in d.log()
        finally:
            assert d.stop() == 0, d.log()
    hist = virt_trimd("history", "--state-dir", str(state), "--json")
    assert hist.returncode == 0, hist.stderr
    trims = json.loads(hist.stdout)["trims"]
    assert sorted((t["domain"], t["trigger"]) for t in trims) == sorted(
        [(ready.name, "growth"), (not_ready.name, "growth")]
    ), trims
