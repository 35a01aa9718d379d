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

A partition of several GPUs (a group) is held to each GPU's share separately: the
window runs per (partition, GPU), memory on one GPU never offsets another's, and
a violation on any one GPU names the partition, whose stop ends every process of
the group (one id for the stopper, as at expiry).
"""

from __future__ import annotations

from collections import deque
from collections.abc import Iterable
from dataclasses import dataclass, field

from chronos.models import PartitionRecord, ProcessUse, Share

ShareKey = tuple[str, int]
"""(partition id, device): one GPU's share of a partition, watched on its own."""


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
    """Per partition, all its GPUs together."""
    _over_since: dict[ShareKey, float] = field(default_factory=dict)
    _stray_since: dict[int, float] = field(default_factory=dict)
    _reported: set[str] = field(default_factory=set)
    """``pid:N`` of strays reported."""
    _reported_shares: set[ShareKey] = field(default_factory=set)
    _warned_pids: set[int] = field(default_factory=set)
    _strays: set[tuple[int, int]] = field(default_factory=set)
    window_s: float = WINDOW_S
    _over_spans: dict[ShareKey, deque[tuple[float, float]]] = field(default_factory=dict)
    """Per (partition, GPU): spans between two consecutive samples that were both over."""
    _last_sample: dict[ShareKey, tuple[float, bool]] = field(default_factory=dict)

    def observe(
        self, now: float, records: Iterable[PartitionRecord], processes: Iterable[ProcessUse]
    ) -> list[Violation]:
        """Feed one sample; return what must be stopped now (each reported once)."""
        by_id = {r.id: r for r in records}
        held: dict[ShareKey, list[ProcessUse]] = {
            (r.id, share.device): [] for r in by_id.values() for share in r.shares
        }
        strays: list[ProcessUse] = []
        for proc in processes:
            procs = held.get((proc.partition_id or "", proc.device))
            if procs is not None:
                procs.append(proc)
            else:
                strays.append(proc)  # no partition, or a GPU outside its partition
        out: list[Violation] = []
        for record in by_id.values():
            used = sum(_held(held[(record.id, share.device)]) for share in record.shares)
            self._account(record.id, now, used)
            out.extend(self._check_partition(now, record, held))
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
        self, now: float, record: PartitionRecord, held: dict[ShareKey, list[ProcessUse]]
    ) -> list[Violation]:
        """Each GPU of the partition against its own share; at most one violation.

        Every GPU is checked (each keeps its window), but one violation is reported:
        stopping the partition ends the whole group, whichever GPU was over.
        """
        found = [
            v
            for share in record.shares
            if (v := self._check_share(now, record.id, share, held[(record.id, share.device)]))
        ]
        return found[:1]

    def _check_share(
        self, now: float, partition_id: str, share: Share, procs: list[ProcessUse]
    ) -> Violation | None:
        key = (partition_id, share.device)
        used = _held(procs)
        over = used > share.memory_bytes
        previous = self._last_sample.get(key)
        self._last_sample[key] = (now, over)
        spans = self._over_spans.setdefault(key, deque())
        if over and previous is not None and previous[1] and now > previous[0]:
            spans.append((previous[0], now))
        if not over:
            self._over_since.pop(key, None)
            self._reported_shares.discard(key)
            return None
        since = self._over_since.setdefault(key, now)
        if self._time_over(spans, now) < self.grace_s or key in self._reported_shares:
            return None
        self._reported_shares.add(key)
        spans.clear()  # a new violation needs a new grace's worth of time over
        return Violation(
            "memory",
            partition_id,
            tuple(sorted(p.pid for p in procs)),
            used,
            share.memory_bytes,
            share.device,
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
        for table in (self._over_since, self._over_spans, self._last_sample):
            for key in [k for k in table if k[0] not in open_set]:
                del table[key]
        for pid in list(self._stray_since):
            if pid not in stray_pids:
                del self._stray_since[pid]
                self._reported.discard(f"pid:{pid}")

    def finish(self, partition_id: str) -> PartitionUsage | None:
        """Stop accounting ``partition_id`` (every GPU of it); return what it used."""
        self._reported_shares = {k for k in self._reported_shares if k[0] != partition_id}
        return self.usage.pop(partition_id, None)


def _held(procs: Iterable[ProcessUse]) -> int:
    return sum(p.used_bytes or 0 for p in procs)
