"""``chronos usage``: who reserved and used what, built from the ledger's history.

The daemon answers from :meth:`chronos.ledger.Ledger.usage_totals` (per-user, per-hour
aggregates kept as history is written, so a report costs hours, not the whole history)
through :func:`usage_rows`; :func:`usage_report` computes the same rows from records and
events, and is what the aggregates are tested against.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from chronos.models import EXPIRED, RELEASED, Event, PartitionRecord
from chronos.policy import gpu_hours
from chronos.vocabulary import EventKind


def usage_report(
    records: Iterable[PartitionRecord],
    events: Iterable[Event],
    since: float,
    now: float,
    user: str | None = None,
) -> list[dict[str, Any]]:
    """One row per user: GPU-hours reserved and used, and how their partitions ended."""
    rows: dict[str, dict[str, Any]] = {}

    def row(name: str) -> dict[str, Any]:
        return rows.setdefault(
            name,
            {
                "user": name,
                "gpu_hours_reserved": 0.0,
                "gpu_hours_used": 0.0,
                "used_measured_partitions": 0,
                "created": 0,
                "released_early": 0,
                "expired": 0,
                "refused": 0,
                "killed_for_memory": 0,
                "queued": 0,
            },
        )

    by_id: dict[str, PartitionRecord] = {}
    for r in records:
        by_id[r.id] = r
        entry = row(r.user)
        entry["gpu_hours_reserved"] += gpu_hours([r], since, now, now)
        if r.created_at >= since:
            entry["created"] += 1
        if r.ended_at is not None and r.ended_at >= since:
            if r.state == RELEASED and r.ended_at < r.expires_at:
                entry["released_early"] += 1
            elif r.state == EXPIRED:
                entry["expired"] += 1
    for e in events:
        if e.user is None:
            continue
        if e.kind in (EventKind.REFUSED, EventKind.QUEUE_REFUSED):
            row(e.user)["refused"] += 1
        elif e.kind == EventKind.QUEUED:
            row(e.user)["queued"] += 1
        elif e.kind == EventKind.MEMORY_EXCEEDED:
            row(e.user)["killed_for_memory"] += 1
        elif e.kind == EventKind.USAGE and e.partition_id in by_id:
            record = by_id[e.partition_id]
            entry = row(record.user)
            byte_seconds = float(e.detail.get("byte_seconds", 0.0))
            entry["gpu_hours_used"] += byte_seconds / record.device_total_bytes / 3600.0
            entry["used_measured_partitions"] += 1
    out = sorted(rows.values(), key=lambda r: -r["gpu_hours_reserved"])
    for entry in out:
        entry["gpu_hours_reserved"] = round(entry["gpu_hours_reserved"], 4)
        entry["gpu_hours_used"] = round(entry["gpu_hours_used"], 4)
    return [e for e in out if user is None or e["user"] == user]


def usage_rows(totals: dict[str, dict[str, float]]) -> list[dict[str, Any]]:
    """Report rows (as :func:`usage_report`) from ``Ledger.usage_totals``."""
    out: list[dict[str, Any]] = [
        {
            "user": name,
            "gpu_hours_reserved": round(t["reserved_h"], 4),
            "gpu_hours_used": round(t["used_h"], 4),
            "used_measured_partitions": int(t["used_measured"]),
            "created": int(t["created"]),
            "released_early": int(t["released_early"]),
            "expired": int(t["expired"]),
            "refused": int(t["refused"]),
            "killed_for_memory": int(t["killed_for_memory"]),
            "queued": int(t["queued"]),
        }
        for name, t in totals.items()
    ]
    out.sort(key=lambda r: (-r["gpu_hours_reserved"], r["user"]))
    return out
