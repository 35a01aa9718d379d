"""Expiry through the daemon: SIGTERM at ``expires_at``, SIGKILL after the grace, warnings.

Timing bounds here are behavioural (generous, for a loaded 2-core CI box);
the precise latency belongs to the benchmarks.
"""

from __future__ import annotations

import os
import select
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

from .conftest import Users
from .support import DaemonProcess, frame, json_out, raw_connect, recv_reply, wait_for

LATE_S = 0.5
"""How late after its deadline a signal may arrive and still pass."""


def wait_exit(proc: subprocess.Popen[bytes], timeout: float) -> tuple[int | None, float]:
    """Block until ``proc`` exits (pidfd: woken at the exit itself); ``(returncode, when)``."""
    fd = os.pidfd_open(proc.pid)
    try:
        ready, _, _ = select.select([fd], [], [], timeout)
        when = time.time()
    finally:
        os.close(fd)
    if not ready:
        return None, when
    return proc.wait(5), when


def ignoring_sigterm(env: dict[str, str] | None = None) -> subprocess.Popen[bytes]:
    """``sleep 60`` that ignores SIGTERM (SIG_IGN survives exec)."""
    proc = subprocess.Popen(["sh", "-c", "trap '' TERM; exec sleep 60"], env=env)
    wait_for(
        lambda: Path(f"/proc/{proc.pid}/comm").read_text().strip() == "sleep",
        5,
        what="the shell to exec sleep",
    )
    return proc


TRAP = r"""
import signal, sys, time
marker = sys.argv[1]
def on_signal(signo, frame):
    with open(marker, "a") as f:
        f.write(f"{signo} {time.time()}\n")
signal.signal(signal.SIGUSR1, on_signal)
print("ready", flush=True)
time.sleep(60)
"""


def trapping_usr1(marker: Path) -> subprocess.Popen[bytes]:
    proc = subprocess.Popen([sys.executable, "-c", TRAP, str(marker)], stdout=subprocess.PIPE)
    assert proc.stdout is not None and proc.stdout.readline() == b"ready\n"
    return proc


def reap(*procs: subprocess.Popen[bytes]) -> None:
    for proc in procs:
        if proc.poll() is None:
            proc.kill()
        proc.wait(5)


def test_expiry_sigterms_attached_and_marked_processes(daemon: DaemonProcess) -> None:
    with daemon.partitioner() as client:
        p = client.create(device=0, memory=0.01, duration=1.2, persist=True, grace=5)
    attached = subprocess.Popen(["sleep", "60"])
    marked = subprocess.Popen(["sleep", "60"], env={**os.environ, "CHRONOS_PARTITION_ID": p.id})
    bystander = subprocess.Popen(["sleep", "60"])
    try:
        proc = daemon.cli("attach", p.id, str(attached.pid))
        assert proc.returncode == 0, proc.stderr
        expires_at = p.record.expires_at

        for child in (attached, marked):
            code, when = wait_exit(child, expires_at - time.time() + 3)
            assert code == -signal.SIGTERM, f"pid {child.pid} was not stopped by SIGTERM: {code}"
            assert expires_at - 0.05 <= when <= expires_at + LATE_S, when - expires_at
        assert bystander.poll() is None, "a process of no partition was signalled"

        expired = daemon.wait_event("expired", partition=p.id)
        assert expired["lateness_ms"] < LATE_S * 1000
        sigterm = daemon.wait_event("sigterm", partition=p.id)
        assert {attached.pid, marked.pid} <= set(sigterm["processes"])
        assert bystander.pid not in sigterm["processes"]
        assert daemon.record(p.id)["state"] == "expired"
        assert "terminated" in {e["kind"] for e in daemon.call("events", id=p.id)}
    finally:
        reap(attached, marked, bystander)


def test_sigkill_after_grace(daemon: DaemonProcess) -> None:
    stubborn = ignoring_sigterm()
    try:
        with daemon.partitioner() as client:
            p = client.create(device=0, memory=0.01, duration=1, grace=1, persist=True)
            p.attach(stubborn.pid)
        expires_at = p.record.expires_at

        daemon.wait_event("sigterm", timeout=expires_at - time.time() + 3, partition=p.id)
        time.sleep(max(0.0, expires_at + 0.6 - time.time()))
        assert stubborn.poll() is None, "it ignores SIGTERM: only SIGKILL, after the grace, ends it"

        code, when = wait_exit(stubborn, expires_at + 1 - time.time() + 3)
        assert code == -signal.SIGKILL
        assert expires_at + 1 - 0.05 <= when <= expires_at + 1 + LATE_S, when - expires_at
        kill = daemon.wait_event("sigkill", partition=p.id)
        assert kill["processes"] == 1
        assert "killed" in {e["kind"] for e in daemon.call("events", id=p.id)}
    finally:
        reap(stubborn)


def test_environment_marker_counts_only_for_the_owner(users: Users, daemon: DaemonProcess) -> None:
    """alice's process with her partition's ID is stopped; bob's, with the same ID, is not."""
    p = json_out(
        users.alice.cli("create", "0", "1%", "1s", "--grace", "1", "--json", env=daemon.env)
    )
    marked_env = {**daemon.env, "CHRONOS_PARTITION_ID": p["id"]}
    alices = users.alice.popen(["sleep", "60"], env=marked_env)
    bobs = users.bob.popen(["sleep", "60"], env=marked_env)
    try:
        expires_at = daemon.record(p["id"])["expires_at"]
        code, when = wait_exit(alices, expires_at - time.time() + 3)
        assert code == -signal.SIGTERM
        assert when <= expires_at + LATE_S
        # Past expiry and past the SIGKILL grace: bob's process is untouched.
        time.sleep(max(0.0, expires_at + 1.5 - time.time()))
        assert bobs.poll() is None, "bob's process was signalled for alice's partition"
        assert daemon.record(p["id"])["state"] == "expired"
        signalled = {
            pid
            for r in daemon.log_lines()
            if r.get("event") in ("sigterm", "sigkill") and isinstance(r.get("processes"), list)
            for pid in r["processes"]
        }
        assert alices.pid in signalled and bobs.pid not in signalled
    finally:
        reap(alices, bobs)


def test_warning_signal_before_the_end(daemon: DaemonProcess, tmp_path: Path) -> None:
    warned_marker, quiet_marker = tmp_path / "warned", tmp_path / "quiet"
    warned_proc, quiet_proc = trapping_usr1(warned_marker), trapping_usr1(quiet_marker)
    try:
        warned = json_out(
            daemon.cli("create", "0", "1%", "2.5s", "--warn", "1s", "--grace", "1", "--json")
        )
        quiet = json_out(daemon.cli("create", "1", "1%", "2.5s", "--grace", "1", "--json"))
        for p, proc in ((warned, warned_proc), (quiet, quiet_proc)):
            attach = daemon.cli("attach", p["id"], str(proc.pid))
            assert attach.returncode == 0, attach.stderr
        ends = {p["id"]: daemon.record(p["id"])["expires_at"] for p in (warned, quiet)}

        wait_for(warned_marker.exists, ends[warned["id"]] - time.time() + 2, what="the warning")
        signo, at = warned_marker.read_text().split()
        assert int(signo) == signal.SIGUSR1
        assert ends[warned["id"]] - 1 - 0.05 <= float(at) <= ends[warned["id"]] - 1 + LATE_S
        assert warned_proc.poll() is None, "the warning must not stop the process"

        for proc in (warned_proc, quiet_proc):  # both end at expiry, by SIGTERM
            code, _ = wait_exit(proc, max(ends.values()) - time.time() + 3)
            assert code == -signal.SIGTERM
        assert not quiet_marker.exists(), "no --warn, yet a warning signal was sent"
        assert len(warned_marker.read_text().splitlines()) == 1, "warned more than once"
        assert [e["kind"] for e in daemon.call("events", id=quiet["id"])].count("warned") == 0
        assert [e["kind"] for e in daemon.call("events", id=warned["id"])].count("warned") == 1
        assert daemon.events("warned", partition=warned["id"])
    finally:
        reap(warned_proc, quiet_proc)


def test_expiry_acts_even_when_a_request_reaps_first(daemon: DaemonProcess) -> None:
    """A busy daemon at the deadline must still stop the partition's processes.

    Every request reaps what is due on its way; with many clients pipelining
    requests, one is served after the deadline and before the expiry timer.
    The partition that request ended must be acted on all the same.
    """
    child = subprocess.Popen(["sleep", "60"])
    socks: list[socket.socket] = []
    try:
        with daemon.partitioner() as client:
            p = client.create(device=0, memory=0.01, duration=1.0, persist=True, grace=1)
            p.attach(child.pid)
        expires_at = p.record.expires_at
        burst = frame(b'{"v": 1, "op": "get", "args": {"id": "%s"}}' % p.id.encode()) * 500
        socks = [raw_connect(daemon.sock, timeout=30) for _ in range(16)]

        def drain(sock: socket.socket) -> None:  # read replies: the daemon never waits to write
            while recv_reply(sock) is not None:
                pass

        def send(sock: socket.socket) -> None:
            sock.sendall(burst)
            sock.shutdown(socket.SHUT_WR)

        threads = [threading.Thread(target=drain, args=(s,), daemon=True) for s in socks]
        for t in threads:
            t.start()
        time.sleep(max(0.0, expires_at - 0.15 - time.time()))
        senders = [threading.Thread(target=send, args=(s,), daemon=True) for s in socks]
        for t in senders:
            t.start()
        code, _ = wait_exit(child, expires_at - time.time() + 5)
        assert code == -signal.SIGTERM, "the partition expired but its process was never stopped"
        daemon.wait_event("expired", partition=p.id)  # logged just after the signals go out
        for t in senders + threads:
            t.join(30)
    finally:
        for sock in socks:
            sock.close()
        reap(child)
