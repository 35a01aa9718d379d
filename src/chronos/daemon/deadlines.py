"""Acting on time: expiry, warnings, owner death, and SIGTERM → SIGKILL.

One asyncio timer is armed for the earliest thing due (an expiry, a warning,
a booking's start), re-armed after every change, so expiry happens at
``expires_at`` and not at the next tick of a poll. Owner processes are
watched through pidfds, which become readable the moment the process exits.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable
from typing import Any

from chronos import procs
from chronos.attribution import Attributor
from chronos.daemon.log import log
from chronos.ledger import Ended, Ledger
from chronos.models import ACTIVE, EXPIRED, PartitionRecord

OWNER_POLL_S = 0.5
"""Fallback owner check where pidfds are missing (kernels before 5.3)."""


class Deadlines:
    def __init__(self, ledger: Ledger, default_grace_s: Callable[[], float]) -> None:
        self.ledger = ledger
        self.default_grace_s = default_grace_s
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._owner_fds: dict[str, int] = {}
        self._warned: set[str] = {
            e.partition_id for e in ledger.events() if e.kind == "warned" and e.partition_id
        }
        self._kills: dict[str, asyncio.TimerHandle] = {}
        self._poller: asyncio.TimerHandle | None = None
        self._seq = ledger.last_seq()
        """The newest event seen, to notice partitions ended by someone else."""
        self.on_ended: Callable[[list[Ended]], None] = lambda ended: None
        self.after_time: Callable[[], None] = lambda: None

    # ------------------------------------------------------------------ arming

    def changed(self) -> None:
        """Re-read what is due after any change to the ledger."""
        self._process_due(owners=False)

    def _on_time(self) -> None:
        """A timer or an owner's exit: act, then let the daemon react (e.g. grant waiters)."""
        self._process_due(owners=True)
        self.after_time()

    def _process_due(self, owners: bool) -> None:
        # Owner deaths arrive through pidfds (_on_time); a plain change checks only the clock.
        ended = self.ledger.reap(owners=owners)
        ended += self._ended_elsewhere(ended)
        if ended:
            self._on_ended(ended)
            self.on_ended(ended)
        # Only the partitions with an owner or a warning, not every booking: cheap at scale.
        watched = self.ledger.watched()
        self._warn_due(watched)
        self._watch_owners(watched)
        self._arm(watched)

    def _ended_elsewhere(self, reaped: list[Ended]) -> list[Ended]:
        """Partitions ended since the last look other than by this reap.

        A busy daemon may serve a request after a deadline and before its timer:
        that request's reap ends the partition, so act on those here too, or
        their processes would never be stopped. Releases arrive here as well.
        """
        ids, self._seq = self.ledger.ended_since(self._seq)
        done = {e.record.id for e in reaped}
        records = [self.ledger.get(pid_id) for pid_id in dict.fromkeys(ids) if pid_id not in done]
        return [Ended(r, r.end_reason or r.state) for r in records]

    def _arm(self, open_records: list[PartitionRecord]) -> None:
        if self._timer is not None:
            self._timer.cancel()
            self._timer = None
        due = self._next_due(open_records)
        if due is None:
            return
        delay = max(0.0, due - time.time())
        self._timer = self.loop.call_later(delay, self._fire, due)

    def _fire(self, due: float) -> None:
        self._timer = None
        # asyncio may wake a little early; never act before the deadline itself.
        early = due - time.time()
        if early > 0:
            self._timer = self.loop.call_later(early, self._fire, due)
            return
        self._on_time()

    def _next_due(self, watched: list[PartitionRecord]) -> float | None:
        deadline = self.ledger.next_deadline()
        candidates = [] if deadline is None else [deadline]
        candidates += [_warn_at(r) for r in watched if r.warn_s and r.id not in self._warned]
        return min(candidates) if candidates else None

    # ---------------------------------------------------------------- warnings

    def _warn_due(self, open_records: list[PartitionRecord]) -> None:
        now = time.time()
        for r in open_records:
            if not r.warn_s or r.id in self._warned or r.state_at(now) != ACTIVE:
                continue
            if now < _warn_at(r):
                continue
            self._warned.add(r.id)
            sig = getattr(signal, r.warn_signal or "SIGUSR1")
            members = self.members(r)
            sent = procs.signal_all(members, sig)
            self.ledger.log(
                "warned",
                r.id,
                detail={
                    "signal": r.warn_signal,
                    "processes": sent,
                    "seconds_left": round(r.expires_at - now, 3),
                },
            )
            log("warned", partition=r.id, signal=r.warn_signal, processes=sent)

    # ----------------------------------------------------------------- endings

    def members(
        self, record: PartitionRecord, attributor: Attributor | None = None
    ) -> dict[int, int]:
        """Processes of ``record`` to signal (a ``chronos run`` supervisor is not one)."""
        if attributor is None:
            attributor = Attributor([record], self.ledger.attached(record.id))
        pids = attributor.members(record.id)
        if record.kind == "run" and record.owner_pid is not None:
            pids.discard(record.owner_pid)
        return procs.snapshot(pids)

    def _on_ended(self, ended: list[Ended]) -> None:
        to_stop: list[tuple[PartitionRecord, str]] = []
        for item in ended:
            record = item.record
            self._unwatch(record.id)
            if record.state == EXPIRED:
                to_stop.append((record, "expired"))
            elif record.kind == "run" and item.reason.startswith("owner process"):
                # The `chronos run` supervisor died: its command must not run on unreserved.
                to_stop.append((record, "supervisor exited"))
        self.stop_many(to_stop)
        for item in ended:  # after the signals: logging must not delay them
            record = item.record
            lateness = (time.time() - record.expires_at) * 1000 if record.state == EXPIRED else None
            log(
                record.state,
                partition=record.id,
                user=record.user,
                reason=item.reason,
                lateness_ms=None if lateness is None else round(lateness, 3),
            )

    def resume_kills(self, horizon_s: float = 86400.0) -> None:
        """After a restart: send the SIGKILLs a previous daemon had scheduled but not sent."""
        now = time.time()
        for event in self.ledger.events(since=now - horizon_s, kinds=("terminated",)):
            detail = event.detail
            if event.kind != "terminated" or "kill_at" not in detail or not event.partition_id:
                continue
            members = {int(pid): int(ticks) for pid, ticks in detail.get("members", [])}
            alive = {
                pid: ticks for pid, ticks in members.items() if procs.is_same_process(pid, ticks)
            }
            if not alive:
                continue
            record = self.ledger.get(event.partition_id)
            delay = max(0.0, float(detail["kill_at"]) - now)
            self._kills[record.id] = self.loop.call_later(
                delay, self._kill, record, alive, str(detail.get("why", "expired"))
            )

    def stop(self, record: PartitionRecord, why: str, grace: float | None = None) -> int:
        """SIGTERM the partition's processes now, SIGKILL what is left after the grace."""
        return self.stop_many([(record, why)], grace)

    def stop_many(
        self, items: list[tuple[PartitionRecord, str]], grace: float | None = None
    ) -> int:
        """Stop several partitions' processes from one look at the process table.

        All SIGTERMs go out first; the events that record them (and the SIGKILLs
        still due, so a restarted daemon sends them) are written afterwards in one
        transaction, so partitions ending together are not stopped one by one.
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
            sent_total += procs.signal_all(members, signal.SIGTERM)
            wait = grace
            if wait is None:
                wait = record.grace_s if record.grace_s is not None else self.default_grace_s()
            if record.id in self._kills:
                self._kills[record.id].cancel()
            self._kills[record.id] = self.loop.call_later(wait, self._kill, record, members, why)
            if members:
                log(
                    "sigterm", partition=record.id, why=why, processes=sorted(members), grace_s=wait
                )
                events.append(
                    (
                        "terminated",
                        record.id,
                        {
                            "why": why,
                            "signal": "SIGTERM",
                            "processes": sorted(members),
                            "members": sorted(members.items()),
                            "kill_at": time.time() + wait,
                        },
                    )
                )
        self.ledger.log_many(events)
        return sent_total

    def _kill(self, record: PartitionRecord, first: dict[int, int], why: str) -> None:
        self._kills.pop(record.id, None)
        members = {**first, **self.members(record)}
        killed = procs.signal_all(members, signal.SIGKILL)
        if killed:
            log("sigkill", partition=record.id, why=why, processes=killed)
            self.ledger.log(
                "killed", record.id, detail={"why": why, "signal": "SIGKILL", "processes": killed}
            )

    def stop_pids(self, pids: dict[int, None], why: str, grace: float) -> None:
        """SIGTERM processes that belong to no partition, SIGKILL them after ``grace``."""
        members = procs.snapshot(pids)
        procs.signal_all(members, signal.SIGTERM)
        log("sigterm", why=why, processes=sorted(members), grace_s=grace)

        def kill() -> None:
            killed = procs.signal_all(members, signal.SIGKILL)
            if killed:
                log("sigkill", why=why, processes=killed)

        self.loop.call_later(grace, kill)

    # ------------------------------------------------------------ owner death

    def _watch_owners(self, open_records: list[PartitionRecord]) -> None:
        open_ids = set()
        for r in open_records:
            open_ids.add(r.id)
            if r.owner_pid is None or r.id in self._owner_fds:
                continue
            self._watch(r)
        for pid_id in list(self._owner_fds):
            if pid_id not in open_ids:
                self._unwatch(pid_id)

    def _watch(self, record: PartitionRecord) -> None:
        assert record.owner_pid is not None
        pidfd_open = getattr(os, "pidfd_open", None)
        if pidfd_open is None:
            self._poll_owners()
            return
        try:
            fd = pidfd_open(record.owner_pid)
        except OSError:
            self.loop.call_soon(self._on_time)  # already gone
            return
        self._owner_fds[record.id] = fd
        self.loop.add_reader(fd, self._on_time)
        if not procs.is_same_process(record.owner_pid, record.owner_start):
            self.loop.call_soon(self._on_time)  # the PID was reused before we looked

    def _unwatch(self, partition_id: str) -> None:
        fd = self._owner_fds.pop(partition_id, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    def _poll_owners(self) -> None:
        if self._poller is None:

            def tick() -> None:
                self._poller = None
                self._on_time()
                if any(r.owner_pid for r in self.ledger.partitions()):
                    self._poll_owners()

            self._poller = self.loop.call_later(OWNER_POLL_S, tick)

    def close(self) -> None:
        if self._timer is not None:
            self._timer.cancel()
        for pid_id in list(self._owner_fds):
            self._unwatch(pid_id)


def _warn_at(record: PartitionRecord) -> float:
    assert record.warn_s is not None
    return max(record.starts_at, record.expires_at - record.warn_s)
