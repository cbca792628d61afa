"""`python3 -m bench [--smoke] [--only NAME] [--json FILE]`: run the benchmarks, print a table.

Exit status 0 when every selected benchmark ran (whatever the numbers: targets are
reported, not enforced), 1 when one failed or could not run, 2 on bad arguments.
"""

from __future__ import annotations

import argparse
import importlib
import json
import logging
import math
import sys
import tempfile
import time
import traceback
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import TextIO

from bench.common import BenchResult, Row, loadavg, machine_facts


@dataclass(frozen=True)
class Bench:
    name: str
    needs_guests: bool
    what: str
    module: str = ""  # tests/bench/<module>.py, default the name with - as _

    @property
    def module_name(self) -> str:
        return "bench." + (self.module or self.name.replace("-", "_"))


BENCHES: tuple[Bench, ...] = (
    Bench("census", False, "measurement cost: census of image files, stat+cache vs qemu-img"),
    Bench("scrape", False, "/metrics latency and size with a large injected state"),
    Bench("startup", False, "exec to READY=1 on a real NOTIFY_SOCKET"),
    Bench("scale", False, "our code's growth: 100/1,000/5,000 stand-in domains x 4 disks"),
    Bench("sweep", True, "sweep time on N real guests: run --once K=1/K=4 vs the shell loop"),
    Bench(
        "daemon-sweep",
        True,
        "resident daemon's scheduled sweep (K=1/2/4) vs the shell loop, alternating",
    ),
    Bench("overhead", True, "per-guest overhead over the raw guest-fstrim round trip"),
    Bench("idle", True, "idle daemon RSS and CPU with running guests"),
    Bench("sparsify", True, "virt-trimd sparsify vs bare virt-sparsify --in-place, same image"),
    Bench("growth", True, "growth trigger: garbage on the host image to the trim's start"),
    Bench(
        "system",
        True,
        "packaged service in Debian 12/13 containers: idle RSS vs the floor, systemd start-up",
    ),
)
NAMES = [b.name for b in BENCHES]


def _runner(name: str) -> Callable[..., BenchResult]:
    # Imported on use: the guest benchmarks need libvirt, the others must not.
    bench = next(b for b in BENCHES if b.name == name)
    run: Callable[..., BenchResult] = importlib.import_module(bench.module_name).run
    return run


def run_selected(
    selected: Sequence[str], smoke: bool, workdir: Path, with_guests: bool, err: TextIO
) -> list[BenchResult]:
    results: list[BenchResult] = []
    pool = None
    try:
        for name in selected:
            bench = next(b for b in BENCHES if b.name == name)
            res: BenchResult
            err.write(f"bench: {name}: {bench.what} ...\n")
            err.flush()
            load_before = loadavg()
            t0 = time.monotonic()
            if bench.needs_guests and not with_guests:
                res = BenchResult(name, skipped="--no-guests")
            else:
                try:
                    fn = _runner(name)
                    if bench.needs_guests:
                        if pool is None:
                            from bench.guests import GuestPool

                            pool = GuestPool(workdir)
                            pool.open()
                        res = fn(pool, workdir, smoke)
                    else:
                        res = fn(workdir, smoke)
                except Exception as exc:
                    traceback.print_exc(file=err)
                    res = BenchResult(name, error=f"{type(exc).__name__}: {exc}")
            res.load_before = load_before
            res.load_after = loadavg()
            res.seconds = time.monotonic() - t0
            err.write(f"bench: {name}: done in {res.seconds:.0f}s, load {res.load_after[0]}\n")
            results.append(res)
    finally:
        if pool is not None:
            pool.close()
    return results


def _fmt(value: float | None) -> str:
    if value is None or not math.isfinite(value):
        return "-"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    if abs(value) >= 1:
        return f"{value:.2f}"
    return f"{value:.3g}"


def format_table(results: Sequence[BenchResult]) -> str:
    """The human-readable table: one line per row, skipped/failed benchmarks noted."""
    header = ("BENCH", "METRIC", "VALUE", "SPREAD", "N", "TARGET", "RESULT")
    lines: list[tuple[str, ...]] = []
    notes: list[str] = []
    for res in results:
        if res.skipped:
            lines.append((res.name, f"skipped: {res.skipped}", "", "", "", "", ""))
        for r in res.rows:
            lines.append(_cells(r))
            if r.note:
                notes.append(f"{r.bench}: {r.metric}: {r.note}")
        if res.error:
            lines.append((res.name, f"ERROR: {res.error[:200]}", "", "", "", "", "FAIL"))
        lines.append(
            (
                res.name,
                f"(load avg {res.load_before[0]} -> {res.load_after[0]}, {res.seconds:.0f} s)",
                "",
                "",
                "",
                "",
                "",
            )
        )
    widths = [max(len(x[i]) for x in [header, *lines]) for i in range(len(header))]
    widths[1] = min(widths[1], 78)
    out = [
        "  ".join(c[: widths[i]].ljust(widths[i]) for i, c in enumerate(x)).rstrip()
        for x in [header, *lines]
    ]
    if notes:
        out += ["", "notes:", *(f"  {n}" for n in notes)]
    return "\n".join(out) + "\n"


def _cells(r: Row) -> tuple[str, ...]:
    value = f"{_fmt(r.value)} {r.unit} ({r.stat})"
    spread = f"{_fmt(r.low)}-{_fmt(r.high)} ({r.spread})" if r.low is not None else ""
    verdict = "" if r.passed is None else ("pass" if r.passed else "FAIL")
    return (r.bench, r.metric, value, spread, str(r.n), r.target.text if r.target else "", verdict)


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python3 -m bench", description=__doc__)
    parser.add_argument(
        "--smoke",
        action="store_true",
        help="tiny sizes (1 guest, 100 files, 50 domains, 10 s idle) for CI",
    )
    parser.add_argument(
        "--only",
        action="append",
        metavar="NAME",
        help=f"run only these (repeat or comma-separate): {', '.join(NAMES)}",
    )
    parser.add_argument(
        "--no-guests",
        action="store_true",
        help="skip the benchmarks that boot guests or containers: "
        + ", ".join(b.name for b in BENCHES if b.needs_guests),
    )
    parser.add_argument("--json", type=Path, metavar="FILE", help="write every result here")
    parser.add_argument(
        "--workdir",
        type=Path,
        metavar="DIR",
        help="scratch directory (default: a new one under /var/tmp)",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log progress")
    args = parser.parse_args(argv)
    selected = NAMES
    if args.only:
        selected = [n.strip() for spec in args.only for n in spec.split(",") if n.strip()]
        unknown = [n for n in selected if n not in NAMES]
        if unknown:
            parser.error(f"unknown benchmark(s) {', '.join(unknown)}; choose from {NAMES}")
        selected = [n for n in NAMES if n in selected]
    logging.basicConfig(
        level=logging.INFO if args.verbose else logging.WARNING,
        format="%(asctime)s %(name)s: %(message)s",
        stream=sys.stderr,
    )
    facts = machine_facts()
    sys.stderr.write(
        f"bench: {facts['cpus']} CPUs, load {facts['loadavg_at_start']}, "
        f"{'smoke' if args.smoke else 'full'} run of {', '.join(selected)}\n"
    )
    if args.workdir:
        args.workdir.mkdir(parents=True, exist_ok=True)
        results = run_selected(selected, args.smoke, args.workdir, not args.no_guests, sys.stderr)
    else:
        with tempfile.TemporaryDirectory(prefix="virt-trimd-bench-", dir="/var/tmp") as tmp:
            results = run_selected(selected, args.smoke, Path(tmp), not args.no_guests, sys.stderr)
    facts["loadavg_at_end"] = loadavg()
    sys.stdout.write(
        f"virt-trimd benchmarks ({'smoke' if args.smoke else 'full'}): {facts['cpus']} CPUs "
        f"({facts['cpu_model']}), {facts['mem_gib']} GiB, {facts['qemu']}, "
        f"load {facts['loadavg_at_start']} -> {facts['loadavg_at_end']}, "
        f"checkout {facts['git']}, virt_trimd from {facts['virt_trimd']}\n\n"
    )
    sys.stdout.write(format_table(results))
    if args.json:
        doc = {"smoke": args.smoke, "machine": facts, "results": [r.to_dict() for r in results]}
        args.json.write_text(json.dumps(doc, indent=1) + "\n")
    failed = [r.name for r in results if r.error]
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
