"""A listening socket of its own for each user, so no user can make another wait to connect.

Every per-user limit of the server acts after ``accept()``. Before it, all users share
one kernel listen backlog: a user who reconnects as fast as refusals come back keeps
that queue full, and another user's ``connect()`` waits behind thousands of doomed
connections (the "connect churn" attack of issue #10; 59 ms p99 for a victim's list).

So when the daemon runs as root, the first time it admits a user on the shared socket
it also opens ``<socket>.d/<uid>``: a socket owned by that user, mode 0600, in a
directory only root can write. The kernel lets only that user (and root) connect to
it, so it has its own backlog; clients try it first (``chronos.lean.connect_daemon``)
and fall back to the shared socket. Each listener accepts a bounded batch per turn
of the event loop, so a flooded socket cannot hold back the others either.

Identity still comes from ``SO_PEERCRED`` on every connection, whatever socket it came
through: the per-user socket is a fairness device, not an authority.
"""

from __future__ import annotations

import contextlib
import os
import socket
import stat
from collections.abc import Callable
from pathlib import Path

from chronos.lean import USER_SOCKETS_SUFFIX

MAX_USER_SOCKETS = 4096
"""Beyond this many users, the rest share the shared socket (a descriptor each)."""

USER_BACKLOG = 512


class UserSockets:
    """The per-user listeners: created on a user's first admission, closed with the daemon."""

    def __init__(
        self,
        shared: Path,
        start_listener: Callable[[socket.socket], Callable[[], None]],
        enabled: bool | None = None,
    ) -> None:
        """``start_listener(sock)`` serves a listening socket and returns how to close it."""
        self.folder = Path(str(shared) + USER_SOCKETS_SUFFIX)
        self._start_listener = start_listener
        self.enabled = os.geteuid() == 0 if enabled is None else enabled
        self._closers: dict[int, Callable[[], None]] = {}
        if self.enabled:
            try:
                self._prepare_folder()
            except OSError:
                self.enabled = False  # fail closed: everyone shares the shared socket

    def _prepare_folder(self) -> None:
        """An empty, root-owned ``<socket>.d`` (a dead daemon's sockets are removed)."""
        with contextlib.suppress(FileNotFoundError):
            info = os.lstat(self.folder)
            if not stat.S_ISDIR(info.st_mode):
                os.unlink(self.folder)  # a link or a file in our place: never follow it
            elif info.st_uid != os.geteuid():
                raise PermissionError(f"{self.folder} belongs to uid {info.st_uid}")
            else:
                for entry in os.listdir(self.folder):
                    with contextlib.suppress(FileNotFoundError):
                        os.unlink(self.folder / entry)
        with contextlib.suppress(FileExistsError):
            os.mkdir(self.folder, 0o755)
        os.chmod(self.folder, 0o755)

    def ensure(self, uid: int) -> None:
        """Open ``uid``'s own socket if it has none yet (root and the daemon's user need none)."""
        if not self.enabled or uid == 0 or uid in self._closers:
            return
        if len(self._closers) >= MAX_USER_SOCKETS:
            return
        try:
            sock = self._bind(uid)
        except OSError:
            return  # the shared socket still serves this user
        self._closers[uid] = self._start_listener(sock)

    def _bind(self, uid: int) -> socket.socket:
        final = self.folder / str(uid)
        staging = self.folder / f".{uid}.new"
        with contextlib.suppress(FileNotFoundError):
            os.unlink(staging)
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        try:
            sock.bind(str(staging))
            os.chmod(staging, 0o600)
            os.chown(staging, uid, 0)
            sock.listen(USER_BACKLOG)
            os.rename(staging, final)  # appears whole: owned, 0600 and listening
        except OSError:
            sock.close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(staging)
            raise
        return sock

    @property
    def users(self) -> list[int]:
        return sorted(self._closers)

    def close(self) -> None:
        for uid, close in list(self._closers.items()):
            close()
            with contextlib.suppress(FileNotFoundError):
                os.unlink(self.folder / str(uid))
        self._closers.clear()
