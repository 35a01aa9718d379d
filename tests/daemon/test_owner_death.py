"""Partitions bound to a process end with it; persistent ones do not."""

from __future__ import annotations

import signal
import subprocess
import sys
import time

from chronos import procs

from .support import DaemonProcess, json_out, wait_for

OWNER = r"""
import sys, time
from chronos import Partitioner
p = Partitioner().create(device=0, memory=0.05, duration=3600)
print(p.id, flush=True)
time.sleep(60)
"""


def test_api_partition_ends_when_its_process_is_killed(daemon: DaemonProcess) -> None:
    owner = subprocess.Popen(
        [sys.executable, "-c", OWNER], env=daemon.env, stdout=subprocess.PIPE, text=True
    )
    try:
        assert owner.stdout is not None
        partition_id = owner.stdout.readline().strip()
        assert partition_id in daemon.open_ids()
        assert daemon.record(partition_id)["owner_pid"] == owner.pid
        time.sleep(0.3)
        assert partition_id in daemon.open_ids(), "it must last while its owner lives"

        owner.kill()
        killed_at = time.monotonic()
        owner.wait()
        wait_for(lambda: partition_id not in daemon.open_ids(), 1.0, what="release on owner death")
        assert time.monotonic() - killed_at < 1.0
    finally:
        if owner.poll() is None:
            owner.kill()
            owner.wait()

    record = daemon.record(partition_id)
    assert record["state"] == "released"
    assert "owner" in record["end_reason"] and str(owner.pid) in record["end_reason"]
    ended = [e for e in daemon.call("events", id=partition_id) if e["kind"] == "released"]
    assert len(ended) == 1 and "owner" in ended[0]["detail"]["reason"]
    logged = daemon.wait_event("released", partition=partition_id)
    assert "owner" in logged["reason"]


def test_cli_partition_outlives_the_cli(daemon: DaemonProcess) -> None:
    made = json_out(daemon.cli("create", "0", "10%", "1h", "--json"))
    assert made["owner_pid"] is None
    time.sleep(0.3)  # the CLI process is long gone; give any owner watch time to act
    assert made["id"] in daemon.open_ids()
    assert daemon.record(made["id"])["state"] == "active"


def test_run_partition_ends_with_the_command(daemon: DaemonProcess) -> None:
    started = time.time()
    proc = daemon.cli("run", "--memory", "10%", "--duration", "1h", "--", "sleep", "0.5")
    assert proc.returncode == 0, proc.stderr
    runs = [p for p in daemon.call("list", all=True) if p["kind"] == "run"]
    assert len(runs) == 1, runs
    record = runs[0]
    assert record["state"] == "released", record
    assert record["id"] not in daemon.open_ids()
    assert record["ended_at"] - record["created_at"] >= 0.5, "released before the command ended"
    assert record["ended_at"] <= time.time() and record["created_at"] >= started - 1


def test_run_partition_ends_when_the_supervisor_is_killed(daemon: DaemonProcess) -> None:
    command: dict[int, int] = {}
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chronos.cli",
            "run",
            "--memory",
            "10%",
            "--duration",
            "1h",
            "--",
            "sleep",
            "30",
        ],
        env=daemon.env,
        stderr=subprocess.PIPE,
    )
    try:
        record = wait_for(
            lambda: [p for p in daemon.call("list") if p["kind"] == "run"], 5, what="the run"
        )[0]
        assert record["owner_pid"] == run.pid
        command = wait_for(
            lambda: procs.snapshot(procs.descendants([run.pid]) - {run.pid}),
            5,
            what="the command to run under the supervisor",
        )
        run.send_signal(signal.SIGKILL)
        run.wait()
        wait_for(lambda: record["id"] not in daemon.open_ids(), 1.0, what="release")
        assert "owner" in daemon.record(record["id"])["end_reason"]
        # The command does not run on without a reservation: the daemon stops it too.
        wait_for(
            lambda: not any(procs.is_same_process(p, t) for p, t in command.items()),
            5.0,
            what="the orphaned command to be stopped",
        )
    finally:
        if run.poll() is None:
            run.kill()
            run.wait()
        procs.signal_all(command, signal.SIGKILL)  # the orphaned `sleep 30`, by pid and start
