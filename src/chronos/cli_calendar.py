"""``chronos calendar``: partitions, bookings and the queue per GPU on a time axis.

The bar takes what the terminal (80 columns off one) leaves after the labels, so
a row never wraps.
"""

from __future__ import annotations

from typing import Any

from chronos import cli_render as render
from chronos.models import PartitionRecord

LABEL = 2 + 8 + 1 + 8 + 1 + 4 + 2
"""Indent, id, user (cut to 8), share, gap before the bar."""
MIN_BAR = 24


def render_calendar(
    records: list[PartitionRecord],
    waiting: list[dict[str, Any]],
    now: float,
    span: float,
    width: int | None = None,
) -> str:
    width = render.terminal_width() if width is None else width
    bar_width = max(MIN_BAR, width - LABEL)
    end = now + span
    step = span / bar_width
    devices = sorted({d for r in records for d in r.devices} | {d for q in waiting for d in _on(q)})
    lines = [
        f"{render.when(now)} to {render.when(end)}; a column is "
        f"{render.span(step) if step >= 1 else 'under 1s'}",
        "█ active  ▒ booked  ░ queued (estimated)",
    ]
    if not devices:
        lines.append("nothing booked, active or waiting")
    for device in devices:
        lines.append("")
        lines.append(f"GPU {device}".ljust(LABEL) + _axis(now, step, bar_width))
        # A group shows on each of its GPUs (one id): the calendar is per GPU.
        rows = sorted((r for r in records if device in r.devices), key=lambda r: r.starts_at)
        for r in rows:
            mark = "█" if r.starts_at <= now else "▒"
            label = _label(r.id, r.user, r.memory_fraction)
            lines.append(label + _bar(r.starts_at, r.expires_at, now, step, mark, bar_width))
        for q in (q for q in waiting if device in _on(q)):
            start = q["estimated_start"]
            label = _label(q["ticket"], q["user"], q["memory_fraction"])
            # The bar stops 8 columns short, for the word that says it is a request.
            bar = (
                _bar(start, start + q["duration_s"], now, step, "░", bar_width - 8)
                if start
                else "(no estimate)".ljust(bar_width - 8)
            )
            lines.append(label + bar + " waiting")
    return "\n".join(lines)


def _on(q: dict[str, Any]) -> list[int]:
    """A queue entry's GPUs (entries of older daemons name one ``device``)."""
    return list(q.get("devices") or [q["device"]])


def _label(ident: str, user: str, fraction: float) -> str:
    return f"  {ident[:8]:<8} {render.fit(user, 8):<8} {fraction:>4.0%}  "


def _bar(start: float, stop: float, now: float, step: float, mark: str, width: int) -> str:
    cells = []
    for i in range(width):
        lo, hi = now + i * step, now + (i + 1) * step
        cells.append(mark if start < hi and stop > lo else "·")
    return "".join(cells)


def _axis(now: float, step: float, width: int) -> str:
    """Clock labels every 12 columns."""
    out = ""
    for i in range(0, width - 5, 12):
        out += render.clock(now + i * step)[6:].ljust(12)
    return out[:width].rstrip()
