"""Offline reclaim under the real packaged units, on booted Debian 12 and 13.

The .deb's daemon runs as the unprivileged user virt-trimd. It cannot start transient
units itself (systemd asks polkit for manage-units: "Interactive authentication
required"), so the package ships a root helper, virt-trimd-sparsify.socket, that
re-checks each request and runs virt-sparsify in a transient unit with the offline:
limits. The steps, on one container (each builds on the last):

1. the old route, `offline.runner: systemd-run` from the daemon itself, fails with
   polkit's refusal and leaves the image untouched (why the helper exists);
2. the default route (auto -> helper) reclaims a shut-off qcow2 guest's deleted
   garbage: the journal's RECLAIMED_BYTES and the scraped counter equal the test's own
   os.stat delta within one cluster; the run was a transient unit of its own with
   MemoryMax= from the config, outside virt-trimd.service's cgroup; qemu-img check
   passes and the guest reads back its file intact;
3. a paused guest (QEMU holds its image) in the same offline schedule is left alone,
   and asking the helper directly for its image is refused: checksum unchanged;
4. a second direct request reuses the persistent appliance cache.

Both releases: their systemd (252, 257) and libguestfs differ, and the unit's path
through them is what is proven. Each costs about a minute (two appliance boots under
TCG); the roots are cached.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

import libvirt
import pytest

import rig
from e2e.daemon_proc import scrape
from e2e.offline_helpers import guest_checksums, sha256, write_keep_files_and_stop
from support.files import free_port
from system.conftest import Debs
from system.debhost import (
    BASE_PACKAGES,
    DebianHost,
    add_libvirt_group,
    build_root,
    default_port,
    wait_until,
)

CLUSTER = 64 * 1024
MIB = 1 << 20
GARBAGE_MIB = 120
pytestmark = pytest.mark.timeout(1500)

UNIT = "virt-trimd.service"
SOCKET_UNIT = "virt-trimd-sparsify.socket"
HELPER_SOCKET = "/run/virt-trimd/sparsify.sock"
CONFIG = "/etc/virt-trimd/config.yaml"
# The root: the package's dependencies (so apt needs no mirror at test time), polkitd
# (libvirt-daemon-system depends on it, so real hosts have it), libguestfs-tools and a
# kernel for supermin's appliance.
PACKAGES = (
    *BASE_PACKAGES,
    "libguestfs-tools",
    "linux-image-amd64",
    "polkitd",
    "adduser",
    "python3-apscheduler",
    "python3-bcrypt",
    "python3-jsonschema",
    "python3-libvirt",
    "python3-prometheus-client",
    "python3-systemd",
    "python3-tzlocal",
    "python3-yaml",
    "qemu-utils",
)
# What a direct request to the helper looks like from the daemon's user.
ASK_HELPER = (
    "import json,socket,sys; s=socket.socket(socket.AF_UNIX); s.connect(sys.argv[1]); "
    "s.sendall(json.dumps({'path': sys.argv[2], 'format': 'qcow2'}).encode()+b'\\n'); "
    "s.shutdown(socket.SHUT_WR); print(s.makefile().read())"
)


@dataclass
class Offline:
    """What the steps share."""

    host: DebianHost
    off: rig.GuestHandle
    paused: rig.GuestHandle
    off_checksums: dict[str, str]
    port: int
    notes: dict[str, object] = field(default_factory=dict)

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        return scrape(self.port)

    def config(self, runner: str = "auto") -> str:
        return (
            "libvirt:\n  uri: qemu:///system\n"
            f"metrics:\n  listen: 127.0.0.1:{self.port}\n"
            "census_interval: 5m\n"
            "offline:\n  timeout: 10m\n  memory: 1536MiB\n"
            f"  runner: {runner}\n"
            "  environment: [LIBGUESTFS_BACKEND_SETTINGS=force_tcg]\n"
            "schedules:\n"
            "  - name: offline\n    every: 5s\n"
            f"    domains: [{self.off.name}, {self.paused.name}]\n"
            "    min_interval: 1h\n    timeout: 30s\n    offline: true\n"
        )

    def records(self, domain: str, cursor: str) -> list[dict[str, object]]:
        return [
            e
            for e in self.host.journal(UNIT, cursor)
            if e.get("DOMAIN") == domain and e.get("RESULT")
        ]

    def ask_helper(self, image: Path) -> dict[str, object]:
        """One request to the helper's socket as the daemon's user would send it."""
        out = self.host.run(
            "setpriv", "--reuid=virt-trimd", "--regid=virt-trimd", "--init-groups",
            "python3", "-c", ASK_HELPER, HELPER_SOCKET, str(image), timeout_s=900,
        ).stdout  # fmt: skip
        return dict(json.loads(out))


@pytest.fixture(scope="module", params=["bookworm", "trixie"])
def offline(  # noqa: PLR0913, PLR0917 - pytest injects fixtures by parameter name
    request: pytest.FixtureRequest,
    debs: Debs,
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    image_root: Path,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[Offline]:
    """A shut-off qcow2 guest with deleted garbage, a paused one, the .deb installed."""
    suite = str(request.param)
    root = build_root(suite, PACKAGES)
    off_spec = rig.GuestSpec(
        f"sysoff-{suite}-off",
        disks=(rig.DiskSpec(fmt="qcow2", garbage_mib=GARBAGE_MIB, size_mib=512),),
    )
    paused_spec = rig.GuestSpec(
        f"sysoff-{suite}-paused", disks=(rig.DiskSpec(fmt="qcow2", garbage_mib=40, size_mib=256),)
    )
    specs = (off_spec, paused_spec)
    for s in specs:
        rig.destroy_guest(libvirt_conn, s.domain_name)
    images = image_root / f"offline-{suite}"
    host = DebianHost(
        root=root,
        workdir=tmp_path_factory.mktemp("host-offline"),
        name=f"vtrimd-offline-{suite}-{os.getpid()}",
        binds=[image_root],
    )
    try:
        off, paused = rig.start_guests(libvirt_conn, list(specs), images, rig_boot)
        sums = write_keep_files_and_stop(off)
        rig.guest_exec(paused.dom, ["/bin/sync"])
        paused.dom.suspend()
        host.boot()
        add_libvirt_group(host)
        yield Offline(host, off, paused, sums, free_port(), {"suite": suite})
    finally:
        host.shutdown()
        for s in specs:
            rig.destroy_guest(libvirt_conn, s.domain_name)


def test_install_starts_the_helper_socket(offline: Offline, debs: Debs) -> None:
    """The package enables the helper's socket: root-owned, group virt-trimd, 0660."""
    host = offline.host
    deb = host.copy_in(debs.current)
    with default_port():
        host.run("apt-get", "install", "-y", "-q", deb, timeout_s=600)
        host.wait_active(UNIT)
        host.write(CONFIG, offline.config(runner="systemd-run"))
        host.run("systemctl", "stop", UNIT)
    assert host.run("systemctl", "is-enabled", SOCKET_UNIT).stdout.strip() == "enabled"
    assert host.unit(SOCKET_UNIT)["SubState"] == "listening"
    mode = host.run("stat", "-c", "%U:%G %a", HELPER_SOCKET).stdout.strip()
    assert mode == "root:virt-trimd 660", mode
    # Somebody outside the group cannot even connect.
    denied = host.run(
        "setpriv", "--reuid=nobody", "--regid=nogroup", "--clear-groups",
        "python3", "-c", ASK_HELPER, HELPER_SOCKET, "/x", check=False,
    )  # fmt: skip
    assert denied.returncode != 0 and "Permission denied" in denied.stderr, denied.stderr


def test_daemon_cannot_start_transient_units_itself(offline: Offline) -> None:
    """runner systemd-run from the unprivileged daemon: polkit refuses, image untouched."""
    host = offline.host
    image = offline.off.images[0]
    before = sha256(image)
    cursor = host.cursor()
    host.run("systemctl", "start", UNIT)
    host.wait_active(UNIT)
    rec = wait_until(
        "the daemon's offline record with runner systemd-run",
        lambda: offline.records(offline.off.name, cursor),
        240,
        interval_s=1,
    )
    assert isinstance(rec, list)
    entry = rec[0]
    assert (entry["METHOD"], entry["RESULT"]) == ("sparsify", "error"), entry
    message = str(entry["MESSAGE"])
    assert re.search(r"Interactive authentication required|Access denied", message), message
    offline.notes["systemd_run_refusal"] = message[-300:]
    host.run("systemctl", "stop", UNIT)
    assert sha256(image) == before


def _transient_units(host: DebianHost) -> list[dict[str, str]]:
    """virt-trimd-sparsify-PID-N units running now, with the properties that bound them."""
    names = host.run(
        "systemctl", "list-units", "--all", "--no-legend", "--plain", "virt-trimd-sparsify-*",
        check=False,
    ).stdout.split()  # fmt: skip
    out = []
    for name in (n for n in names if n.endswith(".service") and "@" not in n):
        props = host.unit(
            name, "ActiveState", "ControlGroup", "MemoryMax", "LimitCPU", "RuntimeMaxUSec",
            "PrivateTmp", "UID", "Environment", "Nice",
        )  # fmt: skip
        if props.get("ActiveState") == "active":
            out.append({"Id": name, **props})
    return out


def test_helper_reclaims_shut_off_guest_as_measured(offline: Offline) -> None:
    """The default route: the counter and the journal equal os.stat; a unit of its own."""
    host, off = offline.host, offline.off
    image = off.images[0]
    before = rig.allocated_bytes(image)
    assert before >= GARBAGE_MIB * MIB, before
    host.write(CONFIG, offline.config())
    cursor = host.cursor()
    started = time.monotonic()
    host.run("systemctl", "start", UNIT)
    host.wait_active(UNIT)
    # The run as systemd sees it, caught while the appliance boots (~25 s under TCG).
    seen = wait_until("a transient virt-sparsify unit", lambda: _transient_units(host), 300)
    assert isinstance(seen, list)
    unit = seen[0]
    offline.notes["transient_unit"] = unit
    assert unit["ControlGroup"].startswith("/system.slice/virt-trimd-sparsify-"), unit
    assert "virt-trimd.service" not in unit["ControlGroup"], unit
    assert unit["MemoryMax"] == str(1536 * MIB), unit
    assert unit["RuntimeMaxUSec"] == "10min", unit
    assert unit["PrivateTmp"] == "yes" and unit["Nice"] == "10", unit
    assert "LIBGUESTFS_BACKEND_SETTINGS=force_tcg" in unit["Environment"], unit
    rec = wait_until(
        "the offline record", lambda: offline.records(off.name, cursor), 900, interval_s=1
    )
    offline.notes["daemon_start_to_record_s"] = round(time.monotonic() - started, 1)
    assert isinstance(rec, list)
    entry = rec[0]
    after = rig.allocated_bytes(image)
    delta = before - after
    if entry["RESULT"] != "success":
        print(entry["MESSAGE"], host.run("journalctl", "--no-pager", "-n", "80").stdout[-8000:])
    assert (entry["METHOD"], entry["RESULT"]) == ("sparsify", "success"), entry["MESSAGE"]
    assert delta >= (GARBAGE_MIB - 8) * MIB, (before, after)
    assert abs(int(str(entry["RECLAIMED_BYTES"])) - delta) <= CLUSTER, (entry, delta)
    key = (("disk", "sda"), ("domain", off.name))
    counter = offline.scrape()[("virt_trimd_reclaimed_bytes_total", key)]
    assert abs(counter - delta) <= CLUSTER, (counter, delta)
    offline.notes["reclaimed"] = {"os_stat": delta, "journal": entry["RECLAIMED_BYTES"],
                                  "counter": counter}  # fmt: skip
    offline.notes["record_message"] = entry["MESSAGE"]
    # The helper's own instance did the checks, as root, in a unit of its own.
    everything = host.run("journalctl", "-o", "json", "--no-pager", "--after-cursor", cursor)
    helper_lines = [json.loads(ln) for ln in everything.stdout.splitlines() if ln.strip()]
    passed = [
        e for e in helper_lines
        if "checks passed" in str(e.get("MESSAGE"))
        and str(e.get("_SYSTEMD_UNIT", "")).startswith("virt-trimd-sparsify@")
    ]  # fmt: skip
    assert passed and passed[0]["_UID"] == "0", helper_lines[-20:]
    # systemd's own lines about the transient unit: started, exited, CPU consumed.
    offline.notes["transient_unit_journal"] = [
        str(e["MESSAGE"]) for e in helper_lines
        if e.get("_PID") == "1" and unit["Id"] in str(e.get("MESSAGE"))
    ]  # fmt: skip
    check = subprocess.run(
        ["qemu-img", "check", "-f", "qcow2", str(image)],
        capture_output=True,
        text=True,
        check=False,
    )
    assert check.returncode == 0, check.stdout + check.stderr
    off.dom.create()
    rig.wait_for_agent(off.dom)
    assert guest_checksums(off.dom) == offline.off_checksums
    off.dom.destroy()


def test_paused_guest_is_left_alone_and_the_helper_refuses_it(offline: Offline) -> None:
    """QEMU holds the paused guest's image: no sparsify, and a direct request is refused."""
    host, paused = offline.host, offline.paused
    image = paused.images[0]
    before = sha256(image)
    assert paused.dom.isActive()
    reply = offline.ask_helper(image)
    assert reply["ok"] is False and reply["kind"] == "refused", reply
    assert "is paused" in str(reply["message"]), reply
    recs = [e for e in host.journal(UNIT) if e.get("DOMAIN") == paused.name and e.get("RESULT")]
    assert recs and all(e.get("METHOD") == "agent" for e in recs), recs
    assert sha256(image) == before


def test_second_run_reuses_the_appliance_cache(offline: Offline) -> None:
    """A direct request for the (shut-off) guest again: the cache under /var/cache stays."""
    host = offline.host
    cache = host.fs / "var/cache/virt-trimd-guestfs"
    assert any(cache.glob(".guestfs-0/appliance.d/kernel")), list(cache.rglob("*"))[:20]
    reply = offline.ask_helper(offline.off.images[0])
    assert reply["ok"] is True, reply
    offline.notes["warm_run_s"] = reply["elapsed_seconds"]
    host.run("systemctl", "stop", UNIT)
    print(json.dumps(offline.notes, default=str))
