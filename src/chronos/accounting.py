"""``chronos usage``: who reserved and used what, built from the ledger's history."""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from chronos.models import EXPIRED, RELEASED, Event, PartitionRecord
from chronos.policy import gpu_hours


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
        if e.kind in ("refused", "queue_refused"):
            row(e.user)["refused"] += 1
        elif e.kind == "queued":
            row(e.user)["queued"] += 1
        elif e.kind == "memory_exceeded":
            row(e.user)["killed_for_memory"] += 1
        elif e.kind == "usage" and e.partition_id in by_id:
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
