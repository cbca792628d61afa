"""Prometheus collector: renders State at scrape time, touching neither libvirt nor qemu-img."""

from __future__ import annotations

import logging
import math
from collections.abc import Iterable, Iterator, Mapping

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
