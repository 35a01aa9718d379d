"""How a client reaches the ledger: through the daemon, or in-process.

:class:`Transport` sends a typed request of :mod:`chronos.messages`
(``send(request)``; ``call(op, **args)`` sends the same message by an operation's
name, for tests and tools); each transport implements ``exchange(message)``.
:class:`SocketTransport` talks to ``chronosd``; :class:`EmbeddedTransport` runs the
same :class:`~chronos.service.Service` in the caller's process over the shared
SQLite ledger, and hands it the same wire message, so both modes check a request
the one same way (``protocol.parse_request``). :func:`connect` picks the daemon
whenever one answers, so a machine with a daemon never has a second writer.

This is the API's layer: code outside :mod:`chronos.api` goes through
:class:`~chronos.api.Partitioner` (tests and benchmarks may speak it directly).

Once a daemon is configured, a client never falls back to an embedded ledger, even
while that daemon is down: a second ledger would fork the state (two ledgers each
admitting its own partitions on the same GPUs). It waits a few seconds for a
restarting daemon instead, then fails with one line. A daemon is configured when
``CHRONOS_SOCKET`` names one, or when the state directory holds the daemon's
``ledger.id`` (chronosd writes it beside its ledger).
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
import time
from abc import ABC, abstractmethod
from pathlib import Path
from typing import TYPE_CHECKING, Any

from chronos import protocol
from chronos.errors import DaemonUnavailable, ProtocolError, error_from_code
from chronos.lean import connect_daemon, recv_exact
from chronos.messages import Request
from chronos.paths import (
    LEDGER_FILE,
    LEDGER_ID_FILE,
    check_dir,
    check_trusted_path,
    ensure_shared_dir,
    is_root_embedded,
    is_shared_default,
    socket_path,
    state_dir,
)

if TYPE_CHECKING:
    from chronos.service import Service

#: How long a client waits for a configured daemon to come back (a restart) before failing.
DAEMON_WAIT_S = 3.0
_RETRY_S = 0.1

# Operations safe to send again after the daemon went away mid-request.
IDEMPOTENT = frozenset({"ping", "get", "list", "stats", "events"})


class Transport(ABC):
    mode: str = "?"

    def send(self, request: Request) -> Any:
        """Run ``request``; return its result or raise the matching ChronosError."""
        return self.exchange(protocol.message_of(request))

    def call(self, op: str, **args: Any) -> Any:
        """Run operation ``op`` with ``args`` (unset ones left out), checked as any request."""
        return self.exchange(protocol.request(op, **args))

    @abstractmethod
    def exchange(self, message: dict[str, Any]) -> Any:
        """Send one request message; return its result or raise the matching ChronosError."""

    @property
    def local_service(self) -> Service | None:
        """The in-process service of an embedded ledger; None through the daemon."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        pass


class EmbeddedTransport(Transport):
    """The ledger opened in this process; for machines with no daemon running."""

    mode = "embedded"

    def __init__(self, home: Path | None = None) -> None:
        from chronos.config import load_config
        from chronos.identity import Caller
        from chronos.ledger import Ledger
        from chronos.service import Service

        home = home or state_dir()
        if os.geteuid() == 0 and is_shared_default(home):
            # Ordinary users can write the shared ledger: root must not let them feed it
            # files, and must not create files there for them to take over.
            raise DaemonUnavailable(
                f"the Chronos daemon is not answering on {socket_path()}, and root does not "
                f"use the shared embedded ledger in {home} (ordinary users can write it): "
                "start chronosd, or set CHRONOS_HOME to a directory of root's"
            )
        private = is_root_embedded(home)
        if private:
            _ensure_root_dir(home)
        else:
            ensure_shared_dir(home)
        path = home / LEDGER_FILE
        if path.exists() and not os.access(path, os.W_OK):
            raise DaemonUnavailable(
                f"the Chronos daemon is not answering on {socket_path()}, and the ledger "
                f"{path} belongs to it; ask an administrator to start chronosd"
            )
        config = load_config()
        ledger = Ledger(path, file_mode=0o644) if private else Ledger(path)
        self.service = Service(ledger, config, self.mode)
        self.caller = Caller.this_process(config.admin_group)
        # One SQLite connection; an API ExpiryMonitor thread may call beside the main thread.
        self._lock = threading.Lock()

    def exchange(self, message: dict[str, Any]) -> Any:
        with self._lock:
            reply = self.service.handle(self.caller, message)  # checked as chronosd checks it
        return _unwrap(reply)

    @property
    def local_service(self) -> Service:
        return self.service

    def close(self) -> None:
        self.service.close()


class SocketTransport(Transport):
    """A connection to ``chronosd`` on its Unix socket."""

    mode = "daemon"

    def __init__(self, path: Path | None = None, timeout: float = 30.0) -> None:
        self.path = path or socket_path()
        self.timeout = timeout
        self._sock = self._connect()

    def _connect(self) -> socket.socket:
        try:
            return connect_daemon(str(self.path), self.timeout)
        except OSError as exc:
            raise DaemonUnavailable(
                f"cannot reach chronosd at {self.path}: {exc.strerror}"
            ) from None

    def exchange(self, message: dict[str, Any]) -> Any:
        frame = protocol.encode(message)
        self._reconnect_if_closed()
        try:
            reply = self._exchange(frame)
        except DaemonUnavailable:
            if message["op"] not in IDEMPOTENT:
                raise
            self._sock.close()
            self._sock = self._connect()
            reply = self._exchange(frame)
        except BaseException:
            # Interrupted (Ctrl-C in a wait) after sending: the reply still to come would
            # be read as the next call's. Go on over a fresh connection instead.
            self._sock.close()
            with contextlib.suppress(DaemonUnavailable):
                self._sock = self._connect()
            raise
        return _unwrap(reply)

    def _reconnect_if_closed(self) -> None:
        """chronosd hangs up on a connection idle for a while (``IDLE_TIMEOUT_S``).

        Nothing of this request was sent on it yet, so a fresh connection is safe for
        any operation, idempotent or not.
        """
        poller = select.poll()  # not recv(MSG_DONTWAIT): a socket timeout makes Python wait
        poller.register(self._sock, select.POLLIN)
        if not poller.poll(0):
            return  # open, nothing to read: the usual case
        try:
            waiting = self._sock.recv(1, socket.MSG_PEEK)
        except OSError:
            waiting = b""
        if waiting:
            return  # a reply is there already (a refusal): the exchange reads it
        self._sock.close()
        self._sock = self._connect()

    def _exchange(self, frame: bytes) -> Any:
        try:
            self._sock.sendall(frame)
            length = protocol.frame_length(recv_exact(self._sock, protocol.HEADER.size))
            return protocol.decode_body(recv_exact(self._sock, length))
        except (OSError, EOFError) as exc:
            raise DaemonUnavailable(
                "chronosd went away before answering; the request may or may not have "
                "taken effect: check with 'chronos list'"
            ) from exc

    def close(self) -> None:
        self._sock.close()


def _unwrap(reply: Any) -> Any:
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ProtocolError("malformed reply")
    if reply["ok"]:
        return reply.get("result")
    err = reply.get("error") or {}
    raise error_from_code(str(err.get("code")), str(err.get("message")))


def _ensure_root_dir(home: Path) -> None:
    """Root's embedded ledger directory: the daemon's, root's alone (0755), on a safe path."""
    check_trusted_path(home)
    try:
        home.mkdir(parents=True, exist_ok=True, mode=0o755)
    except OSError as exc:
        raise DaemonUnavailable(f"cannot create {home}: {exc.strerror}") from None
    check_dir(home)


def connect() -> Transport:
    """The daemon if one answers on the socket, else the embedded ledger.

    ``CHRONOS_MODE=embedded`` or ``=daemon`` forces one. With a daemon configured
    (:func:`daemon_configured`), there is no fallback: wait for it, then fail.
    """
    mode = os.environ.get("CHRONOS_MODE", "auto")
    if mode == "embedded":
        return EmbeddedTransport()
    path = socket_path()
    configured = daemon_configured()
    if mode == "daemon" or configured:
        return _wait_for_daemon(path, configured)
    if path.exists():
        with contextlib.suppress(DaemonUnavailable):
            return SocketTransport(path)
    return EmbeddedTransport()


def daemon_configured() -> str | None:
    """Why this client must use chronosd and nothing else; None where it may go embedded."""
    if os.environ.get("CHRONOS_SOCKET"):
        return "CHRONOS_SOCKET names it"
    marker = state_dir() / LEDGER_ID_FILE
    if os.path.lexists(marker):
        return f"{marker} says a daemon keeps the ledger there"
    return None


def _wait_for_daemon(path: Path, why: str | None) -> SocketTransport:
    """Connect, retrying for a moment: a daemon that is restarting answers again soon."""
    deadline = time.monotonic() + (DAEMON_WAIT_S if why else 0.0)
    while True:
        try:
            return SocketTransport(path)
        except DaemonUnavailable as exc:
            if time.monotonic() >= deadline:
                if why is None:
                    raise
                raise DaemonUnavailable(
                    f"{exc}; Chronos does not fall back to a local ledger because {why} "
                    "(that would fork the state): start chronosd, or ask an administrator"
                ) from None
        time.sleep(_RETRY_S)
