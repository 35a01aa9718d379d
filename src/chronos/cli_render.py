"""What the CLI's tables look like: one time format, aligned columns, 80 columns, colour.

Kept free of click and of the API so that the fast path of ``chronos list`` and
``chronos stats`` (see cli_fast.py) renders exactly what the full CLI renders
without importing either.

- Times in tables are local, ``MM-DD HH:MM``; the zone is named in the column's
  header (``START UTC``) and every ``--json`` time is ISO-8601 with its offset.
- Durations are shown in their two largest units (``1h30m``, ``59m59s``, ``2d3h``).
- Sizes and numbers are right-aligned; a table narrower than the terminal (80
  columns off a terminal) is never wrapped: the widest free-text column is cut.
- Colour only on a terminal, and never with ``NO_COLOR`` set (https://no-color.org).
"""

from __future__ import annotations

import os
import sys
import time
import zlib

from chronos.lean import format_bytes

# No typing, dataclasses, shutil or collections here: each costs milliseconds of start-up
# that the fast path of `chronos list` would pay on every run.
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import IO, Any

DEFAULT_WIDTH = 80


# ----------------------------------------------------------------------- time


def clock(ts: float | None) -> str:
    """Epoch seconds as ``12-01 14:05`` in local time; ``-`` for none."""
    if ts is None:
        return "-"
    return time.strftime("%m-%d %H:%M", time.localtime(ts))


def zone(ts: float | None = None) -> str:
    """The local zone's abbreviation (``UTC``, ``CET``) at ``ts`` (default now)."""
    return time.strftime("%Z", time.localtime(ts)) or time.strftime("%z", time.localtime(ts))


def when(ts: float) -> str:
    """A time in a sentence: ``12-01 14:05 UTC``."""
    return f"{clock(ts)} {zone(ts)}"


def span(seconds: float) -> str:
    """A duration in its two largest units: ``1h30m``, ``59m59s``, ``2d3h``, ``0s``."""
    total = max(0, int(seconds))
    parts: list[str] = []
    for unit, size in (("d", 86400), ("h", 3600), ("m", 60), ("s", 1)):
        value, total = divmod(total, size)
        if value or parts:
            parts.append(f"{value}{unit}")
    shown = [p for p in parts[:2] if not p.startswith("0")] or parts[:1]
    return "".join(shown) or "0s"


def size(nbytes: float | None) -> str:
    """``85899345920`` -> ``80.0 GiB``; ``n/a`` for unknown."""
    return "n/a" if nbytes is None else format_bytes(nbytes)


# --------------------------------------------------------------------- colour


def use_colour(stream: IO[str] | None = None) -> bool:
    """Colour on a terminal only, and not when NO_COLOR is set to anything non-empty."""
    stream = stream or sys.stdout
    if os.environ.get("NO_COLOR"):
        return False
    return bool(getattr(stream, "isatty", lambda: False)())


_CODES = {"green": 32, "yellow": 33, "red": 31, "cyan": 36, "dim": 2, "bold": 1}
_USER_COLOURS = (32, 33, 34, 35, 36, 92, 93, 94, 95, 96)
STATE_COLOURS = {"active": "green", "booked": "cyan", "released": "dim", "expired": "dim"}


def paint(text: str, colour: str | int | None) -> str:
    if colour is None:
        return text
    code = colour if isinstance(colour, int) else _CODES[colour]
    return f"\x1b[{code}m{text}\x1b[0m"


def user_colour(user: str) -> int:
    """A stable colour per user name, as gpustat and nvitop do."""
    return _USER_COLOURS[zlib.crc32(user.encode()) % len(_USER_COLOURS)]


def load_colour(fraction: float) -> str:
    """Green, yellow, red by how full a GPU is."""
    return "green" if fraction < 0.5 else "yellow" if fraction < 0.85 else "red"


# ---------------------------------------------------------------------- table


class Column:
    """A table column: its header, alignment, and whether it may be cut to fit."""

    __slots__ = ("header", "right", "squeeze", "min_width")

    def __init__(
        self, header: str, right: bool = False, squeeze: bool = False, min_width: int = 4
    ) -> None:
        self.header = header
        self.right = right
        """Right-align (sizes, numbers, durations)."""
        self.squeeze = squeeze
        """May be cut to fit the width (free text: user names, commands)."""
        self.min_width = min_width


def columns(*parts: str | Column) -> list[Column]:
    """A table's columns, written as they read across: ``"JOB|STATE|>MEMORY|~NAME"``.

    Headers are split at ``|``; ``>`` before one right-aligns it (sizes, numbers,
    durations), ``~`` lets it be cut to fit (free text). A :class:`Column` stands for
    itself (one with a ``min_width`` of its own)."""
    out: list[Column] = []
    for part in parts:
        if isinstance(part, Column):
            out.append(part)
            continue
        for header in part.split("|"):
            mark = header[:1]
            name = header[1:] if mark in (">", "~") else header
            out.append(Column(name, right=mark == ">", squeeze=mark == "~"))
    return out


def terminal_width(stream: IO[str] | None = None) -> int:
    """The terminal's width ($COLUMNS first, as shutil has it); 80 off a terminal."""
    stream = stream or sys.stdout
    if not getattr(stream, "isatty", lambda: False)():
        return DEFAULT_WIDTH
    columns = os.environ.get("COLUMNS", "")
    if columns.isdigit() and int(columns) > 0:
        return int(columns)
    try:
        return os.get_terminal_size(stream.fileno()).columns or DEFAULT_WIDTH
    except (OSError, ValueError, AttributeError):
        return DEFAULT_WIDTH


def table_width(stream: IO[str] | None = None) -> int | None:
    """How wide a table may be: the terminal's width, or no limit off a terminal.

    A pipe or a file does not wrap, and a script grepping for a long user name or an
    event's whole detail must find it: only what a person reads is cut to fit.
    """
    stream = stream or sys.stdout
    if not getattr(stream, "isatty", lambda: False)():
        return None
    return terminal_width(stream)


def fit(text: str, width: int) -> str:
    return text if len(text) <= width else text[: max(1, width - 1)] + "…"


def table(
    columns: Sequence[Column],
    rows: Sequence[Sequence[str]],
    *,
    width: int | None = DEFAULT_WIDTH,
    header: bool = True,
    colours: Sequence[Sequence[str | int | None]] | None = None,
) -> str:
    """Rows under headers, two spaces apart, no line longer than ``width`` (None: no limit).

    ``colours`` (one per cell) is applied after padding, so alignment holds.
    """
    widths = [
        max([len(c.header) if header else 0, *(len(r[i]) for r in rows)])
        for i, c in enumerate(columns)
    ]
    if width is not None:
        _squeeze(columns, widths, width)
    lines = []
    if header:
        lines.append(_line([c.header for c in columns], columns, widths, None))
    for n, row in enumerate(rows):
        lines.append(_line(row, columns, widths, colours[n] if colours else None))
    return "\n".join(lines)


def _squeeze(columns: Sequence[Column], widths: list[int], width: int) -> None:
    """Narrow the squeezable columns, widest first, until the table fits ``width``."""
    while sum(widths) + 2 * (len(widths) - 1) > width:
        candidates = [
            i for i, c in enumerate(columns) if c.squeeze and widths[i] > max(c.min_width, 1)
        ]
        if not candidates:
            return
        widest = max(candidates, key=lambda i: widths[i])
        widths[widest] -= 1


def _line(
    cells: Sequence[str],
    columns: Sequence[Column],
    widths: Sequence[int],
    colours: Sequence[str | int | None] | None,
) -> str:
    out = []
    for i, (cell, column, w) in enumerate(zip(cells, columns, widths)):
        text = fit(cell, w)
        text = text.rjust(w) if column.right else text.ljust(w)
        if colours is not None and colours[i] is not None:
            text = paint(text, colours[i])
        out.append(text)
    return "  ".join(out).rstrip()


# ------------------------------------------------------------ partition lists

#: Fields of ``chronos list --format``, in the default order.
LIST_FIELDS: dict[str, Column] = {
    "id": Column("ID"),
    "gpu": Column("GPU", right=True),
    "user": Column("USER", squeeze=True),
    "state": Column("STATE"),
    "memory": Column("MEMORY", right=True),
    "share": Column("SHARE", right=True),
    "start": Column("START"),
    "end": Column("END"),
    "remaining": Column("REMAINING", right=True),
    "created": Column("CREATED"),
    "kind": Column("KIND"),
    "series": Column("SERIES"),
}
DEFAULT_LIST_FORMAT = ("id", "gpu", "user", "state", "memory", "start", "end", "remaining")
TIME_FIELDS = ("start", "end", "created")


def state_at(r: dict[str, Any], now: float) -> str:
    """The effective state of a wire record (as PartitionRecord.state_at)."""
    if r["state"] not in ("active", "booked"):
        return str(r["state"])
    if now >= r["expires_at"]:
        return "expired"
    return "active" if now >= r["starts_at"] else "booked"


def wire_devices(r: dict[str, Any]) -> list[int]:
    """A wire record's GPUs (a group's all of them, the primary first)."""
    return [int(r["device"]), *(int(s["device"]) for s in r.get("more_shares") or ())]


def gpus(devices: Sequence[int]) -> str:
    """A partition's GPUs as users type them: ``0``, or a group's ``0,1``."""
    return ",".join(str(d) for d in devices)


def list_cells(r: dict[str, Any], now: float) -> dict[str, str]:
    """Every ``--format`` field of one partition (a wire record), as shown."""
    state = state_at(r, now)
    ended = state in ("released", "expired")
    end = (r.get("ended_at") or r["expires_at"]) if ended else r["expires_at"]
    if ended:
        remaining = "-"
    elif state == "booked":
        remaining = span(r["expires_at"] - r["starts_at"])  # all of it is still ahead
    else:
        remaining = span(r["expires_at"] - now)
    return {
        "id": r["id"],
        "gpu": gpus(wire_devices(r)),
        "user": r["user"],
        "state": state,
        "memory": size(r["memory_bytes"]),
        "share": f"{r['memory_bytes'] / r['device_total_bytes']:.0%}",
        "start": clock(r["starts_at"]),
        "end": clock(end),
        "remaining": remaining,
        "created": clock(r["created_at"]),
        "kind": r.get("kind") or "-",
        "series": r.get("series") or "-",
    }


def render_list(
    records: Sequence[dict[str, Any]],
    now: float,
    fields: Sequence[str] = DEFAULT_LIST_FORMAT,
    *,
    header: bool = True,
    colour: bool = False,
    width: int | None = DEFAULT_WIDTH,
) -> str:
    tz = zone(now)
    columns = [
        Column(f"{LIST_FIELDS[f].header} {tz}") if f in TIME_FIELDS else LIST_FIELDS[f]
        for f in fields
    ]
    cells = [list_cells(r, now) for r in records]
    rows = [[c[f] for f in fields] for c in cells]
    colours = None
    if colour:
        colours = [
            [
                user_colour(c["user"])
                if f == "user"
                else STATE_COLOURS.get(c["state"])
                if f == "state"
                else None
                for f in fields
            ]
            for c in cells
        ]
    return table(columns, rows, width=width, header=header, colours=colours)
