"""``chronos dashboard``: a read-only, live web page of this machine's GPUs.

Served by Chronos's one small HTTP layer (:mod:`chronos.httpserve`, stdlib), no framework:

* ``GET /`` — the page, rendered here with the current state embedded (so
  the first paint needs no second request) and a text fallback for browsers
  without JavaScript;
* ``GET /api/state`` — the state as JSON, polled by ``static/app.js`` every
  1.5 s; built only from what ``chronos list``, ``stats`` and ``queue``
  return through the :class:`~chronos.api.Partitioner` API, so it shows
  nothing that any local user cannot already see;
* ``GET /static/...`` — the script, the stylesheet and the icon, served from
  the package (works offline; no CDN).

It accepts no changes: every method but GET and HEAD gets 405, and it sends
no CORS headers. Bound to loopback, it also answers only requests whose
``Host`` names loopback, so a web page cannot read it through DNS rebinding.
The same server runs inside ``chronosd`` when ``dashboard_address`` is set.
"""

from __future__ import annotations

import html
import json
import socket
import sys
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from chronos.errors import ChronosError
from chronos.httpserve import (
    IDLE_TIMEOUT_S,
    LocalHTTPServer,
    Request,
    Response,
    Site,
    is_loopback,
    loopback_host_names,
    parse_address,
    text_response,
)
from chronos.units import iso

DEFAULT_BIND = "127.0.0.1:8080"
POLL_MS = 1500
COMMAND_MAX = 200
STATIC_TYPES = {
    "app.js": "text/javascript; charset=utf-8",
    "app.css": "text/css; charset=utf-8",
    "favicon.svg": "image/svg+xml",
}
SECURITY_HEADERS = {
    "Content-Security-Policy": (
        "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self' data:; "
        "connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'"
    ),
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
    "Cross-Origin-Resource-Policy": "same-origin",
}


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class Snapshot:
    """The page's data (``state``, times in epoch seconds) and the raw replies it was
    built from. What goes out (``/api/state``, the page) is :meth:`wire`."""

    state: dict[str, Any]
    stats: dict[str, Any]
    queue: list[dict[str, Any]]

    def wire(self) -> dict[str, Any]:
        return wire_state(self.state)


TIME_FIELDS = ("created_at", "starts_at", "expires_at", "estimated_start", "enqueued_at")
"""The times in a partition or queue entry of the state."""


def wire_state(state: dict[str, Any]) -> dict[str, Any]:
    """The state as ``/api/state`` sends it: every time ISO-8601 with its offset, as
    every ``chronos … --json`` writes them (``static/app.js`` reads them back)."""
    out = {**state, "now": iso(state["now"])}
    for key in ("partitions", "queue"):
        if key in state:
            out[key] = [
                {k: iso(v) if k in TIME_FIELDS else v for k, v in item.items()}
                for item in state[key]
            ]
    return out


def collect(client: Any, now: float | None = None) -> Snapshot:
    """Ask ``client`` (a Partitioner) what ``chronos list``, ``stats`` and ``queue`` show."""
    records = [p.record for p in client.list()]
    stats: dict[str, Any] = client.stats_report()
    queue: list[dict[str, Any]] = client.queue()
    now = time.time() if now is None else now
    used_by: dict[str, int] = {}
    processes = []
    for dev in stats["devices"]:
        for p in dev.get("processes", []):
            if p.get("partition_id") and p.get("used_bytes") is not None:
                used_by[p["partition_id"]] = used_by.get(p["partition_id"], 0) + p["used_bytes"]
            command = p.get("command") or ""
            processes.append(
                {
                    "pid": p["pid"],
                    "device": p["device"],
                    "user": p.get("user"),
                    "used_bytes": p.get("used_bytes"),
                    "partition_id": p.get("partition_id"),
                    "command": command[:COMMAND_MAX] + ("…" if len(command) > COMMAND_MAX else ""),
                }
            )
    per_process = bool(stats.get("per_process_memory", True))
    # Bytes the allocation-time cap library counts, per partition (docs/ALLOCATION_CAP.md):
    # the rows come per GPU, so a group's are summed (None only if no GPU of it is capped).
    counted: dict[str, int | None] = {}
    for row in stats.get("alloc_cap", []):
        so_far, more = counted.get(row["partition_id"]), row["counted_bytes"]
        counted[row["partition_id"]] = more if so_far is None else so_far + (more or 0)
    state = {
        "now": now,
        "host": socket.gethostname(),
        "mode": stats.get("mode"),
        "backends": stats.get("backends", []),
        "per_process_memory": per_process,
        "devices": [
            {
                k: d.get(k)
                for k in (
                    "index",
                    "uuid",
                    "name",
                    "vendor",
                    "backend",
                    "total_bytes",
                    "used_bytes",
                    "free_bytes",
                    "utilization_pct",
                    "reservable_bytes",
                    "committed_bytes",
                    "active_partitions",
                )
            }
            for d in stats["devices"]
        ],
        "partitions": [
            {
                "id": r.id,
                "device": r.device,
                "devices": list(r.devices),
                "shares": [
                    {"device": share.device, "memory_bytes": share.memory_bytes}
                    for share in r.shares
                ],
                "user": r.user,
                "kind": r.kind,
                "memory_bytes": r.memory_bytes,
                "memory_fraction": round(r.memory_fraction, 6),
                "state": r.state_at(now),
                "created_at": r.created_at,
                "starts_at": r.starts_at,
                "expires_at": r.expires_at,
                "used_bytes": used_by.get(r.id, 0) if per_process else None,
                "counted_bytes": counted.get(r.id),
            }
            for r in records
        ],
        "queue": [
            {
                k: q.get(k)
                for k in (
                    "ticket",
                    "device",
                    "devices",
                    "user",
                    "memory_bytes",
                    "memory_fraction",
                    "duration_s",
                    "position",
                    "estimated_start",
                    "waited_s",
                    "enqueued_at",
                )
            }
            for q in queue
        ],
        "processes": sorted(processes, key=lambda p: (p["device"], -(p["used_bytes"] or 0))),
    }
    return Snapshot(state, stats, queue)


class PartitionerSource:
    """Snapshots through one Partitioner, reconnected after the daemon went away.

    ``follow_daemon``: a client that fell back to the embedded ledger switches
    to the daemon as soon as its socket appears.
    """

    def __init__(
        self, factory: Callable[[], Any] | None = None, follow_daemon: bool = True
    ) -> None:
        self._factory = factory or _default_client
        self._follow = follow_daemon
        self._client: Any = None
        self._lock = threading.Lock()

    def __call__(self) -> Snapshot:
        with self._lock:
            if self._client is not None and self._follow and self._client.mode == "embedded":
                from chronos.paths import socket_path

                if socket_path().exists():
                    self._drop()
            if self._client is None:
                self._client = self._factory()
            try:
                return collect(self._client)
            except ChronosError:
                self._drop()
                raise

    def _drop(self) -> None:
        client, self._client = self._client, None
        if client is not None:
            try:
                client.close()
            except Exception:  # noqa: BLE001 - closing a broken connection may fail too
                pass

    def close(self) -> None:
        with self._lock:
            self._drop()


def _default_client() -> Any:
    from chronos.api import Partitioner

    return Partitioner()


# ------------------------------------------------------------------------- content


def _static(name: str) -> bytes:
    return (resources.files("chronos.dashboard") / "static" / name).read_bytes()


def fallback_text(snapshot: Snapshot) -> str:
    """What the page shows without JavaScript: ``chronos stats`` and ``chronos calendar``."""
    from chronos.cli_calendar import render_calendar
    from chronos.cli_stats import render_stats
    from chronos.models import PartitionRecord

    state = snapshot.state
    records = [
        PartitionRecord(
            id=p["id"],
            device=p["device"],
            device_uuid="",
            device_total_bytes=1,
            memory_bytes=p["memory_bytes"],
            uid=-1,
            user=p["user"],
            created_at=p["created_at"],
            starts_at=p["starts_at"],
            expires_at=p["expires_at"],
            state=p["state"],
        )
        for p in state["partitions"]
    ]
    calendar = render_calendar(records, snapshot.queue, state["now"], 86400.0)
    return render_stats(snapshot.stats) + "\n\n" + calendar


def render_page(snapshot: Snapshot | None, error: str | None) -> bytes:
    template = Template(_static("index.html").decode())
    state = snapshot.wire() if snapshot is not None else {"error": error, "now": iso(time.time())}
    if snapshot is not None:
        try:
            fallback = fallback_text(snapshot)
        except Exception as exc:  # noqa: BLE001 - the text fallback must not break the page
            fallback = f"(no text view: {exc!r})"
    else:
        fallback = f"cannot read the state: {error}"
    host = str(state.get("host") or socket.gethostname())
    # JSON inside <script type="application/json">: no "<" may close the element early.
    embedded = json.dumps(state).replace("<", "\\u003c").replace(">", "\\u003e")
    page = template.substitute(
        host=html.escape(host),
        poll_ms=str(POLL_MS),
        initial_state=embedded,
        fallback=html.escape(fallback),
    )
    return page.encode()


# -------------------------------------------------------------------------- server


class DashboardServer(LocalHTTPServer):
    """The dashboard on the one HTTP layer; ``serve_forever()`` in the foreground or
    ``start()`` a thread."""

    def __init__(
        self,
        address: str,
        source: Callable[[], Snapshot],
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        host, _ = parse_address(address)
        self.source = source
        site = Site(
            app=self.respond,
            name="dashboard",
            headers=SECURITY_HEADERS,
            allowed_hosts=loopback_host_names(host) if is_loopback(host) else None,
            idle_timeout_s=idle_timeout_s,
        )
        super().__init__(address, site, what="the dashboard", exposed_as="dashboard")

    def snapshot(self) -> tuple[Snapshot | None, str | None]:
        try:
            return self.source(), None
        except ChronosError as exc:
            return None, str(exc)

    def respond(self, request: Request) -> Response:
        path = request.path
        if path in ("/", "/index.html"):
            snapshot, error = self.snapshot()
            return Response(200, render_page(snapshot, error), "text/html; charset=utf-8")
        if path == "/api/state":
            snapshot, error = self.snapshot()
            if snapshot is None:
                body = json.dumps({"error": error, "now": iso(time.time())})
                return Response(503, body.encode(), "application/json")
            return Response(200, json.dumps(snapshot.wire()).encode(), "application/json")
        name = path.removeprefix("/static/")
        if path.startswith("/static/") and name in STATIC_TYPES:
            return Response(200, _static(name), STATIC_TYPES[name])
        if path == "/favicon.ico":
            return Response(200, _static("favicon.svg"), STATIC_TYPES["favicon.svg"])
        return text_response(404, "not found\n")

    def start(self) -> DashboardServer:
        super().start()
        return self

    def close(self) -> None:
        super().close()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


# ---------------------------------------------------------------------- entry points


def run_dashboard(bind: str | None) -> int:
    """``chronos dashboard [--bind HOST:PORT]``: serve in the foreground until Ctrl-C."""
    server = DashboardServer(bind or DEFAULT_BIND, PartitionerSource())
    if server.warning:
        print(f"chronos dashboard: {server.warning}", file=sys.stderr, flush=True)
    print(f"chronos dashboard: serving {server.url} (read-only; Ctrl-C stops it)", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.close()
    return 0


def start_daemon_dashboard(address: str, sock_path: Path) -> DashboardServer:
    """The dashboard inside chronosd: a thread that asks the daemon over its own socket."""

    def client() -> Any:
        from chronos.api import Partitioner
        from chronos.transport import SocketTransport

        return Partitioner(SocketTransport(sock_path, timeout=10.0))

    return DashboardServer(address, PartitionerSource(client, follow_daemon=False)).start()


__all__ = [
    "DEFAULT_BIND",
    "DashboardServer",
    "PartitionerSource",
    "Snapshot",
    "collect",
    "run_dashboard",
    "start_daemon_dashboard",
]
