"""Benchmark 7, growth trigger reaction: from the guest's garbage reaching the host image
to the start of the trim the daemon's growth trigger starts.

One running rig guest (the pool's first: qcow2 on virtio-scsi, discard=unmap), trimmed
first so no earlier garbage is pending. A real `virt-trimd run` (this checkout) with one
schedule that has only a growth trigger (no cron, no every: nothing else can fire), over
that guest only, and `census_interval: 10s`.

Each repetition waits a random 0-10 s (so the write lands at a uniformly random point of
the census cycle), then the guest writes JUNK_MIB of zeros (the rig has no detect_zeroes:
zeros are allocated like any data) with fsync, deletes the file and syncs. A thread polls
os.stat of the host image every POLL_S. Hit: the first poll at which the allocation is
GROWTH_MIB above the daemon's baseline, i.e. when the trigger's own condition became true
on the host. The baseline is what the daemon counts from: the first census's allocation,
then the `allocated_after` of the last trim (from its history), checked against os.stat.

Trim start: the record's `started_at` (history, ms), cross-checked with the daemon's
"trimming now" log line (ms stamp) and with the benchmark's clock (the hit comes before
it; the image shrinks after it). The census that fired it is placed on the daemon's
10 s census grid (anchored at READY: the first census runs as the scheduler starts, just
before READY) and checked against the whole-second census stamps in the history, which
splits the reaction into the wait for the next census and the census's own cost.

A census that runs after the threshold is crossed but before the guest's `rm` has
finished trims while the file still exists ("raced"): the reaction is still measured,
but the image keeps the junk, so the benchmark trims the guest itself and restarts the
daemon (fresh baseline) before the next repetition.
"""

from __future__ import annotations

import datetime as dt
import random
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import rig
from bench.common import BenchResult, Row, at_most, row
from bench.daemon import Daemon
from bench.guests import GuestPool
from e2e.daemon_proc import scrape
from support.files import free_port
from support.notify import NotifyReceiver

MIB = 1 << 20
CENSUS_S = 10
GROWTH_MIB = 64
JUNK_MIB = 96
POLL_S = 0.02
QCOW2_CLUSTER = 64 * 1024


def allocated(path: Path) -> int:
    return path.stat().st_blocks * 512


def junk_command() -> list[str]:
    return [
        "/bin/sh",
        "-c",
        f"dd if=/dev/zero of=/mnt/sda/growth-junk bs=1M count={JUNK_MIB} conv=fsync "
        "2>/dev/null && rm /mnt/sda/growth-junk && sync",
    ]


class Poller:
    """os.stat of one file every POLL_S in a thread: (wall time, allocated bytes)."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self.samples: list[tuple[float, int]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="stat-poller", daemon=True)

    def _run(self) -> None:
        while not self._stop.is_set():
            self.samples.append((time.time(), allocated(self.path)))
            self._stop.wait(POLL_S)

    def __enter__(self) -> Poller:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join()

    def first_at_least(self, value: int) -> float | None:
        return next((t for t, a in self.samples if a >= value), None)

    def first_below_after(self, value: int, after: float) -> float | None:
        return next((t for t, a in self.samples if t >= after and a < value), None)


def _sample(
    metrics: dict[tuple[str, tuple[tuple[str, str], ...]], float], name: str, **labels: str
) -> float | None:
    want = set(labels.items())
    for (n, lab), v in metrics.items():
        if n == name and want <= set(lab):
            return v
    return None


def _wait(what: str, timeout: float, fn: Any) -> Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = fn()
        if value:
            return value
        time.sleep(0.2)
    raise RuntimeError(f"timed out after {timeout:.0f}s waiting for {what}")


def _epoch(iso: str) -> float:
    return dt.datetime.fromisoformat(iso.replace("Z", "+00:00")).timestamp()


def _log_stamp(line: str) -> float:
    # stderr format "%(asctime)s ...": local time, milliseconds (as bench.sweep reads it).
    return dt.datetime.strptime(line[:23], "%Y-%m-%d %H:%M:%S,%f").timestamp()


@dataclass
class Instance:
    """One daemon process: where its census grid lies and what its baseline is."""

    daemon: Daemon
    notify: NotifyReceiver
    port: int
    ready_wall: float
    baseline: int


@dataclass
class Rep:
    rep: int
    delay_s: float
    write_start: float
    write_end: float
    baseline: int
    hit: float | None = None
    trim_start: float | None = None
    log_start: float | None = None
    shrink_seen: float | None = None
    census_start: float | None = None
    census_db_ts: int | None = None
    reclaimed_reported: int | None = None
    reclaimed_stat: int | None = None
    raced: bool = False
    notes: list[str] = field(default_factory=list)

    @property
    def reaction(self) -> float | None:
        if self.hit is None or self.trim_start is None:
            return None
        return self.trim_start - self.hit


class GrowthRig:
    """The guest, its image and the daemon instances of one benchmark run."""

    def __init__(self, handle: rig.GuestHandle, work: Path) -> None:
        self.handle = handle
        self.image = handle.images[0]
        self.work = work
        self.state = work / "state"
        self.instances = 0
        self.current: Instance | None = None

    def config(self, port: int) -> Path:
        cfg = self.work / "config.yaml"
        cfg.write_text(
            f"libvirt:\n  uri: {rig.LIBVIRT_URI}\n"
            f"metrics:\n  listen: 127.0.0.1:{port}\n"
            f"state_dir: {self.state}\n"
            "shutdown_grace: 5s\n"
            f"census_interval: {CENSUS_S}s\n"
            # Only a growth trigger: no cron, no every, so every trim here is triggered.
            "schedules:\n  - name: growth\n"
            f"    domains: ['{self.handle.name}']\n"
            f"    growth: {GROWTH_MIB}MiB\n"
            "    timeout: 2m\n"
        )
        return cfg

    def start(self) -> Instance:
        self.instances += 1
        n = self.instances
        port = free_port()
        notify = NotifyReceiver(self.work / f"notify-{n}.sock")
        daemon = Daemon(self.config(port), self.work / f"daemon-{n}.log", notify)
        offset = time.time() - time.monotonic()
        ready = notify.wait_for("READY=1", 60, daemon.proc) + offset

        def census_seen() -> float | None:
            return _sample(scrape(port), "virt_trimd_disk_allocated_bytes", domain=self.handle.name)

        first = _wait("the first census (the growth baseline)", 60, census_seen)
        if abs(int(first) - allocated(self.image)) > MIB:
            raise RuntimeError(f"first census {first} != os.stat {allocated(self.image)}")
        self.current = Instance(daemon, notify, port, ready, int(first))
        return self.current

    def stop(self) -> str:
        inst = self.current
        self.current = None
        if inst is None:
            return ""
        code = inst.daemon.stop()
        inst.notify.close()
        if code != 0:
            raise RuntimeError(f"daemon exited {code}:\n{inst.daemon.log()[-2000:]}")
        return inst.daemon.log()

    def history(self) -> list[Any]:
        from virt_trimd.engine.history import History, HistoryError

        try:
            h = History(self.state, readonly=True)
        except HistoryError:
            return []
        try:
            return h.query(domain=self.handle.name)
        except HistoryError:
            return []
        finally:
            h.close()

    def census_stamps(self) -> list[int]:
        from virt_trimd.engine.history import History

        h = History(self.state, readonly=True)
        try:
            series = h.census_series(0.0)
        finally:
            h.close()
        return sorted({int(p.ts) for pts in series.values() for p in pts})


def one_rep(g: GrowthRig, rep: int, rng: random.Random) -> Rep:
    inst = g.current
    assert inst is not None
    port = inst.port

    def backing_off() -> bool:
        until = _sample(
            scrape(port),
            "virt_trimd_trigger_backoff_until_timestamp_seconds",
            domain=g.handle.name,
        )
        return until is not None and until > time.time()

    if backing_off():
        raise RuntimeError("the guest is in trigger backoff before the repetition")
    known = len(g.history())
    delay = rng.uniform(0, CENSUS_S)
    time.sleep(delay)
    with Poller(g.image) as poll:
        t0 = time.time()
        rig.guest_exec(g.handle.dom, junk_command(), timeout_s=300)
        t1 = time.time()
        r = Rep(rep, delay, t0, t1, inst.baseline)

        def new_record() -> Any:
            recs = g.history()
            return recs[known] if len(recs) > known else None

        rec = _wait("a growth-triggered trim", 120 + CENSUS_S, new_record)
        # Watch the image past the trim's end, to see the shrink on the host.
        time.sleep(
            min(2.0, max(0.0, _epoch(rec.started_at) + rec.duration_seconds + 1 - time.time()))
        )
    r.trim_start = _epoch(rec.started_at)
    if rec.trigger != "growth" or rec.result.value != "success":
        r.notes.append(f"record: trigger {rec.trigger}, result {rec.result.value}: {rec.message}")
    r.hit = poll.first_at_least(inst.baseline + GROWTH_MIB * MIB)
    if r.hit is None:
        r.notes.append("the image never grew by the threshold over the daemon's baseline")
    pre = [a for t, a in poll.samples if t <= r.trim_start]
    if pre:
        r.shrink_seen = poll.first_below_after(pre[-1] - (GROWTH_MIB // 2) * MIB, r.trim_start)
    # Started before the guest's rm had returned, and gave back less than the junk: the
    # census fell between the threshold and the delete (guest_exec's own polling can make
    # t1 late, so the time alone would over-count).
    r.raced = t1 > r.trim_start and rec.reclaimed_bytes < (JUNK_MIB - 8) * MIB
    r.reclaimed_reported = rec.reclaimed_bytes
    after = [d.allocated_after for d in rec.disks if d.allocated_after is not None]
    # os.stat across the trim: the last poll before its start to the first after its end
    # (only when the guest had finished: otherwise its rm lands inside that span).
    post = [a for t, a in poll.samples if t >= r.trim_start + rec.duration_seconds]
    if pre and post and not r.raced:
        r.reclaimed_stat = pre[-1] - post[0]
    # The new baseline: the daemon counts from the trim's allocated_after.
    inst.baseline = sum(after) if after else inst.baseline
    return r


def place_on_grid(r: Rep, ready_wall: float, stamps: list[int], log: str, nth: int) -> None:
    """The census that fired r's trim (on the 10 s grid from READY) and its log line."""
    if r.trim_start is None:
        return
    k = int((r.trim_start - ready_wall) // CENSUS_S)
    r.census_start = ready_wall + k * CENSUS_S
    lines = [ln for ln in log.splitlines() if "trimming now" in ln]
    if nth < len(lines):
        r.log_start = _log_stamp(lines[nth])
    near = [s for s in stamps if r.census_start - 1 <= s <= r.census_start + 1]
    r.census_db_ts = near[0] if near else None
    if r.census_db_ts is None:
        r.notes.append(f"no history census stamp near the inferred census at {r.census_start:.3f}")


def run(pool: GuestPool, workdir: Path, smoke: bool) -> BenchResult:
    reps = 1 if smoke else 5
    res = BenchResult("growth")
    work = workdir / "growth"
    work.mkdir(parents=True)
    (handle,) = pool.ensure(1)
    # Nothing pending from earlier benchmarks: ext4 would reuse those blocks for the junk.
    rig.agent_command(handle.dom, "guest-fstrim", timeout_s=120)
    g = GrowthRig(handle, work)
    rng = random.Random()
    done: list[Rep] = []
    others = pool.other_running_domains()
    inst = g.start()
    per_instance: list[tuple[Instance, list[Rep]]] = [(inst, [])]
    try:
        for i in range(reps):
            r = one_rep(g, i, rng)
            done.append(r)
            per_instance[-1][1].append(r)
            if r.raced and i < reps - 1:
                # The junk outlived the trim: give it back ourselves and start over from a
                # fresh baseline (the daemon would count from one that still holds it).
                log = g.stop()
                _place_all(g, per_instance[-1], log)
                rig.agent_command(handle.dom, "guest-fstrim", timeout_s=120)
                per_instance.append((g.start(), []))
    finally:
        log = g.stop()
    if per_instance[-1][1] and per_instance[-1][1][0].census_start is None:
        _place_all(g, per_instance[-1], log)
    res.samples = {
        "census_interval_s": CENSUS_S,
        "growth_mib": GROWTH_MIB,
        "junk_mib": JUNK_MIB,
        "poll_s": POLL_S,
        "other_running_domains": others,
        "daemon_instances": g.instances,
        "reps": [{**r.__dict__, "reaction": r.reaction} for r in done],
    }
    res.rows = rows(done, others)
    return res


def _place_all(g: GrowthRig, inst_reps: tuple[Instance, list[Rep]], log: str) -> None:
    inst, reps = inst_reps
    stamps = g.census_stamps()
    for nth, r in enumerate(reps):
        place_on_grid(r, inst.ready_wall, stamps, log, nth)


def rows(reps: list[Rep], others: list[str]) -> list[Row]:
    b = "growth"
    reaction = [r.reaction for r in reps if r.reaction is not None]
    wait = [
        r.census_start - r.hit for r in reps if r.census_start is not None and r.hit is not None
    ]
    cost = [
        r.trim_start - r.census_start
        for r in reps
        if r.census_start is not None and r.trim_start is not None
    ]
    log_gap = [
        abs(r.log_start - r.trim_start)
        for r in reps
        if r.log_start is not None and r.trim_start is not None
    ]
    problems = [f"rep {r.rep}: {'; '.join(r.notes)}" for r in reps if r.notes]
    order = [
        f"rep {r.rep}"
        for r in reps
        if r.hit is not None
        and r.trim_start is not None
        and not (r.hit <= r.trim_start and (r.shrink_seen is None or r.shrink_seen >= r.trim_start))
    ]
    raced = sum(r.raced for r in reps)
    mismatch = [
        f"rep {r.rep}: reported {r.reclaimed_reported}, os.stat {r.reclaimed_stat}"
        for r in reps
        if r.reclaimed_stat is not None
        and r.reclaimed_reported is not None
        and abs(r.reclaimed_reported - r.reclaimed_stat) > QCOW2_CLUSTER
    ]
    limit = CENSUS_S + 1.0
    return [
        row(
            b,
            f"garbage on host image -> trim start (census {CENSUS_S}s)",
            "s",
            reaction,
            stat="max",
            target=at_most(limit, f"<= {limit:g} s"),
            note="; ".join(problems + [f"clock order broken: {', '.join(order)}"] * bool(order)),
        ),
        row(b, "same, median", "s", reaction),
        row(b, "wait: hit -> the next census starts (10 s grid from READY)", "s", wait),
        row(
            b,
            "census start -> trim start (census cost to this guest)",
            "s",
            cost,
            note=f"census covers every domain on the host; others running: {len(others)}",
        ),
        row(b, "|started_at - 'trimming now' log stamp|", "ms", log_gap, stat="max", scale=1e3),
        row(
            b,
            "reclaimed: daemon's count - os.stat (non-raced reps)",
            "KiB",
            [
                (r.reclaimed_reported - r.reclaimed_stat) / 1024
                for r in reps
                if r.reclaimed_stat is not None and r.reclaimed_reported is not None
            ],
            stat="max",
            note="; ".join(mismatch) or f"{raced} rep(s) raced the guest's rm (trimmed mid-write)",
        ),
    ]
