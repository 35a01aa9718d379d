"""The event log: one append-only table of everything that happened, and its reads.

Every write goes through :meth:`EventLog.record`, with keyword arguments (an event has
eight columns, most of them optional), inside the caller's transaction. Each write
also folds the event into the usage aggregates (:mod:`chronos.ledger.history`) and
bumps :attr:`EventLog.generation`, which tells the queue's cached plan it is stale.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from typing import Any, NamedTuple, Protocol

from chronos.ledger.history import History
from chronos.ledger.records import EVENTS
from chronos.models import Event
from chronos.vocabulary import ENDED_KINDS

_ENDED = ", ".join(f"'{k}'" for k in ENDED_KINDS)


class Subject(Protocol):
    """What an event is about: a partition or a request (both have these fields)."""

    @property
    def uid(self) -> int: ...
    @property
    def user(self) -> str: ...
    @property
    def device_uuid(self) -> str: ...
    @property
    def memory_bytes(self) -> int: ...


class EventLog:
    """The ``events`` table."""

    def __init__(self, db: sqlite3.Connection, history: History) -> None:
        self._db = db
        self._history = history
        self.generation = 0
        """Bumped on every event this connection writes: a cached plan is stale after it."""

    def record(
        self,
        kind: str,
        *,
        at: float,
        partition: str | None = None,
        subject: Subject | None = None,
        uid: int | None = None,
        user: str | None = None,
        device_uuid: str | None = None,
        memory_bytes: int | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append one event in the caller's transaction.

        ``kind``: an :class:`~chronos.vocabulary.EventKind`; ``partition``: the partition's
        id; ``subject``: the partition or request it is about, whose user, device and bytes
        fill the columns not given (an argument given wins).
        """
        if subject is not None:
            uid = subject.uid if uid is None else uid
            user = subject.user if user is None else user
            device_uuid = subject.device_uuid if device_uuid is None else device_uuid
            memory_bytes = subject.memory_bytes if memory_bytes is None else memory_bytes
        detail = {} if detail is None else detail
        self._db.execute(
            EVENTS.insert_sql,  # written in Event's field order, seq numbered by SQLite
            (at, kind, partition, uid, user, device_uuid, memory_bytes, json.dumps(detail)),
        )
        self.generation += 1
        self._history.count_event(at, kind, partition, user, detail)

    # ------------------------------------------------------------- reading

    def events(
        self, since: float | None, partition_id: str | None, kinds: Sequence[str] | None
    ) -> list[Event]:
        """Events in order (the facade's :meth:`~chronos.ledger.Ledger.events` gives the
        defaults); ``kinds`` filters in SQL (start-up reads only what it acts on,
        not every event of the day)."""
        # A recent window is a range on the `at` index; left to itself SQLite walks every
        # event in seq order to spare the sort (142 ms with 2 million events at start-up).
        recent = since and not partition_id
        sql = f"SELECT {EVENTS.columns} "
        sql += "FROM events INDEXED BY events_at" if recent else "FROM events"
        sql += " WHERE at >= ?"
        args: list[Any] = [since or 0.0]
        if partition_id:
            sql += " AND partition_id = ?"
            args.append(partition_id)
        if kinds is not None:
            sql += f" AND kind IN ({', '.join('?' * len(kinds))})"
            args.extend(kinds)
        return EVENTS.all(self._db.execute(sql + " ORDER BY seq", args))

    def page(
        self, since: float | None, partition_id: str | None, after: int, count: int
    ) -> tuple[list[Event], int | None]:
        """Up to ``count`` events (as :meth:`events` filters them) with ``seq > after``."""
        if after <= 0 and since and not partition_id:
            first = self._db.execute(
                "SELECT MIN(seq) FROM events INDEXED BY events_at WHERE at >= ?", (since,)
            )
            after = max(after, int(first.fetchone()[0] or 1) - 1)
        sql = f"SELECT {EVENTS.columns} FROM events WHERE seq > ? AND +at >= ?"
        args: list[Any] = [after, since or 0.0]
        if partition_id:
            sql += " AND partition_id = ?"
            args.append(partition_id)
        rows = EVENTS.all(self._db.execute(sql + " ORDER BY seq LIMIT ?", (*args, count + 1)))
        more = len(rows) > count
        events = rows[:count]
        return events, (events[-1].seq if more else None)

    def ended_since(self, seq: int) -> tuple[list[str], int]:
        """Ids of partitions ended by events after ``seq``, and the newest seq."""
        # One statement: the ending events, then the newest seq (the daemon asks after
        # every change, and mostly nothing ended).
        found = self._db.execute(
            f"SELECT 0, seq, partition_id FROM events WHERE seq > ? AND kind IN ({_ENDED}) "
            "UNION ALL SELECT 1, MAX(seq), NULL FROM events",
            (seq,),
        ).fetchall()
        ended = [(at_seq, pid) for is_newest, at_seq, pid in found if not is_newest]
        (newest,) = [at_seq for is_newest, at_seq, _ in found if is_newest]
        if not ended:  # nothing ended: move on to the newest event there is
            return [], seq if newest is None else int(newest)
        return [pid for _, pid in ended if pid], max(at_seq for at_seq, _ in ended)

    def last_seq(self, default: int = 0) -> int:
        row = self._db.execute("SELECT MAX(seq) FROM events").fetchone()
        return default if row[0] is None else int(row[0])


class Store(NamedTuple):
    """What the parts that write partitions and tickets share: the one connection (the
    facade's transaction spans them all), the event log and the usage history."""

    db: sqlite3.Connection
    events: EventLog
    history: History
