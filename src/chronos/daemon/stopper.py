"""The daemon's process stopper: SIGTERM → grace → SIGKILL, for every reason it stops.

Whatever ends a process's right to run — its partition's expiry, a dead
``chronos run`` supervisor, a memory violation the sampler found (a partition
over its bytes, or unpartitioned memory under ``unpartitioned = "enforce"``), a
supervisor that stayed after its partition — it is stopped here, by one plan
(:class:`chronos.stopping.Escalation`) driven by asyncio timers. Deadlines
(timers, owners, warnings) and the sampler decide *that* processes must stop;
this module decides *which* (only the partition's user's, sparing a recognised
supervisor), signals them through pidfds, records each stop (``terminated`` and
``killed`` events, so a restarted daemon still sends the SIGKILL), and keeps an
ended partition's memory committed while its processes live out their grace.

An API partition created with ``on_expiry="raise"`` or ``"notify"`` (kinds
``api-raise``/``api-notify``) is stopped gently at its end: what holds no GPU
memory is never signalled; the rest is warned (the process raises or prints for
itself) and gets SIGTERM only if it still holds memory after the grace.
"""

from __future__ import annotations

import asyncio
import signal
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from chronos import procs
from chronos.attribution import Attributor
from chronos.daemon.clock import SteadyClock
from chronos.daemon.log import log
from chronos.ledger import Ledger
from chronos.models import ACTIVE, BOOKED, EXPIRED, Event, PartitionRecord
from chronos.stopping import Escalation, Stage
from chronos.vocabulary import EventKind, Origin

LINGER_MARGIN_S = 1.0
"""Lingering memory counts until this long after the SIGKILL (or the last look)."""
SUPERVISOR_LEFTOVER_S = 10.0
"""A real ``chronos run`` supervisor exits once its command is gone; one still alive this
long after its partition's last SIGKILL was an imitation, and is stopped like a member."""
GENTLE_KINDS = frozenset({Origin.API_RAISE, Origin.API_NOTIFY})
"""Partitions whose processes are warned at the end and signalled only if they keep the GPU."""
FIRST_LOOKS_S = 1.0
"""After a restart, the sampler's first looks come before deciding who still holds memory."""

Guard = Callable[[str, Callable[[], None]], None]
"""Runs a timer callback so that a failure is logged and the due-check retried."""


@dataclass
class Lingering:
    """An ended partition whose processes are still alive (in their SIGTERM grace)."""

    record: PartitionRecord
    members: dict[int, int]
    until: float


class ProcessStopper:
    """Stops processes for the daemon: a partition's end, a memory violation, leftovers."""

    def __init__(
        self,
        ledger: Ledger,
        clock: SteadyClock,
        guarded: Guard,
        default_grace_s: Callable[[], float],
        max_grace_s: Callable[[], float],
        seen_seq: Callable[[], int],
        freed: Callable[[], None] = lambda: None,
        holds_gpu: Callable[[int], bool] = lambda pid: False,
    ) -> None:
        self.ledger = ledger
        self.clock = clock
        self.loop = asyncio.get_running_loop()
        self._guarded = guarded
        self.default_grace_s = default_grace_s
        self.max_grace_s = max_grace_s
        self._seen_seq = seen_seq
        """The newest event the deadlines saw: later ends are not yet lingering here."""
        self._freed = freed
        """Memory held past an end is free now (outside the sampler's pruning): grant waiters."""
        self._kills: dict[str, asyncio.TimerHandle] = {}
        self._lingering: dict[str, Lingering] = {}
        self._supervisors = self._supervised_of_open()
        self._gentle: dict[str, dict[int, int]] = {}
        """Gentle ends in their grace: the processes warned, not yet signalled."""
        self.holds_gpu = holds_gpu
        """Whether a process holds GPU memory now (the sampler's last look)."""

    # ------------------------------------------------------------- supervisors

    def _supervised_of_open(self) -> dict[str, tuple[int, int | None]]:
        """``chronos run`` supervisors the daemon recognised, for partitions still open."""
        runs = {r.id: r for r in self.ledger.watched() if r.kind == Origin.RUN and r.owner_pid}
        if not runs:
            return {}
        since = min(r.created_at for r in runs.values())
        out: dict[str, tuple[int, int | None]] = {}
        for e in self.ledger.events(since, kinds=(EventKind.SUPERVISED,)):
            if e.partition_id in runs:
                r = runs[e.partition_id]
                out[r.id] = (int(e.detail["pid"]), r.owner_start)
        return out

    def supervised(self, partition_id: str, pid: int, start: int | None) -> None:
        """The daemon saw ``pid`` attach the child it forked at the ``chronos run`` gate."""
        self._supervisors[partition_id] = (pid, start)

    def forget_supervisor(self, partition_id: str) -> None:
        self._supervisors.pop(partition_id, None)

    # ----------------------------------------------------------------- members

    def members(
        self, record: PartitionRecord, attributor: Attributor | None = None
    ) -> dict[int, int]:
        """Processes of ``record`` to signal.

        Only the partition's user's processes (or what an administrator attached):
        a process of someone else that got into its cgroup is never signalled.
        The recognised ``chronos run`` supervisor is spared (it reports the end),
        unless it holds GPU memory itself: then it is no supervisor.
        """
        if attributor is None:
            attributor = Attributor([record], self.ledger.attached(record.id))
        pids = attributor.members(record.id)
        supervisor = self._supervisors.get(record.id)
        if (
            supervisor is not None
            and supervisor[0] == record.owner_pid
            and not self.holds_gpu(supervisor[0])
        ):
            pids.discard(supervisor[0])
        return procs.snapshot(attributor.signallable(record.id, pids))

    def _holding(self, members: dict[int, int]) -> dict[int, int]:
        return {pid: ticks for pid, ticks in members.items() if self.holds_gpu(pid)}

    # ---------------------------------------------------------------- stopping

    def stop(self, record: PartitionRecord, why: str, grace: float | None = None) -> int:
        """SIGTERM the partition's processes now, SIGKILL what is left after the grace."""
        return self.stop_many([(record, why)], grace)

    def stop_many(
        self,
        items: list[tuple[PartitionRecord, str]],
        grace: float | None = None,
        ending: bool = False,
    ) -> int:
        """Stop several partitions' processes from one look at the process table.

        All SIGTERMs go out first and every SIGKILL is scheduled; the events that
        record them (so a restarted daemon sends the SIGKILLs) are written
        afterwards in one transaction, and a failing write changes none of it.
        ``ending``: the partitions have ended, so what survives the SIGTERM keeps
        their memory committed until it is gone.
        """
        if not items:
            return 0
        records = [r for r, _ in items]
        attached = [a for a in self.ledger.attached() if a.partition_id in {r.id for r in records}]
        attributor = Attributor(records, attached)
        sent_total = 0
        events: list[tuple[str, str | None, dict[str, Any]]] = []
        for record, why in items:
            members = self.members(record, attributor)
            plan = Escalation(self._grace_of(record, grace))
            if ending and why == "expired" and record.kind in GENTLE_KINDS:
                self._warn_gently(record, members, plan)
                continue
            plan.begin(self.clock.now())
            sent_total += procs.signal_all(members, signal.SIGTERM)
            self._schedule_kill(record, members, why, plan)
            if members:
                if ending:
                    self._linger(record, members, self._due(plan))
                log(
                    "sigterm",
                    partition=record.id,
                    why=why,
                    processes=sorted(members),
                    grace_s=plan.grace_s,
                )
                events.append((EventKind.TERMINATED, record.id, _terminated(why, members, plan)))
        self._record(events)
        return sent_total

    def _grace_of(self, record: PartitionRecord, grace: float | None) -> float:
        wait = grace
        if wait is None:
            wait = record.grace_s if record.grace_s is not None else self.default_grace_s()
        return min(wait, self.max_grace_s())  # a grace set before max_grace existed

    @staticmethod
    def _due(plan: Escalation) -> float:
        assert plan.due_at is not None
        return plan.due_at

    def _schedule_kill(
        self, record: PartitionRecord, members: dict[int, int], why: str, plan: Escalation
    ) -> None:
        if record.id in self._kills:
            self._kills[record.id].cancel()
        self._kills[record.id] = self.loop.call_later(
            max(0.0, self._due(plan) - self.clock.now()),
            self._guarded,
            "kill",
            lambda: self._kill(record, members, why, plan),
        )

    def _record(self, events: list[tuple[str, str | None, dict[str, Any]]]) -> None:
        try:
            self.ledger.log_many(events)
        except Exception as exc:  # noqa: BLE001 - the signals went out; the record is best-effort
            log("event_write_failed", level="error", what="terminated", error=repr(exc))

    def _kill(
        self, record: PartitionRecord, first: dict[int, int], why: str, plan: Escalation
    ) -> None:
        self._kills.pop(record.id, None)
        plan.advance(max(self.clock.now(), self._due(plan)))  # the timer may wake a hair early
        members = {**first, **self.members(record)}
        if record.state not in (ACTIVE, BOOKED):  # its last signal: forget the supervisor
            supervisor = self._supervisors.pop(record.id, None)
            if supervisor is not None:
                self.loop.call_later(
                    SUPERVISOR_LEFTOVER_S,
                    self._guarded,
                    "supervisor",
                    lambda: self._stop_leftover(record, supervisor),
                )
        killed = procs.signal_all(members, signal.SIGKILL)
        if record.id in self._lingering:
            self._lingering[record.id].until = self.clock.now() + LINGER_MARGIN_S
        if killed:
            log("sigkill", partition=record.id, why=why, processes=killed)
            self.ledger.log(
                EventKind.KILLED,
                record.id,
                detail={"why": why, "signal": "SIGKILL", "processes": killed},
            )

    # ---------------------------------------------- gentle end (on_expiry=raise/notify)

    def _warn_gently(
        self, record: PartitionRecord, members: dict[int, int], plan: Escalation
    ) -> None:
        """At the end: signal nothing; SIGTERM after the grace what still holds GPU memory."""
        plan.warn_first = True
        plan.begin(self.clock.now())
        grace = plan.grace_s
        holding = self._holding(members)
        log(
            "expiry_warned",
            partition=record.id,
            holding=sorted(holding),
            spared=sorted(set(members) - set(holding)),
            grace_s=plan.grace_s,
        )
        if holding:
            self._linger(record, holding, self._due(plan) + plan.grace_s)
        self._gentle[record.id] = dict(members)
        self._schedule_gentle(record, plan, self._due(plan))
        # So that a restarted daemon still sends the SIGTERM after the grace.
        detail = {"members": sorted(members.items()), "term_at": plan.due_at, "grace_s": grace}
        self._record([(EventKind.EXPIRY_WARNED, record.id, detail)])

    def _schedule_gentle(self, record: PartitionRecord, plan: Escalation, at: float) -> None:
        self._kills[record.id] = self.loop.call_later(
            max(0.0, at - self.clock.now()),
            self._guarded,
            "kill",
            lambda: self._terminate_holders(record, plan),
        )

    def _terminate_holders(self, record: PartitionRecord, plan: Escalation) -> None:
        """The grace after a gentle end: SIGTERM (then SIGKILL) what still holds the GPU."""
        self._kills.pop(record.id, None)
        self._gentle.pop(record.id, None)
        holding = self._holding(self.members(record))
        if not holding:
            plan.finish()
            # They live on without the GPU (a notebook that freed its tensors): its memory
            # is free for admission now, not when those processes exit hours later.
            log("processes_let_go", partition=record.id)
            if self._lingering.pop(record.id, None) is not None:
                self._freed()
            return
        plan.advance(max(self.clock.now(), self._due(plan)))
        sent = procs.signal_all(holding, signal.SIGTERM)
        why = "expired"  # as metrics count it; the log says that the GPU was kept
        log(
            "sigterm",
            partition=record.id,
            why=why,
            kept_gpu_past_grace=True,
            processes=sorted(holding),
            grace_s=plan.grace_s,
        )
        self._linger(record, holding, self._due(plan))
        self._schedule_kill(record, holding, why, plan)
        if sent:
            self._record([(EventKind.TERMINATED, record.id, _terminated(why, holding, plan))])

    def outside_gentle_grace(self, pids: tuple[int, ...]) -> list[int]:
        """Those of ``pids`` not in a gentle end's grace (with their start time checked).

        After a gentle end its processes' memory is unpartitioned; under
        ``unpartitioned = "enforce"`` the sampler would stop them within its memory
        grace, long before theirs. This stopper SIGTERMs them itself if they keep it.
        """
        warned = {pid: ticks for members in self._gentle.values() for pid, ticks in members.items()}
        return [p for p in pids if p not in warned or not procs.is_same_process(p, warned[p])]

    # ---------------------------------------------------- leftovers, unowned pids

    def _stop_leftover(self, record: PartitionRecord, supervisor: tuple[int, int | None]) -> None:
        pid, start = supervisor
        if not procs.is_same_process(pid, start) or procs.process_uid(pid) != record.uid:
            return
        log("supervisor_stayed", level="warning", partition=record.id, pid=pid)
        self.stop_pids({pid: None}, "supervisor stayed after its partition", grace=1.0)

    def stop_pids(self, pids: dict[int, None], why: str, grace: float) -> None:
        """SIGTERM processes that belong to no partition, SIGKILL them after ``grace``."""
        members = procs.snapshot(pids)
        plan = Escalation(grace)
        plan.begin(self.clock.now())
        procs.signal_all(members, signal.SIGTERM)
        log("sigterm", why=why, processes=sorted(members), grace_s=grace)

        def kill() -> None:
            plan.advance(max(self.clock.now(), self._due(plan)))
            killed = procs.signal_all(members, signal.SIGKILL)
            if killed:
                log("sigkill", why=why, processes=killed)

        self.loop.call_later(grace, self._guarded, "kill", kill)

    # ---------------------------------------------------------------- restarts

    def resume_kills(self, horizon_s: float | None = None) -> None:
        """After a restart: send the SIGKILLs a previous daemon had scheduled but not sent.

        A SIGKILL falls due at most the longest grace after its SIGTERM, so only
        that much history is read (not the whole ledger).
        """
        now = self.clock.now()
        horizon = horizon_s if horizon_s is not None else self.max_grace_s() + 60.0
        events = self.ledger.events(
            now - horizon, kinds=(EventKind.TERMINATED, EventKind.EXPIRY_WARNED)
        )
        self._resume_gentle(events, now)
        for event in events:
            if event.kind != EventKind.TERMINATED:
                continue
            detail = event.detail
            if "kill_at" not in detail or not event.partition_id:
                continue
            members = {int(pid): int(ticks) for pid, ticks in detail.get("members", [])}
            alive = {
                pid: ticks for pid, ticks in members.items() if procs.is_same_process(pid, ticks)
            }
            if not alive:
                continue
            record = self.ledger.get(event.partition_id)
            kill_at = max(now, float(detail["kill_at"]))
            plan = Escalation(0.0, stage=Stage.TERMINATED, due_at=kill_at)
            why = str(detail.get("why", "expired"))
            if record.state == EXPIRED:
                self._linger(record, alive, kill_at)
            self._kills[record.id] = self.loop.call_later(
                kill_at - now,
                self._guarded,
                "kill",
                lambda r=record, a=alive, w=why, p=plan: self._kill(r, a, w, p),
            )

    def _resume_gentle(self, events: list[Event], now: float) -> None:
        """Gentle ends whose SIGTERM-after-the-grace a previous daemon had not yet sent."""
        signalled = {e.partition_id for e in events if e.kind == EventKind.TERMINATED}
        for event in events:
            if event.kind != EventKind.EXPIRY_WARNED or not event.partition_id:
                continue
            if event.partition_id in signalled:
                continue  # sent: the SIGKILL is resumed like any other
            members = {int(pid): int(ticks) for pid, ticks in event.detail.get("members", [])}
            if not any(procs.is_same_process(pid, ticks) for pid, ticks in members.items()):
                continue
            record = self.ledger.get(event.partition_id)
            grace = float(event.detail.get("grace_s", 0.0))
            term_at = float(event.detail["term_at"])
            plan = Escalation(grace, stage=Stage.WARNED, due_at=term_at)
            self._linger(record, members, max(term_at, now) + grace)
            self._gentle[record.id] = members
            self._schedule_gentle(record, plan, max(term_at, now + FIRST_LOOKS_S))

    # -------------------------------------------------------- lingering memory

    def _linger(self, record: PartitionRecord, members: dict[int, int], until: float) -> None:
        self._lingering[record.id] = Lingering(record, dict(members), until + LINGER_MARGIN_S)

    def lingering_on(self, device_uuid: str) -> list[tuple[float, float, int, str]]:
        """Memory of ended partitions whose processes still run, as admission intervals.

        Also partitions that expired since the deadlines last looked (a request's own
        reap can end one just before the fit, before anyone signalled its processes).
        """
        now = self.clock.now()
        out = [
            (entry.record.expires_at, max(entry.until, now + LINGER_MARGIN_S), b, r_id)
            for r_id, entry in self._lingering.items()
            if (b := _share_on(entry.record, device_uuid)) > 0
        ]
        ids, _ = self.ledger.ended_since(self._seen_seq())
        for r_id in dict.fromkeys(ids):
            if r_id in self._lingering:
                continue
            r = self.ledger.get(r_id)
            if r.state == EXPIRED and (b := _share_on(r, device_uuid)) > 0:
                out.append((r.expires_at, now + LINGER_MARGIN_S, b, r.id))
        return out

    def prune_lingering(self) -> bool:
        """Forget ended partitions whose processes are all gone; True if any was forgotten."""
        gone = []
        for r_id, entry in self._lingering.items():
            entry.members = {p: t for p, t in entry.members.items() if procs.is_same_process(p, t)}
            if not entry.members:
                gone.append(r_id)
        for r_id in gone:
            del self._lingering[r_id]
            log("processes_gone", partition=r_id)
        return bool(gone)

    def close(self) -> None:
        for handle in self._kills.values():
            handle.cancel()


def _terminated(why: str, members: dict[int, int], plan: Escalation) -> dict[str, Any]:
    """The ``terminated`` event's detail: enough for a restarted daemon to send the SIGKILL."""
    return {
        "why": why,
        "signal": "SIGTERM",
        "processes": sorted(members),
        "members": sorted(members.items()),
        "kill_at": plan.due_at,
    }


def _share_on(record: PartitionRecord, device_uuid: str) -> int:
    """The bytes ``record`` holds on GPU ``device_uuid`` (0 if none of its shares is there).

    A group's processes linger on every GPU of the group, each with that GPU's share.
    """
    return sum(s.memory_bytes for s in record.shares if s.device_uuid == device_uuid)
