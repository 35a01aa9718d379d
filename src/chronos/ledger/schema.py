"""The ledger's file: its tables, their migration, the connection, and the one transaction helper.

Every change runs in a ``BEGIN IMMEDIATE`` transaction (:func:`transaction`), which takes
SQLite's single write lock before reading, so two creators can never both read the old
total and both commit: admission is one atomic check across all processes. WAL mode lets
readers proceed while a writer commits, and ``synchronous=FULL`` makes an acknowledged
change survive power loss, not only a process crash.

The other parts of :mod:`chronos.ledger` never open a transaction themselves: the
:class:`~chronos.ledger.Ledger` facade opens one per public write, so a change that
touches several tables (a reap, an admission, a grant) commits or rolls back whole.
"""

from __future__ import annotations

import os
import sqlite3
import time
from collections.abc import Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from chronos.errors import ChronosError
from chronos.paths import LEDGER_SUFFIXES, open_file

SCHEMA_VERSION = 6
"""3 → 4: ``partitions.series`` (booking series), groups (``partitions.more_shares``,
the ``group_shares`` table) and the ``jobs`` table (batch jobs, ``chronos submit``;
ledger/jobs.py), one step. 4 → 5: indexes only (:data:`OPEN_INDEXES` replace
``partitions_open``), no table or column changed. 5 → 6: ``group_shares`` keeps its
group's span (``starts_at``, ``expires_at``, filled in from the partitions by the
migration), indexed by GPU and start as ``partitions_open_start`` is."""
_SCHEMA = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS partitions (
    id TEXT PRIMARY KEY,
    device INTEGER NOT NULL,
    device_uuid TEXT NOT NULL,
    device_total_bytes INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    starts_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    ended_at REAL,
    end_reason TEXT,
    owner_pid INTEGER,
    owner_start INTEGER,
    kind TEXT NOT NULL,
    grace_s REAL,
    warn_s REAL,
    warn_signal TEXT,
    series TEXT,
    more_shares TEXT NOT NULL DEFAULT '[]'
);
CREATE INDEX IF NOT EXISTS partitions_series ON partitions (series) WHERE series IS NOT NULL;
CREATE INDEX IF NOT EXISTS partitions_open_start
    ON partitions (device_uuid, starts_at) WHERE state IN ('active', 'booked');
CREATE INDEX IF NOT EXISTS partitions_open_end
    ON partitions (expires_at) WHERE state IN ('active', 'booked');
CREATE INDEX IF NOT EXISTS partitions_watched ON partitions (id)
    WHERE state IN ('active', 'booked') AND (owner_pid IS NOT NULL OR warn_s IS NOT NULL);
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    partition_id TEXT,
    uid INTEGER,
    user TEXT,
    device_uuid TEXT,
    memory_bytes INTEGER,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS partitions_booked
    ON partitions (starts_at) WHERE state = 'booked';
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS waiting (
    id TEXT PRIMARY KEY,
    enqueued_at REAL NOT NULL,
    state TEXT NOT NULL,
    partition_id TEXT,
    reason TEXT,
    waiter_pid INTEGER,
    waiter_start INTEGER,
    timeout_at REAL,
    request TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attached (
    partition_id TEXT NOT NULL REFERENCES partitions(id),
    pid INTEGER NOT NULL,
    start_ticks INTEGER,
    uid INTEGER NOT NULL,
    attached_at REAL NOT NULL,
    attached_by INTEGER NOT NULL,
    PRIMARY KEY (partition_id, pid)
);
CREATE TABLE IF NOT EXISTS jobs (
    id TEXT PRIMARY KEY,
    created_at REAL NOT NULL,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    gid INTEGER NOT NULL,
    groups TEXT NOT NULL,
    name TEXT,
    argv TEXT NOT NULL,
    env TEXT NOT NULL,
    cwd TEXT NOT NULL,
    umask INTEGER NOT NULL,
    output TEXT NOT NULL,
    error TEXT,
    after TEXT,
    ticket_id TEXT,
    partition_id TEXT,
    state TEXT NOT NULL,
    request TEXT NOT NULL,
    pid INTEGER,
    start_ticks INTEGER,
    exit_code INTEGER,
    reason TEXT,
    started_at REAL,
    ended_at REAL
);
CREATE INDEX IF NOT EXISTS jobs_open ON jobs (state)
    WHERE state IN ('waiting', 'starting', 'running');
CREATE TABLE IF NOT EXISTS group_shares (
    device_uuid TEXT NOT NULL,
    partition_id TEXT NOT NULL REFERENCES partitions(id),
    memory_bytes INTEGER NOT NULL,
    starts_at REAL,
    expires_at REAL,
    PRIMARY KEY (device_uuid, partition_id)
) WITHOUT ROWID;
UPDATE group_shares SET
    starts_at = (SELECT p.starts_at FROM partitions p WHERE p.id = partition_id),
    expires_at = (SELECT p.expires_at FROM partitions p WHERE p.id = partition_id)
    WHERE starts_at IS NULL OR expires_at IS NULL;
CREATE INDEX IF NOT EXISTS group_shares_start ON group_shares (device_uuid, starts_at);
"""
GROUPS_STEP = 4
"""The schema version that brought groups: ``partitions.more_shares`` (a group's shares past
the primary, as JSON, for reading records whole) and ``group_shares`` (one row per share past
the primary of each *open* group, for the per-GPU room checks; deleted when the group ends).
A ledger of an older version gains the column with every partition a one-share group."""
OPEN = "state IN ('active', 'booked')"
"""SQL: a partition still open (the partial indexes' own condition, spelled the same)."""
BY_OPEN = "INDEXED BY partitions_open_end"
"""Open partitions are few, history is long: never let SQLite pick a history index for them."""
OPEN_INDEXES = ("partitions_open_start", "partitions_open_end", "partitions_watched")
"""Schema 5's indexes over open partitions only, so that the checks every change runs cost
what they return, not the number of bookings ahead: admission's room check over a
request's span (by start on the GPU: bookings far ahead are not read), the reap's and
the daemon's next deadline (by end), and the partitions the daemon watches (an owner
process or a warning). With 10,000 bookings each of these scanned every one of them.
They replace schema 4's ``partitions_open`` (by GPU and end), which served none of those
and cost every write of an open partition an index page more."""
DROPPED_INDEXES = ("partitions_open",)
"""Indexes a migration to this schema removes."""
WATCHED = "(owner_pid IS NOT NULL OR warn_s IS NOT NULL)"
"""SQL: an open partition the daemon watches (``partitions_watched``'s condition)."""
HISTORY_VERSION = "1"
HISTORY_SCHEMA = (
    # Per user and hour: what `chronos usage` reports, kept as history is written (in the
    # same transaction), so a report reads hours, not every partition and event.
    """CREATE TABLE IF NOT EXISTS usage_hours (
        hour INTEGER NOT NULL,
        user TEXT NOT NULL,
        reserved_h REAL NOT NULL DEFAULT 0,
        used_h REAL NOT NULL DEFAULT 0,
        used_measured INTEGER NOT NULL DEFAULT 0,
        created INTEGER NOT NULL DEFAULT 0,
        released_early INTEGER NOT NULL DEFAULT 0,
        expired INTEGER NOT NULL DEFAULT 0,
        refused INTEGER NOT NULL DEFAULT 0,
        killed_for_memory INTEGER NOT NULL DEFAULT 0,
        queued INTEGER NOT NULL DEFAULT 0,
        PRIMARY KEY (hour, user)
    )""",
    # Per user: fair-share usage of ended partitions, decayed to `as_of` (one row a user).
    """CREATE TABLE IF NOT EXISTS fairshare (
        uid INTEGER PRIMARY KEY, value REAL NOT NULL, as_of REAL NOT NULL
    )""",
    # No index on created_at or starts_at: SQLite would pick it for the daemon's frequent
    # open-partition queries (ORDER BY created_at, starts_at <= now) and scan all history.
    "CREATE INDEX IF NOT EXISTS partitions_user_ended ON partitions (uid, ended_at)",
    "CREATE INDEX IF NOT EXISTS partitions_ended ON partitions (ended_at)",
    "CREATE INDEX IF NOT EXISTS events_partition ON events (partition_id)",
    "CREATE INDEX IF NOT EXISTS waiting_closed ON waiting (enqueued_at) WHERE state != 'waiting'",
)


def open_ledger(path: Path, file_mode: int, durable: bool = True) -> tuple[sqlite3.Connection, str]:
    """The connection to the ledger at ``path`` (created and migrated as needed), and its id.

    ``durable=False`` turns fsync off: only for throwaway ledgers (tests, benchmark seeds).
    """
    _prepare_files(path, file_mode)
    try:
        db = _connect(path)
        ledger_id = _identity(db)
    except sqlite3.Error as exc:
        raise _open_error(path, exc) from None
    if not durable:
        db.execute("PRAGMA synchronous = OFF")
    return db, ledger_id


def _prepare_files(path: Path, file_mode: int) -> None:
    """Create or verify ledger.db, -wal and -shm ourselves, before SQLite opens them.

    SQLite opens all three by name and would follow a symlink planted in a shared
    directory (and create its target). Here each is opened with ``O_NOFOLLOW``,
    created exclusively with ``file_mode`` set on the descriptor, and must be a
    regular file with one link; so SQLite finds real files where it looks.
    """
    for suffix in LEDGER_SUFFIXES:
        fd, _ = open_file(Path(f"{path}{suffix}"), file_mode)
        os.close(fd)


def _connect(path: Path) -> sqlite3.Connection:
    db = sqlite3.connect(path, timeout=30.0, isolation_level=None, check_same_thread=False)
    db.execute("PRAGMA busy_timeout = 30000")
    # The database file is ours to interpret, not a program: no triggers or views a
    # crafted file could make run in a reader (SQLite's defensive mode).
    db.execute("PRAGMA trusted_schema = OFF")
    mode = _journal_mode_wal(db)
    if mode != "wal":
        raise ChronosError(f"ledger {path}: cannot use WAL mode (got {mode})")
    db.execute("PRAGMA synchronous = FULL")
    db.execute("PRAGMA foreign_keys = ON")
    version = db.execute("PRAGMA user_version").fetchone()[0]
    if version < SCHEMA_VERSION:
        _migrate(db)
    elif version > SCHEMA_VERSION:
        raise ChronosError(
            f"ledger {path} has schema {version}; this Chronos knows {SCHEMA_VERSION}"
        )
    return db


#: Columns added to existing tables since schema 3 (``CREATE TABLE IF NOT EXISTS`` adds none):
#: schema 4 gave partitions ``series``, the id of a repeated booking's series, and
#: ``more_shares``, a group's shares past the primary (JSON; ``[]``: one GPU); schema 6
#: gave ``group_shares`` its group's span (the schema's UPDATE fills it in).
_ADDED_COLUMNS = (
    ("partitions", "series", "TEXT"),
    ("partitions", "more_shares", "TEXT NOT NULL DEFAULT '[]'"),
    ("group_shares", "starts_at", "REAL"),
    ("group_shares", "expires_at", "REAL"),
)


def _migrate(db: sqlite3.Connection) -> None:
    """Bring a new or older ledger to :data:`SCHEMA_VERSION`, in one transaction.

    The version is read again under the write lock: of two processes opening the same
    old file at once, the second finds it migrated and does nothing.
    """
    db.execute("BEGIN IMMEDIATE")
    try:
        if db.execute("PRAGMA user_version").fetchone()[0] < SCHEMA_VERSION:
            for table, column, kind in _ADDED_COLUMNS:
                have = {row[1] for row in db.execute(f"PRAGMA table_info({table})")}
                if have and column not in have:
                    db.execute(f"ALTER TABLE {table} ADD COLUMN {column} {kind}")
            for statement in filter(str.strip, _SCHEMA.split(";")):
                db.execute(statement)
            for index in DROPPED_INDEXES:
                db.execute(f"DROP INDEX IF EXISTS {index}")
            db.execute(f"PRAGMA user_version = {SCHEMA_VERSION}")
        db.execute("COMMIT")
    except BaseException:
        if db.in_transaction:
            db.execute("ROLLBACK")
        raise


def _identity(db: sqlite3.Connection) -> str:
    """This ledger's id (made on first open): the daemon's check that it is the one it had."""
    row = db.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
    if row is not None:
        return str(row[0])
    with transaction(db):
        db.execute(
            "INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', ?)",
            (os.urandom(16).hex(),),  # (uuid4's randomness; uuid costs ms to import)
        )
    return str(db.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()[0])


def meta(db: sqlite3.Connection, key: str) -> str | None:
    row = db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
    return None if row is None else str(row[0])


def meta_float(db: sqlite3.Connection, key: str) -> float:
    value = meta(db, key)
    return 0.0 if value is None else float(value)


def insert_sql(table: str, columns: tuple[str, ...]) -> str:
    """``INSERT INTO table (columns) VALUES (?, …)``: placeholders counted from the columns."""
    return f"INSERT INTO {table} ({', '.join(columns)}) VALUES ({', '.join('?' * len(columns))})"


def _journal_mode_wal(db: sqlite3.Connection, patience_s: float = 30.0) -> str:
    """Switch to WAL, retrying: while another process creates the same new database, SQLite
    answers this pragma "database is locked" at once instead of waiting on the busy timeout."""
    deadline = time.monotonic() + patience_s
    while True:
        try:
            return str(db.execute("PRAGMA journal_mode = WAL").fetchone()[0])
        except sqlite3.OperationalError as exc:
            if "locked" not in str(exc) or time.monotonic() > deadline:
                raise
            time.sleep(0.01)


@contextmanager
def transaction(db: sqlite3.Connection) -> Iterator[None]:
    """One write transaction; a write the disk refuses becomes a clear ChronosError.

    Without the mapping, the daemon would drop the connection on SQLite's exception and
    the client could only say "may or may not have taken effect"; a failed write has
    certainly not (it is rolled back).
    """
    try:
        db.execute("BEGIN IMMEDIATE")
        try:
            yield
            db.execute("COMMIT")
        except BaseException:
            if db.in_transaction:  # SQLite may have rolled back itself (a full disk)
                with suppress(sqlite3.Error):
                    db.execute("ROLLBACK")
            raise
    except sqlite3.Error as exc:
        unwritable = _unwritable(db, exc)
        if unwritable is None:
            raise
        raise unwritable from exc


#: SQLite's primary result codes for a write the file system refused, and what they mean.
_WRITE_FAILURES = {
    8: "it is read-only",  # SQLITE_READONLY
    10: "the disk reported an I/O error",  # SQLITE_IOERR
    13: "no space left on device",  # SQLITE_FULL
}
_CORRUPT = (11, 26)  # SQLITE_CORRUPT, SQLITE_NOTADB


def _unwritable(db: sqlite3.Connection, exc: sqlite3.Error) -> ChronosError | None:
    why = _WRITE_FAILURES.get(_primary_code(exc))
    if why is None:
        return None
    where = ""
    with suppress(sqlite3.Error):
        where = " " + str(db.execute("PRAGMA database_list").fetchone()[2])
    return ChronosError(f"the ledger{where} cannot be written: {why}")


def _open_error(path: Path, exc: sqlite3.Error) -> ChronosError:
    code = _primary_code(exc)
    if code in _CORRUPT:
        return ChronosError(
            f"ledger {path} is corrupt or not a Chronos ledger ({exc}): restore it from "
            "backup, or move it away to start an empty ledger"
        )
    why = _WRITE_FAILURES.get(code)
    if why is not None:
        return ChronosError(f"the ledger {path} cannot be written: {why}")
    return ChronosError(f"cannot open the ledger {path}: {exc}")


def _primary_code(exc: sqlite3.Error) -> int:
    code = getattr(exc, "sqlite_errorcode", None)
    return code & 0xFF if isinstance(code, int) else -1
