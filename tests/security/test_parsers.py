"""Input that freezes or tricks the daemon's parsers (issue "Trust", items 1 and 12).

The memory and duration parsers were regular expressions that backtracked: a 1,080-byte
``create`` with ``duration = "1"*1000 + "x"`` froze chronosd for 8 s (another user's
expiry SIGTERM came 6.9 s late), a 20 KB memory string for 12 s. ``float()`` on the raw
text let through ``"١٠%"`` (Arabic-Indic digits) and ``"1_0"``; ``warn_signal="SIG_IGN"``
was taken because ``signal`` has such an attribute. Each attack is reproduced here, on the
parsers and through a real chronosd. The time bounds are sanity bounds (the old parsers
took seconds), not benchmarks.
"""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Callable
from typing import Any

import pytest
from chronos_testing import DaemonProcess
from daemon.support import raw_connect, recv_reply, request_frame

from chronos.errors import BadRequest
from chronos.service import _grace, _signal_name
from chronos.units import (
    MAX_INPUT_CHARS,
    parse_date,
    parse_duration,
    parse_memory,
    parse_signal_name,
    parse_start,
)

TOTAL = 80 * 1024**3
SANITY_S = 0.005
"""Far above what a bounded parser takes (microseconds), far below the old seconds."""

DURATION_1080_BYTES = "1" * 1000 + "x"  # with the frame around it: the 1,080 bytes
MEMORY_20_KB = "1" * 20_000 + "!"
ONE_MIB = "1" * (1 << 20)
ATTACKS = {
    "duration 1000 digits + x": DURATION_1080_BYTES,
    "memory 20 KB": MEMORY_20_KB,
    "1 MiB of digits": ONE_MIB,
    "digits, a dot, digits + x": "1" * 3000 + "." + "1" * 3000 + "x",
    "digits, spaces, a letter": "1" * 5000 + " " * 5000 + "a!",
    "number-unit pairs": "1h" * 10_000 + "1",
}
PARSERS: dict[str, Callable[[str], object]] = {
    "memory": lambda text: parse_memory(text, TOTAL),
    "duration": parse_duration,
    "grace": _grace,
    "since": lambda text: parse_duration(text, float("inf")),
    "start": lambda text: parse_start(text, time.time()),
    "start +": lambda text: parse_start("+" + text, time.time()),
    "until": parse_date,
}


def refused_quickly(parse: Callable[[str], object], text: str) -> tuple[str, float]:
    started = time.perf_counter()
    with pytest.raises(BadRequest) as info:
        parse(text)
    return str(info.value), time.perf_counter() - started


@pytest.mark.parametrize("attack", list(ATTACKS), ids=list(ATTACKS))
@pytest.mark.parametrize("parser", list(PARSERS))
def test_an_attack_string_is_refused_at_once(parser: str, attack: str) -> None:
    message, elapsed = refused_quickly(PARSERS[parser], ATTACKS[attack])
    assert elapsed < SANITY_S, f"{parser} took {elapsed * 1000:.1f} ms on {attack}"
    assert "\n" not in message and len(message) < 200, "the error never echoes the input"
    assert f"longer than {MAX_INPUT_CHARS} characters" in message


@pytest.mark.parametrize(
    "text",
    [
        "1" * 63 + "!",  # just inside the bound: read once, refused
        " " * 60 + "1h!",
        "1." * 32,
        "1h" * 31 + "x",
        "1:" * 32,
        "1-" * 32,
    ],
)
def test_the_longest_accepted_length_is_read_in_linear_time(text: str) -> None:
    for parse in (PARSERS["memory"], PARSERS["duration"]):
        _, elapsed = refused_quickly(parse, text)
        assert elapsed < SANITY_S


@pytest.mark.parametrize(
    ("parse", "text"),
    [
        (PARSERS["memory"], "\u0661\u0660%"),  # Arabic-Indic 10%: float() reads it as 10
        (PARSERS["memory"], "\u0660.\u0665"),  # Arabic-Indic 0.5
        (PARSERS["memory"], "\uff10.5"),  # fullwidth 0
        (PARSERS["memory"], "1_0%"),
        (PARSERS["memory"], "0.5_0"),
        (PARSERS["memory"], "4_0GiB"),
        (PARSERS["memory"], "\u0664\u0660GiB"),
        (PARSERS["duration"], "\u0661\u0660"),
        (PARSERS["duration"], "\u0661\u0660m"),
        (PARSERS["duration"], "1_0"),
        (PARSERS["duration"], "1_000s"),
        (PARSERS["duration"], "\u0661-\u0660\u0660"),
        (PARSERS["grace"], "1_0"),
        (PARSERS["grace"], "\u0661\u0660s"),
        (PARSERS["start"], "\u0660\u0669:\u0660\u0660"),  # Arabic-Indic 09:00
        (PARSERS["start"], "+1_0m"),
        (PARSERS["until"], "\u0662\u0660\u0662\u0666-12-24"),
    ],
)
def test_only_ascii_digits_are_numbers(parse: Callable[[str], object], text: str) -> None:
    with pytest.raises(BadRequest):
        parse(text)


@pytest.mark.parametrize(
    "name",
    ["SIG_IGN", "SIG_DFL", "SIG_BLOCK", "SIGKILL", "KILL", "SIGSTOP", "stop", "Signals"]
    + ["SIGFOO", "signal", "", "SIG", "NSIG", "SIGRTMIN+1", "USR1\x00", 15, None, "SIGUSR1" * 9],
)
def test_a_warning_signal_must_be_a_catchable_signal_name(name: Any) -> None:
    with pytest.raises(BadRequest) as info:
        _signal_name(name)
    assert "\n" not in str(info.value)


@pytest.mark.parametrize(
    ("name", "expected"),
    [("SIGUSR1", "SIGUSR1"), ("USR1", "SIGUSR1"), ("usr2", "SIGUSR2"), ("SIGTERM", "SIGTERM")]
    + [("int", "SIGINT"), ("SIGRTMIN", "SIGRTMIN"), ("SIGHUP", "SIGHUP")],
)
def test_real_signal_names_are_accepted(name: str, expected: str) -> None:
    assert parse_signal_name(name) == expected == _signal_name(name)


# --------------------------------------------------------------------- through chronosd


def call_raw(sock: socket.socket, op: str, **args: Any) -> dict[str, Any]:
    sock.sendall(request_frame({"v": 1, "op": op, "args": args}))
    reply = recv_reply(sock)
    assert isinstance(reply, dict), "the daemon hung up instead of answering"
    return reply


class ListLatencies:
    """Another client's ``list``, over and over, while an attack runs: the longest wait."""

    def __init__(self, daemon: DaemonProcess) -> None:
        self.daemon = daemon
        self.latencies: list[float] = []
        self.errors: list[BaseException] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        try:
            with raw_connect(self.daemon.sock, timeout=30.0) as sock:
                while not self._stop.is_set():
                    started = time.perf_counter()
                    reply = call_raw(sock, "list")
                    self.latencies.append(time.perf_counter() - started)
                    assert reply["ok"] is True, reply
        except BaseException as exc:  # reported by stop()
            self.errors.append(exc)

    def __enter__(self) -> ListLatencies:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(timeout=60)


def test_a_1080_byte_duration_is_refused_at_once_while_others_are_served(
    daemon: DaemonProcess,
) -> None:
    with ListLatencies(daemon) as others, raw_connect(daemon.sock, timeout=30.0) as attacker:
        count_before = len(others.latencies)
        started = time.perf_counter()
        reply = call_raw(attacker, "create", device=0, memory=0.1, duration=DURATION_1080_BYTES)
        answered_in = time.perf_counter() - started
        # Keep the other client going a little past the attack, then look.
        deadline = time.monotonic() + 0.2
        while time.monotonic() < deadline or len(others.latencies) <= count_before:
            time.sleep(0.01)
    assert not others.errors, others.errors
    assert answered_in < 0.5, f"the attacker's create took {answered_in:.2f} s"
    assert max(others.latencies) < 0.5, f"another client's list took {max(others.latencies):.2f} s"
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert "longer than" in reply["error"]["message"]
    assert daemon.open_ids() == set(), "nothing was created"


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("memory", MEMORY_20_KB),
        ("memory", "1" * 60_000 + "!"),  # nearly a whole 64 KiB request: hours before
        ("grace", DURATION_1080_BYTES),
        ("warn", DURATION_1080_BYTES),
        ("memory", "\u0661\u0660%"),
        ("duration", "1_0"),
        ("warn_signal", "SIG_IGN"),
        ("warn_signal", "SIG_DFL"),
    ],
)
def test_create_with_a_hostile_field_is_a_prompt_bad_request(
    shared_daemon: DaemonProcess, field: str, value: str
) -> None:
    args: dict[str, Any] = {"device": 0, "memory": 0.1, "duration": 60, "warn": "10s"}
    args[field] = value
    with raw_connect(shared_daemon.sock, timeout=30.0) as sock:
        started = time.perf_counter()
        reply = call_raw(sock, "create", **args)
        elapsed = time.perf_counter() - started
    assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
    assert elapsed < 0.5, f"{field}: answered in {elapsed:.2f} s"
    assert shared_daemon.open_ids() == set(), "the ledger is unchanged"


def test_extend_with_a_1080_byte_duration_is_a_prompt_bad_request(
    shared_daemon: DaemonProcess,
) -> None:
    with raw_connect(shared_daemon.sock, timeout=30.0) as sock:
        created = call_raw(sock, "create", device=0, memory=0.1, duration=60, persist=True)
        assert created["ok"] is True, created
        record = created["result"]
        started = time.perf_counter()
        reply = call_raw(sock, "extend", id=record["id"], duration=DURATION_1080_BYTES)
        elapsed = time.perf_counter() - started
        assert reply["ok"] is False and reply["error"]["code"] == "bad_request", reply
        assert elapsed < 0.5
        assert shared_daemon.record(record["id"])["expires_at"] == record["expires_at"]
        assert call_raw(sock, "release", id=record["id"])["ok"] is True
