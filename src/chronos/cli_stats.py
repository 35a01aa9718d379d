"""``chronos stats``: the GPUs, their partitions and the processes using them.

Free of click and of the API: the fast path (cli_fast.py) renders with it too.
"""

from __future__ import annotations

import json
import sys
import time

from chronos import cli_render as render

TYPE_CHECKING = False  # typing and collections stay unimported on the fast path
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any


def select(data: dict[str, Any], devices: Sequence[int]) -> list[dict[str, Any]]:
    """The devices asked for (all when none are named); an unknown index is an error."""
    rows: list[dict[str, Any]] = data["devices"]
    if not devices:
        return rows
    known = {d["index"] for d in rows}
    missing = sorted(set(devices) - known)
    if missing:
        from chronos.errors import BadRequest

        raise BadRequest(
            f"no GPU {', '.join(map(str, missing))} (this machine has "
            f"{', '.join(str(i) for i in sorted(known)) or 'none'})"
        )
    return [d for d in rows if d["index"] in devices]


def stats_json(data: dict[str, Any], devices: Sequence[int] = ()) -> list[dict[str, Any]]:
    """One object per GPU, each naming the mode (daemon or embedded) and its backend.

    A list, as it always was, so scripts written against it keep working; the mode
    and the per-process flag ride on every row.
    """
    return [
        {**d, "mode": data["mode"], "per_process_memory": data.get("per_process_memory", True)}
        for d in select(data, devices)
    ]


def render_stats(
    data: dict[str, Any], devices: Sequence[int] = (), colour: bool | None = None
) -> str:
    colour = render.use_colour() if colour is None else colour
    mode = data["mode"]
    where = "chronosd" if mode == "daemon" else "embedded ledger (no daemon running)"
    header = f"mode: {where}; backends: {', '.join(data['backends'])}"
    columns = render.columns(
        ">GPU",
        render.Column("NAME", squeeze=True, min_width=8),
        ">TOTAL|>USED|>FREE|>COMMITTED|>SHARE|>PARTS|>UTIL",
    )
    width = render.table_width()
    out = [header, ""]
    chosen = select(data, devices)
    rows, colours = [], []
    for d in chosen:
        share = d["committed_bytes"] / d["total_bytes"] if d["total_bytes"] else 0.0
        util = d["utilization_pct"]
        rows.append(
            [
                str(d["index"]),
                d["name"],
                render.size(d["total_bytes"]),
                render.size(d["used_bytes"]),
                render.size(d["free_bytes"]),
                render.size(d["committed_bytes"]),
                f"{share:.0%}",
                str(d["active_partitions"]),
                "n/a" if util is None else f"{util:.0f}%",
            ]
        )
        load = render.load_colour(share)
        colours.append(
            [None, None, None, None, None, load, load, None]
            + [None if util is None else render.load_colour(util / 100)]
        )
    lines = render.table(columns, rows, width=width, colours=colours if colour else None)
    table_lines = lines.split("\n")
    out.append(table_lines[0])
    for n, d in enumerate(chosen):
        out.append(table_lines[n + 1])
        out.extend(_process_lines(d, data.get("per_process_memory", True), width, colour))
    out.extend(_alloc_cap_lines(data.get("alloc_cap", []), width))
    return "\n".join(out)


def _alloc_cap_lines(rows: list[dict[str, Any]], width: int | None) -> list[str]:
    """Per partition: bytes the allocation-time cap library counts, and what NVML sees."""
    if not rows:
        return []
    # COUNTED is n/a where the library does not cap the partition.
    columns = render.columns("PARTITION|~USER|>GPU|>SHARE|>COUNTED (library)|>SEEN (NVML)|>REFUSED")
    cells = [
        [
            r["partition_id"],
            r["user"],
            str(r["device"]),
            render.size(r["memory_bytes"]),
            render.size(r["counted_bytes"]),
            render.size(r["nvml_bytes"]),
            "n/a" if r.get("refused") is None else str(r["refused"]),
        ]
        for r in rows
    ]
    return ["", "allocation-time cap:", *render.table(columns, cells, width=width).split("\n")]


def _process_lines(
    d: dict[str, Any], per_process: bool, width: int | None, colour: bool
) -> list[str]:
    """The processes holding a GPU's memory, indented under its row."""
    if not per_process:
        return ["    (per-process GPU memory is not available on this GPU)"]
    procs = d.get("processes", [])
    if not procs:
        return []
    columns = render.columns(
        ">PID|~USER|>MEMORY|PARTITION", render.Column("COMMAND", squeeze=True, min_width=8)
    )
    rows = [
        [
            str(p["pid"]),
            p["user"] or "?",
            render.size(p["used_bytes"]),
            p["partition_id"] or "unpartitioned",
            p["command"] or "?",
        ]
        for p in procs
    ]
    colours = [
        [
            None,
            render.user_colour(p["user"] or "?"),
            None,
            None if p["partition_id"] else "yellow",
            None,
        ]
        for p in procs
    ]
    inner = None if width is None else width - 4
    text = render.table(columns, rows, width=inner, colours=colours if colour else None)
    return ["    " + line for line in text.split("\n")]


def watch_stats(
    client: Any, interval: float, devices: Sequence[int] = (), as_json: bool = False
) -> None:
    """Redraw the stats in place (like ``watch``) until Ctrl-C.

    With ``as_json``: one JSON object per refresh, on one line each (JSON Lines).
    """
    tty = sys.stdout.isatty() and not as_json
    try:
        while True:
            data = client.stats_report()
            if as_json:
                from chronos.units import iso

                frame = {
                    "at": iso(time.time()),
                    "mode": data["mode"],
                    "backends": data["backends"],
                    "devices": stats_json(data, devices),
                }
                sys.stdout.write(json.dumps(frame) + "\n")
            else:
                text = render_stats(data, devices)
                stamp = time.strftime("%H:%M:%S %Z")
                if tty:
                    sys.stdout.write("\x1b[H\x1b[2J")
                sys.stdout.write(f"chronos stats — every {interval:g}s — {stamp}\n{text}\n")
            sys.stdout.flush()
            time.sleep(interval)
    except KeyboardInterrupt:
        if tty:
            sys.stdout.write("\n")
