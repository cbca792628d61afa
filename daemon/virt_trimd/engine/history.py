"""Trim and sweep history in SQLite: what the `history` CLI prints and what a restart remembers.

One file, `history.sqlite3`, under the daemon's state directory. Every record is a
single INSERT in its own transaction, the journal is WAL and commits are fsynced
(synchronous=FULL), so a SIGKILL or power cut mid-sweep leaves either the whole row
or no row, never a torn one.
"""

from __future__ import annotations

import json
import logging
import os
import sqlite3
import threading
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from types import TracebackType
from typing import Any

from virt_trimd.engine.state import DiskState
from virt_trimd.records import Result, TrimRecord

# Logger name kept from the flat layout: operators' journal filters (docs/architecture.md).
log = logging.getLogger("virt_trimd.history")

DB_FILENAME = "history.sqlite3"
SCHEMA_VERSION = 2

# Results where nothing was asked of the guest, as SQL parameters.
_NOT_A_TRIM = tuple(sorted(r.value for r in Result if not r.attempted))


def _latest_ids(table: str, key: str, where: str = "") -> str:
    """SQL for the id of each `key`'s latest row in `table` (among rows matching `where`).

    Latest by start time; of two started in the same instant, the one written last.
    """
    return (
        f"SELECT id FROM (SELECT id, ROW_NUMBER() OVER ("
        f" PARTITION BY {key} ORDER BY started_ts DESC, id DESC) AS n"
        f" FROM {table} {where}) WHERE n = 1"
    )


_SCHEMA_V1 = (
    """
    CREATE TABLE trims (
        id INTEGER PRIMARY KEY,
        domain TEXT NOT NULL,
        uuid TEXT NOT NULL,
        schedule TEXT,
        result TEXT NOT NULL,
        dry_run INTEGER NOT NULL DEFAULT 0,
        started_at TEXT NOT NULL,
        started_ts REAL NOT NULL,
        duration_seconds REAL NOT NULL,
        reclaimed_bytes INTEGER NOT NULL,
        record_json TEXT NOT NULL
    )
    """,
    "CREATE INDEX trims_domain_started ON trims (domain, started_ts)",
    "CREATE INDEX trims_result ON trims (result)",
    """
    CREATE TABLE sweeps (
        id INTEGER PRIMARY KEY,
        schedule TEXT NOT NULL,
        started_ts REAL NOT NULL,
        finished_ts REAL NOT NULL,
        domains INTEGER NOT NULL,
        reclaimed_bytes INTEGER NOT NULL
    )
    """,
    "CREATE INDEX sweeps_schedule_started ON sweeps (schedule, started_ts)",
)


# v2: the census series. One row per disk per kept census, WITHOUT ROWID and keyed by a
# small disk id, so a row is ~30 bytes; compact_census thins old rows (see CENSUS_TIERS).
_SCHEMA_V2 = (
    """
    CREATE TABLE census_domains (
        domain TEXT PRIMARY KEY,
        uuid TEXT NOT NULL,
        running INTEGER NOT NULL,
        agent_state TEXT,
        last_seen_ts REAL NOT NULL
    )
    """,
    """
    CREATE TABLE census_disks (
        id INTEGER PRIMARY KEY,
        domain TEXT NOT NULL,
        disk TEXT NOT NULL,
        path TEXT,
        format TEXT,
        bus TEXT NOT NULL,
        discard TEXT,
        discard_ready INTEGER,
        last_seen_ts REAL NOT NULL,
        UNIQUE (domain, disk)
    )
    """,
    """
    CREATE TABLE census (
        disk_id INTEGER NOT NULL,
        ts INTEGER NOT NULL,
        allocated_bytes INTEGER,
        virtual_bytes INTEGER,
        reclaimable_bytes INTEGER,
        PRIMARY KEY (disk_id, ts)
    ) WITHOUT ROWID
    """,
)

# Indexes for the status report's per-domain reads, created (IF NOT EXISTS) at every
# read-write open rather than by a schema version: an index changes no row, so a file
# with them still opens in a virt-trimd that knows only v2, and one without them is
# only slower. Without them each status read scanned every trim: at 1,000 domains and
# a year (365,000 rows) a `status` took seconds (docs/BENCHMARKS.md, scale).
_INDEXES = (
    # Covering: the reclaim sums of the last 30 days read no table row.
    "CREATE INDEX IF NOT EXISTS trims_started"
    " ON trims (started_ts, dry_run, domain, reclaimed_bytes)",
    # Partial, so the latest success of each domain is one probe (queries must spell
    # the same literal terms for SQLite to use it).
    "CREATE INDEX IF NOT EXISTS trims_success_finished ON trims"
    " (domain, started_ts + duration_seconds) WHERE result = 'success' AND dry_run = 0",
)

# (age in seconds, bucket in seconds): census rows older than `age` keep only the
# latest sample of each `bucket`. Every census of the last day, hourly to 30 days (the
# 7-day growth and the page's charts need no finer), daily beyond.
CENSUS_TIERS: tuple[tuple[int, int], ...] = ((86_400, 3_600), (30 * 86_400, 86_400))


@dataclass(frozen=True)
class CensusDomain:
    """One domain as one census saw it: its run state and its measured disks."""

    domain: str
    uuid: str
    running: bool
    agent_state: str | None
    disks: tuple[DiskState, ...]


@dataclass(frozen=True)
class CensusPoint:
    """One kept census sample of one disk."""

    ts: float
    allocated_bytes: int | None
    virtual_bytes: int | None
    reclaimable_bytes: int | None


@dataclass(frozen=True)
class CensusDisk:
    """A disk's description at its latest census (the series is read separately)."""

    domain: str
    disk: str
    path: str | None
    format: str | None
    bus: str
    discard: str | None
    discard_ready: bool | None
    last_seen_ts: float


@dataclass(frozen=True)
class CensusDomainRow:
    """A domain's state at its latest census."""

    domain: str
    uuid: str
    running: bool
    agent_state: str | None
    last_seen_ts: float


@dataclass(frozen=True)
class TrimSummary:
    """The columns of one stored trim that the status report shows (no JSON decoded)."""

    domain: str
    uuid: str
    result: Result
    started_at: str
    reclaimed_bytes: int
    message: str


class HistoryError(Exception):
    """The history database cannot be opened, read or written."""


class History:
    """Append-only trim/sweep history, safe to share between the daemon's worker threads.

    `History(state_dir)` creates the directory (0750) and the database if missing.
    `History(state_dir, readonly=True)` opens an existing database for reading only
    (the `history` CLI); it never creates anything. Raises HistoryError when the
    database cannot be opened or carries a newer schema than this code knows.
    """

    def __init__(self, state_dir: Path, *, readonly: bool = False) -> None:
        self.path = Path(state_dir) / DB_FILENAME
        self.readonly = readonly
        # What the file holds: a reader may open a v1 file the daemon has not migrated yet.
        self.schema_version = SCHEMA_VERSION
        # One connection shared by all threads; the lock serialises its use, which
        # sqlite3 requires when check_same_thread=False.
        self._lock = threading.Lock()
        self._conn: sqlite3.Connection | None = None
        try:
            if readonly:
                self._conn = self._open_readonly()
            else:
                self._conn = self._open_readwrite(Path(state_dir))
        except (sqlite3.Error, OSError) as exc:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
            mode, access = ("read", "readable by you") if readonly else ("write", "writable")
            raise HistoryError(
                f"cannot open history database {self.path} to {mode}: {exc}; "
                f"check that the state directory exists and is {access}, "
                "and that the file is an SQLite database"
            ) from exc

    def _open_readonly(self) -> sqlite3.Connection:
        if not self.path.is_file():
            raise OSError(f"{self.path} does not exist (has the daemon ever run?)")
        uri = self.path.resolve().as_uri()
        conn = _connect_uri(f"{uri}?mode=ro")
        try:
            version = _user_version(conn)
        except sqlite3.OperationalError:
            conn.close()
            wal = self.path.with_name(self.path.name + "-wal")
            if wal.exists():
                raise
            # A WAL database needs its -shm file even to read; when the daemon is stopped
            # SQLite has deleted it, and a reader who may not write the directory cannot
            # create it. With no -wal file every commit is in the main file, so reading it
            # as immutable sees all of it (sqlite.org/wal.html, "Read-Only Databases").
            log.debug("%s: cannot create -shm, reading as immutable", self.path)
            conn = _connect_uri(f"{uri}?mode=ro&immutable=1")
            version = _user_version(conn)
        self._check_version(conn, version, readonly=True)
        self.schema_version = version
        return conn

    def _open_readwrite(self, state_dir: Path) -> sqlite3.Connection:
        if not state_dir.is_dir():
            state_dir.mkdir(parents=True, exist_ok=True)
            # mkdir's mode is filtered by the umask; set it explicitly. Only for a directory
            # we created: an existing one (systemd StateDirectory=) keeps its owner's choice.
            os.chmod(state_dir, 0o750)
            log.info("created state directory %s", state_dir)
        if not self.path.exists():
            # Pre-create 0640: history names guests. SQLite copies the database file's
            # mode to the -wal and -shm files it creates next to it.
            os.close(os.open(self.path, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o640))
        # isolation_level=None: autocommit, so each INSERT is exactly one transaction.
        conn = sqlite3.connect(
            self.path, timeout=5.0, check_same_thread=False, isolation_level=None
        )
        mode = conn.execute("PRAGMA journal_mode=WAL").fetchone()[0]
        if str(mode).lower() != "wal":
            log.warning("%s: journal_mode is %s, not wal; continuing", self.path, mode)
        # FULL fsyncs the WAL at each commit: a power cut right after a sweep must not
        # forget it (catch-up and min_interval read it back). Trims are rare, fsync is cheap.
        conn.execute("PRAGMA synchronous=FULL")
        self._migrate(conn)
        for statement in _INDEXES:
            conn.execute(statement)
        return conn

    def _migrate(self, conn: sqlite3.Connection) -> None:
        if _user_version(conn) == SCHEMA_VERSION:
            return
        # IMMEDIATE takes the write lock first, so two processes opening a fresh
        # database at once cannot both create the tables.
        conn.execute("BEGIN IMMEDIATE")
        try:
            version = _user_version(conn)
            self._check_version(conn, version, readonly=False)
            if version == 0:
                for statement in _SCHEMA_V1:
                    conn.execute(statement)
            if version < 2:
                # Additive: v1's tables and rows stay as they are. One transaction with
                # the version bump, so a crash leaves v1 or v2, never half of v2.
                for statement in _SCHEMA_V2:
                    conn.execute(statement)
            if version != SCHEMA_VERSION:
                conn.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
                verb = "created" if version == 0 else f"migrated from v{version} to"
                log.info("%s history schema v%d in %s", verb, SCHEMA_VERSION, self.path)
            conn.execute("COMMIT")
        except BaseException:
            conn.execute("ROLLBACK")
            raise

    def _check_version(self, conn: sqlite3.Connection, version: int, *, readonly: bool) -> None:
        if version > SCHEMA_VERSION:
            raise sqlite3.DatabaseError(
                f"schema version {version} is newer than this virt-trimd understands "
                f"({SCHEMA_VERSION}); upgrade virt-trimd or move the file aside"
            )
        if readonly and version == 0:
            raise sqlite3.DatabaseError("the database has no virt-trimd schema yet")

    def __enter__(self) -> History:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.close()

    def _connection(self) -> sqlite3.Connection:
        if self._conn is None:
            raise HistoryError(f"history database {self.path} is closed")
        return self._conn

    def append(self, record: TrimRecord) -> None:
        """Store one trim record in its own transaction.

        Raises HistoryError when the row cannot be written (read-only database or
        directory, disk full, I/O error) or `record.started_at` is not ISO 8601.
        """
        try:
            started_ts = record.started_ts
            record_json = json.dumps(record.to_dict(), ensure_ascii=False, allow_nan=False)
        except ValueError as exc:
            raise HistoryError(f"cannot store trim of {record.domain!r}: {exc}") from exc
        row = (
            record.domain,
            record.uuid,
            record.schedule,
            record.result.value,
            int(record.dry_run),
            record.started_at,
            started_ts,
            record.duration_seconds,
            record.reclaimed_bytes,
            record_json,
        )
        self._write(
            "INSERT INTO trims (domain, uuid, schedule, result, dry_run, started_at,"
            " started_ts, duration_seconds, reclaimed_bytes, record_json)"
            " VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?)",
            row,
            what=f"trim of {record.domain!r}",
        )

    def append_sweep(
        self,
        schedule: str,
        started_ts: float,
        finished_ts: float,
        domains: int,
        reclaimed_bytes: int,
    ) -> None:
        """Store one completed sweep. Raises HistoryError when it cannot be written."""
        self._write(
            "INSERT INTO sweeps (schedule, started_ts, finished_ts, domains, reclaimed_bytes)"
            " VALUES (?, ?, ?, ?, ?)",
            (schedule, started_ts, finished_ts, domains, reclaimed_bytes),
            what=f"sweep of schedule {schedule!r}",
        )

    def _write(self, sql: str, params: tuple[Any, ...] | dict[str, Any], *, what: str) -> int:
        """Run one writing statement (one transaction); return the rows it changed."""
        with self._lock:
            conn = self._connection()
            try:
                return conn.execute(sql, params).rowcount
            except sqlite3.Error as exc:
                if conn.in_transaction:
                    # An I/O error can leave the statement's transaction open; end it so
                    # the next append starts clean instead of piling onto a dead one.
                    try:
                        conn.execute("ROLLBACK")
                    except sqlite3.Error:
                        log.debug("rollback after failed write also failed", exc_info=True)
                raise HistoryError(
                    f"cannot record {what} in {self.path}: {exc}; "
                    "check free space and that the state directory is writable"
                ) from exc

    def _read(self, sql: str, params: tuple[Any, ...] = ()) -> list[tuple[Any, ...]]:
        with self._lock:
            conn = self._connection()
            try:
                return list(conn.execute(sql, params).fetchall())
            except sqlite3.Error as exc:
                raise HistoryError(f"cannot read history from {self.path}: {exc}") from exc

    def query(
        self,
        domain: str | None = None,
        since_ts: float | None = None,
        limit: int | None = None,
    ) -> list[TrimRecord]:
        """Trim records, oldest first, optionally of one domain and started at/after `since_ts`.

        `limit` keeps the newest `limit` matching records (still returned oldest first),
        which is what `history --limit N` wants. Raises HistoryError if a stored row
        cannot be decoded.
        """
        where: list[str] = []
        params: list[Any] = []
        if domain is not None:
            where.append("domain = ?")
            params.append(domain)
        if since_ts is not None:
            where.append("started_ts >= ?")
            params.append(since_ts)
        sql = "SELECT id, record_json FROM trims"
        if where:
            sql += " WHERE " + " AND ".join(where)
        sql += " ORDER BY started_ts DESC, id DESC"
        if limit is not None:
            sql += " LIMIT ?"
            params.append(max(limit, 0))
        rows = self._read(sql, tuple(params))
        return [_decode(row_id, text, self.path) for row_id, text in reversed(rows)]

    def last_success_by_domain(self) -> dict[str, float]:
        """Domain -> epoch when its latest successful trim finished (started_ts + duration).

        Only `success` counts: `partial` means a filesystem failed, and counting it would
        hide that failure from a "no successful trim for N days" alert. The finish time
        is the instant State.observe_trim uses, so a restart does not move the gauge.
        Dry runs never count.
        """
        if not self._has_index("trims_success_finished"):
            # A file no read-write open of this version has indexed yet (a reader
            # before the upgraded daemon started): without the index, the per-domain
            # form below would scan every success once per domain.
            rows = self._read(
                "SELECT domain, MAX(started_ts + duration_seconds) FROM trims"
                " WHERE result = ? AND dry_run = 0 GROUP BY domain",
                (Result.SUCCESS.value,),
            )
            return {str(d): float(ts) for d, ts in rows}
        # One probe of trims_success_finished per domain (the literal terms match its
        # WHERE); the domains come from trims_domain_started without reading rows.
        assert Result.SUCCESS.value == "success"
        rows = self._read(
            "SELECT domain, finished FROM (SELECT d.domain, (SELECT MAX(started_ts"
            " + duration_seconds) FROM trims WHERE domain = d.domain AND result = 'success'"
            " AND dry_run = 0) AS finished FROM (SELECT DISTINCT domain FROM trims) AS d)"
            " WHERE finished IS NOT NULL"
        )
        return {str(d): float(ts) for d, ts in rows}

    def _has_index(self, name: str) -> bool:
        rows = self._read("SELECT 1 FROM sqlite_master WHERE type = 'index' AND name = ?", (name,))
        return bool(rows)

    def last_duration_by_uuid(self) -> dict[str, float]:
        """Domain UUID -> duration of its latest trim attempt, to start long ones first.

        Only attempted results count (`Result.attempted`): a guest whose agent never
        answers holds a worker for libvirt's 5 s too.
        Dry runs never count.
        """
        rows = self._read(
            "SELECT uuid, duration_seconds FROM trims WHERE id IN ("
            + _latest_ids(
                "trims",
                "uuid",
                f"WHERE result NOT IN ({', '.join('?' * len(_NOT_A_TRIM))}) AND dry_run = 0",
            )
            + ")",
            _NOT_A_TRIM,
        )
        return {str(u): float(d) for u, d in rows}

    def prune(self, before_ts: float) -> int:
        """Delete trims, sweeps and census samples before `before_ts`; return the trims deleted.

        Kept whatever their age, because start-up reads them back: each domain's latest
        successful trim (the last-success gauge and its alert) and each schedule's latest
        sweep (catch-up). Each DELETE is one transaction: a crash leaves either side.
        """
        keep_success = _latest_ids("trims", "domain", "WHERE result = ? AND dry_run = 0")
        keep_sweep = _latest_ids("sweeps", "schedule")
        deleted = self._write(
            f"DELETE FROM trims WHERE started_ts < ? AND id NOT IN ({keep_success})",
            (before_ts, Result.SUCCESS.value),
            what="deletion of old trims",
        )
        self._write(
            f"DELETE FROM sweeps WHERE started_ts < ? AND id NOT IN ({keep_sweep})",
            (before_ts,),
            what="deletion of old sweeps",
        )
        self._prune_census(before_ts)
        return deleted

    def last_sweep_by_schedule(self) -> dict[str, float]:
        """Schedule -> started_ts of its latest completed sweep, for catch-up decisions."""
        rows = self._read("SELECT schedule, MAX(started_ts) FROM sweeps GROUP BY schedule")
        return {str(s): float(ts) for s, ts in rows}

    # -- census series (schema v2) ---------------------------------------------------

    def _has_census(self) -> bool:
        # A reader of a v1 file the daemon has not migrated yet sees no series.
        return self.schema_version >= 2

    def append_census(
        self, ts: float, domains: Sequence[CensusDomain], *, complete: bool = True
    ) -> None:
        """Store one census (every domain's state and each disk's sample) in one transaction.

        `complete` means `domains` is every domain libvirt knows: the others are gone
        and leave the domain list (their samples stay until pruned). A partial census
        (`run --once`, swept domains only) removes nothing. Raises HistoryError.
        """
        sample_ts = int(ts)
        with self._lock:
            conn = self._connection()
            try:
                conn.execute("BEGIN IMMEDIATE")
                try:
                    self._insert_census(conn, ts, sample_ts, domains, complete)
                    conn.execute("COMMIT")
                except BaseException:
                    conn.execute("ROLLBACK")
                    raise
            except sqlite3.Error as exc:
                raise HistoryError(
                    f"cannot record the census in {self.path}: {exc}; "
                    "check free space and that the state directory is writable"
                ) from exc

    @staticmethod
    def _insert_census(
        conn: sqlite3.Connection,
        ts: float,
        sample_ts: int,
        domains: Sequence[CensusDomain],
        complete: bool,
    ) -> None:
        conn.executemany(
            "INSERT INTO census_domains (domain, uuid, running, agent_state, last_seen_ts)"
            " VALUES (?, ?, ?, ?, ?) ON CONFLICT (domain) DO UPDATE SET uuid = excluded.uuid,"
            " running = excluded.running, agent_state = excluded.agent_state,"
            " last_seen_ts = excluded.last_seen_ts",
            [(d.domain, d.uuid, int(d.running), d.agent_state, ts) for d in domains],
        )
        if complete:
            conn.execute("DELETE FROM census_domains WHERE last_seen_ts < ?", (ts,))
        disks = [disk for d in domains for disk in d.disks]
        conn.executemany(
            "INSERT INTO census_disks (domain, disk, path, format, bus, discard, discard_ready,"
            " last_seen_ts) VALUES (?, ?, ?, ?, ?, ?, ?, ?) ON CONFLICT (domain, disk)"
            " DO UPDATE SET path = excluded.path, format = excluded.format,"
            " bus = excluded.bus, discard = excluded.discard,"
            " discard_ready = excluded.discard_ready, last_seen_ts = excluded.last_seen_ts",
            [
                (
                    d.domain,
                    d.disk,
                    d.path,
                    d.format,
                    d.bus,
                    d.discard,
                    None if d.discard_ready is None else int(d.discard_ready),
                    ts,
                )
                for d in disks
            ],
        )
        ids = {
            (str(dom), str(disk)): int(i)
            for i, dom, disk in conn.execute(
                "SELECT id, domain, disk FROM census_disks WHERE last_seen_ts = ?", (ts,)
            )
        }
        conn.executemany(
            "INSERT OR REPLACE INTO census (disk_id, ts, allocated_bytes, virtual_bytes,"
            " reclaimable_bytes) VALUES (?, ?, ?, ?, ?)",
            [
                (
                    ids[(d.domain, d.disk)],
                    sample_ts,
                    d.allocated_bytes,
                    d.virtual_bytes,
                    d.reclaimable_bytes,
                )
                for d in disks
                if d.allocated_bytes is not None
            ],
        )

    def compact_census(self, now: float) -> int:
        """Thin old samples to CENSUS_TIERS (latest per bucket); return the rows deleted."""
        if not self._has_census():
            return 0
        deleted = 0
        for age, bucket in CENSUS_TIERS:
            cutoff = int(now) - age
            # A row goes when a later row of its disk lies in the same bucket, below the
            # cutoff: one primary-key range probe per row. (A NOT IN over a GROUP BY was
            # quadratic here: hours per simulated year at 200 disks.)
            deleted += self._write(
                "DELETE FROM census AS old WHERE old.ts < :cutoff AND EXISTS ("
                " SELECT 1 FROM census AS new WHERE new.disk_id = old.disk_id"
                " AND new.ts > old.ts"
                " AND new.ts < MIN(:cutoff, (old.ts / :bucket + 1) * :bucket))",
                {"cutoff": cutoff, "bucket": bucket},
                what="compaction of the census series",
            )
        return deleted

    def _prune_census(self, before_ts: float) -> None:
        if not self._has_census():
            return
        self._write(
            "DELETE FROM census WHERE ts < ?", (int(before_ts),), what="deletion of old census"
        )
        # A disk description with no samples left and no domain any more describes nothing.
        self._write(
            "DELETE FROM census_disks WHERE domain NOT IN (SELECT domain FROM census_domains)"
            " AND id NOT IN (SELECT DISTINCT disk_id FROM census)",
            (),
            what="deletion of vanished disks",
        )

    def latest_census_ts(self) -> float | None:
        """When the latest census was recorded, None if never (or a v1 file)."""
        if not self._has_census():
            return None
        rows = self._read("SELECT MAX(last_seen_ts) FROM census_domains")
        return None if not rows or rows[0][0] is None else float(rows[0][0])

    def census_domains(self) -> list[CensusDomainRow]:
        """Every domain of the latest census, by name."""
        if not self._has_census():
            return []
        rows = self._read(
            "SELECT domain, uuid, running, agent_state, last_seen_ts FROM census_domains"
            " ORDER BY domain"
        )
        return [
            CensusDomainRow(str(d), str(u), bool(r), None if a is None else str(a), float(t))
            for d, u, r, a, t in rows
        ]

    def census_disks(self) -> list[CensusDisk]:
        """Disks the latest census of their domain saw (detached ones drop out), by name."""
        if not self._has_census():
            return []
        rows = self._read(
            "SELECT k.domain, k.disk, k.path, k.format, k.bus, k.discard, k.discard_ready,"
            " k.last_seen_ts FROM census_disks k JOIN census_domains d"
            " ON d.domain = k.domain AND d.last_seen_ts = k.last_seen_ts"
            " ORDER BY k.domain, k.disk"
        )
        return [
            CensusDisk(
                domain=str(dom),
                disk=str(disk),
                path=path,
                format=fmt,
                bus=str(bus),
                discard=discard,
                discard_ready=None if ready is None else bool(ready),
                last_seen_ts=float(seen),
            )
            for dom, disk, path, fmt, bus, discard, ready, seen in rows
        ]

    def census_series(
        self, since_ts: float, disks: Sequence[tuple[str, str]] | None = None
    ) -> dict[tuple[str, str], list[CensusPoint]]:
        """(domain, disk) -> its kept samples at or after `since_ts`, oldest first.

        `disks` limits it to those (domain, disk) pairs (the page charts a few of many).
        """
        if not self._has_census():
            return {}
        where, params = "c.ts >= ?", list[object]([int(since_ts)])
        if disks is not None:
            if not disks:
                return {}
            where += " AND (k.domain, k.disk) IN (VALUES " + ", ".join(["(?, ?)"] * len(disks))
            where += ")"
            params += [part for pair in disks for part in pair]
        rows = self._read(
            "SELECT k.domain, k.disk, c.ts, c.allocated_bytes, c.virtual_bytes,"
            " c.reclaimable_bytes FROM census c JOIN census_disks k ON k.id = c.disk_id"
            f" WHERE {where} ORDER BY k.domain, k.disk, c.ts",
            tuple(params),
        )
        out: dict[tuple[str, str], list[CensusPoint]] = {}
        for dom, disk, ts, alloc, virt, recl in rows:
            out.setdefault((str(dom), str(disk)), []).append(
                CensusPoint(float(ts), alloc, virt, recl)
            )
        return out

    def census_at(self, ts: float) -> dict[tuple[str, str], CensusPoint]:
        """(domain, disk) -> its latest sample at or before `ts` (for growth over a window)."""
        if not self._has_census():
            return {}
        # One primary-key probe per disk, not a scan of every sample (a year at 1,000
        # disks is over a million rows). CROSS JOIN fixes the join order: with a plain
        # JOIN SQLite's planner scanned every census row and ran the subquery for each
        # (180 ms at 400 disks with a year of samples, 1.4 ms this way; BENCHMARKS.md).
        rows = self._read(
            "SELECT k.domain, k.disk, c.ts, c.allocated_bytes, c.virtual_bytes,"
            " c.reclaimable_bytes FROM census_disks k CROSS JOIN census c ON c.disk_id = k.id"
            " AND c.ts = (SELECT MAX(ts) FROM census WHERE disk_id = k.id AND ts <= ?)",
            (int(ts),),
        )
        return {
            (str(dom), str(disk)): CensusPoint(float(t), alloc, virt, recl)
            for dom, disk, t, alloc, virt, recl in rows
        }

    def census_first_after(self, ts: float) -> dict[tuple[str, str], CensusPoint]:
        """(domain, disk) -> its earliest sample at or after `ts` (a disk younger than a window)."""
        if not self._has_census():
            return {}
        rows = self._read(
            "SELECT k.domain, k.disk, c.ts, c.allocated_bytes, c.virtual_bytes,"
            " c.reclaimable_bytes FROM census_disks k CROSS JOIN census c ON c.disk_id = k.id"
            " AND c.ts = (SELECT MIN(ts) FROM census WHERE disk_id = k.id AND ts >= ?)",
            (int(ts),),
        )
        return {
            (str(dom), str(disk)): CensusPoint(float(t), alloc, virt, recl)
            for dom, disk, t, alloc, virt, recl in rows
        }

    def reclaim_rows(self, since_ts: float) -> list[tuple[str, float, int]]:
        """(domain, started_ts, reclaimed_bytes) of every real trim started at/after `since_ts`."""
        rows = self._read(
            "SELECT domain, started_ts, reclaimed_bytes FROM trims"
            " WHERE dry_run = 0 AND started_ts >= ? ORDER BY started_ts, id",
            (since_ts,),
        )
        return [(str(d), float(t), int(r)) for d, t, r in rows]

    def latest_successes_by_uuid(self, per_uuid: int) -> dict[str, list[TrimRecord]]:
        """Domain UUID -> its newest `per_uuid` success or partial trims, newest first.

        Dry runs excluded. What growth triggers restore their baseline from.
        """
        # One walk down trims_domain_started per domain, newest first: a window over
        # every success took 2.7 s at 1,000 domains with a year of daily trims.
        rows = self._read(
            "SELECT t.id, t.uuid, t.record_json FROM (SELECT DISTINCT domain FROM trims) AS d"
            " CROSS JOIN trims AS t ON t.id IN (SELECT id FROM trims WHERE domain = d.domain"
            " AND result IN (?, ?) AND dry_run = 0 ORDER BY started_ts DESC, id DESC LIMIT ?)"
            " ORDER BY t.uuid, t.started_ts DESC, t.id DESC",
            (Result.SUCCESS.value, Result.PARTIAL.value, max(per_uuid, 0)),
        )
        out: dict[str, list[TrimRecord]] = {}
        for row_id, uuid, text in rows:
            out.setdefault(str(uuid), []).append(_decode(row_id, text, self.path))
        return out

    def reclaimed_by_domain(self, now: float, days: Sequence[int]) -> dict[str, dict[int, int]]:
        """Domain -> {d: bytes its real trims started in the last d days reclaimed}, per d.

        Only domains with a real trim inside the longest window. Summed by SQLite over
        trims_started instead of a row per trim into Python (31,000 rows at 1,000 domains).
        """
        if not days:
            return {}
        windows = ", ".join(
            "SUM(CASE WHEN started_ts >= ? THEN reclaimed_bytes ELSE 0 END)" for _ in days
        )
        rows = self._read(
            # `+domain`: grouping by the bare column made SQLite walk all of
            # trims_domain_started (every trim ever kept) instead of the range.
            f"SELECT domain, {windows} FROM trims WHERE dry_run = 0 AND started_ts >= ?"
            " GROUP BY +domain",
            (*(now - d * 86_400 for d in days), now - max(days) * 86_400),
        )
        return {
            str(row[0]): {d: int(v) for d, v in zip(days, row[1:], strict=True)} for row in rows
        }

    def latest_trim_summary_by_domain(self) -> dict[str, TrimSummary]:
        """Like latest_trim_by_domain, the few fields `status` shows, without decoding JSON."""
        rows = self._read(
            "SELECT t.domain, t.uuid, t.result, t.started_at, t.reclaimed_bytes,"
            " COALESCE(json_extract(t.record_json, '$.message'), '')"
            " FROM (SELECT DISTINCT domain FROM trims) AS d"
            " CROSS JOIN trims AS t ON t.id = (SELECT id FROM trims WHERE domain = d.domain"
            " AND dry_run = 0 ORDER BY started_ts DESC, id DESC LIMIT 1)"
        )
        return {
            str(dom): TrimSummary(str(dom), str(u), Result(r), str(at), int(b), str(msg))
            for dom, u, r, at, b, msg in rows
        }

    def latest_trim_by_domain(self) -> dict[str, TrimRecord]:
        """Domain -> its latest trim record of any result (dry runs excluded)."""
        # Per domain, one walk down trims_domain_started from its newest row (the index
        # holds started_ts and id in order), not a window over every trim ever kept.
        rows = self._read(
            "SELECT t.id, t.record_json FROM (SELECT DISTINCT domain FROM trims) AS d"
            " CROSS JOIN trims AS t ON t.id = (SELECT id FROM trims WHERE domain = d.domain"
            " AND dry_run = 0 ORDER BY started_ts DESC, id DESC LIMIT 1)"
        )
        records = [_decode(row_id, text, self.path) for row_id, text in rows]
        return {r.domain: r for r in records}

    def integrity_ok(self) -> bool:
        """True when PRAGMA integrity_check reports "ok"; logs what it found otherwise."""
        try:
            rows = self._read("PRAGMA integrity_check")
        except HistoryError as exc:
            log.error("history integrity check could not run: %s", exc)
            return False
        findings = [str(r[0]) for r in rows]
        if findings == ["ok"]:
            return True
        log.error("history integrity check of %s failed: %s", self.path, "; ".join(findings))
        return False

    def close(self) -> None:
        """Close the connection; further calls raise HistoryError. Idempotent."""
        with self._lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None


def _connect_uri(uri: str) -> sqlite3.Connection:
    return sqlite3.connect(
        uri, uri=True, timeout=5.0, check_same_thread=False, isolation_level=None
    )


def _user_version(conn: sqlite3.Connection) -> int:
    return int(conn.execute("PRAGMA user_version").fetchone()[0])


def _decode(row_id: int, text: str, path: Path) -> TrimRecord:
    try:
        return TrimRecord.from_dict(json.loads(text))
    except (ValueError, KeyError, TypeError) as exc:
        raise HistoryError(f"{path}: trims row {row_id} cannot be decoded: {exc}") from exc
