"""The waiting queue: tickets, their planning, and granting them.

Requests that do not fit now wait as tickets (the ``waiting`` table). Planning
orders them by fair-share priority and runs the conservative-backfill planner
(:func:`chronos.policy.plan_queue`) over what holds each device; the plan says
which tickets fit now and where the others would start, and those starts are
reservations nobody else may take. Methods run inside the facade's transaction.
"""

from __future__ import annotations

import json
from collections.abc import Callable
from dataclasses import asdict
from typing import NamedTuple

from chronos import procs
from chronos.errors import AdmissionRefused, NotFound
from chronos.ledger.events import Store
from chronos.ledger.partitions import OwnerCheck, Partitions
from chronos.ledger.records import TICKETS, Interval, Member, NewPartition, Ticket
from chronos.ledger.schema import insert_sql
from chronos.models import PartitionRecord
from chronos.policy import Waiter, earliest_fit, plan_queue
from chronos.refusals import TooManyWaiting, refusal
from chronos.vocabulary import EventKind, TicketState

PLAN_REUSE_S = 0.5
"""A plan is reused while nothing was written and it is younger than this (time alone
changes only priorities, by the same ageing for everyone)."""

QuotaCheck = Callable[[list[PartitionRecord], float, float, float], None]
"""``check(user's recent partitions, start, end, now)``; raises AdmissionRefused."""
PriorityOf = Callable[[str, float, float], float]
"""``priority(user, waited seconds, user's decayed fair-share usage in GPU-hours)``; lower
goes first."""

_SELECT = f"SELECT {TICKETS.columns} FROM waiting"
_INSERT = insert_sql(
    "waiting",
    ("id", "enqueued_at", "state", "waiter_pid", "waiter_start", "timeout_at", "request"),
)


class QueuePlan(NamedTuple):
    """The queue as planned at one moment."""

    ordered: list[Ticket]
    """Waiting tickets in the order they will be served."""
    grantable: list[Ticket]
    """Those that fit now without delaying any ticket ahead of them."""
    estimated_start: dict[str, float | None]
    """For every ticket not grantable, when it would start (None: beyond the plan)."""


class Queue:
    """The ``waiting`` table."""

    def __init__(
        self,
        store: Store,
        partitions: Partitions,
        owner_alive: OwnerCheck,
        capacity_of: Callable[[Member], int],
    ) -> None:
        self._db, self._events, self._history = store
        self._partitions = partitions
        self._owner_alive = owner_alive
        self._capacity_of = capacity_of
        """Bytes a waiting request may use on its device (the policy in force, read when
        used, so a reload also reaches requests still waiting)."""
        self._waiting: dict[str, Ticket] = {}
        """Waiting tickets as read (see :meth:`waiting`)."""
        self._waiters: dict[str, Waiter] = {}
        """What the planner sees of each waiting ticket (forgotten with the plan)."""
        self._plan_cache: tuple[tuple[object, ...], float, QueuePlan] | None = None

    # ------------------------------------------------------------- writing

    def enqueue(
        self,
        req: NewPartition,
        waiter_pid: int | None,
        timeout_at: float | None,
        max_waiting: int | None,
        now: float,
    ) -> str:
        """Add a ticket for ``req`` and return its id, or raise (and log) a refusal if the
        user already has ``max_waiting`` tickets (counted in the caller's transaction)."""
        if max_waiting is not None:
            mine = sum(1 for t in self.waiting() if t.request.uid == req.uid)
            if mine >= max_waiting:
                raise refusal(TooManyWaiting(req.user, mine, max_waiting))
        # Stored ids stay as they always were: "q" and seven hex digits.
        ticket_id = "q" + self._partitions.new_id()[1:]
        self._db.execute(
            _INSERT,
            (
                ticket_id,
                now,
                TicketState.WAITING,
                waiter_pid,
                procs.start_ticks(waiter_pid) if waiter_pid else None,
                timeout_at,
                json.dumps(asdict(req)),
            ),
        )
        self._events.record(
            EventKind.QUEUED,
            at=now,
            subject=req,
            detail={"ticket": ticket_id, "duration_s": req.duration_s},
        )
        return ticket_id

    def close(self, ticket_id: str, state: TicketState, reason: str, now: float) -> None:
        """A waiting ticket leaves the queue without a partition (no-op if it already left)."""
        ticket = self.ticket(ticket_id)
        if not ticket.is_waiting:
            return
        self._db.execute(
            "UPDATE waiting SET state = ?, reason = ? WHERE id = ?", (state, reason, ticket_id)
        )
        req = ticket.request
        self._events.record(
            EventKind.queue_closed(state),
            at=now,
            subject=req,
            detail={"ticket": ticket_id, "reason": reason},
        )

    def drop_stale(self, now: float) -> int:
        """Close tickets that timed out or whose waiting process exited: they hold no room.
        Returns how many still wait (none: the caller need not plan the queue)."""
        rows = self._db.execute(
            "SELECT id, timeout_at, waiter_pid, waiter_start FROM waiting WHERE state = 'waiting'"
        ).fetchall()
        alive: dict[tuple[int, int | None], bool] = {}  # one look per waiting process
        left = len(rows)
        for ticket_id, timeout_at, pid, start in rows:
            if timeout_at is not None and now >= timeout_at:
                self.close(ticket_id, TicketState.TIMEOUT, "timed out waiting", now)
                left -= 1
                continue
            if pid is None:
                continue
            if (pid, start) not in alive:
                alive[(pid, start)] = self._owner_alive(pid, start)
            if not alive[(pid, start)]:
                self.close(ticket_id, TicketState.CANCELLED, "the waiting process exited", now)
                left -= 1
        return left

    def grant(
        self,
        priority_of: PriorityOf,
        check_for: Callable[[NewPartition], QuotaCheck | None],
        now: float,
    ) -> list[Ticket]:
        """Admit every ticket that fits now without delaying one ahead of it."""
        granted = []
        replan = True
        while replan:  # a refused waiter frees the room the plan gave it: plan again
            replan = False
            for ticket in self.plan(priority_of, now).grantable:
                req = ticket.request
                start, end = now, now + req.duration_s
                check = check_for(req)
                try:
                    if check is not None:
                        check(self._partitions.quota_view(req.uid, now, check), start, end, now)
                except AdmissionRefused as exc:
                    self.close(ticket.id, TicketState.REFUSED, str(exc), now)
                    replan = True
                    continue
                record = self._partitions.admit(req, now, start, end)
                self._db.execute(
                    "UPDATE waiting SET state = 'granted', partition_id = ? WHERE id = ?",
                    (record.id, ticket.id),
                )
                granted.append(ticket)
        return granted

    # ------------------------------------------------------------- reading

    def ticket(self, ticket_id: str) -> Ticket:
        ticket = TICKETS.one(self._db.execute(f"{_SELECT} WHERE id = ?", (ticket_id,)))
        if ticket is None:
            raise NotFound(f"no queued request {ticket_id!r}")
        return ticket

    def any_waiting(self) -> bool:
        row = self._db.execute("SELECT 1 FROM waiting WHERE state = 'waiting' LIMIT 1")
        return row.fetchone() is not None

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
            for ticket in TICKETS.all(self._db.execute(f"{_SELECT} WHERE id IN ({marks})", part)):
                self._waiting[ticket.id] = ticket
        return [self._waiting[i] for i in ids]

    def plan(self, priority_of: PriorityOf, now: float) -> QueuePlan:
        """The queue's order and plan; reused while nothing changed (see PLAN_REUSE_S).

        Costs O(users + waiters) reads: fair-share usage comes from one row per
        user, not from each user's history.
        """
        key = (self._events.generation, self._data_version(), priority_of)
        cached = self._plan_cache
        if cached is not None and cached[0] == key and 0 <= now - cached[1] < PLAN_REUSE_S:
            return cached[2]
        tickets = self.waiting()
        usage = self._history.fairshare_usage(now) if tickets else {}
        keyed = [
            (priority_of(t.request.user, now - t.enqueued_at, usage.get(t.request.uid, 0.0)), t)
            for t in tickets
        ]
        # sorted() is stable and tickets come in enqueue order: ties go to the earlier one.
        ordered = [t for _, t in sorted(keyed, key=lambda k: k[0])]
        devices = {m.device_uuid for t in ordered for m in t.request.members}
        intervals = {uuid: self._partitions.on_device(uuid, now) for uuid in devices}
        plan = plan_queue([self._waiter(t) for t in ordered], intervals, now)
        grant_ids = set(plan.grant)
        grantable = [t for t in ordered if t.id in grant_ids]
        result = QueuePlan(ordered, grantable, plan.estimated_start)
        self._plan_cache = (key, now, result)
        return result

    def invalidate_plan(self) -> None:
        """Forget the cached plan (the policy changed: capacities may differ)."""
        self._plan_cache = None
        self._waiters.clear()

    def reservations(
        self, device_uuid: str, now: float, priority_of: PriorityOf | None = None
    ) -> list[Interval]:
        """Where waiting tickets on ``device_uuid`` would run: nobody may take that room.

        With ``priority_of`` these are the queue's own plan (served in priority
        order), so nothing admitted around them can delay any waiter.
        """
        if priority_of is not None:
            plan = self.plan(priority_of, now)
            starts = [
                (t, nbytes, plan.estimated_start.get(t.id, now))
                for t in plan.ordered
                for nbytes in _bytes_on(t.request, device_uuid)
            ]
            return [
                Interval(s, s + t.request.duration_s, nbytes, t.id)
                for t, nbytes, s in starts
                if s is not None
            ]
        tickets = [t for t in self.waiting() if _bytes_on(t.request, device_uuid)]
        if not tickets:
            return []
        held = self._partitions.on_device(device_uuid, now)
        out: list[Interval] = []
        for t in tickets:  # enqueue order: a direct request never overtakes a waiting one
            req = t.request
            (member,) = [m for m in req.members if m.device_uuid == device_uuid]
            nbytes, capacity = member.memory_bytes, self._capacity_of(member)
            start = earliest_fit(held + out, nbytes, req.duration_s, now, capacity)
            if start is not None:
                out.append(Interval(start, start + req.duration_s, nbytes, t.id))
        return out

    def _data_version(self) -> int:
        """Changes when another connection commits (embedded clients share the file)."""
        return int(self._db.execute("PRAGMA data_version").fetchone()[0])

    def _waiter(self, ticket: Ticket) -> Waiter:
        waiter = self._waiters.get(ticket.id)
        if waiter is None:
            if len(self._waiters) > 2 * len(self._waiting) + 1024:
                self._waiters.clear()
            r = ticket.request
            primary, *others = r.members
            more = tuple((m.device_uuid, m.memory_bytes, self._capacity_of(m)) for m in others)
            waiter = self._waiters[ticket.id] = Waiter(
                ticket.id,
                r.device_uuid,
                r.memory_bytes,
                r.duration_s,
                self._capacity_of(primary),
                more,
            )
        return waiter


def _bytes_on(req: NewPartition, device_uuid: str) -> tuple[int, ...]:
    """What ``req`` asks of GPU ``device_uuid``: one number, or none if it does not use it."""
    return tuple(m.memory_bytes for m in req.members if m.device_uuid == device_uuid)
