"""Helpers that import nothing, shared by the fast CLI path and the rest of chronos.

``chronos list`` and ``chronos stats`` answer through cli_fast.py without loading
click, the API, the ledger or even ``typing`` (each costs milliseconds on every
call). The few pieces of logic that path shares with the full client live here, in
a module that costs nothing to import, so that there is one implementation of each.
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing alone costs the fast path milliseconds
if TYPE_CHECKING:
    import socket


def recv_exact(sock: socket.socket, n: int) -> bytes:
    """Exactly ``n`` bytes from ``sock``; EOFError if the peer hangs up first."""
    chunks = []
    while n:
        chunk = sock.recv(n)
        if not chunk:
            raise EOFError
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def format_bytes(nbytes: float) -> str:
    """``85899345920`` -> ``80.0 GiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")
