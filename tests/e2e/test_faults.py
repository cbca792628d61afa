"""Faults against the real rig: hung and frozen agents, guests and images vanishing
mid-trim, SIGKILL, a full or read-only state directory, signal storms, a taken port and
libvirtd dying under the daemon.

Where the timing of a fault matters the sweep runs in-process (the real DomainTrimmer
and run_sweep against real libvirt and guests) and the fault is injected at a boundary:
inside the guest (tests/support/faults_agent.py swaps qemu-ga for a scriptable agent), through
libvirt (suspend, destroy, undefine) or in the filesystem under the Measurer. Everything
else drives the real daemon subprocess. The libvirtd restart tests run against a private
libvirtd (tests/support/faults_libvirtd.py) so other sessions' guests on qemu:///system are safe.
"""

from __future__ import annotations

import logging
import os
import re
import signal
import socket
import sqlite3
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import libvirt
import pytest

import rig
from e2e.daemon_proc import DaemonProc, sample, scrape, wait_for
from e2e.helpers import booted_guests
from rig import DiskSpec, GuestSpec
from support import faults_agent as fa
from support.cli import cli_env, virt_trimd
from support.faults_libvirtd import PrivateLibvirtd
from support.files import free_port, write_config
from virt_trimd.engine.history import History
from virt_trimd.engine.sweep import SweepPlan, run_sweep
from virt_trimd.engine.trim import PING_TIMEOUT_SECONDS, DomainTrimmer, TrimOptions
from virt_trimd.host.hypervisor import Hypervisor
from virt_trimd.host.measure import Measurer
from virt_trimd.records import DomainInfo, Result, TrimRecord

A = GuestSpec("flt-a", disks=(DiskSpec(fmt="qcow2", bus="scsi", garbage_mib=64, size_mib=256),))
B = GuestSpec("flt-b", disks=(DiskSpec(fmt="raw", bus="virtio", garbage_mib=32, size_mib=256),))
# Real qemu-ga at boot; tests swap it for the scriptable fake and back.
HANG = GuestSpec("flt-hang", disks=(DiskSpec(garbage_mib=0, size_mib=128),))
STALLED = GuestSpec("flt-stalled", disks=(DiskSpec(garbage_mib=0, size_mib=128),), agent="stalled")

# How far past a configured timeout a result may come: these bounds prove a call was
# cut, not how fast. On a shared 2-core host at load 5 (other sessions' rigs on the same
# libvirtd) a 6 s fstrim timeout came back after 11.1 s, so 5 s was not enough; a call
# that is never cut runs into pytest-timeout instead.
SLACK_SECONDS = 15.0
FSTRIM_OK = '{"return": {"paths": [{"path": "/mnt/sda", "trimmed": 0, "minimum": 0}]}}'


@pytest.fixture(scope="module")
def guests(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[dict[str, rig.GuestHandle]]:
    with booted_guests(
        libvirt_conn, rig_boot, tmp_path_factory.mktemp("flt"), [A, B, HANG, STALLED]
    ) as by_name:
        yield by_name


@pytest.fixture
def hv() -> Iterator[Hypervisor]:
    h = Hypervisor(rig.LIBVIRT_URI)
    h.connect()
    yield h
    h.close()


def _infos(hv: Hypervisor, *handles: rig.GuestHandle) -> list[DomainInfo]:
    return [hv.domain(h.name) for h in handles]


def _by_domain(records: tuple[TrimRecord, ...]) -> dict[str, TrimRecord]:
    return {r.domain: r for r in records}


def _no_traceback(caplog: pytest.LogCaptureFixture) -> None:
    assert not [r for r in caplog.records if r.exc_info], "a traceback was logged"
    assert "Traceback" not in caplog.text


def _watch_console(
    handle: rig.GuestHandle, since: int, command: str, action: object, delay_s: float = 0.3
) -> threading.Thread:
    """Run action() once `command` reached the fake agent (seen on the guest console)."""

    def run() -> None:
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            if command in fa.received_commands(handle, since):
                time.sleep(delay_s)
                action()  # type: ignore[operator]
                return
            time.sleep(0.05)

    t = threading.Thread(target=run, daemon=True)
    t.start()
    return t


# -- what reaches the agent, and a trim finishing inside the grace period ----------------


def _fstrim_lines(handle: rig.GuestHandle, since: int) -> list[str]:
    """The raw guest-fstrim requests the fake agent received (echoed on the console)."""
    return [
        line
        for line in fa.console_text(handle)[since:].splitlines()
        if fa.RX_MARKER in line and "guest-fstrim" in line
    ]


def test_trim_minimum_reaches_guest_fstrim(guests: dict[str, rig.GuestHandle]) -> None:
    """`trim --minimum 1MiB` sends guest-fstrim {"minimum": 1048576}; without it, no argument."""
    hang = guests["flt-hang"]
    since = fa.install_fake_agent(hang, fa.FakeReplies(fstrim=FSTRIM_OK), duration_s=120)
    try:
        plain = virt_trimd("trim", "--json", hang.name, timeout=120)
        (first,) = _fstrim_lines(hang, since)
        with_minimum = virt_trimd("trim", "--json", "--minimum", "1MiB", hang.name, timeout=120)
        second = _fstrim_lines(hang, since)[1]
    finally:
        fa.restore_real_agent(hang, since)
    assert plain.returncode == with_minimum.returncode == 0, (plain.stderr, with_minimum.stderr)
    assert "minimum" not in first.split("guest-fstrim", 1)[1], first
    assert re.search(r'"arguments"\s*:\s*\{\s*"minimum"\s*:\s*1048576\s*\}', second), second


def test_sigterm_during_a_trim_lets_it_finish_inside_the_grace_period(
    guests: dict[str, rig.GuestHandle], tmp_path: Path
) -> None:
    """The agent answers guest-fstrim after 4 s; SIGTERM arrives once it has the call.

    With a 30 s grace the daemon waits for the answer, records the trim and exits 0.
    """
    hang = guests["flt-hang"]
    port = free_port()
    state = tmp_path / "state"
    cfg = write_config(
        tmp_path / "config.yaml",
        f"metrics:\n  listen: 127.0.0.1:{port}\nstate_dir: {state}\ncensus_interval: 0\n"
        "shutdown_grace: 30s\n"
        f"schedules:\n  - name: soon\n    every: 2s\n    domains: [{hang.name}]\n",
    )
    since = fa.install_fake_agent(
        hang, fa.FakeReplies(fstrim=FSTRIM_OK, fstrim_delay_s=4), duration_s=120
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        wait_for(lambda: _fstrim_lines(hang, since), 60, "guest-fstrim to reach the agent")
        d.signal(signal.SIGTERM)
        code = d.stop(timeout=60)
    finally:
        d.stop()
        fa.restore_real_agent(hang, since)
    log = d.log()
    assert code == 0, log
    assert "grace period over" not in log
    assert "STOPPING=1" in d.notify.lines()
    results = [(dom, result) for dom, result, _ in _trims(state)]
    assert results[:1] == [(hang.name, "success")], results


# -- a hung or frozen agent -----------------------------------------------------------


def test_silent_and_stalled_agents_time_out_and_free_their_slots(
    guests: dict[str, rig.GuestHandle], hv: Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """Both concurrency slots start on broken guests; the healthy ones still get trimmed.

    flt-hang answers libvirt's guest-sync and guest-ping, then never answers
    guest-fstrim: libvirt waits our timeout and reports AGENT_UNRESPONSIVE, which the
    adapter turns into `timeout` because the full timeout elapsed. flt-stalled holds
    the port open and answers nothing, so libvirt's own guest-sync gives up after 5 s
    (whatever timeout we pass) and the result is `agent_unavailable`.
    """
    hang, stalled, a, b = (
        guests["flt-hang"],
        guests["flt-stalled"],
        guests["flt-a"],
        guests["flt-b"],
    )
    timeout = 6.0
    since = fa.install_fake_agent(hang, fa.FakeReplies(fstrim=None), duration_s=120)
    caplog.set_level(logging.INFO, logger="virt_trimd")
    try:
        trimmer = DomainTrimmer(hv, Measurer())
        # Submitted in this order: the two broken guests take both slots first.
        summary = run_sweep(
            trimmer,
            _infos(hv, hang, stalled, a, b),
            TrimOptions(timeout_seconds=timeout, schedule="faults"),
            SweepPlan(concurrency=2),
        )
        received = fa.received_commands(hang, since)
    finally:
        fa.restore_real_agent(hang, since)
    recs = _by_domain(summary.records)
    assert len(summary.records) == 4
    hung = recs[hang.name]
    assert hung.result is Result.TIMEOUT, hung
    assert hung.message == f"guest-fstrim did not finish within {timeout:g}s"
    assert timeout - 0.5 <= hung.duration_seconds <= timeout + SLACK_SECONDS
    # The guest really got the fstrim after our guest-ping had been answered: it went
    # silent mid-call, not before. (Other sessions' daemons on this libvirtd may send
    # their own census calls in between; only the order of ours matters.)
    assert "guest-fstrim" in received, received
    assert "guest-ping" in received[: received.index("guest-fstrim")], received
    st = recs[stalled.name]
    assert st.result is Result.AGENT_UNAVAILABLE, st
    assert "not available" in st.message or "not responding" in st.message
    assert st.duration_seconds <= PING_TIMEOUT_SECONDS + SLACK_SECONDS
    for g in (a, b):
        assert recs[g.name].result is Result.SUCCESS, recs[g.name]
    assert summary.failed
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any(m.startswith(f"{hang.name}: timeout") for m in warnings), warnings
    assert any(m.startswith(f"{stalled.name}: agent_unavailable") for m in warnings), warnings
    _no_traceback(caplog)


def test_guest_frozen_with_virsh_suspend_mid_fstrim_times_out(
    guests: dict[str, rig.GuestHandle], hv: Hypervisor
) -> None:
    """The agent would answer after 4 s, but the guest is paused right after it got the call."""
    hang = guests["flt-hang"]
    timeout = 8.0
    since = fa.install_fake_agent(
        hang, fa.FakeReplies(fstrim=FSTRIM_OK, fstrim_delay_s=4), duration_s=120
    )
    paused_during_call: list[int] = []

    def freeze() -> None:
        hang.dom.suspend()
        paused_during_call.append(fa.domain_state(hang.dom))

    try:
        watcher = _watch_console(hang, since, "guest-fstrim", freeze)
        (info,) = _infos(hv, hang)
        record = DomainTrimmer(hv, Measurer()).trim(info, TrimOptions(timeout_seconds=timeout))
        watcher.join(5)
    finally:
        if fa.domain_state(hang.dom) == libvirt.VIR_DOMAIN_PAUSED:
            hang.dom.resume()
        fa.restore_real_agent(hang, since)
    assert paused_during_call == [libvirt.VIR_DOMAIN_PAUSED]
    assert record.result is Result.TIMEOUT, record
    assert record.message == f"guest-fstrim did not finish within {timeout:g}s"
    assert record.duration_seconds <= timeout + SLACK_SECONDS


def test_guest_paused_before_the_call_is_not_running_at_once(
    guests: dict[str, rig.GuestHandle], hv: Hypervisor
) -> None:
    """libvirt refuses agent commands to a paused domain outright: no timeout to wait."""
    hang = guests["flt-hang"]
    (info,) = _infos(hv, hang)
    hang.dom.suspend()
    try:
        record = DomainTrimmer(hv, Measurer()).trim(info, TrimOptions(timeout_seconds=30))
    finally:
        hang.dom.resume()
    assert record.result is Result.NOT_RUNNING, record
    assert record.message == "guest-ping: Requested operation is not valid: domain is not running"
    assert record.duration_seconds < PING_TIMEOUT_SECONDS


def test_agent_hanging_on_fsinfo_does_not_hang_the_trim(
    guests: dict[str, rig.GuestHandle], hv: Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    """guest-fstrim answers, guest-get-fsinfo never does.

    virDomainGetGuestInfo has no timeout of its own (it waits as long as the domain's
    agent timeout, by default forever), so without a bound the trim thread, its
    concurrency slot and the schedule's lock would be held for good.
    """
    hang = guests["flt-hang"]
    since = fa.install_fake_agent(
        hang, fa.FakeReplies(fstrim=FSTRIM_OK, fsinfo=None), duration_s=120
    )
    caplog.set_level(logging.INFO, logger="virt_trimd")
    box: list[TrimRecord] = []
    try:
        (info,) = _infos(hv, hang)
        worker = threading.Thread(
            target=lambda: box.append(
                DomainTrimmer(hv, Measurer()).trim(info, TrimOptions(timeout_seconds=6))
            ),
            daemon=True,
        )
        worker.start()
        worker.join(90)
        received = fa.received_commands(hang, since)
    finally:
        fa.restore_real_agent(hang, since, timeout_s=120)
    assert box, "the trim never returned: guest filesystem info hung"
    (record,) = box
    assert record.result is Result.SUCCESS, record
    assert all(d.effective is None for d in record.disks)
    assert "guest-get-fsinfo" in received
    assert "guest filesystem info unavailable" in caplog.text
    _no_traceback(caplog)


# -- guests and images vanishing mid-trim ---------------------------------------------


def test_guest_destroyed_mid_trim(
    guests: dict[str, rig.GuestHandle],
    guest_factory: rig.GuestFactory,
    hv: Hypervisor,
    caplog: pytest.LogCaptureFixture,
) -> None:
    (victim,) = guest_factory(
        GuestSpec("flt-victim", disks=(DiskSpec(garbage_mib=0, size_mib=128),))
    )
    a = guests["flt-a"]
    since = fa.install_fake_agent(
        victim, fa.FakeReplies(fstrim=FSTRIM_OK, fstrim_delay_s=6), duration_s=120
    )
    caplog.set_level(logging.INFO, logger="virt_trimd")
    watcher = _watch_console(victim, since, "guest-fstrim", victim.dom.destroy)
    summary = run_sweep(
        DomainTrimmer(hv, Measurer()),
        _infos(hv, victim, a),
        TrimOptions(timeout_seconds=30),
    )
    watcher.join(5)
    assert not victim.dom.isActive()
    recs = _by_domain(summary.records)
    gone = recs[victim.name]
    assert gone.result is Result.NOT_RUNNING, (gone.message, gone.duration_seconds)
    assert gone.message.startswith("domain stopped during the trim"), gone.message
    assert gone.duration_seconds < 30
    assert recs[a.name].result is Result.SUCCESS, recs[a.name]
    _no_traceback(caplog)


def test_guest_undefined_between_listing_and_trimming(  # noqa: PLR0913, PLR0917  (fixtures)
    guests: dict[str, rig.GuestHandle],
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    hv: Hypervisor,
    tmp_path: Path,
    caplog: pytest.LogCaptureFixture,
) -> None:
    spec = GuestSpec("flt-undefined", disks=(DiskSpec(garbage_mib=0, size_mib=64),))
    # Booted, so the listing shows a connected agent and the trim really goes to libvirt.
    (handle,) = rig.start_guests(libvirt_conn, [spec], tmp_path, rig_boot)
    try:
        (listed,) = _infos(hv, handle)
        assert listed.running
    finally:
        rig.destroy_guest(libvirt_conn, spec.domain_name)
    a = guests["flt-a"]
    caplog.set_level(logging.INFO, logger="virt_trimd")
    summary = run_sweep(
        DomainTrimmer(hv, Measurer()), [listed, *_infos(hv, a)], TrimOptions(timeout_seconds=30)
    )
    recs = _by_domain(summary.records)
    gone = recs[spec.domain_name]
    assert gone.result is Result.ERROR, gone
    assert gone.message.startswith("domain disappeared before it could be trimmed"), gone.message
    # Measured before the trim started: the image was deleted with the domain.
    assert all(d.not_measured and "cannot stat" in d.not_measured for d in gone.disks)
    assert recs[a.name].result is Result.SUCCESS
    _no_traceback(caplog)


class _SwappingMeasurer(Measurer):
    """Real measurements, except that on the second stat of a chosen image (the one after
    the trim) the file is first moved away and, for `replace`, another file is put there."""

    def __init__(self, remove: Path, replace: Path) -> None:
        super().__init__()
        self.remove, self.replace = remove, replace
        self.calls: dict[str, int] = {}
        self.moved: list[tuple[Path, Path]] = []

    def stat(self, path: str) -> os.stat_result:
        n = self.calls[path] = self.calls.get(path, 0) + 1
        p = Path(path)
        if n == 2 and p in (self.remove, self.replace):
            aside = p.with_name(p.name + ".aside")
            os.rename(p, aside)
            self.moved.append((aside, p))
            if p == self.replace:
                p.write_bytes(b"\0" * 4096)
        return super().stat(path)

    def put_back(self) -> None:
        for aside, original in self.moved:
            os.replace(aside, original)


def test_image_removed_or_replaced_between_measurements(
    guests: dict[str, rig.GuestHandle], hv: Hypervisor, caplog: pytest.LogCaptureFixture
) -> None:
    a, b = guests["flt-a"], guests["flt-b"]
    (replaced,), (removed,) = a.images, b.images
    measurer = _SwappingMeasurer(remove=removed, replace=replaced)
    caplog.set_level(logging.INFO, logger="virt_trimd")
    try:
        summary = run_sweep(
            DomainTrimmer(hv, measurer), _infos(hv, a, b), TrimOptions(timeout_seconds=60)
        )
    finally:
        measurer.put_back()
    assert len(measurer.moved) == 2, "the fault was not injected"
    recs = _by_domain(summary.records)
    # The guest's trim itself worked; only the host-side numbers cannot be trusted.
    for g in (a, b):
        assert recs[g.name].result is Result.SUCCESS, recs[g.name]
    (disk_a,) = recs[a.name].disks
    assert disk_a.reclaimed_bytes is None and disk_a.allocated_after is None, disk_a
    assert disk_a.not_measured is not None
    assert disk_a.not_measured.startswith("after trim: the image file was replaced"), disk_a
    (disk_b,) = recs[b.name].disks
    assert disk_b.reclaimed_bytes is None, disk_b
    assert disk_b.not_measured == f"after trim: cannot stat {removed}: No such file or directory"
    assert summary.reclaimed_bytes == 0
    _no_traceback(caplog)


# -- the daemon process: SIGKILL, state directory, signals, port ----------------------


def _config(state: Path, port: int, schedules: str, extra: str = "") -> str:
    return (
        f"metrics:\n  listen: 127.0.0.1:{port}\n"
        f"state_dir: {state}\n"
        "census_interval: 1h\n"
        "shutdown_grace: 3s\n"
        f"{extra}"
        f"schedules:\n{schedules}"
    )


def _trims(state: Path) -> list[tuple[str, str, str]]:
    """(domain, result, started_at) of every trims row, read with plain sqlite3."""
    conn = sqlite3.connect(state / "history.sqlite3")
    try:
        return list(conn.execute("SELECT domain, result, started_at FROM trims ORDER BY id"))
    finally:
        conn.close()


def _integrity(state: Path) -> str:
    conn = sqlite3.connect(state / "history.sqlite3")
    try:
        return str(conn.execute("PRAGMA integrity_check").fetchone()[0])
    finally:
        conn.close()


def test_sigkill_mid_sweep_then_restart(guests: dict[str, rig.GuestHandle], tmp_path: Path) -> None:
    """SIGKILL while the catch-up sweep is inside flt-stalled's agent call.

    The sweep never completed, so the restart catches up again; flt-a, trimmed before the
    kill, is skipped by min_interval (read back from history) instead of trimmed twice.
    """
    a, stalled = guests["flt-a"], guests["flt-stalled"]
    state = tmp_path / "state"
    now = time.time()
    with History(state) as hist:
        hist.append_sweep("nightly", now - 2 * 86400, now - 2 * 86400 + 5, 2, 0)
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(
            state,
            port,
            f"  - name: nightly\n    cron: '0 3 * * *'\n    domains: [{a.name}, {stalled.name}]\n"
            "    concurrency: 1\n    timeout: 1m\n    min_interval: 1h\n",
        ),
    )
    for run in ("run1", "run2"):
        (tmp_path / run).mkdir()
    first = DaemonProc(cfg, tmp_path / "run1")
    try:
        first.wait_ready()
        wait_for(lambda: f"{a.name}: success" in first.log(), 90, "flt-a trimmed by the catch-up")
        # flt-a is done; flt-stalled's guest-ping is now waiting out libvirt's guest-sync.
        time.sleep(1)
        first.proc.kill()
        assert first.proc.wait(10) == -signal.SIGKILL
    finally:
        first.stop()
    assert _integrity(state) == "ok"
    rows = _trims(state)
    assert [(d, r) for d, r, _ in rows] == [(a.name, "success")], rows
    with History(state, readonly=True) as hist:
        assert [r.result for r in hist.query()] == [Result.SUCCESS]  # every row decodes
        assert hist.last_sweep_by_schedule()["nightly"] < now - 86400  # sweep not recorded

    second = DaemonProc(cfg, tmp_path / "run2")
    try:
        second.wait_ready()
        wait_for(lambda: "missed a run while the daemon was down" in second.log(), 30, "catch-up")
        wait_for(
            lambda: sample(
                scrape(port), "virt_trimd_last_sweep_timestamp_seconds", schedule="nightly"
            ),
            60,
            "the catch-up sweep to finish",
        )
        m = scrape(port)
        assert sample(m, "virt_trimd_trims_total", domain=a.name, result="skipped") == 1
        assert sample(m, "virt_trimd_trims_total", domain=a.name, result="success") is None
        assert (
            sample(m, "virt_trimd_trims_total", domain=stalled.name, result="agent_unavailable")
            == 1
        )
    finally:
        assert second.stop() == 0, second.log()
    assert _integrity(state) == "ok"
    results = [(d, r) for d, r, _ in _trims(state)]
    assert results.count((a.name, "success")) == 1, results
    assert (a.name, "skipped") in results
    with History(state, readonly=True) as hist:
        assert hist.last_sweep_by_schedule()["nightly"] > now


@pytest.fixture
def tmpfs(tmp_path: Path) -> Iterator[Path]:
    """A 1 MiB tmpfs mounted at tmp_path/state, unmounted at teardown."""
    mnt = tmp_path / "state"
    mnt.mkdir()
    subprocess.run(
        ["mount", "-t", "tmpfs", "-o", "size=1m,mode=0750", "tmpfs", str(mnt)], check=True
    )
    yield mnt
    subprocess.run(["umount", "-l", str(mnt)], check=False)


def _fill(directory: Path) -> Path:
    """Fill the filesystem under directory to the last byte; return the filler file."""
    filler = directory / "filler"
    fd = os.open(filler, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    try:
        for size in (1 << 16, 4096, 512, 1):
            try:
                while os.write(fd, b"\0" * size):
                    pass
            except OSError:
                continue
    finally:
        os.close(fd)
    return filler


def test_state_dir_full_trims_and_metrics_go_on(
    guests: dict[str, rig.GuestHandle], tmp_path: Path, tmpfs: Path
) -> None:
    b = guests["flt-b"]
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(tmpfs, port, f"  - name: often\n    every: 3s\n    domains: [{b.name}]\n"),
    )
    d = DaemonProc(cfg, tmp_path)

    def successes() -> float:
        return sample(scrape(port), "virt_trimd_trims_total", domain=b.name, result="success") or 0

    try:
        d.wait_ready()
        wait_for(lambda: successes() >= 1, 60, "a first trim")
        m = scrape(port)
        assert sample(m, "virt_trimd_history_write_ok") == 1
        assert sample(m, "virt_trimd_history_write_errors_total") == 0
        filler = _fill(tmpfs)
        n = successes()
        wait_for(lambda: successes() >= n + 2, 60, "two trims on a full state directory")
        m = scrape(port)
        assert sample(m, "virt_trimd_history_write_ok") == 0
        assert (sample(m, "virt_trimd_history_write_errors_total") or 0) >= 2
        assert sample(m, "virt_trimd_libvirt_up") == 1
        assert "cannot write history" in d.log()
        assert "database or disk is full" in d.log()
        # Space comes back: so does history, without a restart.
        filler.unlink()
        wait_for(
            lambda: sample(scrape(port), "virt_trimd_history_write_ok") == 1, 30, "history back"
        )
    finally:
        assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()
    assert _integrity(tmpfs) == "ok"


def test_state_dir_read_only_trims_and_metrics_go_on(
    guests: dict[str, rig.GuestHandle], tmp_path: Path, tmpfs: Path
) -> None:
    b = guests["flt-b"]
    subprocess.run(["mount", "-o", "remount,ro", str(tmpfs)], check=True)
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(tmpfs, port, f"  - name: often\n    every: 3s\n    domains: [{b.name}]\n"),
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        wait_for(
            lambda: (
                (
                    sample(scrape(port), "virt_trimd_trims_total", domain=b.name, result="success")
                    or 0
                )
                >= 2
            ),
            60,
            "two trims with a read-only state directory",
        )
        m = scrape(port)
        assert sample(m, "virt_trimd_history_write_ok") == 0
        assert (sample(m, "virt_trimd_history_write_errors_total") or 0) >= 2
        assert "history unavailable, trimming goes on without it" in d.log()
        assert "Read-only file system" in d.log()
    finally:
        assert d.stop() == 0, d.log()
    assert "Traceback" not in d.log()


def test_sighup_storms_then_sigterm_during_reloads(tmp_path: Path) -> None:
    """Three bursts of 100 SIGHUPs in about a second each, then SIGTERM inside a flood.

    A handler that takes a lock deadlocks the main loop when a signal lands while that
    thread holds the same lock (threading.Event.set in the handler, Event.wait in the
    loop). After each burst the loop must still apply the config and feed the watchdog,
    and SIGTERM must end it cleanly within the grace period.
    """
    port = free_port()
    state = tmp_path / "state"
    body = "  - name: {name}\n    every: 1h\n    domains: ['vtrimd-test-no-such-guest-*']\n"
    cfg = write_config(tmp_path / "config.yaml", _config(state, port, body.format(name="s0")))
    d = DaemonProc(cfg, tmp_path, watchdog_usec=2_000_000)
    try:
        d.wait_ready()
        for burst in range(1, 4):
            write_config(cfg, _config(state, port, body.format(name=f"s{burst}")))
            for _ in range(100):
                d.signal(signal.SIGHUP)
                time.sleep(0.009)
            storm_end = time.monotonic()
            assert d.proc.poll() is None, d.log()

            def next_run(schedule: str = f"s{burst}") -> float | None:
                return sample(
                    scrape(port), "virt_trimd_next_run_timestamp_seconds", schedule=schedule
                )

            def pinged_after(t: float = storm_end) -> bool:
                return any(x > t for x in d.notify.times_of("WATCHDOG=1"))

            wait_for(next_run, 20, f"schedule s{burst} after burst {burst}")
            wait_for(pinged_after, 10, "a watchdog ping after the burst")
        m = scrape(port)
        assert sample(m, "virt_trimd_next_run_timestamp_seconds", schedule="s2") is None
        assert sample(m, "virt_trimd_config_last_reload_successful") == 1
        assert 3 <= d.log().count("configuration reloaded") <= 300
        # Then a flood (a SIGHUP every 0.2 ms, thousands) with SIGTERM inside it. Before
        # the handlers stopped taking locks this hung the daemon or killed it every time.
        t0 = time.monotonic()
        t1: float | None = None
        sent = 0
        while time.monotonic() - (t1 or t0 + 1.0) < 0.3:
            d.signal(signal.SIGHUP)
            sent += 1
            if t1 is None and time.monotonic() - t0 >= 1.0:
                d.signal(signal.SIGTERM)
                t1 = time.monotonic()
            time.sleep(0.0002)
        # A flood by any measure; how many fit in 1.3 s depends on the host's load.
        assert sent >= 200 and t1 is not None
        code = d.proc.wait(3 + SLACK_SECONDS)
        assert time.monotonic() - t1 <= 3 + SLACK_SECONDS
    finally:
        code = d.stop()
    assert code == 0, d.log()
    assert "STOPPING=1" in d.notify.lines()
    assert "Traceback" not in d.log()
    assert " virt_trimd.service: stopped" in d.log()


def test_metrics_port_taken_fails_the_start(tmp_path: Path) -> None:
    with socket.socket() as squatter:
        squatter.bind(("127.0.0.1", 0))
        squatter.listen()
        port = squatter.getsockname()[1]
        cfg = write_config(tmp_path / "config.yaml", _config(tmp_path / "state", port, "  []\n"))
        proc = subprocess.run(
            [sys.executable, "-m", "virt_trimd", "run", "--config", str(cfg)],
            capture_output=True,
            text=True,
            timeout=60,
            env=cli_env(),
            check=False,
        )
    assert proc.returncode == 1, proc
    assert (
        f"virt-trimd: cannot start: cannot listen on 127.0.0.1:{port}: Address already in use"
        in proc.stderr
    ), proc.stderr
    assert "Traceback" not in proc.stderr


# -- libvirtd dying under the daemon (a private libvirtd) -----------------------------

PA = GuestSpec("priv-a", disks=(DiskSpec(fmt="qcow2", bus="scsi", garbage_mib=16, size_mib=128),))
PSTALLED = GuestSpec("priv-stalled", disks=(DiskSpec(garbage_mib=0, size_mib=64),), agent="stalled")


@pytest.fixture
def private_libvirtd(
    rig_boot: rig.BootFiles,
) -> Iterator[tuple[PrivateLibvirtd, dict[str, rig.GuestHandle]]]:
    priv = PrivateLibvirtd()
    try:
        priv.start()
        conn = priv.connect()
        handles = [priv.start_guest(conn, s, rig_boot) for s in (PA, PSTALLED)]
        for h in handles:
            rig.wait_ready(h)
        conn.close()
        yield priv, {h.spec.name: h for h in handles}
    finally:
        priv.close()


def _trim_lines(log: str) -> list[tuple[str, str]]:
    """(domain, result) of each priv-* trim the daemon logged."""
    prefix = re.escape(rig.session_prefix() + "priv-")
    return re.findall(rf" virt_trimd\.trim: ({prefix}\S+): (\w+), reclaimed", log)


def test_libvirtd_killed_and_restarted_idle_and_mid_sweep(
    private_libvirtd: tuple[PrivateLibvirtd, dict[str, rig.GuestHandle]], tmp_path: Path
) -> None:
    priv, g = private_libvirtd
    pa, pst = g["priv-a"], g["priv-stalled"]
    state = tmp_path / "state"
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _config(
            state,
            port,
            f"  - name: often\n    every: 15s\n    domains: [{pa.name}, {pst.name}]\n"
            "    concurrency: 1\n    timeout: 1m\n",
            extra=f"libvirt:\n  uri: '{priv.uri}'\n",
        ),
    )
    d = DaemonProc(cfg, tmp_path)

    def up() -> float | None:
        return sample(scrape(port), "virt_trimd_libvirt_up")

    def a_successes() -> int:
        return d.log().count(f"{pa.name}: success")

    def sweeps() -> int:
        return d.log().count("last sweep often:")

    def sweep_starts() -> int:
        return d.log().count("schedule often: 2 running domain(s) match")

    try:
        d.wait_ready()
        wait_for(lambda: up() == 1, 15, "libvirt_up 1")
        wait_for(lambda: sweeps() >= 1, 60, "a first sweep")
        # Idle: a sweep just ended, the next one is about 8 s away.
        priv.kill()
        wait_for(lambda: up() == 0, 30, "libvirt_up 0 with libvirtd dead while idle")
        assert d.proc.poll() is None
        priv.start()
        wait_for(lambda: up() == 1, 60, "libvirt_up 1 after the restart")
        n = a_successes()
        wait_for(lambda: a_successes() > n, 60, "the next sweep to trim priv-a")
        # Mid-sweep: one second into a sweep, priv-stalled's guest-ping waits in libvirtd
        # (5 s) whichever goes first: it does (longest last time), or priv-a (0.1 s) does.
        k, s = sweeps(), sweep_starts()
        wait_for(lambda: sweep_starts() > s, 30, "the next sweep to start")
        time.sleep(1)
        priv.kill()
        wait_for(lambda: sweeps() > k, 30, "the interrupted sweep to end")
        wait_for(lambda: up() == 0, 30, "libvirt_up 0 with libvirtd killed mid-sweep")
        assert d.proc.poll() is None
        priv.start()
        wait_for(lambda: up() == 1, 60, "libvirt_up 1 after the second restart")
        n = a_successes()
        wait_for(lambda: a_successes() > n, 60, "a sweep trimming priv-a again")
        m = scrape(port)
        assert (sample(m, "virt_trimd_trims_total", domain=pst.name, result="error") or 0) >= 1
    finally:
        assert d.stop() == 0, d.log()
    log = d.log()
    assert "Traceback" not in log
    assert priv.starts == 3
    assert priv.socket != Path("/run/libvirt/libvirt-sock")  # never the shared libvirtd
    logged = _trim_lines(log)
    assert (pst.name, "error") in logged, logged
    rows = _trims(state)
    # Every record written exactly once: one row per logged trim, no repeated row.
    assert len(rows) == len(logged), (rows, logged)
    assert len(set(rows)) == len(rows)
    assert _integrity(state) == "ok"
