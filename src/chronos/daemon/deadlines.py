"""Acting on time: expiry, warnings, owner death; the stopping itself is the stopper's.

One asyncio timer is armed for the earliest thing due (an expiry, a warning,
a booking's start), re-armed after every change, so expiry happens at
``expires_at`` and not at the next tick of a poll. Owner processes are
watched through pidfds, which become readable the moment the process exits;
where pidfds cannot be had (seccomp, no descriptors left) they are polled.

Robustness rules, each learnt from an attack (issue "Trust"):

* Every timer and reader callback is guarded: an exception (EMFILE, a full
  disk) is logged, and the work is retried shortly after, so the chain of
  timers never silently stops.
* Signals go out before, and independently of, ledger writes: partitions
  due to stop are kept in ``_pending`` until they were signalled, and an
  expiry whose reap cannot be written is signalled all the same.
* Time is the daemon's :class:`SteadyClock`, which a wall-clock step does not move.
* Processes of an expired partition still alive in their grace keep its
  memory committed (the stopper's ``lingering_on``) until they are gone.

Which processes get SIGTERM and SIGKILL, and when, is :mod:`chronos.daemon.stopper`'s
job (``self.stopper``), which the sampler's memory violations use too.
"""

from __future__ import annotations

import asyncio
import os
import signal
import time
from collections.abc import Callable

from chronos import procs
from chronos.config import DEFAULT_MAX_GRACE_S
from chronos.daemon.clock import SteadyClock
from chronos.daemon.log import log
from chronos.daemon.stopper import GENTLE_KINDS, ProcessStopper
from chronos.ledger import Ended, Ledger
from chronos.models import ACTIVE, EXPIRED, PartitionRecord
from chronos.vocabulary import EventKind, Origin

OWNER_POLL_S = 0.5
"""Owner check where pidfds cannot be used (old kernels, seccomp, no descriptors left)."""
RETRY_S = 0.5
"""Delay before a failed timer callback runs again."""
WARNED_SLACK_S = 86400.0
"""How far before an open partition's start its ``warned`` event may lie (clock re-bases)."""
FAILURE_LOG_S = 10.0
"""At most one ``deadline_failed`` log line this often (with how many failures since)."""


class Deadlines:
    def __init__(
        self,
        ledger: Ledger,
        default_grace_s: Callable[[], float],
        max_grace_s: Callable[[], float] = lambda: DEFAULT_MAX_GRACE_S,
        clock: SteadyClock | None = None,
        *,
        on_ended: Callable[[list[Ended]], None] = lambda ended: None,
        after_time: Callable[[], None] = lambda: None,
        holds_gpu: Callable[[int], bool] = lambda pid: False,
    ) -> None:
        """``on_ended(ended)``: told of partitions that ended (the sampler closes their
        usage). ``after_time()``: called after a timer or an owner's exit acted (the
        daemon grants waiters). ``holds_gpu(pid)``: whether a process holds GPU memory
        now (the sampler's last look; a supervisor that does is not spared)."""
        self.ledger = ledger
        self.default_grace_s = default_grace_s
        self.max_grace_s = max_grace_s
        self.clock = clock or SteadyClock()
        if ledger.clock != self.clock.now:  # admission and reaping too: never a stepping clock
            raise ValueError("the ledger must run on this clock: Ledger(clock=clock.now)")
        self.loop = asyncio.get_running_loop()
        self._timer: asyncio.TimerHandle | None = None
        self._retry: asyncio.TimerHandle | None = None
        self._failures = 0
        self._failure_logged_at = -FAILURE_LOG_S
        self._owner_fds: dict[str, int] = {}
        self._polled: set[str] = set()
        """Owner-bound partitions whose owner has no pidfd: checked every OWNER_POLL_S."""
        self._pending: dict[str, tuple[PartitionRecord, str]] = {}
        """Ended partitions whose processes are still to be signalled."""
        self._signalled_early: set[str] = set()
        """Expired partitions signalled while their reap could not be written."""
        self._poller: asyncio.TimerHandle | None = None
        self._warned = self._warned_of_open()
        self._seq = ledger.last_seq()
        """The newest event seen, to notice partitions ended by someone else."""
        self.on_ended = on_ended
        self.after_time = after_time
        self.stopper = ProcessStopper(
            ledger,
            self.clock,
            self._guarded,
            default_grace_s,
            max_grace_s,
            seen_seq=lambda: self._seq,
            freed=lambda: self.after_time(),
            holds_gpu=holds_gpu,
        )
        if not procs.pidfd_usable():
            log(
                "pidfds_unavailable",
                level="warning",
                fallback=f"kill after a fresh check; owners polled every {OWNER_POLL_S}s",
            )

    # ------------------------------------------------------------ start-up state

    def _warned_of_open(self) -> set[str]:
        """Partitions already warned, from the events of the open ones only.

        Read from the oldest open warned-about partition's start on (an indexed
        range), so start-up does not grow with the ledger's age.
        """
        now = self.clock.now()
        due = [r for r in self.ledger.watched() if r.warn_s and r.starts_at <= now]
        if not due:
            return set()
        ids = {r.id for r in due}
        since = min(r.starts_at for r in due) - WARNED_SLACK_S
        return {
            e.partition_id
            for e in self.ledger.events(since, kinds=(EventKind.WARNED,))
            if e.partition_id in ids
        }

    def supervised(self, partition_id: str, pid: int, start: int | None) -> None:
        """The daemon saw ``pid`` attach the child it forked at the ``chronos run`` gate."""
        self.stopper.supervised(partition_id, pid, start)

    def resume_kills(self, horizon_s: float | None = None) -> None:
        """After a restart: send the SIGKILLs a previous daemon had scheduled but not sent."""
        self.stopper.resume_kills(horizon_s)

    # ------------------------------------------------------------------ guards

    def _guarded(self, what: str, action: Callable[[], None]) -> None:
        """Run one callback; if it fails, log it and retry the whole due-check shortly.

        A lasting failure (a full disk) is logged once per FAILURE_LOG_S with a count,
        not at every retry.
        """
        try:
            action()
        except Exception as exc:  # noqa: BLE001 - the timer chain must survive anything
            self._failures += 1
            now = time.monotonic()
            if now - self._failure_logged_at >= FAILURE_LOG_S:
                log(
                    "deadline_failed",
                    level="error",
                    what=what,
                    error=repr(exc),
                    failures=self._failures,
                )
                self._failure_logged_at, self._failures = now, 0
            self._retry_soon()

    def _retry_soon(self) -> None:
        if self._retry is not None:
            return

        def again() -> None:
            self._retry = None
            self._guarded("retry", self._on_time)

        self._retry = self.loop.call_later(RETRY_S, again)

    # ------------------------------------------------------------------ arming

    def changed(self) -> None:
        """Re-read what is due after any change to the ledger."""
        self._guarded("changed", lambda: self._process_due(owners=False))

    def _on_time(self) -> None:
        """A timer or an owner's exit: act, then let the daemon react (e.g. grant waiters)."""
        self._process_due(owners=True)
        self.after_time()

    def _process_due(self, owners: bool) -> None:
        self.check_clock()  # never raises: a failed re-base must not stop expiry
        self._stop_pending()  # what an earlier failure left unsignalled
        # Owner deaths arrive through pidfds (_on_time); a plain change checks only the clock.
        try:
            ended = self.ledger.reap(owners=owners)
        except Exception:
            self._signal_unrecorded_expiries()  # the write failed: the signals must not wait
            raise
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
        # call_later runs on the loop's monotonic clock: the delay is fixed now.
        delay = max(0.0, due - self.clock.now())
        self._timer = self.loop.call_later(delay, self._fire, due)

    def _fire(self, due: float) -> None:
        self._timer = None
        # asyncio may wake a little early; never act before the deadline itself.
        early = due - self.clock.now()
        if early > 0:
            self._timer = self.loop.call_later(early, self._fire, due)
            return
        self._guarded("timer", self._on_time)

    def _next_due(self, watched: list[PartitionRecord]) -> float | None:
        deadline = self.ledger.next_deadline()
        candidates = [] if deadline is None else [deadline]
        candidates += [_warn_at(r) for r in watched if r.warn_s and r.id not in self._warned]
        return min(candidates) if candidates else None

    # ------------------------------------------------------------------ clock

    def check_clock(self) -> None:
        """Notice a wall-clock step and re-base onto it, keeping every remaining time.

        Open partitions are shifted by the step in one transaction (with a
        ``clock_stepped`` event); only then does the daemon's clock follow. If
        that write fails the daemon stays on its steady clock and tries again
        at the next look: deadlines are never acted on from the stepped clock.
        """
        step = self.clock.step()
        if not step:
            return
        try:
            self.ledger.shift_open(step)
        except Exception as exc:  # noqa: BLE001 - retried at the next sample or change
            log("clock_rebase_failed", level="error", step_s=round(step, 3), error=repr(exc))
            return
        self.clock.rebase(step)
        log("clock_stepped", level="warning", step_s=round(step, 3))
        self.loop.call_soon(self.changed)  # the armed timer names a deadline of before

    # ---------------------------------------------------------------- warnings

    def _warn_due(self, open_records: list[PartitionRecord]) -> None:
        now = self.clock.now()
        for r in open_records:
            if not r.warn_s or r.id in self._warned or r.state_at(now) != ACTIVE:
                continue
            if now < _warn_at(r):
                continue
            self._warned.add(r.id)
            sig = getattr(signal, r.warn_signal or "SIGUSR1")
            members = self.stopper.members(r)
            if r.kind in GENTLE_KINDS:  # a Jupyter kernel dies of a SIGUSR1 it does not catch
                members = {p: t for p, t in members.items() if procs.catches(p, sig)}
            sent = procs.signal_all(members, sig)
            log("warned", partition=r.id, signal=r.warn_signal, processes=sent)
            self.ledger.log(
                EventKind.WARNED,
                r.id,
                detail={
                    "signal": r.warn_signal,
                    "processes": sent,
                    "seconds_left": round(r.expires_at - now, 3),
                },
            )

    # ----------------------------------------------------------------- endings

    def _on_ended(self, ended: list[Ended]) -> None:
        for item in ended:
            record = item.record
            self._unwatch(record.id)
            if record.id in self._signalled_early:
                self._signalled_early.discard(record.id)  # signalled before the reap was written
            elif record.state == EXPIRED:
                self._pending[record.id] = (record, "expired")
            elif record.kind == Origin.RUN and item.reason.startswith("owner process"):
                # The `chronos run` supervisor died: its command must not run on unreserved.
                self._pending[record.id] = (record, "supervisor exited")
            if record.id not in self._pending:
                self.stopper.forget_supervisor(record.id)
        self._stop_pending()
        for item in ended:  # after the signals: logging must not delay them
            record = item.record
            now = self.clock.now()
            lateness = (now - record.expires_at) * 1000 if record.state == EXPIRED else None
            log(
                record.state,
                partition=record.id,
                user=record.user,
                reason=item.reason,
                lateness_ms=None if lateness is None else round(lateness, 3),
            )

    def _stop_pending(self) -> None:
        if not self._pending:
            return
        items = list(self._pending.values())
        self.stopper.stop_many(items, ending=True)
        for record, _ in items:
            self._pending.pop(record.id, None)

    def _signal_unrecorded_expiries(self) -> None:
        """The reap could not be written: stop what has expired anyway (read-only)."""
        now = self.clock.now()
        due = [
            (r, "expired")
            for r in self.ledger.partitions()
            if r.expires_at <= now and r.id not in self._signalled_early
        ]
        if due:
            self.stopper.stop_many(due, ending=True)
            self._signalled_early.update(r.id for r, _ in due)

    # ------------------------------------------------------------ owner death

    def _watch_owners(self, open_records: list[PartitionRecord]) -> None:
        open_ids = set()
        for r in open_records:
            open_ids.add(r.id)
            if r.owner_pid is None or r.id in self._owner_fds or r.id in self._polled:
                continue
            self._watch(r)
        for pid_id in list(self._owner_fds) + list(self._polled):
            if pid_id not in open_ids:
                self._unwatch(pid_id)

    def _watch(self, record: PartitionRecord) -> None:
        assert record.owner_pid is not None
        try:
            fd = procs.open_pidfd(record.owner_pid)
        except ProcessLookupError:
            self._polled.add(record.id)  # gone: one look ends it, and it is never re-opened
            self.loop.call_soon(self._guarded, "owner", self._on_time)
            return
        if fd is None:  # no pidfds here, or no descriptor left: poll, never spin
            self._polled.add(record.id)
            self._poll_owners()
            return
        self._owner_fds[record.id] = fd
        self.loop.add_reader(fd, self._guarded, "owner", self._on_time)
        if not procs.is_same_process(record.owner_pid, record.owner_start):
            self.loop.call_soon(self._guarded, "owner", self._on_time)  # PID reused before

    def _unwatch(self, partition_id: str) -> None:
        self._polled.discard(partition_id)
        fd = self._owner_fds.pop(partition_id, None)
        if fd is not None:
            self.loop.remove_reader(fd)
            os.close(fd)

    def _poll_owners(self) -> None:
        if self._poller is None:

            def tick() -> None:
                self._poller = None
                self._guarded("owner poll", self._on_time)
                if self._polled:
                    self._poll_owners()

            self._poller = self.loop.call_later(OWNER_POLL_S, tick)

    def close(self) -> None:
        for handle in (self._timer, self._retry, self._poller):
            if handle is not None:
                handle.cancel()
        self.stopper.close()
        for pid_id in list(self._owner_fds):
            self._unwatch(pid_id)


def _warn_at(record: PartitionRecord) -> float:
    assert record.warn_s is not None
    return max(record.starts_at, record.expires_at - record.warn_s)
