"""The .deb's whole life on booted Debian 12 and 13: install, run, trim, reload,
watchdog, crash, sandbox, upgrade, remove, purge.

One fresh container per release carries the steps in order (each step builds on the
last, as on a real host; booting and installing once per release keeps the tier
within CI's time). Every figure is checked against something the product did not
compute: the test's own os.stat of the image, systemd's own unit properties, the
journal, an HTTP scrape from the host.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import re
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

import rig
from e2e.daemon_proc import scrape
from support.files import free_port
from system.conftest import README_SECURITY, Debs
from system.debhost import DebianHost, add_libvirt_group, booted, default_port, wait_until

CLUSTER = 64 * 1024
# apt fetches from the mirror inside these tests: a slow mirror is not a hang.
pytestmark = pytest.mark.timeout(900)

UNIT = "virt-trimd.service"
CONFIG = "/etc/virt-trimd/config.yaml"
HISTORY = "/var/lib/virt-trimd/history.sqlite3"
# A message from the sandbox (seccomp or a denied path) anywhere in the unit's journal.
SANDBOX_DENIALS = re.compile(
    r"Operation not permitted|EPERM|Permission denied|EACCES|status=31/SYS|SIGSYS|seccomp",
    re.IGNORECASE,
)


@dataclass
class Lifecycle:
    """What the steps of one release share."""

    suite: str
    host: DebianHost
    guest: rig.GuestHandle
    port: int
    debs: Debs
    hidden: rig.GuestHandle
    notes: dict[str, object] = field(default_factory=dict)
    # Holds 127.0.0.1:9742 from install until the daemon is moved to `port`.
    port_lock: contextlib.ExitStack = field(default_factory=contextlib.ExitStack)

    @property
    def image(self) -> Path:
        return self.guest.images[0]

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.port)

    def metric(self, name: str, **labels: str) -> float | None:
        return self.scrape().get((name, tuple(sorted(labels.items()))))

    def history_count(self) -> int:
        out = self.host.run(
            "python3",
            "-c",
            "import sqlite3,sys; c=sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True); "
            "print(c.execute('PRAGMA integrity_check').fetchone()[0], "
            "c.execute('SELECT count(*) FROM trims').fetchone()[0])",
            HISTORY,
        ).stdout.split()
        assert out[0] == "ok", out
        return int(out[1])

    def config(self, schedules: str, census: str = "5m") -> str:
        return (
            "libvirt:\n  uri: qemu:///system\n"
            f"metrics:\n  listen: 127.0.0.1:{self.port}\n"
            f"census_interval: {census}\n"
            f"schedules:\n{schedules}"
        )

    def schedule(self, name: str, every: str = "10s") -> str:
        return (
            f"  - name: {name}\n"
            f"    every: {every}\n"
            f"    domains: [{self.guest.name}, {self.hidden.name}]\n"
            "    timeout: 2m\n"
            "    min_interval: 1h\n"
        )


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def life(  # noqa: PLR0913, PLR0917 - pytest injects fixtures by parameter name
    request: pytest.FixtureRequest,
    debs: Debs,
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    image_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Lifecycle]:
    """A booted release with rig guests holding 200 MiB of deleted garbage each.

    The first guest's images are under /var/lib/libvirt/images, where the service sees
    them. The second's are under /tmp, bind-mounted into the container at the same path,
    so the container sees them but the service, with PrivateTmp=yes, does not.
    """
    suite = str(request.param)
    spec = rig.GuestSpec(f"sys-{suite}", disks=(rig.DiskSpec(fmt="qcow2", garbage_mib=200),))
    hidden_spec = rig.GuestSpec(
        f"sys-{suite}-tmp", disks=(rig.DiskSpec(fmt="qcow2", garbage_mib=100),)
    )
    hidden_dir = tmp_path_factory.mktemp(f"hidden-{suite}")
    specs = (spec, hidden_spec)
    for s in specs:
        rig.destroy_guest(libvirt_conn, s.domain_name)
    try:
        guest = rig.start_guests(libvirt_conn, [spec], image_root / suite, rig_boot)[0]
        hidden = rig.start_guests(libvirt_conn, [hidden_spec], hidden_dir, rig_boot)[0]
        binds = [image_root, hidden_dir]
        with booted(suite, tmp_path_factory.mktemp(f"host-{suite}"), binds=binds) as host:
            add_libvirt_group(host)
            life = Lifecycle(suite, host, guest, free_port(), debs, hidden)
            with life.port_lock:
                yield life
    finally:
        for s in specs:
            rig.destroy_guest(libvirt_conn, s.domain_name)


def test_install_resolves_from_debian_and_starts(life: Lifecycle) -> None:
    """apt installs the .deb with every dependency from Debian; the service runs."""
    host = life.host
    deb = host.copy_in(life.debs.current)
    host.run("apt-get", "update", "-qq", timeout_s=300)
    life.port_lock.enter_context(default_port())
    host.run("apt-get", "install", "-y", "-q", deb, timeout_s=900)
    assert host.run("virt-trimd", "--version").stdout.strip() == f"virt-trimd {life.debs.version}"
    man = host.run("man", "-P", "cat", "virt-trimd").stdout
    assert "check-config" in man and "virt-trimd" in man
    assert host.run("systemctl", "is-enabled", UNIT).stdout.strip() == "enabled"
    host.wait_active(UNIT)
    props = host.unit(UNIT, "ActiveState", "SubState", "NRestarts", "User", "Type")
    assert props == {
        "ActiveState": "active",
        "SubState": "running",
        "NRestarts": "0",
        "User": "virt-trimd",
        "Type": "notify",
    }
    # Start-up as systemd sees it (exec to READY=1), reported for docs/BENCHMARKS.md.
    times = host.unit(UNIT, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    life.notes["startup_s"] = (
        int(times["ActiveEnterTimestampMonotonic"]) - int(times["ExecMainStartTimestampMonotonic"])
    ) / 1e6
    # The packaged default: no trim at install time, only the census.
    assert life.history_count() == 0
    assert "0 3 * * 0" in host.fs.joinpath(CONFIG.lstrip("/")).read_text()


def test_scheduled_trim_matches_os_stat(life: Lifecycle) -> None:
    """The service trims the rig guest on its schedule; the counter equals os.stat."""
    host = life.host
    before = rig.allocated_bytes(life.image)
    host.write(CONFIG, life.config(life.schedule("systest")))
    # A new metrics.listen takes effect at restart (a reload says so and keeps the old one).
    host.run("systemctl", "restart", UNIT)
    host.wait_active(UNIT)
    life.port_lock.close()  # off 127.0.0.1:9742 now
    key = {"domain": life.guest.name, "disk": "sda"}

    def reclaimed() -> float | None:
        value = life.metric("virt_trimd_reclaimed_bytes_total", **key)
        return value if value else None

    counter = wait_until("a scheduled trim", reclaimed, 180, interval_s=1)
    after = rig.allocated_bytes(life.image)
    delta = before - after
    assert delta > 150 * 1024 * 1024, (before, after)
    assert abs(float(counter) - delta) <= CLUSTER, (counter, delta)  # type: ignore[arg-type]
    entries = [
        e
        for e in host.journal(UNIT)
        if e.get("DOMAIN") == life.guest.name and e.get("RESULT") == "success"
    ]
    assert entries, host.journal_text(UNIT)[-3000:]
    assert abs(int(str(entries[-1]["RECLAIMED_BYTES"])) - delta) <= CLUSTER
    # The guest whose image the sandbox hides: trimmed, but "not measured", never 0.
    hidden_image = str(life.hidden.images[0])
    host.run("stat", hidden_image)  # the container sees it; only the service does not
    hidden = wait_until(
        "the hidden guest's trim in the journal",
        lambda: [
            e for e in host.journal(UNIT) if e.get("DOMAIN") == life.hidden.name and e.get("RESULT")
        ],
        120,
    )
    assert isinstance(hidden, list)
    assert "RECLAIMED_BYTES" not in hidden[-1], hidden[-1]
    assert hidden_image in str(hidden[-1]["NOT_MEASURED"])
    assert "reclaimed: not measured" in str(hidden[-1]["MESSAGE"])
    scraped = life.scrape()
    # Only this test's guests: the census also sees other sessions' domains on the host.
    ours = {life.guest.name, life.hidden.name}
    flagged = [
        dict(labels)
        for (name, labels), value in scraped.items()
        if name == "virt_trimd_disk_not_measured" and value == 1 and dict(labels)["domain"] in ours
    ]
    assert [(f["domain"], f["path"]) for f in flagged] == [(life.hidden.name, hidden_image)]
    assert "No such file or directory" in flagged[0]["reason"]
    assert not [k for k in scraped if k[0] == "virt_trimd_reclaimed_bytes_total"
                and ("domain", life.hidden.name) in k[1]]  # fmt: skip
    life.notes["last_success"] = life.metric(
        "virt_trimd_last_success_timestamp_seconds", domain=life.guest.name
    )


def test_reload_broken_config_keeps_old_schedules(life: Lifecycle) -> None:
    """A broken file fails the reload job with FILE:LINE; the fixed one is taken."""
    host = life.host
    cursor = host.cursor()
    pid = host.unit(UNIT)["MainPID"]
    host.write(CONFIG, life.config(life.schedule("systest")) + "    concurrency: many\n")
    proc = host.run("systemctl", "reload", UNIT, check=False)
    assert proc.returncode != 0
    props = host.unit(UNIT)
    assert (props["ActiveState"], props["SubState"], props["MainPID"]) == ("active", "running", pid)
    journal = host.journal_text(UNIT, cursor)
    assert re.search(rf"{re.escape(CONFIG)}:\d+: schedules\[0\]\.concurrency", journal), journal
    assert life.metric("virt_trimd_next_run_timestamp_seconds", schedule="systest") is not None

    host.write(CONFIG, life.config(life.schedule("renamed", every="1h")))
    host.run("systemctl", "reload", UNIT)
    shown = host.run("virt-trimd", "schedules", "--config", CONFIG).stdout
    assert "renamed" in shown and "systest" not in shown
    wait_until(
        "the daemon to serve the renamed schedule",
        lambda: life.metric("virt_trimd_next_run_timestamp_seconds", schedule="renamed"),
        30,
    )
    assert life.metric("virt_trimd_next_run_timestamp_seconds", schedule="systest") is None
    assert host.unit(UNIT)["MainPID"] == pid


def test_watchdog_kills_and_restarts_a_stopped_daemon(life: Lifecycle) -> None:
    """SIGSTOP the main PID: systemd's watchdog kills it and restarts; history survives."""
    host = life.host
    host.write(
        "/etc/systemd/system/virt-trimd.service.d/test-watchdog.conf",
        "[Service]\nWatchdogSec=4s\nRestartSec=1s\n",
    )
    host.run("systemctl", "daemon-reload")
    host.run("systemctl", "restart", UNIT)
    host.wait_active(UNIT)
    rows = life.history_count()
    props = host.unit(UNIT)
    restarts, pid = int(props["NRestarts"]), props["MainPID"]
    cursor = host.cursor()
    host.sh(f"kill -STOP {pid}")  # the shell builtin: no procps in a minimal Debian 13
    wait_until(
        "the watchdog restart",
        lambda: (
            (p := host.unit(UNIT))["NRestarts"] == str(restarts + 1)
            and p["SubState"] == "running"
            and p["MainPID"] != pid
        ),
        60,
    )
    assert "watchdog timeout" in host.journal_text(UNIT, cursor).lower()
    assert life.history_count() == rows


def test_sigkill_restarts_and_restores_last_success(life: Lifecycle) -> None:
    """Restart=on-failure after SIGKILL; the last-success gauge comes back from history."""
    host = life.host
    props = host.unit(UNIT)
    restarts, pid = int(props["NRestarts"]), props["MainPID"]
    host.sh(f"kill -KILL {pid}")
    wait_until(
        "the restart after SIGKILL",
        lambda: (
            (p := host.unit(UNIT))["NRestarts"] == str(restarts + 1)
            and p["SubState"] == "running"
            and p["MainPID"] != pid
        ),
        60,
    )
    restored = wait_until(
        "the restored gauge",
        lambda: life.metric("virt_trimd_last_success_timestamp_seconds", domain=life.guest.name),
        30,
    )
    assert restored == life.notes["last_success"]


def test_live_security_score_and_no_sandbox_denials(life: Lifecycle) -> None:
    """systemd-analyze security of the running unit, and a journal without denials."""
    host = life.host
    out = host.run("systemd-analyze", "security", "--no-pager", UNIT).stdout
    match = re.search(r"Overall exposure level for \S+: (\d+\.\d+)", out)
    assert match, out[-2000:]
    life.notes["security"] = float(match.group(1))
    assert float(match.group(1)) <= README_SECURITY, out[-3000:]
    denials = [
        line for line in host.journal_text(UNIT).splitlines() if SANDBOX_DENIALS.search(line)
    ]
    assert not denials, denials
    # Python warnings (e.g. Debian 12's APScheduler 3.9 + tzlocal 4 PytzUsageWarning at
    # every fire) would land in the operator's journal too.
    warned = [line for line in host.journal_text(UNIT).splitlines() if "Warning" in line]
    assert not warned, warned


def test_upgrade_keeps_config_and_history_and_restarts_once(life: Lifecycle) -> None:
    """Installing N+1 over N: config untouched, history kept, one restart."""
    host = life.host
    host.run("rm", "-f", "/etc/systemd/system/virt-trimd.service.d/test-watchdog.conf")
    host.run("systemctl", "daemon-reload")
    # The steps before started the unit five times in a few minutes (install, restart,
    # watchdog, SIGKILL), which is StartLimitBurst=5 in StartLimitIntervalSec=10min: the
    # upgrade's restart would hit the limit (systemd 257 counts it; 252 did not here).
    # An operator clears that after investigating crashes, as here.
    host.run("systemctl", "reset-failed", UNIT)
    config = hashlib.sha256(host.fs.joinpath(CONFIG.lstrip("/")).read_bytes()).hexdigest()
    rows = life.history_count()
    pid = host.unit(UNIT)["MainPID"]
    cursor = host.cursor()
    deb = host.copy_in(life.debs.upgrade)
    host.run("apt-get", "install", "-y", "-q", deb, timeout_s=600)
    version = host.run("virt-trimd", "--version").stdout.strip()
    assert version == f"virt-trimd {life.debs.upgrade_version}"
    assert hashlib.sha256(host.fs.joinpath(CONFIG.lstrip("/")).read_bytes()).hexdigest() == config
    host.wait_active(UNIT)
    assert host.unit(UNIT)["MainPID"] != pid
    assert life.history_count() >= rows
    started = [
        e
        for e in host.journal(UNIT, cursor)
        if str(e.get("MESSAGE", "")).startswith("Started ") and e.get("_PID") == "1"
    ]
    assert len(started) == 1, [e.get("MESSAGE") for e in host.journal(UNIT, cursor)]


def test_remove_stops_and_purge_cleans_up(life: Lifecycle) -> None:
    """apt remove stops and disables the service; apt purge removes config and state."""
    host = life.host
    host.run("apt-get", "remove", "-y", "-q", "virt-trimd", timeout_s=300)
    props = host.unit(UNIT, "ActiveState", "MainPID")
    assert props["ActiveState"] != "active" and props["MainPID"] == "0", props
    enabled = host.run("systemctl", "is-enabled", UNIT, check=False).stdout.strip()
    assert enabled != "enabled", enabled
    host.run("apt-get", "purge", "-y", "-q", "virt-trimd", timeout_s=300)
    for path in ("/etc/virt-trimd", "/var/lib/virt-trimd"):
        assert not host.fs.joinpath(path.lstrip("/")).exists(), path
    wants = host.fs / "etc/systemd/system/multi-user.target.wants/virt-trimd.service"
    assert not wants.is_symlink()
    print(json.dumps({"suite": life.suite, **life.notes}))
