"""The daemon's offline schedules on the real rig: `offline: true` sparsifies the shut-off
guest it matches and leaves the running one to the agent, once per min_interval."""

from __future__ import annotations

import json
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import libvirt
import pytest

import rig
from e2e.daemon_proc import DaemonProc, sample, scrape, wait_for
from e2e.helpers import MIB, QCOW2_CLUSTER, stat_allocated
from e2e.offline_helpers import OFFLINE_SECTION, guest_checksums, write_keep_files_and_stop
from rig import DiskSpec, GuestSpec
from support.cli import virt_trimd
from support.files import free_port, write_config

GARBAGE_MIB = 120
OFF = GuestSpec("od-off", disks=(DiskSpec(fmt="qcow2", garbage_mib=GARBAGE_MIB, size_mib=512),))
RUN = GuestSpec("od-run", disks=(DiskSpec(fmt="qcow2", garbage_mib=GARBAGE_MIB, size_mib=512),))


@dataclass
class Guests:
    off: rig.GuestHandle
    run: rig.GuestHandle
    off_checksums: dict[str, str]


@pytest.fixture(scope="module")
def guests(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Guests]:
    """od-off booted once (garbage deleted without discard) and stopped; od-run running."""
    workdir = tmp_path_factory.mktemp("offline-daemon")
    try:
        off, run = rig.start_guests(libvirt_conn, [OFF, RUN], workdir, rig_boot)
        yield Guests(off, run, write_keep_files_and_stop(off))
    finally:
        for spec in (OFF, RUN):
            rig.destroy_guest(libvirt_conn, spec.domain_name)


def test_offline_schedule_sparsifies_shut_off_and_trims_running_once_per_min_interval(
    guests: Guests, tmp_path: Path
) -> None:
    off, run = guests.off, guests.run
    assert not off.dom.isActive() and run.dom.isActive()
    before = {g.name: stat_allocated(g.images[0]) for g in (off, run)}
    assert all(v >= GARBAGE_MIB * MIB for v in before.values()), before
    port = free_port()
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path / "config.yaml",
        f"metrics:\n  listen: 127.0.0.1:{port}\nstate_dir: {state}\ncensus_interval: 0\n"
        + OFFLINE_SECTION
        + f"schedules:\n  - name: both\n    every: 3s\n    domains: [{off.name}, {run.name}]\n"
        "    min_interval: 1h\n    offline: true\n",
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()

        def reclaims(domain: str, method: str, result: str) -> float | None:
            return sample(
                scrape(port),
                "virt_trimd_reclaims_total",
                domain=domain,
                method=method,
                trigger="schedule",
                result=result,
            )

        wait_for(
            lambda: (
                reclaims(off.name, "sparsify", "success") == 1
                and reclaims(run.name, "agent", "success") == 1
            ),
            600,
            "one offline reclaim of od-off and one agent trim of od-run",
        )
        after = {g.name: stat_allocated(g.images[0]) for g in (off, run)}
        m = scrape(port)
        for g in (off, run):
            counted = sample(m, "virt_trimd_reclaimed_bytes_total", domain=g.name, disk="sda")
            measured = before[g.name] - after[g.name]
            assert counted is not None and abs(counted - measured) <= QCOW2_CLUSTER, (
                g.name,
                counted,
            )
            assert measured >= (GARBAGE_MIB - 8) * MIB, (g.name, measured)
        # The next sweeps skip both: min_interval holds whichever method reclaimed.
        wait_for(
            lambda: (
                (reclaims(off.name, "sparsify", "skipped") or 0) >= 1
                and (reclaims(run.name, "agent", "skipped") or 0) >= 1
            ),
            120,
            "a later sweep skipping both domains for min_interval",
        )
        assert reclaims(off.name, "sparsify", "success") == 1
        assert reclaims(run.name, "agent", "success") == 1
    finally:
        assert d.stop() == 0, d.log()
    hist = virt_trimd("history", "--state-dir", str(state), "--json")
    assert hist.returncode == 0, hist.stderr
    trims = json.loads(hist.stdout)["trims"]
    by = {(t["domain"], t["method"], t["result"]) for t in trims}
    assert (off.name, "sparsify", "success") in by and (run.name, "agent", "success") in by
    skipped = [t for t in trims if t["result"] == "skipped"]
    assert skipped and all("min_interval" in t["message"] for t in skipped), skipped
    # The offline reclaim left the guest's filesystem intact.
    off.dom.create()
    rig.wait_for_agent(off.dom)
    assert guest_checksums(off.dom) == guests.off_checksums
    off.dom.destroy()
