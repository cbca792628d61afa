"""Prometheus collector: renders State at scrape time, touching neither libvirt nor qemu-img."""

from __future__ import annotations

import dataclasses
import logging
import math
import threading
from collections.abc import Callable, Iterable, Iterator, Mapping
from types import MappingProxyType
from typing import Any, TypeVar

from prometheus_client.metrics_core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    HistogramMetricFamily,
    Metric,
)
from prometheus_client.registry import Collector

from virt_trimd.engine.state import State, StateSnapshot

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.metrics")

PREFIX = "virt_trimd_"

# discard label value when the domain XML has no discard attribute (libvirt then
# behaves as "ignore", but "default" tells the reader the XML did not say).
DISCARD_DEFAULT = "default"

# The families whose every sample has a `domain` label, sorted by domain first: their
# lines are the concatenation of per-domain fragments (see ExpositionCache).
DOMAIN_FAMILIES = frozenset(
    PREFIX + name
    for name in (
        "reclaimed_bytes",
        "guest_trimmed_bytes",
        "trims",
        "reclaims",
        "trigger_backoff_until_timestamp_seconds",
        "last_trim_duration_seconds",
        "last_success_timestamp_seconds",
        "disk_allocated_bytes",
        "disk_virtual_bytes",
        "disk_file_bytes",
        "disk_info",
        "disk_discard_ready",
        "disk_trim_effective",
        "disk_reclaimable_bytes",
        "disk_not_measured",
        "disk_last_guest_used_bytes",
        "disk_last_guest_used_timestamp_seconds",
    )
)


class TrimdCollector(Collector):
    """Renders a State snapshot as virt_trimd_* series; built once, registered by the daemon.

    Series of domains and schedules the State no longer holds simply stop appearing.
    Example exposition (generate_latest; HELP/TYPE lines, most buckets omitted,
    the disk_info line wrapped here)::

        virt_trimd_reclaimed_bytes_total{disk="vda",domain="web1"} 1.073741824e+09
        virt_trimd_guest_trimmed_bytes_total{domain="web1",mountpoint="/"} 2.147483648e+09
        virt_trimd_trims_total{domain="web1",result="success"} 1.0
        virt_trimd_trim_duration_seconds_bucket{le="2.5"} 1.0
        virt_trimd_trim_duration_seconds_bucket{le="+Inf"} 1.0
        virt_trimd_trim_duration_seconds_count 1.0
        virt_trimd_trim_duration_seconds_sum 1.4
        virt_trimd_last_trim_duration_seconds{domain="web1"} 1.4
        virt_trimd_last_success_timestamp_seconds{domain="web1"} 1.7145288014e+09
        virt_trimd_disk_allocated_bytes{disk="vda",domain="web1"} 5.36870912e+09
        virt_trimd_disk_virtual_bytes{disk="vda",domain="web1"} 2.147483648e+10
        virt_trimd_disk_file_bytes{disk="vda",domain="web1"} 5.4e+09
        virt_trimd_disk_info{bus="virtio",discard="unmap",disk="vda",domain="web1",
            format="qcow2",path="/var/lib/libvirt/images/web1.qcow2"} 1.0
        virt_trimd_disk_discard_ready{disk="vda",domain="web1"} 1.0
        virt_trimd_disk_trim_effective{disk="vda",domain="web1"} 1.0
        virt_trimd_disk_reclaimable_bytes{disk="vda",domain="web1"} 0.0
        virt_trimd_next_run_timestamp_seconds{schedule="nightly"} 1.7146152e+09
        virt_trimd_last_sweep_timestamp_seconds{schedule="nightly"} 1.7145288014e+09
        virt_trimd_sweep_reclaimed_bytes{schedule="nightly"} 1.073741824e+09
        virt_trimd_libvirt_up 1.0
        virt_trimd_config_last_reload_successful 1.0
        virt_trimd_config_last_reload_success_timestamp_seconds 1.7145e+09
        virt_trimd_history_write_ok 1.0
        virt_trimd_history_write_errors_total 0.0
        virt_trimd_build_info{version="0.1.0"} 1.0

    disk_info labels: `path` and `format` are "" when unknown (network disks), and
    `discard` is the XML's value or "default" when the attribute is absent.
    Optional series (disk byte gauges, discard_ready, trim_effective, reclaimable,
    the reload success timestamp) are omitted while their value is unknown.
    """

    def __init__(self, state: State, version: str) -> None:
        self._state = state
        self._version = version

    def describe(self) -> Iterable[Metric]:
        """The metric families without samples, so registration checks names cheaply."""
        return list(self._families(State().snapshot()))

    def collect(self) -> Iterable[Metric]:
        """Render the current snapshot; one lock acquisition, no I/O."""
        return list(self._families(self._state.snapshot()))

    def snapshot(self) -> StateSnapshot:
        """The state this collector renders, now."""
        return self._state.snapshot()

    def families(self, snap: StateSnapshot) -> Iterator[Metric]:
        """The metric families of `snap`, in exposition order."""
        return self._families(snap)

    def _families(self, snap: StateSnapshot) -> Iterator[Metric]:
        yield from self._trim_families(snap)
        yield from self._disk_families(snap)
        yield from self._daemon_families(snap)

    def _trim_families(self, snap: StateSnapshot) -> Iterator[Metric]:
        # Counter families take the name without _total; the client appends it.
        reclaimed = CounterMetricFamily(
            PREFIX + "reclaimed_bytes",
            "Host bytes released by trims: positive allocated-before minus allocated-after.",
            labels=["domain", "disk"],
        )
        for (domain, disk), value in sorted(snap.reclaimed_bytes_total.items()):
            reclaimed.add_metric([domain, disk], value)
        yield reclaimed

        guest = CounterMetricFamily(
            PREFIX + "guest_trimmed_bytes",
            "Bytes the guest agent reported as trimmed, per guest mountpoint.",
            labels=["domain", "mountpoint"],
        )
        for (domain, mountpoint), value in sorted(snap.guest_trimmed_bytes_total.items()):
            guest.add_metric([domain, mountpoint], value)
        yield guest

        trims = CounterMetricFamily(
            PREFIX + "trims",
            "Trims of a domain by result (dry runs excluded).",
            labels=["domain", "result"],
        )
        for (domain, result), value in sorted(snap.trims_total.items()):
            trims.add_metric([domain, result], value)
        yield trims

        reclaims = CounterMetricFamily(
            PREFIX + "reclaims",
            "Trims by how (method: agent or sparsify) and why (trigger: schedule, growth or "
            "reclaimable), and result; the same events as trims_total.",
            labels=["domain", "method", "trigger", "result"],
        )
        for labels, value in sorted(snap.reclaims_total.items()):
            reclaims.add_metric(list(labels), value)
        yield reclaims
        yield _gauge_by(
            "trigger_backoff_until_timestamp_seconds",
            "Growth triggers leave the domain alone until then: its last triggered trim "
            "could not help (not discard-ready, ineffective or failed).",
            "domain",
            snap.trigger_backoff_until_ts,
        )

        hist = snap.trim_duration
        cumulative = 0
        buckets: list[tuple[str, float]] = []
        for bound, count in zip(hist.bounds, hist.counts, strict=True):
            cumulative += count
            buckets.append((_le(bound), cumulative))
        yield HistogramMetricFamily(
            PREFIX + "trim_duration_seconds",
            "Wall time of attempted trims of one domain, guest agent call plus measuring.",
            buckets=buckets,
            sum_value=hist.sum,
        )

        yield _gauge_by(
            "last_trim_duration_seconds",
            "Duration of the domain's latest attempted trim.",
            "domain",
            snap.last_trim_duration_seconds,
        )
        yield _gauge_by(
            "last_success_timestamp_seconds",
            "When the domain's latest successful trim finished (partial does not count).",
            "domain",
            snap.last_success_ts,
        )

    def _disk_families(self, snap: StateSnapshot) -> Iterator[Metric]:
        labels = ["domain", "disk"]
        allocated = GaugeMetricFamily(
            PREFIX + "disk_allocated_bytes",
            "Host bytes allocated to the disk image (st_blocks * 512).",
            labels=labels,
        )
        virtual = GaugeMetricFamily(
            PREFIX + "disk_virtual_bytes", "Virtual size of the disk image.", labels=labels
        )
        file_bytes = GaugeMetricFamily(
            PREFIX + "disk_file_bytes", "Apparent size (st_size) of the disk image.", labels=labels
        )
        info = GaugeMetricFamily(
            PREFIX + "disk_info",
            "Disk description from the domain XML; always 1.",
            labels=["domain", "disk", "path", "format", "bus", "discard"],
        )
        ready = GaugeMetricFamily(
            PREFIX + "disk_discard_ready",
            "1 when the guest's discards can reach the host image (bus, discard=unmap).",
            labels=labels,
        )
        effective = GaugeMetricFamily(
            PREFIX + "disk_trim_effective",
            "1 when the latest trim released host bytes as expected.",
            labels=labels,
        )
        reclaimable = GaugeMetricFamily(
            PREFIX + "disk_reclaimable_bytes",
            "Host bytes the image holds beyond what the guest uses.",
            labels=labels,
        )
        not_measured = GaugeMetricFamily(
            PREFIX + "disk_not_measured",
            "1 while the disk's allocation cannot be measured on the host; reason says why.",
            labels=["domain", "disk", "path", "reason"],
        )
        last_used = GaugeMetricFamily(
            PREFIX + "disk_last_guest_used_bytes",
            "What the guest last reported using on the disk (by a trim or a census); for a "
            "shut-off domain the only guest figure there is. See its _timestamp_seconds.",
            labels=labels,
        )
        last_used_ts = GaugeMetricFamily(
            PREFIX + "disk_last_guest_used_timestamp_seconds",
            "When the guest reported disk_last_guest_used_bytes.",
            labels=labels,
        )
        for d in snap.disks:
            key = [d.domain, d.disk]
            if d.not_measured is not None:
                not_measured.add_metric([d.domain, d.disk, d.path or "", d.not_measured[:200]], 1)
            if d.last_guest_used_bytes is not None and d.last_guest_used_ts is not None:
                last_used.add_metric(key, d.last_guest_used_bytes)
                last_used_ts.add_metric(key, d.last_guest_used_ts)
            info.add_metric(
                [
                    d.domain,
                    d.disk,
                    d.path or "",
                    d.format or "",
                    d.bus,
                    DISCARD_DEFAULT if d.discard is None else d.discard,
                ],
                1,
            )
            if d.allocated_bytes is not None:
                allocated.add_metric(key, d.allocated_bytes)
            if d.virtual_bytes is not None:
                virtual.add_metric(key, d.virtual_bytes)
            if d.file_bytes is not None:
                file_bytes.add_metric(key, d.file_bytes)
            if d.discard_ready is not None:
                ready.add_metric(key, int(d.discard_ready))
            if d.effective is not None:
                effective.add_metric(key, int(d.effective))
            if d.reclaimable_bytes is not None:
                reclaimable.add_metric(key, d.reclaimable_bytes)
        yield from (allocated, virtual, file_bytes, info, ready, effective, reclaimable)
        yield not_measured
        yield from (last_used, last_used_ts)

    def _daemon_families(self, snap: StateSnapshot) -> Iterator[Metric]:
        yield _gauge_by(
            "next_run_timestamp_seconds",
            "When the schedule fires next.",
            "schedule",
            snap.next_run_ts,
        )
        yield _gauge_by(
            "last_sweep_timestamp_seconds",
            "When the schedule's latest sweep finished.",
            "schedule",
            snap.last_sweep_ts,
        )
        yield _gauge_by(
            "sweep_reclaimed_bytes",
            "Net host bytes released by the schedule's latest sweep (negative if guests wrote).",
            "schedule",
            snap.sweep_reclaimed_bytes,
        )
        yield GaugeMetricFamily(
            PREFIX + "libvirt_up",
            "1 when the latest libvirt connection attempt or call succeeded.",
            value=int(snap.libvirt_up),
        )
        yield GaugeMetricFamily(
            PREFIX + "config_last_reload_successful",
            "1 when the latest configuration load succeeded.",
            value=int(snap.config_reload_ok),
        )
        reload_ts = GaugeMetricFamily(
            PREFIX + "config_last_reload_success_timestamp_seconds",
            "When the configuration was last loaded successfully.",
        )
        if snap.config_reload_success_ts is not None:
            reload_ts.add_metric([], snap.config_reload_success_ts)
        yield reload_ts
        yield GaugeMetricFamily(
            PREFIX + "history_write_ok",
            "1 when the latest history database write succeeded.",
            value=int(snap.history_write_ok),
        )
        yield CounterMetricFamily(
            PREFIX + "history_write_errors",
            "History database writes that failed.",
            value=snap.history_write_errors_total,
        )
        group = GaugeMetricFamily(
            PREFIX + "storage_group_info",
            "This host's share of its storage group; always 1. Members whose inventories "
            "agree show the same members digest, and no share twice.",
            labels=["group", "members", "share", "shares", "at_once"],
        )
        if snap.storage_group is not None:
            group.add_metric([str(v) for v in snap.storage_group], 1)
        yield group
        info = GaugeMetricFamily(
            PREFIX + "build_info", "virt-trimd version; always 1.", labels=["version"]
        )
        info.add_metric([self._version], 1)
        yield info


def _gauge_by(
    name: str, documentation: str, label: str, values: Mapping[str, float]
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(PREFIX + name, documentation, labels=[label])
    for key, value in sorted(values.items()):
        family.add_metric([key], value)
    return family


def _le(bound: float) -> str:
    # Same spelling as prometheus_client's own histograms ("0.1", "3600.0", "+Inf"),
    # so dashboards can match le values from either.
    return "+Inf" if math.isinf(bound) else repr(float(bound))


def only_domains(snap: StateSnapshot, domains: frozenset[str]) -> StateSnapshot:
    """`snap` with the per-domain series of `domains` only (the others kept as they are)."""

    K = TypeVar("K", bound=tuple[str, ...])

    def pick(mapping: Mapping[K, int]) -> Mapping[K, int]:
        return MappingProxyType({k: v for k, v in mapping.items() if k[0] in domains})

    def by_name(mapping: Mapping[str, float]) -> Mapping[str, float]:
        return MappingProxyType({k: v for k, v in mapping.items() if k in domains})

    return dataclasses.replace(
        snap,
        reclaimed_bytes_total=pick(snap.reclaimed_bytes_total),
        guest_trimmed_bytes_total=pick(snap.guest_trimmed_bytes_total),
        trims_total=pick(snap.trims_total),
        reclaims_total=pick(snap.reclaims_total),
        trigger_backoff_until_ts=by_name(snap.trigger_backoff_until_ts),
        last_trim_duration_seconds=by_name(snap.last_trim_duration_seconds),
        last_success_ts=by_name(snap.last_success_ts),
        disks=tuple(d for d in snap.disks if d.domain in domains),
    )


class _One:
    """A registry-like object holding one family, for prometheus_client's encoders."""

    def __init__(self, family: Metric | None) -> None:
        self.family = family

    def collect(self) -> Iterable[Metric]:
        return [] if self.family is None else [self.family]


class ExpositionCache:
    """The collector's exposition, re-encoding only the series that changed.

    Encoding every series through prometheus_client costs ~15 us per series (its label
    escaping), 400-700 ms at 1,000 domains of 4 disks, and any change (one trim of a
    sweep) made the next scrape pay all of it. Here each domain's lines of each family
    are kept with a compact key of the samples they encode. A render looks only at the
    domains whose version moved (StateSnapshot.domain_versions), re-encodes only those
    of their families whose key differs from the kept one (a census changes the
    timestamps and sizes, not the descriptions), through the same prometheus_client
    encoder, and joins the kept lines in the collector's order: every DOMAIN_FAMILIES
    family sorts by domain first and encodes one line per sample. So the output is byte
    for byte what `generate_latest` gives for a registry holding only the collector.

    Memory: the kept text is the exposition once per format asked for (~1.2 KB per
    disk), the keys ~1 KB per domain, shared by the formats.
    """

    # Formats kept at once: the Accept header picks one (text, OpenMetrics, versions,
    # escapings) and a client may send any, so the oldest is dropped past this many.
    MAX_FORMATS = 2

    def __init__(self, collector: TrimdCollector) -> None:
        self._collector = collector
        self._lock = threading.Lock()
        # domain -> (version, family name -> key of its samples), for every format.
        self._keys: dict[str, tuple[int, dict[str, _Key]]] = {}
        # format -> domain -> (version, family name -> (key, its lines in that format))
        self._text: dict[str, dict[str, tuple[int, dict[str, tuple[_Key, str]]]]] = {}

    def render(self, encode: Callable[[Any], bytes], fmt: str) -> bytes:
        """What `encode(registry)` gives; `fmt` names the encoder (its content type).

        `encode` is a prometheus_client encoder (generate_latest of either format, as
        choose_encoder picks it); whatever it writes after the last family (OpenMetrics'
        "# EOF") is found by encoding no family at all.
        """
        eof = encode(_One(None)).decode("utf-8")

        def lines_of(family: Metric) -> tuple[str, list[str]]:
            text = encode(_One(family)).decode("utf-8").removesuffix(eof)
            lines = text.splitlines(keepends=True)
            header = len(lines) - len(family.samples)
            return "".join(lines[:header]), lines[header:]

        with self._lock:
            snap = self._collector.snapshot()
            versions = snap.domain_versions
            if fmt not in self._text and len(self._text) >= self.MAX_FORMATS:
                del self._text[next(iter(self._text))]
            kept = self._text.setdefault(fmt, {})
            for table in (kept, self._keys):
                for gone in [d for d in table if d not in versions]:
                    del table[gone]
            changed = sorted(d for d, v in versions.items() if kept.get(d, (None,))[0] != v)
            keys: dict[str, dict[str, _Key]] = {d: {} for d in changed}
            fresh: dict[str, dict[str, tuple[_Key, str]]] = {d: {} for d in changed}
            parts: list[str] = []
            order = sorted(versions)
            for family in self._collector.families(only_domains(snap, frozenset(changed))):
                if family.name not in DOMAIN_FAMILIES:
                    header, lines = lines_of(family)
                    parts.append(header + "".join(lines))
                    continue
                groups: dict[str, list[Any]] = {}
                for sample in family.samples:
                    groups.setdefault(sample.labels["domain"], []).append(sample)
                stale: list[str] = []
                for domain in changed:
                    key = self._key_of(domain, family.name, groups.get(domain, ()))
                    keys[domain][family.name] = key
                    old = kept.get(domain)
                    prev = old[1].get(family.name) if old is not None else None
                    if prev is not None and prev[0] == key:
                        fresh[domain][family.name] = (key, prev[1])
                    else:
                        stale.append(domain)
                part = Metric(family.name, family.documentation, family.type, family.unit)
                part.samples = [x for domain in stale for x in groups.get(domain, ())]
                header, lines = lines_of(part)
                by_domain: dict[str, list[str]] = {}
                for sample, line in zip(part.samples, lines, strict=True):
                    by_domain.setdefault(sample.labels["domain"], []).append(line)
                for domain in stale:
                    text = "".join(by_domain.get(domain, ()))
                    fresh[domain][family.name] = (keys[domain][family.name], text)
                parts.append(header)
                for domain in order:
                    frag = fresh[domain] if domain in fresh else kept[domain][1]
                    parts.append(frag[family.name][1])
            for domain in changed:
                kept[domain] = (versions[domain], fresh[domain])
                self._keys[domain] = (versions[domain], keys[domain])
            parts.append(eof)
            return "".join(parts).encode("utf-8")

    def _key_of(self, domain: str, family: str, samples: Iterable[Any]) -> _Key:
        """The samples as one flat tuple; the object already kept when equal (shared).

        Label names, sample names, timestamps and exemplars are fixed per family in
        TrimdCollector (none has the last two), so label values and values say it all.
        """
        key = tuple(x for s in samples for x in (*s.labels.values(), _exact(s.value)))
        old = self._keys.get(domain)
        if old is not None:
            kept = old[1].get(family)
            if kept is not None and kept == key:
                return kept
        return key


def _exact(value: Any) -> Any:
    """`value`, told apart from every value that encodes differently but compares equal.

    Equal ints and floats encode alike (floatToGoString takes float()); 0.0 and -0.0
    compare equal and do not, so a float zero carries its sign.
    """
    if value == 0 and isinstance(value, float):
        return (value, math.copysign(1.0, value))
    return value


# A domain's samples of one family, flattened: label values and value of each.
_Key = tuple[Any, ...]
