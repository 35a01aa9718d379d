"""The daemon's wire protocol: length-prefixed JSON messages with a schema.

A frame is a 4-byte big-endian length then that many bytes of UTF-8 JSON.
A request is ``{"v": 1, "op": NAME, "args": {...}}``; a reply is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``.
Every request is checked against ``OPS`` before anything acts on it; the
caller's identity never travels in a message (the daemon reads it from the
kernel).
"""

from __future__ import annotations

import json
import struct
from typing import Any

from chronos.errors import BadRequest, ChronosError, ProtocolError

VERSION = 1
MAX_FRAME = 1 << 20
HEADER = struct.Struct(">I")

_NUM = (int, float)
_SPEC = (str, int, float)
# op -> {arg: (accepted types, required)}
OPS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {},
    "create": {
        "device": ((int,), True),
        "memory": (_SPEC, True),
        "duration": (_SPEC, True),
        "user": ((str,), False),
        "persist": ((bool,), False),
        "kind": ((str,), False),
        "grace": (_SPEC, False),
        "warn": (_SPEC, False),
        "warn_signal": ((str,), False),
        "start": (_NUM, False),
        "wait": ((bool,), False),
        "timeout": (_NUM, False),
    },
    "wait": {"id": ((str,), True), "max_wait": (_NUM, False)},
    "cancel": {"id": ((str,), True)},
    "queue": {"limit": ((int,), False), "after": ((int,), False)},
    "usage": {"since": (_NUM, False), "user": ((str,), False)},
    "release": {"id": ((str,), True)},
    "get": {"id": ((str,), True)},
    "list": {"all": ((bool,), False), "limit": ((int,), False), "after": ((int,), False)},
    "stats": {"processes": ((bool,), False)},
    "attach": {"id": ((str,), True), "pid": ((int,), True)},
    "attached_pids": {"id": ((str,), True)},
    "extend": {"id": ((str,), True), "duration": (_SPEC, True)},
    "events": {
        "since": (_NUM, False),
        "id": ((str,), False),
        "limit": ((int,), False),
        "after": ((int,), False),
    },
}


def request(op: str, **args: Any) -> dict[str, Any]:
    return {"v": VERSION, "op": op, "args": {k: v for k, v in args.items() if v is not None}}


def validate(message: Any) -> tuple[str, dict[str, Any]]:
    """Check a decoded request; return ``(op, args)`` or raise."""
    if not isinstance(message, dict):
        raise ProtocolError("a request must be a JSON object")
    if message.get("v") != VERSION:
        raise ProtocolError(f"unsupported protocol version {message.get('v')!r} (want {VERSION})")
    op = message.get("op")
    if not isinstance(op, str) or op not in OPS:
        raise ProtocolError(f"unknown operation {op!r}")
    args = message.get("args", {})
    if not isinstance(args, dict):
        raise ProtocolError("args must be a JSON object")
    spec = OPS[op]
    for name in args:
        if name not in spec:
            raise BadRequest(f"{op}: unknown argument {name!r}")
    for name, (types, required) in spec.items():
        if name not in args:
            if required:
                raise BadRequest(f"{op}: missing argument {name!r}")
            continue
        value = args[name]
        # bool is an int in Python; accept it only where bool is asked for.
        if isinstance(value, bool) and bool not in types:
            raise BadRequest(f"{op}: {name} has the wrong type")
        if not isinstance(value, types):
            raise BadRequest(f"{op}: {name} has the wrong type")
    return op, args


def ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error(exc: ChronosError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError("message too large")
    return HEADER.pack(len(body)) + body


def decode_body(body: bytes) -> Any:
    try:
        return json.loads(body)
    except (ValueError, RecursionError):  # ValueError: bad UTF-8, bad JSON, int over 4300 digits
        raise ProtocolError("message is not valid JSON") from None


def frame_length(header: bytes) -> int:
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"message of {length} bytes is over the {MAX_FRAME}-byte limit")
    return int(length)
