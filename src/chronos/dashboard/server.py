"""``chronos dashboard``: a read-only, live web page of this machine's GPUs.

One small stdlib HTTP server (``ThreadingHTTPServer``), no framework:

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
from http.server import BaseHTTPRequestHandler
from importlib import resources
from pathlib import Path
from string import Template
from typing import Any

from chronos.dashboard.net import (
    bind_http,
    exposure_warning,
    is_loopback,
    parse_address,
    url_of,
)
from chronos.errors import ChronosError

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
    """The page's data (``state``) and the raw replies it was built from."""

    state: dict[str, Any]
    stats: dict[str, Any]
    queue: list[dict[str, Any]]


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
    # Bytes the allocation-time cap library counts, per partition (docs/ALLOCATION_CAP.md).
    counted = {row["partition_id"]: row["counted_bytes"] for row in stats.get("alloc_cap", [])}
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
    state = snapshot.state if snapshot is not None else {"error": error, "now": time.time()}
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


class DashboardServer:
    """The HTTP server; ``serve_forever()`` in the foreground or ``start()`` a thread."""

    def __init__(self, address: str, source: Callable[[], Snapshot]) -> None:
        host, _ = parse_address(address)
        self.source = source
        self.loopback = is_loopback(host)
        self.httpd = bind_http(address, _handler_for(self), "the dashboard")
        self.host, self.port = host, int(self.httpd.server_address[1])
        self.allowed_hosts = _loopback_hosts(host) if self.loopback else None
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return url_of(self.host, self.port)

    @property
    def warning(self) -> str | None:
        return None if self.loopback else exposure_warning("dashboard", self.host, self.port)

    def snapshot(self) -> tuple[Snapshot | None, str | None]:
        try:
            return self.source(), None
        except ChronosError as exc:
            return None, str(exc)

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> DashboardServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name="chronos-dashboard", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()
        close = getattr(self.source, "close", None)
        if close is not None:
            close()


def _loopback_hosts(host: str) -> frozenset[str]:
    return frozenset({"localhost", "127.0.0.1", "::1", host.lower()})


def _host_name(header: str) -> str:
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


def _handler_for(server: DashboardServer) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = "chronos-dashboard"
        sys_version = ""
        protocol_version = "HTTP/1.1"

        def do_GET(self) -> None:  # http.server's naming
            self._respond(head=False)

        def do_HEAD(self) -> None:
            self._respond(head=True)

        def _refuse(self) -> None:
            body = b"read-only: only GET and HEAD\n"
            self._send(405, body, "text/plain; charset=utf-8", False, {"Allow": "GET, HEAD"})

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = _refuse

        def _respond(self, head: bool) -> None:
            allowed = server.allowed_hosts
            if (
                allowed is not None
                and _host_name(self.headers.get("Host", "localhost")) not in allowed
            ):
                self._send(
                    421,
                    b"this dashboard answers only to localhost\n",
                    "text/plain; charset=utf-8",
                    head,
                )
                return
            path = self.path.split("?", 1)[0]
            if path in ("/", "/index.html"):
                snapshot, error = server.snapshot()
                self._send(200, render_page(snapshot, error), "text/html; charset=utf-8", head)
            elif path == "/api/state":
                snapshot, error = server.snapshot()
                if snapshot is None:
                    body = json.dumps({"error": error, "now": time.time()}).encode()
                    self._send(503, body, "application/json", head)
                else:
                    self._send(200, json.dumps(snapshot.state).encode(), "application/json", head)
            elif path.startswith("/static/") and path[len("/static/") :] in STATIC_TYPES:
                name = path[len("/static/") :]
                self._send(200, _static(name), STATIC_TYPES[name], head)
            elif path == "/favicon.ico":
                self._send(200, _static("favicon.svg"), STATIC_TYPES["favicon.svg"], head)
            else:
                self._send(404, b"not found\n", "text/plain; charset=utf-8", head)

        def _send(
            self,
            code: int,
            body: bytes,
            content_type: str,
            head: bool,
            extra: dict[str, str] | None = None,
        ) -> None:
            self.send_response(code)
            self.send_header("Content-Type", content_type)
            self.send_header("Content-Length", str(len(body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in {**SECURITY_HEADERS, **(extra or {})}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a line per poll would bury everything else

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except Exception as exc:  # noqa: BLE001 - one broken request must not kill the thread
                sys.stderr.write(f"chronos dashboard: request failed: {exc!r}\n")
                self.close_connection = True

    return Handler


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
