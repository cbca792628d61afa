"""History against real SQLite files in tmp dirs, including a SIGKILL mid-write."""

from __future__ import annotations

import dataclasses
import json
import os
import shutil
import signal
import sqlite3
import stat
import subprocess
import sys
import threading
from collections.abc import Iterator
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

import virt_trimd
from support.records import full_record, iso
from virt_trimd.engine.history import DB_FILENAME, SCHEMA_VERSION, History, HistoryError
from virt_trimd.records import Result, TrimRecord

DAEMON_DIR = str(Path(virt_trimd.__file__).resolve().parent.parent)
T0 = datetime(2024, 5, 1, 2, 0, tzinfo=UTC).timestamp()


@pytest.fixture
def history(tmp_path: Path) -> Iterator[History]:
    h = History(tmp_path / "state")
    yield h
    h.close()


def test_full_record_round_trips(history: History) -> None:
    record = full_record(started_ts=T0)
    history.append(record)
    (back,) = history.query()
    assert back == record
    assert back.to_dict() == record.to_dict()


@pytest.mark.parametrize(("umask", "db_mode"), [(0o002, 0o640), (0o077, 0o600)])
def test_creates_dir_0750_db_0640_schema_and_wal(tmp_path: Path, umask: int, db_mode: int) -> None:
    state_dir = tmp_path / "a" / "state"
    old_umask = os.umask(umask)
    try:
        History(state_dir).close()
    finally:
        os.umask(old_umask)
    # The directory is 0750 whatever the umask; the file is at most 0640 (a stricter
    # umask, e.g. systemd UMask=0077, is the admin's choice and is kept).
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o750
    db = state_dir / DB_FILENAME
    assert stat.S_IMODE(db.stat().st_mode) == db_mode
    conn = sqlite3.connect(db)
    try:
        assert conn.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
        names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master")}
        assert {"trims", "sweeps", "trims_domain_started", "trims_result"} <= names
    finally:
        conn.close()


def test_existing_state_dir_mode_is_left_alone(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir(mode=0o700)
    os.chmod(state_dir, 0o700)
    History(state_dir).close()
    assert stat.S_IMODE(state_dir.stat().st_mode) == 0o700


def test_columns_match_record(history: History) -> None:
    record = full_record(started_ts=T0 + 10)
    history.append(record)
    conn = sqlite3.connect(history.path)
    try:
        row = conn.execute(
            "SELECT domain, uuid, schedule, result, started_at, started_ts,"
            " duration_seconds, reclaimed_bytes, dry_run FROM trims"
        ).fetchone()
    finally:
        conn.close()
    assert row == (
        "web1",
        record.uuid,
        "nightly",
        "success",
        record.started_at,
        T0 + 10,
        2.5,
        1 << 30,
        0,
    )


@pytest.mark.parametrize(
    "started_at",
    ["2024-05-01T02:00:00", "2024-05-01T02:00:00Z", "2024-05-01T04:00:00+02:00"],
)
def test_started_ts_from_iso_naive_is_utc(history: History, started_at: str) -> None:
    history.append(TrimRecord("d", "u", Result.SUCCESS, "", started_at, 1.0))
    assert history.last_success_by_domain() == {"d": T0 + 1.0}


def test_unparseable_started_at_raises_history_error(history: History) -> None:
    with pytest.raises(HistoryError, match="'d'"):
        history.append(TrimRecord("d", "u", Result.SUCCESS, "", "yesterday", 1.0))
    assert history.query() == []


def test_query_filters_and_limit(history: History) -> None:
    # Appended out of order on purpose: results are ordered by start time, not row id.
    for domain, offset in [("b", 30), ("a", 10), ("a", 40), ("b", 20), ("a", 50)]:
        history.append(full_record(domain=domain, started_ts=T0 + offset))

    def starts(records: list[TrimRecord]) -> list[tuple[str, str]]:
        return [(r.domain, r.started_at) for r in records]

    assert starts(history.query()) == [
        ("a", iso(T0 + 10)),
        ("b", iso(T0 + 20)),
        ("b", iso(T0 + 30)),
        ("a", iso(T0 + 40)),
        ("a", iso(T0 + 50)),
    ]
    assert starts(history.query(domain="b")) == [("b", iso(T0 + 20)), ("b", iso(T0 + 30))]
    assert starts(history.query(since_ts=T0 + 30)) == [
        ("b", iso(T0 + 30)),
        ("a", iso(T0 + 40)),
        ("a", iso(T0 + 50)),
    ]
    # limit keeps the newest, still oldest first
    assert starts(history.query(limit=2)) == [("a", iso(T0 + 40)), ("a", iso(T0 + 50))]
    assert starts(history.query(domain="a", since_ts=T0 + 11, limit=1)) == [("a", iso(T0 + 50))]
    assert history.query(domain="nope") == []
    assert history.query(limit=0) == []


def test_last_success_counts_success_only_at_finish_time(history: History) -> None:
    history.append(full_record("a", Result.SUCCESS, T0, duration_seconds=2.5))
    history.append(full_record("a", Result.PARTIAL, T0 + 100))
    history.append(full_record("a", Result.SUCCESS, T0 + 200, dry_run=True))
    history.append(full_record("b", Result.PARTIAL, T0))
    history.append(full_record("c", Result.SUCCESS, T0 + 5, duration_seconds=1.0))
    history.append(full_record("c", Result.SUCCESS, T0 + 1, duration_seconds=1.0))
    assert history.last_success_by_domain() == {"a": T0 + 2.5, "c": T0 + 6.0}


def test_status_reads_agree_with_and_without_the_indexes(tmp_path: Path) -> None:
    """A reader of a file no read-write open of this version indexed yet (the indexes are
    created at read-write open, not by a schema version) gets the same answers."""
    with History(tmp_path) as hist:
        for i, (dom, result) in enumerate(
            [("a", Result.SUCCESS), ("a", Result.PARTIAL), ("b", Result.SUCCESS),
             ("b", Result.SUCCESS), ("c", Result.TIMEOUT), ("a", Result.SUCCESS)]
        ):  # fmt: skip
            hist.append(full_record(dom, result, T0 + 10 * (i % 3), duration_seconds=1.0 + i))
        hist.append(full_record("d", Result.SUCCESS, T0, dry_run=True))
        indexed = (
            hist.last_success_by_domain(),
            hist.latest_trim_by_domain(),
            hist.reclaim_rows(T0 + 5),
        )
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    names = {r[0] for r in conn.execute("SELECT name FROM sqlite_master WHERE type = 'index'")}
    assert {"trims_started", "trims_success_finished"} <= names
    conn.execute("DROP INDEX trims_started")
    conn.execute("DROP INDEX trims_success_finished")
    conn.close()
    with History(tmp_path, readonly=True) as reader:
        plain = (
            reader.last_success_by_domain(),
            reader.latest_trim_by_domain(),
            reader.reclaim_rows(T0 + 5),
        )
    assert plain == indexed
    assert set(indexed[0]) == {"a", "b"} and set(indexed[1]) == {"a", "b", "c"}


def test_last_sweep_by_schedule(history: History) -> None:
    assert history.last_sweep_by_schedule() == {}
    history.append_sweep("nightly", T0 + 86400, T0 + 86500, 3, 1 << 30)
    history.append_sweep("nightly", T0, T0 + 100, 3, -5)
    history.append_sweep("weekly", T0 + 5, T0 + 50, 1, 0)
    assert history.last_sweep_by_schedule() == {"nightly": T0 + 86400, "weekly": T0 + 5}
    conn = sqlite3.connect(history.path)
    try:
        rows = conn.execute(
            "SELECT schedule, started_ts, finished_ts, domains, reclaimed_bytes"
            " FROM sweeps ORDER BY id"
        ).fetchall()
    finally:
        conn.close()
    assert rows[1] == ("nightly", T0, T0 + 100, 3, -5)


def test_survives_reopen(tmp_path: Path) -> None:
    with History(tmp_path) as h:
        h.append(full_record("a", started_ts=T0))
        h.append_sweep("nightly", T0, T0 + 1, 1, 0)
    with History(tmp_path) as h:
        assert [r.domain for r in h.query()] == ["a"]
        assert h.last_sweep_by_schedule() == {"nightly": T0}
        assert h.integrity_ok()


def test_readonly_reads_and_refuses_writes(tmp_path: Path) -> None:
    with History(tmp_path) as h:
        h.append(full_record("a", started_ts=T0))
    with History(tmp_path, readonly=True) as ro:
        assert [r.domain for r in ro.query()] == ["a"]
        assert ro.integrity_ok()
        with pytest.raises(HistoryError, match="readonly"):
            ro.append(full_record("b", started_ts=T0))
    with History(tmp_path) as h:
        assert [r.domain for r in h.query()] == ["a"]


def test_readonly_sees_rows_of_a_running_writer(tmp_path: Path) -> None:
    with History(tmp_path) as writer, History(tmp_path, readonly=True) as reader:
        writer.append(full_record("a", started_ts=T0))
        assert [r.domain for r in reader.query()] == ["a"]


def test_readonly_missing_db_raises(tmp_path: Path) -> None:
    with pytest.raises(HistoryError, match="does not exist"):
        History(tmp_path, readonly=True)
    assert not (tmp_path / DB_FILENAME).exists()


def test_not_a_database_raises(tmp_path: Path) -> None:
    (tmp_path / DB_FILENAME).write_bytes(b"this is not sqlite, " * 100)
    with pytest.raises(HistoryError, match="not a database"):
        History(tmp_path)


def test_newer_schema_is_refused(tmp_path: Path) -> None:
    History(tmp_path).close()
    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    conn.commit()
    conn.close()
    with pytest.raises(HistoryError, match="newer"):
        History(tmp_path)
    with pytest.raises(HistoryError, match="newer"):
        History(tmp_path, readonly=True)


def test_closed_history_raises(tmp_path: Path) -> None:
    h = History(tmp_path)
    h.close()
    h.close()
    with pytest.raises(HistoryError, match="closed"):
        h.append(full_record(started_ts=T0))


def test_concurrent_appends_from_threads(history: History) -> None:
    def worker(n: int) -> None:
        for i in range(25):
            history.append(full_record(f"dom{n}", started_ts=T0 + i))

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    records = history.query()
    assert len(records) == 200
    assert {r.domain for r in records} == {f"dom{n}" for n in range(8)}
    assert history.integrity_ok()


# --- the outside world fails: subprocesses, so limits and dropped privileges stay there ---

_CHILD_PRELUDE = f"""
import sys
sys.path.insert(0, {DAEMON_DIR!r})
from pathlib import Path
from typing import Any
from virt_trimd.engine.history import History, HistoryError
from support.records import full_record, iso
from virt_trimd.records import DiskRecord, FilesystemResult, Result, TrimRecord
"""


def _run_child(code: str, *, unprivileged: bool = False) -> subprocess.CompletedProcess[str]:
    argv = [sys.executable, "-c", _CHILD_PRELUDE + code]
    if unprivileged and os.geteuid() == 0:
        # Root ignores file modes; drop the capabilities that let it, for this child only.
        setpriv = shutil.which("setpriv")
        if setpriv is None:
            pytest.skip("running as root and setpriv is not available")
        argv = [setpriv, "--bounding-set=-dac_override,-dac_read_search,-fowner", *argv]
    return subprocess.run(argv, capture_output=True, text=True, timeout=60, check=False)


def test_readonly_directory_raises_history_error(tmp_path: Path) -> None:
    state_dir = tmp_path / "state"
    state_dir.mkdir()
    os.chmod(state_dir, 0o555)
    try:
        proc = _run_child(
            f"""
state_dir = Path({str(state_dir)!r})
try:
    (state_dir / "probe").touch()
except PermissionError:
    pass
else:
    sys.exit("precondition failed: the directory is writable")
try:
    History(state_dir)
except HistoryError as exc:
    print("HistoryError:", exc)
""",
            unprivileged=True,
        )
    finally:
        os.chmod(state_dir, 0o755)
    assert proc.returncode == 0, proc.stderr
    assert "HistoryError: cannot open history database" in proc.stdout
    assert str(state_dir) in proc.stdout


def test_unwritable_database_stays_readable_but_cannot_be_opened_to_write(tmp_path: Path) -> None:
    with History(tmp_path) as h:
        h.append(full_record("a", started_ts=T0))
    os.chmod(tmp_path, 0o555)
    os.chmod(tmp_path / DB_FILENAME, 0o444)
    try:
        proc = _run_child(
            f"""
state_dir = Path({str(tmp_path)!r})
h = History(state_dir, readonly=True)
print("rows:", len(h.query()))
h.close()
try:
    h = History(state_dir)
except HistoryError as exc:
    print("open HistoryError:", exc)
""",
            unprivileged=True,
        )
    finally:
        os.chmod(tmp_path, 0o755)
        os.chmod(tmp_path / DB_FILENAME, 0o644)
    assert proc.returncode == 0, proc.stderr
    # The history CLI can still read what the daemon can no longer write.
    assert "rows: 1" in proc.stdout
    assert "open HistoryError:" in proc.stdout


def test_disk_full_raises_history_error_and_keeps_old_rows(tmp_path: Path) -> None:
    proc = _run_child(
        f"""
import resource, signal
signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # get EFBIG instead of being killed
h = History(Path({str(tmp_path)!r}))
base = TrimRecord("a", "u", Result.SUCCESS, "", "2024-05-01T02:00:00+00:00", 1.0)
h.append(base)
h.close()
h = History(Path({str(tmp_path)!r}))
# No file may grow past 64 KiB from now on: the WAL fills up like a full disk would.
resource.setrlimit(resource.RLIMIT_FSIZE, (64 * 1024, 64 * 1024))
big = TrimRecord("b", "u", Result.SUCCESS, "x" * 20000, "2024-05-01T03:00:00+00:00", 1.0)
for i in range(100):
    try:
        h.append(big)
    except HistoryError as exc:
        print("HistoryError after", i, ":", exc)
        break
else:
    sys.exit("no HistoryError although files cannot grow")
"""
    )
    assert proc.returncode == 0, proc.stderr
    assert "HistoryError after" in proc.stdout
    assert "check free space" in proc.stdout
    with History(tmp_path) as h:
        assert h.integrity_ok()
        records = h.query()
    assert records[0].domain == "a"
    assert all(r.domain == "b" and len(r.message) == 20000 for r in records[1:])


_CRASH_LOOP = """
state_dir = Path(sys.argv[1])
round_no = int(sys.argv[2])
h = History(state_dir)
disks = tuple(
    DiskRecord(f"vd{n}", f"/images/{n}.qcow2", "qcow2", "virtio", "unmap", 10**9, 10**8, 9 * 10**8)
    for n in range(40)
)
fss = tuple(FilesystemResult(f"/mnt/{n}" + "/deep" * 20, 12345, None) for n in range(40))
i = 0
while True:
    h.append(TrimRecord(
        f"dom{round_no}-{i}", "u", Result.SUCCESS, "m" * 3000,
        "2024-05-01T02:00:00+00:00", float(i), fss, disks, "nightly",
    ))
    if i == 20:
        print("ready", flush=True)
    i += 1
"""


def test_sigkill_mid_append_leaves_no_corruption_and_no_partial_rows(tmp_path: Path) -> None:
    # Rows span several pages, so a kill inside a commit would show as a torn row.
    minimum = 0
    for round_no in range(3):
        proc = subprocess.Popen(
            [sys.executable, "-c", _CHILD_PRELUDE + _CRASH_LOOP, str(tmp_path), str(round_no)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        assert proc.stdout is not None
        try:
            assert proc.stdout.readline() == "ready\n", proc.stderr and proc.stderr.read()
            threading.Event().wait(0.3)  # let it get well into further commits
        finally:
            proc.send_signal(signal.SIGKILL)
            proc.wait(timeout=30)
        assert proc.returncode == -signal.SIGKILL
        minimum += 21

        with History(tmp_path) as h:
            assert h.integrity_ok()
            records = h.query()  # raises HistoryError on any undecodable row
        assert len(records) >= minimum
        minimum = len(records)

    conn = sqlite3.connect(tmp_path / DB_FILENAME)
    try:
        rows = conn.execute(
            "SELECT domain, started_ts, duration_seconds, reclaimed_bytes, record_json FROM trims"
        ).fetchall()
    finally:
        conn.close()
    assert len(rows) == minimum
    for domain, started_ts, duration, reclaimed, text in rows:
        record = TrimRecord.from_dict(json.loads(text))
        assert (record.domain, record.duration_seconds) == (domain, duration)
        assert started_ts == T0
        assert len(record.disks) == 40 and len(record.filesystems) == 40
        assert reclaimed == record.reclaimed_bytes == 40 * 9 * 10**8


def test_last_duration_is_the_latest_attempt_per_uuid(history: History) -> None:
    def rec(uuid: str, result: Result, started: float, duration: float, **kw: Any) -> TrimRecord:
        return dataclasses.replace(
            full_record("x", result, started, duration_seconds=duration, **kw), uuid=uuid
        )

    history.append(rec("u-a", Result.SUCCESS, T0 + 100, 9.0))
    history.append(rec("u-a", Result.SUCCESS, T0, 1.0))  # older, written later
    history.append(rec("u-a", Result.SKIPPED, T0 + 200, 0.0))
    history.append(rec("u-a", Result.SUCCESS, T0 + 300, 0.5, dry_run=True))
    history.append(rec("u-b", Result.TIMEOUT, T0, 30.0))
    history.append(rec("u-c", Result.PARTIAL, T0, 2.0))
    history.append(rec("u-d", Result.AGENT_UNAVAILABLE, T0, 5.0))
    history.append(rec("u-e", Result.NOT_RUNNING, T0, 0.0))
    assert history.last_duration_by_uuid() == {"u-a": 9.0, "u-b": 30.0, "u-c": 2.0, "u-d": 5.0}


def test_prune_deletes_old_rows_but_keeps_what_start_up_reads_back(history: History) -> None:
    day = 86400.0
    cutoff = T0 + 100 * day
    history.append(full_record("a", Result.SUCCESS, T0, duration_seconds=1.0))
    history.append(
        full_record("a", Result.SUCCESS, T0 + day, duration_seconds=1.0)
    )  # a's latest success
    history.append(full_record("a", Result.ERROR, T0 + 2 * day, duration_seconds=1.0))
    history.append(
        full_record("a", Result.SUCCESS, T0 + 200 * day, duration_seconds=1.0, dry_run=True)
    )
    history.append(
        full_record("b", Result.SUCCESS, T0 + 3 * day, duration_seconds=1.0, dry_run=True)
    )
    history.append(full_record("b", Result.SKIPPED, T0 + 4 * day, duration_seconds=0.0))
    history.append(full_record("c", Result.SUCCESS, T0 + 150 * day, duration_seconds=1.0))
    history.append(full_record("c", Result.SUCCESS, T0 + 5 * day, duration_seconds=1.0))
    history.append_sweep("nightly", T0, T0 + 10, 3, 0)
    history.append_sweep("nightly", T0 + day, T0 + day + 10, 3, 0)
    history.append_sweep("weekly", T0, T0 + 10, 1, 0)
    history.append_sweep("weekly", T0 + 150 * day, T0 + 150 * day + 10, 1, 0)
    success_before = history.last_success_by_domain()
    sweep_before = history.last_sweep_by_schedule()

    # Deleted: a's first success and its error, b's dry run and skip, c's older success.
    assert history.prune(cutoff) == 5
    kept = [(r.domain, r.result, r.dry_run) for r in history.query()]
    assert kept == [
        ("a", Result.SUCCESS, False),
        ("c", Result.SUCCESS, False),
        ("a", Result.SUCCESS, True),
    ]
    assert history.last_success_by_domain() == success_before
    assert history.last_sweep_by_schedule() == sweep_before
    conn = sqlite3.connect(history.path)
    try:
        # Kept: nightly's latest (old) and weekly's recent one.
        assert conn.execute("SELECT COUNT(*) FROM sweeps").fetchone() == (2,)
        assert conn.execute("PRAGMA integrity_check").fetchone() == ("ok",)
    finally:
        conn.close()
    assert history.prune(cutoff) == 0


def test_prune_on_a_read_only_database_raises_history_error(tmp_path: Path) -> None:
    with History(tmp_path) as writer:
        writer.append(full_record("a", Result.SUCCESS, T0))
        writer.append(full_record("a", Result.SUCCESS, T0 + 1))
    with History(tmp_path, readonly=True) as reader, pytest.raises(HistoryError):
        reader.prune(T0 + 10)
