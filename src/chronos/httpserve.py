"""The one small HTTP layer of Chronos's two read-only web endpoints (metrics, dashboard).

Both endpoints have the same needs, so they are met once, here, on the standard
library's ``http.server``:

* an address: ``host:port`` parsed one way, loopback unless said otherwise, and a
  warning about exposure for anything else (there is no authentication);
* read-only: GET and HEAD, every other method 405; HEAD gets GET's headers, no body;
* a thread per connection that can neither pile up (an idle connection is dropped
  after ``idle_timeout_s``) nor kill the serving thread (a request that fails is
  logged in one line and its connection closed);
* optionally, answers only to requests whose ``Host`` names loopback (a web page must
  not read a loopback server through DNS rebinding).

What an endpoint serves is an :data:`App`, a function of :class:`Request` to
:class:`Response`. The metrics' app wraps prometheus-client's own WSGI exposition
(content negotiation, OpenMetrics, gzip); the dashboard's is its router. Importing this
module loads only the standard library.
"""

from __future__ import annotations

import ipaddress
import socket
import sys
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from chronos.errors import BadRequest, ChronosError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})
READ_ONLY_METHODS = "GET, HEAD"
IDLE_TIMEOUT_S = 30.0
"""How long a connection may sit without sending a request before it is closed."""
TEXT = "text/plain; charset=utf-8"


# ------------------------------------------------------------------------ addresses


def parse_address(text: str, default_host: str = "127.0.0.1") -> tuple[str, int]:
    """``"127.0.0.1:9464"``, ``"[::1]:8080"``, ``"localhost:0"``, ``":8080"`` or ``"8080"``.

    A bare port binds ``default_host`` (loopback); ``":PORT"`` means every
    interface, said out loud. Port 0 picks a free port.
    """
    raw = text.strip()
    if raw.isdigit():
        host, port_text = default_host, raw
    elif raw.startswith("["):
        end = raw.find("]")
        if end < 0 or not raw[end + 1 :].startswith(":"):
            raise BadRequest(f"invalid address {text!r} (use [IPv6]:PORT)")
        host, port_text = raw[1:end], raw[end + 2 :]
    else:
        host, sep, port_text = raw.rpartition(":")
        if not sep or ":" in host:
            raise BadRequest(f"invalid address {text!r} (use HOST:PORT, e.g. 127.0.0.1:8080)")
        host = host or "0.0.0.0"
    if not port_text.isdigit() or not 0 <= int(port_text) <= 65535:
        raise BadRequest(f"invalid port in address {text!r}")
    return host, int(port_text)


def is_loopback(host: str) -> bool:
    """True only for addresses that other machines cannot reach."""
    if host.lower() in LOOPBACK_NAMES:
        return True
    try:
        return ipaddress.ip_address(host).is_loopback
    except ValueError:
        return False


def family_of(host: str) -> socket.AddressFamily:
    return socket.AF_INET6 if ":" in host else socket.AF_INET


def url_of(host: str, port: int, path: str = "/") -> str:
    shown = host
    if host in ("0.0.0.0", "::", ""):
        shown = "127.0.0.1" if host != "::" else "::1"
    if ":" in shown:
        shown = f"[{shown}]"
    return f"http://{shown}:{port}{path}"


def exposure_warning(what: str, host: str, port: int) -> str:
    return (
        f"warning: the {what} listens on {host}:{port}, which is not loopback: anyone who can "
        f"reach this machine on port {port} can read it (users, partitions, process commands); "
        "there is no authentication. Prefer 127.0.0.1 and an SSH tunnel, or a firewall."
    )


def loopback_host_names(host: str) -> frozenset[str]:
    """The ``Host`` names a server bound to loopback ``host`` answers to."""
    return frozenset({"localhost", "127.0.0.1", "::1", host.lower()})


def host_name(header: str) -> str:
    """The name in a ``Host`` header, without its port (``[::1]:80`` gives ``::1``)."""
    header = header.strip().lower()
    if header.startswith("["):
        return header[1 : header.find("]")] if "]" in header else header
    return header.rsplit(":", 1)[0] if header.count(":") == 1 else header


# ------------------------------------------------------------------ requests, replies


@dataclass(frozen=True)
class Request:
    """What an app sees of a request: always a GET (a HEAD is answered as one)."""

    path: str
    query: str
    headers: Message


@dataclass(frozen=True)
class Response:
    status: int
    body: bytes
    content_type: str = TEXT
    headers: Mapping[str, str] = field(default_factory=dict)


App = Callable[[Request], Response]


def text_response(status: int, message: str, headers: Mapping[str, str] | None = None) -> Response:
    return Response(status, message.encode(), TEXT, headers or {})


# --------------------------------------------------------------------------- server


@dataclass(frozen=True)
class Site:
    """How one endpoint answers: its app, its name, and what it adds to every reply."""

    app: App
    name: str
    """Who answers, in messages and the ``Server`` header (``dashboard``)."""
    headers: Mapping[str, str] = field(default_factory=dict)
    allowed_hosts: frozenset[str] | None = None
    """``Host`` names answered; ``None``: any."""
    idle_timeout_s: float = IDLE_TIMEOUT_S


class LocalHTTPServer:
    """A threading HTTP server for one :class:`Site`; ``serve_forever()`` or ``start()``.

    ``what`` names it in errors and warnings ("the dashboard", "metrics").
    """

    def __init__(self, address: str, site: Site, what: str, exposed_as: str) -> None:
        host, port = parse_address(address)
        self.site = site
        self.loopback = is_loopback(host)
        self._exposed_as = exposed_as
        self.httpd = _bind(host, port, _handler_for(site), f"cannot serve {what} on {address}")
        self.host, self.port = host, int(self.httpd.server_address[1])
        self._thread: threading.Thread | None = None

    @property
    def url(self) -> str:
        return url_of(self.host, self.port)

    @property
    def warning(self) -> str | None:
        return None if self.loopback else exposure_warning(self._exposed_as, self.host, self.port)

    def serve_forever(self) -> None:
        self.httpd.serve_forever(poll_interval=0.2)

    def start(self) -> LocalHTTPServer:
        self._thread = threading.Thread(
            target=self.serve_forever, name=f"chronos-{self.site.name}", daemon=True
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self.httpd.shutdown()
        self.httpd.server_close()


def _bind(
    host: str, port: int, handler: type[BaseHTTPRequestHandler], failure: str
) -> ThreadingHTTPServer:
    class Server(ThreadingHTTPServer):
        address_family = family_of(host)
        daemon_threads = True

    try:
        return Server((host, port), handler)
    except OSError as exc:
        raise ChronosError(f"{failure}: {exc.strerror or exc}") from None


def _handler_for(site: Site) -> type[BaseHTTPRequestHandler]:
    class Handler(BaseHTTPRequestHandler):
        server_version = f"chronos-{site.name}"
        sys_version = ""
        protocol_version = "HTTP/1.1"
        timeout = site.idle_timeout_s  # socket timeout: an idle connection is closed

        def do_GET(self) -> None:  # noqa: N802 - http.server's naming
            self._answer(self._respond(), head=False)

        def do_HEAD(self) -> None:  # noqa: N802
            self._answer(self._respond(), head=True)

        def _refuse(self) -> None:
            reply = text_response(
                405, "read-only: only GET and HEAD\n", {"Allow": READ_ONLY_METHODS}
            )
            self._answer(reply, head=False)

        do_POST = do_PUT = do_DELETE = do_PATCH = do_OPTIONS = do_TRACE = do_CONNECT = _refuse

        def _respond(self) -> Response:
            if (
                site.allowed_hosts is not None
                and host_name(self.headers.get("Host", "localhost")) not in site.allowed_hosts
            ):
                return text_response(421, f"this {site.name} answers only to localhost\n")
            path, _, query = self.path.partition("?")
            return site.app(Request(path, query, self.headers))

        def _answer(self, reply: Response, head: bool) -> None:
            self.send_response(reply.status)
            self.send_header("Content-Type", reply.content_type)
            self.send_header("Content-Length", str(len(reply.body)))
            self.send_header("Cache-Control", "no-store")
            for key, value in {**site.headers, **reply.headers}.items():
                self.send_header(key, value)
            self.end_headers()
            if not head:
                self.wfile.write(reply.body)

        def log_message(self, format: str, *args: Any) -> None:
            pass  # a line per poll or scrape would bury everything else

        def handle_one_request(self) -> None:
            try:
                super().handle_one_request()
            except Exception as exc:  # noqa: BLE001 - one broken request must not kill the thread
                sys.stderr.write(f"chronos {site.name}: request failed: {exc!r}\n")
                self.close_connection = True

    return Handler


__all__ = [
    "App",
    "LocalHTTPServer",
    "Request",
    "Response",
    "Site",
    "exposure_warning",
    "family_of",
    "host_name",
    "is_loopback",
    "loopback_host_names",
    "parse_address",
    "text_response",
    "url_of",
]
