"""ExpositionCache: the same bytes as prometheus_client's encoders, after every kind of change.

The cache re-encodes only the domains (and of those only the families) that changed,
so each test drives the State through changes and compares the cache's body with the
encoder run over the whole registry, for every format choose_encoder can pick.
"""

from __future__ import annotations

import dataclasses
import random
from collections.abc import Callable
from typing import Any

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

from support.records import disk_record, trim_record
from virt_trimd.engine.state import DiskState, State
from virt_trimd.records import FilesystemResult, Method, Result
from virt_trimd.web.collector import DOMAIN_FAMILIES, ExpositionCache, TrimdCollector

GIB = 1 << 30
ACCEPTS = (
    # Prometheus 2.x with OpenMetrics, plain text, none, UTF-8 escaping, no version.
    "application/openmetrics-text;version=1.0.0,application/openmetrics-text;version=0.0.1;"
    "q=0.75,text/plain;version=0.0.4;q=0.5,*/*;q=0.1",
    "text/plain",
    "",
    "application/openmetrics-text;version=1.0.0;escaping=allow-utf-8",
    "application/openmetrics-text",
)


def _census(state: State, domain: str, disks: int, alloc: int, ts: float) -> None:
    state.observe_census(
        domain,
        [
            DiskState(
                domain, f"vd{chr(97 + i)}", f"/img/{domain}-{i}.qcow2", "qcow2", "virtio",
                "unmap" if i % 2 else None, alloc + i, 20 * GIB, alloc + GIB, i % 3 != 0,
                None, GIB if i else None, last_guest_used_bytes=alloc // 2,
                last_guest_used_ts=ts,
            )
            for i in range(disks)
        ],
    )  # fmt: skip


def _trim(state: State, domain: str, result: Result, n: int) -> None:
    state.observe_trim(
        trim_record(
            domain=domain,
            uuid=f"u-{domain}",
            result=result,
            duration_seconds=0.5 + n,
            method=Method.SPARSIFY if n % 4 == 0 else Method.AGENT,
            trigger="growth" if n % 3 == 0 else None,
            disks=(disk_record("vda", 6 * GIB + n, 5 * GIB), disk_record("vdb", GIB, GIB)),
            filesystems=(
                FilesystemResult("/", GIB, None),
                FilesystemResult('/we"ird\n', None, "x"),
            ),
        )
    )


class Caches:
    """One ExpositionCache per Accept header (a cache keeps MAX_FORMATS formats, and a
    format it dropped renders from scratch, which would test nothing), plus one that
    serves every format in turn."""

    def __init__(self, collector: TrimdCollector) -> None:
        self.each = {accept: ExpositionCache(collector) for accept in ACCEPTS}
        self.shared = ExpositionCache(collector)


def _check(caches: Caches, registry: CollectorRegistry) -> None:
    for accept in ACCEPTS:
        encoder, content_type = choose_encoder(accept)
        expected = encoder(registry)
        assert caches.each[accept].render(encoder, content_type) == expected, accept
        assert caches.shared.render(encoder, content_type) == expected, accept


def _setup() -> tuple[State, Caches, CollectorRegistry]:
    state = State()
    collector = TrimdCollector(state, "1.2.3")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return state, Caches(collector), registry


def test_empty_state_and_daemon_series_only() -> None:
    state, caches, registry = _setup()
    _check(caches, registry)
    state.set_next_run("nightly", 1.7e9)
    state.set_libvirt_up(True)
    _check(caches, registry)


def test_random_changes_keep_the_bytes_of_a_full_render() -> None:
    rng = random.Random(14)
    state, caches, registry = _setup()
    names = [f"dom-{i:02d}" for i in range(12)] + ['zz\\odd"name']
    changes: list[Callable[[int], Any]] = [
        lambda n: _trim(state, rng.choice(names), rng.choice(list(Result)), n),
        lambda n: _census(state, rng.choice(names), rng.randint(0, 3), n * GIB, 1.7e9 + n),
        lambda n: state.observe_census(rng.choice(names), []),
        lambda n: state.set_trigger_backoff(rng.choice(names), rng.choice([None, 1.7e9 + n])),
        lambda n: state.restore_last_success({rng.choice(names): 1.6e9 + n}),
        lambda n: state.retain_domains(rng.sample(names, rng.randint(3, len(names)))),
        lambda n: state.set_next_run(rng.choice(["a", "b"]), 1.7e9 + n),
    ]
    for n in range(120):
        rng.choice(changes)(n)
        _check(caches, registry)


def test_negative_zero_is_not_taken_for_zero() -> None:
    state, caches, registry = _setup()
    state.restore_last_success({"web1": 0.0})
    _check(caches, registry)
    state.restore_last_success({"web1": -0.0})  # max(-0.0, 0.0) is -0.0: a new value
    _check(caches, registry)


def test_a_census_that_changes_only_timestamps_keeps_the_other_families() -> None:
    state, caches, registry = _setup()
    for i in range(5):
        _census(state, f"d{i}", 2, GIB, 1.7e9)
    _check(caches, registry)
    for i in range(5):
        _census(state, f"d{i}", 2, GIB, 1.8e9)
    _check(caches, registry)


def test_every_family_with_a_domain_label_is_cached_per_domain() -> None:
    """A per-domain family missing from DOMAIN_FAMILIES would be encoded only for the
    changed domains; this keeps the list and the collector in step."""
    state, _, _ = _setup()
    _census(state, "web1", 2, GIB, 1.7e9)
    _trim(state, "web1", Result.SUCCESS, 0)
    state.set_trigger_backoff("web1", 1.7e9)
    state.observe_trim(
        trim_record(disks=(dataclasses.replace(disk_record("vdc"), not_measured="gone"),))
    )
    collector = TrimdCollector(state, "1.2.3")
    with_domain = {
        f.name for f in collector.collect() if any("domain" in s.labels for s in f.samples)
    }
    assert with_domain == set(DOMAIN_FAMILIES)


@pytest.mark.parametrize("formats", [1, 6])
def test_many_formats_stay_bounded_and_correct(formats: int) -> None:
    state, caches, registry = _setup()
    _census(state, "web1", 2, GIB, 1.7e9)
    cache = caches.shared
    for k in range(formats):
        accept = f"application/openmetrics-text;version=1.0.{k}"
        encoder, content_type = choose_encoder(accept)
        assert cache.render(encoder, content_type) == encoder(registry)
    assert len(cache._text) <= ExpositionCache.MAX_FORMATS
    _check(caches, registry)


def test_unchanged_families_are_not_encoded_again(monkeypatch: pytest.MonkeyPatch) -> None:
    """After a census that moves only timestamps, only that family is encoded again."""
    state, caches, registry = _setup()
    for i in range(3):
        _census(state, f"d{i}", 2, GIB, 1.7e9)
    _check(caches, registry)
    encoder, content_type = choose_encoder(ACCEPTS[0])
    encoded: list[int] = []

    def counting(reg: Any) -> bytes:
        encoded.extend(len(f.samples) for f in reg.collect() if f.name in DOMAIN_FAMILIES)
        return encoder(reg)

    for i in range(3):
        _census(state, f"d{i}", 2, GIB, 1.8e9)
    body = caches.each[ACCEPTS[0]].render(counting, content_type)
    assert body == encoder(registry)
    # 3 domains x 2 disks of disk_last_guest_used_timestamp_seconds; nothing else.
    assert sum(encoded) == 6
