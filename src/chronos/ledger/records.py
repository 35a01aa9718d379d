"""The ledger's records, and how rows become records and records rows: by column name.

Each table's columns have the names of its record's fields, so a record type names
its columns once (:class:`Rows`): reads select exactly those columns and build the
record by name, and inserts write them from the same list. A column missing from a
query is an error at that query, never a field silently shifted by one.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Callable, Mapping, Sequence
from dataclasses import asdict, dataclass, fields
from operator import attrgetter
from typing import Any, Generic, NamedTuple, TypeVar

from chronos.ledger.schema import insert_sql
from chronos.models import Event, PartitionRecord, Share
from chronos.policy import Interval
from chronos.vocabulary import Origin, TicketState

__all__ = [
    "ATTACHED",
    "EVENTS",
    "PARTITIONS",
    "TICKETS",
    "Attached",
    "Ended",
    "Interval",
    "Member",
    "NewPartition",
    "Rows",
    "Ticket",
]


class Member(NamedTuple):
    """One GPU of a request: where, how much, and what admission may hand out there."""

    device: int
    device_uuid: str
    device_total_bytes: int
    capacity_bytes: int
    memory_bytes: int


@dataclass(frozen=True)
class NewPartition:
    """A validated request, ready for admission: the primary GPU's fields, and a group's
    further GPUs in ``more`` (admitted on every GPU at once or not at all)."""

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
    """A booking's start; ``None``: now (or, for a request that waits, when granted)."""
    owner_pid: int | None = None
    owner_start: int | None = None
    """The owner process (and its start, against PID reuse) whose exit ends the partition;
    ``None``: it persists until released or expired."""
    kind: str = Origin.API
    grace_s: float | None = None
    """SIGTERM to SIGKILL at its end, fixed now: a later policy does not change it."""
    warn_s: float | None = None
    warn_signal: str | None = None
    exempt: bool = False
    """Made by an administrator: quotas do not apply (capacity still does)."""
    series: str | None = None
    """The series of a repeated booking this one belongs to."""
    more: tuple[Member, ...] = ()
    """A group's GPUs past the primary one."""
    placement: str | None = None
    """Why Chronos chose these GPUs (``None``: the user named them)."""

    @property
    def members(self) -> tuple[Member, ...]:
        """Every GPU of the request, the primary first."""
        primary = Member(
            self.device,
            self.device_uuid,
            self.device_total_bytes,
            self.capacity_bytes,
            self.memory_bytes,
        )  # spelled out: every admission reads this, a getattr loop costs a microsecond
        return (primary, *self.more)

    def kept_terms(self) -> dict[str, Any]:
        """The fields the partition record keeps as asked (its GPU, owner, origin, grace,
        warning and series): every field the two types share by name but the start, which
        admission settles (``None`` here means "now")."""
        return {name: getattr(self, name) for name in _KEPT_TERMS}

    @property
    def gpu_equivalents(self) -> float:
        return sum(m.memory_bytes / m.device_total_bytes for m in self.members)


_KEPT_TERMS = tuple(
    f.name
    for f in fields(NewPartition)
    if f.name in {g.name for g in fields(PartitionRecord)} and f.name != "starts_at"
)


@dataclass(frozen=True)
class Ended:
    """A partition the ledger just ended, for whoever must act on it."""

    record: PartitionRecord
    reason: str


@dataclass(frozen=True)
class Attached:
    """A process counted toward a partition (``attach``, or a ``chronos run`` child): what
    its end signals, identified by ``(pid, start_ticks)`` so a reused PID is never hit."""

    partition_id: str
    pid: int
    start_ticks: int | None
    uid: int
    """The uid the process ran as when attached (the partition's owner's, unless an
    administrator attached another user's process)."""


@dataclass(frozen=True)
class Ticket:
    """A queued request and what became of it."""

    id: str
    state: str
    """A :class:`~chronos.vocabulary.TicketState`."""
    enqueued_at: float
    request: NewPartition
    partition_id: str | None = None
    """The partition it was granted, once granted."""
    reason: str | None = None
    """Why it left the queue without one (refused under a new policy, timed out…)."""
    timeout_at: float | None = None
    waiter_pid: int | None = None
    """The process waiting on it (``--wait``): its exit cancels the ticket."""

    @property
    def is_waiting(self) -> bool:
        return self.state == TicketState.WAITING


R = TypeVar("R")


class Rows(Generic[R]):
    """How one record type is read from its table (and written to it), by column name."""

    def __init__(
        self,
        make: Callable[..., R],
        table: str,
        names: Sequence[str],
        convert: Mapping[str, Callable[[Any], Any]] | None = None,
        written: Sequence[str] | None = None,
        store: Mapping[str, Callable[[Any], Any]] | None = None,
    ) -> None:
        """``names``: the record's fields, which are also its columns; ``convert``: how a
        column's stored value becomes the field's (JSON text to a dict, …); ``written``:
        the fields an insert writes (all of them unless the table makes some itself);
        ``store``: how a field's value becomes its column's (the reverse of ``convert``)."""
        self.make = make
        self.table = table
        self.names = tuple(names)
        self.columns = ", ".join(self.names)
        """The column list of a ``SELECT`` that :meth:`all` and :meth:`one` can read."""
        self._convert = dict(convert or {})
        self._builders: dict[tuple[str, ...], Callable[[Sequence[Any]], R]] = {}
        self.written = tuple(written or self.names)
        self.insert_sql = insert_sql(table, self.written)
        self._values = attrgetter(*self.written)
        self._store = [(self.written.index(n), f) for n, f in (store or {}).items()]

    def all(self, cursor: sqlite3.Cursor) -> list[R]:
        build = self._builder(cursor.description)
        return [build(row) for row in cursor]

    def with_rows(self, cursor: sqlite3.Cursor) -> list[tuple[Sequence[Any], R]]:
        """Each row with its record (for columns the record lacks, such as a rowid)."""
        build = self._builder(cursor.description)
        return [(row, build(row)) for row in cursor]

    def one(self, cursor: sqlite3.Cursor) -> R | None:
        row = cursor.fetchone()
        return None if row is None else self._builder(cursor.description)(row)

    def values(self, record: R) -> tuple[Any, ...]:
        """The record's values for :attr:`insert_sql`, in :attr:`written` order."""
        values = tuple(self._values(record))
        if not self._store:
            return values
        stored = list(values)
        for i, to_column in self._store:
            stored[i] = to_column(stored[i])
        return tuple(stored)

    def insert(self, db: sqlite3.Connection, record: R) -> None:
        db.execute(self.insert_sql, self.values(record))

    def _builder(self, description: Sequence[Sequence[Any]]) -> Callable[[Sequence[Any]], R]:
        names = tuple([d[0] for d in description])  # a list first: no generator per column
        build = self._builders.get(names)
        if build is None:
            build = self._builders[names] = self._make_builder(names)
        return build

    def _make_builder(self, names: tuple[str, ...]) -> Callable[[Sequence[Any]], R]:
        """A row-to-record function for a query with columns ``names`` (made once per
        query shape; rows then cost what positional construction costs)."""
        missing = [n for n in self.names if n not in names]
        if missing:
            raise LookupError(f"a query of {self.table} lacks column(s) {', '.join(missing)}")
        make = self.make
        count = len(self.names)
        if names[:count] == self.names:  # the usual shape: the fields first, in order
            converted = [
                (i, self._convert[n]) for i, n in enumerate(self.names) if n in self._convert
            ]
            if not converted:
                return lambda row: make(*row[:count])

            def build_in_order(row: Sequence[Any]) -> R:
                values = list(row[:count])
                for i, conv in converted:
                    values[i] = conv(values[i])
                return make(*values)

            return build_in_order
        at = [names.index(n) for n in self.names]
        converters = [self._convert.get(n) for n in self.names]

        def build(row: Sequence[Any]) -> R:
            return make(
                *[row[i] if conv is None else conv(row[i]) for i, conv in zip(at, converters)]
            )

        return build


def _request(text: str) -> NewPartition:
    data = json.loads(text)
    data["more"] = tuple(Member(*m) for m in data.get("more", ()))
    return NewPartition(**data)


def _shares_from_column(text: str) -> tuple[Share, ...]:
    if text == "[]":  # a partition of one GPU: the usual case, no parsing
        return ()
    return tuple(Share(**s) for s in json.loads(text))


def shares_column(shares: tuple[Share, ...]) -> str:
    """``more_shares`` as stored: JSON, ``[]`` for a partition of one GPU."""
    return json.dumps([asdict(s) for s in shares], separators=(",", ":")) if shares else "[]"


PARTITIONS: Rows[PartitionRecord] = Rows(
    PartitionRecord,
    "partitions",
    [f.name for f in fields(PartitionRecord)],
    convert={"more_shares": _shares_from_column},
    store={"more_shares": shares_column},
)
EVENTS: Rows[Event] = Rows(
    Event,
    "events",
    [f.name for f in fields(Event)],
    convert={"detail": json.loads},
    written=[f.name for f in fields(Event) if f.name != "seq"],  # SQLite numbers them
)
TICKETS: Rows[Ticket] = Rows(
    Ticket, "waiting", [f.name for f in fields(Ticket)], convert={"request": _request}
)
ATTACHED: Rows[Attached] = Rows(Attached, "attached", [f.name for f in fields(Attached)])
