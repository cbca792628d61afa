"""State: what trims, censuses and daemon events do to the numbers the collector renders."""

from __future__ import annotations

import threading
from datetime import UTC, datetime

import pytest

from support.records import disk_record, trim_record
from virt_trimd.engine.state import DURATION_BUCKETS, DiskState, State
from virt_trimd.records import DiskRecord, FilesystemResult, Result, SweepSummary, TrimRecord

T0 = datetime(2024, 5, 1, 2, 0, tzinfo=UTC).timestamp()
GIB = 1 << 30


def census_disk(domain: str = "web1", disk: str = "vda", **kw: object) -> DiskState:
    fields: dict[str, object] = {
        "path": f"/images/{disk}.qcow2",
        "format": "qcow2",
        "bus": "virtio",
        "discard": "unmap",
        "allocated_bytes": 6 * GIB,
        "virtual_bytes": 20 * GIB,
        "file_bytes": 7 * GIB,
        "discard_ready": True,
        "effective": None,
        "reclaimable_bytes": GIB,
    }
    fields.update(kw)
    return DiskState(domain=domain, disk=disk, **fields)  # type: ignore[arg-type]


def test_reclaimed_counter_grows_by_positive_reclaim_only() -> None:
    state = State()
    state.observe_trim(trim_record(disks=(disk_record("vda", 6 * GIB, 5 * GIB),)))
    state.observe_trim(trim_record(disks=(disk_record("vda", 5 * GIB, 5 * GIB + 100),)))
    state.observe_trim(trim_record(disks=(disk_record("vda", 5 * GIB, 4 * GIB),)))
    assert state.snapshot().reclaimed_bytes_total == {("web1", "vda"): 2 * GIB}


def test_negative_first_reclaim_creates_series_at_zero() -> None:
    state = State()
    state.observe_trim(trim_record(disks=(disk_record("vda", GIB, 2 * GIB),)))
    assert state.snapshot().reclaimed_bytes_total == {("web1", "vda"): 0}


def test_unmeasured_disks_touch_no_counter_and_say_why() -> None:
    state = State()
    state.observe_trim(
        trim_record(disks=(disk_record("sdb", None, None, not_measured="network disk"),))
    )
    snap = state.snapshot()
    assert snap.reclaimed_bytes_total == {}
    assert [(d.disk, d.allocated_bytes, d.not_measured) for d in snap.disks] == [
        ("sdb", None, "network disk")
    ]


def test_a_measured_trim_clears_not_measured() -> None:
    state = State()
    state.observe_trim(trim_record(disks=(disk_record("vda", None, None, not_measured="gone"),)))
    state.observe_trim(trim_record(disks=(disk_record("vda", 2 * GIB, GIB),)))
    [disk] = state.snapshot().disks
    assert (disk.allocated_bytes, disk.not_measured) == (GIB, None)


def test_guest_trimmed_per_mountpoint_skips_unknown_sizes() -> None:
    state = State()
    fss = (
        FilesystemResult("/", 100, None),
        FilesystemResult("/boot", None, "FITRIM: not supported"),
        FilesystemResult("C:\\", None, None),
    )
    state.observe_trim(trim_record(filesystems=fss))
    state.observe_trim(trim_record(filesystems=(FilesystemResult("/", 50, None),)))
    assert state.snapshot().guest_trimmed_bytes_total == {("web1", "/"): 150}


def test_trims_total_by_result_and_dry_runs_change_nothing() -> None:
    state = State()
    state.observe_trim(trim_record(result=Result.SUCCESS))
    state.observe_trim(trim_record(result=Result.SUCCESS))
    state.observe_trim(trim_record(result=Result.TIMEOUT))
    state.observe_trim(trim_record("db1", Result.SKIPPED))
    before = state.snapshot()
    state.observe_trim(
        trim_record(
            result=Result.SUCCESS,
            dry_run=True,
            disks=(disk_record(),),
            filesystems=(FilesystemResult("/", 9, None),),
            started_at="2030-01-01T00:00:00+00:00",
        )
    )
    after = state.snapshot()
    assert after.trims_total == {
        ("web1", "success"): 2,
        ("web1", "timeout"): 1,
        ("db1", "skipped"): 1,
    }
    assert after == before


def test_duration_histogram_buckets_and_unattempted_results() -> None:
    state = State()
    for seconds in (0.05, 1.0, 1.01, 4000.0):
        state.observe_trim(trim_record(duration_seconds=seconds))
    for result in (Result.SKIPPED, Result.NOT_RUNNING, Result.AGENT_MISSING):
        state.observe_trim(trim_record("idle", result, duration_seconds=0.0))
    hist = state.snapshot().trim_duration
    assert hist.bounds == DURATION_BUCKETS
    by_bound = dict(zip(hist.bounds, hist.counts, strict=True))
    assert by_bound[0.1] == 1
    assert by_bound[1.0] == 1  # le is inclusive
    assert by_bound[2.5] == 1
    assert by_bound[float("inf")] == 1
    assert hist.count == 4
    assert hist.sum == pytest.approx(0.05 + 1.0 + 1.01 + 4000.0)
    assert state.snapshot().last_trim_duration_seconds == {"web1": 4000.0}


def test_buckets_span_a_tenth_of_a_second_to_an_hour() -> None:
    assert DURATION_BUCKETS[0] == 0.1
    assert DURATION_BUCKETS[-2] == 3600.0
    assert DURATION_BUCKETS[-1] == float("inf")
    assert list(DURATION_BUCKETS) == sorted(DURATION_BUCKETS)


def test_last_success_is_finish_of_success_only() -> None:
    state = State()
    state.observe_trim(trim_record("a", Result.SUCCESS, duration_seconds=3.0))
    state.observe_trim(
        trim_record(
            "a", Result.PARTIAL, started_at="2024-05-02T02:00:00+00:00", duration_seconds=1.0
        )
    )
    state.observe_trim(trim_record("b", Result.PARTIAL))
    state.observe_trim(
        trim_record("c", Result.SUCCESS, started_at="2024-05-01T02:00:00", duration_seconds=1)
    )
    assert state.snapshot().last_success_ts == {"a": T0 + 3.0, "c": T0 + 1.0}


def test_last_success_never_goes_back() -> None:
    state = State()
    state.observe_trim(trim_record(started_at="2024-05-02T02:00:00+00:00", duration_seconds=0.0))
    state.observe_trim(trim_record(started_at="2024-05-01T02:00:00+00:00", duration_seconds=0.0))
    state.restore_last_success({"web1": T0, "other": T0 - 5})
    assert state.snapshot().last_success_ts == {"web1": T0 + 86400, "other": T0 - 5}
    state.restore_last_success({"other": T0})
    assert state.snapshot().last_success_ts["other"] == T0


def test_unparseable_started_at_uses_now() -> None:
    state = State()
    state.observe_trim(trim_record(started_at="garbage"), now=T0 + 42)
    assert state.snapshot().last_success_ts == {"web1": T0 + 42}


def test_trim_updates_disk_gauges_and_keeps_census_only_fields() -> None:
    state = State()
    state.observe_census("web1", [census_disk(effective=False)])
    state.observe_trim(trim_record(disks=(disk_record("vda", 6 * GIB, 5 * GIB, effective=True),)))
    (disk,) = state.snapshot().disks
    assert disk.allocated_bytes == 5 * GIB
    assert disk.virtual_bytes == 20 * GIB
    assert disk.file_bytes == 7 * GIB
    assert disk.effective is True
    assert disk.discard_ready is True  # only a census knows this
    assert disk.reclaimable_bytes == GIB


def test_trim_without_effective_keeps_known_effective() -> None:
    state = State()
    state.observe_census("web1", [census_disk(effective=True)])
    state.observe_trim(trim_record(disks=(disk_record(effective=None),)))
    assert state.snapshot().disks[0].effective is True


def test_census_replaces_a_domains_disks() -> None:
    state = State()
    state.observe_census("web1", [census_disk(disk="vda"), census_disk(disk="vdb")])
    state.observe_census("db1", [census_disk("db1", "sda")])
    state.observe_census("web1", [census_disk(disk="vdb", allocated_bytes=1)])
    assert [(d.domain, d.disk, d.allocated_bytes) for d in state.snapshot().disks] == [
        ("db1", "sda", 6 * GIB),
        ("web1", "vdb", 1),
    ]
    state.observe_census("db1", [])
    assert [d.domain for d in state.snapshot().disks] == ["web1"]


def test_census_rejects_disks_of_another_domain() -> None:
    with pytest.raises(ValueError, match="db1"):
        State().observe_census("web1", [census_disk("db1")])


def test_retain_domains_drops_every_series_of_vanished_domains() -> None:
    state = State()
    for name in ("keep", "gone"):
        state.observe_census(name, [census_disk(name)])
        state.observe_trim(
            trim_record(
                name,
                disks=(disk_record(),),
                filesystems=(FilesystemResult("/", 1, None),),
            )
        )
    state.retain_domains(["keep"])
    snap = state.snapshot()
    assert set(snap.reclaimed_bytes_total) == {("keep", "vda")}
    assert set(snap.guest_trimmed_bytes_total) == {("keep", "/")}
    assert set(snap.trims_total) == {("keep", "success")}
    assert set(snap.last_trim_duration_seconds) == {"keep"}
    assert set(snap.last_success_ts) == {"keep"}
    assert {d.domain for d in snap.disks} == {"keep"}
    # The histogram has no domain label: its history stays.
    assert snap.trim_duration.count == 2


def test_schedules_next_run_sweeps_and_retain() -> None:
    state = State()
    state.set_next_run("nightly", T0 + 86400)
    state.set_next_run("weekly", T0 + 7 * 86400)
    recs = (
        trim_record(disks=(disk_record("vda", 6 * GIB, 5 * GIB),)),
        trim_record("db1", disks=(disk_record("vda", GIB, 2 * GIB),)),
    )
    state.observe_sweep("nightly", SweepSummary(recs), T0 + 60)
    state.observe_sweep("weekly", SweepSummary(), T0 + 1)
    snap = state.snapshot()
    assert snap.next_run_ts == {"nightly": T0 + 86400, "weekly": T0 + 7 * 86400}
    assert snap.last_sweep_ts == {"nightly": T0 + 60, "weekly": T0 + 1}
    assert snap.sweep_reclaimed_bytes == {"nightly": 0, "weekly": 0}  # net: +1 GiB - 1 GiB
    state.set_next_run("nightly", None)
    state.retain_schedules(["nightly"])
    snap = state.snapshot()
    assert snap.next_run_ts == {}
    assert set(snap.last_sweep_ts) == {"nightly"}
    assert set(snap.sweep_reclaimed_bytes) == {"nightly"}


def test_daemon_health_flags() -> None:
    state = State()
    snap = state.snapshot()
    assert (snap.libvirt_up, snap.config_reload_ok, snap.config_reload_success_ts) == (
        False,
        False,
        None,
    )
    assert (snap.history_write_ok, snap.history_write_errors_total) == (True, 0)
    state.set_libvirt_up(True)
    state.set_config_reload(True, T0)
    state.set_config_reload(False, T0 + 100)  # a failed reload keeps the last success time
    state.set_history_ok(False)
    state.set_history_ok(False)
    state.set_history_ok(True)
    snap = state.snapshot()
    assert snap.libvirt_up is True
    assert (snap.config_reload_ok, snap.config_reload_success_ts) == (False, T0)
    assert (snap.history_write_ok, snap.history_write_errors_total) == (True, 2)


def test_config_reload_defaults_to_now() -> None:
    state = State()
    state.set_config_reload(True)
    ts = state.snapshot().config_reload_success_ts
    assert ts is not None and ts > T0


def test_snapshot_is_a_frozen_copy() -> None:
    state = State()
    state.observe_trim(trim_record(disks=(disk_record(),)))
    snap = state.snapshot()
    state.observe_trim(trim_record(disks=(disk_record(),)))
    state.retain_domains([])
    assert snap.trims_total == {("web1", "success"): 1}
    with pytest.raises(TypeError):
        snap.trims_total[("x", "y")] = 1  # type: ignore[index]


def test_concurrent_observations_are_not_lost() -> None:
    state = State()

    def worker(n: int) -> None:
        for _ in range(500):
            state.observe_trim(trim_record(f"d{n % 2}", disks=(disk_record("vda", 10, 9),)))
            state.snapshot()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    snap = state.snapshot()
    assert snap.trims_total == {("d0", "success"): 2000, ("d1", "success"): 2000}
    assert snap.reclaimed_bytes_total == {("d0", "vda"): 2000, ("d1", "vda"): 2000}
    assert snap.trim_duration.count == 4000


def test_census_keeps_the_latest_trim_effectiveness_verdict() -> None:
    from virt_trimd.engine.state import DiskState, State
    from virt_trimd.records import Result

    state = State()
    disk = DiskRecord(
        disk="sda",
        path="/i.qcow2",
        format="qcow2",
        bus="scsi",
        discard="ignore",
        allocated_before=500,
        allocated_after=500,
        reclaimed_bytes=0,
        guest_used_bytes=100,
        residual_bytes=400,
        effective=False,
    )
    state.observe_trim(
        TrimRecord(
            domain="d",
            uuid="u",
            result=Result.SUCCESS,
            message="",
            started_at="2026-01-01T00:00:00Z",
            duration_seconds=1.0,
            disks=(disk,),
        )
    )
    census = DiskState(
        domain="d",
        disk="sda",
        path="/i.qcow2",
        format="qcow2",
        bus="scsi",
        discard="ignore",
        allocated_bytes=600,
        virtual_bytes=1000,
        file_bytes=700,
        discard_ready=False,
        reclaimable_bytes=500,
    )
    state.observe_census("d", [census])
    (after,) = state.snapshot().disks
    assert after.effective is False and after.allocated_bytes == 600
    assert after.reclaimable_bytes == 500 and after.discard_ready is False
