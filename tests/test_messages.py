"""The typed messages: the schema read off them is the wire schema, and both modes check alike."""

from __future__ import annotations

from typing import Any

import pytest

from chronos import messages, protocol
from chronos.errors import BadRequest, ProtocolError
from chronos.messages import CreateRequest, Granted, ListRequest, TicketStatus, create_reply

_NUM = (int, float)
_SPEC = (str, int, float)
# The schema as protocol.OPS spelled it out by hand before the request classes (base commit
# ead8a26): the classes must describe the very same wire format.
WIRE_SCHEMA: dict[str, dict[str, tuple[tuple[type, ...], bool]]] = {
    "ping": {},
    "create": {
        "device": ((int, str), False),
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
        "series": ((str,), False),
        "devices": ((list,), False),
        "gpus": ((int,), False),
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
    "submit": {
        "partition": ((dict,), True),
        "argv": ((list,), True),
        "env": ((dict,), True),
        "cwd": ((str,), True),
        "umask": ((int,), True),
        "output": ((str,), True),
        "error": ((str,), False),
        "name": ((str,), False),
        "after": ((str,), False),
    },
    "jobs": {"all": ((bool,), False), "id": ((str,), False)},
}


def _as_sets(schema: dict[str, dict[str, tuple[tuple[type, ...], bool]]]) -> dict[str, Any]:
    return {
        op: {name: (frozenset(types), required) for name, (types, required) in args.items()}
        for op, args in schema.items()
    }


def test_the_schema_read_off_the_classes_is_the_wire_schema() -> None:
    assert _as_sets(protocol.OPS) == _as_sets(WIRE_SCHEMA)


def test_a_request_is_parsed_into_its_type_with_the_defaults_of_its_class() -> None:
    message = protocol.request("create", device=1, memory="1GiB", duration=60, wait=True)
    request = protocol.parse_request(message)
    assert request == CreateRequest(device=1, memory="1GiB", duration=60, wait=True)
    assert isinstance(request, CreateRequest) and request.kind == "api" and not request.persist


@pytest.mark.parametrize(
    ("message", "error", "text"),
    [
        (protocol.request("list", uid=0), BadRequest, "list: unknown argument 'uid'"),
        (protocol.request("create", device=0, memory=1), BadRequest, "missing argument"),
        (protocol.request("list", all=1), BadRequest, "all has the wrong type"),
        (protocol.request("attach", id="x", pid=True), BadRequest, "pid has the wrong type"),
        (protocol.request("get", id="x" * 257), BadRequest, "longer than 256"),
        (protocol.request("nope"), ProtocolError, "unknown operation"),
        (
            protocol.request(
                "submit", partition={}, argv=["x", 1], env={}, cwd="/", umask=0, output="/o"
            ),
            BadRequest,
            "argv must hold only strings",
        ),
        (
            protocol.request(
                "submit", partition={}, argv=["x"], env={"A": 1}, cwd="/", umask=0, output="/o"
            ),
            BadRequest,
            "env must hold only strings",
        ),
        ({"v": 2, "op": "ping", "args": {}}, ProtocolError, "unsupported protocol version"),
    ],
)
def test_a_bad_request_is_refused_before_any_type_is_made(
    message: Any, error: type[Exception], text: str
) -> None:
    with pytest.raises(error, match=text):
        protocol.parse_request(message)


def test_a_checked_message_is_not_checked_again() -> None:
    """The daemon's server checks once; the service takes the request it carries."""
    message = protocol.request("list", all=True)
    checked = protocol.CheckedMessage.of(message)
    assert checked == message and checked["op"] == "list"  # still the message
    assert protocol.parse_request(checked) is checked.request
    assert checked.request == ListRequest(all=True)


def test_a_request_sends_only_what_is_set() -> None:
    request = CreateRequest(device=0, memory=0.5, duration=60, user=None, start=None)
    assert protocol.message_of(request) == {
        "v": protocol.VERSION,
        "op": "create",
        "args": {
            "device": 0,
            "memory": 0.5,
            "duration": 60,
            "persist": False,
            "kind": "api",
            "wait": False,
        },
    }
    assert protocol.parse_request(protocol.message_of(request)) == request


def test_every_operation_has_one_request_class() -> None:
    assert sorted(messages.REQUESTS) == sorted(WIRE_SCHEMA)
    samples: dict[type, Any] = {int: 1, str: "x", bool: True, list: [], dict: {}}
    for op, cls in messages.REQUESTS.items():
        required = {
            name: samples.get(types[0], 1)
            for name, (types, needed) in protocol.OPS[op].items()
            if needed
        }
        request = protocol.parse_request(protocol.request(op, **required))
        assert type(request) is cls and messages.op_of(request) == op


def test_a_create_reply_is_a_partition_or_a_ticket() -> None:
    record = {
        "id": "p1",
        "device": 0,
        "device_uuid": "GPU-0",
        "device_total_bytes": 100,
        "memory_bytes": 10,
        "memory_fraction": 0.1,
        "uid": 1000,
        "user": "alice",
        "created_at": 1.0,
        "starts_at": 1.0,
        "expires_at": 61.0,
        "state": "active",
    }
    granted = create_reply({**record, "visible_env": {"CUDA_VISIBLE_DEVICES": "0"}})
    assert isinstance(granted, Granted)
    assert granted.record.id == "p1" and granted.visible_env == {"CUDA_VISIBLE_DEVICES": "0"}
    queued = create_reply({"ticket": "q1", "state": "waiting", "reason": "full", "position": 2})
    assert isinstance(queued, TicketStatus)
    assert (queued.ticket, queued.state, queued.status["position"]) == ("q1", "waiting", 2)
    assert queued.granted is None
    done = TicketStatus.from_wire({"ticket": "q1", "state": "granted", "partition": record})
    assert done.granted is not None and done.granted.record.id == "p1"
