"""Partitions: admission, release, reaping, attachments, lingering memory, and their reads.

Methods here run inside the facade's transaction (see :mod:`chronos.ledger.schema`)
and never open one. Admission's room check takes the queue's reservations as an
argument, so this part needs nothing of the queue; a refusal is raised with its facts
as data (:mod:`chronos.refusals`), never written as prose here.
"""

from __future__ import annotations

import math
import os
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import replace

from chronos.errors import NotFound, PartitionEnded
from chronos.ledger.events import Store
from chronos.ledger.records import (
    ATTACHED,
    PARTITIONS,
    Attached,
    Ended,
    Interval,
    Member,
    NewPartition,
)
from chronos.ledger.schema import BY_OPEN, OPEN, WATCHED
from chronos.models import PartitionRecord, Share
from chronos.policy import Profile, common_fit, peak_usage
from chronos.refusals import ExtensionBlocked, Holder, HolderKind, NoRoom, TooLarge, refusal
from chronos.units import local_clock
from chronos.vocabulary import OPEN_STATES, EventKind, PartitionState

OwnerCheck = Callable[[int, "int | None"], bool]
Lingering = Callable[[str], Sequence[tuple[float, float, int, str]]]
"""Memory of ended partitions whose processes still run, per device (the daemon keeps it)."""
QUOTA_HISTORY_S = 8 * 86400.0
"""How far back quota checks look (a week's GPU-hour budget, and a day's margin)."""

_SELECT = f"SELECT {PARTITIONS.columns} FROM partitions"
_BY_START = "INDEXED BY partitions_open_start"
_BY_WATCHED = "INDEXED BY partitions_watched"
_EXPIRED = f"{_SELECT} {BY_OPEN} WHERE {OPEN} AND expires_at <= ?"
"""Open partitions whose end has come (a range of the open partitions by end)."""
_OWNED = f"{_SELECT} {_BY_WATCHED} WHERE {OPEN} AND {WATCHED} AND owner_pid IS NOT NULL"
"""Open partitions bound to an owner process (among the few the daemon watches)."""
_TIES = "device_uuid, expires_at"
"""How open partitions created at the same moment are ordered (see ``_END_ORDER``)."""
_NEXT_DEADLINE = (
    "SELECT b.first, (SELECT expires_at FROM partitions "
    f"{BY_OPEN} WHERE {OPEN} AND state = 'active' AND expires_at <= COALESCE(b.first, 9e999) "
    "ORDER BY expires_at LIMIT 1) "
    "FROM (SELECT MIN(starts_at) AS first FROM partitions WHERE state = 'booked') AS b"
)
"""The first booking's start, and the first end of an active partition if it comes no later:
a booking ends after its start, so walking the ends up to that start meets no booking."""
_ANY_DUE = (
    "SELECT EXISTS (SELECT 1 FROM partitions WHERE state = 'booked' AND starts_at <= ?) "
    f"OR EXISTS (SELECT 1 FROM partitions {BY_OPEN} WHERE {OPEN} AND expires_at <= ?)"
)
"""Whether a booking starts or a partition ends now (a reap's work, owners aside)."""
_ANY_DUE_OR_OWNED = (
    f"{_ANY_DUE} OR EXISTS (SELECT 1 FROM partitions {_BY_WATCHED} "
    f"WHERE {OPEN} AND {WATCHED} AND owner_pid IS NOT NULL)"
)
"""That, or an open partition bound to an owner process (whose death a reap looks for)."""
_END_ORDER = f"ORDER BY {_TIES}"
"""The order a reap ends partitions in, and ties of open listings come in (that of schema
4's ``partitions_open`` index, which those reads once walked)."""
_ON_DEVICE = (
    f"SELECT starts_at, expires_at, memory_bytes, id FROM partitions {_BY_START} "
    f"WHERE {OPEN} AND device_uuid = ? AND starts_at < ? AND expires_at > ? AND expires_at > ? "
    "UNION ALL SELECT starts_at, expires_at, memory_bytes, partition_id FROM group_shares "
    "INDEXED BY group_shares_start "
    "WHERE device_uuid = ? AND starts_at < ? AND expires_at > ? AND expires_at > ?"
)
"""What holds a GPU over a span: its partitions whose primary share is there and the
groups with a further share there (their rows keep the group's span), in one statement;
both through an index by GPU and start, so bookings that start after the span are never
read. (A group's rows are deleted in the transaction that ends it, so every row is an
open group's; one left behind would only be counted, never hand out memory twice.)"""
_new_tuple = tuple.__new__


class Partitions:
    """The ``partitions`` and ``attached`` tables."""

    def __init__(self, store: Store, owner_alive: OwnerCheck, lingering: Lingering) -> None:
        self._db, self._events, self._history = store
        self._owner_alive = owner_alive
        self._lingering = lingering

    # ------------------------------------------------------------- writing

    def admit(self, req: NewPartition, now: float, start: float, end: float) -> PartitionRecord:
        """Record ``req`` as a partition over ``[start, end)`` (room already checked on
        every GPU of it: a group is written whole, in the caller's one transaction)."""
        record = PartitionRecord(
            id=_random_id(),
            created_at=now,
            starts_at=start,
            expires_at=end,
            state=PartitionState.ACTIVE if start <= now else PartitionState.BOOKED,
            more_shares=tuple(
                Share(m.device, m.device_uuid, m.memory_bytes, m.device_total_bytes)
                for m in req.more
            ),
            **req.kept_terms(),
        )
        while not self._inserted_new(record):  # that id was taken (one in four billion)
            record = replace(record, id=_random_id())
        self._history.bump(now, req.user, created=1)
        detail: dict[str, object] = {"expires_at": end, "starts_at": start, "kind": req.kind}
        if req.more or req.placement is not None:
            detail["devices"] = list(record.devices)
            detail["shares"] = [
                {"device": s.device, "device_uuid": s.device_uuid, "memory_bytes": s.memory_bytes}
                for s in record.shares
            ]
        if req.placement is not None:
            detail["placement"] = req.placement
        self._events.record(
            EventKind.CREATED, at=now, partition=record.id, subject=req, detail=detail
        )
        return record

    def insert(self, record: PartitionRecord) -> None:
        """Write ``record`` as it is (no event, no accounting: seeding writes those itself),
        with the room-check rows of a group's further shares while it is open."""
        PARTITIONS.insert(self._db, record)
        self._insert_shares(record)

    def _insert_shares(self, record: PartitionRecord) -> None:
        if record.more_shares and record.is_open:
            self._db.executemany(
                "INSERT INTO group_shares (device_uuid, partition_id, memory_bytes, starts_at, "
                "expires_at) VALUES (?, ?, ?, ?, ?)",
                [
                    (s.device_uuid, record.id, s.memory_bytes, record.starts_at, record.expires_at)
                    for s in record.more_shares
                ],
            )

    def _inserted_new(self, record: PartitionRecord) -> bool:
        """Insert ``record``; False (nothing written) if its id is taken. The primary key
        checks, instead of a SELECT before every insert."""
        try:
            PARTITIONS.insert(self._db, record)
        except sqlite3.IntegrityError as exc:
            if getattr(exc, "sqlite_errorcode", None) != _PRIMARY_KEY_TAKEN:
                raise
            return False
        self._insert_shares(record)
        return True

    def new_id(self) -> str:
        while True:
            candidate = _random_id()
            if not self._db.execute(
                "SELECT 1 FROM partitions WHERE id = ?", (candidate,)
            ).fetchone():
                return candidate

    def end(
        self,
        record: PartitionRecord,
        state: PartitionState,
        at: float,
        reason: str,
        uid: int | None = None,
        user: str | None = None,
    ) -> PartitionRecord:
        """End ``record`` at ``at``; ``uid``/``user``: who ended it (default its owner)."""
        self._db.execute(
            "UPDATE partitions SET state = ?, ended_at = ?, end_reason = ? WHERE id = ?",
            (state, at, reason, record.id),
        )
        if record.more_shares:  # an ended group holds no GPU: its room-check rows go
            self._db.execute("DELETE FROM group_shares WHERE partition_id = ?", (record.id,))
        self._events.record(
            EventKind(state),
            at=at,
            partition=record.id,
            subject=record,
            uid=uid,  # who ended it; by default its owner
            user=user or record.user,
            detail={"reason": reason, "owner_uid": record.uid},
        )
        # The row as just written (read back, it is the same record: one SELECT fewer).
        ended = replace(record, state=str(state), ended_at=at, end_reason=reason)
        self._history.account_end(ended)
        return ended

    def reap(self, now: float, owners: bool) -> list[Ended]:
        """Start bookings whose time came, and end what is due (expired, owner gone)."""
        if not self._maybe_due(now, owners):  # one statement for the usual "nothing"
            return []
        # A booking whose start has come becomes active: that state change is logged too
        # (first, so a booking that also ended since the last reap reads started, then ended).
        starting = PARTITIONS.all(
            self._db.execute(f"{_SELECT} WHERE state = 'booked' AND starts_at <= ?", (now,))
        )
        for r in starting:
            self._events.record(
                EventKind.STARTED,
                at=r.starts_at,
                partition=r.id,
                subject=r,
                detail={"reason": "booking began"},
            )
        if starting:  # (in this transaction nothing else can have started one)
            self._db.execute(
                "UPDATE partitions SET state = 'active' WHERE state = 'booked' AND starts_at <= ?",
                (now,),
            )
        ended = []
        for record, state, reason in self._due(now, owners):
            at = record.expires_at if state == PartitionState.EXPIRED else now
            ended.append(Ended(self.end(record, state, at, reason), reason))
        return ended

    def anything_due(self, now: float, owners: bool) -> bool:
        """Whether :meth:`reap` would change anything (a read: no transaction needed).

        Without the owner checks that is one statement (the daemon asks after every change).
        """
        if not owners:
            return self._maybe_due(now, owners)
        booking_due = self._db.execute(
            "SELECT 1 FROM partitions WHERE state = 'booked' AND starts_at <= ? LIMIT 1", (now,)
        ).fetchone()
        return booking_due is not None or bool(self._due(now, owners))

    def _maybe_due(self, now: float, owners: bool) -> bool:
        """Whether a booking starts or a partition ends now, or (``owners``) an open
        partition has an owner process that may have died: one indexed statement."""
        sql, args = (_ANY_DUE_OR_OWNED, (now, now)) if owners else (_ANY_DUE, (now, now))
        return bool(self._db.execute(sql, args).fetchone()[0])

    def _due(
        self, now: float, owners: bool = True
    ) -> list[tuple[PartitionRecord, PartitionState, str]]:
        # Two indexed reads in one statement (an OR of both made SQLite read every open
        # partition: with 10,000 bookings, most of an admission's time): the expired, and
        # the owner-bound ones not expired, each once, in the order they always ended.
        if owners:
            sql = f"{_EXPIRED} UNION ALL {_OWNED} AND expires_at > ? {_END_ORDER}"
            cursor = self._db.execute(sql, (now, now))
        else:
            cursor = self._db.execute(f"{_EXPIRED} {_END_ORDER}", (now,))
        candidates = PARTITIONS.all(cursor)
        due: list[tuple[PartitionRecord, PartitionState, str]] = []
        for record in candidates:
            if record.expires_at <= now:
                due.append((record, PartitionState.EXPIRED, "expired"))
            elif record.owner_pid is not None and not self._owner_alive(
                record.owner_pid, record.owner_start
            ):
                reason = f"owner process {record.owner_pid} exited"
                due.append((record, PartitionState.RELEASED, reason))
        return due

    def release(
        self,
        partition_id: str,
        now: float,
        uid: int,
        user: str,
        reason: str,
        may_end: Callable[[PartitionRecord], None] | None = None,
    ) -> PartitionRecord:
        record = self.get(partition_id)
        if may_end is not None:
            may_end(record)  # who asks comes before whether it is still open
        _check_open(record)
        return self.end(record, PartitionState.RELEASED, now, reason, uid, user)

    def attach(
        self,
        partition_id: str,
        pid: int,
        start_ticks: int | None,
        uid: int,
        by_uid: int,
        now: float,
    ) -> None:
        record = self.get_open(partition_id)
        self._db.execute(
            "INSERT OR REPLACE INTO attached VALUES (?, ?, ?, ?, ?, ?)",
            (partition_id, pid, start_ticks, uid, now, by_uid),
        )
        self._events.record(
            EventKind.ATTACHED,
            at=now,
            partition=partition_id,
            uid=by_uid,
            device_uuid=record.device_uuid,
            detail={"pid": pid},
        )

    def extend(
        self,
        partition_id: str,
        new_expires_at: float,
        capacity_of: Callable[[Share], int],
        uid: int,
        user: str,
        now: float,
        reserved: Mapping[str, list[Interval]],
    ) -> PartitionRecord:
        """Move an open partition's end to ``new_expires_at`` if nothing (other partitions,
        bookings, ``reserved`` room of the queue) needs any of its GPUs meanwhile: a group
        extends on every GPU or not at all. ``capacity_of``: what a GPU may hand out."""
        record = self.get_open(partition_id)
        for share in record.shares:
            self._check_extension(record, share, new_expires_at, capacity_of(share), now, reserved)
        self._db.execute(
            "UPDATE partitions SET expires_at = ? WHERE id = ?", (new_expires_at, partition_id)
        )
        if record.more_shares:  # the room-check rows keep the group's span
            self._db.execute(
                "UPDATE group_shares SET expires_at = ? WHERE partition_id = ?",
                (new_expires_at, partition_id),
            )
        self._events.record(
            EventKind.EXTENDED,
            at=now,
            partition=partition_id,
            subject=record,
            uid=uid,
            user=user,
            detail={"from": record.expires_at, "to": new_expires_at},
        )
        return self.get(partition_id)

    def _check_extension(
        self,
        record: PartitionRecord,
        share: Share,
        new_expires_at: float,
        capacity_bytes: int,
        now: float,
        reserved: Mapping[str, list[Interval]],
    ) -> None:
        held = [p for p in self.on_device(share.device_uuid, now) if p.holder != record.id]
        queued = reserved.get(share.device_uuid, [])
        peak = peak_usage(held + queued, record.expires_at, new_expires_at)
        if peak + share.memory_bytes > capacity_bytes:
            in_the_way = _holders(held, queued, record.expires_at, new_expires_at, now)
            facts = ExtensionBlocked(record.id, new_expires_at, capacity_bytes - peak, in_the_way)
            raise refusal(facts)

    def shift_open(self, step: float, now: float) -> None:
        """Move every open partition by ``step`` seconds (the wall clock stepped)."""
        self._db.execute(
            f"UPDATE partitions SET starts_at = starts_at + ?, expires_at = expires_at + ? "
            f"WHERE {OPEN}",
            (step, step),
        )
        # Group rows exist only for open groups (an end deletes them): all move alike.
        self._db.execute(
            "UPDATE group_shares SET starts_at = starts_at + ?, expires_at = expires_at + ?",
            (step, step),
        )
        self._events.record(EventKind.CLOCK_STEPPED, at=now + step, detail={"step_s": step})

    # ------------------------------------------------------------- admission

    def check_room(
        self,
        req: NewPartition,
        start: float,
        end: float,
        now: float,
        reserved: Mapping[str, list[Interval]],
    ) -> None:
        """Raise a refusal (facts attached) unless ``req`` fits over ``[start, end)`` on
        every GPU it asks for, beside what is open there and ``reserved`` (per GPU: where
        the queue will run its waiters). One GPU without room refuses the whole group."""
        for member in req.members:
            self._check_member(req, member, start, end, now, reserved)

    def _check_member(
        self,
        req: NewPartition,
        member: Member,
        start: float,
        end: float,
        now: float,
        reserved: Mapping[str, list[Interval]],
    ) -> None:
        # Only what overlaps [start, end) can matter: with thousands of bookings ahead,
        # reading them all took longer than the rest of admission together.
        held_back = reserved.get(member.device_uuid, [])
        near = self.on_device(member.device_uuid, now, start, end)
        peak = peak_usage(near + held_back, start, end)
        if peak + member.memory_bytes <= member.capacity_bytes:
            return
        if member.memory_bytes > member.capacity_bytes:  # waiting can never make it fit
            raise refusal(TooLarge(member.device, member.memory_bytes, member.capacity_bytes))
        fits_at = self.earliest_fit(req, start, now, reserved)
        free = max(0, member.capacity_bytes - peak)
        raise refusal(
            NoRoom(member.device, member.memory_bytes, free, start, now, len(held_back), fits_at)
        )

    def earliest_fit(
        self,
        req: NewPartition,
        not_before: float,
        now: float,
        reserved: Mapping[str, list[Interval]],
    ) -> float | None:
        """When every GPU of ``req`` has room at once for its whole duration."""
        needs = [
            (
                Profile(self.on_device(m.device_uuid, now) + reserved.get(m.device_uuid, []), now),
                m.memory_bytes,
                m.capacity_bytes,
            )
            for m in req.members
        ]
        return common_fit(needs, req.duration_s, not_before)

    def on_device(
        self, device_uuid: str, now: float, start: float = -math.inf, end: float = math.inf
    ) -> list[Interval]:
        """What holds the device (open partitions and lingering memory) within ``[start, end)``."""
        span = (device_uuid, end, now, start)
        rows = self._db.execute(_ON_DEVICE, span + span).fetchall()
        # Rows are (REAL, REAL, INTEGER, TEXT) by the columns' affinity, so each row is made
        # an Interval as it is: with thousands open, Interval(...) per row cost a tenth of
        # admission.
        held = [_new_tuple(Interval, row) for row in rows]
        lingering = [
            Interval(*x) for x in self._lingering(device_uuid) if x[1] > start and x[0] < end
        ]
        return held + lingering

    def committed_bytes(self, device_uuid: str, now: float) -> int:
        rows = self._db.execute(
            f"SELECT COALESCE(SUM(memory_bytes), 0) FROM partitions WHERE {OPEN} "
            "AND device_uuid = ? AND starts_at <= ? AND expires_at > ?",
            (device_uuid, now, now),
        ).fetchone()
        grouped = self._db.execute(
            "SELECT COALESCE(SUM(memory_bytes), 0) FROM group_shares "
            "WHERE device_uuid = ? AND starts_at <= ? AND expires_at > ?",
            (device_uuid, now, now),
        ).fetchone()
        return int(rows[0]) + int(grouped[0])

    # ------------------------------------------------------------- reading

    def get(self, partition_id: str) -> PartitionRecord:
        record = PARTITIONS.one(self._db.execute(f"{_SELECT} WHERE id = ?", (partition_id,)))
        if record is None:
            raise NotFound(f"no partition {partition_id!r}")
        return record

    def in_series(self, series: str) -> list[PartitionRecord]:
        """Every booking of repeated series ``series``, first start first."""
        return PARTITIONS.all(
            self._db.execute(f"{_SELECT} WHERE series = ? ORDER BY starts_at", (series,))
        )

    def get_open(self, partition_id: str) -> PartitionRecord:
        """The partition, which must still be open (else :class:`PartitionEnded`)."""
        record = self.get(partition_id)
        _check_open(record)
        return record

    def stored(
        self, include_ended: bool = False, limit: int | None = None
    ) -> list[PartitionRecord]:
        """Partitions stored as open (``include_ended``: every partition), oldest first.

        Partitions whose end has passed but that nobody has reaped yet are
        returned with their stored state; :meth:`PartitionRecord.state_at`
        gives the effective one.
        """
        where = "" if include_ended else f"{BY_OPEN} WHERE {OPEN}"
        order = "ORDER BY created_at" if include_ended else f"ORDER BY created_at, {_TIES}"
        records = PARTITIONS.all(self._db.execute(f"{_SELECT} {where} {order}"))
        if limit is not None:
            records = records[-limit:]
        return records

    def open_at(self, now: float, started: bool = False) -> list[PartitionRecord]:
        """Partitions open at ``now`` (``started``: only those already started, not bookings
        still to come), oldest first: the effective state, whatever was reaped."""
        begun = "AND starts_at <= ? " if started else ""
        args = (now, now) if started else (now,)
        return PARTITIONS.all(
            self._db.execute(
                f"{_SELECT} {BY_OPEN} WHERE {OPEN} {begun}AND expires_at > ? "
                f"ORDER BY created_at, {_TIES}",
                args,
            )
        )

    def watched(self) -> list[PartitionRecord]:
        """Open partitions a daemon must watch: owner-bound, or with a warning due."""
        return PARTITIONS.all(
            self._db.execute(f"{_SELECT} {_BY_WATCHED} WHERE {OPEN} AND {WATCHED} {_END_ORDER}")
        )

    def recent(self, since: float, uid: int | None = None) -> list[PartitionRecord]:
        """Every partition (of ``uid``) open now or ended after ``since``, oldest first.

        Two indexed queries (open ones; ended ones by ``(uid, ended_at)``), so the
        cost follows what is returned, not the ledger's whole history.
        """
        records = self.open_of(uid)
        who, args = ("AND uid = ?", (uid,)) if uid is not None else ("", ())
        records += PARTITIONS.all(
            self._db.execute(f"{_SELECT} WHERE ended_at >= ? AND NOT {OPEN} {who}", (since, *args))
        )
        records.sort(key=lambda r: r.created_at)
        return records

    def quota_view(self, uid: int, now: float, check: Callable[..., None]) -> list[PartitionRecord]:
        """What a quota check needs: the user's open partitions, and their last 8 days
        only where the check asks for history (GPU-hour budgets)."""
        if getattr(check, "needs_history", True):
            return self.recent(now - QUOTA_HISTORY_S, uid)
        return self.open_of(uid)

    def open_of(self, uid: int | None) -> list[PartitionRecord]:
        """Partitions stored as open (of ``uid``), through the open-partitions index."""
        who, args = ("AND uid = ?", (uid,)) if uid is not None else ("", ())
        sql = f"{_SELECT} {BY_OPEN} WHERE {OPEN} {who} {_END_ORDER}"
        return PARTITIONS.all(self._db.execute(sql, args))

    def page(
        self, include_ended: bool, after: int, count: int
    ) -> tuple[list[PartitionRecord], int | None]:
        """Up to ``count`` partitions after cursor ``after``, oldest first, and the next cursor
        (None at the end). Open ones come through the open-partitions index, all of them by
        rowid, so a page costs what it returns however long the history."""
        where = "WHERE" if include_ended else f"{BY_OPEN} WHERE {OPEN} AND"
        cursor = self._db.execute(
            f"SELECT {PARTITIONS.columns}, rowid FROM partitions {where} rowid > ? "
            "ORDER BY rowid LIMIT ?",
            (after, count + 1),
        )
        rows = PARTITIONS.with_rows(cursor)  # the rowid is the cursor, not a field
        more = len(rows) > count
        rows = rows[:count]
        return [r for _, r in rows], (int(rows[-1][0][-1]) if more else None)

    def ending_by(self, device_uuid: str, when: float, now: float) -> list[str]:
        """Ids of open partitions on ``device_uuid`` that end by ``when``, soonest first."""
        rows = self._db.execute(
            f"SELECT id, expires_at FROM partitions {BY_OPEN} WHERE {OPEN} AND device_uuid = ? "
            "AND expires_at > ? AND expires_at <= ? UNION ALL "
            "SELECT partition_id, expires_at FROM group_shares "
            "WHERE device_uuid = ? AND expires_at > ? AND expires_at <= ? ORDER BY 2",
            (device_uuid, now, when, device_uuid, now, when),
        ).fetchall()
        return [str(r[0]) for r in rows]

    def next_deadline(self) -> float | None:
        """The earliest ``expires_at`` (or ``starts_at`` of a booking) still to come."""
        booked, active = self._db.execute(_NEXT_DEADLINE).fetchone()
        soonest = [float(t) for t in (booked, active) if t is not None]
        return min(soonest) if soonest else None

    def attached(self, partition_id: str | None = None) -> list[Attached]:
        sql = f"SELECT {ATTACHED.columns} FROM attached"
        if partition_id is None:
            return ATTACHED.all(self._db.execute(sql))
        return ATTACHED.all(self._db.execute(sql + " WHERE partition_id = ?", (partition_id,)))


def _holders(
    held: Sequence[Interval], reserved: Sequence[Interval], start: float, end: float, now: float
) -> tuple[Holder, ...]:
    """What holds the device somewhere in ``[start, end)``, in time order, named by what it
    is: a queued request (from the queue's reservations), a booking, or a partition."""
    tagged = [(x, HolderKind.BOOKING if x.start > now else HolderKind.PARTITION) for x in held]
    tagged += [(x, HolderKind.QUEUED) for x in reserved]
    overlapping = sorted((t for t in tagged if t[0].start < end and t[0].end > start), key=_first)
    return tuple(Holder(kind, x.holder) for x, kind in overlapping)


def _first(tagged: tuple[Interval, HolderKind]) -> Interval:
    return tagged[0]


_PRIMARY_KEY_TAKEN = 1555
"""SQLITE_CONSTRAINT_PRIMARYKEY: an insert whose id another row has (the statement alone
is undone, the transaction goes on)."""


def _random_id() -> str:
    return os.urandom(4).hex()


def _check_open(record: PartitionRecord) -> None:
    if record.state not in OPEN_STATES:
        raise PartitionEnded(_ended_message(record))


def _ended_message(record: PartitionRecord) -> str:
    when = local_clock(record.ended_at) if record.ended_at else "earlier"
    verb = "was released" if record.state == PartitionState.RELEASED else "expired"
    return f"partition {record.id} {verb} at {when}"
