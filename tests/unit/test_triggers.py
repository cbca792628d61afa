"""Growth and reclaimable triggers and their backoff: pure decisions, no daemon."""

from __future__ import annotations

import dataclasses

from support.records import GIB, disk_record, trim_record
from virt_trimd.config.model import ScheduleConfig, parse_config
from virt_trimd.engine.triggers import Backoff, baseline_after, could_not_help, due
from virt_trimd.records import Result


def _sched(**kw: object) -> ScheduleConfig:
    (sched,) = parse_config("schedules: [{name: g, growth: 4GiB, reclaimable: 8GiB}]").schedules
    return dataclasses.replace(sched, **kw)  # type: ignore[arg-type]


def test_a_trigger_only_schedule_loads_and_has_no_time() -> None:
    sched = _sched()
    assert sched.cron is None and sched.every_seconds is None
    assert sched.triggered and not sched.timed
    assert (sched.growth_bytes, sched.reclaimable_bytes) == (4 * GIB, 8 * GIB)


def test_growth_fires_from_the_baseline_and_not_before() -> None:
    sched = _sched(reclaimable_bytes=None)
    assert due(sched, 10 * GIB, 7 * GIB, None) is None
    hit = due(sched, 11 * GIB, 7 * GIB, None)
    assert hit is not None and hit.trigger == "growth" and "4.0 GiB" in hit.reason
    # No baseline yet (never trimmed, first census): growth cannot be judged.
    assert due(sched, 100 * GIB, None, None) is None


def test_reclaimable_fires_on_the_census_figure() -> None:
    sched = _sched(growth_bytes=None)
    assert due(sched, 20 * GIB, 20 * GIB, 7 * GIB) is None
    hit = due(sched, 20 * GIB, 20 * GIB, 8 * GIB)
    assert hit is not None and hit.trigger == "reclaimable"
    # Unknown (agent silent): never fires.
    assert due(sched, 20 * GIB, 20 * GIB, None) is None


def test_what_counts_as_not_helping() -> None:
    helped = trim_record(disks=(disk_record(before=6 * GIB, after=2 * GIB),))
    assert could_not_help(helped, 4 * GIB) is None
    little = trim_record(disks=(disk_record(before=6 * GIB, after=5 * GIB + 1),))
    assert "reclaimed only" in str(could_not_help(little, 4 * GIB))
    ineffective = trim_record(disks=(disk_record(effective=False),))
    assert "ineffective" in str(could_not_help(ineffective, None))
    failed = trim_record(result=Result.AGENT_UNAVAILABLE)
    assert "agent_unavailable" in str(could_not_help(failed, 4 * GIB))


def test_which_records_set_the_growth_baseline() -> None:
    two = (disk_record("vda", after=2 * GIB), disk_record("vdb", after=1 * GIB))
    assert baseline_after(trim_record(disks=two)) == 3 * GIB
    assert baseline_after(trim_record(result=Result.PARTIAL, disks=two)) == 3 * GIB
    # Not measured afterwards, a dry run, a failure or an ineffective trim: no baseline.
    assert baseline_after(trim_record(disks=(disk_record(after=None),))) is None
    assert baseline_after(trim_record(disks=two, dry_run=True)) is None
    assert baseline_after(trim_record(result=Result.TIMEOUT, disks=two)) is None
    ineffective = (disk_record("vda", after=2 * GIB, effective=False), two[1])
    assert baseline_after(trim_record(disks=ineffective)) is None


def test_backoff_doubles_up_to_a_day_and_ends_when_a_trim_helps() -> None:
    backoff = Backoff(base_seconds=300)
    assert backoff.until("u", 0) is None
    assert backoff.failed("u", 0) == 300
    assert backoff.until("u", 299) == 300 and backoff.until("u", 300) is None
    assert backoff.failed("u", 1000) == 1600
    assert backoff.active(1000) == 1
    for _ in range(20):
        end = backoff.failed("u", 0)
    assert end == 86400
    backoff.helped("u")
    assert backoff.until("u", 0) is None and backoff.active(0) == 0
