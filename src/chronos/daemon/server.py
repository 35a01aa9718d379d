"""The daemon's Unix socket: framing, peer credentials, one task per client.

The caller's identity comes from ``SO_PEERCRED`` (read by the kernel when the
client connected), never from the message. A client that sends garbage, too
much, or too little gets an error reply or is disconnected; it never blocks
other clients, because each connection is its own task and the service calls
are short.

Every resource a client can make the daemon hold is bounded, the way sshd
bounds unauthenticated connections (``MaxStartups``) and systemd bounds its
socket units:

* descriptors: at most ``MAX_CONNECTIONS_PER_USER`` connections per uid (more
  for administrators, none for root), and all connections together stay
  ``FD_RESERVE`` descriptors below the process's limit, so that the ledger,
  pidfds and cgroup files always have descriptors. A connection over a limit
  gets one error frame saying which limit, then is closed.
* time: a connection with no request in flight is closed after
  ``IDLE_TIMEOUT_S``; a started frame must arrive within ``READ_TIMEOUT_S``; a
  reply must drain within ``WRITE_TIMEOUT_S`` (a client that pipelines requests
  and never reads its replies is cut off). A long-poll ``wait`` is a request
  in flight: it may block up to ``LONG_POLL_MAX_S``.
* memory: a request is at most ``protocol.MAX_REQUEST`` bytes, read in chunks
  and counted against the sender's ``USER_RECEIVE_BUDGET`` (bytes of frames
  being received by all its connections), and the asyncio buffers are small.
* the event loop: every handler call is timed; one over ``SLOW_REQUEST_S`` is
  logged (``slow_request``: op, uid, pid, ms), rate-limited like every other
  line a client can provoke (``RateLimitedLog``).

Accepting is our own loop (:class:`Listener`), not asyncio's: asyncio's logs a
traceback per failed ``accept()`` and, on EMFILE, keeps calling ``accept()`` up
to ``backlog`` times in the same tick, which wrote 64–112 MB of log in under a
minute during a connection flood.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import functools
import socket
import struct
import time
from collections import defaultdict
from collections.abc import Callable
from typing import Any

from chronos import protocol
from chronos.daemon.log import log
from chronos.errors import ChronosError, ProtocolError
from chronos.identity import Caller
from chronos.messages import WaitRequest, op_of

READ_TIMEOUT_S = 5.0
"""Longest a started frame may take to arrive in full."""
IDLE_TIMEOUT_S = 30.0
"""A connection with no request in flight is closed after this long."""
WRITE_TIMEOUT_S = 5.0
"""Longest a reply may wait for the client to read it (drain)."""
LONG_POLL_MAX_S = 5.0
MAX_CONNECTIONS_PER_USER = 64
MAX_CONNECTIONS_PER_ADMIN = 256
"""Members of the admin group (dashboards, monitoring); root has no per-user limit."""
ADMIN_CACHE_S = 30.0
FD_RESERVE = 128
"""Descriptors kept free of client connections (ledger, pidfds, cgroups, logs)."""
USER_RECEIVE_BUDGET = 1 << 20
"""Bytes of requests being received at once, over all of one user's connections."""
READ_CHUNK = 16 << 10
STREAM_LIMIT = 16 << 10
"""asyncio's reader buffer: it stops reading a socket at twice this much."""
WRITE_BUFFER_HIGH = 256 << 10
"""Unread reply bytes a connection may hold in the daemon before drain waits."""
MAX_UNREAD_REPLIES = protocol.MAX_FRAME + WRITE_BUFFER_HIGH
"""Unread reply bytes after which a connection is cut off at once (one largest reply
never is: a client that reads its replies has at most one pending)."""
SLOW_REQUEST_S = 0.005
LOG_INTERVAL_S = 10.0
"""Provokable log lines: at most a few per interval per kind, then one count."""
ACCEPT_BATCH = 64
ACCEPT_RETRY_S = 0.5
_UCRED = struct.Struct("3i")
_OUT_OF_DESCRIPTORS = (errno.EMFILE, errno.ENFILE, errno.ENOBUFS, errno.ENOMEM)


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


class ClientLimit(ChronosError, code="refused", exit_code=3):
    """A connection or request over one of the server's per-user bounds."""


class RateLimitedLog:
    """Log lines a client can provoke, at most ``burst`` per ``interval`` per event.

    What is held back is counted and reported (``suppressed``) with the next line
    of that event that gets through, so a storm costs a few lines, not megabytes.
    """

    def __init__(self, interval: float = LOG_INTERVAL_S, burst: int = 5) -> None:
        self.interval = interval
        self.burst = burst
        self._window: dict[str, tuple[float, int, int]] = {}  # event -> (start, sent, held)

    def __call__(self, event: str, level: str = "warning", key: str = "", **fields: Any) -> bool:
        """Log ``event`` unless its window (``event`` and ``key``) is full; True if logged."""
        window = f"{event}:{key}"
        now = time.monotonic()
        start, sent, held = self._window.get(window, (now, 0, 0))
        if now - start >= self.interval:
            start, sent = now, 0
            if len(self._window) > 1024:  # keys come from clients (an op name): stay small
                self._window.clear()
        if sent >= self.burst:
            self._window[window] = (start, sent, held + 1)
            return False
        if held:
            fields["suppressed"] = held
        log(event, level=level, **fields)
        self._window[window] = (start, sent + 1, 0)
        return True


class Broadcast:
    """Wakes every coroutine waiting for "something changed" at once."""

    def __init__(self) -> None:
        self._event = asyncio.Event()

    def notify(self) -> None:
        self._event.set()
        self._event = asyncio.Event()

    async def wait(self, timeout: float) -> None:
        with contextlib.suppress(TimeoutError):
            async with asyncio.timeout(timeout):
                await self._event.wait()


class CutOff(Exception):
    """The daemon hangs up on this client (reason logged, rate-limited)."""


class Server:
    def __init__(
        self,
        handle: Callable[[Caller, protocol.CheckedMessage], dict[str, Any]],
        admin_group: Callable[[], str],
        changes: Broadcast | None = None,
        max_connections: int = 4096,
        *,
        quiet_log: RateLimitedLog | None = None,
        on_request: Callable[[str, float], None] = lambda op, seconds: None,
    ) -> None:
        """``handle`` runs a request that passed the schema (``Service.handle``);
        ``quiet_log`` takes the lines a client can provoke; ``on_request(op, seconds)``
        is told of every request answered (the metrics)."""
        self._handle = handle
        self._admin_group = admin_group
        self._changes = changes or Broadcast()
        self.max_connections = max_connections
        self.connections = 0
        self.requests = 0
        self.refused = 0
        self.per_user: dict[int, int] = defaultdict(int)
        self.receiving: dict[int, int] = defaultdict(int)  # uid -> bytes being received
        self._admins: dict[int, tuple[bool, float]] = {}  # uid -> (is admin, when looked up)
        self.quiet_log = quiet_log or RateLimitedLog()
        self.on_request = on_request

    # ------------------------------------------------------------- connections

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve one connection from its start (asyncio's ``start_unix_server`` callback)."""
        try:
            pid, uid, gid = peer_credentials(writer.get_extra_info("socket"))
        except OSError:
            writer.close()
            return
        admitted = self.admit(pid, uid, gid)
        if isinstance(admitted, ClientLimit):
            with contextlib.suppress(ConnectionError, CutOff):
                await self._reply(writer, protocol.error(admitted))
            writer.close()
            return
        await self.serve_admitted(admitted, reader, writer)

    async def serve_admitted(
        self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        """Serve a connection :meth:`admit` counted in, until it ends; then count it out."""
        cut_off = False
        try:
            writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
            while await self._one_request(caller, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except CutOff as why:
            cut_off = True
            self.quiet_log("client_cut_off", uid=caller.uid, pid=caller.pid, reason=str(why))
        except Exception as exc:  # noqa: BLE001 - one client must never take the daemon down
            self.quiet_log("client_error", level="error", error=repr(exc))
        finally:
            self.leave(caller)
            if cut_off:
                writer.transport.abort()  # now: the replies it does not read are dropped
            else:
                writer.close()

    def admit(self, pid: int, uid: int, gid: int) -> Caller | ClientLimit:
        """Count a new connection in (its Caller), or say which limit it is over.

        Cheap on the refusal path, which a flooder drives as fast as it can connect:
        counters only, and the admin-group lookup (for the higher limit) at most once
        per ``ADMIN_CACHE_S`` per uid.
        """
        refusal = self._over_limit(pid, uid, gid)
        if refusal is not None:
            self.refused += 1
            self.quiet_log("connection_refused", uid=uid, pid=pid, reason=str(refusal))
            return refusal
        caller = Caller.of_process(uid, gid, pid, self._admin_group())
        self.connections += 1
        self.per_user[uid] += 1
        return caller

    def _over_limit(self, pid: int, uid: int, gid: int) -> ClientLimit | None:
        if self.connections >= self.max_connections:
            return ClientLimit(
                f"chronosd is at its limit of {self.max_connections} connections; try again"
            )
        held = self.per_user.get(uid, 0)
        if uid == 0 or held < MAX_CONNECTIONS_PER_USER:
            return None
        limit = MAX_CONNECTIONS_PER_ADMIN if self._is_admin(pid, uid, gid) else None
        if limit is not None and held < limit:
            return None
        limit = limit or MAX_CONNECTIONS_PER_USER
        return ClientLimit(f"too many connections from uid {uid} (limit {limit})")

    def _is_admin(self, pid: int, uid: int, gid: int) -> bool:
        now = time.monotonic()
        known = self._admins.get(uid)
        if known is None or now - known[1] > ADMIN_CACHE_S:
            known = (Caller.of_process(uid, gid, pid, self._admin_group()).is_admin, now)
            self._admins[uid] = known
        return known[0]

    def leave(self, caller: Caller) -> None:
        self.connections -= 1
        self.per_user[caller.uid] -= 1
        if not self.per_user[caller.uid]:
            del self.per_user[caller.uid]

    # ---------------------------------------------------------------- requests

    async def _one_request(
        self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        # asyncio.timeout, not wait_for: no task made per await (three per request).
        async with asyncio.timeout(IDLE_TIMEOUT_S):
            header = await reader.readexactly(protocol.HEADER.size)
        try:
            length = protocol.frame_length(header, protocol.MAX_REQUEST)
        except ProtocolError as exc:
            await self._reply(writer, protocol.error(exc))
            return False  # cannot find the next frame boundary: hang up
        body = await self._read_body(caller, reader, writer, length)
        if body is None:
            return False
        started = time.perf_counter()
        op, reply = await self._answer(caller, body)
        self.requests += 1
        self.on_request(op, time.perf_counter() - started)
        await self._reply(writer, reply)
        return True

    async def _read_body(
        self,
        caller: Caller,
        reader: asyncio.StreamReader,
        writer: asyncio.StreamWriter,
        length: int,
    ) -> bytes | None:
        """The frame's body, read in chunks and counted against the user's budget.

        None (after an error reply) where the user already has too many bytes in
        flight: the daemon then hangs up, as it cannot skip the frame unread.
        """
        exempt = caller.uid == 0
        if not exempt and self.receiving[caller.uid] + length > USER_RECEIVE_BUDGET:
            refusal = ClientLimit(
                f"too much request data in flight from uid {caller.uid} "
                f"(limit {USER_RECEIVE_BUDGET} bytes)"
            )
            self.quiet_log("request_refused", uid=caller.uid, pid=caller.pid, reason=str(refusal))
            await self._reply(writer, protocol.error(refusal))
            return None
        self.receiving[caller.uid] += length
        try:
            async with asyncio.timeout(READ_TIMEOUT_S):
                return await self._read_chunks(reader, length)
        finally:
            self.receiving[caller.uid] -= length
            if not self.receiving[caller.uid]:
                del self.receiving[caller.uid]

    @staticmethod
    async def _read_chunks(reader: asyncio.StreamReader, length: int) -> bytes:
        body = bytearray()
        while len(body) < length:
            chunk = await reader.read(min(READ_CHUNK, length - len(body)))
            if not chunk:
                raise asyncio.IncompleteReadError(bytes(body), length)
            body += chunk
        return bytes(body)

    async def _answer(self, caller: Caller, body: bytes) -> tuple[str, dict[str, Any]]:
        """``(op for the metrics, reply)``: the schema is checked, once, before any handler
        runs; the handler gets the typed request."""
        op = "invalid"
        try:
            message = protocol.CheckedMessage.of(protocol.decode_body(body))
            op = op_of(message.request)
            reply = self._timed(caller, message)
            if isinstance(message.request, WaitRequest) and reply.get("ok"):
                reply = await self._long_poll(caller, message, message.request.max_wait, reply)
        except ChronosError as exc:
            reply = protocol.error(exc)
        return op, reply

    def _timed(self, caller: Caller, message: protocol.CheckedMessage) -> dict[str, Any]:
        """One handler call, timed; a slow one is logged, a crashing one still answered."""
        op = op_of(message.request)
        started = time.perf_counter()
        try:
            reply = self._handle(caller, message)
        except Exception as exc:  # noqa: BLE001 - a bug in one op must not cost the reply
            log("request_failed", level="error", op=op, uid=caller.uid, error=repr(exc))
            reply = protocol.error(ChronosError(f"internal error in {op}; see the daemon log"))
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_REQUEST_S:
            self.quiet_log(
                "slow_request",
                key=op,  # one slow op must not hide another
                op=op,
                uid=caller.uid,
                pid=caller.pid,
                ms=round(elapsed * 1e3, 1),
            )
        return reply

    async def _long_poll(
        self,
        caller: Caller,
        message: protocol.CheckedMessage,
        max_wait: float,
        reply: dict[str, Any],
    ) -> dict[str, Any]:
        """Hold a ``wait`` until its ticket changes state or ``max_wait`` passes."""
        deadline = time.monotonic() + min(max(0.0, float(max_wait)), LONG_POLL_MAX_S)
        while reply.get("ok") and _state_of(reply) == "waiting":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._changes.wait(left)
            reply = self._timed(caller, message)
        return reply

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        """Send one reply; a client that does not read its replies is cut off."""
        try:
            frame = protocol.encode(reply)
        except ProtocolError as exc:
            frame = protocol.encode(protocol.error(exc))
        writer.write(frame)
        unread = writer.transport.get_write_buffer_size()
        if unread > MAX_UNREAD_REPLIES:
            raise CutOff(f"{unread} bytes of replies not read")
        try:
            async with asyncio.timeout(WRITE_TIMEOUT_S):
                await writer.drain()
        except TimeoutError:
            raise CutOff(f"replies not read for {WRITE_TIMEOUT_S:g} s") from None


@functools.lru_cache(maxsize=256)
def _refusal_frame(message: str) -> bytes:
    """The encoded refusal (a flooder gets the same few, thousands of times a second)."""
    return protocol.encode(protocol.error(ClientLimit(message)))


def _state_of(reply: dict[str, Any]) -> Any:
    result = reply.get("result")
    return result.get("state") if isinstance(result, dict) else None


# ------------------------------------------------------------------- accepting


class Listener:
    """Accepts on a listening Unix socket, bounded per tick, with quiet EMFILE handling.

    Out of descriptors (EMFILE and kin), it stops accepting for ``ACCEPT_RETRY_S``
    and logs one line per interval with the count of failures, instead of
    asyncio's traceback per failure.
    """

    def __init__(
        self,
        sock: socket.socket,
        server: Server,
        quiet_log: RateLimitedLog,
        on_admitted: Callable[[int], None] | None = None,
    ) -> None:
        """``on_admitted(uid)`` runs after each admission (the shared socket opens users' own)."""
        self._sock = sock
        self._server = server
        self._log = quiet_log
        self._on_admitted = on_admitted
        self._loop = asyncio.get_running_loop()
        self._tasks: set[asyncio.Task[None]] = set()
        self._retry: asyncio.TimerHandle | None = None
        self._closed = False
        self.accept_errors = 0
        sock.setblocking(False)

    def start(self) -> None:
        self._retry = None
        if not self._closed:
            self._loop.add_reader(self._sock.fileno(), self._accept_some)

    def close(self) -> None:
        self._closed = True
        if self._retry is not None:
            self._retry.cancel()
        with contextlib.suppress(ValueError, OSError):
            self._loop.remove_reader(self._sock.fileno())
        self._sock.close()
        for task in list(self._tasks):
            task.cancel()

    def _accept_some(self) -> None:
        for _ in range(ACCEPT_BATCH):
            try:
                conn, _ = self._sock.accept()
            except (BlockingIOError, InterruptedError, ConnectionAbortedError):
                return
            except OSError as exc:
                self._accept_failed(exc)
                return
            self._take(conn)

    def _take(self, conn: socket.socket) -> None:
        """Admit ``conn`` (a task serves it) or refuse it here and now, with no task.

        A refused connection costs a getsockopt, a send and a close: a flooder that
        reconnects at once cannot fill the listen backlog that other users share.
        """
        try:
            pid, uid, gid = peer_credentials(conn)
        except OSError:
            conn.close()
            return
        admitted = self._server.admit(pid, uid, gid)
        if isinstance(admitted, ClientLimit):
            conn.setblocking(False)
            with contextlib.suppress(OSError):
                conn.send(_refusal_frame(str(admitted)))  # small: fits the socket buffer
            conn.close()
            return
        if self._on_admitted is not None:
            self._on_admitted(uid)
        task = self._loop.create_task(self._serve(conn, admitted))
        self._tasks.add(task)
        task.add_done_callback(self._tasks.discard)

    def _accept_failed(self, exc: OSError) -> None:
        self.accept_errors += 1
        self._log(
            "accept_failed",
            level="error",
            error=exc.strerror or repr(exc),
            total=self.accept_errors,
        )
        if exc.errno in _OUT_OF_DESCRIPTORS:
            # The socket stays readable while the backlog is full: pause, or spin.
            self._loop.remove_reader(self._sock.fileno())
            self._retry = self._loop.call_later(ACCEPT_RETRY_S, self.start)

    async def _serve(self, conn: socket.socket, caller: Caller) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=STREAM_LIMIT)
        except OSError:
            self._server.leave(caller)
            conn.close()
            return
        await self._server.serve_admitted(caller, reader, writer)
