"""``chronos stats``: the GPUs, their partitions and the processes using them."""

from __future__ import annotations

import sys
import time
from typing import Any

from chronos.units import format_bytes


def _mem(value: int | None) -> str:
    return "n/a" if value is None else format_bytes(value)


def render_stats(data: dict[str, Any]) -> str:
    mode = data["mode"]
    where = "chronosd" if mode == "daemon" else "embedded ledger (no daemon running)"
    header = f"mode: {where}; backends: {', '.join(data['backends'])}"
    columns = ["GPU", "NAME", "VENDOR", "TOTAL", "USED", "FREE", "COMMITTED", "PARTITIONS", "UTIL"]
    rows: list[list[str]] = []
    under: list[list[str]] = []
    for d in data["devices"]:
        util = "n/a" if d["utilization_pct"] is None else f"{d['utilization_pct']:.0f}%"
        share = d["committed_bytes"] / d["total_bytes"] if d["total_bytes"] else 0.0
        rows.append(
            [
                str(d["index"]),
                d["name"],
                d["vendor"],
                _mem(d["total_bytes"]),
                _mem(d["used_bytes"]),
                _mem(d["free_bytes"]),
                f"{_mem(d['committed_bytes'])} ({share:.0%})",
                str(d["active_partitions"]),
                util,
            ]
        )
        under.append(_process_lines(d, data.get("per_process_memory", True)))
    widths = [
        max(len(c), *(len(r[i]) for r in rows)) if rows else len(c) for i, c in enumerate(columns)
    ]

    def line(cells: list[str]) -> str:
        return "  ".join(c.ljust(w) for c, w in zip(cells, widths)).rstrip()

    out = [header, "", line(columns)]
    for row, procs in zip(rows, under):
        out.append(line(row))
        out.extend(procs)
    out.extend(_alloc_cap_lines(data.get("alloc_cap", [])))
    return "\n".join(out)


def _alloc_cap_lines(rows: list[dict[str, Any]]) -> list[str]:
    """Per partition: bytes the allocation-time cap library counts, and what NVML sees."""
    if not rows:
        return []
    lines = [
        "",
        f"{'PARTITION':<14} {'USER':<12} {'GPU':>3}  {'SHARE':>10}  "
        f"{'COUNTED (library)':>17}  {'SEEN (NVML)':>11}  {'REFUSED':>7}",
    ]
    for r in rows:
        counted = _mem(r["counted_bytes"])  # n/a: not capped, or not this user's file
        lines.append(
            f"{r['partition_id']:<14} {r['user']:<12} {r['device']:>3}  "
            f"{_mem(r['memory_bytes']):>10}  {counted:>17}  {_mem(r['nvml_bytes']):>11}  "
            f"{'n/a' if r.get('refused') is None else r['refused']:>7}"
        )
    return lines


def _process_lines(d: dict[str, Any], per_process: bool) -> list[str]:
    """The processes holding a GPU's memory, indented under its row."""
    if not per_process:
        return ["    (per-process GPU memory is not available on this GPU)"]
    procs = d.get("processes", [])
    if not procs:
        return []
    lines = [f"    {'PID':>8}  {'USER':<12} {'MEMORY':>10}  {'PARTITION':<14} COMMAND"]
    for p in procs:
        lines.append(
            f"    {p['pid']:>8}  {(p['user'] or '?'):<12} {_mem(p['used_bytes']):>10}  "
            f"{(p['partition_id'] or 'unpartitioned'):<14} {p['command'] or '?'}"
        )
    return lines


def watch_stats(client: Any, interval: float) -> None:
    """Redraw the stats in place (like ``watch``) until Ctrl-C."""
    tty = sys.stdout.isatty()
    try:
        while True:
            text = render_stats(client.transport.call("stats"))
            stamp = time.strftime("%H:%M:%S")
            if tty:
                sys.stdout.write("\x1b[H\x1b[2J")
            sys.stdout.write(f"chronos stats — every {interval:g}s — {stamp}\n{text}\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
