"""The fast path of ``chronos list`` and ``chronos stats`` through the daemon.

These two run most (``watch chronos list``, prompts, scripts). With a daemon
answering, they need a socket and a table, not click, the models, the service
or the ledger: this module handles their plain forms with the transport and
cli_render alone, and prints exactly what the full CLI prints. Anything else
(another option, ``--help``, no daemon, an error) returns None and the full
CLI takes over, so behaviour never depends on which path ran.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence

LIST_FLAGS = frozenset({"--all", "--json", "--no-header"})
STATS_FLAGS = frozenset({"--json"})


def try_fast_path(argv: Sequence[str]) -> int | None:
    """Run ``argv`` here if it is a plain ``list``/``stats``; None to use the full CLI."""
    if not argv or argv[0] not in ("list", "stats"):
        return None
    flags = set(argv[1:])
    if len(flags) != len(argv) - 1 or not flags <= (
        LIST_FLAGS if argv[0] == "list" else STATS_FLAGS
    ):
        return None
    if os.environ.get("CHRONOS_MODE", "auto") == "embedded":
        return None
    try:
        from chronos.errors import ChronosError
        from chronos.paths import socket_path
        from chronos.transport import SocketTransport

        path = socket_path()
        if not path.exists():
            return None
        transport = SocketTransport(path)
    except Exception:  # noqa: BLE001 - whatever it is, the full CLI reports it properly
        return None
    try:
        if argv[0] == "list":
            return _list(transport, "--all" in flags, "--json" in flags, "--no-header" in flags)
        return _stats(transport, "--json" in flags)
    except ChronosError:
        return None  # the full CLI asks again and says what went wrong, in its one format
    finally:
        transport.close()


def _list(transport: object, show_all: bool, as_json: bool, no_header: bool) -> int:
    from chronos import cli_render as render

    records = transport.call("list", all=show_all)  # type: ignore[attr-defined]
    now = time.time()
    if as_json:
        from chronos.models import PartitionRecord

        _out(json.dumps([PartitionRecord.from_wire(r).to_json(now) for r in records], indent=2))
        return 0
    if not records:
        if not no_header:
            _out("no partitions" if show_all else "no active or booked partitions")
        return 0
    _out(
        render.render_list(
            records,
            now,
            header=not no_header,
            colour=render.use_colour(),
            width=render.terminal_width(),
        )
    )
    return 0


def _stats(transport: object, as_json: bool) -> int:
    from chronos.cli_stats import render_stats, stats_json

    data = transport.call("stats")  # type: ignore[attr-defined]
    _out(json.dumps(stats_json(data), indent=2) if as_json else render_stats(data))
    return 0


def _out(text: str) -> None:
    sys.stdout.write(text + "\n")
    sys.stdout.flush()


def main() -> int:
    """The ``chronos`` entry point: the fast path when it applies, else the full CLI."""
    fast = try_fast_path(sys.argv[1:])
    if fast is not None:
        return fast
    from chronos.cli import main as full_main

    return full_main(sys.argv[1:], fast_path=False)
