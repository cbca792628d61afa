"""TrimdCollector through a fresh CollectorRegistry: names, values, escaping, vanishing series."""

from __future__ import annotations

from datetime import UTC, datetime

import pytest
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from support.records import disk_record, trim_record
from virt_trimd.engine.state import DiskState, State, StateSnapshot
from virt_trimd.records import FilesystemResult, Method, Result, SweepSummary
from virt_trimd.web.collector import TrimdCollector

T0 = datetime(2024, 5, 1, 2, 0, tzinfo=UTC).timestamp()
GIB = 1 << 30

# The contract with the Grafana dashboard and the alert rules: exact exposed sample names.
CONTRACT_SAMPLE_NAMES = {
    "virt_trimd_reclaimed_bytes_total",
    "virt_trimd_reclaims_total",
    "virt_trimd_trigger_backoff_until_timestamp_seconds",
    "virt_trimd_disk_last_guest_used_bytes",
    "virt_trimd_disk_last_guest_used_timestamp_seconds",
    "virt_trimd_guest_trimmed_bytes_total",
    "virt_trimd_trims_total",
    "virt_trimd_trim_duration_seconds_bucket",
    "virt_trimd_trim_duration_seconds_count",
    "virt_trimd_trim_duration_seconds_sum",
    "virt_trimd_last_trim_duration_seconds",
    "virt_trimd_last_success_timestamp_seconds",
    "virt_trimd_disk_allocated_bytes",
    "virt_trimd_disk_virtual_bytes",
    "virt_trimd_disk_file_bytes",
    "virt_trimd_disk_info",
    "virt_trimd_disk_discard_ready",
    "virt_trimd_disk_trim_effective",
    "virt_trimd_disk_reclaimable_bytes",
    "virt_trimd_disk_not_measured",
    "virt_trimd_next_run_timestamp_seconds",
    "virt_trimd_last_sweep_timestamp_seconds",
    "virt_trimd_sweep_reclaimed_bytes",
    "virt_trimd_libvirt_up",
    "virt_trimd_config_last_reload_successful",
    "virt_trimd_config_last_reload_success_timestamp_seconds",
    "virt_trimd_history_write_ok",
    "virt_trimd_history_write_errors_total",
    "virt_trimd_build_info",
    "virt_trimd_storage_group_info",
}
CONTRACT_TYPES = {
    "virt_trimd_reclaimed_bytes_total": "counter",
    "virt_trimd_guest_trimmed_bytes_total": "counter",
    "virt_trimd_trims_total": "counter",
    "virt_trimd_reclaims_total": "counter",
    "virt_trimd_history_write_errors_total": "counter",
    "virt_trimd_trim_duration_seconds": "histogram",
    "virt_trimd_libvirt_up": "gauge",
    "virt_trimd_disk_info": "gauge",
    "virt_trimd_build_info": "gauge",
}


def scrape(state: State, version: str = "1.2.3") -> CollectorRegistry:
    registry = CollectorRegistry()
    registry.register(TrimdCollector(state, version))
    return registry


def representative_state() -> State:
    state = State()
    state.observe_census(
        "web1",
        [
            DiskState(
                "web1", "vda", "/img/web1.qcow2", "qcow2", "virtio", "unmap",
                6 * GIB, 20 * GIB, 7 * GIB, True, None, GIB,
                last_guest_used_bytes=5 * GIB, last_guest_used_ts=T0 - 600,
            )
        ],
    )  # fmt: skip
    rec = trim_record(
        disks=(disk_record(),),
        filesystems=(FilesystemResult("/", 2 * GIB, None),),
    )
    state.observe_trim(rec)
    hidden = disk_record(
        "sda", None, None, path="/tmp/db1.qcow2",
        not_measured="cannot stat /tmp/db1.qcow2: No such file or directory",
    )  # fmt: skip
    state.observe_trim(trim_record(domain="db1", disks=(hidden,)))
    state.set_next_run("nightly", T0 + 86400)
    state.observe_sweep("nightly", SweepSummary((rec,)), T0 + 2)
    state.set_libvirt_up(True)
    state.set_config_reload(True, T0 - 60)
    state.set_history_ok(True)
    state.set_trigger_backoff("web1", T0 + 3600)
    state.set_storage_group(("ceph-a", "4d0ec9e060f0", 2, 3, 1))
    return state


def test_every_contract_name_is_exposed_exactly() -> None:
    text = generate_latest(scrape(representative_state())).decode()
    families = list(text_string_to_metric_families(text))
    sample_names = {s.name for f in families for s in f.samples}
    # Exact equality: no missing name, no stray _created or misspelt duplicate.
    assert sample_names == CONTRACT_SAMPLE_NAMES
    for name, kind in CONTRACT_TYPES.items():
        assert f"# TYPE {name} {kind}\n" in text


def test_reclaimed_counter_counts_positive_reclaim_only() -> None:
    state = State()
    registry = scrape(state)
    labels = {"domain": "web1", "disk": "vda"}
    state.observe_trim(trim_record(disks=(disk_record(before=GIB, after=2 * GIB),)))
    assert registry.get_sample_value("virt_trimd_reclaimed_bytes_total", labels) == 0
    state.observe_trim(trim_record(disks=(disk_record(before=3 * GIB, after=GIB),)))
    state.observe_trim(trim_record(disks=(disk_record(before=GIB, after=GIB + 4096),)))
    assert registry.get_sample_value("virt_trimd_reclaimed_bytes_total", labels) == 2 * GIB
    # The disk gauge follows the latest measurement, whichever way it went.
    assert registry.get_sample_value("virt_trimd_disk_allocated_bytes", labels) == GIB + 4096


def test_trims_total_by_result() -> None:
    state = State()
    for result in (Result.SUCCESS, Result.SUCCESS, Result.PARTIAL, Result.AGENT_UNAVAILABLE):
        state.observe_trim(trim_record(result=result))
    registry = scrape(state)

    def trims(result: str) -> float | None:
        return registry.get_sample_value(
            "virt_trimd_trims_total", {"domain": "web1", "result": result}
        )

    assert trims("success") == 2
    assert trims("partial") == 1
    assert trims("agent_unavailable") == 1
    assert trims("timeout") is None


def test_guest_trimmed_counter() -> None:
    state = State()
    state.observe_trim(trim_record(filesystems=(FilesystemResult("/var", 300, None),)))
    state.observe_trim(trim_record(filesystems=(FilesystemResult("/var", 200, None),)))
    assert (
        scrape(state).get_sample_value(
            "virt_trimd_guest_trimmed_bytes_total", {"domain": "web1", "mountpoint": "/var"}
        )
        == 500
    )


def test_duration_histogram_buckets() -> None:
    state = State()
    for seconds in (0.05, 0.3, 0.3, 45.0, 5000.0):
        state.observe_trim(trim_record(duration_seconds=seconds))
    state.observe_trim(trim_record(result=Result.NOT_RUNNING, duration_seconds=0.0))
    registry = scrape(state)

    def bucket(le: str) -> float | None:
        return registry.get_sample_value("virt_trimd_trim_duration_seconds_bucket", {"le": le})

    assert bucket("0.1") == 1
    assert bucket("0.25") == 1
    assert bucket("0.5") == 3
    assert bucket("30.0") == 3
    assert bucket("60.0") == 4
    assert bucket("3600.0") == 4
    assert bucket("+Inf") == 5
    assert registry.get_sample_value("virt_trimd_trim_duration_seconds_count") == 5
    assert registry.get_sample_value("virt_trimd_trim_duration_seconds_sum") == pytest.approx(
        5045.65
    )
    assert (
        registry.get_sample_value("virt_trimd_last_trim_duration_seconds", {"domain": "web1"})
        == 5000.0
    )


def test_vanished_domains_disappear_after_retain_domains() -> None:
    state = representative_state()
    state.observe_trim(trim_record("db1", disks=(disk_record("sda"),)))
    registry = scrape(state)
    web1 = {"domain": "web1", "disk": "vda"}
    assert registry.get_sample_value("virt_trimd_disk_allocated_bytes", web1) == 5 * GIB
    state.retain_domains({"db1"})
    text = generate_latest(registry).decode()
    assert 'domain="web1"' not in text
    assert registry.get_sample_value("virt_trimd_disk_allocated_bytes", web1) is None
    assert registry.get_sample_value(
        "virt_trimd_reclaimed_bytes_total", {"domain": "db1", "disk": "sda"}
    ) == float(GIB)


def test_last_success_and_schedules() -> None:
    registry = scrape(representative_state())
    assert (
        registry.get_sample_value("virt_trimd_last_success_timestamp_seconds", {"domain": "web1"})
        == T0 + 2.0  # started_at + the record's 2 s
    )
    nightly = {"schedule": "nightly"}
    assert registry.get_sample_value("virt_trimd_next_run_timestamp_seconds", nightly) == T0 + 86400
    assert registry.get_sample_value("virt_trimd_last_sweep_timestamp_seconds", nightly) == T0 + 2
    assert registry.get_sample_value("virt_trimd_sweep_reclaimed_bytes", nightly) == GIB


def test_disk_info_labels_and_optional_series() -> None:
    state = State()
    state.observe_census(
        "web1",
        [
            DiskState("web1", "vda", "/img/a.raw", "raw", "scsi", None, 10, None, 20),
            DiskState("web1", "vdb", None, None, "virtio", "ignore", None, None, None, False),
        ],
    )
    registry = scrape(state)
    assert (
        registry.get_sample_value(
            "virt_trimd_disk_info",
            {
                "domain": "web1",
                "disk": "vda",
                "path": "/img/a.raw",
                "format": "raw",
                "bus": "scsi",
                "discard": "default",
            },
        )
        == 1
    )
    vdb_info = {
        "domain": "web1",
        "disk": "vdb",
        "path": "",
        "format": "",
        "bus": "virtio",
        "discard": "ignore",
    }
    assert registry.get_sample_value("virt_trimd_disk_info", vdb_info) == 1
    vda = {"domain": "web1", "disk": "vda"}
    vdb = {"domain": "web1", "disk": "vdb"}
    assert registry.get_sample_value("virt_trimd_disk_allocated_bytes", vda) == 10
    assert registry.get_sample_value("virt_trimd_disk_file_bytes", vda) == 20
    assert registry.get_sample_value("virt_trimd_disk_virtual_bytes", vda) is None
    assert registry.get_sample_value("virt_trimd_disk_discard_ready", vda) is None
    assert registry.get_sample_value("virt_trimd_disk_discard_ready", vdb) == 0
    assert registry.get_sample_value("virt_trimd_disk_allocated_bytes", vdb) is None
    assert registry.get_sample_value("virt_trimd_disk_trim_effective", vdb) is None
    assert registry.get_sample_value("virt_trimd_disk_reclaimable_bytes", vdb) is None


def test_daemon_gauges_and_build_info() -> None:
    state = State()
    registry = scrape(state, version="0.9.1+g1234")
    assert registry.get_sample_value("virt_trimd_build_info", {"version": "0.9.1+g1234"}) == 1
    assert registry.get_sample_value("virt_trimd_libvirt_up") == 0
    assert registry.get_sample_value("virt_trimd_config_last_reload_successful") == 0
    assert (
        registry.get_sample_value("virt_trimd_config_last_reload_success_timestamp_seconds") is None
    )
    assert registry.get_sample_value("virt_trimd_history_write_ok") == 1
    assert registry.get_sample_value("virt_trimd_history_write_errors_total") == 0
    state.set_libvirt_up(True)
    state.set_config_reload(True, T0)
    state.set_history_ok(False)
    assert registry.get_sample_value("virt_trimd_libvirt_up") == 1
    assert registry.get_sample_value("virt_trimd_config_last_reload_successful") == 1
    assert (
        registry.get_sample_value("virt_trimd_config_last_reload_success_timestamp_seconds") == T0
    )
    assert registry.get_sample_value("virt_trimd_history_write_ok") == 0
    assert registry.get_sample_value("virt_trimd_history_write_errors_total") == 1


@pytest.mark.parametrize(
    "name",
    ['we"ird', "back\\slash", "new\nline", "ünïcødé-域名", 'all"\\\n\t of them\\n'],
)
def test_awkward_label_values_round_trip(name: str) -> None:
    state = State()
    state.observe_trim(trim_record(name, filesystems=(FilesystemResult(name, 7, None),)))
    text = generate_latest(scrape(state)).decode("utf-8")
    seen = {
        (s.name, tuple(sorted(s.labels.items())), s.value)
        for f in text_string_to_metric_families(text)
        for s in f.samples
    }
    assert (
        "virt_trimd_guest_trimmed_bytes_total",
        (("domain", name), ("mountpoint", name)),
        7.0,
    ) in seen
    assert ("virt_trimd_trims_total", (("domain", name), ("result", "success")), 1.0) in seen


class CountingState(State):
    """Counts snapshots, and can refuse them, to see what the collector asks for."""

    def __init__(self, *, fail: bool = False) -> None:
        super().__init__()
        self.snapshots = 0
        self.fail = fail

    def snapshot(self) -> StateSnapshot:
        self.snapshots += 1
        if self.fail:
            raise AssertionError("snapshot taken")
        return super().snapshot()


def test_one_snapshot_per_scrape_and_none_at_registration() -> None:
    state = CountingState(fail=True)
    registry = CollectorRegistry()
    registry.register(TrimdCollector(state, "1"))  # describe() must not read the state
    assert state.snapshots == 0
    state.fail = False
    generate_latest(registry)
    assert state.snapshots == 1


def test_registering_twice_is_refused_as_duplicate_names() -> None:
    registry = CollectorRegistry()
    registry.register(TrimdCollector(State(), "1"))
    with pytest.raises(ValueError, match="Duplicated timeseries"):
        registry.register(TrimdCollector(State(), "1"))


def test_unmeasured_disk_is_exported_with_its_reason_and_no_allocation() -> None:
    registry = scrape(representative_state())
    labels = {
        "domain": "db1",
        "disk": "sda",
        "path": "/tmp/db1.qcow2",
        "reason": "cannot stat /tmp/db1.qcow2: No such file or directory",
    }
    assert registry.get_sample_value("virt_trimd_disk_not_measured", labels) == 1
    key = {"domain": "db1", "disk": "sda"}
    assert registry.get_sample_value("virt_trimd_disk_allocated_bytes", key) is None
    assert registry.get_sample_value("virt_trimd_reclaimed_bytes_total", key) is None


def test_reclaims_counter_tells_method_and_trigger_apart() -> None:
    state = State()
    registry = scrape(state)
    state.observe_trim(trim_record())
    state.observe_trim(trim_record(method=Method.SPARSIFY))
    state.observe_trim(trim_record(trigger="growth"))
    for method, trigger in (("agent", "schedule"), ("sparsify", "schedule"), ("agent", "growth")):
        labels = {"domain": "web1", "method": method, "trigger": trigger, "result": "success"}
        assert registry.get_sample_value("virt_trimd_reclaims_total", labels) == 1
    assert (
        registry.get_sample_value("virt_trimd_trims_total", {"domain": "web1", "result": "success"})
        == 3
    )
    state.set_trigger_backoff("web1", 1234.0)
    labels = {"domain": "web1"}
    assert (
        registry.get_sample_value("virt_trimd_trigger_backoff_until_timestamp_seconds", labels)
        == 1234.0
    )
    state.set_trigger_backoff("web1", None)
    assert (
        registry.get_sample_value("virt_trimd_trigger_backoff_until_timestamp_seconds", labels)
        is None
    )


def test_storage_group_info_only_inside_a_group() -> None:
    state = State()
    registry = scrape(state)
    assert registry.get_sample_value("virt_trimd_storage_group_info", {}) is None
    state.set_storage_group(("ceph-a", "4d0ec9e060f0", 2, 3, 1))
    labels = {"group": "ceph-a", "members": "4d0ec9e060f0", "share": "2", "shares": "3",
              "at_once": "1"}  # fmt: skip
    assert registry.get_sample_value("virt_trimd_storage_group_info", labels) == 1
