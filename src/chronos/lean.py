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


USER_SOCKETS_SUFFIX = ".d"
"""chronosd's per-user sockets live in ``<socket>.d/<uid>`` (see daemon/user_sockets.py)."""


def user_socket_path(shared: str, uid: int) -> str | None:
    """This user's own socket beside ``shared``, or None if there is none to trust.

    The directory must belong to whoever owns the shared socket and be writable by
    nobody else, and the socket must be owned by this user or by that same owner: a
    socket another user planted is never used (the shared one is, as before).
    """
    import os
    import stat

    folder = shared + USER_SOCKETS_SUFFIX
    path = os.path.join(folder, str(uid))
    try:
        owner = os.lstat(shared).st_uid
        info = os.lstat(folder)
        mine = os.lstat(path)
    except OSError:
        return None
    if not stat.S_ISDIR(info.st_mode) or info.st_uid != owner or info.st_mode & 0o022:
        return None
    if not stat.S_ISSOCK(mine.st_mode) or mine.st_uid not in (uid, owner):
        return None
    return path


def connect_daemon(shared: str, timeout: float) -> socket.socket:
    """A connection to chronosd: on this user's own socket if it has one, else the shared one.

    A user's own socket has its own listen backlog, so another user who keeps the shared
    backlog full with connections refused one after another cannot make this one wait.
    Raises OSError from connecting to the shared socket.
    """
    import os

    own = user_socket_path(shared, os.getuid())
    if own is not None:
        try:
            return _connect_unix(own, timeout)
        except OSError:
            pass  # gone with a restart, or refused: the shared socket still serves
    return _connect_unix(shared, timeout)


def _connect_unix(path: str, timeout: float) -> socket.socket:
    import socket

    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    try:
        sock.connect(path)
    except OSError:
        sock.close()
        raise
    return sock
