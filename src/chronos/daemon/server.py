"""The daemon's Unix socket: framing, peer credentials, one task per client.

The caller's identity comes from ``SO_PEERCRED`` (read by the kernel when the
client connected), never from the message. A client that sends garbage, too
much, or too little gets an error reply or is disconnected; it never blocks
other clients, because each connection is its own task and the service calls
are short.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import struct
import time
from collections.abc import Callable
from typing import Any

from chronos import protocol
from chronos.daemon.log import log
from chronos.errors import ChronosError, ProtocolError
from chronos.identity import Caller

READ_TIMEOUT_S = 10.0
"""Longest a started frame may take to arrive in full."""
IDLE_TIMEOUT_S = 3600.0
LONG_POLL_MAX_S = 5.0
_UCRED = struct.Struct("3i")


def peer_credentials(sock: socket.socket) -> tuple[int, int, int]:
    """``(pid, uid, gid)`` of the process at the other end, from the kernel."""
    raw = sock.getsockopt(socket.SOL_SOCKET, socket.SO_PEERCRED, _UCRED.size)
    pid, uid, gid = _UCRED.unpack(raw)
    return pid, uid, gid


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


class Server:
    def __init__(
        self,
        handle: Callable[[Caller, Any], dict[str, Any]],
        admin_group: Callable[[], str],
        changes: Broadcast | None = None,
    ) -> None:
        self._handle = handle
        self._admin_group = admin_group
        self._changes = changes or Broadcast()
        self.connections = 0
        self.requests = 0
        self.on_request: Callable[[str, float], None] = lambda op, seconds: None

    async def serve_client(
        self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> None:
        self.connections += 1
        try:
            sock = writer.get_extra_info("socket")
            pid, uid, gid = peer_credentials(sock)
            caller = Caller.of_process(uid, gid, pid, self._admin_group())
            while await self._one_request(caller, reader, writer):
                pass
        except (ConnectionError, asyncio.IncompleteReadError, TimeoutError):
            pass
        except Exception as exc:  # noqa: BLE001 - one client must never take the daemon down
            log("client_error", level="error", error=repr(exc))
        finally:
            self.connections -= 1
            writer.close()

    async def _one_request(
        self, caller: Caller, reader: asyncio.StreamReader, writer: asyncio.StreamWriter
    ) -> bool:
        header = await asyncio.wait_for(reader.readexactly(protocol.HEADER.size), IDLE_TIMEOUT_S)
        try:
            length = protocol.frame_length(header)
        except ProtocolError as exc:
            await self._reply(writer, protocol.error(exc))
            return False  # cannot find the next frame boundary: hang up
        body = await asyncio.wait_for(reader.readexactly(length), READ_TIMEOUT_S)
        started = time.perf_counter()
        op = "?"
        try:
            message = protocol.decode_body(body)
            if isinstance(message, dict) and isinstance(message.get("op"), str):
                op = message["op"][:32]
            reply = self._handle(caller, message)
            if op == "wait":
                reply = await self._long_poll(caller, message, reply)
        except ChronosError as exc:
            reply = protocol.error(exc)
        self.requests += 1
        self.on_request(op if op in protocol.OPS else "invalid", time.perf_counter() - started)
        await self._reply(writer, reply)
        return True

    async def _long_poll(
        self, caller: Caller, message: Any, reply: dict[str, Any]
    ) -> dict[str, Any]:
        """Hold a ``wait`` until its ticket changes state or ``max_wait`` passes."""
        args = message.get("args") or {}
        max_wait = args.get("max_wait", 0)
        if not isinstance(max_wait, (int, float)) or isinstance(max_wait, bool):
            return reply
        deadline = time.monotonic() + min(max(0.0, float(max_wait)), LONG_POLL_MAX_S)
        while reply.get("ok") and reply["result"].get("state") == "waiting":
            left = deadline - time.monotonic()
            if left <= 0:
                break
            await self._changes.wait(left)
            reply = self._handle(caller, message)
        return reply

    @staticmethod
    async def _reply(writer: asyncio.StreamWriter, reply: dict[str, Any]) -> None:
        try:
            frame = protocol.encode(reply)
        except ProtocolError as exc:
            frame = protocol.encode(protocol.error(exc))
        writer.write(frame)
        await writer.drain()
