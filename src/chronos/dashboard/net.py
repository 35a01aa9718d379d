"""``host:port`` addresses for the HTTP endpoints (metrics, dashboard), and who can reach them.

Both endpoints are for this machine by default: they bind to loopback unless
an address says otherwise, and anything else gets a warning about exposure.
"""

from __future__ import annotations

import ipaddress
import socket
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

from chronos.errors import BadRequest, ChronosError

LOOPBACK_NAMES = frozenset({"localhost", "localhost.localdomain", "ip6-localhost"})


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


def bind_http(
    address: str, handler: type[BaseHTTPRequestHandler], what: str
) -> ThreadingHTTPServer:
    """A threading HTTP server bound to ``address``, or a one-line ChronosError saying why not."""
    host, port = parse_address(address)

    class Server(ThreadingHTTPServer):
        address_family = family_of(host)
        daemon_threads = True

    try:
        return Server((host, port), handler)
    except OSError as exc:
        raise ChronosError(f"cannot serve {what} on {address}: {exc.strerror or exc}") from None
