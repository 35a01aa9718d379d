"""The fast path of ``chronos list`` and ``chronos stats`` through the daemon.

These two run most (``watch chronos list``, prompts, scripts). With a daemon
answering, they need a socket and a table, not click, the models, the service
or the ledger: this module handles their plain forms (``list [--all]
[--no-header]``, ``stats [--json]``) with a socket and cli_render alone, and
prints exactly what the full CLI prints (tests compare the two). With no daemon
(embedded mode) the same forms go through the API in this process, which opens
the ledger as always, but still without click and the CLI's own modules. Anything
else (another option, ``--help``, an error) returns None and the full CLI takes
over, so behaviour never depends on which path ran.
"""

from __future__ import annotations

import json
import os
import sys
import time

from chronos.lean import connect_daemon, recv_exact

# Kept to the standard modules `python -c pass` has loaded already, plus json and socket:
# no typing, pathlib, re or dataclasses (each costs milliseconds here). The daemon
# protocol is spoken directly (protocol.py: a 4-byte big-endian length, then JSON).
TYPE_CHECKING = False
if TYPE_CHECKING:
    from collections.abc import Sequence
    from typing import Any

LIST_FLAGS = frozenset({"--all", "--no-header"})
STATS_FLAGS = frozenset({"--json"})
PROTOCOL_VERSION = 1
MAX_FRAME = 1 << 20
PAGE = 500
"""Records per listing page, as the API asks (chronos.api.PAGE)."""
SYSTEM_SOCKET = "/run/chronos/chronosd.sock"


def socket_path() -> str:
    """chronos.paths.socket_path() without pathlib (a test holds the two to agree)."""
    explicit = os.environ.get("CHRONOS_SOCKET")
    if explicit:
        return explicit
    home = os.environ.get("CHRONOS_HOME")
    if home:
        return os.path.join(home, "chronosd.sock")
    return SYSTEM_SOCKET


class NotFast(Exception):
    """Anything unexpected: the full CLI takes over, and reports it in its own words."""


class DaemonClient:
    """One request/reply at a time over chronosd's socket (the framing of protocol.py)."""

    def __init__(self, path: str, timeout: float = 30.0) -> None:
        try:
            self.sock = connect_daemon(path, timeout)
        except OSError as exc:
            raise NotFast from exc

    def call(self, op: str, **args: Any) -> Any:
        body = json.dumps({"v": PROTOCOL_VERSION, "op": op, "args": args}).encode()
        try:
            self.sock.sendall(len(body).to_bytes(4, "big") + body)
            length = int.from_bytes(recv_exact(self.sock, 4), "big")
            if length > MAX_FRAME:
                raise NotFast
            reply = json.loads(recv_exact(self.sock, length))
        except (OSError, ValueError, EOFError) as exc:
            raise NotFast from exc
        if not isinstance(reply, dict) or reply.get("ok") is not True:
            raise NotFast  # an error: the full CLI asks again and says it properly
        return reply.get("result")

    def close(self) -> None:
        self.sock.close()


def try_fast_path(argv: Sequence[str]) -> int | None:
    """Run ``argv`` here if it is a plain ``list``/``stats``; None to use the full CLI."""
    if not argv or argv[0] not in ("list", "stats"):
        return None
    flags = set(argv[1:])
    allowed = LIST_FLAGS if argv[0] == "list" else STATS_FLAGS
    if len(flags) != len(argv) - 1 or not flags <= allowed:
        return None
    mode = os.environ.get("CHRONOS_MODE", "auto")
    path = socket_path()
    if mode == "embedded" or (mode == "auto" and not os.path.exists(path)):
        return _through_api(argv[0], flags)
    try:
        client = DaemonClient(path)
    except NotFast:
        return None
    try:
        if argv[0] == "list":
            records = _every_page(client, "list", all="--all" in flags)
            return _list(records, "--all" in flags, "--no-header" in flags)
        return _stats(client.call("stats"), "--json" in flags)
    except NotFast:
        return None
    finally:
        client.close()


def _through_api(command: str, flags: set[str]) -> int | None:
    """No daemon: the API's embedded ledger in this process answers, as for the full CLI
    (the same checks and reaping), without click; an error is the full CLI's to report."""
    from chronos.api import Partitioner
    from chronos.errors import ChronosError

    try:
        with Partitioner() as client:
            if command == "list":
                records = client.records(all="--all" in flags)
                return _list(records, "--all" in flags, "--no-header" in flags)
            return _stats(client.stats_report(), "--json" in flags)
    except ChronosError:
        return None


def _every_page(client: DaemonClient, op: str, **args: Any) -> list[dict[str, Any]]:
    """A listing, page by page as the API fetches it: no reply grows past its limit."""
    items: list[dict[str, Any]] = []
    after = None
    while True:
        page = client.call(op, limit=PAGE, **args, **({} if after is None else {"after": after}))
        if not isinstance(page, dict):
            raise NotFast  # a daemon that does not page: the full CLI copes with it
        items.extend(page["items"])
        after = page["next"]
        if after is None:
            return items


def _list(records: list[dict[str, Any]], show_all: bool, no_header: bool) -> int:
    from chronos import cli_render as render

    now = time.time()
    if not records:
        if not no_header:
            _out("no partitions" if show_all else "no active partitions")
        return 0
    _out(
        render.render_list(
            records,
            now,
            header=not no_header,
            colour=render.use_colour(),
            width=render.table_width(),
        )
    )
    return 0


def _stats(data: dict[str, Any], as_json: bool) -> int:
    from chronos.cli_stats import render_stats, stats_json

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
