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


def _check(cache: ExpositionCache, registry: CollectorRegistry) -> None:
    for accept in ACCEPTS:
        encoder, content_type = choose_encoder(accept)
        assert cache.render(encoder, content_type) == encoder(registry), accept


def _setup() -> tuple[State, ExpositionCache, CollectorRegistry]:
    state = State()
    collector = TrimdCollector(state, "1.2.3")
    registry = CollectorRegistry(auto_describe=False)
    registry.register(collector)
    return state, ExpositionCache(collector), registry


def test_empty_state_and_daemon_series_only() -> None:
    state, cache, registry = _setup()
    _check(cache, registry)
    state.set_next_run("nightly", 1.7e9)
    state.set_libvirt_up(True)
    _check(cache, registry)


def test_random_changes_keep_the_bytes_of_a_full_render() -> None:
    rng = random.Random(14)
    state, cache, registry = _setup()
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
        _check(cache, registry)


def test_a_census_that_changes_only_timestamps_keeps_the_other_families() -> None:
    state, cache, registry = _setup()
    for i in range(5):
        _census(state, f"d{i}", 2, GIB, 1.7e9)
    _check(cache, registry)
    for i in range(5):
        _census(state, f"d{i}", 2, GIB, 1.8e9)
    _check(cache, registry)


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
    state, cache, registry = _setup()
    _census(state, "web1", 2, GIB, 1.7e9)
    for k in range(formats):
        accept = f"application/openmetrics-text;version=1.0.{k}"
        encoder, content_type = choose_encoder(accept)
        assert cache.render(encoder, content_type) == encoder(registry)
    assert len(cache._kept) <= ExpositionCache.MAX_FORMATS
    _check(cache, registry)
