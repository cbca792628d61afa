"""The census series in real SQLite: migration from a v1 file, thinning, pruning, size."""

from __future__ import annotations

import shutil
import sqlite3
from pathlib import Path

from virt_trimd.engine.history import (
    CENSUS_TIERS,
    DB_FILENAME,
    SCHEMA_VERSION,
    CensusDomain,
    History,
)
from virt_trimd.engine.state import DiskState

V1_FIXTURE = Path(__file__).parent / "data" / "history-v1.sqlite3"
T0 = 1_780_000_000  # 2026-05-28, a round start for synthetic series
DAY = 86_400


def disk(domain: str, name: str, allocated: int, reclaimable: int | None = None) -> DiskState:
    return DiskState(
        domain=domain,
        disk=name,
        path=f"/var/lib/libvirt/images/{domain}-{name}.qcow2",
        format="qcow2",
        bus="virtio",
        discard="unmap",
        allocated_bytes=allocated,
        virtual_bytes=20 << 30,
        file_bytes=allocated + 4096,
        discard_ready=True,
        reclaimable_bytes=reclaimable,
    )


def domain(name: str, *disks: DiskState, running: bool = True) -> CensusDomain:
    return CensusDomain(name, f"uuid-{name}", running, "connected" if running else None, disks)


def v1_copy(tmp_path: Path) -> Path:
    state = tmp_path / "state"
    state.mkdir()
    shutil.copy(V1_FIXTURE, state / DB_FILENAME)
    return state


def raw_rows(path: Path, sql: str) -> list[tuple[object, ...]]:
    conn = sqlite3.connect(path)
    try:
        return list(conn.execute(sql))
    finally:
        conn.close()


def test_v1_database_is_migrated_and_keeps_every_row(tmp_path: Path) -> None:
    state = v1_copy(tmp_path)
    db = state / DB_FILENAME
    assert raw_rows(db, "PRAGMA user_version") == [(1,)]
    trims_before = raw_rows(db, "SELECT * FROM trims ORDER BY id")
    sweeps_before = raw_rows(db, "SELECT * FROM sweeps ORDER BY id")
    assert len(trims_before) == 6 and len(sweeps_before) == 3

    with History(state) as hist:
        assert hist.schema_version == SCHEMA_VERSION == 2
        assert [r.domain for r in hist.query()] == ["web01", "db01"] * 3
        hist.append_census(T0, [domain("web01", disk("web01", "vda", 10 << 20))])
        assert hist.census_series(0) != {}

    assert raw_rows(db, "PRAGMA user_version") == [(2,)]
    assert raw_rows(db, "SELECT * FROM trims ORDER BY id") == trims_before
    assert raw_rows(db, "SELECT * FROM sweeps ORDER BY id") == sweeps_before
    # Opening again does not migrate twice (the v2 tables exist already).
    History(state).close()
    assert raw_rows(db, "SELECT COUNT(*) FROM census") == [(1,)]


def test_reader_of_an_unmigrated_v1_file_sees_trims_and_no_series(tmp_path: Path) -> None:
    state = v1_copy(tmp_path)
    with History(state, readonly=True) as hist:
        assert hist.schema_version == 1
        assert len(hist.query()) == 6
        assert hist.census_domains() == [] and hist.census_series(0) == {}
        assert hist.latest_census_ts() is None
    assert raw_rows(state / DB_FILENAME, "PRAGMA user_version") == [(1,)]


def test_census_round_trip_and_vanished_domains(tmp_path: Path) -> None:
    with History(tmp_path) as hist:
        hist.append_census(
            T0,
            [
                domain("a", disk("a", "vda", 100, 40), disk("a", "vdb", 7)),
                domain("b", disk("b", "sda", 5), running=False),
            ],
        )
        hist.append_census(T0 + 300, [domain("a", disk("a", "vda", 90, 30))])
        # The second census is complete: b is gone, a's vdb was detached.
        assert [d.domain for d in hist.census_domains()] == ["a"]
        assert [(d.domain, d.disk) for d in hist.census_disks()] == [("a", "vda")]
        series = hist.census_series(T0)
        assert [(p.ts, p.allocated_bytes, p.reclaimable_bytes) for p in series[("a", "vda")]] == [
            (T0, 100, 40),
            (T0 + 300, 90, 30),
        ]
        assert hist.census_at(T0 + 299)[("a", "vda")].allocated_bytes == 100
        assert hist.latest_census_ts() == T0 + 300
        # A partial census (run --once) removes nobody.
        hist.append_census(T0 + 600, [domain("c", disk("c", "vda", 1))], complete=False)
        assert [d.domain for d in hist.census_domains()] == ["a", "c"]


def test_compaction_keeps_the_latest_sample_of_each_bucket(tmp_path: Path) -> None:
    now = T0 + 40 * DAY
    # Every 5 minutes over the last two days, every 20 minutes before: several samples
    # per hourly and per daily bucket either way.
    stamps = list(range(T0, now - 2 * DAY, 1200)) + list(range(now - 2 * DAY, now + 1, 300))
    with History(tmp_path) as hist:
        for ts in stamps:
            hist.append_census(ts, [domain("a", disk("a", "vda", ts))])
        hist.compact_census(now)
        kept = [(p.ts, p.allocated_bytes) for p in hist.census_series(0)[("a", "vda")]]

    # Independently, in plain Python: each tier in turn drops a sample when a later one
    # of the same bucket lies below the tier's cutoff.
    model = list(stamps)
    for age, bucket in CENSUS_TIERS:
        cutoff = now - age
        model = [
            t
            for t in model
            if t >= cutoff or not any(t < u < cutoff and u // bucket == t // bucket for u in model)
        ]
    assert kept == [(float(t), t) for t in model]
    assert len([t for t, _ in kept if t >= now - DAY]) == DAY // 300 + 1
    older = [t for t, _ in kept if t < now - 30 * DAY]
    assert len({int(t) // DAY for t in older}) == len(older)


def test_retention_prunes_the_series(tmp_path: Path) -> None:
    with History(tmp_path) as hist:
        for day in range(10):
            hist.append_census(T0 + day * DAY, [domain("a", disk("a", "vda", day))])
        hist.prune(T0 + 5 * DAY)
        assert [p.allocated_bytes for p in hist.census_series(0)[("a", "vda")]] == [5, 6, 7, 8, 9]


def test_a_year_of_censuses_for_200_disks_stays_under_60_kib_per_disk(tmp_path: Path) -> None:
    """A year of 5-minute censuses over 200 disks, thinned daily as the daemon does.

    Rows older than a day keep one sample per hour and older than 30 days one per day,
    so feeding those older periods one census per hour and per day leaves exactly the
    rows 5-minute censuses would (and takes seconds, not the 105,120 censuses' minutes).
    """
    end = T0 + 365 * DAY
    stamps = list(range(T0, end - 30 * DAY, DAY))
    stamps += range(stamps[-1] + DAY, end - 2 * DAY, 3600)
    stamps += range(stamps[-1] + 3600, end + 1, 300)
    disks_total = 200
    with History(tmp_path) as hist:
        last_compaction = T0
        for ts in stamps:
            doms = [
                domain(
                    f"vm{i:03d}",
                    *(
                        disk(f"vm{i:03d}", f"vd{c}", (5 << 30) + ts % 997 * 4096, 1 << 30)
                        for c in "abcd"
                    ),
                )
                for i in range(disks_total // 4)
            ]
            hist.append_census(ts, doms)
            if ts - last_compaction >= DAY:
                hist.compact_census(ts)
                last_compaction = ts
        hist.compact_census(end)
        rows = raw_rows(hist.path, "SELECT COUNT(*) FROM census")[0][0]
    assert isinstance(rows, int)
    size = sum(f.stat().st_size for f in tmp_path.iterdir() if f.name.startswith(DB_FILENAME))
    per_disk = size / disks_total
    ((pages, free, page_size),) = raw_rows(
        tmp_path / DB_FILENAME,
        "SELECT * FROM pragma_page_count, pragma_freelist_count, pragma_page_size",
    )
    assert isinstance(pages, int) and isinstance(free, int) and isinstance(page_size, int)
    live = (pages - free) * page_size / disks_total
    print(f"rows per disk {rows / disks_total:.0f}, bytes per disk-year {per_disk:.0f} on disk")
    print(f"(live pages {live:.0f}; the rest are free pages the next censuses reuse)")
    assert rows / disks_total <= 288 + 2 + 29 * 24 + 336
    # README states "about 54 KiB per disk-year" (measured 55,337 bytes); 60 KiB leaves
    # room for page-fill noise.
    assert per_disk <= 60 * 1024
