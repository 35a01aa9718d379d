"""Enforcement on a real NVIDIA GPU: soft caps, the hard cap, expiry, two users.

Run on the GPU machine with ``pytest -m gpu tests/gpu -s``; skipped elsewhere.
Each test prints a ``[enforce-real]`` line with what it measured.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path

import pytest
from gpu_support import (
    chronos,
    events_out,  # noqa: F401 - the `out` fixture, found by name
    nvml_pid_bytes,
    nvml_ready,
    read_events,
    real_daemon,
    wait_pid_freed,
)

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(nvml_ready() is not None, reason=str(nvml_ready())),
]
PROGRAMS = str(Path(__file__).with_name("gpu_programs.py"))
USERS = ("chronos_gpu_alice", "chronos_gpu_bob")


def report(line: str) -> None:
    print(f"\n[enforce-real] {line}", flush=True)


@pytest.fixture(scope="module")
def daemon() -> Iterator[dict[str, str]]:
    # These tests are of the sampling hard cap and the soft caps, so programs that ignore
    # their soft cap must reach the GPU: the allocation-time cap has its own suite
    # (test_allocation_cap_real.py).
    with real_daemon({"CHRONOS_ALLOC_CAP": "off"}) as env:
        yield env


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("creating Unix accounts needs root")
    for name in USERS:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", name], capture_output=True
        )
    yield USERS
    for name in USERS:
        subprocess.run(["userdel", "--remove", name], capture_output=True)


def run_in_partition(
    env: dict[str, str],
    program: str,
    out: Path,
    memory: str,
    duration: str,
    grace: str = "5",
    user: str | None = None,
) -> subprocess.CompletedProcess[str]:
    return chronos(
        env,
        "run",
        "--memory",
        memory,
        "--duration",
        duration,
        "--grace",
        grace,
        "--",
        sys.executable,
        PROGRAMS,
        program,
        str(out),
        user=user,
    )


def kinds(events: list[dict[str, object]]) -> list[object]:
    return [e["event"] for e in events]


def test_soft_cap_gives_a_clean_oom_and_no_kill(daemon: dict[str, str], out: Path) -> None:
    result = run_in_partition(daemon, "torch_fill_to_soft_cap", out, "0.1", "300")
    events = read_events(out)
    filled = next(e["bytes"] for e in events if e["event"] == "filled")
    report(
        f"10% partition: a 50% allocation -> {kinds(events)[0]}; filled {filled / 2**30:.2f} "
        f"GiB through PyTorch before its OOM; exit {result.returncode}"
    )
    assert "oom_on_big_allocation" in kinds(events), result.stderr
    assert "alive" in kinds(events), result.stderr
    assert "sigterm" not in kinds(events)
    assert result.returncode == 0, result.stderr


@pytest.mark.parametrize("program", ["jax_soft_cap", "cupy_soft_cap"])
def test_jax_and_cupy_soft_caps_give_their_own_oom(
    daemon: dict[str, str], out: Path, program: str
) -> None:
    result = run_in_partition(daemon, program, out, "0.1", "300")
    events = read_events(out)
    report(f"{program}: {[(e['event'], e.get('error')) for e in events]}; exit {result.returncode}")
    assert "oom_on_big_allocation" in kinds(events), result.stderr
    assert "alive" in kinds(events) and "sigterm" not in kinds(events)
    assert result.returncode == 0, result.stderr


def test_hard_cap_terminates_a_process_that_ignores_the_soft_cap(
    daemon: dict[str, str], out: Path
) -> None:
    result = run_in_partition(daemon, "cupy_exceed", out, "0.05", "300", grace="2")
    events = read_events(out)
    crossed = next(e for e in events if e["event"] == "crossed")
    term = next(e for e in events if e["event"] == "sigterm")
    freed = wait_pid_freed(int(crossed["pid"]))
    latency = term["t"] - crossed["t"]
    report(
        f"cap crossed ({crossed['bytes'] / 2**30:.2f} GiB > {crossed['cap'] / 2**30:.2f} GiB)"
        f" -> SIGTERM in {latency * 1000:.0f} ms; memory free "
        f"{(freed - term['t']) * 1000 if freed else float('nan'):.0f} ms after SIGTERM; "
        f"exit {result.returncode}; stderr: {result.stderr.strip().splitlines()[-1:]}"
    )
    assert "not_stopped" not in kinds(events)
    assert latency < 1.0
    assert freed is not None and freed - term["t"] < 1.0
    assert result.returncode != 0
    assert "over" in result.stderr


def test_expiry_sends_sigterm_on_time_and_memory_is_freed(
    daemon: dict[str, str], out: Path
) -> None:
    result = run_in_partition(daemon, "torch_hold_until_end", out, "0.1", "20", grace="5")
    events = read_events(out)
    term = next(e for e in events if e["event"] == "sigterm")
    partitions = json.loads(chronos(daemon, "list", "--all", "--json").stdout)
    mine = next(p for p in partitions if p["id"] == term["partition"])
    expires_at = datetime.fromisoformat(mine["expires_at"]).timestamp()
    assert mine["state"] == "expired"
    freed = wait_pid_freed(int(term["pid"]))
    lateness = term["t"] - expires_at
    report(
        f"expiry: SIGTERM {lateness * 1000:.1f} ms after expires_at; memory free "
        f"{(freed - term['t']) * 1000 if freed else float('nan'):.0f} ms after SIGTERM; "
        f"chronos run exit {result.returncode}"
    )
    assert result.returncode == 124
    assert 0 <= lateness < 0.2
    assert freed is not None and freed - term["t"] < 1.0


def test_two_users_side_by_side_each_held_to_their_cap(
    daemon: dict[str, str], out: Path, users: tuple[str, str]
) -> None:
    alice, bob = users
    out_bob = out.with_name("bob.jsonl")
    within = subprocess.Popen(
        [
            "runuser",
            "-u",
            alice,
            "--",
            "env",
            *[f"{k}={v}" for k, v in daemon.items() if k.startswith(("CHRONOS", "PYTHON", "PATH"))],
            sys.executable,
            "-m",
            "chronos.cli",
            "run",
            "--memory",
            "0.1",
            "--duration",
            "300",
            "--",
            sys.executable,
            PROGRAMS,
            "torch_within_for",
            str(out),
        ],
        env=daemon,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(1.0)
    over = run_in_partition(daemon, "cupy_exceed", out_bob, "0.05", "300", grace="2", user=bob)
    alice_out, alice_err = within.communicate(timeout=120)
    alice_events, bob_events = read_events(out), read_events(out_bob)
    owners = {p["user"] for p in json.loads(chronos(daemon, "list", "--all", "--json").stdout)}
    report(
        f"two users: {alice} exit {within.returncode} events {kinds(alice_events)}; "
        f"{bob} exit {over.returncode} events {kinds(bob_events)}"
    )
    assert {alice, bob} <= owners
    assert within.returncode == 0, alice_err
    assert "done" in kinds(alice_events) and "sigterm" not in kinds(alice_events)
    assert "sigterm" in kinds(bob_events) and over.returncode != 0, over.stderr


def test_stats_shows_a_partitioned_process_with_pid_user_and_memory(
    daemon: dict[str, str], out: Path
) -> None:
    child = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chronos.cli",
            "run",
            "--memory",
            "0.2",
            "--duration",
            "300",
            "--",
            sys.executable,
            PROGRAMS,
            "torch_hold_10gib",
            str(out),
        ],
        env=daemon,
    )
    try:
        deadline = time.time() + 120
        while not any(e["event"] == "holding" for e in read_events(out)):
            assert time.time() < deadline and child.poll() is None
            time.sleep(0.1)
        pid = next(e["pid"] for e in read_events(out) if e["event"] == "holding")
        stats = json.loads(chronos(daemon, "stats", "--json").stdout)
        procs = [p for d in stats for p in d["processes"] if p["pid"] == pid]
        nvml = nvml_pid_bytes(pid)
        assert procs and nvml
        seen = procs[0]
        report(
            f"stats: pid {pid} user {seen['user']} {seen['used_bytes'] / 2**30:.2f} GiB "
            f"(NVML {nvml / 2**30:.2f} GiB) partition {seen['partition_id']}"
        )
        assert seen["user"] == "root"
        assert abs(seen["used_bytes"] - nvml) <= 0.05 * nvml
        assert seen["used_bytes"] >= 10 * 2**30
        assert seen["partition_id"] is not None
    finally:
        child.terminate()
        child.wait(timeout=60)
    gone_at = wait_pid_freed(pid, timeout=5)
    start = time.time()
    while time.time() - start < 5:
        stats = json.loads(chronos(daemon, "stats", "--json").stdout)
        if not any(p["pid"] == pid for d in stats for p in d["processes"]):
            break
    report(
        f"stats: pid {pid} gone from chronos stats {time.time() - start:.2f} s after exit "
        f"(NVML freed: {gone_at is not None})"
    )
    assert time.time() - start < 1.0 + 1.0  # one stats call may itself take a moment
