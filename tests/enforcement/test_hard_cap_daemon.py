"""The hard cap with a real chronosd: simulated GPUs, real processes, real signals.

Processes "hold GPU memory" by declaring it (``declare_process``); the daemon
samples those declarations like NVML's process list and stops what is over.
"""

from __future__ import annotations

import json
import os
import pwd
import signal
import subprocess
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

from chronos.api import Partitioner
from chronos.transport import SocketTransport

from .support import (
    DECLARE,
    GIB,
    GROWS_PAST_CAP,
    IGNORES_SIGTERM,
    PY,
    STAYS_UNDER,
    Daemon,
    OtherUser,
    chronos_argv,
    kill_pid,
    run_args,
    running,
    wait_for,
)


def chronos_run(
    daemon: Daemon, code: str, out: Path, memory: str = "10GiB", timeout: float = 40
) -> subprocess.CompletedProcess[str]:
    return daemon.cli(*run_args(code, out, memory), timeout=timeout)


def run_partition_ids(daemon: Daemon) -> set[str]:
    return {r["partition_id"] for r in daemon.cli_json("events") if r["kind"] == "created"}


def stray_sleeper(env: dict[str, str], *argv: str) -> subprocess.Popen[bytes]:
    command = list(argv) or ["sleep", "30"]
    return subprocess.Popen(command, env=env, stdin=subprocess.DEVNULL, cwd="/")


def row_partition(daemon: Daemon, pid: int) -> Callable[[], tuple[str | None] | None]:
    """Poller of ``pid``'s partition as the daemon attributes it (through the socket)."""

    def check() -> tuple[str | None] | None:
        for device in daemon.call("stats")["devices"]:
            for row in device["processes"]:
                if row["pid"] == pid:
                    return (row["partition_id"],)
        return None

    return check


# ------------------------------------------------------------------------- the cap


def test_a_command_over_its_cap_is_stopped(cap_daemon: Daemon, tmp_path: Path) -> None:
    before = run_partition_ids(cap_daemon)
    started = time.time()
    proc = chronos_run(cap_daemon, GROWS_PAST_CAP, tmp_path)
    ended = time.time()

    over_at = float((tmp_path / "over").read_text())
    assert ended - over_at < 5.0, "the command was not stopped within a few seconds"
    assert ended - started < 15.0
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr)
    assert "held 12.0 GiB" in proc.stderr, proc.stderr
    assert "over its 10.0 GiB" in proc.stderr, proc.stderr

    (pid_id,) = run_partition_ids(cap_daemon) - before
    exceeded = cap_daemon.wait_log("memory_exceeded", partition=pid_id)
    assert exceeded["used_bytes"] == 12 * GIB
    assert exceeded["allowed_bytes"] == 10 * GIB
    term = cap_daemon.wait_log("sigterm", partition=pid_id)
    assert term["why"] == "memory"
    assert term["ts"] >= exceeded["ts"]

    events = [e for e in cap_daemon.cli_json("events", "--id", pid_id)]
    (event,) = [e for e in events if e["kind"] == "memory_exceeded"]
    assert event["detail"]["used_bytes"] == 12 * GIB
    assert event["detail"]["allowed_bytes"] == 10 * GIB
    assert event["detail"]["device"] == 0
    assert "terminated" in [e["kind"] for e in events]


def test_a_command_under_its_cap_is_left_alone(cap_daemon: Daemon, tmp_path: Path) -> None:
    before = run_partition_ids(cap_daemon)
    proc = chronos_run(cap_daemon, STAYS_UNDER, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert "held" not in proc.stderr
    (pid_id,) = run_partition_ids(cap_daemon) - before
    assert cap_daemon.log_events("memory_exceeded", partition=pid_id) == []
    assert cap_daemon.log_events("sigterm", partition=pid_id) == []
    kinds = [e["kind"] for e in cap_daemon.cli_json("events", "--id", pid_id)]
    assert "memory_exceeded" not in kinds
    assert "released" in kinds

    def usage() -> list[dict[str, Any]]:
        events = cap_daemon.cli_json("events", "--id", pid_id)
        return [e["detail"] for e in events if e["kind"] == "usage"]

    (used,) = wait_for(usage, 5.0, what="the usage event")
    assert used["peak_bytes"] == int(9.5 * GIB)
    assert used["byte_seconds"] > 0


def test_a_command_that_ignores_sigterm_is_killed_after_the_memory_grace(
    cap_daemon: Daemon, tmp_path: Path
) -> None:
    before = run_partition_ids(cap_daemon)
    proc = chronos_run(cap_daemon, IGNORES_SIGTERM, tmp_path)
    assert proc.returncode == 128 + signal.SIGKILL, (proc.returncode, proc.stderr)
    assert (tmp_path / "term").exists(), "the command never saw SIGTERM"
    (pid_id,) = run_partition_ids(cap_daemon) - before
    term = cap_daemon.wait_log("sigterm", partition=pid_id)
    kill = cap_daemon.wait_log("sigkill", partition=pid_id)
    assert kill["why"] == "memory"
    assert term["grace_s"] == 0.3
    assert kill["ts"] - term["ts"] >= 0.25  # the memory grace, not at once
    assert kill["ts"] - term["ts"] < 3.0  # and not the 30 s expiry grace
    assert "held 12.0 GiB" in proc.stderr


# ----------------------------------------------------------------------- attribution


def test_another_users_process_cannot_claim_a_partition_by_its_marker(
    cap_daemon: Daemon, other_user: OtherUser
) -> None:
    created = cap_daemon.cli_json("create", "0", "10GiB", "60")
    pid_id = created["id"]
    try:
        marked = {**cap_daemon.env, "CHRONOS_PARTITION_ID": pid_id}
        with (
            running(other_user.popen(["sleep", "30"], marked)) as theirs,
            running(stray_sleeper(marked)) as mine,
        ):
            # setpriv switches user, then execs sleep: wait until it is theirs.
            wait_for(
                lambda: (
                    os.stat(f"/proc/{theirs.pid}").st_uid == other_user.uid
                    and Path(f"/proc/{theirs.pid}/comm").read_text().strip() == "sleep"
                ),
                5.0,
                what="the other user's sleep",
            )
            cap_daemon.declare(theirs.pid, 2 * GIB)
            cap_daemon.declare(mine.pid, 2 * GIB)
            wait_for(row_partition(cap_daemon, theirs.pid), 5.0, what="their process in stats")
            wait_for(row_partition(cap_daemon, mine.pid), 5.0, what="my process in stats")
            theirs_row = cap_daemon.process_row(theirs.pid)
            mine_row = cap_daemon.process_row(mine.pid)
            assert theirs_row is not None and mine_row is not None
            assert theirs_row["user"] == other_user.name
            assert theirs_row["partition_id"] is None  # unpartitioned, whatever its env says
            assert mine_row["partition_id"] == pid_id  # the marker works for the owner
            text = cap_daemon.cli("stats")
            assert text.returncode == 0
            line = [ln for ln in text.stdout.splitlines() if f" {theirs.pid} " in f" {ln} "]
            assert line and "unpartitioned" in line[0], text.stdout
    finally:
        cap_daemon.cli("release", pid_id)


def test_a_double_forked_grandchild_counts_toward_the_run_partition(
    cap_daemon: Daemon, tmp_path: Path
) -> None:
    code = (
        DECLARE + "if os.fork() == 0:\n"
        "    os.setsid()\n"
        "    if os.fork() == 0:\n"
        "        declare(3)\n"
        "        mark(str(os.getpid()))\n"
        "        mark('ready')\n"
        "        time.sleep(30)\n"
        "        os._exit(0)\n"
        "    os._exit(0)\n"
        "os.wait()\n"
    )
    run = subprocess.Popen(
        chronos_argv(*run_args(code, tmp_path)),
        env=cap_daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    with running(run):
        wait_for(lambda: (tmp_path / "ready").exists(), 10.0, what="the grandchild")
        (grandchild,) = [int(p.name) for p in tmp_path.iterdir() if p.name.isdigit()]
        try:
            (run_record,) = [r for r in cap_daemon.cli_json("list") if r["owner_pid"] == run.pid]
            assert run_record["kind"] == "run"
            found = wait_for(row_partition(cap_daemon, grandchild), 5.0, what="grandchild row")
            assert found == (run_record["id"],)
            row = cap_daemon.process_row(grandchild)
            assert row is not None and row["partition_id"] == run_record["id"]
            assert row["used_bytes"] == 3 * GIB

            # It counts toward the cap, too: over it, the daemon stops it.
            cap_daemon.declare(grandchild, 11 * GIB)
            _, stderr = run.communicate(timeout=10)
        finally:
            kill_pid(grandchild)
    # The command itself exited 0 long ago; its grandchild was stopped: still a failure.
    assert run.returncode == 1, stderr
    assert "held 11.0 GiB" in stderr
    assert cap_daemon.log_events("memory_exceeded", partition=run_record["id"])


def test_attach_counts_a_separately_started_process(cap_daemon: Daemon) -> None:
    client = Partitioner(SocketTransport(cap_daemon.sock))
    try:
        p = client.create(device=0, memory="10GiB", duration=60, persist=True)
        with running(stray_sleeper(cap_daemon.env)) as proc:
            cap_daemon.declare(proc.pid, 2 * GIB)
            assert wait_for(row_partition(cap_daemon, proc.pid), 5.0) == (None,)
            p.attach(proc.pid)
            assert wait_for(row_partition(cap_daemon, proc.pid), 5.0) == (p.id,)
            row = cap_daemon.process_row(proc.pid)
            assert row is not None and row["partition_id"] == p.id

            cap_daemon.declare(proc.pid, 12 * GIB)
            assert proc.wait(5) == -signal.SIGTERM
        exceeded = cap_daemon.wait_log("memory_exceeded", partition=p.id)
        assert exceeded["pids"] == [proc.pid]
        p.release()
    finally:
        client.close()


# ------------------------------------------------------------------- unpartitioned


ENFORCE = (
    'memory_grace = "0.3s"\nsample_interval = "0.1s"\nunpartitioned = "enforce"\n'
    'exempt_users = ["nobody"]\nexempt_commands = ["sleep"]\n'
)


def test_enforce_stops_unpartitioned_memory_but_not_the_exempt(
    daemon_factory: Callable[[str], Daemon], other_user: OtherUser
) -> None:
    try:
        entry = pwd.getpwnam("nobody")
    except KeyError:
        pytest.skip("no 'nobody' account to exempt")
    nobody = OtherUser("nobody", entry.pw_uid, entry.pw_gid)
    d = daemon_factory(ENFORCE)
    pid_id = d.cli_json("create", "0", "10GiB", "60")["id"]
    python_sleeper = [PY, "-c", "import time; time.sleep(30)"]
    marked = {**d.env, "CHRONOS_PARTITION_ID": pid_id}
    with (
        running(stray_sleeper(d.env, *python_sleeper)) as stray,
        running(stray_sleeper(d.env)) as exempt_cmd,
        running(nobody.popen(["tail", "-f", "/dev/null"], d.env)) as exempt_user,
        running(other_user.popen(["tail", "-f", "/dev/null"], marked)) as hider,
    ):
        wait_for(
            lambda: (
                os.stat(f"/proc/{hider.pid}").st_uid == other_user.uid
                and os.stat(f"/proc/{exempt_user.pid}").st_uid == nobody.uid
                and Path(f"/proc/{hider.pid}/comm").read_text().strip() == "tail"
            ),
            5.0,
            what="the other users' processes",
        )
        t0 = time.time()
        for proc in (stray, exempt_cmd, exempt_user, hider):
            d.declare(proc.pid, 1 * GIB)
        assert stray.wait(5) == -signal.SIGTERM
        assert hider.wait(5) == -signal.SIGTERM  # a foreign marker hides nothing
        assert time.time() - t0 >= 0.3  # not before the memory grace
        time.sleep(0.8)
        assert exempt_cmd.poll() is None
        assert exempt_user.poll() is None

    stopped = {tuple(r["pids"]) for r in d.log_events("unpartitioned_stopped")}
    assert stopped == {(stray.pid,), (hider.pid,)}
    events = [e for e in d.cli_json("events") if e["kind"] == "unpartitioned"]
    assert {e["detail"]["action"] for e in events} == {"enforce"}
    assert sorted(e["detail"]["pids"][0] for e in events) == sorted([stray.pid, hider.pid])
    d.cli("release", pid_id)


def test_warn_logs_unpartitioned_memory_once_and_stops_nothing(cap_daemon: Daemon) -> None:
    with running(stray_sleeper(cap_daemon.env)) as proc:
        cap_daemon.declare(proc.pid, 1 * GIB)
        warning = cap_daemon.wait_log("unpartitioned", pid=proc.pid)
        assert warning["level"] == "warning"
        assert warning["used_bytes"] == 1 * GIB
        time.sleep(1.0)  # ten more samples
        assert proc.poll() is None
        assert len(cap_daemon.log_events("unpartitioned", pid=proc.pid)) == 1
        assert cap_daemon.log_events("unpartitioned_stopped") == []
    events = [
        e
        for e in cap_daemon.cli_json("events")
        if e["kind"] == "unpartitioned" and e["detail"]["pid"] == proc.pid
    ]
    assert [e["detail"]["action"] for e in events] == ["warn"]


def test_sighup_reloads_the_policy(daemon_factory: Callable[[str], Daemon]) -> None:
    warn = 'memory_grace = "0.3s"\nsample_interval = "0.1s"\nunpartitioned = "warn"\n'
    d = daemon_factory(warn)
    with running(stray_sleeper(d.env)) as proc:
        d.declare(proc.pid, 1 * GIB)
        d.wait_log("unpartitioned", pid=proc.pid)
        time.sleep(0.5)
        assert proc.poll() is None
        d.reconfigure(warn.replace('"warn"', '"enforce"'))
        assert proc.wait(5) == -signal.SIGTERM
    (stopped,) = d.log_events("unpartitioned_stopped")
    assert stopped["pids"] == [proc.pid]
    assert json.loads(json.dumps(stopped))["used_bytes"] == 1 * GIB
