"""Crash safety of chronosd: what it acknowledged survives SIGKILL; restart catches up."""

from __future__ import annotations

import json
import os
import signal
import socket
import sqlite3
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from .support import DaemonProcess, assert_one_line_error, json_out
from .test_expiry import LATE_S, ignoring_sigterm, reap, wait_exit

BURST_CLIENT = r"""
import json, sys
from chronos.api import Partitioner
from chronos.errors import ChronosError
from chronos.transport import SocketTransport

def say(**fields):
    print(json.dumps(fields), flush=True)

client = Partitioner(SocketTransport())
say(ready=True)
sys.stdin.readline()  # go
while True:
    try:
        p = client.create(device=int(sys.argv[1]), memory="1MiB", duration=3600, persist=True)
    except ChronosError as exc:
        say(error=type(exc).__name__, message=str(exc))
        break
    except BaseException as exc:
        say(crash=repr(exc))
        raise
    say(id=p.id, expires_at=p.record.expires_at, memory_bytes=p.memory_bytes, user=p.user)
"""


def test_acknowledged_creates_survive_sigkill(daemon: DaemonProcess, tmp_path: Path) -> None:
    errors = [tmp_path / f"client{i}.err" for i in range(3)]
    clients = [
        subprocess.Popen(
            [sys.executable, "-c", BURST_CLIENT, str(i % 2)],
            env=daemon.env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=err.open("w"),
            text=True,
        )
        for i, err in enumerate(errors)
    ]
    for c in clients:
        assert c.stdout is not None and json.loads(c.stdout.readline()) == {"ready": True}
    for c in clients:
        assert c.stdin is not None
        c.stdin.write("go\n")
        c.stdin.close()
    time.sleep(0.6)
    assert daemon.kill(signal.SIGKILL) == -signal.SIGKILL

    acked: dict[str, dict] = {}
    for c, err_path in zip(clients, errors):
        assert c.stdout is not None
        out = c.stdout.read()
        c.wait(30)
        err = err_path.read_text()
        lines = [json.loads(line) for line in out.splitlines()]
        assert lines, err
        *oks, last = lines
        assert oks, "the burst made no partition before the kill"
        assert all("id" in line for line in oks), lines
        # The request in flight failed as "daemon unavailable", never with a wrong answer.
        assert last.get("error") == "DaemonUnavailable", (last, err)
        assert c.returncode == 0, err
        for line in oks:
            assert line["id"] not in acked
            acked[line["id"]] = line

    line = assert_one_line_error(daemon.cli("create", "0", "1%", "1h"), code=7)
    assert "chronosd" in line

    daemon.start()
    stored = {p["id"]: p for p in daemon.call("list", all=True)}
    missing = set(acked) - set(stored)
    assert not missing, f"{len(missing)} acknowledged partitions lost, e.g. {sorted(missing)[:3]}"
    for pid_id, reply in acked.items():
        record = stored[pid_id]
        assert record["state"] == "active"
        assert record["expires_at"] == reply["expires_at"]
        assert record["memory_bytes"] == reply["memory_bytes"] and record["user"] == reply["user"]
    # At most one unacknowledged create per client can have been committed.
    assert len(set(stored) - set(acked)) <= len(clients)

    db = sqlite3.connect(f"file:{daemon.state_dir / 'ledger.db'}?mode=ro", uri=True)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
    finally:
        db.close()
    assert daemon.call("create", device=0, memory="1MiB", duration=60, persist=True)["id"]


def test_restart_catches_up_and_keeps_tracking(daemon: DaemonProcess) -> None:
    """One partition expires while the daemon is down, one after it is back."""
    early_proc = subprocess.Popen(["sleep", "60"])
    late_proc = subprocess.Popen(["sleep", "60"])
    try:
        with daemon.partitioner() as client:
            early = client.create(device=0, memory=0.01, duration=1.5, grace=1, persist=True)
            late = client.create(device=1, memory=0.01, duration=4, grace=1, persist=True)
            early.attach(early_proc.pid)
            late.attach(late_proc.pid)
        daemon.kill(signal.SIGKILL)

        time.sleep(max(0.0, early.record.expires_at + 0.3 - time.time()))
        assert early_proc.poll() is None  # nobody to stop it while the daemon is down
        daemon.start()
        restarted = time.time()

        code, when = wait_exit(early_proc, 3)
        assert code == -signal.SIGTERM, "the process of the partition that expired while down"
        assert when - restarted < 1.0
        listed = {p["id"]: p for p in json_out(daemon.cli("list", "--all", "--json"))}
        assert listed[early.id]["state"] == "expired"
        assert daemon.record(early.id)["ended_at"] == early.record.expires_at
        expired = daemon.wait_event("expired", partition=early.id)
        assert expired["lateness_ms"] > 0
        assert early_proc.pid in daemon.wait_event("sigterm", partition=early.id)["processes"]

        # The other partition, and the process attached before the crash, are still tracked.
        assert listed[late.id]["state"] == "active"
        assert late_proc.poll() is None
        code, when = wait_exit(late_proc, late.record.expires_at - time.time() + 3)
        assert code == -signal.SIGTERM
        assert late.record.expires_at - 0.05 <= when <= late.record.expires_at + LATE_S
    finally:
        for proc in (early_proc, late_proc):
            if proc.poll() is None:
                proc.kill()
            proc.wait()


def test_sigkill_after_grace_survives_a_restart(daemon: DaemonProcess) -> None:
    stubborn = ignoring_sigterm()
    try:
        with daemon.partitioner() as client:
            p = client.create(device=0, memory=0.01, duration=1, grace=1, persist=True)
            p.attach(stubborn.pid)
        daemon.wait_event("sigterm", timeout=4, partition=p.id)
        daemon.restart()  # inside the grace period
        code, _ = wait_exit(stubborn, p.record.expires_at + 1 - time.time() + 1.5)
        assert code == -signal.SIGKILL
    finally:
        reap(stubborn)


def test_second_daemon_on_the_same_state_refuses(daemon: DaemonProcess) -> None:
    second = subprocess.run(
        daemon.argv(), env=daemon.daemon_env, capture_output=True, text=True, timeout=30
    )
    assert second.returncode != 0
    assert "already running" in second.stderr, second.stderr
    assert str(daemon.proc.pid) in second.stderr  # type: ignore[union-attr]
    # The first one is untouched: alive, listening on its socket, serving.
    assert daemon.alive() and daemon.sock.exists()
    assert daemon.ping()["mode"] == "daemon"


def test_second_daemon_on_the_same_socket_refuses(
    daemon: DaemonProcess, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """Another state dir, same socket: it must not take the socket from the live daemon."""
    other = daemon_factory(start=False)
    second = subprocess.run(
        other.argv(daemon.sock), env=other.daemon_env, capture_output=True, text=True, timeout=30
    )
    assert second.returncode != 0, second.stderr
    assert "already running" in second.stderr, second.stderr
    assert daemon.sock.exists(), "the refused daemon removed the live daemon's socket"
    made = daemon.call("create", device=0, memory="1GiB", duration=60, persist=True)
    assert made["id"] in daemon.open_ids()  # clients still reach the first daemon


@pytest.mark.parametrize("address", ["path", "abstract"])
def test_systemd_notify(daemon_factory: Callable[..., DaemonProcess], address: str) -> None:
    d = daemon_factory(start=False)
    listener = socket.socket(socket.AF_UNIX, socket.SOCK_DGRAM)
    if address == "path":
        target = str(d.base / "notify")
        listener.bind(target)
    else:
        name = f"chronos-test-notify-{os.getpid()}-{time.monotonic_ns()}"
        listener.bind("\0" + name)
        target = "@" + name
    listener.settimeout(15)
    try:
        d.start(wait=False, extra_env={"NOTIFY_SOCKET": target})
        assert listener.recv(4096) == b"READY=1"
        # Ready means ready: the very first request is served.
        assert d.ping(timeout=2)["mode"] == "daemon"
        assert d.kill(signal.SIGTERM) == 0
        assert listener.recv(4096) == b"STOPPING=1"
        assert not d.sock.exists(), "a clean stop removes the socket"
        assert any(r.get("event") == "stopped" for r in d.log_lines())
    finally:
        listener.close()


def test_state_dir_survives_clean_restart(daemon: DaemonProcess) -> None:
    made = daemon.call("create", device=0, memory="1GiB", duration=3600, persist=True)
    daemon.restart()  # SIGTERM, then start again
    assert daemon.record(made["id"])["state"] == "active"
    mode = Path(daemon.state_dir / "ledger.db").stat().st_mode & 0o777
    assert mode == 0o644, oct(mode)
