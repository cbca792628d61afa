"""Security and hostile input against the real daemon and real guests.

- /metrics binds to loopback by default; TLS + basic auth from an exporter-toolkit web
  config, checked with real TLS clients (Python's ssl and curl), wrong passwords, plain
  HTTP against the TLS port, and no secret in the log.
- A config file others may write is refused at start (exit 2).
- Guests only ever see guest-ping, guest-fstrim and guest-get-fsinfo (plus libvirt's
  own guest-sync): checked at the adapter, in the package source, and on the wire, read
  from the guest side by a scripted agent that echoes what it receives.
- A hostile guest (quotes, a backslash and Unicode in its name and image path; an agent that
  answers guest-fstrim with forged log lines, escape sequences, absurd numbers, wrong
  types and a reply over 1 MiB) cannot forge log lines or break JSON and labels.
- Hostile images in an inactive domain (looping chain, corrupted header, an image that
  never ends) cost the census bounded time and leave the daemon serving.

`systemd-analyze security` of the unit is checked in tests/integration/test_systemd_unit.py.
"""

from __future__ import annotations

import base64
import json
import os
import re
import shutil
import signal
import socket
import ssl
import struct
import subprocess
import urllib.request
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from urllib.error import HTTPError

import bcrypt
import libvirt
import libvirt_qemu
import pytest
from prometheus_client.parser import text_string_to_metric_families

import rig
from e2e.daemon_proc import DaemonProc, sample, scrape, wait_for
from rig import DiskSpec, GuestSpec
from support import faults_agent as fa
from support.cli import ROOT, virt_trimd
from support.files import free_port, write_config, write_web_config
from virt_trimd.config.model import Config
from virt_trimd.engine.trim import DomainTrimmer, TrimOptions
from virt_trimd.host.agent import ALLOWED_AGENT_COMMANDS, AgentCommandRefused
from virt_trimd.host.hypervisor import Hypervisor
from virt_trimd.host.measure import Measurer
from virt_trimd.records import Result

# What libvirt accepts in a domain name: quotes, a backslash, any Unicode. (A tab too,
# but libvirt writes it raw into XML attributes, where any XML parser reads it as a
# space, so an image path holding it cannot be found again: see RELIABILITY.md.)
WEIRD = GuestSpec("sec q'\"é ü 日本\\", disks=(DiskSpec(garbage_mib=8, size_mib=128),))
FORGED = "2026-01-01 00:00:00,000 CRITICAL virt_trimd.service: forged by a guest"
HOSTILE_MOUNT = f"/mnt/x\n{FORGED}\x1b[2J\u202e"
LINE = re.compile(r"^\d{4}-\d\d-\d\d \d\d:\d\d:\d\d,\d{3} (DEBUG|INFO|WARNING|ERROR|CRITICAL) ")
PASSWORD = "correct horse battery staple"
ON_THE_WIRE_OK = ALLOWED_AGENT_COMMANDS | {"guest-sync"}  # guest-sync is libvirt's own


@pytest.fixture(scope="module")
def weird(
    libvirt_conn: libvirt.virConnect,
    rig_boot: rig.BootFiles,
    tmp_path_factory: pytest.TempPathFactory,
) -> Iterator[rig.GuestHandle]:
    try:
        (h,) = rig.start_guests(libvirt_conn, [WEIRD], tmp_path_factory.mktemp("sec"), rig_boot)
        yield h
    finally:
        rig.destroy_guest(libvirt_conn, WEIRD.domain_name)


def _daemon_config(state: Path, port: int, schedules: str, extra: str = "") -> str:
    return (
        f"metrics:\n  listen: 127.0.0.1:{port}\n{extra}"
        f"state_dir: {state}\n"
        "census_interval: 2s\n"
        "shutdown_grace: 3s\n"
        f"schedules:\n{schedules}"
    )


# -- defaults and config permissions ---------------------------------------------------


def test_metrics_listen_on_loopback_by_default() -> None:
    metrics = Config.default().metrics
    assert (metrics.listen_host, metrics.web_config_file) == ("127.0.0.1", None)


@pytest.mark.parametrize("mode", [0o620, 0o602, 0o666])
def test_refuses_a_config_file_others_can_write(tmp_path: Path, mode: int) -> None:
    port = free_port()
    cfg = tmp_path / "config.yaml"
    cfg.write_text(_daemon_config(tmp_path / "state", port, "  []\n"))
    cfg.chmod(mode)
    proc = virt_trimd("run", "--config", str(cfg), timeout=60)
    assert proc.returncode == 2, proc
    assert f"{cfg}: the configuration file is writable by" in proc.stderr
    assert "refusing to trust it. Fix with: chmod go-w" in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not (tmp_path / "state").exists()  # refused before touching anything
    with socket.socket() as s:
        s.bind(("127.0.0.1", port))  # and never listened


def test_refuses_a_config_in_a_directory_others_can_write(tmp_path: Path) -> None:
    shared = tmp_path / "shared"
    shared.mkdir()
    shared.chmod(0o777)  # no sticky bit: anyone may replace the file
    cfg = write_config(shared / "config.yaml", _daemon_config(tmp_path / "state", 1, "  []\n"))
    proc = virt_trimd("run", "--config", str(cfg), timeout=60)
    assert proc.returncode == 2, proc
    assert f"{shared}: the directory is writable by group and other users" in proc.stderr


# -- TLS and basic auth with a real daemon ---------------------------------------------


@pytest.fixture(scope="module")
def pki(tmp_path_factory: pytest.TempPathFactory) -> Path:
    if shutil.which("openssl") is None:
        pytest.fail("the openssl CLI is needed to make test certificates (apt install openssl)")
    d = tmp_path_factory.mktemp("pki")
    subprocess.run(
        [
            "openssl",
            "req",
            "-x509",
            "-newkey",
            "ec",
            "-pkeyopt",
            "ec_paramgen_curve:prime256v1",
            "-nodes",
            "-keyout",
            "server.key",
            "-out",
            "server.crt",
            "-days",
            "2",
            "-subj",
            "/CN=virt-trimd-e2e",
            "-addext",
            "subjectAltName=IP:127.0.0.1,DNS:localhost",
        ],
        cwd=d,
        check=True,
        capture_output=True,
        timeout=60,
    )
    return d


def _get(url: str, context: ssl.SSLContext | None, user: str | None, password: str) -> int:
    headers = {}
    if user is not None:
        token = base64.b64encode(f"{user}:{password}".encode()).decode()
        headers["Authorization"] = f"Basic {token}"
    request = urllib.request.Request(url, headers=headers)
    try:
        with urllib.request.urlopen(request, timeout=10, context=context) as resp:
            assert b"virt_trimd_build_info" in resp.read()
            return int(resp.status)
    except HTTPError as exc:
        return exc.code


def _self_signed(directory: Path, common_name: str) -> None:
    """server.crt and server.key in `directory`, overwriting what is there (a renewal)."""
    subprocess.run(
        [
            "openssl", "req", "-x509", "-newkey", "ec", "-pkeyopt",
            "ec_paramgen_curve:prime256v1", "-nodes", "-keyout", "server.key",
            "-out", "server.crt", "-days", "2", "-subj", f"/CN={common_name}",
            "-addext", "subjectAltName=IP:127.0.0.1",
        ],
        cwd=directory, check=True, capture_output=True, timeout=60,
    )  # fmt: skip


def _served_certificate(port: int) -> str:
    return ssl.get_server_certificate(("127.0.0.1", port), timeout=10)


def test_sighup_serves_a_renewed_certificate(tmp_path: Path) -> None:
    """certbot-style renewal: new files at the same paths, then SIGHUP (systemctl reload)."""
    pki = tmp_path / "pki"
    pki.mkdir()
    _self_signed(pki, "before-renewal")
    web = write_web_config(
        tmp_path,
        f"tls_server_config:\n  cert_file: {pki / 'server.crt'}\n"
        f"  key_file: {pki / 'server.key'}\n",
    )
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _daemon_config(tmp_path / "state", port, "  []\n", extra=f"  web_config_file: {web}\n"),
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        old = _served_certificate(port)
        assert ssl.PEM_cert_to_DER_cert(old) == ssl.PEM_cert_to_DER_cert(
            (pki / "server.crt").read_text()
        )
        _self_signed(pki, "after-renewal")
        new = (pki / "server.crt").read_text()
        d.signal(signal.SIGHUP)
        wait_for(
            lambda: (
                ssl.PEM_cert_to_DER_cert(_served_certificate(port)) == ssl.PEM_cert_to_DER_cert(new)
            ),
            20,
            "the renewed certificate to be served",
        )
        renewed = ssl.create_default_context(cafile=str(pki / "server.crt"))
        assert _get(f"https://127.0.0.1:{port}/metrics", renewed, None, "") == 200
        assert "configuration reloaded" in d.log()
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.log()


def test_tls_and_basic_auth_with_a_real_daemon(tmp_path: Path, pki: Path) -> None:
    password_hash = bcrypt.hashpw(PASSWORD.encode(), bcrypt.gensalt(rounds=4)).decode()
    web = tmp_path / "web-config.yml"
    web.write_text(
        "tls_server_config:\n"
        f"  cert_file: {pki / 'server.crt'}\n"
        f"  key_file: {pki / 'server.key'}\n"
        "basic_auth_users:\n"
        f"  prometheus: {password_hash}\n"
    )
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _daemon_config(tmp_path / "state", port, "  []\n", extra=f"  web_config_file: {web}\n"),
    )
    d = DaemonProc(cfg, tmp_path)
    https = f"https://127.0.0.1:{port}/metrics"
    trusted = ssl.create_default_context(cafile=str(pki / "server.crt"))
    try:
        d.wait_ready()
        assert _get(https, trusted, "prometheus", PASSWORD) == 200
        assert _get(https, trusted, "prometheus", "wrong password") == 401
        assert _get(https, trusted, "someone", PASSWORD) == 401
        assert _get(https, trusted, None, "") == 401
        # The certificate is really checked: an untrusting client fails the handshake.
        with pytest.raises(urllib.error.URLError) as untrusted:
            _get(https, ssl.create_default_context(), "prometheus", PASSWORD)
        assert isinstance(untrusted.value.reason, ssl.SSLCertVerificationError)
        # Plain HTTP against the TLS port: a clean 400, and the daemon serves on.
        assert _get(f"http://127.0.0.1:{port}/metrics", None, "prometheus", PASSWORD) == 400
        # A second, independent TLS client.
        # curl is installed by .ci/install-deps.sh: without it this fails, never skips.
        out = subprocess.run(
            [
                "curl",
                "-sS",
                "-o",
                "/dev/null",
                "-w",
                "%{http_code}",
                "--cacert",
                str(pki / "server.crt"),
                "-u",
                f"prometheus:{PASSWORD}",
                https,
            ],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
        assert out.stdout == "200", out
        # Garbage bytes instead of a TLS hello.
        with socket.create_connection(("127.0.0.1", port), timeout=5) as raw:
            raw.sendall(b"\x00\xff" * 512)
        assert _get(https, trusted, "prometheus", PASSWORD) == 200
        assert d.proc.poll() is None
    finally:
        assert d.stop() == 0, d.log()
    log = d.log()
    assert "metrics on https://" in log
    for secret in (PASSWORD, password_hash, "wrong password"):
        assert secret not in log
    assert "Traceback" not in log


# -- which agent commands guests receive -----------------------------------------------


def test_allowlist_at_the_adapter_boundary() -> None:
    assert (
        frozenset({"guest-ping", "guest-info", "guest-fstrim", "guest-get-fsinfo"})
        == ALLOWED_AGENT_COMMANDS
    )
    hv = Hypervisor(rig.LIBVIRT_URI)
    hv.connect()
    try:
        for command in ("guest-exec", "guest-file-open", "guest-file-write", "guest-shutdown"):
            # Refused before any lookup: a bogus UUID would otherwise be "no domain".
            with pytest.raises(AgentCommandRefused, match="is not allowed"):
                hv.agent_command("00000000-0000-0000-0000-000000000000", command, None, 5)
    finally:
        hv.close()


def test_package_source_names_no_other_agent_command() -> None:
    names: set[str] = set()
    for path in (ROOT / "daemon" / "virt_trimd").rglob("*.py"):
        names |= set(re.findall(r"[\"'](guest-[a-z-]+)[\"']", path.read_text()))
    assert names and names <= ALLOWED_AGENT_COMMANDS, names - ALLOWED_AGENT_COMMANDS


def test_a_real_trim_sends_only_allowed_commands(
    weird: rig.GuestHandle, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Record every agent command and guest-info call libvirt is asked to make."""
    sent: list[str] = []
    info_types: list[int] = []
    real_command = libvirt_qemu.qemuAgentCommand
    real_info = libvirt.virDomain.guestInfo

    def recording_command(dom: Any, cmd: str, timeout: int, flags: int) -> Any:
        sent.append(json.loads(cmd)["execute"])
        return real_command(dom, cmd, timeout, flags)

    def recording_info(dom: Any, types: int = 0, flags: int = 0) -> Any:
        info_types.append(types)
        return real_info(dom, types, flags)

    monkeypatch.setattr(libvirt_qemu, "qemuAgentCommand", recording_command)
    monkeypatch.setattr(libvirt.virDomain, "guestInfo", recording_info)
    hv = Hypervisor(rig.LIBVIRT_URI)
    hv.connect()
    try:
        record = DomainTrimmer(hv, Measurer()).trim(
            hv.domain(weird.name), TrimOptions(timeout_seconds=60)
        )
    finally:
        hv.close()
    assert record.result is Result.SUCCESS, record
    assert sent and set(sent) <= ALLOWED_AGENT_COMMANDS, sent
    assert {"guest-ping", "guest-fstrim"} <= set(sent)
    # guestInfo asked for filesystems only (libvirt turns that into guest-get-fsinfo).
    assert info_types == [libvirt.VIR_DOMAIN_GUEST_INFO_FILESYSTEM]


# -- a hostile guest, end to end through the daemon ------------------------------------

HOSTILE_FSTRIM = json.dumps(
    {
        "return": {
            "paths": [
                # Failures first: the record's message names the first five.
                {"path": "/forged-error", "error": f"failed\n{FORGED}\x1b]0;title\x07"},
                {"path": HOSTILE_MOUNT + "/2", "error": "trim failed"},
                {"path": "/huge", "trimmed": 99999999999999999999999},
                {"path": "/negative", "trimmed": -5},
                {"path": "/string", "trimmed": "lots"},
                {"path": "/float", "trimmed": 1.5},
                {"path": "/bool", "trimmed": True},
                {"path": "/long-error", "error": "E" * 10000},
                "not an object",
                {"path": ["not", "a", "string"], "trimmed": 1},
                {"path": HOSTILE_MOUNT, "trimmed": 4096, "minimum": 0},
            ]
        }
    }
)


def test_hostile_guest_cannot_forge_logs_or_break_labels_and_json(
    weird: rig.GuestHandle, tmp_path: Path
) -> None:
    since = fa.install_fake_agent(weird, fa.FakeReplies(fstrim=HOSTILE_FSTRIM), duration_s=300)
    state = tmp_path / "state"
    port = free_port()
    cfg = write_config(
        tmp_path / "config.yaml",
        _daemon_config(
            state,
            port,
            f"  - name: often\n    every: 3s\n    domains: [{json.dumps(weird.name)}]\n",
        ),
    )
    d = DaemonProc(cfg, tmp_path)
    try:
        d.wait_ready()
        wait_for(
            lambda: sample(
                scrape(port), "virt_trimd_trims_total", domain=weird.name, result="partial"
            ),
            60,
            "a partial trim of the hostile guest",
        )
        with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as resp:
            exposition = resp.read().decode()
        received = fa.received_commands(weird, since)
    finally:
        code = d.stop()
        fa.restore_real_agent(weird, since)
    assert code == 0, d.log()

    # Prometheus: the exposition parses and labels carry the exact text.
    samples = [s for fam in text_string_to_metric_families(exposition) for s in fam.samples]
    guest = {
        s.labels["mountpoint"]: s.value
        for s in samples
        if s.name == "virt_trimd_guest_trimmed_bytes_total"
    }
    assert guest.get(HOSTILE_MOUNT, 0) >= 4096, guest
    assert "/huge" not in guest and "/negative" not in guest and "/float" not in guest
    (info,) = [
        s for s in samples if s.name == "virt_trimd_disk_info" and s.labels["domain"] == weird.name
    ]
    assert info.labels["path"] == str(weird.images[0])

    # Logs: every line is a record of the daemon's own format; nothing forged, no escapes.
    log = d.log()
    bad = [line for line in log.splitlines() if not LINE.match(line)]
    assert not bad, bad[:5]
    assert "\x1b" not in log and "\u202e" not in log and "\x07" not in log
    assert "forged by a guest" in log  # still readable, inside the guest's own line

    # History JSON: exact text back, oversized and absurd values tamed.
    hist = virt_trimd("history", "--state-dir", str(state), "--json", timeout=60)
    assert hist.returncode == 0, hist.stderr
    rec = json.loads(hist.stdout)["trims"][0]
    assert rec["domain"] == weird.name and rec["result"] == "partial"
    by_path = {f["mountpoint"]: f for f in rec["filesystems"]}
    assert by_path[HOSTILE_MOUNT]["trimmed_bytes"] == 4096
    for path in ("/huge", "/negative", "/string", "/float", "/bool"):
        assert by_path[path]["trimmed_bytes"] is None and by_path[path]["error"], by_path[path]
    assert len(by_path["/long-error"]["error"]) == 4096
    assert by_path["?"]["error"] == "malformed entry in agent reply"
    table = virt_trimd("history", "--state-dir", str(state), timeout=60)
    assert len(table.stdout.splitlines()) == 1 + len(json.loads(hist.stdout)["trims"])

    # On the wire, from the guest's side: nothing but the allowed commands arrived.
    assert set(received) <= ON_THE_WIRE_OK, received
    assert {"guest-ping", "guest-fstrim"} <= set(received), received


def test_agent_reply_over_one_mib_is_refused(weird: rig.GuestHandle) -> None:
    since = fa.install_fake_agent(
        weird, fa.FakeReplies(fstrim_padding_bytes=(1 << 20) + 4096), duration_s=300
    )
    hv = Hypervisor(rig.LIBVIRT_URI)
    hv.connect()
    try:
        record = DomainTrimmer(hv, Measurer()).trim(
            hv.domain(weird.name), TrimOptions(timeout_seconds=120)
        )
    finally:
        hv.close()
        fa.restore_real_agent(weird, since)
    assert record.result is Result.ERROR, record
    assert re.fullmatch(r"guest-fstrim: agent reply too large \(\d+ bytes\)", record.message)


# -- hostile images in an inactive domain ----------------------------------------------


def _qcow2(path: Path, *extra: str) -> Path:
    subprocess.run(
        ["qemu-img", "create", "-q", "-f", "qcow2", *extra, str(path), "64M"],
        check=True,
        capture_output=True,
    )
    return path


def test_hostile_images_cost_the_census_bounded_time(
    libvirt_conn: libvirt.virConnect, rig_boot: rig.BootFiles, tmp_path: Path
) -> None:
    loop_a = _qcow2(tmp_path / "loop-a.qcow2")
    loop_b = _qcow2(tmp_path / "loop-b.qcow2", "-u", "-F", "qcow2", "-b", str(loop_a))
    subprocess.run(
        ["qemu-img", "rebase", "-u", "-F", "qcow2", "-b", str(loop_b), str(loop_a)], check=True
    )
    corrupt = _qcow2(tmp_path / "corrupt.qcow2")
    data = bytearray(corrupt.read_bytes())
    struct.pack_into(">I", data, 20, 31)  # cluster_bits
    corrupt.write_bytes(bytes(data))
    endless = tmp_path / "endless.qcow2"
    os.mkfifo(endless)
    spec = GuestSpec("sec-images", disks=(DiskSpec(bus="virtio"),) * 3)
    xml = rig.domain_xml(spec, rig_boot, [loop_a, corrupt, endless], tmp_path / "console.log")
    libvirt_conn.defineXML(xml)  # inactive: never started, but the census measures it
    try:
        port = free_port()
        cfg = write_config(
            tmp_path / "config.yaml",
            _daemon_config(
                tmp_path / "state",
                port,
                "  []\n",
                extra="qemu_img:\n  timeout: 2s\n",
            ).replace("census_interval: 2s", "census_interval: 3s"),
        )
        d = DaemonProc(cfg, tmp_path)
        name = spec.domain_name
        try:
            d.wait_ready()

            def measured_loop() -> float | None:
                return sample(
                    scrape(port), "virt_trimd_disk_virtual_bytes", domain=name, disk="vda"
                )

            wait_for(measured_loop, 60, "the census to measure the looping image")
            # One DEBUG line per census round (the WARNING is said once per cause).
            per_round = f"{name}/vdc: {endless}: qemu-img timed out after 2s"
            wait_for(
                lambda: d.log().count(per_round) >= 2,
                60,
                "two census rounds past the endless image",
            )
            # Said once per disk and cause, not at every census round.
            warned = re.findall(r"(\S+/vd[a-c]): allocation not measured: (.*)", d.log())
            assert {disk for disk, _ in warned} >= {f"{name}/vdb", f"{name}/vdc"}, warned
            assert len(warned) == len(set(warned)), warned
            m = scrape(port)
            assert measured_loop() == 64 << 20
            for disk in ("vdb", "vdc"):
                assert sample(m, "virt_trimd_disk_virtual_bytes", domain=name, disk=disk) is None
                assert sample(m, "virt_trimd_disk_allocated_bytes", domain=name, disk=disk) is None
            log = d.log()
            assert "Unsupported cluster size: 2^31" in log
            assert d.proc.poll() is None
        finally:
            assert d.stop() == 0, d.log()
        assert "Traceback" not in d.log()
    finally:
        libvirt_conn.lookupByName(spec.domain_name).undefine()
