"""How a client reaches the ledger: through the daemon, or in-process.

:class:`Transport` has one method, ``call(op, **args)``. :class:`SocketTransport`
talks to ``chronosd``; :class:`EmbeddedTransport` runs the same
:class:`~chronos.service.Service` in the caller's process over the shared
SQLite ledger. :func:`connect` picks the daemon whenever one answers, so a
machine with a daemon never has a second writer.
"""

from __future__ import annotations

import contextlib
import os
import select
import socket
import threading
from abc import ABC, abstractmethod
from pathlib import Path
from typing import Any

from chronos import protocol
from chronos.errors import DaemonUnavailable, ProtocolError, error_from_code
from chronos.paths import LEDGER_FILE, ensure_shared_dir, socket_path, state_dir

# Operations safe to send again after the daemon went away mid-request.
IDEMPOTENT = frozenset({"ping", "get", "list", "stats", "events"})


class Transport(ABC):
    mode: str = "?"

    @abstractmethod
    def call(self, op: str, **args: Any) -> Any:
        """Run ``op``; return its result or raise the matching ChronosError."""

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
        ensure_shared_dir(home)
        path = home / LEDGER_FILE
        if path.exists() and not os.access(path, os.W_OK):
            raise DaemonUnavailable(
                f"the Chronos daemon is not answering on {socket_path()}, and the ledger "
                f"{path} belongs to it; ask an administrator to start chronosd"
            )
        config = load_config()
        self.service = Service(Ledger(path), config, self.mode)
        self.caller = Caller.this_process(config.admin_group)
        # One SQLite connection; an API ExpiryMonitor thread may call beside the main thread.
        self._lock = threading.Lock()

    def call(self, op: str, **args: Any) -> Any:
        with self._lock:
            reply = self.service.handle(self.caller, protocol.request(op, **args))
        return _unwrap(reply)

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
        sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        sock.settimeout(self.timeout)
        try:
            sock.connect(str(self.path))
        except OSError as exc:
            sock.close()
            raise DaemonUnavailable(
                f"cannot reach chronosd at {self.path}: {exc.strerror}"
            ) from None
        return sock

    def call(self, op: str, **args: Any) -> Any:
        frame = protocol.encode(protocol.request(op, **args))
        self._reconnect_if_closed()
        try:
            reply = self._exchange(frame)
        except DaemonUnavailable:
            if op not in IDEMPOTENT:
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
            length = protocol.frame_length(self._recv(protocol.HEADER.size))
            return protocol.decode_body(self._recv(length))
        except (OSError, EOFError) as exc:
            raise DaemonUnavailable(
                "chronosd went away before answering; the request may or may not have "
                "taken effect: check with 'chronos list'"
            ) from exc

    def _recv(self, n: int) -> bytes:
        chunks = []
        while n:
            chunk = self._sock.recv(n)
            if not chunk:
                raise EOFError
            chunks.append(chunk)
            n -= len(chunk)
        return b"".join(chunks)

    def close(self) -> None:
        self._sock.close()


def _unwrap(reply: Any) -> Any:
    if not isinstance(reply, dict) or "ok" not in reply:
        raise ProtocolError("malformed reply")
    if reply["ok"]:
        return reply.get("result")
    err = reply.get("error") or {}
    raise error_from_code(str(err.get("code")), str(err.get("message")))


def connect() -> Transport:
    """The daemon if one answers on the socket, else the embedded ledger.

    ``CHRONOS_MODE=embedded`` or ``=daemon`` forces one.
    """
    mode = os.environ.get("CHRONOS_MODE", "auto")
    if mode == "embedded":
        return EmbeddedTransport()
    path = socket_path()
    if mode == "daemon" or path.exists():
        try:
            return SocketTransport(path)
        except DaemonUnavailable:
            if mode == "daemon":
                raise
    return EmbeddedTransport()
