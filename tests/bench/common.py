"""Shared pieces of the benchmarks: result rows, statistics, machine facts, /proc readers.

A benchmark returns a `BenchResult`: a few `Row`s (one number each, with its spread,
target and verdict) plus the raw samples, so the table is a summary and the JSON keeps
everything needed to recompute it.
"""

from __future__ import annotations

import math
import os
import platform
import resource
import shutil
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
CLK_TCK = os.sysconf("SC_CLK_TCK")
PAGE_KIB = os.sysconf("SC_PAGE_SIZE") // 1024


@dataclass(frozen=True)
class Target:
    """A goal for one statistic: `value op limit`, e.g. median <= 0.020."""

    op: str  # "<=" or ">="
    limit: float
    text: str  # how the table shows it, e.g. "<= 20 ms"

    def check(self, value: float) -> bool:
        """True when `value` meets the target."""
        return value <= self.limit if self.op == "<=" else value >= self.limit


def at_most(limit: float, text: str) -> Target:
    return Target("<=", limit, text)


def at_least(limit: float, text: str) -> Target:
    return Target(">=", limit, text)


@dataclass
class Row:
    """One line of the results table."""

    bench: str
    metric: str
    unit: str
    value: float  # the headline statistic (median unless `stat` says otherwise)
    stat: str = "median"  # median, p99, max, total, ...
    low: float | None = None  # spread: min or p25 ...
    high: float | None = None  # ... and max or p75
    spread: str = "min-max"  # what low/high are
    n: int = 1
    target: Target | None = None
    passed: bool | None = None
    note: str = ""

    def __post_init__(self) -> None:
        if self.target is not None and self.passed is None and math.isfinite(self.value):
            self.passed = self.target.check(self.value)

    def to_dict(self) -> dict[str, Any]:
        out = asdict(self)
        out["target"] = self.target.text if self.target else None
        return out


@dataclass
class BenchResult:
    """What one benchmark produced."""

    name: str
    rows: list[Row] = field(default_factory=list)
    samples: dict[str, Any] = field(default_factory=dict)
    load_before: tuple[float, float, float] = (0.0, 0.0, 0.0)
    load_after: tuple[float, float, float] = (0.0, 0.0, 0.0)
    seconds: float = 0.0
    skipped: str | None = None  # why the benchmark did not run
    error: str | None = None  # why it failed part-way

    def to_dict(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "rows": [r.to_dict() for r in self.rows],
            "samples": self.samples,
            "load_before": list(self.load_before),
            "load_after": list(self.load_after),
            "seconds": round(self.seconds, 3),
            "skipped": self.skipped,
            "error": self.error,
        }


# -- statistics ------------------------------------------------------------------------


def quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile (q in [0, 1]) of a non-empty sequence."""
    data = sorted(values)
    if not data:
        raise ValueError("quantile of no values")
    pos = q * (len(data) - 1)
    lo = math.floor(pos)
    hi = min(lo + 1, len(data) - 1)
    return data[lo] + (data[hi] - data[lo]) * (pos - lo)


@dataclass(frozen=True)
class Summary:
    """Median and spread of repeated measurements."""

    n: int
    median: float
    min: float
    max: float
    p25: float
    p75: float
    p99: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Summary:
        vals = [float(v) for v in values]
        if not vals:
            nan = float("nan")
            return cls(0, nan, nan, nan, nan, nan, nan)
        return cls(
            n=len(vals),
            median=statistics.median(vals),
            min=min(vals),
            max=max(vals),
            p25=quantile(vals, 0.25),
            p75=quantile(vals, 0.75),
            p99=quantile(vals, 0.99),
        )


def row(  # noqa: PLR0913  (keyword-only presentation knobs with defaults)
    bench: str,
    metric: str,
    unit: str,
    values: Sequence[float],
    *,
    scale: float = 1.0,
    stat: str = "median",
    spread: str = "min-max",
    target: Target | None = None,
    note: str = "",
) -> Row:
    """A Row from raw samples; `scale` converts units (e.g. 1000 for s -> ms)."""
    s = Summary.of([v * scale for v in values])
    value = {"median": s.median, "p99": s.p99, "max": s.max, "min": s.min}[stat]
    low, high = (s.p25, s.p75) if spread == "IQR" else (s.min, s.max)
    if stat == "p99":
        low, high, spread = s.median, s.max, "p50-max"
    return Row(bench, metric, unit, value, stat, low, high, spread, s.n, target, note=note)


# -- machine ---------------------------------------------------------------------------


def loadavg() -> tuple[float, float, float]:
    one, five, fifteen = os.getloadavg()
    return (round(one, 2), round(five, 2), round(fifteen, 2))


def _version_of(argv: Sequence[str]) -> str:
    if shutil.which(argv[0]) is None:
        return "missing"
    try:
        out = subprocess.run(argv, capture_output=True, text=True, timeout=10, check=False)
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return (out.stdout or out.stderr).strip().splitlines()[0] if (out.stdout or out.stderr) else "?"


def _git_revision() -> str:
    """HEAD of the checkout being measured, with "-dirty" when the tree has changes."""
    try:
        out = subprocess.run(
            ["git", "-C", str(ROOT), "describe", "--always", "--dirty"],
            capture_output=True,
            text=True,
            timeout=10,
            check=False,
        )
    except (OSError, subprocess.TimeoutExpired):
        return "?"
    return out.stdout.strip() or "?"


def machine_facts() -> dict[str, Any]:
    """What the numbers were measured on."""
    mem_kib = 0
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                mem_kib = int(line.split()[1])
    except OSError:
        pass
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return {
        "cpus": os.cpu_count(),
        "cpu_model": model,
        "mem_gib": round(mem_kib / (1 << 20), 1),
        "kernel": platform.release(),
        "python": sys.version.split()[0],
        "qemu": _version_of(["qemu-system-x86_64", "--version"]),
        "libvirt": _version_of(["virsh", "--version"]),
        "loadavg_at_start": loadavg(),
        "git": _git_revision(),
        "virt_trimd": str(package_dir()),
        "time": time.strftime("%Y-%m-%d %H:%M:%S %Z"),
    }


# -- CPU and memory of processes ---------------------------------------------------------


@dataclass(frozen=True)
class CpuTimes:
    """CPU seconds of this process plus its waited-for children."""

    self_s: float
    children_s: float

    @property
    def total_s(self) -> float:
        return self.self_s + self.children_s


def cpu_now() -> CpuTimes:
    kids = resource.getrusage(resource.RUSAGE_CHILDREN)
    return CpuTimes(time.process_time(), kids.ru_utime + kids.ru_stime)


@contextmanager
def measure_cpu() -> Iterator[dict[str, float]]:
    """`with measure_cpu() as m:` -> m["cpu_s"], m["self_s"], m["children_s"], m["wall_s"]."""
    out: dict[str, float] = {}
    before = cpu_now()
    t0 = time.perf_counter()
    try:
        yield out
    finally:
        wall = time.perf_counter() - t0
        after = cpu_now()
        out["self_s"] = after.self_s - before.self_s
        out["children_s"] = after.children_s - before.children_s
        out["cpu_s"] = out["self_s"] + out["children_s"]
        out["wall_s"] = wall


def proc_cpu_seconds(pid: int, children: bool = True) -> float:
    """utime+stime (and, by default, waited-for children) of pid from /proc/PID/stat."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    # After the ')' field 3 (state) is index 0: utime=14 -> 11, stime 12, cutime 13, cstime 14.
    ticks = int(fields[11]) + int(fields[12])
    if children:
        ticks += int(fields[13]) + int(fields[14])
    return ticks / CLK_TCK


def proc_status_kib(pid: int) -> dict[str, int]:
    """The kB fields of /proc/PID/status we report (VmRSS, VmHWM, RssAnon, RssFile...)."""
    out: dict[str, int] = {}
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key, _, rest = line.partition(":")
        if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile", "RssShmem", "VmSize", "Threads"):
            out[key] = int(rest.split()[0])
    return out


def proc_pss_kib(pid: int) -> int | None:
    """Proportional set size (shared pages divided among their users), or None."""
    try:
        for line in Path(f"/proc/{pid}/smaps_rollup").read_text().splitlines():
            if line.startswith("Pss:"):
                return int(line.split()[1])
    except OSError:
        return None
    return None


# -- whole processes under /usr/bin/time ---------------------------------------------------

TIME_FORMAT = "wall=%e user=%U sys=%S maxrss_kib=%M"


def gnu_time_argv(out_file: Path) -> list[str]:
    """Prefix that runs a command under GNU time (Debian `time`), results in out_file."""
    gnu_time = shutil.which("time", path="/usr/bin") or "/usr/bin/time"
    return [gnu_time, "-o", str(out_file), "-f", TIME_FORMAT]


def parse_gnu_time(path: Path) -> dict[str, float]:
    """Parse TIME_FORMAT output (the last line: GNU time may prepend 'Command exited...')."""
    lines = [ln for ln in path.read_text().splitlines() if ln.startswith("wall=")]
    if not lines:
        raise ValueError(f"no GNU time output in {path}")
    out: dict[str, float] = {}
    for part in lines[-1].split():
        key, _, value = part.partition("=")
        out[key] = float(value)
    out["cpu_s"] = out["user"] + out["sys"]
    return out


def package_dir() -> Path:
    """Directory holding the virt_trimd package this harness imported (PYTHONPATH decides)."""
    import virt_trimd

    return Path(virt_trimd.__file__).resolve().parents[1]


def env_with_package() -> dict[str, str]:
    """Environment whose subprocesses run the same virt_trimd as this process, outside systemd."""
    env = dict(os.environ)
    paths = [str(package_dir()), str(ROOT / "tests")]
    if env.get("PYTHONPATH"):
        paths.append(env["PYTHONPATH"])
    env["PYTHONPATH"] = os.pathsep.join(paths)
    for var in ("NOTIFY_SOCKET", "WATCHDOG_USEC", "WATCHDOG_PID", "JOURNAL_STREAM"):
        env.pop(var, None)
    return env


def timed(fn: Callable[[], Any]) -> tuple[float, Any]:
    """(wall seconds, result) of fn()."""
    t0 = time.perf_counter()
    result = fn()
    return time.perf_counter() - t0, result
