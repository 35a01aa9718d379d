"""Aggregates of the ledger's history: usage per user and hour, decayed fair-share usage.

``chronos usage`` and fair-share planning would otherwise read every partition and
event a user ever had. These tables are kept as history is written (in the same
transaction, by :class:`~chronos.ledger.events.EventLog` and
:class:`~chronos.ledger.partitions.Partitions`), so a report costs a few hours' rows
and planning one row per user, however long the history; and old history can be
compacted away without changing either.
"""

from __future__ import annotations

import json
import math
import sqlite3
from collections.abc import Callable
from typing import Any

from chronos.ledger import schema
from chronos.ledger.records import PARTITIONS
from chronos.ledger.schema import OPEN
from chronos.models import PartitionRecord
from chronos.policy import gpu_hours, held_until
from chronos.vocabulary import EventKind, PartitionState

HOUR = 3600.0
MIN_RETENTION_S = 2 * 86400.0
"""History younger than this is never compacted (a restart re-sends the last day's kills)."""
USAGE_COUNTS = (
    "reserved_h",
    "used_h",
    "used_measured",
    "created",
    "released_early",
    "expired",
    "refused",
    "killed_for_memory",
    "queued",
)
_EVENT_COUNTS: dict[str, str] = {
    EventKind.REFUSED: "refused",
    EventKind.QUEUE_REFUSED: "refused",
    EventKind.QUEUED: "queued",
    EventKind.MEMORY_EXCEEDED: "killed_for_memory",
}
_COUNTED_KINDS = ", ".join(f"'{k}'" for k in (*_EVENT_COUNTS, EventKind.USAGE))


class History:
    """The ``usage_hours`` and ``fairshare`` tables, and compaction of old history."""

    def __init__(self, db: sqlite3.Connection, half_life: Callable[[], float]) -> None:
        self._db = db
        self._half_life = half_life
        """Half-life of fair-share usage (the policy in force, read when used)."""

    # ------------------------------------------------------------- writing

    def ensure(self) -> None:
        """Create the aggregates and indexes once, filling them from what exists."""
        if schema.meta(self._db, "history") == schema.HISTORY_VERSION:
            return
        with schema.transaction(self._db):
            if schema.meta(self._db, "history") == schema.HISTORY_VERSION:
                return  # another process did it meanwhile
            for statement in schema.HISTORY_SCHEMA:
                self._db.execute(statement)
            for r in PARTITIONS.all(
                self._db.execute(f"SELECT {PARTITIONS.columns} FROM partitions")
            ):
                self.bump(r.created_at, r.user, created=1)
                if not r.is_open:
                    self.account_end(r)
            for at, kind, pid, user, detail in self._db.execute(
                f"SELECT at, kind, partition_id, user, detail FROM events "
                f"WHERE kind IN ({_COUNTED_KINDS})"
            ).fetchall():
                self.count_event(at, kind, pid, user, json.loads(detail))
            self._db.execute(
                "INSERT OR REPLACE INTO meta VALUES ('history', ?)", (schema.HISTORY_VERSION,)
            )

    def bump(self, at: float, user: str, **counts: float) -> None:
        """Add ``counts`` to ``user``'s row for the hour of ``at``."""
        self._bump_hour(math.floor(at / HOUR), user, counts)

    def _bump_hour(self, hour: int, user: str, counts: dict[str, float]) -> None:
        cols = ", ".join(counts)
        marks = ", ".join("?" * len(counts))
        sets = ", ".join(f"{c} = {c} + excluded.{c}" for c in counts)
        self._db.execute(
            f"INSERT INTO usage_hours (hour, user, {cols}) VALUES (?, ?, {marks}) "
            f"ON CONFLICT (hour, user) DO UPDATE SET {sets}",
            (hour, user, *counts.values()),
        )

    def account_end(self, r: PartitionRecord) -> None:
        """Fold an ended partition into usage_hours and fairshare (same transaction).

        One upsert per hour touched: how it ended counts in its last hour, which is
        usually also the only hour it held (two statements there were one too many)."""
        assert r.ended_at is not None
        per_hour: dict[int, dict[str, float]] = {}
        if counts := _end_counts(r):
            per_hour[math.floor(r.ended_at / HOUR)] = counts
        start, end = r.starts_at, held_until(r, r.ended_at)
        hour = math.floor(start / HOUR)
        while end > start and hour * HOUR < end:
            lo, hi = max(start, hour * HOUR), min(end, (hour + 1) * HOUR)
            reserved = r.gpu_equivalents * (hi - lo) / HOUR
            per_hour.setdefault(math.floor(lo / HOUR), {})["reserved_h"] = reserved
            hour += 1
        for at_hour, hour_counts in per_hour.items():
            self._bump_hour(at_hour, r.user, hour_counts)
        if end <= start:
            return
        self._fold_fairshare(r.uid, r.gpu_equivalents * (end - start) / HOUR, end)
        self._db.execute(
            "INSERT INTO meta VALUES ('longest_held_s', ?) ON CONFLICT (key) DO UPDATE SET "
            "value = MAX(CAST(value AS REAL), CAST(excluded.value AS REAL))",
            (end - start,),
        )

    def count_event(
        self, at: float, kind: str, partition_id: str | None, user: str | None, detail: Any
    ) -> None:
        """Fold one new event into ``usage_hours`` (only the kinds a report counts)."""
        if user is None or (kind not in _EVENT_COUNTS and kind != EventKind.USAGE):
            return
        total = None
        if kind == EventKind.USAGE:
            row = self._db.execute(
                "SELECT user, device_total_bytes FROM partitions WHERE id = ?", (partition_id,)
            ).fetchone()
            if row is None:
                return
            user, total = row
        counts = _event_counts(kind, detail, total)
        if counts:
            assert user is not None
            self.bump(at, user, **counts)

    def _fold_fairshare(self, uid: int, hours: float, at: float) -> None:
        """Add ``hours`` that ended at ``at`` to the user's decayed total."""
        half_life = self._half_life()
        row = self._db.execute(
            "SELECT value, as_of FROM fairshare WHERE uid = ?", (uid,)
        ).fetchone()
        if row is None:
            value, as_of = hours, at
        elif at >= row[1]:
            value, as_of = row[0] * 0.5 ** ((at - row[1]) / half_life) + hours, at
        else:
            value, as_of = row[0] + hours * 0.5 ** ((row[1] - at) / half_life), row[1]
        self._db.execute(
            "INSERT OR REPLACE INTO fairshare (uid, value, as_of) VALUES (?, ?, ?)",
            (uid, value, as_of),
        )

    def compact(self, before: float, batch: int) -> int:
        """Delete one batch of history older than ``before`` (inside the caller's transaction).

        Ended partitions (with their events and attachments), events of no
        partition, and closed queue tickets go; what usage and fair share need
        of them is already in ``usage_hours`` and ``fairshare``.
        """
        ids = [
            r[0]
            for r in self._db.execute(
                f"SELECT id FROM partitions WHERE ended_at < ? AND NOT {OPEN} "
                "ORDER BY ended_at LIMIT ?",
                (before, batch),
            )
        ]
        marks = ", ".join("?" * len(ids))
        gone = 0
        if ids:
            self._db.execute(f"DELETE FROM attached WHERE partition_id IN ({marks})", ids)
            gone += self._db.execute(
                f"DELETE FROM events WHERE partition_id IN ({marks})", ids
            ).rowcount
            gone += self._db.execute(f"DELETE FROM partitions WHERE id IN ({marks})", ids).rowcount
        gone += self._db.execute(
            "DELETE FROM events WHERE seq IN (SELECT seq FROM events WHERE at < ? "
            "AND partition_id IS NULL ORDER BY at LIMIT ?)",
            (before, batch),
        ).rowcount
        gone += self._db.execute(
            "DELETE FROM waiting WHERE id IN (SELECT id FROM waiting WHERE state != "
            "'waiting' AND enqueued_at < ? ORDER BY enqueued_at LIMIT ?)",
            (before, batch),
        ).rowcount
        return gone

    # ------------------------------------------------------------- reading

    def fairshare_usage(self, now: float) -> dict[int, float]:
        """Each user's decayed GPU-hours (policy.decayed_usage) from one row per user plus
        the open partitions: what planning needs, at a cost that does not grow with history."""
        half_life = self._half_life()
        out = {
            int(uid): float(value) * 0.5 ** ((now - as_of) / half_life)
            for uid, value, as_of in self._db.execute("SELECT uid, value, as_of FROM fairshare")
        }
        # Only those begun count (bookings ahead, often thousands, are left in SQLite).
        for uid, start, expires, nbytes, total, more in self._db.execute(
            "SELECT uid, starts_at, expires_at, memory_bytes, device_total_bytes, more_shares "
            f"FROM partitions WHERE {OPEN} AND starts_at < ?",
            (now,),
        ):
            end = min(expires, now)
            if end > start:
                gpus = nbytes / total + _more_gpu_equivalents(more)
                hours = gpus * (end - start) / HOUR
                out[uid] = out.get(uid, 0.0) + hours * 0.5 ** ((now - end) / half_life)
        return out

    def usage_totals(
        self, since: float, now: float, user: str | None = None
    ) -> dict[str, dict[str, float]]:
        """Per user, what :func:`chronos.accounting.usage_report` reports for ``[since, now)``.

        Whole hours come from ``usage_hours`` (kept as history is written); only
        the part of the first hour after ``since`` is read from partitions and
        events, and open partitions are added as they stand. The work is a few
        hours' rows per user, however long the history.
        """
        first_hour = math.ceil(since / HOUR)
        totals: dict[str, dict[str, float]] = {}

        def add(name: str, key: str, value: float) -> None:
            if user is not None and name != user:
                return
            row = totals.setdefault(name, dict.fromkeys(USAGE_COUNTS, 0.0))
            row[key] += value

        sums = ", ".join(f"SUM({c})" for c in USAGE_COUNTS)
        for name, *values in self._db.execute(
            f"SELECT user, {sums} FROM usage_hours WHERE hour >= ? GROUP BY user", (first_hour,)
        ):
            for key, value in zip(USAGE_COUNTS, values, strict=True):
                add(name, key, float(value or 0.0))
        head_end = min(first_hour * HOUR, now)
        if head_end > since:
            self._usage_head(since, head_end, now, add)
        open_now = PARTITIONS.all(
            self._db.execute(f"SELECT {PARTITIONS.columns} FROM partitions WHERE {OPEN}")
        )
        for r in open_now:
            add(r.user, "reserved_h", gpu_hours([r], since, now, now))
        return totals

    def _usage_head(
        self, since: float, until: float, now: float, add: Callable[[str, str, float], None]
    ) -> None:
        """What falls in ``[since, until)`` (less than an hour), from the raw history."""
        for (name,) in self._db.execute(  # each partition's "created" event is at created_at
            "SELECT user FROM events WHERE at >= ? AND at < ? AND kind = 'created'", (since, until)
        ):
            add(name, "created", 1)
        ended_then = PARTITIONS.all(
            self._db.execute(
                f"SELECT {PARTITIONS.columns} FROM partitions WHERE ended_at >= ? "
                f"AND ended_at < ? AND NOT {OPEN}",
                (since, until),
            )
        )
        for r in ended_then:
            for key, value in _end_counts(r).items():
                add(r.user, key, value)
        # Ended partitions held in [since, until) ended after since, and before until plus
        # the longest any partition was held: a window of the ended_at index.
        longest = schema.meta_float(self._db, "longest_held_s")
        held_then = PARTITIONS.all(
            self._db.execute(
                f"SELECT {PARTITIONS.columns} FROM partitions WHERE ended_at > ? "
                f"AND ended_at < ? AND NOT {OPEN}",
                (since, until + longest + 1.0),
            )
        )
        for r in held_then:
            add(r.user, "reserved_h", gpu_hours([r], since, until, now))
        for kind, name, detail, total in self._db.execute(
            "SELECT e.kind, COALESCE(p.user, e.user), e.detail, p.device_total_bytes "
            "FROM events e LEFT JOIN partitions p ON p.id = e.partition_id "
            f"WHERE e.at >= ? AND e.at < ? AND e.kind IN ({_COUNTED_KINDS}) "
            "AND e.user IS NOT NULL",
            (since, until),
        ):
            for key, value in _event_counts(kind, json.loads(detail), total).items():
                add(name, key, value)


def _more_gpu_equivalents(more_shares: str) -> float:
    """A group's further shares in GPU-equivalents, from the stored column."""
    if more_shares == "[]":
        return 0.0
    return float(sum(s["memory_bytes"] / s["device_total_bytes"] for s in json.loads(more_shares)))


def _end_counts(r: PartitionRecord) -> dict[str, float]:
    """How an ended partition counts in usage: released early, or expired."""
    assert r.ended_at is not None
    if r.state == PartitionState.RELEASED and r.ended_at < r.expires_at:
        return {"released_early": 1}
    if r.state == PartitionState.EXPIRED:
        return {"expired": 1}
    return {}


def _event_counts(kind: str, detail: Any, device_total_bytes: int | None) -> dict[str, float]:
    """How an event counts in usage (``usage`` needs its partition's device size)."""
    if kind in _EVENT_COUNTS:
        return {_EVENT_COUNTS[kind]: 1}
    if kind == EventKind.USAGE and device_total_bytes:
        byte_seconds = float(detail.get("byte_seconds", 0.0))
        return {"used_h": byte_seconds / device_total_bytes / HOUR, "used_measured": 1}
    return {}
