"""The hard memory cap: sample who holds GPU memory, and stop what is over.

:class:`MemoryWatch` is pure decision logic over samples, fed by whoever
samples (the daemon for everyone; ``chronos run`` for itself when no daemon
runs). It never signals anything itself: it returns :class:`Violation`s and
the caller stops them, so the rule is tested without a GPU or real signals.

A partition is over when the memory its processes hold *on its device*
exceeds its bytes for ``grace_s`` in total within a sliding window of
``window_s + grace_s``; one sample over is not enough (allocators spike
briefly while they free and re-allocate), and one sample under does not
forgive either: holding twice the cap for 0.25 s and half of it for 0.12 s,
over and over, once stayed at twice the cap 68 % of the time unstopped. Time
over is counted only between two consecutive samples that are both over, so
it never exceeds the real time over: a single spike shorter than the grace is
always allowed. Memory a partition's process holds on another GPU counts as
unpartitioned use there.
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from chronos.models import PartitionRecord, ProcessUse


@dataclass(frozen=True)
class Violation:
    kind: str
    """``memory`` (a partition over its bytes) or ``unpartitioned``."""
    partition_id: str | None
    pids: tuple[int, ...]
    used_bytes: int
    allowed_bytes: int
    device: int
    over_since: float


@dataclass
class PartitionUsage:
    """What one partition's processes held, accumulated over its life."""

    used_bytes: int = 0
    peak_bytes: int = 0
    byte_seconds: float = 0.0
    last_at: float | None = None


WINDOW_S = 1.0
"""Time over the cap is summed over this window plus the grace."""


@dataclass
class MemoryWatch:
    grace_s: float
    unpartitioned: str = "warn"
    exempt_users: frozenset[str] = frozenset()
    exempt_commands: frozenset[str] = frozenset()
    usage: dict[str, PartitionUsage] = field(default_factory=dict)
    _over_since: dict[str, float] = field(default_factory=dict)
    _stray_since: dict[int, float] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set)
    _warned_pids: set[int] = field(default_factory=set)
    _strays: set[tuple[int, int]] = field(default_factory=set)
    window_s: float = WINDOW_S
    _over_spans: dict[str, deque[tuple[float, float]]] = field(default_factory=dict)
    """Per partition: spans between two consecutive samples that were both over."""
    _last_sample: dict[str, tuple[float, bool]] = field(default_factory=dict)

    def observe(
        self, now: float, records: Iterable[PartitionRecord], processes: Iterable[ProcessUse]
    ) -> list[Violation]:
        """Feed one sample; return what must be stopped now (each reported once)."""
        by_id = {r.id: r for r in records}
        held: dict[str, list[ProcessUse]] = {pid_id: [] for pid_id in by_id}
        strays: list[ProcessUse] = []
        for proc in processes:
            record = by_id.get(proc.partition_id or "")
            if record is not None and proc.device == record.device:
                held[record.id].append(proc)
            else:
                strays.append(proc)
        out = [
            v
            for pid_id, procs in held.items()
            if (v := self._check_partition(now, by_id[pid_id], procs)) is not None
        ]
        out.extend(self._check_strays(now, strays))
        self._strays = {(p.pid, p.device) for p in strays}
        # A stray that freed its memory starts a fresh grace when it takes some again.
        self._forget(by_id.keys(), {p.pid for p in strays if p.used_bytes})
        return out

    def warnings(self, processes: Iterable[ProcessUse]) -> list[ProcessUse]:
        """Unpartitioned processes not reported before (for the ``warn`` policy).

        A process is forgotten once it no longer holds memory, so the set stays as
        small as the GPUs' process lists and a reused PID is reported anew.
        """
        processes = list(processes)
        self._warned_pids &= {p.pid for p in processes if (p.used_bytes or 0) > 0}
        fresh = [
            p
            for p in processes
            if (p.partition_id is None or (p.pid, p.device) in self._strays)
            and not self._exempt(p)
            and p.pid not in self._warned_pids
            and (p.used_bytes or 0) > 0
        ]
        self._warned_pids.update(p.pid for p in fresh)
        return fresh

    def _check_partition(
        self, now: float, record: PartitionRecord, procs: list[ProcessUse]
    ) -> Violation | None:
        used = sum(p.used_bytes or 0 for p in procs)
        self._account(record.id, now, used)
        over = used > record.memory_bytes
        previous = self._last_sample.get(record.id)
        self._last_sample[record.id] = (now, over)
        spans = self._over_spans.setdefault(record.id, deque())
        if over and previous is not None and previous[1] and now > previous[0]:
            spans.append((previous[0], now))
        if not over:
            self._over_since.pop(record.id, None)
            self._reported.discard(record.id)
            return None
        since = self._over_since.setdefault(record.id, now)
        if self._time_over(spans, now) < self.grace_s or record.id in self._reported:
            return None
        self._reported.add(record.id)
        spans.clear()  # a new violation needs a new grace's worth of time over
        return Violation(
            "memory",
            record.id,
            tuple(sorted(p.pid for p in procs)),
            used,
            record.memory_bytes,
            record.device,
            since,
        )

    def _time_over(self, spans: deque[tuple[float, float]], now: float) -> float:
        """Seconds over the cap within the window ending ``now`` (older spans are dropped)."""
        start = now - (self.window_s + self.grace_s)
        while spans and spans[0][1] <= start:
            spans.popleft()
        return sum(end - max(begin, start) for begin, end in spans)

    def _check_strays(self, now: float, strays: list[ProcessUse]) -> list[Violation]:
        if self.unpartitioned != "enforce":
            return []
        out = []
        for proc in strays:
            if self._exempt(proc) or not proc.used_bytes:
                continue
            since = self._stray_since.setdefault(proc.pid, now)
            key = f"pid:{proc.pid}"
            if now - since >= self.grace_s and key not in self._reported:
                self._reported.add(key)
                out.append(
                    Violation(
                        "unpartitioned", None, (proc.pid,), proc.used_bytes, 0, proc.device, since
                    )
                )
        return out

    def _account(self, partition_id: str, now: float, used: int) -> None:
        acc = self.usage.setdefault(partition_id, PartitionUsage())
        if acc.last_at is not None:
            acc.byte_seconds += acc.used_bytes * (now - acc.last_at)
        acc.used_bytes = used
        acc.peak_bytes = max(acc.peak_bytes, used)
        acc.last_at = now

    def _exempt(self, proc: ProcessUse) -> bool:
        if proc.user in self.exempt_users:
            return True
        command = (proc.command or "").split(" ", 1)[0].rsplit("/", 1)[-1]
        return command in self.exempt_commands

    def _forget(self, open_ids: Iterable[str], stray_pids: set[int]) -> None:
        open_set = set(open_ids)
        for pid_id in list(self._over_since):
            if pid_id not in open_set:
                del self._over_since[pid_id]
        for table in (self._over_spans, self._last_sample):
            for pid_id in [k for k in table if k not in open_set]:
                del table[pid_id]
        for pid in list(self._stray_since):
            if pid not in stray_pids:
                del self._stray_since[pid]
                self._reported.discard(f"pid:{pid}")

    def finish(self, partition_id: str) -> PartitionUsage | None:
        """Stop accounting ``partition_id``; return what it used."""
        self._reported.discard(partition_id)
        return self.usage.pop(partition_id, None)
