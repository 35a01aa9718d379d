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
FD_RESERVE = 128
"""Descriptors kept free of client connections (ledger, pidfds, cgroups, logs)."""
USER_RECEIVE_BUDGET = 1 << 20
"""Bytes of requests being received at once, over all of one user's connections."""
READ_CHUNK = 16 << 10
STREAM_LIMIT = 16 << 10
"""asyncio's reader buffer: it stops reading a socket at twice this much."""
WRITE_BUFFER_HIGH = 256 << 10
"""Unread reply bytes a connection may hold in the daemon before drain waits."""
MAX_UNREAD_REPLIES = 1 << 20
"""Unread reply bytes after which a connection is cut off at once."""
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


class ClientLimit(ChronosError):
    """A connection or request over one of the server's per-user bounds."""

    code = "refused"
    exit_code = 3


class RateLimitedLog:
    """Log lines a client can provoke, at most ``burst`` per ``interval`` per event.

    What is held back is counted and reported (``suppressed``) with the next line
    of that event that gets through, so a storm costs a few lines, not megabytes.
    """

    def __init__(self, interval: float = LOG_INTERVAL_S, burst: int = 5) -> None:
        self.interval = interval
        self.burst = burst
        self._window: dict[str, tuple[float, int, int]] = {}  # event -> (start, sent, held)

    def __call__(self, event: str, level: str = "warning", **fields: Any) -> bool:
        now = time.monotonic()
        start, sent, held = self._window.get(event, (now, 0, 0))
        if now - start >= self.interval:
            start, sent = now, 0
        if sent >= self.burst:
            self._window[event] = (start, sent, held + 1)
            return False
        if held:
            fields["suppressed"] = held
        log(event, level=level, **fields)
        self._window[event] = (start, sent + 1, 0)
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
            await asyncio.wait_for(self._event.wait(), timeout)


class CutOff(Exception):
    """The daemon hangs up on this client (reason logged, rate-limited)."""


class Server:
    def __init__(
        self,
        handle: Callable[[Caller, Any], dict[str, Any]],
        admin_group: Callable[[], str],
        changes: Broadcast | None = None,
        max_connections: int = 4096,
    ) -> None:
        self._handle = handle
        self._admin_group = admin_group
        self._changes = changes or Broadcast()
        self.max_connections = max_connections
        self.connections = 0
        self.requests = 0
        self.refused = 0
        self.per_user: dict[int, int] = defaultdict(int)
        self.receiving: dict[int, int] = defaultdict(int)  # uid -> bytes being received
        self.quiet_log = RateLimitedLog()
        self.on_request: Callable[[str, float], None] = lambda op, seconds: None

    # ------------------------------------------------------------- connections

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        caller: Caller | None = None
        cut_off = False
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, gid = peer_credentials(sock)
            caller = Caller.of_process(uid, gid, pid, self._admin_group())
            refusal = self._admit(caller)
            if refusal is not None:
                caller = None  # not counted: nothing to give back
                self.refused += 1
                self.quiet_log("connection_refused", uid=uid, pid=pid, reason=str(refusal))
                await self._reply(writer, protocol.error(refusal))
                return
            writer.transport.set_write_buffer_limits(high=WRITE_BUFFER_HIGH)
            while await self._one_request(caller, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except CutOff as why:
            cut_off = True
            assert caller is not None
            self.quiet_log("client_cut_off", uid=caller.uid, pid=caller.pid, reason=str(why))
        except Exception as exc:  # noqa: BLE001 - one client must never take the daemon down
            self.quiet_log("client_error", level="error", error=repr(exc))
        finally:
            if caller is not None:
                self._leave(caller)
            if cut_off:
                writer.transport.abort()  # now: the replies it does not read are dropped
            else:
                writer.close()

    def _admit(self, caller: Caller) -> ClientLimit | None:
        """Count a new connection in, or say which limit it is over."""
        if self.connections >= self.max_connections:
            return ClientLimit(
                f"chronosd is at its limit of {self.max_connections} connections; try again"
            )
        limit = self.user_limit(caller)
        if limit is not None and self.per_user[caller.uid] >= limit:
            return ClientLimit(f"too many connections from uid {caller.uid} (limit {limit})")
        self.connections += 1
        self.per_user[caller.uid] += 1
        return None

    def _leave(self, caller: Caller) -> None:
        self.connections -= 1
        self.per_user[caller.uid] -= 1
        if not self.per_user[caller.uid]:
            del self.per_user[caller.uid]

    @staticmethod
    def user_limit(caller: Caller) -> int | None:
        if caller.uid == 0:
            return None
        return MAX_CONNECTIONS_PER_ADMIN if caller.is_admin else MAX_CONNECTIONS_PER_USER

    # ---------------------------------------------------------------- requests

    async def _one_request(
        self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        header = await asyncio.wait_for(reader.readexactly(protocol.HEADER.size), IDLE_TIMEOUT_S)
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
            return await asyncio.wait_for(self._read_chunks(reader, length), READ_TIMEOUT_S)
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
        """``(op for the metrics, reply)``: the schema is checked before any handler runs."""
        op = "invalid"
        try:
            message = protocol.decode_body(body)
            op, args = protocol.validate(message)
            reply = self._timed(caller, op, message)
            if op == "wait" and reply.get("ok"):
                reply = await self._long_poll(caller, message, args, reply)
        except ChronosError as exc:
            reply = protocol.error(exc)
        return op, reply

    def _timed(self, caller: Caller, op: str, message: Any) -> dict[str, Any]:
        """One handler call, timed; a slow one is logged, a crashing one still answered."""
        started = time.perf_counter()
        try:
            reply = self._handle(caller, message)
        except Exception as exc:  # noqa: BLE001 - a bug in one op must not cost the reply
            log("request_failed", level="error", op=op, uid=caller.uid, error=repr(exc))
            reply = protocol.error(ChronosError(f"internal error in {op}; see the daemon log"))
        elapsed = time.perf_counter() - started
        if elapsed > SLOW_REQUEST_S:
            self.quiet_log(
                "slow_request", op=op, uid=caller.uid, pid=caller.pid, ms=round(elapsed * 1e3, 1)
            )
        return reply

    async def _long_poll(
        self, caller: Caller, message: Any, args: dict[str, Any], reply: dict[str, Any]
    ) -> dict[str, Any]:
        """Hold a ``wait`` until its ticket changes state or ``max_wait`` passes."""
        max_wait = args.get("max_wait", 0)
        deadline = time.monotonic() + min(max(0.0, float(max_wait)), LONG_POLL_MAX_S)
        while reply.get("ok") and _state_of(reply) == "waiting":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._changes.wait(left)
            reply = self._timed(caller, "wait", message)
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
            await asyncio.wait_for(writer.drain(), WRITE_TIMEOUT_S)
        except TimeoutError:
            raise CutOff(f"replies not read for {WRITE_TIMEOUT_S:g} s") from None


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

    def __init__(self, sock: socket.socket, server: Server, quiet_log: RateLimitedLog) -> None:
        self._sock = sock
        self._server = server
        self._log = quiet_log
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
            task = self._loop.create_task(self._serve(conn))
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

    async def _serve(self, conn: socket.socket) -> None:
        try:
            reader, writer = await asyncio.open_unix_connection(sock=conn, limit=STREAM_LIMIT)
        except OSError:
            conn.close()
            return
        await self._server.serve_client(reader, writer)
