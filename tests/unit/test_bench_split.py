"""The benchmark's best-split solver (tests/bench/sweep.py) against brute force.

Pure logic: the span targets of issue 14 are judged against it, so it must never report
a split better than the optimum, and must stay within its stated tolerance of it.
"""

from __future__ import annotations

import itertools
import random

import pytest

from bench.sweep import best_split, best_split_bounded, ideal


def _brute(ds: list[float], k: int) -> float:
    best = float("inf")
    for assignment in itertools.product(range(k), repeat=len(ds)):
        loads = [0.0] * k
        for d, w in zip(ds, assignment, strict=True):
            loads[w] += d
        best = min(best, max(loads))
    return best


@pytest.mark.parametrize("seed", range(40))
def test_best_split_is_the_optimum_within_its_tolerance(seed: int) -> None:
    rng = random.Random(seed)
    k = rng.choice([1, 2, 3, 4])
    ds = [rng.uniform(0.05, 0.3) for _ in range(rng.randint(1, 7))]
    exact = _brute(ds, k)
    assert best_split(ds, k, rel_tol=0) == pytest.approx(exact, rel=1e-12)
    found = best_split(ds, k)
    assert exact - 1e-12 <= found <= exact + 0.002 * ideal(ds, k) + 1e-12


def test_a_split_that_cannot_reach_the_fluid_ideal() -> None:
    # Three equal guests on two workers: the fluid ideal is 1.5, any real split 2.
    assert ideal([1.0, 1.0, 1.0], 2) == 1.5
    assert best_split([1.0, 1.0, 1.0], 2) == 2.0


def test_twenty_guests_on_four_workers_stay_close_to_the_ideal() -> None:
    rng = random.Random(7)
    ds = [rng.uniform(0.08, 0.25) for _ in range(20)]
    found, _proven = best_split_bounded(ds, 4)
    assert ideal(ds, 4) <= found <= ideal(ds, 4) * 1.02
