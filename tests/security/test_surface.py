"""Attacks on the read-only HTTP endpoints (dashboard, metrics) through their one HTTP layer.

Both serve a thread per connection; before the shared layer (chronos.httpserve) neither
had a socket timeout, so any local user (or, on an exposed address, anyone) could open
connections that send nothing and hold a thread each for ever.
"""

from __future__ import annotations

import socket
import time
from collections.abc import Callable, Iterator

import pytest
from prometheus_client.registry import CollectorRegistry

from chronos.dashboard.server import DashboardServer, Snapshot
from chronos.httpserve import LocalHTTPServer
from chronos.metrics import MetricsEndpoint

IDLE_S = 0.3


def _no_state() -> Snapshot:
    raise AssertionError("an idle connection must not ask for the state")


def _dashboard() -> LocalHTTPServer:
    return DashboardServer("127.0.0.1:0", _no_state, idle_timeout_s=IDLE_S).start()


def _metrics() -> LocalHTTPServer:
    return MetricsEndpoint("127.0.0.1:0", CollectorRegistry(), idle_timeout_s=IDLE_S)


@pytest.fixture(params=[_dashboard, _metrics], ids=["dashboard", "metrics"])
def endpoint(request: pytest.FixtureRequest) -> Iterator[LocalHTTPServer]:
    make: Callable[[], LocalHTTPServer] = request.param
    server = make()
    yield server
    server.close()


def test_an_idle_connection_is_closed_after_the_idle_timeout(endpoint: LocalHTTPServer) -> None:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as idle:
        began = time.monotonic()
        assert idle.recv(1) == b""  # the server hung up (a timeout here raises instead)
        assert time.monotonic() - began < 5


def test_a_half_sent_request_does_not_hold_its_thread(endpoint: LocalHTTPServer) -> None:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as slow:
        slow.sendall(b"GET /metrics HTTP/1.1\r\nHost: localhost\r\n")  # headers never end
        assert slow.recv(1024) == b""


def test_every_method_but_get_and_head_is_refused(endpoint: LocalHTTPServer) -> None:
    with socket.create_connection((endpoint.host, endpoint.port), timeout=10) as client:
        client.sendall(b"POST /metrics HTTP/1.1\r\nHost: localhost\r\nContent-Length: 0\r\n\r\n")
        reply = client.recv(4096)
    assert reply.startswith(b"HTTP/1.1 405 "), reply
    assert b"Allow: GET, HEAD" in reply
