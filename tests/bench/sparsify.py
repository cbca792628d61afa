"""Benchmark 6, offline reclaim overhead: `virt-trimd sparsify DOMAIN` against a bare
`virt-sparsify --in-place --format qcow2` of an identical image.

One rig guest (one qcow2 disk on virtio-scsi) boots once, so its own init deletes the
rig's random garbage without discard (the host keeps the blocks), then is stopped. Its
image is copied once to a master beside nothing else; before every run the domain's
image is overwritten with a fresh `cp --sparse=always` of the master, fsynced, and its
allocation checked to equal the first copy's, so every run starts from the same bytes.

Three sides, each repetition in a rotated order (each goes first, second and third in
turn), after one unmeasured warm-up run (the appliance's files into the page cache):
- virt-trimd: `python -m virt_trimd sparsify --json DOMAIN` of this checkout (a process
  start like the `virt-trimd` entry point) with `offline.runner: subprocess`, what a root
  shell gets (no systemd unit here), so its virt-sparsify runs under its default
  `nice -n 10`, `ionice -c 3` and `prlimit --cpu=3600`;
- bare: `virt-sparsify --in-place --format qcow2 -- IMAGE`;
- bare-limited: the same under the very wrapper virt-trimd puts around it, which tells
  the product's own work apart from the lower priority it deliberately runs at.
All under LIBGUESTFS_BACKEND_SETTINGS=force_tcg (libguestfs picks KVM here and its
appliance hangs): virt-trimd gets it through its config's `offline.environment`, as an
operator would set it, the bare sides through their environment.

Each side is one child process reaped with os.wait4: wall time from spawn to reap, and
the child's rusage, whose ru_maxrss is the largest RSS in its waited-for tree (the
appliance's QEMU, which libguestfs waits for). Bytes reclaimed are each side's os.stat
delta (st_blocks * 512); virt-trimd's own figure is checked against it.

Where virt-trimd's extra time goes is measured apart from the appliance runs: the inner
virt-sparsify wall (its own "running" and "exit" log lines, ms stamps), a `--dry-run` of
the same domain (every check and the measurement, no appliance), `--version` (the
interpreter and imports), and the lock probe (qemu-img info) and neighbours scan in this
process.
"""

from __future__ import annotations

import contextlib
import datetime as dt
import json
import os
import shutil
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rig
from bench.common import BenchResult, Row, at_most, env_with_package, row
from bench.guests import GuestPool

MIB = 1 << 20
TCG = ("LIBGUESTFS_BACKEND_SETTINGS", "force_tcg")
QCOW2_CLUSTER = 64 * 1024
TARGET_RATIO = 1.05
SIDES = ("virt-trimd", "bare", "bare-limited")


@dataclass
class Run:
    """One timed child process: wall, CPU and peak RSS of its tree, and what it reclaimed."""

    side: str  # "virt-trimd", "bare" or "bare-limited"
    rep: int
    wall_s: float
    cpu_s: float
    maxrss_kib: int
    returncode: int
    allocated_before: int
    allocated_after: int
    reported_bytes: int | None = None  # virt-trimd's own figure
    inner_s: float | None = None  # virt-sparsify's wall inside virt-trimd (its log stamps)
    notes: list[str] = field(default_factory=list)

    @property
    def reclaimed(self) -> int:
        return self.allocated_before - self.allocated_after


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def fresh_copy(master: Path, image: Path) -> int:
    """Overwrite `image` with a sparse copy of `master`, fsync it; return its allocation."""
    subprocess.run(["cp", "--sparse=always", str(master), str(image)], check=True)
    fd = os.open(image, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
    os.sync()  # the copy's writeback must not land inside the next timed run
    return allocated(image)


def timed_child(argv: list[str], env: dict[str, str], out: Path, err: Path) -> tuple[float, Any]:
    """(wall, (status, rusage)) of argv, reaped with wait4 so its rusage is its own tree's."""
    with out.open("wb") as fo, err.open("wb") as fe:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, stdin=subprocess.DEVNULL, stdout=fo, stderr=fe, env=env)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
    proc.returncode = os.waitstatus_to_exitcode(status)  # reaped here, not by Popen
    return wall, (proc.returncode, usage)


def _stamp(line: str) -> float:
    # The CLI's stderr format: "%(asctime)s ..." in local time with milliseconds.
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


def inner_seconds(log: str) -> float | None:
    """virt-sparsify's wall inside virt-trimd: its "running" line to its "exit" line."""
    start = end = None
    for line in log.splitlines():
        if "virt_trimd.sparsify:" in line and ": running " in line and start is None:
            start = _stamp(line)
        if "virt_trimd.sparsify:" in line and "virt-sparsify exit" in line:
            end = _stamp(line)
    return end - start if start is not None and end is not None else None


class Sides:
    """The two commands under comparison, on one domain's one image."""

    def __init__(self, domain: str, image: Path, work: Path) -> None:
        self.domain = domain
        self.image = image
        self.work = work
        self.config = work / "config.yaml"
        self.config.write_text(
            f"libvirt:\n  uri: {rig.LIBVIRT_URI}\n"
            f"state_dir: {work / 'state'}\n"
            "offline:\n  runner: subprocess\n  timeout: 10m\n"
            f"  environment: ['{TCG[0]}={TCG[1]}']\n"
        )
        self.trimd_env = env_with_package()
        self.trimd_env.pop(TCG[0], None)  # from the config only, as an operator sets it
        self.bare_env = dict(os.environ, **{TCG[0]: TCG[1]})

    def trimd_argv(self, *extra: str) -> list[str]:
        return [
            sys.executable,
            "-m",
            "virt_trimd",
            "--log-level",
            "DEBUG",  # for the inner virt-sparsify's start and exit stamps; same work
            "sparsify",
            "--config",
            str(self.config),
            "--json",
            *extra,
            self.domain,
        ]

    def run(self, side: str, rep: int, before: int) -> Run:
        out, err = self.work / f"{side}-{rep}.out", self.work / f"{side}-{rep}.err"
        bare = ["virt-sparsify", "--in-place", "--format", "qcow2", "--", str(self.image)]
        if side == "virt-trimd":
            argv, env = self.trimd_argv(), self.trimd_env
        elif side == "bare-limited":
            # The very wrapper virt-trimd's subprocess runner puts around it, at its
            # defaults (nice -n 10, ionice -c 3, prlimit --cpu=3600).
            from virt_trimd.host.sparsify import limited_argv
            from virt_trimd.records import SparsifyLimits

            argv, env = list(limited_argv(bare, SparsifyLimits())), self.bare_env
        else:
            argv, env = bare, self.bare_env
        wall, (code, usage) = timed_child(argv, env, out, err)
        run = Run(
            side=side,
            rep=rep,
            wall_s=wall,
            cpu_s=usage.ru_utime + usage.ru_stime,
            maxrss_kib=int(usage.ru_maxrss),
            returncode=code,
            allocated_before=before,
            allocated_after=allocated(self.image),
        )
        if code != 0:
            run.notes.append(f"exit {code}: {err.read_text(errors='replace')[-500:]}")
        if side == "virt-trimd":
            try:
                doc = json.loads(out.read_text())
                (rec,) = doc["domains"]
                run.reported_bytes = int(doc["reclaimed_bytes"])
                if rec["result"] != "success":
                    run.notes.append(f"result {rec['result']}: {rec['message']}")
            except (ValueError, KeyError) as exc:
                run.notes.append(f"no JSON record: {exc}")
            run.inner_s = inner_seconds(err.read_text(errors="replace"))
        return run

    def dry_run_seconds(self) -> float:
        t0 = time.perf_counter()
        proc = subprocess.run(
            self.trimd_argv("--dry-run"), capture_output=True, env=self.trimd_env, check=False
        )
        wall = time.perf_counter() - t0
        if proc.returncode != 0:
            raise RuntimeError(f"sparsify --dry-run failed: {proc.stderr[-500:]!r}")
        return wall

    def version_seconds(self) -> float:
        t0 = time.perf_counter()
        subprocess.run(
            [sys.executable, "-m", "virt_trimd", "--version"],
            capture_output=True,
            env=self.trimd_env,
            check=True,
        )
        return time.perf_counter() - t0


def _in_process_checks(image: Path, reps: int) -> dict[str, list[float]]:
    """The lock probe (a qemu-img info) and the neighbours scan, timed in this process."""
    from virt_trimd.host.sparsify import image_facts, image_lock_conflict, neighbours
    from virt_trimd.records import QemuImgLimits

    out: dict[str, list[float]] = {"lock_probe_s": [], "neighbours_scan_s": []}
    for _ in range(reps):
        t0 = time.perf_counter()
        if image_lock_conflict(str(image), "qcow2", QemuImgLimits()) is not None:
            raise RuntimeError(f"{image} is locked by another process")
        out["lock_probe_s"].append(time.perf_counter() - t0)
        t0 = time.perf_counter()
        for p in neighbours(str(image)):
            with contextlib.suppress(OSError):
                image_facts(p)
        out["neighbours_scan_s"].append(time.perf_counter() - t0)
    return out


def prepare(pool: GuestPool, work: Path, smoke: bool) -> tuple[rig.GuestHandle, Path]:
    """Boot the guest once (its init deletes the garbage), stop it; copy its image to a master."""
    size_mib, garbage_mib = (512, 120) if smoke else (1024, 200)
    spec = rig.GuestSpec(
        "bench-sparsify",
        disks=(rig.DiskSpec(fmt="qcow2", bus="scsi", garbage_mib=garbage_mib, size_mib=size_mib),),
        memory_mib=160,
    )
    boot = rig.build_boot_files(rig.default_cache_dir())
    pool.extra_domains.append(spec.domain_name)  # removed by pool.close() whatever happens
    (handle,) = rig.start_guests(pool.conn, [spec], work / "guest", boot, timeout_s=300)
    rig.guest_exec(handle.dom, ["/bin/sync"])
    handle.dom.destroy()
    master_dir = work / "master"  # not beside the image: it would be a neighbour to scan
    master_dir.mkdir()
    master = master_dir / "master.qcow2"
    subprocess.run(["cp", "--sparse=always", str(handle.images[0]), str(master)], check=True)
    if allocated(master) < garbage_mib * MIB:
        raise RuntimeError(f"master holds {allocated(master)} bytes: the garbage is not in it")
    return handle, master


def run(pool: GuestPool, workdir: Path, smoke: bool) -> BenchResult:
    if shutil.which("virt-sparsify") is None:
        raise RuntimeError(
            "virt-sparsify not found: install libguestfs-tools (.ci/install-deps.sh)"
        )
    reps = 1 if smoke else 5
    res = BenchResult("sparsify")
    work = workdir / "sparsify"
    work.mkdir(parents=True)
    handle, master = prepare(pool, work, smoke)
    image = handle.images[0]
    sides = Sides(handle.name, image, work)
    # One unmeasured run first: the appliance's files come into the page cache (and
    # supermin builds its appliance if it must), which the first measured run would pay.
    expected = fresh_copy(master, image)
    warmup = sides.run("bare", -1, expected)
    runs: list[Run] = []
    for rep in range(reps):
        # Each side goes first, second and third in turn (a rotation), against drift.
        order = SIDES[rep % 3 :] + SIDES[: rep % 3]
        for side in order:
            before = fresh_copy(master, image)
            if before != expected:
                raise RuntimeError(f"fresh copy allocates {before} bytes, the first {expected}")
            runs.append(sides.run(side, rep, before))
    fresh_copy(master, image)
    overhead = {
        "dry_run_s": [sides.dry_run_seconds() for _ in range(3)],
        "version_s": [sides.version_seconds() for _ in range(3)],
        **_in_process_checks(image, 3),
    }
    res.samples = {
        "runs": [{**r.__dict__, "reclaimed": r.reclaimed} for r in runs],
        "warmup": {**warmup.__dict__, "reclaimed": warmup.reclaimed},
        "image_allocated_before": expected,
        "image_virtual_mib": 512 if smoke else 1024,
        "overhead_parts": overhead,
    }
    res.rows = rows(runs, overhead)
    return res


def rows(runs: list[Run], overhead: dict[str, list[float]]) -> list[Row]:
    b = "sparsify"
    by_side = {side: [r for r in runs if r.side == side] for side in SIDES}
    trimd, bare, limited = by_side["virt-trimd"], by_side["bare"], by_side["bare-limited"]
    by_rep = {(r.rep, r.side): r for r in runs}

    def paired(other: str, attr: str) -> list[float]:
        out = []
        for r in trimd:
            o = by_rep.get((r.rep, other))
            if o is not None and getattr(o, attr) > 0:
                out.append(getattr(r, attr) / getattr(o, attr))
        return out

    failures = [f"{r.side} rep {r.rep}: {'; '.join(r.notes)}" for r in runs if r.notes]
    outside = [r.wall_s - r.inner_s for r in trimd if r.inner_s is not None]
    inner = [r.inner_s for r in trimd if r.inner_s is not None]
    mismatch = [
        f"rep {r.rep}: reported {r.reported_bytes}, os.stat {r.reclaimed}"
        for r in trimd
        if r.reported_bytes is None or abs(r.reported_bytes - r.reclaimed) > QCOW2_CLUSTER
    ]
    same = {r.reclaimed for r in runs}
    return [
        row(
            b,
            "wall virt-trimd / bare virt-sparsify (paired per repetition)",
            "x",
            paired("bare", "wall_s"),
            target=at_most(TARGET_RATIO, f"<= {TARGET_RATIO}x"),
            note="; ".join(failures),
        ),
        row(
            b,
            "wall virt-trimd / bare under virt-trimd's nice+ionice+prlimit",
            "x",
            paired("bare-limited", "wall_s"),
        ),
        row(b, "wall: virt-trimd sparsify DOMAIN", "s", [r.wall_s for r in trimd]),
        row(b, "wall: its inner virt-sparsify (log stamps)", "s", inner),
        row(b, "wall: bare virt-sparsify --in-place", "s", [r.wall_s for r in bare]),
        row(b, "wall: bare, nice -n 10 ionice -c 3 prlimit", "s", [r.wall_s for r in limited]),
        row(b, "CPU virt-trimd / bare (paired; rusage of each tree)", "x", paired("bare", "cpu_s")),
        row(b, "CPU: bare virt-sparsify (rusage of its tree)", "s", [r.cpu_s for r in bare]),
        row(
            b,
            "peak RSS, bare run (wait4 ru_maxrss: the appliance's QEMU)",
            "MB",
            [r.maxrss_kib * 1024 / 1e6 for r in bare],
        ),
        row(
            b,
            "peak RSS, virt-trimd run (same measure, whole tree)",
            "MB",
            [r.maxrss_kib * 1024 / 1e6 for r in trimd],
        ),
        row(
            b,
            "reclaimed by virt-trimd (os.stat delta)",
            "MiB",
            [r.reclaimed / MIB for r in trimd],
            note="; ".join(mismatch) or "virt-trimd's reported bytes = os.stat delta within 64 KiB",
        ),
        row(
            b,
            "reclaimed by bare virt-sparsify (os.stat delta)",
            "MiB",
            [r.reclaimed / MIB for r in bare + limited],
            note=(
                "every run of every side reclaimed the same bytes"
                if len(same) == 1
                else f"runs differ: {sorted(same)}"
            ),
        ),
        row(b, "virt-trimd outside its virt-sparsify (wall - inner)", "s", outside),
        row(b, "virt-trimd sparsify --dry-run (checks + measure)", "s", overhead["dry_run_s"]),
        row(b, "python -m virt_trimd --version (interpreter+imports)", "s", overhead["version_s"]),
        row(b, "lock probe (qemu-img info), in process", "ms", overhead["lock_probe_s"], scale=1e3),
        row(b, "neighbours scan, in process", "ms", overhead["neighbours_scan_s"], scale=1e3),
    ]
