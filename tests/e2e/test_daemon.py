"""`virt-trimd run` as a real subprocess: schedules, /metrics over HTTP, SIGHUP, SIGTERM,
sd_notify on a real NOTIFY_SOCKET, catch-up and spreading, against real guests."""

from __future__ import annotations

import datetime as dt
import itertools
import signal
import socket
import sqlite3
import statistics
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

import rig
from e2e.daemon_proc import DaemonProc, sample, scrape, wait_for
from e2e.helpers import MIB, QCOW2_CLUSTER, booted_guests, stat_allocated
from rig import DiskSpec, GuestSpec
from support.files import free_port, write_config
from virt_trimd.engine.history import History
from virt_trimd.engine.schedule import spread_offset
from virt_trimd.records import Result, TrimRecord

A = GuestSpec("dmn-a", disks=(DiskSpec(fmt="qcow2", bus="scsi", discard="unmap"),))
B = GuestSpec("dmn-b", disks=(DiskSpec(fmt="raw", bus="virtio", discard="unmap", garbage_mib=150),))
STALLED = GuestSpec("dmn-stalled", disks=(DiskSpec(garbage_mib=0, size_mib=128),), agent="stalled")


@pytest.fixture(scope="module")
def guests(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, rig.GuestHandle]]:
    with booted_guests(
        libvirt_conn, rig_boot, tmp_path_factory.mktemp("dmn"), [A, B, STALLED]
    ) as by_name:
        yield by_name


# How late a timed start may be on a loaded host (two cores shared with other rigs).
LOADED_HOST_SLACK = 5.0


def _config(  # noqa: PLR0913  (keyword-only knobs with defaults, read best at the call)
    state: Path,
    port: int,
    schedules: str,
    *,
    grace: str = "3s",
    census: str = "2s",
    extra: str = "",
) -> str:
    return (
        f"metrics:\n  listen: 127.0.0.1:{port}\n"
        f"state_dir: {state}\n"
        f"census_interval: {census}\n"
        f"shutdown_grace: {grace}\n"
        f"{extra}"
        f"schedules:\n{schedules}"
    )


def test_daemon_trims_exports_reloads_and_stops(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    a, b = guests["dmn-a"], guests["dmn-b"]
    before = {p: stat_allocated(p) for g in (a, b) for p in g.images}
    assert all(v >= 100 * MIB for v in before.values()), before
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(
            tmp_path / "state",
            port,
            f"  - name: fast\n    every: 4s\n    domains: [{a.name}, {b.name}]\n"
            "    concurrency: 2\n    timeout: 2m\n    min_interval: 1h\n",
        ),
    )
    d = DaemonProc(cfg, tmp_path, watchdog_usec=2_000_000)
    try:
        d.wait_ready()
        ready_at = d.notify.times_of("READY=1")[0]

        def both_trimmed() -> bool:
            m = scrape(port)
            return all(
                sample(m, "virt_trimd_trims_total", domain=g.name, result="success") == 1
                for g in (a, b)
            )

        wait_for(both_trimmed, 120, "a successful trim of both guests")
        after = {p: stat_allocated(p) for p in before}
        m = scrape(port)
        for g, disk in ((a, "sda"), (b, "vda")):
            (img,) = g.images
            independent = before[img] - after[img]
            assert independent >= 100 * MIB
            got = sample(m, "virt_trimd_reclaimed_bytes_total", domain=g.name, disk=disk)
            assert got is not None and abs(got - independent) <= QCOW2_CLUSTER, (got, independent)
            assert sample(m, "virt_trimd_last_success_timestamp_seconds", domain=g.name)
            assert (
                sample(
                    m,
                    "virt_trimd_disk_info",
                    domain=g.name,
                    disk=disk,
                    path=str(img),
                    format=g.spec.disks[0].fmt,
                    bus=g.spec.disks[0].bus,
                    discard="unmap",
                )
                == 1
            )
        assert (
            sample(m, "virt_trimd_guest_trimmed_bytes_total", domain=a.name, mountpoint="/mnt/sda")
            or 0
        ) >= 150 * MIB
        assert (sample(m, "virt_trimd_trim_duration_seconds_count") or 0) >= 2
        assert sample(m, "virt_trimd_libvirt_up") == 1

        # The census keeps allocation gauges equal to what the host really holds.
        def census_matches() -> bool:
            m2 = scrape(port)
            return sample(
                m2, "virt_trimd_disk_allocated_bytes", domain=a.name, disk="sda"
            ) == stat_allocated(a.images[0])

        wait_for(census_matches, 20, "census allocation == os.stat")

        # min_interval: later sweeps skip, success stays at 1.
        wait_for(
            lambda: (
                (
                    sample(scrape(port), "virt_trimd_trims_total", domain=a.name, result="skipped")
                    or 0
                )
                >= 1
            ),
            30,
            "a skipped re-trim",
        )
        assert sample(scrape(port), "virt_trimd_trims_total", domain=a.name, result="success") == 1

        # SIGHUP with a broken file: old schedules stay, reload gauge goes 0.
        good = cfg.read_text()
        write_config(cfg, good + "    bogus_key: 1\n")
        n_ready = len(d.notify.times_of("READY=1"))
        d.signal(signal.SIGHUP)
        wait_for(
            lambda: sample(scrape(port), "virt_trimd_config_last_reload_successful") == 0,
            20,
            "reload_successful 0",
        )
        m = scrape(port)
        assert sample(m, "virt_trimd_next_run_timestamp_seconds", schedule="fast") is not None
        assert "bogus_key" in d.log()
        wait_for(lambda: len(d.notify.times_of("READY=1")) > n_ready, 10, "READY=1 after reload")
        assert "RELOADING=1" in d.notify.lines()

        # SIGHUP with a valid file: the new schedule replaces the old one.
        write_config(cfg, good.replace("name: fast", "name: renamed").replace("4s", "1h"))
        d.signal(signal.SIGHUP)
        wait_for(
            lambda: sample(scrape(port), "virt_trimd_config_last_reload_successful") == 1,
            20,
            "reload_successful 1",
        )
        m = scrape(port)
        assert sample(m, "virt_trimd_next_run_timestamp_seconds", schedule="renamed") is not None
        assert sample(m, "virt_trimd_next_run_timestamp_seconds", schedule="fast") is None

        # Watchdog pings at about half of WATCHDOG_USEC, from the main loop.
        pings = [t for t in d.notify.times_of("WATCHDOG=1") if t > ready_at]
        assert len(pings) >= 5
        gaps = [y - x for x, y in itertools.pairwise(pings)]
        # Sent at half of WATCHDOG_USEC (2 s); what systemd needs is a ping within 2 s.
        # How close to 1 s they come on an idle host is a benchmark question.
        assert statistics.median(gaps) < 2.0, gaps
        assert any(line.startswith("STATUS=") for line in d.notify.lines())
    finally:
        code = d.stop()
    assert code == 0, d.log()
    assert "STOPPING=1" in d.notify.lines()
    with History(tmp_path / "state", readonly=True) as hist:
        assert hist.integrity_ok()
        results = {(r.domain, r.result) for r in hist.query()}
    assert (a.name, Result.SUCCESS) in results and (b.name, Result.SUCCESS) in results


def test_sigterm_mid_sweep_exits_cleanly(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    # The stalled guest holds the agent port open and never answers: libvirt's
    # guest-sync gives up only after its fixed 5 s, so a SIGTERM 0.5 s into the sweep
    # lands while a libvirt agent call is in flight, and a 2 s grace runs out first.
    stalled = guests["dmn-stalled"]
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(
            tmp_path / "state",
            port,
            f"  - name: hang\n    every: 2s\n    domains: [{stalled.name}]\n    timeout: 5m\n",
            grace="2s",
        ),
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        wait_for(
            lambda: "1 running domain(s) match" in d.log(), 30, "the sweep to start", interval=0.05
        )
        time.sleep(0.5)
    finally:
        code = d.stop(timeout=30)
    assert code == 0, d.log()
    # The event, not a stopwatch: the grace period ran out and the daemon stopped
    # waiting for the agent call libvirt would have held for its 5 s guest-sync.
    assert "grace period over" in d.log()
    assert "STOPPING=1" in d.notify.lines()
    conn = sqlite3.connect(tmp_path / "state" / "history.sqlite3")
    assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    conn.close()


def test_catch_up_runs_a_missed_schedule_once(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    a, b = guests["dmn-a"], guests["dmn-b"]
    state = tmp_path / "state"
    now = time.time()
    with History(state) as hist:
        hist.append_sweep("missed", now - 2 * 86400, now - 2 * 86400 + 5, 1, 0)
        hist.append_sweep("recent", now - 60, now - 55, 1, 0)
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(
            state,
            port,
            f"  - name: missed\n    cron: '0 3 * * *'\n    domains: [{a.name}]\n"
            f"  - name: recent\n    every: 1h\n    domains: [{b.name}]\n",
        ),
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        wait_for(
            lambda: sample(
                scrape(port), "virt_trimd_last_sweep_timestamp_seconds", schedule="missed"
            ),
            60,
            "the catch-up sweep",
        )
        time.sleep(2)
        m = scrape(port)
        assert sample(m, "virt_trimd_trims_total", domain=a.name, result="success") == 1
        assert sample(m, "virt_trimd_last_sweep_timestamp_seconds", schedule="recent") is None
        assert not any(k[0] == "virt_trimd_trims_total" and ("domain", b.name) in k[1] for k in m)
    finally:
        assert d.stop() == 0, d.log()
    with History(state, readonly=True) as hist:
        sweeps = hist.last_sweep_by_schedule()
    assert sweeps["missed"] > now - 60  # ran once at start, recorded


def test_spreading_offsets_are_stable_and_inside_the_window(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    a, b = guests["dmn-a"], guests["dmn-b"]
    window = 12.0
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(
            tmp_path / "state",
            port,
            f"  - name: spread\n    every: 15s\n    window: {window:g}s\n"
            f"    domains: [{a.name}, {b.name}]\n    concurrency: 2\n",
            # No census: its guestInfo call on this module's stalled guest can hold up
            # domain listing for libvirt's 5 s agent sync, delaying every start.
            census="0",
        ),
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        wait_for(
            lambda: (
                (
                    sample(scrape(port), "virt_trimd_trims_total", domain=a.name, result="success")
                    or 0
                )
                >= 2
                and (
                    sample(scrape(port), "virt_trimd_trims_total", domain=b.name, result="success")
                    or 0
                )
                >= 2
            ),
            90,
            "two sweeps",
        )
    finally:
        assert d.stop() == 0, d.log()
    conn = sqlite3.connect(tmp_path / "state" / "history.sqlite3")
    sweeps = [
        r[0]
        for r in conn.execute(
            "SELECT started_ts FROM sweeps WHERE schedule='spread' ORDER BY started_ts"
        )
    ]
    conn.close()
    with History(tmp_path / "state", readonly=True) as hist:
        trims: list[TrimRecord] = hist.query()
    host = socket.gethostname()
    assert len(sweeps) >= 2
    offsets: dict[str, list[float]] = {}
    for rec in trims:
        ts = dt.datetime.fromisoformat(rec.started_at.replace("Z", "+00:00")).timestamp()
        start = max(s for s in sweeps if s <= ts)
        offsets.setdefault(rec.uuid, []).append(ts - start)
    for g in (a, b):
        uuid = g.dom.UUIDString()
        expected = spread_offset(host, "spread", uuid, window)
        got = offsets[uuid][:2]
        # A start is never early (it waits for its offset from the firing, which is also
        # the sweep's stamp) and late only by what a loaded host adds; each run the same
        # lower bound, so the slot is stable. started_at is cut to milliseconds.
        assert all(expected - 0.05 <= o <= expected + LOADED_HOST_SLACK for o in got), (
            got,
            expected,
        )
    ua, ub = a.dom.UUIDString(), b.dom.UUIDString()
    assert spread_offset(host, "spread", ua, window) != spread_offset(host, "spread", ub, window)
