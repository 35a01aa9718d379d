"""The partition ledger: one SQLite database, shared by every process.

:class:`Ledger` is the facade the rest of Chronos uses. It is composed of parts over
one connection, one part per entity (as Slurm's controller gives each entity its own
state save, and rq each lifecycle its own registry):

* :mod:`~chronos.ledger.schema`: tables, migration, the connection, the one
  transaction helper;
* :mod:`~chronos.ledger.partitions`: admission, release, reaping, attachments,
  lingering memory;
* :mod:`~chronos.ledger.queue`: waiting tickets, planning, granting;
* :mod:`~chronos.ledger.events`: the event log;
* :mod:`~chronos.ledger.history`: usage and fair-share aggregates, compaction;
* :mod:`~chronos.ledger.jobs`: batch jobs (``chronos submit``);
* :mod:`~chronos.ledger.records`: the records, and rows to records by column name.

Each public write of the facade is one ``BEGIN IMMEDIATE`` transaction that reaps
first; the parts never open transactions, so a change across tables commits whole.
The ledger knows nothing about callers or sockets; :mod:`chronos.service` decides
who may do what. A refusal comes back with its facts as data
(:mod:`chronos.refusals`). Time comes from an injectable clock so tests never sleep.
"""

from __future__ import annotations

import sqlite3
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any, NamedTuple

from chronos import procs
from chronos.errors import AdmissionRefused, CapacityRefused
from chronos.ledger import schema
from chronos.ledger.events import EventLog, Store
from chronos.ledger.history import MIN_RETENTION_S, History
from chronos.ledger.jobs import Job, Jobs
from chronos.ledger.partitions import Lingering, OwnerCheck, Partitions
from chronos.ledger.queue import PLAN_REUSE_S, PriorityOf, Queue, QuotaCheck
from chronos.ledger.records import Attached, Ended, Interval, Member, NewPartition, Ticket
from chronos.models import Event, PartitionRecord, Share
from chronos.policy import earliest_fit, peak_usage
from chronos.vocabulary import EventKind, RefusalCause, TicketState

SCHEMA_VERSION = schema.SCHEMA_VERSION


class Room(NamedTuple):
    """What GPU placement sees of the ledger, over one request's span ``[start, end)``."""

    peak: Callable[[str], int]
    """The most held at once on a GPU (by uuid) over the span, the queue's room included."""
    mine: Callable[[str], int]
    """How many of the user's partitions hold a share of a GPU over the span."""
    soonest: Callable[[NewPartition], float | None]
    """When a request on given GPUs would fit on all of them at once (for the queue)."""
    start: float
    now: float


Placer = Callable[[Room], NewPartition]
"""Chooses a request's GPUs (``chronos.groups.Placer``), given the :class:`Room`."""

__all__ = [
    "MIN_RETENTION_S",
    "PLAN_REUSE_S",
    "SCHEMA_VERSION",
    "Attached",
    "Ended",
    "Interval",
    "Job",
    "Ledger",
    "LedgerParts",
    "LedgerPolicy",
    "Member",
    "NewPartition",
    "OwnerCheck",
    "Placer",
    "PriorityOf",
    "QuotaCheck",
    "Room",
    "Ticket",
    "earliest_fit",
    "peak_usage",
]


def _as_asked(member: Member) -> int:
    return member.capacity_bytes


def _a_week() -> float:
    return 7 * 86400.0


class LedgerPolicy(NamedTuple):
    """What the ledger asks of the policy in force at each use (the service's, which a
    reload replaces: :func:`chronos.service.ledger_policy`), so requests still waiting
    are planned under the policy of now."""

    capacity_of: Callable[[Member], int] = _as_asked
    """Bytes a request may use on one GPU of it (default: what it was admitted with)."""
    fairshare_half_life: Callable[[], float] = _a_week
    """Half-life of fair-share usage, in seconds."""


AS_ADMITTED = LedgerPolicy()
"""No policy of its own: capacity as admitted, a week's half-life (tests, tools)."""


def _nothing_lingers(device_uuid: str) -> list[Interval]:
    return []


class LedgerParts(NamedTuple):
    """The ledger's parts, for code that writes rows directly inside
    :meth:`Ledger.transaction` (seeding history in tests and benchmarks)."""

    partitions: Partitions
    queue: Queue
    events: EventLog
    history: History


class Ledger:
    """All partitions and their history, in one database file."""

    def __init__(
        self,
        path: Path | str,
        clock: Callable[[], float] = time.time,
        owner_alive: OwnerCheck = procs.is_same_process,
        file_mode: int = 0o666,
        durable: bool = True,
        *,
        reap_owners: bool = True,
        lingering: Lingering = _nothing_lingers,
    ) -> None:
        """``durable=False``: no fsync (a throwaway ledger: tests, benchmark seeds).
        ``reap_owners=False``: reaps do not check owner processes (the daemon has pidfds).
        ``lingering(device_uuid)``: memory of ended partitions whose processes still run
        (the daemon's stopper knows it): admission counts it as committed, so it never
        hands out memory still held."""
        self.path = Path(path)
        self.clock = clock
        self.policy = AS_ADMITTED
        """What it asks of the policy in force: see :meth:`follow_policy`."""
        self.reap_owners = reap_owners
        """Check owner processes on every reap (the daemon does not: it has pidfds)."""
        self._db, self.ledger_id = schema.open_ledger(self.path, file_mode, durable)
        # The parts ask through the facade at each use, so a policy followed later (by
        # the service made on this ledger) reaches them.
        history = History(self._db, lambda: self.policy.fairshare_half_life())
        events = EventLog(self._db, history)
        store = Store(self._db, events, history)
        partitions = Partitions(store, owner_alive, lingering)
        queue = Queue(store, partitions, owner_alive, lambda m: self.policy.capacity_of(m))
        self.parts = LedgerParts(partitions, queue, events, history)
        self._partitions, self._queue, self._events, self._history = self.parts
        self.jobs = Jobs(self._db)
        history.ensure()

    def follow_policy(self, policy: LedgerPolicy) -> None:
        """Ask ``policy`` from now on. The service made on this ledger owns the policy in
        force (a reload replaces its config), so it, not whoever opened the ledger, says
        what capacity and fair share are; no request reaches the ledger before it does."""
        self.policy = policy
        self.invalidate_plan()

    def close(self) -> None:
        self._db.close()

    @contextmanager
    def transaction(self) -> Iterator[None]:
        """One write transaction (what every write of the facade runs in), for writing
        through :attr:`parts` directly."""
        with schema.transaction(self._db):
            yield

    @property
    def connection(self) -> sqlite3.Connection:
        """The SQLite connection, for diagnostics only (a progress handler counting a
        query's work); every write goes through the facade or :attr:`parts`."""
        return self._db

    # ------------------------------------------------------------------ jobs

    def add_job(self, job: Job) -> None:
        """Record a submitted job (one transaction)."""
        with schema.transaction(self._db):
            self.jobs.add(job)

    def update_job(self, job: Job, **changes: Any) -> Job:
        """One step of a job's life (state, pid, exit code…), one transaction."""
        with schema.transaction(self._db):
            return self.jobs.update(job, **changes)

    def job(self, job_id: str) -> Job | None:
        return self.jobs.get(job_id)

    # ------------------------------------------------------------------ writes

    def create(
        self,
        req: NewPartition,
        check: QuotaCheck | None = None,
        priority_of: PriorityOf | None = None,
        will_queue: bool = False,
        place: Placer | None = None,
    ) -> PartitionRecord:
        """Admit and record ``req``, or raise :class:`AdmissionRefused` (and log it).

        ``place``: Chronos chooses the GPUs; it is called inside the transaction with
        what each GPU holds over the span (a :class:`Room`) and returns ``req`` on the
        GPUs it chose, so the choice and the admission are one atomic step.

        ``will_queue``: the caller queues the request if there is no room now, so a
        lack of room is not a refusal (quota refusals are still logged).

        ``check(mine, start, end, now)`` runs inside the transaction with the
        user's recent partitions, so quotas hold under races too. A request
        fits only if it also leaves room for everyone already waiting (where
        the queue, served in ``priority_of`` order, will run them).
        """
        with schema.transaction(self._db):
            now = self.clock()
            self._partitions.reap(now, self.reap_owners)
            # A dead or timed-out waiter holds no room.
            reserved_on = self._reserved_on(self._queue.drop_stale(now) > 0, now, priority_of)
            start = now if req.starts_at is None or req.starts_at <= now else req.starts_at
            end = start + req.duration_s
            refusal: AdmissionRefused | None = None
            try:
                if place is not None:
                    req = place(self._room(req, start, end, now, reserved_on))
                if check is not None:
                    check(self._partitions.quota_view(req.uid, now, check), start, end, now)
                reserved = {m.device_uuid: reserved_on(m.device_uuid) for m in req.members}
                self._partitions.check_room(req, start, end, now, reserved)
            except AdmissionRefused as exc:
                refusal = exc
                # A request the caller will queue is not refused: enqueue() logs "queued".
                if not (will_queue and isinstance(exc, CapacityRefused)):
                    self._log_refused(now, req, exc)
            else:
                record = self._partitions.admit(req, now, start, end)
        if refusal is not None:
            raise refusal
        return record

    def _reserved_on(
        self, anyone_waits: bool, now: float, priority_of: PriorityOf | None
    ) -> Callable[[str], list[Interval]]:
        """Where the queue will run its waiters on a GPU (by uuid), as :meth:`Queue.reservations`
        says; with nobody waiting, nothing, without planning the queue (most creates)."""
        if not anyone_waits:
            return lambda uuid: []
        return lambda uuid: self._queue.reservations(uuid, now, priority_of)

    def _room(
        self,
        req: NewPartition,
        start: float,
        end: float,
        now: float,
        reserved_on: Callable[[str], list[Interval]],
    ) -> Room:
        """What placement may look at, inside the admission transaction."""
        partitions = self._partitions

        def peak(uuid: str) -> int:
            near = partitions.on_device(uuid, now, start, end)
            return peak_usage(near + reserved_on(uuid), start, end)

        mine_open = [r for r in partitions.open_of(req.uid) if r.expires_at > start]
        overlapping = [r for r in mine_open if r.starts_at < end]

        def mine(uuid: str) -> int:
            return sum(1 for r in overlapping if r.share_on(uuid) is not None)

        def soonest(candidate: NewPartition) -> float | None:
            reserved = {m.device_uuid: reserved_on(m.device_uuid) for m in candidate.members}
            return partitions.earliest_fit(candidate, start, now, reserved)

        return Room(peak, mine, soonest, start, now)

    def release(
        self,
        partition_id: str,
        uid: int,
        user: str,
        reason: str = "released",
        *,
        may_end: Callable[[PartitionRecord], None] | None = None,
    ) -> PartitionRecord:
        """End an open partition now (a group: on every GPU at once, it is one row).

        ``may_end(record)``: raises if the caller may not end it (the service's
        authorization), checked on the row this transaction reads, before its state."""
        with schema.transaction(self._db):
            now = self.clock()
            self._partitions.reap(now, self.reap_owners)
            return self._partitions.release(partition_id, now, uid, user, reason, may_end)

    def reap(self, owners: bool | None = None) -> list[Ended]:
        """End every partition that is due (expired, or its owner process died).

        ``owners=False`` skips the owner checks (the daemon learns of owner
        deaths from pidfds, and asks with ``owners=True`` then); the default is
        the ledger's ``reap_owners``.
        """
        check = self.reap_owners if owners is None else owners
        if not self._partitions.anything_due(self.clock(), check):
            return []
        with schema.transaction(self._db):
            return self._partitions.reap(self.clock(), check)

    def attach(
        self, partition_id: str, pid: int, start_ticks: int | None, uid: int, by_uid: int
    ) -> None:
        with schema.transaction(self._db):
            now = self.clock()
            self._partitions.reap(now, self.reap_owners)
            self._partitions.attach(partition_id, pid, start_ticks, uid, by_uid, now)

    def extend_expiry(
        self,
        partition_id: str,
        new_expires_at: float,
        capacity_bytes: int | Callable[[Share], int],
        uid: int,
        user: str,
        priority_of: PriorityOf | None = None,
    ) -> PartitionRecord:
        """Move an open partition's end later, if each of its GPUs has room for it meanwhile.

        Room means room left by other partitions, bookings and the queue's
        reservations: an extension never delays a waiting request. A group extends on
        every GPU or on none. ``capacity_bytes``: what a GPU may hand out (one number
        for all, or per share).
        """
        capacity_of = capacity_bytes if callable(capacity_bytes) else _same_capacity(capacity_bytes)
        with schema.transaction(self._db):
            now = self.clock()
            self._partitions.reap(now, self.reap_owners)
            self._queue.drop_stale(now)
            record = self._partitions.get_open(partition_id)
            reserved = {
                s.device_uuid: self._queue.reservations(s.device_uuid, now, priority_of)
                for s in record.shares
            }
            return self._partitions.extend(
                partition_id, new_expires_at, capacity_of, uid, user, now, reserved
            )

    def shift_open(self, step: float) -> None:
        """Move every open partition by ``step`` seconds: the wall clock stepped (daemon).

        One transaction, so remaining times are kept for all or none; the event
        says by how much, for whoever reads the history across the step.
        """
        with schema.transaction(self._db):
            self._partitions.shift_open(step, self.clock())

    def log_many(self, items: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        """Append several ``(kind, partition_id, detail)`` events in one transaction."""
        if not items:
            return
        with schema.transaction(self._db):
            now = self.clock()
            for kind, partition_id, detail in items:
                self._events.record(kind, at=now, partition=partition_id, detail=detail)

    def log(
        self,
        kind: str,
        partition_id: str | None = None,
        uid: int | None = None,
        user: str | None = None,
        detail: dict[str, Any] | None = None,
    ) -> None:
        """Append an event that changes no partition (a warning, a kill, …)."""
        with schema.transaction(self._db):
            self._events.record(
                kind, at=self.clock(), partition=partition_id, uid=uid, user=user, detail=detail
            )

    def compact(self, before: float, batch: int = 500) -> int:
        """Delete one batch of history older than ``before``; return how many rows went.

        Ended partitions (with their events and attachments), events of no
        partition, and closed queue tickets go; what usage and fair share need
        of them is already in ``usage_hours`` and ``fairshare``. The daemon calls
        this in small batches, each its own short transaction.
        """
        before = min(before, self.clock() - MIN_RETENTION_S)
        with schema.transaction(self._db):
            return self._history.compact(before, batch)

    def _log_refused(self, now: float, req: NewPartition, refusal: AdmissionRefused) -> None:
        """The "refused" event of a request turned away before it got a partition; its
        cause is stored as data beside the sentence (the metrics count causes)."""
        cause = refusal.cause or RefusalCause.capacity()
        self._events.record(
            EventKind.REFUSED,
            at=now,
            subject=req,
            detail={"reason": str(refusal), **cause.to_detail()},
        )

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
        with schema.transaction(self._db):
            now = self.clock()
            try:
                ticket_id = self._queue.enqueue(req, waiter_pid, timeout_at, max_waiting, now)
            except AdmissionRefused as exc:
                refusal = exc
                self._log_refused(now, req, exc)
        if refusal is not None:
            raise refusal
        return self.ticket(ticket_id)

    def ticket(self, ticket_id: str) -> Ticket:
        return self._queue.ticket(ticket_id)

    def cancel(
        self,
        ticket_id: str,
        state: TicketState = TicketState.CANCELLED,
        reason: str = "cancelled",
    ) -> None:
        with schema.transaction(self._db):
            self._queue.close(ticket_id, state, reason, self.clock())

    def waiting(self) -> list[Ticket]:
        """Tickets still waiting, in enqueue order."""
        return self._queue.waiting()

    def grant_waiting(
        self, priority_of: PriorityOf, check_for: Callable[[NewPartition], QuotaCheck | None]
    ) -> list[Ticket]:
        """Admit every queued request that fits now without delaying one ahead of it."""
        if not self._queue.any_waiting():
            return []
        with schema.transaction(self._db):
            now = self.clock()
            self._partitions.reap(now, self.reap_owners)
            self._queue.drop_stale(now)
            return self._queue.grant(priority_of, check_for, now)

    def queue(self, priority_of: PriorityOf) -> list[tuple[Ticket, float | None]]:
        """Waiting requests in the order they will be served, with estimated starts.

        A waiter beyond the planning depth has no estimate (None).
        """
        now = self.clock()
        plan = self._queue.plan(priority_of, now)
        return [(t, plan.estimated_start.get(t.id, now)) for t in plan.ordered]

    def invalidate_plan(self) -> None:
        """Forget the cached plan (the policy changed: capacities may differ)."""
        self._queue.invalidate_plan()

    # ------------------------------------------------------------------- reads

    def get(self, partition_id: str) -> PartitionRecord:
        return self._partitions.get(partition_id)

    def series(self, series: str) -> list[PartitionRecord]:
        """The bookings of a repeated series (``create --repeat``), first start first."""
        return self._partitions.in_series(series)

    def partitions(
        self, include_ended: bool = False, limit: int | None = None
    ) -> list[PartitionRecord]:
        """Partitions as stored: open ones (``include_ended``: every one), oldest first.

        Partitions whose end has passed but that nobody has reaped yet are
        returned with their stored state; :meth:`PartitionRecord.state_at`
        gives the effective one (or ask :meth:`open_at`).
        """
        return self._partitions.stored(include_ended, limit)

    def open_at(self, now: float | None = None, started: bool = False) -> list[PartitionRecord]:
        """Partitions open at ``now`` in effect (their end not passed, reaped or not),
        oldest first; ``started``: only those already started, not bookings to come."""
        return self._partitions.open_at(self.clock() if now is None else now, started)

    def watched(self) -> list[PartitionRecord]:
        """Open partitions a daemon must watch: owner-bound, or with a warning due."""
        return self._partitions.watched()

    def recent(self, since: float, uid: int | None = None) -> list[PartitionRecord]:
        """Every partition (of ``uid``) open now or ended after ``since``, oldest first."""
        return self._partitions.recent(since, uid)

    def partitions_page(
        self, include_ended: bool, after: int, count: int
    ) -> tuple[list[PartitionRecord], int | None]:
        """Up to ``count`` partitions after cursor ``after``, oldest first, and the next
        cursor (None at the end)."""
        return self._partitions.page(include_ended, after, count)

    def ending_by(self, device_uuid: str, when: float) -> list[str]:
        """Ids of open partitions on ``device_uuid`` that end by ``when``, soonest first."""
        return self._partitions.ending_by(device_uuid, when, self.clock())

    def committed_bytes(self, device_uuid: str, now: float | None = None) -> int:
        return self._partitions.committed_bytes(device_uuid, self.clock() if now is None else now)

    def next_deadline(self) -> float | None:
        """The earliest ``expires_at`` (or ``starts_at`` of a booking) still to come."""
        return self._partitions.next_deadline()

    def attached(self, partition_id: str | None = None) -> list[Attached]:
        return self._partitions.attached(partition_id)

    def events(
        self,
        since: float | None = None,
        partition_id: str | None = None,
        kinds: Sequence[str] | None = None,
    ) -> list[Event]:
        """Events in order; ``kinds`` filters in SQL."""
        return self._events.events(since, partition_id, kinds)

    def events_page(
        self, since: float | None, partition_id: str | None, after: int, count: int
    ) -> tuple[list[Event], int | None]:
        """Up to ``count`` events (as :meth:`events` filters them) with ``seq > after``."""
        return self._events.page(since, partition_id, after, count)

    def ended_since(self, seq: int) -> tuple[list[str], int]:
        """Ids of partitions ended by events after ``seq``, and the newest seq."""
        return self._events.ended_since(seq)

    def last_seq(self, default: int = 0) -> int:
        return self._events.last_seq(default)

    def fairshare_usage(self, now: float) -> dict[int, float]:
        """Each user's decayed GPU-hours, from one row per user plus the open partitions."""
        return self._history.fairshare_usage(now)

    def usage_totals(
        self, since: float, now: float, user: str | None = None
    ) -> dict[str, dict[str, float]]:
        """Per user, what :func:`chronos.accounting.usage_report` reports for ``[since, now)``."""
        return self._history.usage_totals(since, now, user)


def _same_capacity(capacity: int) -> Callable[[Share], int]:
    return lambda share: capacity
