"""Benchmark `system`: the packaged service under systemd in Debian 12 and 13 containers.

Issue 14, items 1 and 5. Both releases are booted at once (the system tier's cached
mmdebstrap roots, systemd as PID 1 under systemd-nspawn, tests/system/debhost.py), the
.deb built from this tree (or $VTRIMD_BENCH_DEB) is installed with apt, and the service
reaches the host's libvirtd through the bound /run/libvirt, each on its own port.

1. Start-up: `systemctl restart` of virt-trimd.service (Type=notify), then systemd's own
   ExecMainStartTimestampMonotonic -> ActiveEnterTimestampMonotonic (exec to READY=1),
   alternating between the releases; `reset-failed` before each restart keeps clear of
   StartLimitBurst=5.
2. Idle memory: the service (/usr/bin/python3, User=virt-trimd) with the benchmark's
   running guests, census at its default interval, /metrics scraped every 15 s as
   Prometheus does; beside it, in the same container, under the same interpreter and
   user, the floor: a transient unit that imports the runtime dependencies as the daemon
   imports them and sleeps. Both are sampled from the host's /proc every 5 s (VmRSS,
   VmHWM, smaps_rollup's Rss and Pss). The window starts 10 s after the service's start,
   so its interval census falls inside; the history's census rows confirm it. Target:
   daemon VmRSS <= floor + 10 MB, medians. Smoke: one release, 1 guest, a 15 s window
   with a 20 s census interval, 2 restarts.
3. What the daemon imports beyond the floor: one start of the service with
   PYTHONPROFILEIMPORTTIME=1 (before the measured start; its census and a scrape run)
   lists every module the running daemon loaded; a fresh /usr/bin/python3 that has the
   floor imports the rest, each after its own dependencies, VmRSS after each.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import re
import statistics
import subprocess
import time
import urllib.request
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from bench.common import ROOT, BenchResult, Row, at_most, proc_cpu_seconds, row
from bench.guests import PREFIX, GuestPool
from support.files import free_port
from system.debhost import DebianHost, add_libvirt_group, booted, default_port, wait_until

log = logging.getLogger(__name__)

SUITES = ("bookworm", "trixie")
UNIT = "virt-trimd.service"
CONFIG = "/etc/virt-trimd/config.yaml"
HISTORY = "/var/lib/virt-trimd/history.sqlite3"
DROPIN = "/etc/systemd/system/virt-trimd.service.d/bench-importtime.conf"
FLOOR_UNIT = "vtrimd-bench-floor.service"
TOOLS = "/usr/local/lib/vtrimd-bench"  # readable by the virt-trimd user (not /root)
SCRAPE_EVERY_S = 15.0
SAMPLE_EVERY_S = 5.0
MARGIN_MB = 10.0
MB = 1e6
KIB = 1024 / MB
PROMETHEUS_HEADERS = {
    "Accept": "application/openmetrics-text;version=1.0.0,text/plain;version=0.0.4;q=0.5",
    "Accept-Encoding": "gzip",
}

# The floor: what the daemon's own code imports from its runtime dependencies, as it
# imports them (service/daemon.py, web/, config/, engine/schedule.py, host/, cli/'s
# journal handler). bcrypt is left out: only a web config with basic auth imports it.
FLOOR_IMPORTS = """\
import libvirt, libvirt_qemu
from apscheduler.schedulers.background import BackgroundScheduler
from apscheduler.triggers.base import BaseTrigger
from apscheduler.triggers.cron import CronTrigger
from apscheduler.triggers.interval import IntervalTrigger
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder, gzip_accepted
from prometheus_client.metrics_core import GaugeMetricFamily
from prometheus_client.registry import Collector
import yaml
from yaml.constructor import SafeConstructor
import jsonschema
import sqlite3
from systemd.journal import JournalHandler
from tzlocal import get_localzone, get_localzone_name
from zoneinfo import ZoneInfo
"""

FLOOR_SCRIPT = f"""\
# The idle floor: the daemon's dependencies, imported, then nothing (vtrimd bench).
import os, socket, time
{FLOOR_IMPORTS}
with socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM) as s:
    s.sendto(b"READY=1", os.environ["NOTIFY_SOCKET"])
while True:
    time.sleep(3600)
"""

# argv: module names. Prints one JSON document: VmRSS (KiB) after each floor line, then
# after each module. json is
# imported at the end, so that it is measured where the daemon imports it.
IMPORTS_SCRIPT = f"""\
import importlib, sys
def rss():
    for line in open("/proc/self/status"):
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
steps = [["(interpreter)", rss(), len(sys.modules), ""]]
floor_steps = []
for stmt in {FLOOR_IMPORTS.splitlines()!r}:
    exec(stmt)  # one floor line at a time: the floor's own table
    floor_steps.append([stmt, rss()])
steps.append(["(floor)", rss(), len(sys.modules), ""])
floor = sorted(sys.modules)
for name in sys.argv[1:]:
    if name in sys.modules:
        continue
    err = ""
    before = set(sys.modules)
    try:
        importlib.import_module(name)
    except Exception as exc:
        err = type(exc).__name__ + ": " + str(exc)
    steps.append([name, rss(), len(sys.modules), err, sorted(set(sys.modules) - before)])
import json
print(json.dumps({{"steps": steps, "floor_steps": floor_steps, "floor_modules": floor}}))
"""

IMPORTTIME_LINE = re.compile(r"^import time:\s+(\d+) \|\s+(\d+) \|( *)(\S+)\s*$")


@dataclass
class Release:
    """One booted container and what was measured in it."""

    suite: str
    host: DebianHost
    port: int
    census: str = "5m"  # the default census_interval; smoke runs shorten it into the window
    version: str = ""
    python: str = ""
    startup_s: list[float] = field(default_factory=list)
    restart_wall_s: list[float] = field(default_factory=list)
    daemon_pid: int = 0  # host PIDs
    floor_pid: int = 0
    trace: list[dict[str, Any]] = field(default_factory=list)
    scrapes: int = 0
    cpu_s: dict[str, float] = field(default_factory=dict)
    daemon_modules: list[str] = field(default_factory=list)
    imports: dict[str, Any] = field(default_factory=dict)
    journal_warnings: list[str] = field(default_factory=list)
    censuses: list[int] = field(default_factory=list)  # census timestamps in the window


# -- the package ---------------------------------------------------------------------------


def deb_of_this_tree(out: Path) -> Path:
    """$VTRIMD_BENCH_DEB, or `make deb` (.ci/build-deb.sh) of the checked-out tree."""
    given = os.environ.get("VTRIMD_BENCH_DEB")
    if given:
        return Path(given)
    out.mkdir(parents=True, exist_ok=True)
    proc = subprocess.run(
        ["bash", str(ROOT / ".ci" / "build-deb.sh")],
        env=dict(os.environ, DEB_OUT=str(out)),
        capture_output=True,
        text=True,
        timeout=900,
        check=False,
    )
    if proc.returncode != 0:
        raise RuntimeError(f"make deb failed:\n{proc.stdout[-2000:]}\n{proc.stderr[-2000:]}")
    debs = sorted(out.glob("virt-trimd_*_all.deb"))
    if len(debs) != 1:
        raise RuntimeError(f"expected one .deb in {out}, found {debs}")
    return debs[0]


def service_config(port: int, census: str = "5m") -> str:
    """The benchmark's config: a nightly schedule over the benchmark guests, census at 5m."""
    return (
        "libvirt:\n  uri: qemu:///system\n"
        f"metrics:\n  listen: 127.0.0.1:{port}\n"
        f"census_interval: {census}\n"
        "schedules:\n"
        "  - name: bench\n"
        "    cron: '30 2 * * *'\n"
        f"    domains: ['{PREFIX}*']\n"
        "    concurrency: 4\n"
        "    timeout: 2m\n"
    )


def install(rel: Release, deb: Path) -> None:
    """apt-get install the .deb (dependencies from Debian), then move it to its own port."""
    host = rel.host
    add_libvirt_group(host)
    host.write(f"{TOOLS}/floor.py", FLOOR_SCRIPT)
    host.write(f"{TOOLS}/imports.py", IMPORTS_SCRIPT)
    inside = host.copy_in(deb)
    host.run("apt-get", "update", "-qq", timeout_s=300)
    # The package starts the service on 127.0.0.1:9742: one container at a time there.
    with default_port():
        host.run("apt-get", "install", "-y", "-q", inside, timeout_s=900)
        host.wait_active(UNIT)
        host.write(CONFIG, service_config(rel.port, rel.census))
        restart(host)
    rel.version = host.run("virt-trimd", "--version").stdout.strip()
    rel.python = host.run("/usr/bin/python3", "--version").stdout.strip()


def restart(host: DebianHost) -> float:
    """reset-failed (StartLimitBurst=5 in 10 min), restart, wait; wall seconds of restart."""
    host.run("systemctl", "reset-failed", UNIT, check=False)
    t0 = time.monotonic()
    host.run("systemctl", "restart", UNIT)  # returns once READY=1 arrived (Type=notify)
    wall = time.monotonic() - t0
    host.wait_active(UNIT)
    return wall


def censuses_between(host: DebianHost, t0: float, t1: float) -> list[int]:
    """The service's census timestamps in [t0, t1], from its own history database."""
    out = host.run(
        "python3",
        "-c",
        "import sqlite3, sys; c = sqlite3.connect(f'file:{sys.argv[1]}?mode=ro', uri=True); "
        "print(*[r[0] for r in c.execute('SELECT DISTINCT ts FROM census WHERE ts BETWEEN ? AND ?"
        " ORDER BY ts', (float(sys.argv[2]), float(sys.argv[3])))])",
        HISTORY,
        str(t0),
        str(t1),
    ).stdout
    return [int(x) for x in out.split()]


def startup_seconds(host: DebianHost) -> float:
    """systemd's exec -> READY=1 of the current start of the unit."""
    p = host.unit(UNIT, "ExecMainStartTimestampMonotonic", "ActiveEnterTimestampMonotonic")
    start, active = (
        int(p["ExecMainStartTimestampMonotonic"]),
        int(p["ActiveEnterTimestampMonotonic"]),
    )
    if not start or active < start:
        raise RuntimeError(f"{host.name}: no start of {UNIT} to time: {p}")
    return (active - start) / 1e6


# -- processes -----------------------------------------------------------------------------


def host_pid(host: DebianHost, inner: int) -> int:
    """The host's PID of the container's process `inner` (NSpid's last field)."""
    ns = os.readlink(f"/proc/{host.leader}/ns/pid")
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        with contextlib.suppress(OSError):
            if os.readlink(proc / "ns" / "pid") != ns:
                continue
            for line in (proc / "status").read_text().splitlines():
                if line.startswith("NSpid:") and int(line.split()[-1]) == inner:
                    return int(proc.name)
    raise RuntimeError(f"{host.name}: PID {inner} not found from the host")


def main_pid(host: DebianHost, unit: str) -> int:
    pid = int(host.unit(unit, "MainPID")["MainPID"])
    if not pid:
        raise RuntimeError(f"{host.name}: {unit} has no MainPID")
    return host_pid(host, pid)


def memory_kib(pid: int) -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile from status; Rss, Pss, Pss_Anon, Pss_File from smaps_rollup.

    smaps_rollup's Rss walks the page tables, status's VmRSS reads the kernel's counters:
    two ways to one number, compared in the results.
    """
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "Threads"):
            out[key] = int(rest.split()[0])
    for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("Rss", "Pss", "Pss_Anon", "Pss_File"):
            out[key] = int(rest.split()[0])
    return out


def scrape(port: int) -> str:
    """One Prometheus-style scrape (OpenMetrics, gzip); the decoded body."""
    import gzip

    req = urllib.request.Request(f"http://127.0.0.1:{port}/metrics", headers=PROMETHEUS_HEADERS)
    with urllib.request.urlopen(req, timeout=10) as resp:
        body = resp.read()
        if resp.headers.get("Content-Encoding") == "gzip":
            body = gzip.decompress(body)
    return str(body.decode())


def wait_census(port: int, guests: int, timeout_s: float) -> None:
    """Until the service's census has measured every benchmark guest."""

    def covered() -> bool:
        seen = {
            line.split('domain="', 1)[1].split('"', 1)[0]
            for line in scrape(port).splitlines()
            if line.startswith("virt_trimd_disk_allocated_bytes{") and PREFIX in line
        }
        return len(seen) >= guests

    wait_until(f"the census of {guests} guests on :{port}", covered, timeout_s)


def start_floor(host: DebianHost) -> None:
    """The floor as a transient unit of the daemon's user; returns after its READY=1."""
    host.run(
        "systemd-run",
        f"--unit={FLOOR_UNIT}",
        "-p",
        "Type=notify",
        "-p",
        "User=virt-trimd",
        "-p",
        "Group=virt-trimd",
        "/usr/bin/python3",
        f"{TOOLS}/floor.py",
        timeout_s=120,
    )


# -- imports -------------------------------------------------------------------------------


def parse_importtime(lines: Sequence[str]) -> list[str]:
    """Module names from `-X importtime` lines, in the order their imports ended.

    A line is printed when an import ends, so a module comes after everything it
    imported: importing the list in this order into a fresh interpreter charges each
    step with that module's own cost, its dependencies being loaded already.
    """
    order: list[str] = []
    seen: set[str] = set()
    for line in lines:
        m = IMPORTTIME_LINE.match(line)
        if m is not None and m.group(4) not in seen:  # a failed import is printed per try
            seen.add(m.group(4))
            order.append(m.group(4))
    return order


def daemon_modules(rel: Release, guests: int) -> list[str]:
    """Every module one start of the service loads (imports, start-up, census, scrapes)."""
    host = rel.host
    host.write(DROPIN, "[Service]\nEnvironment=PYTHONPROFILEIMPORTTIME=1\n")
    host.run("systemctl", "daemon-reload")
    cursor = host.cursor()
    try:
        restart(host)
        if guests:
            wait_census(rel.port, guests, 120)
        scrape(rel.port)
        urllib.request.urlopen(f"http://127.0.0.1:{rel.port}/metrics", timeout=10).read()
        host.run("systemctl", "stop", UNIT)
        lines = [str(e.get("MESSAGE", "")) for e in host.journal(UNIT, cursor)]
    finally:
        host.run("rm", "-f", DROPIN)
        host.run("systemctl", "daemon-reload")
    names = parse_importtime(lines)
    if not names:
        raise RuntimeError(f"{host.name}: no -X importtime lines in the journal")
    return names


def import_costs(rel: Release) -> dict[str, Any]:
    """VmRSS of a fresh /usr/bin/python3 after the floor, then after each extra module."""
    names = [n for n in rel.daemon_modules if n != "__main__" and not n.endswith(".__main__")]
    # virt_trimd.cli's __init__ imports cli.commands, which imports most of the package:
    # imported at its place (the first cli module to end is cli.progress) it would carry
    # all of them. Last, it carries only the CLI's own modules.
    names.sort(key=lambda n: n == "virt_trimd.cli" or n.startswith("virt_trimd.cli."))
    out = rel.host.run(
        "runuser",
        "-u",
        "virt-trimd",
        "--",
        "/usr/bin/python3",
        f"{TOOLS}/imports.py",
        *names,
    ).stdout
    doc: dict[str, Any] = json.loads(out)
    return doc


def group_of(module: str) -> str:
    """The row of the import table a module belongs to."""
    top = module.split(".", maxsplit=1)[0]
    if top == "virt_trimd":
        return ".".join(module.split(".")[:2])
    return top


def import_table(doc: dict[str, Any]) -> list[dict[str, Any]]:
    """Steps after the floor, summed by group: [{group, kib, modules, names}], costliest first."""
    steps = doc["steps"]
    groups: dict[str, dict[str, Any]] = {}
    prev = steps[1][1]
    for name, rss, _, err, *_new in steps[2:]:
        # Optional imports the libraries try (fqdn, regex, winreg...) and do not find.
        key = "(tried, not installed)" if err else group_of(name)
        g = groups.setdefault(key, {"group": key, "kib": 0, "modules": 0, "names": []})
        g["kib"] += rss - prev
        g["modules"] += 1
        g["names"].append(name)
        prev = rss
    return sorted(groups.values(), key=lambda g: -int(g["kib"]))


# -- the run -------------------------------------------------------------------------------


def idle_window(rels: Sequence[Release], window_s: float) -> None:
    """Sample daemon and floor of every release; scrape every daemon every 15 s."""
    start_cpu = {
        (r.suite, k): proc_cpu_seconds(pid)
        for r in rels
        for k, pid in (("daemon", r.daemon_pid), ("floor", r.floor_pid))
    }
    t0 = time.monotonic()
    next_scrape = next_sample = t0
    while (now := time.monotonic()) - t0 < window_s:
        if now >= next_scrape:
            for r in rels:
                scrape(r.port)
                r.scrapes += 1
            next_scrape += SCRAPE_EVERY_S
        if now >= next_sample:
            for r in rels:
                r.trace.append(
                    {
                        "t": round(now - t0, 2),
                        "daemon": memory_kib(r.daemon_pid),
                        "floor": memory_kib(r.floor_pid),
                    }
                )
            next_sample += SAMPLE_EVERY_S
        time.sleep(max(0.05, min(next_scrape, next_sample) - time.monotonic()))
    elapsed = time.monotonic() - t0
    for r in rels:
        for k, pid in (("daemon", r.daemon_pid), ("floor", r.floor_pid)):
            r.cpu_s[k] = proc_cpu_seconds(pid) - start_cpu[(r.suite, k)]
        r.cpu_s["window"] = elapsed


def _parallel(fn: Callable[[Release], Any], rels: Sequence[Release]) -> list[Any]:
    with ThreadPoolExecutor(max_workers=len(rels)) as ex:
        return list(ex.map(fn, rels))


def run(pool: GuestPool | None, workdir: Path, smoke: bool) -> BenchResult:
    suites = SUITES[:1] if smoke else SUITES
    guests = 1 if smoke else 20
    window = 15.0 if smoke else 300.0
    restarts = 2 if smoke else 7
    res = BenchResult("system")
    if pool is None:
        raise RuntimeError("the system benchmark needs guests")
    pool.ensure(guests)
    foreign = pool.other_running_domains()
    work = workdir / "system"
    deb = deb_of_this_tree(work / "deb")
    image_dir = pool.workdir
    with contextlib.ExitStack() as stack:
        rels: list[Release] = []
        for suite in suites:  # booted one after the other, then both run at once
            host = stack.enter_context(
                booted(
                    suite,
                    work / f"host-{suite}",
                    binds=[image_dir],
                    name=f"{PREFIX}sys-{suite}-{os.getpid()}",
                )
            )
            rels.append(Release(suite, host, free_port(), census="20s" if smoke else "5m"))
        _parallel(lambda r: install(r, deb), rels)
        # Start-up: alternating between releases, so load drifts hit both alike.
        for _ in range(restarts):
            for r in rels:
                r.restart_wall_s.append(restart(r.host))
                r.startup_s.append(startup_seconds(r.host))
        mods = _parallel(lambda r: daemon_modules(r, guests), rels)
        for r, m in zip(rels, mods, strict=True):
            r.daemon_modules = m
        for r in rels:  # the measured start: plain, as installed
            restart(r.host)
        started = time.monotonic()
        _parallel(lambda r: wait_census(r.port, guests, 180), rels)
        for r in rels:
            start_floor(r.host)
            stack.callback(r.host.run, "systemctl", "stop", FLOOR_UNIT, check=False)
            r.daemon_pid = main_pid(r.host, UNIT)
            r.floor_pid = main_pid(r.host, FLOOR_UNIT)
        # The interval census fires census_interval after the start: beginning the
        # window 10 s after the start puts it 10 s before the window's end, not after it.
        time.sleep(max(2.0, started + 10.0 - time.monotonic()))
        load_window = os.getloadavg()
        window_from = time.time()
        idle_window(rels, window)
        window_to = time.time()
        for r in rels:
            r.censuses = censuses_between(r.host, window_from, window_to)
        for r in rels:
            if main_pid(r.host, UNIT) != r.daemon_pid:
                raise RuntimeError(f"{r.suite}: the service restarted during the window")
            r.journal_warnings = [
                ln
                for ln in r.host.journal_text(UNIT).splitlines()
                if re.search(r"Warning|Traceback", ln)
            ]
        imports = _parallel(import_costs, rels)
        for r, doc in zip(rels, imports, strict=True):
            r.imports = doc
    res.rows = rows_of(rels, guests, window)
    res.samples = {
        "guests": guests,
        "foreign_running_domains": foreign,
        "window_s": window,
        "loadavg_at_window_start": [round(x, 2) for x in load_window],
        "deb": str(deb),
        "releases": {r.suite: samples_of(r) for r in rels},
    }
    return res


def _median(r: Release, who: str, key: str) -> float:
    return float(statistics.median(s[who][key] for s in r.trace)) * KIB


def rows_of(rels: Sequence[Release], guests: int, window: float) -> list[Row]:
    rows: list[Row] = []
    for r in rels:
        b = f"system/{r.suite}"
        floor_rss = _median(r, "floor", "VmRSS")
        rss = [s["daemon"]["VmRSS"] * KIB for s in r.trace]
        end = r.trace[-1]
        table = import_table(r.imports)
        top = ", ".join(f"{g['group']} {g['kib'] * 1024 / MB:.1f}" for g in table[:4])
        steps = r.imports["steps"]
        rss_check = max(
            abs(smp[who]["VmRSS"] - smp[who]["Rss"]) * KIB
            for smp in r.trace
            for who in ("daemon", "floor")
        )
        rows += [
            row(
                b,
                f"startup: ExecMainStart -> ActiveEnter ({r.version})",
                "ms",
                r.startup_s,
                scale=1000,
                target=at_most(1000.0, "<= 1 s"),
                note=f"systemctl restart wall {statistics.median(r.restart_wall_s):.2f} s median",
            ),
            row(
                b,
                f"daemon VmRSS, {guests} guests, {window:.0f} s idle ({r.python})",
                "MB",
                rss,
                target=at_most(
                    floor_rss + MARGIN_MB, f"<= floor+10 = {floor_rss + MARGIN_MB:.1f} MB"
                ),
            ),
            Row(
                b,
                "floor VmRSS (dependencies imported, asleep)",
                "MB",
                floor_rss,
                low=min(s["floor"]["VmRSS"] for s in r.trace) * KIB,
                high=max(s["floor"]["VmRSS"] for s in r.trace) * KIB,
                n=len(r.trace),
            ),
            Row(b, "daemon - floor, VmRSS", "MB", statistics.median(rss) - floor_rss, "medians"),
            Row(
                b,
                "daemon PSS",
                "MB",
                _median(r, "daemon", "Pss"),
                n=len(r.trace),
                note=f"Pss_Anon {_median(r, 'daemon', 'Pss_Anon'):.1f} MB",
            ),
            Row(b, "floor PSS", "MB", _median(r, "floor", "Pss"), n=len(r.trace)),
            Row(b, "daemon VmHWM at end", "MB", end["daemon"]["VmHWM"] * KIB, "at end"),
            Row(
                b,
                "daemon RssAnon / floor RssAnon",
                "MB",
                _median(r, "daemon", "RssAnon"),
                note=f"floor {_median(r, 'floor', 'RssAnon'):.1f} MB",
            ),
            Row(
                b,
                "fresh python3: floor + every module the daemon loaded",
                "MB",
                steps[-1][1] * KIB,
                "once",
                note=f"floor alone {steps[1][1] * KIB:.1f} MB, interpreter {steps[0][1] * KIB:.1f} "
                f"MB; {len(steps) - 2} modules; largest (MB): {top}",
            ),
            Row(
                b,
                "daemon CPU over the window",
                "%",
                r.cpu_s["daemon"] / r.cpu_s["window"] * 100,
                "mean",
                target=at_most(0.2, "<= 0.2 %"),
                note=f"{r.cpu_s['daemon']:.2f} s in {r.cpu_s['window']:.0f} s, "
                f"{r.scrapes} scrapes, "
                f"{len(r.censuses)} census(es) in the window; VmRSS vs smaps_rollup Rss: "
                f"{rss_check:.2f} MB at most apart",
            ),
        ]
    return rows


def samples_of(r: Release) -> dict[str, Any]:
    return {
        "version": r.version,
        "python": r.python,
        "port": r.port,
        "startup_s": r.startup_s,
        "restart_wall_s": [round(x, 3) for x in r.restart_wall_s],
        "cpu_s": r.cpu_s,
        "scrapes": r.scrapes,
        "trace": r.trace,
        "daemon_modules": len(r.daemon_modules),
        "import_steps": r.imports.get("steps"),
        "import_table_kib": import_table(r.imports),
        "floor_steps": r.imports.get("floor_steps"),
        "journal_warnings": r.journal_warnings[-20:],
        "censuses_in_window": r.censuses,
    }
