"""A fleet of hosts on one storage, one night, in simulated time.

Each host runs the daemon's own placement and ordering code: the start offsets come
from ``engine.storage_group.sweep_offsets`` (which falls back to
``engine.schedule.spread_offset`` outside a group) and the order in which the
schedule's workers take guests from ``engine.sweep.start_order``. What is modelled
rather than run is only what happens between those calls in ``engine.sweep.run_sweep``:
``concurrency`` workers, each taking the next guest in start order as soon as it is
free, waiting until that guest's offset and then holding the worker for the trim's
duration. Nothing sleeps; time is a number.

Trim durations: each guest's last-night duration (what the daemon keeps as
``last_duration`` and passes as ``expected_seconds``) is drawn from a log-normal
distribution (median 20 s, sigma 0.5: mean 22.7 s, 99th percentile 64 s); tonight's
is last night's times a log-normal factor (median 1, sigma ``noise``: 0 for a fleet
whose trims take as long every night, 0.25 for one where they do not), so the layout
plans with yesterday's numbers and pays for today's. Seeded: the tables repeat.
"""

from __future__ import annotations

import dataclasses
import heapq
import math
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass

from virt_trimd.config.model import StorageGroupConfig
from virt_trimd.engine.storage_group import SweepLayout, slot_of, sweep_offsets
from virt_trimd.engine.sweep import start_order
from virt_trimd.records import AgentChannel, DomainInfo

SCHEDULE = "nightly"
MEDIAN_SECONDS = 20.0
SIGMA = 0.5
NOISES = (0.0, 0.25)  # night-to-night sigma of each guest's trim duration
HEADROOM = 1.15  # at_once is the ideal concurrency times this, rounded up
STRATEGIES = ("same-cron", "per-host", "storage-group")


@dataclass(frozen=True)
class Trim:
    """One simulated trim: which host, when it held a worker, inside which window."""

    host: str
    start_seconds: float
    end_seconds: float


@dataclass(frozen=True)
class Outcome:
    """One strategy's night on the shared storage."""

    strategy: str
    hosts: int
    guests_per_host: int
    window_seconds: float
    at_once: int | None
    ideal: float  # total trim seconds / window: the mean concurrency of a perfect spread
    peak: int
    p99: int
    span_seconds: float  # first start to last end
    late_hosts: int  # hosts that started a trim after their window had closed
    overrun_hosts: int  # hosts whose last trim ended after the window
    trims: tuple[Trim, ...]

    @property
    def ideal_ceiling(self) -> int:
        return math.ceil(self.ideal - 1e-9)

    @property
    def target_met(self) -> bool:
        """The issue's target: peak <= 1.25 x the ideal's ceiling, no sweep pushed out."""
        return self.peak <= 1.25 * self.ideal_ceiling and self.late_hosts == 0


def _domains(host: str, count: int) -> list[DomainInfo]:
    agent = AgentChannel(configured=True, state="connected")
    return [
        DomainInfo(name=f"{host}-vm{j:02d}", uuid=f"{host}-uuid-{j:02d}", running=True,
                   disks=(), agent=agent)
        for j in range(count)
    ]  # fmt: skip


@dataclass(frozen=True)
class Night:
    """The night's settings, the same for every host."""

    window_seconds: float = 3600.0
    concurrency: int = 2  # the schedule's workers per host
    noise: float = 0.25  # night-to-night sigma of each guest's trim duration
    seed: int = 13


def host_sweep(
    group: StorageGroupConfig,
    host: str,
    expected: dict[str, float],
    durations: dict[str, float],
    night: Night,
) -> list[Trim]:
    """One host's sweep as run_sweep would run it: planned with ``expected`` (last
    night's seconds by UUID), run with ``durations`` (tonight's)."""
    domains = _domains(host, len(durations))
    layout = SweepLayout(host, SCHEDULE, [d.uuid for d in domains], night.window_seconds, expected)
    _, offsets = sweep_offsets(group, layout)
    order = start_order(domains, lambda d: offsets[d.uuid], lambda d: expected[d.uuid])
    concurrency = night.concurrency
    free_at = [0.0] * max(1, concurrency)  # a heap of when each worker is next free
    trims: list[Trim] = []
    for dom in order:
        worker_free = heapq.heappop(free_at)
        start = max(worker_free, offsets[dom.uuid])
        end = start + durations[dom.uuid]
        heapq.heappush(free_at, end)
        trims.append(Trim(host, start, end))
    return trims


def concurrency_profile(trims: Iterable[Trim]) -> tuple[int, int, float]:
    """(peak, time-weighted 99th percentile, span) of the trims running at once."""
    events = sorted(
        [(t.start_seconds, 1) for t in trims] + [(t.end_seconds, -1) for t in trims],
        key=lambda e: (e[0], e[1]),  # an end at the same instant as a start goes first
    )
    if not events:
        return 0, 0, 0.0
    running = peak = 0
    held: dict[int, float] = {}
    last = events[0][0]
    for when, change in events:
        held[running] = held.get(running, 0.0) + when - last
        last = when
        running += change
        peak = max(peak, running)
    total = sum(held.values())
    seen = 0.0
    p99 = 0
    for level in sorted(held):
        seen += held[level]
        if seen >= 0.99 * total:
            p99 = level
            break
    return peak, p99, events[-1][0] - events[0][0]


def at_once_for(ideal: float) -> int:
    """The at_once an operator would pick: the ideal concurrency plus headroom.

    ``ideal`` is what Prometheus already shows them: the group's trim seconds per
    night over the window (docs/fleet.md has the query).
    """
    return max(1, math.ceil(ideal * HEADROOM))


def simulate(
    hosts: int,
    guests_per_host: int,
    night: Night | None = None,
    strategies: Sequence[str] = STRATEGIES,
) -> list[Outcome]:
    """Every strategy over the same hosts, guests and durations."""
    night = night or Night()
    window_seconds, noise, seed = night.window_seconds, night.noise, night.seed
    rng = random.Random(seed)
    names = [f"hv{i:03d}" for i in range(hosts)]
    expected = {
        h: {
            d.uuid: rng.lognormvariate(math.log(MEDIAN_SECONDS), SIGMA)
            for d in _domains(h, guests_per_host)
        }
        for h in names
    }
    durations = {
        h: {u: s * rng.lognormvariate(0.0, noise) for u, s in e.items()}
        for h, e in expected.items()
    }
    ideal = sum(sum(d.values()) for d in durations.values()) / window_seconds
    outcomes = []
    for strategy in strategies:
        window = 0.0 if strategy == "same-cron" else window_seconds
        tonight = dataclasses.replace(night, window_seconds=window)
        at_once: int | None = None
        group = StorageGroupConfig()
        if strategy == "storage-group":
            at_once = at_once_for(ideal)
            group = StorageGroupConfig(name="shared", members=tuple(names), at_once=at_once)
        trims = [t for h in names for t in host_sweep(group, h, expected[h], durations[h], tonight)]
        peak, p99, span = concurrency_profile(trims)
        late = {t.host for t in trims if t.start_seconds > window_seconds}
        overrun = {t.host for t in trims if t.end_seconds > window_seconds}
        outcomes.append(
            Outcome(strategy, hosts, guests_per_host, window_seconds, at_once, ideal, peak,
                    p99, span, len(late), len(overrun), tuple(trims))
        )  # fmt: skip
    return outcomes


def share_violations(outcome: Outcome, group: StorageGroupConfig) -> list[str]:
    """Trims of a storage-group night that started outside their host's share."""
    problems = []
    for trim in outcome.trims:
        slot = slot_of(group, trim.host)
        if slot is None:
            problems.append(f"{trim.host}: not a member")
            continue
        start, length = slot.seconds(outcome.window_seconds)
        into = (trim.start_seconds - start) % outcome.window_seconds
        if into >= length + 1e-6 and trim.start_seconds <= outcome.window_seconds:
            problems.append(f"{trim.host}: started at {trim.start_seconds:.0f}s, outside")
    return problems


def markdown_table(outcomes: Sequence[Outcome]) -> str:
    """The docs/fleet.md table: one row per (hosts, guests, strategy)."""
    lines = [
        "| hosts x guests | strategy | at_once | ideal (ceiling) | peak | p99 | span | "
        "hosts starting late | hosts ending late | target |",
        "| --- | --- | --- | --- | --- | --- | --- | --- | --- | --- |",
    ]
    for o in outcomes:
        target = "met" if o.target_met else "missed"
        if o.strategy != "storage-group":
            target = f"({target})"
        lines.append(
            f"| {o.hosts} x {o.guests_per_host} | {o.strategy} | {o.at_once or '-'} | "
            f"{o.ideal:.1f} ({o.ideal_ceiling}) | {o.peak} | {o.p99} | "
            f"{o.span_seconds / 60:.0f} min | {o.late_hosts} | {o.overrun_hosts} | {target} |"
        )
    return "\n".join(lines) + "\n"


def main(argv: Sequence[str] | None = None) -> int:
    """`python3 -m sim [--smoke]`: print one table per night-to-night noise.

    Exit status 0 whatever the figures (targets are reported, not enforced, as in
    `make bench`), 2 on bad arguments.
    """
    import argparse

    parser = argparse.ArgumentParser(prog="python3 -m sim", description=__doc__)
    parser.add_argument("--smoke", action="store_true", help="small fleets only")
    parser.add_argument("--window", type=float, default=3600.0, help="seconds (3600)")
    parser.add_argument("--concurrency", type=int, default=2, help="per host (2)")
    args = parser.parse_args(argv)
    sizes = [(3, 4), (10, 20)] if args.smoke else [(n, m) for n in (10, 50, 200)
                                                    for m in (20, 40)]  # fmt: skip
    for noise in NOISES:
        outcomes = [
            o for n, m in sizes for o in simulate(n, m, Night(args.window, args.concurrency, noise))
        ]
        print(
            f"\nWindow {args.window / 60:g} min, concurrency {args.concurrency} per host, "
            f"night-to-night sigma {noise:g}:\n\n{markdown_table(outcomes)}",
            end="",
        )
    return 0
