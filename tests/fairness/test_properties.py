"""Property tests of fair sharing: random schedules against invariants, on a fake clock.

A hypothesis state machine drives one :class:`~chronos.service.Service` (the
code the daemon and the embedded client share) with creates that start now,
bookings ahead, waits in the queue, extensions, releases, cancels and clock
advances. After every step the harness does what the daemon does after any
change (reap, then grant waiters until nothing more is granted) and checks:

* capacity: no device is over-committed at any instant, counting each
  device's reservable share (every partition ever admitted, over the span it
  really held the device);
* quotas: no ordinary user's partitions break their limits (share per
  partition, duration, open partitions, total share at once, GPU-hours in
  every rolling day and week);
* queue order: a grant only takes waiters the conservative-backfill plan says
  start now, and never moves the estimated start of a waiter that stays
  behind later; after the grants nothing that could start now is left
  waiting (it is granted as soon as it fits);
* no queue jumping: a create, booking or extension never moves any waiter's
  estimated start later (waiters hold virtual reservations);
* liveness: once nobody asks for anything more and time passes, every waiter
  whose request fits its device is granted (or times out, or is cancelled).
"""

from __future__ import annotations

import os
from typing import Any

from hypothesis import HealthCheck, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, initialize, invariant, rule

from chronos.config import Config
from chronos.models import ACTIVE, BOOKED, PartitionRecord
from chronos.policy import DAY, WEEK

from .support import GPU_BYTES, Harness, caller, make_service

EPS = 1e-6
POLICY: dict[str, Any] = {
    "max_duration": "8h",
    "devices": {"1": {"reservable_share": 0.75}},
    "fairshare": {"half_life": "1d", "age_weight": 0.05},
    "limits": {
        "default": {
            "max_partitions": 3,
            "max_share": 0.9,
            "max_total_share": 1.25,
            "max_gpu_hours_day": 5,
            "max_gpu_hours_week": 12,
            "max_duration": "6h",
        },
        "users": {"carol": {"max_partitions": 6, "max_gpu_hours_day": 9}},
    },
}
USERS = {
    "alice": caller("alice", 2001),
    "bob": caller("bob", 2002),
    "carol": caller("carol", 2003),
    "ops": caller("ops", 2100, admin=True),
}
BY_UID = {c.uid: c for c in USERS.values()}

who = st.sampled_from(sorted(USERS))
# Few distinct values, mostly GPU 0: collisions (and so queues) are what matter here.
devices = st.sampled_from([0, 0, 0, 1])
fractions = st.sampled_from([0.25, 0.5, 0.6, 0.75, 1.0])
durations = st.sampled_from([1800.0, 3600.0, 7200.0, 21600.0])
offsets = st.sampled_from([1800.0, 3600.0, 4 * 3600.0, DAY])
advances = st.sampled_from([600.0, 1800.0, 3600.0, 4 * 3600.0, DAY])
extras = st.sampled_from([600.0, 3600.0, 7200.0])
timeouts = st.sampled_from([None, None, 900.0, 4 * 3600.0])
picks = st.integers(0, 1000)


def effective_end(r: PartitionRecord) -> float:
    """When ``r`` stopped (or will stop) holding its device."""
    if r.state in (ACTIVE, BOOKED):
        return r.expires_at
    return min(r.expires_at, r.ended_at if r.ended_at is not None else r.expires_at)


def max_overlap(intervals: list[tuple[float, float, float]]) -> float:
    """Largest sum of weights of half-open intervals ``[s, e)`` covering one instant."""
    best = 0.0
    for s, _, _ in intervals:
        level = sum(w for s2, e2, w in intervals if s2 <= s < e2)
        best = max(best, level)
    return best


def max_window(intervals: list[tuple[float, float, float]], window: float) -> float:
    """Largest ∫ weight·dt (in hours) over any window ``[lo, lo + window)``.

    The integral is piecewise linear in ``lo``, so its maximum is where a
    window edge meets an interval edge.
    """
    edges = {x for s, e, _ in intervals for x in (s, e)}
    best = 0.0
    for x in edges:
        for lo in (x, x - window):
            hi = lo + window
            total = sum(w * max(0.0, min(hi, e) - max(lo, s)) for s, e, w in intervals)
            best = max(best, total / 3600.0)
    return best


class Schedule(RuleBasedStateMachine):
    """Two simulated GPUs, four users, the daemon's reactions, and every check.

    Subclasses choose the rules (which random schedules to try).
    """

    def __init__(self) -> None:
        super().__init__()
        self.h: Harness = make_service(POLICY)
        self.config: Config = self.h.service.config
        self.steps: list[str] = []

    def teardown(self) -> None:
        try:
            self.drain()
        finally:
            self.h.close()

    # -------------------------------------------------------------- observation

    @property
    def now(self) -> float:
        return self.h.clock.now

    def capacity(self, device: int) -> int:
        return int(GPU_BYTES * self.config.reservable(device))

    def estimates(self) -> dict[str, float | None]:
        """Every waiting ticket's estimated start, in the order the queue serves them."""
        self.drop_stale()
        return {t.id: est for t, est in self.h.ledger.queue(self.h.service.priority)}

    def drop_stale(self) -> None:
        """Close timed-out tickets first, as every grant does, so plans compare like for like."""
        with self.h.ledger.transaction():
            self.h.ledger.parts.queue.drop_stale(self.now)

    def open_records(self) -> list[PartitionRecord]:
        return [r for r in self.h.ledger.partitions() if r.state_at(self.now) in (ACTIVE, BOOKED)]

    def check_not_delayed(self, before: dict[str, float | None], what: str) -> None:
        after = self.estimates()
        for ticket, est in after.items():
            old = before.get(ticket)
            if old is None:
                continue  # new, or had no estimate (never fits)
            assert est is not None and est <= old + EPS, (
                f"{what} moved waiter {ticket} from +{old - self.now:.0f}s to "
                f"{'never' if est is None else f'+{est - self.now:.0f}s'}; steps: {self.steps}"
            )

    # ------------------------------------------------------------------ the daemon

    def settle(self) -> None:
        """What chronosd does after any change: reap, grant until nothing more is granted."""
        while True:
            plan = self.estimates()
            due = {t for t, est in plan.items() if est is not None and est <= self.now}
            granted = self.h.service.grant_waiting()
            states = {t: self.h.ledger.ticket(t).state for t in plan}
            refused = any(s == "refused" for s in states.values())
            for ticket, state in states.items():
                if ticket in due:
                    assert state in ("granted", "refused"), (ticket, state, self.steps)
                elif not refused:  # (a quota refusal at grant time frees room: plan anew)
                    assert state == "waiting", (
                        f"{ticket} was {state} though the plan did not start it now; "
                        f"steps: {self.steps}"
                    )
            if not refused:
                self.check_not_delayed(plan, "a grant")
            if not granted:
                break
        left = {
            t: est for t, est in self.estimates().items() if est is not None and est <= self.now
        }
        assert not left, f"waiters {left} fit now but were not granted; steps: {self.steps}"

    # ------------------------------------------------------------------- actions

    def history(self) -> None:
        """carol comes with a history (3 GPU-hours a day ago), so the queue is not FCFS."""
        self.h.ok(USERS["carol"], "create", device=1, memory=0.5, duration="6h", persist=True)
        self.h.clock.advance(DAY)
        self.steps.append("(carol held half of GPU 1 for 6 h, a day ago)")
        self.settle()

    def do_create(
        self, name: str, device: int, fraction: float, duration: float, offset: float | None = None
    ) -> None:
        before = self.estimates()
        start = None if offset is None else self.now + offset
        reply = self.h.call(
            USERS[name],
            "create",
            device=device,
            memory=fraction,
            duration=duration,
            start=start,
            persist=True,
        )
        verb = "create" if offset is None else f"book at +{offset:.0f}s"
        self.steps.append(
            f"{name} {verb} {device} {fraction} {duration:.0f}s: "
            f"{'ok' if reply['ok'] else reply['error']['message']}"
        )
        if reply["ok"]:
            assert reply["result"]["state"] == (ACTIVE if offset is None else BOOKED)
            self.check_not_delayed(before, f"a {verb.split()[0]}")
        else:
            assert reply["error"]["code"] in ("refused", "bad_request"), reply
        self.settle()

    def do_wait(
        self, name: str, device: int, fraction: float, duration: float, timeout: float | None
    ) -> None:
        reply = self.h.call(
            USERS[name],
            "create",
            device=device,
            memory=fraction,
            duration=duration,
            persist=True,
            wait=True,
            timeout=timeout,
        )
        if reply["ok"]:
            result = reply["result"]
            outcome = result.get("state", "created")
            if outcome == "waiting":
                assert result["ticket"] and "estimated_start" in result
        else:
            outcome = reply["error"]["message"]
            assert reply["error"]["code"] in ("refused", "bad_request"), reply
            assert outcome.startswith("over the") or "more than" in outcome, (
                f"a request refused for capacity should have waited: {outcome}"
            )
        self.steps.append(f"{name} wait {device} {fraction} {duration:.0f}s: {outcome}")
        self.settle()

    def do_extend(self, pick: int, extra: float) -> None:
        records = self.open_records()
        if not records:
            return
        r = records[pick % len(records)]
        before = self.estimates()
        reply = self.h.call(BY_UID[r.uid], "extend", id=r.id, duration=extra)
        self.steps.append(
            f"{r.user} extend {r.id} +{extra:.0f}s: "
            f"{'ok' if reply['ok'] else reply['error']['message']}"
        )
        if reply["ok"]:
            self.check_not_delayed(before, "an extension")
        self.settle()

    def do_release(self, pick: int, by_admin: bool) -> None:
        records = self.open_records()
        if not records:
            return
        r = records[pick % len(records)]
        self.h.ok(USERS["ops"] if by_admin else BY_UID[r.uid], "release", id=r.id)
        self.steps.append(f"release {r.id}")
        self.settle()

    def do_cancel(self, pick: int) -> None:
        tickets = self.h.ledger.waiting()
        if not tickets:
            return
        t = tickets[pick % len(tickets)]
        status = self.h.ok(BY_UID[t.request.uid], "cancel", id=t.id)
        assert status["state"] == "cancelled"
        assert t.id not in {q["ticket"] for q in self.h.queue()}
        self.steps.append(f"cancel {t.id}")
        self.settle()

    def do_advance(self, dt: float) -> None:
        self.steps.append(f"advance {dt:.0f}s")
        self.run_until(self.now + dt)

    def run_until(self, target: float) -> None:
        """Move the clock to ``target``, stopping at every expiry, booking start and timeout."""
        while True:
            upcoming = [t for t in self.deadlines() if self.now < t < target]
            self.h.clock.now = min(upcoming, default=target)
            self.settle()
            self.check_capacity()
            if self.now >= target:
                return

    def deadlines(self) -> list[float]:
        out = []
        for r in self.open_records():
            out.append(r.expires_at)
            if r.starts_at > self.now:
                out.append(r.starts_at)
        out += [t.timeout_at for t in self.h.ledger.waiting() if t.timeout_at is not None]
        return out

    # ------------------------------------------------------------------- invariants

    @invariant()
    def check_capacity(self) -> None:
        records = self.h.ledger.partitions(include_ended=True)
        for device in (0, 1):
            spans = [
                (r.starts_at, effective_end(r), float(r.memory_bytes))
                for r in records
                if r.device == device and effective_end(r) > r.starts_at
            ]
            peak = max_overlap(spans)
            assert peak <= self.capacity(device), (
                f"GPU {device} over-committed: {peak / GPU_BYTES:.3f} of the GPU held at once, "
                f"{self.config.reservable(device)} reservable; steps: {self.steps}"
            )

    @invariant()
    def check_quotas(self) -> None:
        records = self.h.ledger.partitions(include_ended=True)
        for c in USERS.values():
            if c.is_admin:
                continue
            limits = self.config.limits_for(c.user)
            mine = [r for r in records if r.uid == c.uid]
            spans = [
                (r.starts_at, effective_end(r), r.memory_fraction)
                for r in mine
                if effective_end(r) > r.starts_at
            ]
            context = f"{c.user}: {limits}; steps: {self.steps}"
            assert limits.max_partitions is not None
            # "most partitions at once": count the user's partitions held at one instant.
            at_once = max_overlap([(s, e, 1.0) for s, e, _ in spans])
            assert at_once <= limits.max_partitions + EPS, context
            for r in mine:
                assert limits.max_share is not None and limits.max_duration_s is not None
                assert r.memory_fraction <= limits.max_share + EPS, context
                assert r.expires_at - r.starts_at <= limits.max_duration_s + EPS, context
            assert limits.max_total_share is not None
            assert max_overlap(spans) <= limits.max_total_share + EPS, context
            for window, limit in (
                (DAY, limits.max_gpu_hours_day),
                (WEEK, limits.max_gpu_hours_week),
            ):
                assert limit is not None
                used = max_window(spans, window)
                assert used <= limit + EPS, (
                    f"{used:.3f} GPU-h in a {window / 3600:.0f} h window, limit {limit}; {context}"
                )

    # ----------------------------------------------------------------------- liveness

    def drain(self) -> None:
        """Nobody asks for anything more; time passes; every waiter that fits is granted."""
        horizon = self.now + 30 * DAY
        while self.h.ledger.waiting() and self.now < horizon:
            upcoming = [t for t in self.deadlines() if t > self.now]
            if not upcoming:
                break
            self.run_until(min(upcoming))
        stuck = [
            t
            for t in self.h.ledger.waiting()
            if t.request.memory_bytes <= self.capacity(t.request.device)
        ]
        assert not stuck, (
            f"waiters {[t.id for t in stuck]} never granted though nothing else runs "
            f"(open: {[r.id for r in self.open_records()]}); steps: {self.steps}"
        )


class FairShare(Schedule):
    """Anything anyone may do, on both GPUs."""

    @initialize()
    def start(self) -> None:
        self.history()

    @rule(name=who, device=devices, fraction=fractions, duration=durations)
    def create_now(self, name: str, device: int, fraction: float, duration: float) -> None:
        self.do_create(name, device, fraction, duration)

    @rule(name=who, device=devices, fraction=fractions, duration=durations, offset=offsets)
    def book(self, name: str, device: int, fraction: float, duration: float, offset: float) -> None:
        self.do_create(name, device, fraction, duration, offset)

    @rule(name=who, device=devices, fraction=fractions, duration=durations, timeout=timeouts)
    def wait(
        self, name: str, device: int, fraction: float, duration: float, timeout: float | None
    ) -> None:
        self.do_wait(name, device, fraction, duration, timeout)

    @rule(pick=picks, extra=extras)
    def extend(self, pick: int, extra: float) -> None:
        self.do_extend(pick, extra)

    @rule(pick=picks, by_admin=st.booleans())
    def release(self, pick: int, by_admin: bool) -> None:
        self.do_release(pick, by_admin)

    @rule(pick=picks)
    def cancel(self, pick: int) -> None:
        self.do_cancel(pick)

    @rule(dt=advances)
    def advance(self, dt: float) -> None:
        self.do_advance(dt)


class QueueOrder(Schedule):
    """One GPU, few sizes, much waiting: where queue order and reservations matter most.

    carol (with past usage) and ops (with none, and no quotas) compete; alice
    and bob take partitions directly, book ahead and extend around the queue.
    """

    @initialize()
    def start(self) -> None:
        self.history()

    @rule(
        name=st.sampled_from(["alice", "bob"]),
        fraction=st.sampled_from([0.25, 0.5]),
        duration=st.sampled_from([1800.0, 5400.0]),
    )
    def create_now(self, name: str, fraction: float, duration: float) -> None:
        self.do_create(name, 0, fraction, duration)

    @rule(
        name=st.sampled_from(["alice", "ops"]),
        fraction=st.sampled_from([0.25, 0.5]),
        duration=st.sampled_from([1800.0, 3600.0]),
        offset=st.sampled_from([1800.0, 3600.0]),
    )
    def book(self, name: str, fraction: float, duration: float, offset: float) -> None:
        self.do_create(name, 0, fraction, duration, offset)

    @rule(
        name=st.sampled_from(["carol", "ops"]),
        fraction=st.sampled_from([0.5, 0.75, 1.0]),
        duration=st.sampled_from([1800.0, 3600.0]),
    )
    def wait(self, name: str, fraction: float, duration: float) -> None:
        self.do_wait(name, 0, fraction, duration, None)

    @rule(pick=picks, extra=st.sampled_from([1800.0, 3600.0]))
    def extend(self, pick: int, extra: float) -> None:
        self.do_extend(pick, extra)

    @rule(pick=picks)
    def release(self, pick: int) -> None:
        self.do_release(pick, False)

    @rule(dt=st.sampled_from([900.0, 1800.0]))
    def advance(self, dt: float) -> None:
        self.do_advance(dt)


def _settings(examples: int, steps: int) -> settings:
    return settings(
        max_examples=int(os.environ.get("FAIR_EXAMPLES", examples)),
        stateful_step_count=steps,
        deadline=None,
        suppress_health_check=[HealthCheck.too_slow, HealthCheck.filter_too_much],
    )


FairShare.TestCase.settings = _settings(300, 30)
QueueOrder.TestCase.settings = _settings(300, 25)
TestFairShare = FairShare.TestCase
TestQueueOrder = QueueOrder.TestCase
