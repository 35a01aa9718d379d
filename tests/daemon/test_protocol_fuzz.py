"""The daemon's socket against garbage, abuse and load.

Whatever a client sends, the daemon answers with a well-formed error or hangs
up on that client; it never crashes, never stalls other clients, and never
acts on a request that failed validation.
"""

from __future__ import annotations

import json
import os
import socket
import struct
import threading
import time
from collections.abc import Iterator
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronos import protocol
from chronos.daemon.server import MAX_CONNECTIONS_PER_USER
from chronos.transport import SocketTransport

from .support import DaemonProcess, frame, raw_connect, recv_reply, request_frame, shared_tmpdir

FUZZ = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.function_scoped_fixture, HealthCheck.too_slow],
)

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**70), max_value=2**70)
    | st.floats(allow_nan=False, allow_infinity=False)  # Infinity is not JSON: refused
    | st.text(max_size=20)
)
json_values = st.recursive(
    json_scalars,
    lambda inner: (
        st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner, max_size=4)
    ),
    max_leaves=12,
)


@pytest.fixture(scope="module")
def fuzz_daemon() -> Iterator[DaemonProcess]:
    d = DaemonProcess(shared_tmpdir("chronos-fuzz-"))
    try:
        d.start()
        yield d
        # Whatever the tests below sent, the daemon is alive and answers.
        assert d.alive(), f"chronosd died:\n{d.log_text()}"
        assert d.ping()["mode"] == "daemon"
    finally:
        d.cleanup()


@pytest.fixture
def d(fuzz_daemon: DaemonProcess) -> Iterator[DaemonProcess]:
    seen = len(fuzz_daemon.log_lines())
    yield fuzz_daemon
    # No input may reach the daemon as anything but a clean protocol error.
    new = fuzz_daemon.log_lines()[seen:]
    bad = [r for r in new if r.get("event") in ("client_error", "_raw")]
    assert not bad, f"daemon logged unexpected failures: {bad[:3]}"
    assert fuzz_daemon.alive()


def exchange(d: DaemonProcess, data: bytes, then_ping: bool = False) -> list[Any]:
    """Send ``data``, half-close, and collect every reply until the daemon hangs up."""
    with raw_connect(d.sock) as sock:
        sock.sendall(data)
        if then_ping:
            sock.sendall(request_frame({"v": 1, "op": "ping"}))
        sock.shutdown(socket.SHUT_WR)
        replies = []
        while (reply := recv_reply(sock)) is not None:
            replies.append(reply)
        return replies


def assert_error(reply: Any, code: str | None = None) -> None:
    assert isinstance(reply, dict) and reply.get("ok") is False, reply
    assert set(reply["error"]) == {"code", "message"}, reply
    assert isinstance(reply["error"]["message"], str) and reply["error"]["message"]
    if code is not None:
        assert reply["error"]["code"] == code, reply


def assert_ping(reply: Any) -> None:
    assert reply.get("ok") is True and reply["result"]["mode"] == "daemon", reply


# ------------------------------------------------------------------ hypothesis


@FUZZ
@given(data=st.binary(max_size=96))
def test_random_bytes(d: DaemonProcess, data: bytes) -> None:
    for reply in exchange(d, data):
        assert isinstance(reply, dict) and isinstance(reply.get("ok"), bool), reply
        assert reply["ok"] is False or data[4:].lstrip().startswith(b"{"), reply


def _not_json(body: bytes) -> bool:
    try:
        json.loads(body)
    except (ValueError, RecursionError):
        return True
    return False


@FUZZ
@given(body=st.binary(max_size=200).filter(_not_json))
def test_valid_header_invalid_json(d: DaemonProcess, body: bytes) -> None:
    replies = exchange(d, frame(body), then_ping=True)
    assert len(replies) == 2, replies  # an error, and the connection is still usable
    assert_error(replies[0], "protocol")
    assert_ping(replies[1])


@FUZZ
@given(value=json_values.filter(lambda v: not isinstance(v, dict)))
def test_json_that_is_not_an_object(d: DaemonProcess, value: Any) -> None:
    replies = exchange(d, request_frame(value), then_ping=True)
    assert len(replies) == 2, replies
    assert_error(replies[0], "protocol")
    assert_ping(replies[1])


@FUZZ
@given(version=json_values.filter(lambda v: v != 1))
def test_wrong_version(d: DaemonProcess, version: Any) -> None:
    replies = exchange(d, request_frame({"v": version, "op": "ping"}), then_ping=True)
    assert_error(replies[0], "protocol")
    assert "version" in replies[0]["error"]["message"]
    assert_ping(replies[1])


@FUZZ
@given(op=json_values.filter(lambda v: not (isinstance(v, str) and v in protocol.OPS)))
def test_unknown_op(d: DaemonProcess, op: Any) -> None:
    replies = exchange(d, request_frame({"v": 1, "op": op, "args": {}}), then_ping=True)
    assert_error(replies[0], "protocol")
    assert_ping(replies[1])


def valid_args(op: str) -> dict[str, Any]:
    """Well-typed values for ``op``'s required arguments (whatever ops exist now)."""
    out: dict[str, Any] = {}
    for name, (types, required) in protocol.OPS[op].items():
        if not required:
            continue
        if name == "memory":
            out[name] = "1%"
        elif str in types:
            out[name] = "60" if int in types else "nope"
        elif int in types:
            out[name] = 0 if name == "device" else 1
        elif bool in types:
            out[name] = False
        elif list in types:
            out[name] = []
        elif dict in types:
            out[name] = {}
        else:
            out[name] = 1.0
    return out


ARG_SLOTS = [(op, name) for op, spec in protocol.OPS.items() for name in spec]


def _wrong_for(types: tuple[type, ...]) -> Any:
    def wrong(value: Any) -> bool:
        if isinstance(value, bool):
            return bool not in types
        return not isinstance(value, types)

    return json_values.filter(wrong)


@FUZZ
@given(data=st.data(), slot=st.sampled_from(ARG_SLOTS))
def test_wrong_argument_types(d: DaemonProcess, data: st.DataObject, slot: tuple[str, str]) -> None:
    op, name = slot
    types, _ = protocol.OPS[op][name]
    value = data.draw(_wrong_for(types), label=f"{op}.{name}")
    before = len(d.call("list", all=True))
    args = {**valid_args(op), name: value}
    replies = exchange(d, request_frame({"v": 1, "op": op, "args": args}), then_ping=True)
    assert_error(replies[0], "bad_request")
    assert name in replies[0]["error"]["message"]
    assert_ping(replies[1])
    assert len(d.call("list", all=True)) == before


NUMBER_SLOTS = [
    (op, name)
    for op, spec in protocol.OPS.items()
    for name, (types, _) in spec.items()
    if int in types or float in types
]


@FUZZ
@given(data=st.data(), slot=st.sampled_from(NUMBER_SLOTS))
def test_numbers_out_of_range_are_bad_requests(
    d: DaemonProcess, data: st.DataObject, slot: tuple[str, str]
) -> None:
    """Beyond SQLite INTEGER or the field's range: OverflowError once closed the connection."""
    op, name = slot
    low, high = protocol.RANGES.get(name, (protocol.SQLITE_INT_MIN, protocol.SQLITE_INT_MAX))
    value = data.draw(
        st.integers(min_value=int(high) + 1, max_value=10**300)
        | st.integers(min_value=-(10**300), max_value=int(low) - 1),
        label=f"{op}.{name}",
    )
    args = {**valid_args(op), name: value}
    replies = exchange(d, request_frame({"v": 1, "op": op, "args": args}), then_ping=True)
    assert_error(replies[0], "bad_request")
    assert name in replies[0]["error"]["message"]
    assert_ping(replies[1])


@FUZZ
@given(
    op=st.sampled_from(sorted(protocol.OPS)),
    args=st.dictionaries(st.text(max_size=10), json_values, max_size=5),
)
def test_arbitrary_requests_get_a_well_formed_reply(
    d: DaemonProcess, op: str, args: dict[str, Any]
) -> None:
    replies = exchange(d, request_frame({"v": 1, "op": op, "args": args}), then_ping=True)
    assert len(replies) == 2, replies
    assert isinstance(replies[0].get("ok"), bool), replies[0]
    if not replies[0]["ok"]:
        assert_error(replies[0])
    assert_ping(replies[1])


# ---------------------------------------------------------------- hand-written


@pytest.mark.parametrize(
    "body",
    [
        b"",
        b"{",
        b"\xff\xfe\x00",
        b"[" * 30_000 + b"]" * 30_000,  # deep nesting: RecursionError in json
        b'{"v": 1, "op": "ping", "args": {"x": ' + b"9" * 5000 + b"}}",  # over int digit limit
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": NaN, "duration": 60}}',
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": 0.01, "duration": Infinity}}',
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": 0.01, "duration": 60, '
        b'"start": NaN}}',
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": 0.01, "duration": 60, '
        b'"start": Infinity}}',
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": 0.01, "duration": 60, '
        b'"start": 1e300}}',
        b'{"v": 1, "op": "attach", "args": {"id": "x", "pid": ' + b"9" * 40 + b"}}",
        b'{"v": 1, "op": "create", "args": {"device": ' + b"9" * 40 + b', "memory": 0.01, '
        b'"duration": 60}}',
        b'{"v": 1, "op": "get", "args": {"id": "\\u0000"}}',
        json.dumps({"v": 1, "op": "get", "args": {"id": "x" * 60_000}}).encode(),
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": 0.01, "duration": 60, '
        b'"start": 1e400}}',  # JSON's 1e400 is float('inf') in Python
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": 0.01, "duration": 60, '
        b'"start": ' + b"9" * 400 + b"}}",  # beyond float range: OverflowError once
        b'{"v": 1, "op": "attach", "args": {"id": "x", "pid": 9223372036854775808}}',
        b'{"v": 1, "op": "wait", "args": [1, 2]}',  # AttributeError in _long_poll once
        b'{"v": 1, "op": "wait", "args": "x"}',
        b'{"v": 1, "op": "create", "args": {"device": 0, "memory": "1%", "duration": "'
        + b"1" * 1000
        + b'x"}}',  # backtracking bait: refused by length before the parser sees it
    ],
    ids=lambda b: repr(b[:40]),
)
def test_nasty_bodies(d: DaemonProcess, body: bytes) -> None:
    before = len(d.call("list", all=True))
    replies = exchange(d, frame(body), then_ping=True)
    assert len(replies) == 2, replies
    assert_error(replies[0])
    assert_ping(replies[1])
    assert len(d.call("list", all=True)) == before


def test_bookings_everyone_can_still_list(d: DaemonProcess) -> None:
    """A booking's times must be ones every client can show (1e300 crashed `chronos list`)."""
    far = time.time() + 300 * 86400
    booked = d.call("create", device=1, memory="1%", duration=60, persist=True, start=far)
    assert booked["state"] == "booked"
    for args in (("list",), ("list", "--all", "--json"), ("events", "--id", booked["id"])):
        proc = d.cli(*args)
        assert proc.returncode == 0 and "Traceback" not in proc.stderr, proc.stderr
    d.call("release", id=booked["id"])


@pytest.mark.parametrize(
    "length", [protocol.MAX_REQUEST + 1, protocol.MAX_FRAME + 1, 2**31, 2**32 - 1]
)
def test_oversized_length_header(d: DaemonProcess, length: int) -> None:
    with raw_connect(d.sock) as sock:
        sock.sendall(struct.pack(">I", length) + b"{}")
        reply = recv_reply(sock)
        assert_error(reply, "protocol")
        assert "limit" in reply["error"]["message"]
        assert recv_reply(sock) is None, "the daemon must hang up: it cannot find the next frame"
    assert_ping(exchange(d, b"", then_ping=True)[0])


def test_frame_at_the_limit_is_answered(d: DaemonProcess) -> None:
    padding = "x" * (protocol.MAX_REQUEST - 40)
    body = json.dumps({"v": 1, "op": "ping", "pad": padding}).encode()
    body = body[:-1] + b" " * (protocol.MAX_REQUEST - len(body)) + b"}"
    assert len(body) == protocol.MAX_REQUEST
    replies = exchange(d, frame(body))
    assert len(replies) == 1
    assert_ping(replies[0])


@pytest.mark.parametrize("sent", [b"\x00\x00", b"\x00\x00\x00\x64", b'\x00\x00\x00\x64{"v": 1'])
def test_truncated_frame(d: DaemonProcess, sent: bytes) -> None:
    with raw_connect(d.sock) as sock:
        sock.sendall(sent)
    # ... and hard-closing clients
    with raw_connect(d.sock) as sock:
        sock.sendall(sent)
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    assert_ping(exchange(d, b"", then_ping=True)[0])


def test_client_that_never_reads_its_replies(d: DaemonProcess) -> None:
    stuffed = raw_connect(d.sock)
    try:
        stuffed.setblocking(False)
        big = request_frame({"v": 1, "op": "list", "args": {"all": True}})
        with __import__("contextlib").suppress(BlockingIOError):
            for _ in range(2000):
                stuffed.send(big)
        started = time.monotonic()
        assert_ping(exchange(d, b"", then_ping=True)[0])
        assert time.monotonic() - started < 1.0
    finally:
        stuffed.close()


def test_slow_client_does_not_block_others(d: DaemonProcess) -> None:
    body = json.dumps({"v": 1, "op": "ping"}).encode()
    slow = raw_connect(d.sock)
    stalled_header = raw_connect(d.sock)
    try:
        slow.sendall(struct.pack(">I", len(body)) + body[: len(body) // 2])
        stalled_header.sendall(b"\x00\x00")
        time.sleep(0.1)
        for _ in range(5):
            started = time.monotonic()
            transport = SocketTransport(d.sock, timeout=2.0)
            try:
                assert transport.call("ping")["mode"] == "daemon"
                transport.call("list")
            finally:
                transport.close()
            assert time.monotonic() - started < 1.0
        # The slow client, when it finally finishes its frame, is answered too.
        slow.sendall(body[len(body) // 2 :])
        assert_ping(recv_reply(slow))
    finally:
        slow.close()
        stalled_header.close()


def test_many_concurrent_clients(d: DaemonProcess) -> None:
    # Root has no per-user connection limit; an ordinary user running the suite has one.
    clients = 300 if os.geteuid() == 0 else MAX_CONNECTIONS_PER_USER
    barrier = threading.Barrier(clients)
    failures: list[str] = []
    done = []

    def one() -> None:
        try:
            transport = SocketTransport(d.sock, timeout=30.0)
            try:
                barrier.wait(timeout=30)
                assert transport.call("ping")["mode"] == "daemon"
                assert isinstance(transport.call("list"), list)
                done.append(1)
            finally:
                transport.close()
        except Exception as exc:  # noqa: BLE001 - collected and reported below
            failures.append(repr(exc))

    threads = [threading.Thread(target=one) for _ in range(clients)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not failures, failures[:5]
    assert len(done) == clients


def test_daemon_survived_everything_above(fuzz_daemon: DaemonProcess) -> None:
    """Runs last in this module: after all the abuse, the same daemon process still serves."""
    assert fuzz_daemon.alive()
    assert fuzz_daemon.proc is not None and len(fuzz_daemon.logs) == 1  # never restarted
    assert fuzz_daemon.ping()["mode"] == "daemon"
    made = fuzz_daemon.call("create", device=0, memory="1GiB", duration=60, persist=True)
    assert fuzz_daemon.call("release", id=made["id"])["state"] == "released"
    assert not [r for r in fuzz_daemon.log_lines() if r.get("event") == "client_error"]
