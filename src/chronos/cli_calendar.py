"""``chronos calendar``: partitions, bookings and the queue per GPU on a time axis."""

from __future__ import annotations

from typing import Any

from chronos.models import PartitionRecord
from chronos.units import format_bytes, local_clock

WIDTH = 72


def render_calendar(
    records: list[PartitionRecord], waiting: list[dict[str, Any]], now: float, span: float
) -> str:
    end = now + span
    step = span / WIDTH
    devices = sorted({r.device for r in records} | {q["device"] for q in waiting})
    lines = [
        f"from {local_clock(now)} to {local_clock(end)}; one column = "
        f"{step / 60:.0f} min; █ active  ▒ booked  ░ queued (estimated)"
    ]
    if not devices:
        lines.append("nothing booked, active or waiting")
    for device in devices:
        lines.append("")
        lines.append(f"GPU {device}  {_axis(now, step)}")
        rows = sorted((r for r in records if r.device == device), key=lambda r: r.starts_at)
        for r in rows:
            mark = "█" if r.starts_at <= now else "▒"
            label = f"{r.id} {r.user[:10]:<10} {r.memory_fraction:>4.0%}"
            lines.append(f"  {label}  {_bar(r.starts_at, r.expires_at, now, step, mark)}")
        for q in (q for q in waiting if q["device"] == device):
            start = q["estimated_start"]
            label = f"{q['ticket']} {q['user'][:10]:<10} {q['memory_fraction']:>4.0%}"
            bar = _bar(start, start + q["duration_s"], now, step, "░") if start else "(no estimate)"
            lines.append(f"  {label}  {bar}  waiting, {format_bytes(q['memory_bytes'])}")
    return "\n".join(lines)


def _bar(start: float, stop: float, now: float, step: float, mark: str) -> str:
    cells = []
    for i in range(WIDTH):
        lo, hi = now + i * step, now + (i + 1) * step
        cells.append(mark if start < hi and stop > lo else "·")
    return "".join(cells)


def _axis(now: float, step: float) -> str:
    """Hour labels every 12 columns."""
    out = ""
    for i in range(0, WIDTH, 12):
        out += local_clock(now + i * step)[11:16].ljust(12)
    return out[:WIDTH]
