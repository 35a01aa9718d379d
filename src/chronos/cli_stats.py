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
    lines = [f"mode: {where}; backends: {', '.join(data['backends'])}"]
    for d in data["devices"]:
        util = "n/a" if d["utilization_pct"] is None else f"{d['utilization_pct']:.0f}%"
        lines.append("")
        lines.append(f"GPU {d['index']}  {d['name']}  [{d['vendor']}]  {d['uuid']}")
        lines.append(
            f"  memory  total {_mem(d['total_bytes'])}  used {_mem(d['used_bytes'])}  "
            f"free {_mem(d['free_bytes'])}  util {util}"
        )
        share = d["committed_bytes"] / d["total_bytes"] if d["total_bytes"] else 0.0
        lines.append(
            f"  partitions  {d['active_partitions']} active, committed "
            f"{_mem(d['committed_bytes'])} ({share:.1%}) of {_mem(d['reservable_bytes'])} "
            "reservable"
        )
        procs = d.get("processes", [])
        if not data.get("per_process_memory", True):
            lines.append("  processes  per-process GPU memory is not available on this GPU")
        elif procs:
            lines.append(f"  {'PID':>8}  {'USER':<12} {'MEMORY':>10}  {'PARTITION':<14} COMMAND")
            for p in procs:
                lines.append(
                    f"  {p['pid']:>8}  {(p['user'] or '?'):<12} {_mem(p['used_bytes']):>10}  "
                    f"{(p['partition_id'] or 'unpartitioned'):<14} {p['command'] or '?'}"
                )
        else:
            lines.append("  processes  none")
    return "\n".join(lines)


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
