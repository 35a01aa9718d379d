"""The daemon's wire protocol: length-prefixed JSON messages with a schema.

A frame is a 4-byte big-endian length then that many bytes of UTF-8 JSON.
A request is ``{"v": 1, "op": NAME, "args": {...}}``; a reply is
``{"ok": true, "result": ...}`` or ``{"ok": false, "error": {"code", "message"}}``.
Every request is checked against ``OPS`` (derived from the request classes of
:mod:`chronos.messages`) and made its typed request before anything acts on it; the
caller's identity never travels in a message (the daemon reads it from the
kernel).

A request is checked in order of cost, so that no input makes the daemon do
more than a bounded amount of work before it is refused: its length (from the
header, before a byte of the body is read: ``MAX_REQUEST``), then its JSON
(``NaN``/``Infinity`` refused), then its schema, where every string has a
length bound and every number a range (SQLite INTEGER at most, and a sane range
per field: a device index, a pid) and floats are finite. Only then do the
parsers of memory and duration strings see it. Replies may be larger
(``MAX_FRAME``): a listing is bigger than any request.
"""

from __future__ import annotations

import json
import math
import struct
from typing import Any

from chronos import messages
from chronos.errors import BadRequest, ChronosError, ProtocolError

VERSION = 1
MAX_FRAME = 1 << 20
"""Largest frame either side accepts (replies can be this big)."""
MAX_REQUEST = 64 << 10
"""Largest request the daemon reads: requests are small, 64 KiB is plenty."""
HEADER = struct.Struct(">I")

SQLITE_INT_MIN, SQLITE_INT_MAX = -(2**63), 2**63 - 1
MAX_STRING = 256
"""Longest string argument (ids, user names, signal names, kinds)."""
MAX_SPEC = 64
"""Longest memory/duration string (``"10GiB"``, ``"1h30m"``): checked before any parsing."""
PID_MAX = 1 << 22
"""The kernel's PID_MAX_LIMIT: no pid is larger."""
MAX_DEVICE = 1023
MAX_GROUP = 64
"""Most GPUs in one group (a request names or asks for at most this many)."""
MAX_SECONDS = 1e11
"""Bound of any time or span in seconds (epoch seconds of the year 5138): finite and sane."""


OPS: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    op: messages.schema_of(cls) for op, cls in messages.REQUESTS.items()
}
"""op -> {arg: (accepted types, required)}, read off the request classes of
:mod:`chronos.messages` (the one place each operation's arguments are written)."""


def request(op: str, **args: Any) -> dict[str, Any]:
    """A request message from an operation's name and arguments (unset ones left out)."""
    return {"v": VERSION, "op": op, "args": {k: v for k, v in args.items() if v is not None}}


def message_of(req: messages.Request) -> dict[str, Any]:
    """The wire message of a typed request."""
    return {"v": VERSION, "op": messages.op_of(req), "args": messages.wire_args(req)}


def parse_request(message: Any) -> messages.Request:
    """A decoded request, checked (:func:`validate`) and made its operation's type.

    The daemon's server and the embedded transport both come through here, so a
    request is checked the same way in both modes; a :class:`CheckedMessage` was
    checked already and is not checked again.
    """
    if isinstance(message, CheckedMessage):
        return message.request
    op, args = validate(message)
    return messages.REQUESTS[op](**args)


class CheckedMessage(dict[str, Any]):
    """A request message that passed the schema, with its typed request (``request``).

    The daemon's server checks each message once, at the edge, and hands on this:
    still the message (a handler may read it as one), and :func:`parse_request`
    returns its request without checking it again.
    """

    __slots__ = ("request",)

    def __init__(self, message: dict[str, Any], request: messages.Request) -> None:
        super().__init__(message)
        self.request = request

    @classmethod
    def of(cls, message: Any) -> CheckedMessage:
        """Check ``message`` (raises as :func:`validate` does)."""
        return cls(message, parse_request(message))


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
        check_bounds(op, name, value)
    return op, args


# arg -> (lowest, highest) where a field has a narrower range than a generic number.
RANGES: dict[str, tuple[float, float]] = {
    "device": (0, MAX_DEVICE),
    "pid": (1, PID_MAX),
    "start": (-MAX_SECONDS, MAX_SECONDS),
    "since": (-MAX_SECONDS, MAX_SECONDS),
    "timeout": (-MAX_SECONDS, MAX_SECONDS),
    "max_wait": (-MAX_SECONDS, MAX_SECONDS),
    "gpus": (1, MAX_GROUP),
}
SPEC_ARGS = frozenset({"memory", "duration", "grace", "warn"})


def check_bounds(op: str, name: str, value: Any) -> None:
    """Refuse a string too long or a number out of its field's range (or not finite)."""
    if isinstance(value, bool):
        return
    if isinstance(value, list) and name == "devices":  # GPU indices
        if not value or len(value) > MAX_GROUP:
            raise BadRequest(f"{op}: {name} must list 1 to {MAX_GROUP} GPUs")
        for item in value:
            if isinstance(item, bool) or not isinstance(item, int):
                raise BadRequest(f"{op}: {name} must list GPU indices")
            check_bounds(op, "device", item)
        return
    if isinstance(value, (list, dict)):
        _check_container(op, name, value)
        return
    if isinstance(value, str):
        limit = MAX_SPEC if name in SPEC_ARGS else MAX_STRING
        if len(value) > limit:
            raise BadRequest(f"{op}: {name} is longer than {limit} characters")
        return
    if isinstance(value, float) and not math.isfinite(value):
        raise BadRequest(f"{op}: {name} must be a finite number")
    if isinstance(value, (int, float)):
        low, high = RANGES.get(name, (SQLITE_INT_MIN, SQLITE_INT_MAX))
        if not low <= value <= high:  # int vs float compare exactly in Python: no overflow
            raise BadRequest(f"{op}: {name} is out of range ({low:g} to {high:g})")


def _check_container(op: str, name: str, value: list[Any] | dict[str, Any]) -> None:
    """An array of strings (``argv``) or an object of strings (``env``); a nested object
    (``partition``) is checked as the request it is, by the service. The frame's 64 KiB
    bounds their size."""
    if name == "partition":
        return
    items = list(value.items()) if isinstance(value, dict) else [("", v) for v in value]
    if not all(isinstance(k, str) and isinstance(v, str) for k, v in items):
        raise BadRequest(f"{op}: {name} must hold only strings")


def ok(result: Any) -> dict[str, Any]:
    return {"ok": True, "result": result}


def error(exc: ChronosError) -> dict[str, Any]:
    return {"ok": False, "error": {"code": exc.code, "message": str(exc)}}


def encode(message: dict[str, Any]) -> bytes:
    body = json.dumps(message, separators=(",", ":")).encode()
    if len(body) > MAX_FRAME:
        raise ProtocolError("message too large")
    return HEADER.pack(len(body)) + body


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON")


def decode_body(body: bytes) -> Any:
    """The JSON of a frame; ``NaN``/``Infinity`` (Python's extension) are not JSON."""
    try:
        return json.loads(body, parse_constant=_no_constant)
    except (ValueError, RecursionError):  # ValueError: bad UTF-8, bad JSON, int over 4300 digits
        raise ProtocolError("message is not valid JSON") from None


def frame_length(header: bytes, limit: int = MAX_FRAME) -> int:
    """The length a header announces, refused if over ``limit`` (``MAX_REQUEST`` for requests)."""
    (length,) = HEADER.unpack(header)
    if length > limit:
        raise ProtocolError(f"message of {length} bytes is over the {limit}-byte limit")
    return int(length)
