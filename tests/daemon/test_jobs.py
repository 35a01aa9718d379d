"""Batch jobs (``chronos submit``) through a real chronosd, as real users.

Each job here is a small shell script; the daemon starts it as its submitter, in
its partition, and records how it ended.
"""

from __future__ import annotations

import json
import os
import signal
import sqlite3
import subprocess
import sys
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from .conftest import Users
from .support import DaemonProcess, TestUser, shared_tmpdir, wait_for

pytestmark = pytest.mark.usefixtures("users")


def home_of(user: TestUser) -> Path:
    """A directory of the user's own (0700), for the job's cwd and output."""
    path = shared_tmpdir("chronos-jobs-") / user.name
    path.mkdir(mode=0o700)
    os.chown(path, user.uid, user.gid)
    return path


def as_user(
    user: TestUser, d: DaemonProcess, *args: str, cwd: Path, **env: str
) -> subprocess.CompletedProcess[str]:
    """``chronos ARGS`` as ``user`` in ``cwd`` (the job's working directory)."""
    return subprocess.run(
        user.python_argv("-m", "chronos.cli", *args),
        env=user.env(d.env, **env),
        capture_output=True,
        text=True,
        timeout=30,
        cwd=cwd,
    )


def submit(
    user: TestUser, d: DaemonProcess, cwd: Path, script: str, *options: str, **env: str
) -> str:
    proc = as_user(
        user, d, "submit", "--memory", "0.5", "--duration", "1h", *options,
        "--", "/bin/sh", "-c", script, cwd=cwd, **env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job_id = proc.stdout.strip()
    assert job_id.startswith("j"), proc.stdout
    return job_id


def job(d: DaemonProcess, job_id: str) -> dict[str, Any]:
    [found] = d.call("jobs", id=job_id)
    return found


def ended(d: DaemonProcess, job_id: str, timeout: float = 20) -> dict[str, Any]:
    """The job once it has ended: a final state and its end recorded (a running job that
    is cancelled reads ``cancelled`` at once, but has its exit code only once it exits)."""
    return wait_for(
        lambda: (
            (j := job(d, job_id))["state"] not in ("waiting", "starting", "running")
            and j["ended_at"] is not None
            and j
        ),
        timeout,
        f"job {job_id} to end",
    )


def test_job_runs_as_submitter_with_env_cwd_umask(users: Users, daemon: DaemonProcess) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    script = 'id -u; id -g; pwd; umask; echo "$JOB_MARK"; echo "$CHRONOS_PARTITION_ID"'
    job_id = submit(alice, d, cwd, script, "--output", str(cwd / "out.txt"), JOB_MARK="from-submit")
    done = ended(d, job_id)
    assert done["state"] == "done" and done["exit_code"] == 0, done
    out = cwd / "out.txt"
    assert out.stat().st_uid == alice.uid  # written by alice, not by root
    uid, gid, where, umask, mark, partition = out.read_text().split()
    assert (int(uid), int(gid)) == (alice.uid, alice.gid)
    assert where == str(cwd) and umask == "0022" and mark == "from-submit"
    assert partition == done["partition_id"]
    # The job's partition is released when the job ends.
    assert d.record(partition)["state"] == "released"


def test_fair_share_order_and_cancel(users: Users, daemon: DaemonProcess) -> None:
    d = daemon
    a_home, b_home = home_of(users.alice), home_of(users.bob)
    # alice holds the whole GPU 0 in a job; bob's and alice's next jobs queue behind it.
    gate = a_home / "go"
    first = submit(users.alice, d, a_home, f"while [ ! -e {gate} ]; do sleep 0.05; done",
                   "--memory", "1.0", "--output", str(a_home / "first.out"))  # fmt: skip
    wait_for(lambda: job(d, first)["state"] == "running", 10, "first job to run")
    order = a_home.parent / "order"
    order.touch()
    order.chmod(0o666)
    again = submit(users.alice, d, a_home, f"echo alice >> {order}",
                   "--memory", "1.0", "--output", str(a_home / "again.out"))  # fmt: skip
    bobs = submit(users.bob, d, b_home, f"echo bob >> {order}",
                  "--memory", "1.0", "--output", str(b_home / "bob.out"))  # fmt: skip
    doomed = submit(users.bob, d, b_home, "true", "--memory", "1.0",
                    "--output", str(b_home / "never.out"))  # fmt: skip
    assert job(d, doomed)["state"] == "waiting" and "position" in job(d, doomed)
    cancelled = as_user(users.bob, d, "cancel", doomed, cwd=b_home)
    assert cancelled.returncode == 0, cancelled.stderr
    assert job(d, doomed)["state"] == "cancelled"
    # bob cannot cancel alice's job.
    refused = as_user(users.bob, d, "cancel", first, cwd=b_home)
    assert refused.returncode != 0 and "belongs to" in refused.stderr
    gate.touch()
    for j in (first, again, bobs):
        assert ended(d, j)["state"] == "done"
    # alice used GPU-hours just now: bob's job went first, though submitted after hers.
    assert order.read_text().split() == ["bob", "alice"]
    assert (b_home / "never.out").read_text() == ""  # made by bob's client's check, no more


def test_cancel_running_job_stops_it(users: Users, daemon: DaemonProcess) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    job_id = submit(alice, d, cwd, "echo started; exec sleep 600", "--output", str(cwd / "o"))
    wait_for(lambda: "started" in (cwd / "o").read_text(), 10, "the job to start")
    proc = as_user(alice, d, "cancel", job_id, cwd=cwd)
    assert proc.returncode == 0, proc.stderr
    done = ended(d, job_id)
    assert done["state"] == "cancelled" and done["exit_code"] == 128 + signal.SIGTERM, done


def test_refused_at_submit_nothing_queued(users: Users, daemon: DaemonProcess) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    missing = as_user(alice, d, "submit", "--memory", "0.5", "--duration", "1h",
                      "--output", str(cwd / "o"), "--", "no-such-command-x", cwd=cwd)  # fmt: skip
    assert missing.returncode == 127 and "command not found" in missing.stderr
    assert len(missing.stderr.strip().splitlines()) == 1
    unwritable = as_user(alice, d, "submit", "--memory", "0.5", "--duration", "1h",
                         "--output", "/etc/chronos-x.out", "--", "true", cwd=cwd)  # fmt: skip
    assert unwritable.returncode != 0 and "cannot write output" in unwritable.stderr
    assert not Path("/etc/chronos-x.out").exists()
    assert d.call("jobs", all=True) == [] and d.queue() == []


def test_daemon_sigkill_restart_readopts_and_still_enforces(
    users: Users, daemon_factory: Any
) -> None:
    d, alice = daemon_factory(config="grace = 1\n"), users.alice
    cwd = home_of(alice)
    # Ignores SIGTERM: at expiry it is SIGKILLed after the grace.
    script = "trap '' TERM; echo up; while :; do sleep 0.1; done"
    job_id = submit(alice, d, cwd, script, "--duration", "4s", "--output", str(cwd / "o"))
    wait_for(lambda: "up" in (cwd / "o").read_text(), 10, "the job to start")
    pid = job(d, job_id)["pid"]
    d.kill(signal.SIGKILL)
    os.kill(pid, 0)  # the job outlived its daemon
    d.start()
    assert job(d, job_id)["state"] == "running"
    done = ended(d, job_id, timeout=30)
    assert done["state"] == "expired" and done["exit_code"] is None, done  # SIGKILLed
    assert "exit status" not in (done["reason"] or "")
    listed = as_user(alice, d, "jobs", "--json", cwd=cwd)
    assert [j["state"] for j in json.loads(listed.stdout)] == ["expired"]
    wait_for(lambda: not Path(f"/proc/{pid}").exists(), 10, "the stub to be gone")


def test_after_waits_for_the_job_to_end_whatever_its_end(
    users: Users, daemon: DaemonProcess
) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    gate = cwd / "go"
    first = submit(alice, d, cwd, f"while [ ! -e {gate} ]; do sleep 0.05; done; exit 3",
                   "--output", str(cwd / "1"))  # fmt: skip
    second = submit(alice, d, cwd, "echo second", "--after", first[:5],
                    "--output", str(cwd / "2"))  # fmt: skip
    held = job(d, second)
    assert held["state"] == "waiting" and held["after"] == first and held["ticket_id"] is None
    assert held["partition_id"] is None  # asks for nothing while it waits for `first`
    gate.touch()
    assert ended(d, first)["exit_code"] == 3
    assert ended(d, second)["state"] == "done"
    assert (cwd / "2").read_text() == "second\n"


def test_a_start_that_fails_releases_the_partition_at_once(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    d = daemon
    with d.partitioner() as client:  # past the CLI's checks: the daemon's own start fails
        sent = client.submit(
            ["/no/such/program"],
            partition={"device": 0, "memory": 0.25, "duration": 60},
            output=str(tmp_path / "o"),
            cwd=str(tmp_path),
        )
    failed = ended(d, sent["id"])
    assert failed["state"] == "failed" and "No such file" in failed["reason"], failed
    assert d.record(failed["partition_id"])["state"] == "released"
    listed = d.cli("jobs")
    assert "failed to start" in listed.stdout and sent["id"] in listed.stdout


def test_start_books_the_partition_and_the_job_starts_with_it(
    users: Users, daemon: DaemonProcess
) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    start = datetime.now() + timedelta(seconds=2)
    job_id = submit(alice, d, cwd, "date +%s.%N", "--start", start.isoformat(),
                    "--output", str(cwd / "o"))  # fmt: skip
    booked = job(d, job_id)
    assert booked["state"] == "waiting" and d.record(booked["partition_id"])["state"] == "booked"
    done = ended(d, job_id)
    assert done["state"] == "done", done
    assert float((cwd / "o").read_text()) >= start.timestamp() - 0.05


def test_a_job_over_its_memory_is_stopped_and_says_so(users: Users, daemon: DaemonProcess) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    job_id = submit(alice, d, cwd, "echo up; exec sleep 600", "--output", str(cwd / "o"))
    wait_for(lambda: "up" in (cwd / "o").read_text(), 10, "the job to start")
    pid = job(d, job_id)["pid"]
    declare = f"from chronos.devices.simulated import declare_process as d; d({pid}, 0, 60 << 30)"
    subprocess.run([sys.executable, "-c", declare], env=d.env, check=True)  # 60 of its 40 GiB
    done = ended(d, job_id)
    assert done["state"] == "memory" and done["exit_code"] == 128 + signal.SIGTERM, done


def test_a_job_found_starting_after_a_crash_is_failed_never_started_twice(
    users: Users, daemon: DaemonProcess
) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    job_id = submit(alice, d, cwd, "echo ran", "--start", "+1h", "--output", str(cwd / "o"))
    partition = job(d, job_id)["partition_id"]
    d.kill(signal.SIGKILL)
    # As a daemon that died after writing `starting` and before recording the process.
    with sqlite3.connect(d.home / "ledger.db") as db:
        db.execute("UPDATE jobs SET state = 'starting' WHERE id = ?", (job_id,))
    d.start()
    failed = ended(d, job_id)
    assert failed["state"] == "failed" and "not started again" in failed["reason"], failed
    assert d.record(partition)["state"] == "released"
    assert (cwd / "o").read_text() == ""  # the command never ran


def test_what_a_submit_cut_short_left_is_ended_at_start(
    users: Users, daemon: DaemonProcess
) -> None:
    """A daemon killed inside a submit (partition or queue place made, job row not yet
    written) must not leave that memory held, or that place taken, by nobody."""
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    running = submit(alice, d, cwd, "sleep 300", "--output", str(cwd / "a"))
    wait_for(lambda: job(d, running)["state"] == "running", 20, "the first job running")
    queued = submit(alice, d, cwd, "true", "--memory", "0.6", "--output", str(cwd / "b"))
    booked = submit(alice, d, cwd, "true", "--start", "+2h", "--output", str(cwd / "c"))
    ticket, partition = job(d, queued)["ticket_id"], job(d, booked)["partition_id"]
    assert ticket and partition
    d.kill(signal.SIGKILL)
    with sqlite3.connect(d.home / "ledger.db") as db:  # as if their rows were never written
        db.execute("DELETE FROM jobs WHERE id IN (?, ?)", (queued, booked))
    d.start()
    assert d.record(partition)["state"] == "released"
    assert ticket not in {t["ticket"] for t in d.queue()}
    assert job(d, running)["state"] == "running"  # a job that is recorded keeps its own
    d.call("cancel", id=running)


def test_a_job_on_a_group_sees_every_gpu_of_it(users: Users, daemon: DaemonProcess) -> None:
    """``submit --gpus 2``: the job's partition is a group of two GPUs, and the job sees
    both (in share order), each with its own soft cap, as ``chronos run --gpus 2``."""
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    script = 'echo "$CUDA_VISIBLE_DEVICES"; echo "$CHRONOS_SOFT_LIMITS"'
    job_id = submit(alice, d, cwd, script, "--gpus", "2", "--output", str(cwd / "o"))
    done = ended(d, job_id)
    assert done["state"] == "done", done
    visible, limits = (cwd / "o").read_text().split()
    record = d.record(done["partition_id"])
    devices = [record["device"], *(share["device"] for share in record["more_shares"])]
    assert len(devices) == 2
    assert visible == ",".join(map(str, devices))  # the simulated GPUs' form: indices
    assert len(limits.split(",")) == 2
