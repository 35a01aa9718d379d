"""Helpers for the daemon tests: raw protocol frames and CLI output checks.

The daemon runner (:class:`DaemonProcess`) and the accounts (:class:`TestUser`)
live in ``chronos_testing``, shared with the other test folders.
"""

from __future__ import annotations

import json
import socket
import struct
from pathlib import Path
from typing import Any

from chronos_testing import (
    DaemonProcess,
    TestUser,
    json_out,
    shared_tmpdir,
    wait_for,
)
from helpers import assert_one_line_error as assert_one_line_error  # re-exported

__all__ = [
    "DaemonProcess",
    "TestUser",
    "assert_one_line_error",
    "frame",
    "json_out",
    "raw_connect",
    "recv_exactly",
    "recv_reply",
    "request_frame",
    "shared_tmpdir",
    "wait_for",
]


# ---------------------------------------------------------------------------- frames


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request_frame(message: Any) -> bytes:
    return frame(json.dumps(message).encode())


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None if the peer closed first."""
    chunks = []
    while n:
        try:
            chunk = sock.recv(n)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_reply(sock: socket.socket) -> Any | None:
    """The next reply on ``sock``, or None if the daemon hung up instead."""
    header = recv_exactly(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    body = recv_exactly(sock, length)
    if body is None:
        return None
    return json.loads(body)


def raw_connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock
