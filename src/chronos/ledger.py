"""The partition ledger: one SQLite database, shared by every process.

Every change runs in a ``BEGIN IMMEDIATE`` transaction, which takes SQLite's
single write lock before reading, so two creators can never both read the old
total and both commit: admission is one atomic check across all processes.
WAL mode lets readers proceed while a writer commits, and ``synchronous=FULL``
makes an acknowledged change survive power loss, not only a process crash.

The ledger knows nothing about callers or sockets; :mod:`chronos.service`
decides who may do what, and either the embedded client or the daemon drives
it. Time comes from an injectable clock so tests never sleep.
"""

from __future__ import annotations

import json
import math
import os
import sqlite3
import time
import uuid
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager, suppress
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

from chronos import procs
from chronos.errors import (
    AdmissionRefused,
    CapacityRefused,
    ChronosError,
    NotFound,
    PartitionEnded,
)
from chronos.models import ACTIVE, BOOKED, EXPIRED, RELEASED, Event, PartitionRecord
from chronos.paths import LEDGER_SUFFIXES, open_file
from chronos.policy import Waiter, earliest_fit, gpu_hours, held_until, peak_usage, plan_queue
from chronos.units import format_bytes, format_duration, local_clock

SCHEMA_VERSION = 3
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
    warn_signal TEXT
);
CREATE INDEX IF NOT EXISTS partitions_open
    ON partitions (device_uuid, expires_at) WHERE state IN ('active', 'booked');
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
"""
_COLUMNS = (
    "id, device, device_uuid, device_total_bytes, memory_bytes, uid, user, created_at, "
    "starts_at, expires_at, state, ended_at, end_reason, owner_pid, owner_start, kind, "
    "grace_s, warn_s, warn_signal"
)
_OPEN = "state IN ('active', 'booked')"
_BY_OPEN = "INDEXED BY partitions_open"
"""Open partitions are few, history is long: never let SQLite pick a history index for them."""
_HISTORY_VERSION = "1"
_HISTORY_SCHEMA = (
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
_USAGE_COUNTS = (
    "reserved_h",
    "used_h",
    "used_measured",
    "created",
    "released_early",
    "expired",
    "refused",
    "killed_for_memory",
    "queued",
)
_EVENT_COUNTS = {
    "refused": "refused",
    "queue_refused": "refused",
    "queued": "queued",
    "memory_exceeded": "killed_for_memory",
}
HOUR = 3600.0
PLAN_REUSE_S = 0.5
"""A plan is reused while nothing was written and it is younger than this (time alone
changes only priorities, by the same ageing for everyone)."""
MIN_RETENTION_S = 2 * 86400.0
"""History younger than this is never compacted (a restart re-sends the last day's kills)."""


@dataclass(frozen=True)
class NewPartition:
    """A validated request, ready for admission."""

    device: int
    device_uuid: str
    device_total_bytes: int
    capacity_bytes: int
    """What admission may hand out on this device (total × reservable share)."""
    memory_bytes: int
    uid: int
    user: str
    duration_s: float
    starts_at: float | None = None
    owner_pid: int | None = None
    owner_start: int | None = None
    kind: str = "api"
    grace_s: float | None = None
    warn_s: float | None = None
    warn_signal: str | None = None
    exempt: bool = False
    """Made by an administrator: quotas do not apply (capacity still does)."""


@dataclass(frozen=True)
class Ended:
    """A partition the ledger just ended, for whoever must act on it."""

    record: PartitionRecord
    reason: str


@dataclass(frozen=True)
class Attached:
    partition_id: str
    pid: int
    start_ticks: int | None
    uid: int


OwnerCheck = Callable[[int, "int | None"], bool]
QuotaCheck = Callable[[list[PartitionRecord], float, float, float], None]
"""``check(user's recent partitions, start, end, now)``; raises AdmissionRefused."""
PriorityOf = Callable[[str, float, float], float]
"""``priority(user, waited seconds, user's decayed fair-share usage in GPU-hours)``; lower
goes first."""


@dataclass(frozen=True)
class Ticket:
    """A queued request and what became of it."""

    id: str
    state: str
    """``waiting``, ``granted``, ``cancelled``, ``timeout`` or ``refused``."""
    enqueued_at: float
    request: NewPartition
    partition_id: str | None = None
    reason: str | None = None
    timeout_at: float | None = None
    waiter_pid: int | None = None


class Ledger:
    """All partitions and their history, in one database file."""

    def __init__(
        self,
        path: Path | str,
        clock: Callable[[], float] = time.time,
        owner_alive: OwnerCheck = procs.is_same_process,
        file_mode: int = 0o666,
        *,
        reap_owners: bool = True,
    ) -> None:
        self.path = Path(path)
        self.clock = clock
        self._owner_alive = owner_alive
        self.capacity_of: Callable[[NewPartition], int] = lambda req: req.capacity_bytes
        """Bytes a (queued) request may use on its device; the service applies the policy
        in force now, so a reload also reaches requests still waiting."""
        self.lingering: Callable[[str], list[tuple[float, float, int, str]]] = lambda uuid: []
        """Memory of ended partitions whose processes still run (the daemon keeps it):
        admission counts it as committed, so it never hands out memory still held."""
        self.reap_owners = reap_owners
        """Check owner processes on every reap (the daemon does not: it has pidfds)."""
        self.fairshare_half_life: Callable[[], float] = lambda: 7 * 86400.0
        """Half-life of fair-share usage; the service applies the policy in force."""
        self._waiting: dict[str, Ticket] = {}
        """Waiting tickets as read (see :meth:`waiting`)."""
        self._waiters: dict[str, Waiter] = {}
        """What the planner sees of each waiting ticket (forgotten with the plan)."""
        self._generation = 0
        """Bumped on every event this connection writes: a cached plan is stale after it."""
        self._plan_cache: tuple[Any, ...] | None = None
        self._db = self._open(file_mode)
        self._ensure_history()

    def _open(self, file_mode: int) -> sqlite3.Connection:
        self._prepare_files(file_mode)
        try:
            db = self._connect()
        except sqlite3.Error as exc:
            raise _open_error(self.path, exc) from None
        return db

    def _prepare_files(self, file_mode: int) -> None:
        """Create or verify ledger.db, -wal and -shm ourselves, before SQLite opens them.

        SQLite opens all three by name and would follow a symlink planted in a shared
        directory (and create its target). Here each is opened with ``O_NOFOLLOW``,
        created exclusively with ``file_mode`` set on the descriptor, and must be a
        regular file with one link; so SQLite finds real files where it looks.
        """
        for suffix in LEDGER_SUFFIXES:
            fd, _ = open_file(Path(f"{self.path}{suffix}"), file_mode)
            os.close(fd)

    def _connect(self) -> sqlite3.Connection:
        db = sqlite3.connect(self.path, timeout=30.0, isolation_level=None, check_same_thread=False)
        db.execute("PRAGMA busy_timeout = 30000")
        # The database file is ours to interpret, not a program: no triggers or views a
        # crafted file could make run in a reader (SQLite's defensive mode).
        db.execute("PRAGMA trusted_schema = OFF")
        mode = _journal_mode_wal(db)
        if mode != "wal":
            raise ChronosError(f"ledger {self.path}: cannot use WAL mode (got {mode})")
        db.execute("PRAGMA synchronous = FULL")
        db.execute("PRAGMA foreign_keys = ON")
        version = db.execute("PRAGMA user_version").fetchone()[0]
        if version < SCHEMA_VERSION:
            # executescript commits any open transaction first, so the script brings its own.
            db.executescript(
                f"BEGIN IMMEDIATE; {_SCHEMA} PRAGMA user_version = {SCHEMA_VERSION}; COMMIT;"
            )
        elif version > SCHEMA_VERSION:
            raise ChronosError(
                f"ledger {self.path} has schema {version}; this Chronos knows {SCHEMA_VERSION}"
            )
        self.ledger_id = self._identity(db)
        return db

    def _identity(self, db: sqlite3.Connection) -> str:
        """This ledger's id (made on first open): the daemon's check that it is the one it had."""
        row = db.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()
        if row is not None:
            return str(row[0])
        with _immediate(db):
            db.execute(
                "INSERT OR IGNORE INTO meta (key, value) VALUES ('ledger_id', ?)",
                (uuid.uuid4().hex,),
            )
        return str(db.execute("SELECT value FROM meta WHERE key = 'ledger_id'").fetchone()[0])

    def close(self) -> None:
        self._db.close()

    # ------------------------------------------------------------------ writes

    def create(
        self,
        req: NewPartition,
        check: QuotaCheck | None = None,
        priority_of: PriorityOf | None = None,
        will_queue: bool = False,
    ) -> PartitionRecord:
        """Admit and record ``req``, or raise :class:`AdmissionRefused` (and log it).

        ``will_queue``: the caller queues the request if there is no room now, so a
        lack of room is not a refusal (quota refusals are still logged).

        ``check(mine, start, end, now)`` runs inside the transaction with the
        user's recent partitions, so quotas hold under races too. A request
        fits only if it also leaves room for everyone already waiting (where
        the queue, served in ``priority_of`` order, will run them).
        """
        with _immediate(self._db):
            now = self.clock()
            self._reap(now)
            self._drop_stale_tickets(now)  # a dead or timed-out waiter holds no room
            start = now if req.starts_at is None or req.starts_at <= now else req.starts_at
            end = start + req.duration_s
            refusal: AdmissionRefused | None = None
            try:
                if check is not None:
                    check(self._mine(req.uid, now, check), start, end, now)
                self._fit(req, start, end, now, priority_of)
            except AdmissionRefused as exc:
                refusal = exc
                # A request the caller will queue is not refused: enqueue() logs "queued".
                if not (will_queue and isinstance(exc, CapacityRefused)):
                    self._log_refused(now, req, exc)
            else:
                record = self._admit(req, now, start, end)
        if refusal is not None:
            raise refusal
        return record

    def _fit(
        self,
        req: NewPartition,
        start: float,
        end: float,
        now: float,
        priority_of: PriorityOf | None = None,
    ) -> None:
        # Only what overlaps [start, end) can matter: with thousands of bookings ahead,
        # reading them all took longer than the rest of admission together.
        near = self._open_on_device(req.device_uuid, now, start, end)
        reserved = self._reservations(req.device_uuid, now, priority_of)
        peak = peak_usage(near + reserved, start, end)
        if peak + req.memory_bytes > req.capacity_bytes:
            booked = self._open_on_device(req.device_uuid, now)  # all: to say when it fits
            raise self._refusal(req, booked, booked + reserved, start, peak, now)

    def _admit(self, req: NewPartition, now: float, start: float, end: float) -> PartitionRecord:
        record = PartitionRecord(
            id=self._new_id(),
            device=req.device,
            device_uuid=req.device_uuid,
            device_total_bytes=req.device_total_bytes,
            memory_bytes=req.memory_bytes,
            uid=req.uid,
            user=req.user,
            created_at=now,
            starts_at=start,
            expires_at=end,
            state=ACTIVE if start <= now else BOOKED,
            owner_pid=req.owner_pid,
            owner_start=req.owner_start,
            kind=req.kind,
            grace_s=req.grace_s,
            warn_s=req.warn_s,
            warn_signal=req.warn_signal,
        )
        self._insert(record)
        self._bump(now, req.user, created=1)
        self._event(
            now,
            "created",
            record.id,
            req.uid,
            req.user,
            req.device_uuid,
            req.memory_bytes,
            {"expires_at": end, "starts_at": start, "kind": req.kind},
        )
        return record

    def release(
        self, partition_id: str, uid: int, user: str, reason: str = "released"
    ) -> PartitionRecord:
        """End an open partition now."""
        with _immediate(self._db):
            now = self.clock()
            self._reap(now)
            record = self._get(partition_id)
            if record.state not in (ACTIVE, BOOKED):
                raise PartitionEnded(_ended_message(record))
            return self._end(record, RELEASED, now, reason, uid, user)

    def reap(self, owners: bool | None = None) -> list[Ended]:
        """End every partition that is due (expired, or its owner process died).

        ``owners=False`` skips the owner checks (the daemon learns of owner
        deaths from pidfds, and asks with ``owners=True`` then); the default is
        the ledger's ``reap_owners``.
        """
        check = self.reap_owners if owners is None else owners
        now = self.clock()
        if not self._anything_due(now, check):
            return []
        with _immediate(self._db):
            return self._reap(self.clock(), check)

    def attach(
        self, partition_id: str, pid: int, start_ticks: int | None, uid: int, by_uid: int
    ) -> None:
        with _immediate(self._db):
            now = self.clock()
            self._reap(now)
            record = self._get(partition_id)
            if record.state not in (ACTIVE, BOOKED):
                raise PartitionEnded(_ended_message(record))
            self._db.execute(
                "INSERT OR REPLACE INTO attached VALUES (?, ?, ?, ?, ?, ?)",
                (partition_id, pid, start_ticks, uid, now, by_uid),
            )
            self._event(
                now, "attached", partition_id, by_uid, None, record.device_uuid, None, {"pid": pid}
            )

    def extend_expiry(
        self,
        partition_id: str,
        new_expires_at: float,
        capacity_bytes: int,
        uid: int,
        user: str,
        priority_of: PriorityOf | None = None,
    ) -> PartitionRecord:
        """Move an open partition's end later, if the device has room for it meanwhile.

        Room means room left by other partitions, bookings and the queue's
        reservations: an extension never delays a waiting request.
        """
        with _immediate(self._db):
            now = self.clock()
            self._reap(now)
            self._drop_stale_tickets(now)
            record = self._get(partition_id)
            if record.state not in (ACTIVE, BOOKED):
                raise PartitionEnded(_ended_message(record))
            others = [
                p for p in self._open_on_device(record.device_uuid, now) if p[3] != partition_id
            ] + self._reservations(record.device_uuid, now, priority_of)
            peak = peak_usage(others, record.expires_at, new_expires_at)
            if peak + record.memory_bytes > capacity_bytes:
                free = capacity_bytes - peak
                raise AdmissionRefused(
                    f"cannot extend {partition_id}: other partitions, bookings or waiting "
                    f"requests need the device before {local_clock(new_expires_at)} "
                    f"(only {format_bytes(max(0, free))} free then; in the way: "
                    f"{_in_the_way(others, record.expires_at, new_expires_at, now)})"
                )
            self._db.execute(
                "UPDATE partitions SET expires_at = ? WHERE id = ?", (new_expires_at, partition_id)
            )
            self._event(
                now,
                "extended",
                partition_id,
                uid,
                user,
                record.device_uuid,
                record.memory_bytes,
                {"from": record.expires_at, "to": new_expires_at},
            )
            return self._get(partition_id)

    def shift_open(self, step: float) -> None:
        """Move every open partition by ``step`` seconds: the wall clock stepped (daemon).

        One transaction, so remaining times are kept for all or none; the event
        says by how much, for whoever reads the history across the step.
        """
        with _immediate(self._db):
            self._db.execute(
                f"UPDATE partitions SET starts_at = starts_at + ?, expires_at = expires_at + ? "
                f"WHERE {_OPEN}",
                (step, step),
            )
            self._event(
                self.clock() + step, "clock_stepped", None, None, None, None, None, {"step_s": step}
            )

    def log_many(self, items: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        """Append several ``(kind, partition_id, detail)`` events in one transaction."""
        if not items:
            return
        with _immediate(self._db):
            now = self.clock()
            for kind, partition_id, detail in items:
                self._event(now, kind, partition_id, None, None, None, None, detail)

    def log(
        self,
        kind: str,
        partition_id: str | None = None,
        uid: int | None = None,
        user: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an event that changes no partition (a warning, a kill, …)."""
        with _immediate(self._db):
            self._event(self.clock(), kind, partition_id, uid, user, None, None, detail or {})

    # ------------------------------------------------------------------- queue

    def enqueue(
        self,
        req: NewPartition,
        waiter_pid: int | None,
        timeout_at: float | None,
        max_waiting: int | None = None,
    ) -> Ticket:
        """Put ``req`` in the queue; :meth:`grant_waiting` admits it when it fits.

        ``max_waiting``: refuse (and log it) if the user already has that many
        requests waiting, counted inside the transaction so racing enqueues
        cannot pass it together.
        """
        refusal: AdmissionRefused | None = None
        with _immediate(self._db):
            now = self.clock()
            if max_waiting is not None:
                mine = sum(1 for t in self.waiting() if t.request.uid == req.uid)
                if mine >= max_waiting:
                    refusal = AdmissionRefused(
                        f"over the max_waiting limit: {req.user} already has {mine} waiting "
                        f"request(s), at most {max_waiting}"
                    )
                    self._log_refused(now, req, refusal)
            if refusal is None:
                ticket_id = self._insert_ticket(req, waiter_pid, timeout_at, now)
        if refusal is not None:
            raise refusal
        return self.ticket(ticket_id)

    def _insert_ticket(
        self, req: NewPartition, waiter_pid: int | None, timeout_at: float | None, now: float
    ) -> str:
        ticket_id = "q" + self._new_id()[1:]
        self._db.execute(
            "INSERT INTO waiting (id, enqueued_at, state, waiter_pid, waiter_start, "
            "timeout_at, request) VALUES (?, ?, 'waiting', ?, ?, ?, ?)",
            (
                ticket_id,
                now,
                waiter_pid,
                procs.start_ticks(waiter_pid) if waiter_pid else None,
                timeout_at,
                json.dumps(asdict(req)),
            ),
        )
        self._event(
            now,
            "queued",
            None,
            req.uid,
            req.user,
            req.device_uuid,
            req.memory_bytes,
            {"ticket": ticket_id, "duration_s": req.duration_s},
        )
        return ticket_id

    def ticket(self, ticket_id: str) -> Ticket:
        row = self._db.execute(
            "SELECT id, state, enqueued_at, request, partition_id, reason, timeout_at, "
            "waiter_pid FROM waiting WHERE id = ?",
            (ticket_id,),
        ).fetchone()
        if row is None:
            raise NotFound(f"no queued request {ticket_id!r}")
        return _ticket(row)

    def cancel(self, ticket_id: str, state: str = "cancelled", reason: str = "cancelled") -> None:
        with _immediate(self._db):
            self._close_ticket(ticket_id, state, reason, self.clock())

    def waiting(self) -> list[Ticket]:
        """Tickets still waiting, in enqueue order.

        A waiting ticket never changes until it leaves the queue, so each is read
        and parsed once: planning reads the whole queue on every change.
        """
        ids = [
            r[0]
            for r in self._db.execute(
                "SELECT id FROM waiting WHERE state = 'waiting' ORDER BY enqueued_at"
            )
        ]
        missing = [i for i in ids if i not in self._waiting]
        if len(self._waiting) > 2 * len(ids) + 1024:  # forget tickets that left the queue
            keep = set(ids)
            self._waiting = {i: t for i, t in self._waiting.items() if i in keep}
        for chunk in range(0, len(missing), 500):
            part = missing[chunk : chunk + 500]
            marks = ", ".join("?" * len(part))
            for row in self._db.execute(
                "SELECT id, state, enqueued_at, request, partition_id, reason, timeout_at, "
                f"waiter_pid FROM waiting WHERE id IN ({marks})",
                part,
            ):
                self._waiting[row[0]] = _ticket(row)
        return [self._waiting[i] for i in ids]

    def grant_waiting(
        self, priority_of: PriorityOf, check_for: Callable[[NewPartition], QuotaCheck | None]
    ) -> list[Ticket]:
        """Admit every queued request that fits now without delaying one ahead of it."""
        if not self._db.execute("SELECT 1 FROM waiting WHERE state = 'waiting' LIMIT 1").fetchone():
            return []
        granted = []
        with _immediate(self._db):
            now = self.clock()
            self._reap(now)
            self._drop_stale_tickets(now)
            replan = True
            while replan:  # a refused waiter frees the room the plan gave it: plan again
                replan = False
                for ticket in self._plan(priority_of, now)[1]:
                    req = ticket.request
                    start, end = now, now + req.duration_s
                    check = check_for(req)
                    try:
                        if check is not None:
                            check(self._mine(req.uid, now, check), start, end, now)
                    except AdmissionRefused as exc:
                        self._close_ticket(ticket.id, "refused", str(exc), now)
                        replan = True
                        continue
                    record = self._admit(req, now, start, end)
                    self._db.execute(
                        "UPDATE waiting SET state = 'granted', partition_id = ? WHERE id = ?",
                        (record.id, ticket.id),
                    )
                    granted.append(ticket)
        return granted

    def queue(self, priority_of: PriorityOf) -> list[tuple[Ticket, float | None]]:
        """Waiting requests in the order they will be served, with estimated starts.

        A waiter beyond the planning depth has no estimate (None).
        """
        now = self.clock()
        ordered, _, plan = self._plan(priority_of, now, with_plan=True)
        return [(t, plan.estimated_start.get(t.id, now)) for t in ordered]

    def invalidate_plan(self) -> None:
        """Forget the cached plan (the policy changed: capacities may differ)."""
        self._plan_cache = None
        self._waiters.clear()

    def _plan(
        self, priority_of: PriorityOf, now: float, with_plan: bool = False
    ) -> tuple[list[Ticket], list[Ticket], Any]:
        """The queue's order and plan; reused while nothing changed (see PLAN_REUSE_S).

        Costs O(users + waiters) reads: fair-share usage comes from one row per
        user, not from each user's history.
        """
        key = (self._generation, self._data_version(), priority_of)
        cached = self._plan_cache
        if cached is not None and cached[0] == key and 0 <= now - cached[1] < PLAN_REUSE_S:
            return cached[2]  # type: ignore[no-any-return]
        tickets = self.waiting()
        usage = self.fairshare_usage(now) if tickets else {}
        keyed = [
            (priority_of(t.request.user, now - t.enqueued_at, usage.get(t.request.uid, 0.0)), t)
            for t in tickets
        ]
        # sorted() is stable and tickets come in enqueue order: ties go to the earlier one.
        ordered = [t for _, t in sorted(keyed, key=lambda k: k[0])]
        devices = {t.request.device_uuid for t in ordered}
        intervals = {uuid: self._open_on_device(uuid, now) for uuid in devices}
        plan = plan_queue([self._waiter(t) for t in ordered], intervals, now)
        grant_ids = set(plan.grant)
        result = ordered, [t for t in ordered if t.id in grant_ids], plan
        self._plan_cache = (key, now, result)
        return result

    def _data_version(self) -> int:
        """Changes when another connection commits (embedded clients share the file)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _waiter(self, ticket: Ticket) -> Waiter:
        waiter = self._waiters.get(ticket.id)
        if waiter is None:
            if len(self._waiters) > 2 * len(self._waiting) + 1024:
                self._waiters.clear()
            r = ticket.request
            waiter = self._waiters[ticket.id] = Waiter(
                ticket.id, r.device_uuid, r.memory_bytes, r.duration_s, self.capacity_of(r)
            )
        return waiter

    def _reservations(
        self, device_uuid: str, now: float, priority_of: PriorityOf | None = None
    ) -> list[tuple[float, float, int, str]]:
        """Where queued requests on ``device_uuid`` would run: nobody may take that room.

        With ``priority_of`` these are the queue's own plan (served in priority
        order), so nothing admitted around them can delay any waiter.
        """
        if priority_of is not None:
            ordered, _, plan = self._plan(priority_of, now)
            starts = [
                (t, plan.estimated_start.get(t.id, now))
                for t in ordered
                if t.request.device_uuid == device_uuid
            ]
            return [
                (s, s + t.request.duration_s, t.request.memory_bytes, t.id)
                for t, s in starts
                if s is not None
            ]
        tickets = [t for t in self.waiting() if t.request.device_uuid == device_uuid]
        if not tickets:
            return []
        held = self._open_on_device(device_uuid, now)
        out: list[tuple[float, float, int, str]] = []
        for t in tickets:  # enqueue order: a direct request never overtakes a waiting one
            req = t.request
            start = earliest_fit(
                held + out, req.memory_bytes, req.duration_s, now, self.capacity_of(req)
            )
            if start is not None:
                out.append((start, start + req.duration_s, req.memory_bytes, t.id))
        return out

    def _drop_stale_tickets(self, now: float) -> None:
        rows = self._db.execute(
            "SELECT id, timeout_at, waiter_pid, waiter_start FROM waiting WHERE state = 'waiting'"
        ).fetchall()
        alive: dict[tuple[int, int | None], bool] = {}  # one look per waiting process
        for ticket_id, timeout_at, pid, start in rows:
            if timeout_at is not None and now >= timeout_at:
                self._close_ticket(ticket_id, "timeout", "timed out waiting", now)
                continue
            if pid is None:
                continue
            if (pid, start) not in alive:
                alive[(pid, start)] = self._owner_alive(pid, start)
            if not alive[(pid, start)]:
                self._close_ticket(ticket_id, "cancelled", "the waiting process exited", now)

    def _close_ticket(self, ticket_id: str, state: str, reason: str, now: float) -> None:
        ticket = self.ticket(ticket_id)
        if ticket.state != "waiting":
            return
        self._db.execute(
            "UPDATE waiting SET state = ?, reason = ? WHERE id = ?", (state, reason, ticket_id)
        )
        req = ticket.request
        self._event(
            now,
            f"queue_{state}",
            None,
            req.uid,
            req.user,
            req.device_uuid,
            req.memory_bytes,
            {"ticket": ticket_id, "reason": reason},
        )

    def _mine(self, uid: int, now: float, check: QuotaCheck) -> list[PartitionRecord]:
        """What a quota check needs: the user's open partitions, and their last 8 days
        only where the check asks for history (GPU-hour budgets)."""
        if getattr(check, "needs_history", True):
            return self._recent_of(uid, now)
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions {_BY_OPEN} WHERE {_OPEN} AND uid = ?", (uid,)
        ).fetchall()
        return [_record(r) for r in rows]

    def _recent_of(self, uid: int, now: float) -> list[PartitionRecord]:
        """The user's open partitions and those that ended in the last 8 days."""
        return self.recent(now - 8 * 86400.0, uid)

    def recent(self, since: float, uid: int | None = None) -> list[PartitionRecord]:
        """Every partition (of ``uid``) open now or ended after ``since``, oldest first.

        Two indexed queries (open ones; ended ones by ``(uid, ended_at)``), so the
        cost follows what is returned, not the ledger's whole history.
        """
        who, args = ("AND uid = ?", (uid,)) if uid is not None else ("", ())
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions {_BY_OPEN} WHERE {_OPEN} {who}", args
        ).fetchall()
        rows += self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE ended_at >= ? AND NOT {_OPEN} {who}",
            (since, *args),
        ).fetchall()
        records = [_record(r) for r in rows]
        records.sort(key=lambda r: r.created_at)
        return records

    # ------------------------------------------------------------ history

    def fairshare_usage(self, now: float) -> dict[int, float]:
        """Each user's decayed GPU-hours (policy.decayed_usage) from one row per user plus
        the open partitions: what planning needs, at a cost that does not grow with history."""
        half_life = self.fairshare_half_life()
        out = {
            int(uid): float(value) * 0.5 ** ((now - as_of) / half_life)
            for uid, value, as_of in self._db.execute("SELECT uid, value, as_of FROM fairshare")
        }
        for uid, start, expires, nbytes, total in self._db.execute(
            "SELECT uid, starts_at, expires_at, memory_bytes, device_total_bytes FROM partitions "
            f"WHERE {_OPEN}"
        ):
            end = min(expires, now)
            if end > start:
                hours = nbytes / total * (end - start) / HOUR
                out[uid] = out.get(uid, 0.0) + hours * 0.5 ** ((now - end) / half_life)
        return out

    def usage_totals(
        self, since: float, now: float, user: str | None = None
    ) -> dict[str, dict[str, float]]:
        """Per user, what :func:`chronos.accounting.usage_report` reports for ``[since, now)``.

        Whole hours come from ``usage_hours`` (kept as history is written); only
        the part of the first hour after ``since`` is read from partitions and
        events, and open partitions are added as they stand. The work is a few
        hours' rows per user, however long the history.
        """
        first_hour = math.ceil(since / HOUR)
        totals: dict[str, dict[str, float]] = {}

        def add(name: str, key: str, value: float) -> None:
            if user is not None and name != user:
                return
            row = totals.setdefault(name, dict.fromkeys(_USAGE_COUNTS, 0.0))
            row[key] += value

        sums = ", ".join(f"SUM({c})" for c in _USAGE_COUNTS)
        for name, *values in self._db.execute(
            f"SELECT user, {sums} FROM usage_hours WHERE hour >= ? GROUP BY user", (first_hour,)
        ):
            for key, value in zip(_USAGE_COUNTS, values, strict=True):
                add(name, key, float(value or 0.0))
        head_end = min(first_hour * HOUR, now)
        if head_end > since:
            self._usage_head(since, head_end, now, add)
        for r in self._open_records():
            add(r.user, "reserved_h", gpu_hours([r], since, now, now))
        return totals

    def _usage_head(
        self, since: float, until: float, now: float, add: Callable[[str, str, float], None]
    ) -> None:
        """What falls in ``[since, until)`` (less than an hour), from the raw history."""
        for (name,) in self._db.execute(  # each partition's "created" event is at created_at
            "SELECT user FROM events WHERE at >= ? AND at < ? AND kind = 'created'", (since, until)
        ):
            add(name, "created", 1)
        for row in self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE ended_at >= ? AND ended_at < ? "
            f"AND NOT {_OPEN}",
            (since, until),
        ):
            r = _record(row)
            for key, value in _end_counts(r).items():
                add(r.user, key, value)
        # Ended partitions held in [since, until) ended after since, and before until plus
        # the longest any partition was held: a window of the ended_at index.
        longest = self._meta_float("longest_held_s")
        for row in self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE ended_at > ? AND ended_at < ? "
            f"AND NOT {_OPEN}",
            (since, until + longest + 1.0),
        ):
            r = _record(row)
            add(r.user, "reserved_h", gpu_hours([r], since, until, now))
        kinds = ", ".join(f"'{k}'" for k in (*_EVENT_COUNTS, "usage"))
        for kind, name, detail, total in self._db.execute(
            "SELECT e.kind, COALESCE(p.user, e.user), e.detail, p.device_total_bytes "
            "FROM events e LEFT JOIN partitions p ON p.id = e.partition_id "
            f"WHERE e.at >= ? AND e.at < ? AND e.kind IN ({kinds}) AND e.user IS NOT NULL",
            (since, until),
        ):
            for key, value in _event_counts(kind, json.loads(detail), total).items():
                add(name, key, value)

    def compact(self, before: float, batch: int = 500) -> int:
        """Delete one batch of history older than ``before``; return how many rows went.

        Ended partitions (with their events and attachments), events of no
        partition, and closed queue tickets go; what usage and fair share need
        of them is already in ``usage_hours`` and ``fairshare``. The daemon calls
        this in small batches, each its own short transaction.
        """
        before = min(before, self.clock() - MIN_RETENTION_S)
        with _immediate(self._db):
            ids = [
                r[0]
                for r in self._db.execute(
                    f"SELECT id FROM partitions WHERE ended_at < ? AND NOT {_OPEN} "
                    "ORDER BY ended_at LIMIT ?",
                    (before, batch),
                )
            ]
            marks = ", ".join("?" * len(ids))
            gone = 0
            if ids:
                self._db.execute(f"DELETE FROM attached WHERE partition_id IN ({marks})", ids)
                gone += self._db.execute(
                    f"DELETE FROM events WHERE partition_id IN ({marks})", ids
                ).rowcount
                gone += self._db.execute(
                    f"DELETE FROM partitions WHERE id IN ({marks})", ids
                ).rowcount
            gone += self._db.execute(
                "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE at < ? "
                "AND partition_id IS NULL ORDER BY at LIMIT ?)",
                (before, batch),
            ).rowcount
            gone += self._db.execute(
                "DELETE FROM waiting WHERE id IN (SELECT id FROM waiting WHERE state != "
                "'waiting' AND enqueued_at < ? ORDER BY enqueued_at LIMIT ?)",
                (before, batch),
            ).rowcount
        return gone

    def _ensure_history(self) -> None:
        """Create the history aggregates and indexes once, filling them from what exists."""
        if self._meta("history") == _HISTORY_VERSION:
            return
        with _immediate(self._db):
            if self._meta("history") == _HISTORY_VERSION:
                return  # another process did it meanwhile
            for statement in _HISTORY_SCHEMA:
                self._db.execute(statement)
            for row in self._db.execute(f"SELECT {_COLUMNS} FROM partitions").fetchall():
                r = _record(row)
                self._bump(r.created_at, r.user, created=1)
                if r.state not in (ACTIVE, BOOKED):
                    self._account_end(r)
            kinds = ", ".join(f"'{k}'" for k in (*_EVENT_COUNTS, "usage"))
            for at, kind, pid, user, detail in self._db.execute(
                f"SELECT at, kind, partition_id, user, detail FROM events WHERE kind IN ({kinds})"
            ).fetchall():
                self._count_event(at, kind, pid, user, json.loads(detail))
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('history', ?)", (_HISTORY_VERSION,)
            )

    def _meta(self, key: str) -> str | None:
        row = self._db.execute("SELECT value FROM meta WHERE key = ?", (key,)).fetchone()
        return None if row is None else str(row[0])

    def _meta_float(self, key: str) -> float:
        value = self._meta(key)
        return 0.0 if value is None else float(value)

    def _bump(self, at: float, user: str, **counts: float) -> None:
        """Add ``counts`` to ``user``'s row for the hour of ``at``."""
        cols = ", ".join(counts)
        marks = ", ".join("?" * len(counts))
        sets = ", ".join(f"{c} = {c} + excluded.{c}" for c in counts)
        self._db.execute(
            f"INSERT INTO usage_hours (hour, user, {cols}) VALUES (?, ?, {marks}) "
            f"ON CONFLICT (hour, user) DO UPDATE SET {sets}",
            (math.floor(at / HOUR), user, *counts.values()),
        )

    def _account_end(self, r: PartitionRecord) -> None:
        """Fold an ended partition into usage_hours and fairshare (same transaction)."""
        assert r.ended_at is not None
        for key, value in _end_counts(r).items():
            self._bump(r.ended_at, r.user, **{key: value})
        start, end = r.starts_at, held_until(r, r.ended_at)
        if end <= start:
            return
        hour = math.floor(start / HOUR)
        while hour * HOUR < end:
            lo, hi = max(start, hour * HOUR), min(end, (hour + 1) * HOUR)
            self._bump(lo, r.user, reserved_h=r.memory_fraction * (hi - lo) / HOUR)
            hour += 1
        self._fold_fairshare(r.uid, r.memory_fraction * (end - start) / HOUR, end)
        self._db.execute(
            "INSERT INTO meta VALUES ('longest_held_s', ?) ON CONFLICT (key) DO UPDATE SET "
            "value = MAX(CAST(value AS REAL), CAST(excluded.value AS REAL))",
            (end - start,),
        )

    def _fold_fairshare(self, uid: int, hours: float, at: float) -> None:
        """Add ``hours`` that ended at ``at`` to the user's decayed total."""
        half_life = self.fairshare_half_life()
        row = self._db.execute(
            "SELECT value, as_of FROM fairshare WHERE uid = ?", (uid,)
        ).fetchone()
        if row is None:
            value, as_of = hours, at
        elif at >= row[1]:
            value, as_of = row[0] * 0.5 ** ((at - row[1]) / half_life) + hours, at
        else:
            value, as_of = row[0] + hours * 0.5 ** ((row[1] - at) / half_life), row[1]
        self._db.execute(
            "INSERT OR REPLACE INTO fairshare (uid, value, as_of) VALUES (?, ?, ?)",
            (uid, value, as_of),
        )

    def _count_event(
        self, at: float, kind: str, partition_id: str | None, user: str | None, detail: Any
    ) -> None:
        if user is None or (kind not in _EVENT_COUNTS and kind != "usage"):
            return
        total = None
        if kind == "usage":
            row = self._db.execute(
                "SELECT user, device_total_bytes FROM partitions WHERE id = ?", (partition_id,)
            ).fetchone()
            if row is None:
                return
            user, total = row
        counts = _event_counts(kind, detail, total)
        if counts:
            assert user is not None
            self._bump(at, user, **counts)

    def _open_records(self) -> list[PartitionRecord]:
        rows = self._db.execute(f"SELECT {_COLUMNS} FROM partitions WHERE {_OPEN}").fetchall()
        return [_record(r) for r in rows]

    # ------------------------------------------------------------------- reads

    def get(self, partition_id: str) -> PartitionRecord:
        return self._get(partition_id)

    def partitions(
        self, include_ended: bool = False, limit: int | None = None
    ) -> list[PartitionRecord]:
        """Open partitions (``include_ended``: every partition), oldest first.

        Partitions whose end has passed but that nobody has reaped yet are
        returned with their stored state; :meth:`PartitionRecord.state_at`
        gives the effective one.
        """
        where = "" if include_ended else f"WHERE {_OPEN}"
        sql = f"SELECT {_COLUMNS} FROM partitions {where} ORDER BY created_at"
        rows = self._db.execute(sql).fetchall()
        records = [_record(r) for r in rows]
        if limit is not None:
            records = records[-limit:]
        return records

    def partitions_page(
        self, include_ended: bool, after: int, count: int
    ) -> tuple[list[PartitionRecord], int | None]:
        """Up to ``count`` partitions after cursor ``after``, oldest first, and the next cursor
        (None at the end). Open ones come through the open-partitions index, all of them by
        rowid, so a page costs what it returns however long the history."""
        where = "WHERE" if include_ended else f"{_BY_OPEN} WHERE {_OPEN} AND"
        rows = self._db.execute(
            f"SELECT rowid, {_COLUMNS} FROM partitions {where} rowid > ? ORDER BY rowid LIMIT ?",
            (after, count + 1),
        ).fetchall()
        more = len(rows) > count
        rows = rows[:count]
        return [_record(r[1:]) for r in rows], (int(rows[-1][0]) if more else None)

    def events_page(
        self, since: float | None, partition_id: str | None, after: int, count: int
    ) -> tuple[list[Event], int | None]:
        """Up to ``count`` events (as :meth:`events` filters them) with ``seq > after``."""
        if after <= 0 and since and not partition_id:
            first = self._db.execute(
                "SELECT MIN(seq) FROM events INDEXED BY events_at WHERE at >= ?", (since,)
            )
            after = max(after, int(first.fetchone()[0] or 1) - 1)
        sql = "SELECT seq, at, kind, partition_id, uid, user, device_uuid, memory_bytes, detail "
        sql += "FROM events WHERE seq > ? AND +at >= ?"
        args: list[Any] = [after, since or 0.0]
        if partition_id:
            sql += " AND partition_id = ?"
            args.append(partition_id)
        rows = self._db.execute(sql + " ORDER BY seq LIMIT ?", (*args, count + 1)).fetchall()
        more = len(rows) > count
        events = [_event(row) for row in rows[:count]]
        return events, (events[-1].seq if more else None)

    def running(self, now: float | None = None) -> list[PartitionRecord]:
        """Partitions active at ``now`` (not bookings still to come), straight from SQL."""
        now = self.clock() if now is None else now
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE {_OPEN} AND starts_at <= ? "
            "AND expires_at > ? ORDER BY created_at",
            (now, now),
        ).fetchall()
        return [_record(r) for r in rows]

    def ending_by(self, device_uuid: str, when: float) -> list[str]:
        """Ids of open partitions on ``device_uuid`` that end by ``when``, soonest first."""
        rows = self._db.execute(
            f"SELECT id FROM partitions WHERE {_OPEN} AND device_uuid = ? AND expires_at > ? "
            "AND expires_at <= ? ORDER BY expires_at",
            (device_uuid, self.clock(), when),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def watched(self) -> list[PartitionRecord]:
        """Open partitions a daemon must watch: owner-bound, or with a warning due."""
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE {_OPEN} AND "
            "(owner_pid IS NOT NULL OR warn_s IS NOT NULL)"
        ).fetchall()
        return [_record(r) for r in rows]

    def ended_since(self, seq: int) -> tuple[list[str], int]:
        """Ids of partitions ended by events after ``seq``, and the newest seq."""
        rows = self._db.execute(
            "SELECT seq, partition_id FROM events WHERE seq > ? AND kind IN "
            "('released', 'expired')",
            (seq,),
        ).fetchall()
        last = max((r[0] for r in rows), default=seq)
        if not rows:
            last = self.last_seq(seq)
        return [r[1] for r in rows if r[1]], last

    def last_seq(self, default: int = 0) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return default if row[0] is None else int(row[0])

    def active(self, now: float | None = None) -> list[PartitionRecord]:
        now = self.clock() if now is None else now
        return [r for r in self.partitions() if r.state_at(now) in (ACTIVE, BOOKED)]

    def committed_bytes(self, device_uuid: str, now: float | None = None) -> int:
        now = self.clock() if now is None else now
        rows = self._db.execute(
            f"SELECT COALESCE(SUM(memory_bytes), 0) FROM partitions WHERE {_OPEN} "
            "AND device_uuid = ? AND starts_at <= ? AND expires_at > ?",
            (device_uuid, now, now),
        ).fetchone()
        return int(rows[0])

    def attached(self, partition_id: str | None = None) -> list[Attached]:
        sql = "SELECT partition_id, pid, start_ticks, uid FROM attached"
        args: tuple[Any, ...] = ()
        if partition_id is not None:
            sql += " WHERE partition_id = ?"
            args = (partition_id,)
        return [Attached(*row) for row in self._db.execute(sql, args).fetchall()]

    def events(
        self,
        since: float | None = None,
        partition_id: str | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[Event]:
        """Events in order; ``kinds`` filters in SQL (start-up reads only what it acts on,
        not every event of the day)."""
        sql = "SELECT seq, at, kind, partition_id, uid, user, device_uuid, memory_bytes, detail "
        # A recent window is a range on the `at` index; left to itself SQLite walks every
        # event in seq order to spare the sort (142 ms with 2 million events at start-up).
        recent = since and not partition_id
        sql += "FROM events INDEXED BY events_at" if recent else "FROM events"
        sql += " WHERE at >= ?"
        args: list[Any] = [since or 0.0]
        if partition_id:
            sql += " AND partition_id = ?"
            args.append(partition_id)
        if kinds is not None:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            args.extend(kinds)
        rows = self._db.execute(sql + " ORDER BY seq", args).fetchall()
        return [_event(row) for row in rows]

    def next_deadline(self) -> float | None:
        """The earliest ``expires_at`` (or ``starts_at`` of a booking) still to come."""
        row = self._db.execute(
            f"SELECT MIN(CASE WHEN state = 'booked' THEN starts_at ELSE expires_at END) "
            f"FROM partitions WHERE {_OPEN}"
        ).fetchone()
        return None if row[0] is None else float(row[0])

    # ---------------------------------------------------------------- internals

    def _get(self, partition_id: str) -> PartitionRecord:
        row = self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE id = ?", (partition_id,)
        ).fetchone()
        if row is None:
            raise NotFound(f"no partition {partition_id!r}")
        return _record(row)

    def _open_on_device(
        self, device_uuid: str, now: float, start: float = -math.inf, end: float = math.inf
    ) -> list[tuple[float, float, int, str]]:
        """Open partitions of the device (only those overlapping ``[start, end)``)."""
        rows = self._db.execute(
            f"SELECT starts_at, expires_at, memory_bytes, id FROM partitions "
            f"WHERE {_OPEN} AND device_uuid = ? AND expires_at > ? "
            "AND expires_at > ? AND starts_at < ?",
            (device_uuid, now, start, end),
        ).fetchall()
        held = [(float(s), float(e), int(b), str(i)) for s, e, b, i in rows]
        return held + [x for x in self.lingering(device_uuid) if x[1] > start and x[0] < end]

    def _anything_due(self, now: float, owners: bool) -> bool:
        booking_due = self._db.execute(
            "SELECT 1 FROM partitions WHERE state = 'booked' AND starts_at <= ? LIMIT 1", (now,)
        ).fetchone()
        return booking_due is not None or bool(self._due(now, owners))

    def _due(self, now: float, owners: bool = True) -> list[tuple[PartitionRecord, str, str]]:
        which = "(expires_at <= ? OR owner_pid IS NOT NULL)" if owners else "expires_at <= ?"
        rows = self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE {_OPEN} AND {which}", (now,)
        ).fetchall()
        due = []
        for row in rows:
            record = _record(row)
            if record.expires_at <= now:
                due.append((record, EXPIRED, "expired"))
            elif record.owner_pid is not None and not self._owner_alive(
                record.owner_pid, record.owner_start
            ):
                due.append((record, RELEASED, f"owner process {record.owner_pid} exited"))
        return due

    def _reap(self, now: float, owners: bool | None = None) -> list[Ended]:
        # A booking whose start has come becomes active: that state change is logged too
        # (first, so a booking that also ended since the last reap reads started, then ended).
        for row in self._db.execute(
            f"SELECT {_COLUMNS} FROM partitions WHERE state = 'booked' AND starts_at <= ?",
            (now,),
        ).fetchall():
            r = _record(row)
            self._event(
                r.starts_at,
                "started",
                r.id,
                r.uid,
                r.user,
                r.device_uuid,
                r.memory_bytes,
                {"reason": "booking began"},
            )
        self._db.execute(
            "UPDATE partitions SET state = 'active' WHERE state = 'booked' AND starts_at <= ?",
            (now,),
        )
        ended = []
        for record, state, reason in self._due(now, self.reap_owners if owners is None else owners):
            at = record.expires_at if state == EXPIRED else now
            ended.append(Ended(self._end(record, state, at, reason, None, None), reason))
        return ended

    def _end(
        self,
        record: PartitionRecord,
        state: str,
        at: float,
        reason: str,
        uid: int | None,
        user: str | None,
    ) -> PartitionRecord:
        self._db.execute(
            "UPDATE partitions SET state = ?, ended_at = ?, end_reason = ? WHERE id = ?",
            (state, at, reason, record.id),
        )
        self._event(
            at,
            state,
            record.id,
            uid if uid is not None else record.uid,
            user or record.user,
            record.device_uuid,
            record.memory_bytes,
            {"reason": reason, "owner_uid": record.uid},
        )
        ended = self._get(record.id)
        self._account_end(ended)
        return ended

    def _insert(self, r: PartitionRecord) -> None:
        placeholders = ", ".join("?" * 19)
        self._db.execute(
            f"INSERT INTO partitions ({_COLUMNS}) VALUES ({placeholders})",
            (
                r.id,
                r.device,
                r.device_uuid,
                r.device_total_bytes,
                r.memory_bytes,
                r.uid,
                r.user,
                r.created_at,
                r.starts_at,
                r.expires_at,
                r.state,
                r.ended_at,
                r.end_reason,
                r.owner_pid,
                r.owner_start,
                r.kind,
                r.grace_s,
                r.warn_s,
                r.warn_signal,
            ),
        )

    def _event(
        self,
        at: float,
        kind: str,
        partition_id: str | None,
        uid: int | None,
        user: str | None,
        device_uuid: str | None,
        memory_bytes: int | None,
        detail: dict[str, Any],
    ) -> None:
        self._db.execute(
            "INSERT INTO events (at, kind, partition_id, uid, user, device_uuid, memory_bytes, "
            "detail) VALUES (?, ?, ?, ?, ?, ?, ?, ?)",
            (at, kind, partition_id, uid, user, device_uuid, memory_bytes, json.dumps(detail)),
        )
        self._generation += 1
        self._count_event(at, kind, partition_id, user, detail)

    def _log_refused(self, now: float, req: NewPartition, refusal: AdmissionRefused) -> None:
        """The "refused" event of a request turned away before it got a partition."""
        self._event(
            now,
            "refused",
            None,
            req.uid,
            req.user,
            req.device_uuid,
            req.memory_bytes,
            {"reason": str(refusal)},
        )

    def _new_id(self) -> str:
        while True:
            candidate = os.urandom(4).hex()
            if not self._db.execute(
                "SELECT 1 FROM partitions WHERE id = ?", (candidate,)
            ).fetchone():
                return candidate

    def _refusal(
        self,
        req: NewPartition,
        booked: Sequence[tuple[float, float, int, str]],
        held: Sequence[tuple[float, float, int, str]],
        start: float,
        peak: int,
        now: float,
    ) -> AdmissionRefused:
        free = max(0, req.capacity_bytes - peak)
        fit = earliest_fit(held, req.memory_bytes, req.duration_s, start, req.capacity_bytes)
        want = format_bytes(req.memory_bytes)
        where = f"GPU {req.device}"
        if req.memory_bytes > req.capacity_bytes:
            return AdmissionRefused(  # not CapacityRefused: waiting can never make it fit
                f"{want} is more than {where} lets partitions reserve "
                f"({format_bytes(req.capacity_bytes)})"
            )
        when = "now" if start <= now else f"at {local_clock(start)}"
        msg = f"{where} has {format_bytes(free)} free {when}, {want} requested"
        ahead = len(held) - len(booked)
        if ahead:
            msg += f" ({ahead} waiting request(s) ahead)"
        if fit is not None:
            msg += f"; it fits from {local_clock(fit)} (in {format_duration(fit - now)})"
        return CapacityRefused(msg)


def _end_counts(r: PartitionRecord) -> dict[str, float]:
    """How an ended partition counts in usage: released early, or expired."""
    assert r.ended_at is not None
    if r.state == RELEASED and r.ended_at < r.expires_at:
        return {"released_early": 1}
    if r.state == EXPIRED:
        return {"expired": 1}
    return {}


def _event_counts(kind: str, detail: Any, device_total_bytes: int | None) -> dict[str, float]:
    """How an event counts in usage (``usage`` needs its partition's device size)."""
    if kind in _EVENT_COUNTS:
        return {_EVENT_COUNTS[kind]: 1}
    if kind == "usage" and device_total_bytes:
        byte_seconds = float(detail.get("byte_seconds", 0.0))
        return {"used_h": byte_seconds / device_total_bytes / HOUR, "used_measured": 1}
    return {}


def _event(row: Sequence[Any]) -> Event:
    seq, at, kind, partition_id, uid, user, device_uuid, memory_bytes, detail = row
    return Event(
        seq, at, kind, partition_id, uid, user, device_uuid, memory_bytes, json.loads(detail)
    )


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


def _ticket(row: Sequence[Any]) -> Ticket:
    ticket_id, state, enqueued_at, request, partition_id, reason, timeout_at, waiter_pid = row
    return Ticket(
        ticket_id,
        state,
        enqueued_at,
        NewPartition(**json.loads(request)),
        partition_id,
        reason,
        timeout_at,
        waiter_pid,
    )


def _record(row: Sequence[Any]) -> PartitionRecord:
    return PartitionRecord(*row)


def _in_the_way(
    held: Sequence[tuple[float, float, int, str]], start: float, end: float, now: float
) -> str:
    """Names of what holds the device somewhere in ``[start, end)``."""
    names = [
        f"queued request {i}"
        if i.startswith("q")
        else f"booking {i}"
        if s > now
        else f"partition {i}"
        for s, e, _, i in sorted(held)
        if s < end and e > start
    ]
    return ", ".join(names) or "nothing"


def _ended_message(record: PartitionRecord) -> str:
    when = local_clock(record.ended_at) if record.ended_at else "earlier"
    verb = "was released" if record.state == RELEASED else "expired"
    return f"partition {record.id} {verb} at {when}"


@contextmanager
def _immediate(db: sqlite3.Connection) -> Iterator[None]:
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
