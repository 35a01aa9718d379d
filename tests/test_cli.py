"""The ``chronos`` command line, through real subprocesses."""

from __future__ import annotations

import functools
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import TestUser, daemons
from chronos_testing import _pick_python as pick_user_python
from helpers import (
    GIB,
    MIB,
    SIM_GPU_BYTES,
    assert_one_line_error,
    cli_in_process,
    cli_json,
    ledger_rows,
    make_env,
    readline_within,
    run_cli,
)

STATS_FIELDS = {
    "index",
    "name",
    "vendor",
    "total_bytes",
    "used_bytes",
    "free_bytes",
    "committed_bytes",
    "active_partitions",
}


def cli_json_here(*args: str, env: dict[str, str]) -> Any:
    """``cli_json`` in this process: for tests of what the CLI answers, not of a process."""
    return cli_json(*args, env=env, in_process=True)


def create(env: dict[str, str], *args: str) -> dict[str, Any]:
    return cli_json_here("create", *args, env=env)


def parse_iso(text: str) -> datetime:
    stamp = datetime.fromisoformat(text)
    assert stamp.tzinfo is not None and stamp.utcoffset() is not None, text
    return stamp


def without_remaining(items: list[dict[str, Any]]) -> list[dict[str, Any]]:
    return [{k: v for k, v in item.items() if k != "time_remaining"} for item in items]


def processes_with_env(name: str, value: str) -> list[int]:
    """PIDs whose environment has ``name=value`` (needs root or the same user)."""
    needle = f"{name}={value}".encode()
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit() or int(entry) == os.getpid():
            continue
        try:
            with open(f"/proc/{entry}/environ", "rb") as f:
                items = f.read().split(b"\0")
        except OSError:
            continue
        if needle in items:
            found.append(int(entry))
    return found


def alive(pid: int) -> bool:
    try:
        with open(f"/proc/{pid}/stat", "rb") as f:
            raw = f.read()
    except OSError:
        return False
    return raw[raw.rfind(b")") + 2 : raw.rfind(b")") + 3] not in (b"Z", b"X")


def kill_partition_processes(env: dict[str, str]) -> None:
    """Clean-up after a failed run test: kill whatever still runs in its partitions."""
    proc = run_cli("list", "--all", "--json", env=env)
    try:
        ids = [p["id"] for p in json.loads(proc.stdout)]
    except ValueError:
        return
    for pid_ in ids:
        for pid in processes_with_env("CHRONOS_PARTITION_ID", pid_):
            try:
                os.kill(pid, signal.SIGKILL)
            except OSError:
                pass


# -------------------------------------------------------------------- stats


def test_stats_table_and_json(chronos_env: dict[str, str]) -> None:
    p = create(chronos_env, "1", "0.25", "1h")
    proc = cli_in_process("stats", env=chronos_env)
    assert proc.returncode == 0, proc.stderr
    for index in (0, 1):
        assert f"GPU {index}" in proc.stdout
        assert f"Simulated GPU {index}" in proc.stdout
    assert "simulated" in proc.stdout
    assert "80.0 GiB" in proc.stdout
    assert "20.0 GiB" in proc.stdout  # committed on GPU 1

    data = cli_json_here("stats", env=chronos_env)
    assert isinstance(data, list) and len(data) == 2
    for index, dev in enumerate(data):
        assert set(dev) >= STATS_FIELDS
        assert dev["index"] == index
        assert dev["vendor"] == "simulated"
        assert dev["total_bytes"] == SIM_GPU_BYTES
        assert dev["used_bytes"] + dev["free_bytes"] == dev["total_bytes"]
    assert (data[0]["committed_bytes"], data[0]["active_partitions"]) == (0, 0)
    assert (data[1]["committed_bytes"], data[1]["active_partitions"]) == (p["memory_bytes"], 1)


def _has_gpu_devices() -> bool:
    dri = Path("/dev/dri")
    has_render = dri.is_dir() and any(n.startswith("renderD") for n in os.listdir(dri))
    return Path("/dev/nvidia0").exists() or Path("/dev/kfd").exists() or has_render


@pytest.mark.skipif(_has_gpu_devices(), reason="this machine has a GPU")
def test_stats_without_gpu_explains_simulated_backend(chronos_env: dict[str, str]) -> None:
    env = dict(chronos_env)
    del env["CHRONOS_BACKEND"]
    proc = run_cli("stats", env=env)
    line = assert_one_line_error(proc)
    assert "no GPU" in line
    assert "CHRONOS_BACKEND=simulated" in line
    assert proc.stdout == ""


def test_simulated_gpu_sizes_from_env(chronos_env: dict[str, str]) -> None:
    env = {**chronos_env, "CHRONOS_SIMULATED_GPUS": "80GiB,24GiB"}
    data = cli_json_here("stats", env=env)
    assert [d["total_bytes"] for d in data] == [80 * GIB, 24 * GIB]
    assert create(env, "1", "24GiB", "1m")["memory_bytes"] == 24 * GIB
    line = assert_one_line_error(cli_in_process("create", "1", "25GiB", "1m", env=env))
    assert "24.0 GiB" in line


# ------------------------------------------------- create / list / release


def test_create_list_release_across_processes(chronos_env: dict[str, str]) -> None:
    made = run_cli("create", "0", "0.5", "1h", env=chronos_env)
    assert made.returncode == 0, made.stderr
    match = re.search(r"partition ([0-9a-f]+)", made.stdout)
    assert match, made.stdout
    pid = match.group(1)
    assert "GPU 0" in made.stdout and "40.0 GiB" in made.stdout and "left" in made.stdout

    listed = cli_json("list", env=chronos_env)
    assert [p["id"] for p in listed] == [pid]
    (item,) = listed
    assert item["device"] == 0
    assert item["memory_bytes"] == SIM_GPU_BYTES // 2
    assert item["memory_fraction"] == 0.5
    assert item["state"] == "active"
    assert item["user"]
    created, expires = parse_iso(item["created_at"]), parse_iso(item["expires_at"])
    assert (expires - created).total_seconds() == pytest.approx(3600, abs=0.01)
    assert 3500 < item["time_remaining"] <= 3600

    table = run_cli("list", env=chronos_env)
    assert pid in table.stdout and "40.0 GiB" in table.stdout and "active" in table.stdout
    shares = run_cli("list", "--format", "id,share", "--no-header", env=chronos_env)
    assert shares.stdout.split() == [pid, "50%"]

    gone = run_cli("release", pid, env=chronos_env)
    assert gone.returncode == 0, gone.stderr
    assert pid in gone.stdout and "released" in gone.stdout
    assert cli_json("list", env=chronos_env) == []
    everything = cli_json("list", "--all", env=chronos_env)
    assert [(p["id"], p["state"]) for p in everything] == [(pid, "released")]
    kinds = [(e["kind"], e["partition_id"]) for e in cli_json("events", env=chronos_env)]
    assert kinds == [("created", pid), ("released", pid)]


def test_create_prints_id_device_bytes_and_expiry(chronos_env: dict[str, str]) -> None:
    data = create(chronos_env, "1", "512MiB", "90s")
    assert re.fullmatch(r"[0-9a-f]{8}", data["id"])
    assert data["device"] == 1
    assert data["memory_bytes"] == 512 * MIB
    assert data["state"] == "active"
    assert 80 < data["time_remaining"] <= 90
    stamp = parse_iso(data["expires_at"])
    assert abs(stamp.timestamp() - (time.time() + data["time_remaining"])) < 5


@pytest.mark.parametrize(
    ("memory", "nbytes"),
    [
        ("0.5", SIM_GPU_BYTES // 2),
        ("50%", SIM_GPU_BYTES // 2),
        ("40GiB", 40 * GIB),
        ("512MiB", 512 * MIB),
    ],
)
def test_memory_forms(chronos_env: dict[str, str], memory: str, nbytes: int) -> None:
    assert create(chronos_env, "0", memory, "60")["memory_bytes"] == nbytes


@pytest.mark.parametrize(
    ("duration", "seconds"), [("90s", 90), ("45m", 2700), ("2h", 7200), ("1h30m", 5400)]
)
def test_duration_forms(chronos_env: dict[str, str], duration: str, seconds: int) -> None:
    data = create(chronos_env, "0", "0.1", duration)
    span = parse_iso(data["expires_at"]) - parse_iso(data["created_at"])
    assert span.total_seconds() == pytest.approx(seconds, abs=0.01)
    assert seconds - 10 < data["time_remaining"] <= seconds


def test_every_command_takes_json(chronos_env: dict[str, str]) -> None:
    p = create(chronos_env, "0", "0.1", "1h")
    extended = cli_json_here("extend", p["id"], "10m", env=chronos_env)
    assert parse_iso(extended["expires_at"]) > parse_iso(p["expires_at"])
    attached = cli_json_here("attach", p["id"], str(os.getpid()), env=chronos_env)
    assert attached == {"id": p["id"], "pid": os.getpid()}
    released = cli_json_here("release", p["id"], env=chronos_env)
    assert released["state"] == "released" and released["time_remaining"] == 0
    parse_iso(released["ended_at"])
    for item in cli_json_here("events", env=chronos_env):
        parse_iso(item["at"])
    assert isinstance(cli_json_here("list", "--all", env=chronos_env), list)


def test_refusal_says_what_is_free_and_when(chronos_env: dict[str, str]) -> None:
    first = create(chronos_env, "0", "0.75", "1h")
    proc = cli_in_process("create", "0", "0.5", "1h", env=chronos_env)
    line = assert_one_line_error(proc)
    assert "20.0 GiB free" in line
    local = parse_iso(first["expires_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert local in line
    events = cli_json_here("events", env=chronos_env)
    assert events[-1]["kind"] == "refused"
    assert cli_json_here("list", env=chronos_env)[0]["id"] == first["id"]


def test_expiry_after_short_duration(chronos_env: dict[str, str]) -> None:
    p = create(chronos_env, "0", "1", "1.5s")
    assert [q["id"] for q in cli_json("list", env=chronos_env)] == [p["id"]]
    wait = parse_iso(p["expires_at"]).timestamp() - time.time()
    time.sleep(max(0.0, wait) + 0.05)
    assert cli_json("list", env=chronos_env) == []
    assert run_cli("list", env=chronos_env).stdout.strip() == "no active partitions"
    (ended,) = cli_json("list", "--all", env=chronos_env)
    assert (ended["id"], ended["state"], ended["time_remaining"]) == (p["id"], "expired", 0)
    table = run_cli("list", "--all", env=chronos_env).stdout
    assert p["id"] in table and "expired" in table
    expired = [e for e in cli_json("events", env=chronos_env) if e["kind"] == "expired"]
    assert [e["partition_id"] for e in expired] == [p["id"]]
    assert parse_iso(expired[0]["at"]) == parse_iso(p["expires_at"])
    # The whole GPU is free again.
    create(chronos_env, "0", "1", "10s")


# ----------------------------------------------------------------- --user


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root")
def test_user_option_from_root(chronos_env: dict[str, str]) -> None:
    import pwd

    nobody = pwd.getpwnam("nobody")
    data = create(chronos_env, "0", "0.1", "1h", "--user", "nobody")
    assert (data["user"], data["uid"]) == ("nobody", nobody.pw_uid)
    before = ledger_rows(chronos_env)
    line = assert_one_line_error(
        run_cli("create", "0", "0.1", "1h", "--user", "no-such-user-xyz", env=chronos_env)
    )
    assert "no-such-user-xyz" in line
    assert ledger_rows(chronos_env) == before


# ------------------------------------------------------------- bad inputs


@pytest.fixture(scope="module")
def populated(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """One shared ledger with an active and a released partition."""
    env = make_env(tmp_path_factory.mktemp("bad") / "home")
    active = create(env, "0", "0.25", "2h")
    ended = create(env, "1", "0.25", "2h")
    cli_json_here("release", ended["id"], env=env)
    view = (
        without_remaining(cli_json_here("list", "--all", env=env)),
        cli_json_here("events", env=env),
    )
    return {"env": env, "active": active["id"], "released": ended["id"], "view": view}


BAD_INPUTS = [
    ("create", "0", "0", "1h"),
    ("create", "0", "-1", "1h"),
    ("create", "0", "--", "-1", "1h"),
    ("create", "0", "1.5", "1h"),
    ("create", "0", "nan", "1h"),
    ("create", "0", "inf", "1h"),
    ("create", "0", "abc", "1h"),
    ("create", "0", "200GiB", "1h"),
    ("create", "0", "abc", "1h", "--json"),
    ("create", "0", "0.1", "0"),
    ("create", "0", "0.1", "-5"),
    ("create", "0", "--", "0.1", "-5"),
    ("create", "0", "0.1", "abc"),
    ("create", "0", "0.1", "1h30"),
    ("create", "0", "0.1", "99999d"),
    ("create", "0", "0.1", "1000000000000"),
    ("create", "7", "0.1", "1h"),
    ("create", "--", "-1", "0.1", "1h"),
    ("create", "x", "0.1", "1h"),
    ("create", "1.5", "0.1", "1h"),
    ("create", "0", "0.1"),
    ("create", "0", "0.1", "1h", "--grace", "abc"),
    ("create", "0", "0.1", "1h", "--warn-signal", "USR1"),
    ("create", "0", "0.1", "1h", "--warn", "1m", "--warn-signal", "NOPE"),
    ("release", "deadbeef"),
    ("release", "deadbeef", "--json"),
    ("release", "{released}"),
    ("release", "{released}", "--json"),
    ("extend", "deadbeef", "1h"),
    ("extend", "{active}", "abc"),
    ("extend", "{released}", "1h"),
    ("attach", "{active}", "999999999"),
    ("events", "--since", "abc"),
    ("run", "--memory", "0", "--duration", "60", "--", "true"),
    ("run", "--memory", "0.1", "--duration", "abc", "--", "true"),
    ("run", "--device", "7", "--memory", "0.1", "--duration", "60", "--", "true"),
    ("run", "--device", "x", "--memory", "0.1", "--duration", "60", "--", "true"),
    ("frobnicate",),
    ("create", "0", "0.1", "1h", "--start", "2020-01-01T09:00"),
    ("create", "0", "0.1", "1h", "--start", "09:00", "--repeat", "daily", "--until", "2020-01-01"),
    ("create", "0", "0.1", "1m", "--warn", "2m"),
    ("create", "0", "0.1", "1m", "--warn", "1m"),
    ("stats", "--watch", "--interval", "0"),
    ("stats", "--watch", "--interval", "-1"),
    ("stats", "--device", "7"),
    ("calendar", "--days", "0"),
    ("calendar", "--days", "-1"),
    ("calendar", "--days", "nan"),
    ("stats", "--watch", "--interval", "inf"),
    ("list", "--format", "id,bogus"),
    ("list", "--state", "sleeping"),
    ("list", "--me", "--user", "root"),
    ("run", "--memory", "0.1", "--duration", "60", "--wiat", "--", "true"),
    ("run", "--memory", "0.1", "--duration", "60", "--", "/nonexistent/program"),
    ("run", "--memory", "0.1", "--duration", "60", "--", "no-such-cmd-xyz"),
    ("run", "--memory", "0.1", "--", "true"),
    ("run", "--reuse", "--", "true"),
    ("events", "--id", "zzzz"),
    ("get", "zzzz"),
    ("cancel", "qzzz"),
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_and_changes_nothing(
    populated: dict[str, Any], args: tuple[str, ...]
) -> None:
    env = populated["env"]
    argv = [a.format(**populated) if a.startswith("{") else a for a in args]
    before = ledger_rows(env)
    proc = cli_in_process(*argv, env=env)
    if "--json" in argv:
        assert_json_error(proc)
    else:
        assert_one_line_error(proc)
    assert proc.stdout == ""
    assert ledger_rows(env) == before


def assert_json_error(proc: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    """Under --json an error is one JSON object on stderr: code, message, exit code."""
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    (line,) = proc.stderr.splitlines()
    error = json.loads(line)["error"]
    assert set(error) == {"code", "message", "exit_code"}
    assert error["exit_code"] == proc.returncode
    assert error["message"] and "\n" not in error["message"]
    return dict(error)


def test_second_release_and_unknown_id_messages(populated: dict[str, Any]) -> None:
    env = populated["env"]
    again = assert_one_line_error(cli_in_process("release", populated["released"], env=env))
    assert populated["released"] in again and "released" in again
    unknown = assert_one_line_error(cli_in_process("release", "deadbeef", env=env))
    assert "deadbeef" in unknown


def test_bad_inputs_left_the_ledger_view_unchanged(populated: dict[str, Any]) -> None:
    env = populated["env"]
    view = (
        without_remaining(cli_json_here("list", "--all", env=env)),
        cli_json_here("events", env=env),
    )
    assert view == populated["view"]


# -------------------------------------------------------------------- run


def test_run_passes_env_and_exit_status(chronos_env: dict[str, str]) -> None:
    proc = run_cli(
        "run",
        "--memory",
        "0.1",
        "--duration",
        "60",
        "--",
        "sh",
        "-c",
        "echo $CHRONOS_PARTITION_ID $CUDA_VISIBLE_DEVICES; exit 7",
        env=chronos_env,
    )
    assert proc.returncode == 7, proc.stderr
    assert "Traceback" not in proc.stderr
    pid, visible = proc.stdout.split()
    assert visible == "0"
    (record,) = cli_json("list", "--all", env=chronos_env)
    assert record["id"] == pid
    assert record["state"] == "released"
    assert record["kind"] == "run"
    assert cli_json("list", env=chronos_env) == []


def test_run_on_other_device_and_signal_status(chronos_env: dict[str, str]) -> None:
    proc = run_cli(
        "run",
        "--device",
        "1",
        "--memory",
        "50%",
        "--duration",
        "1m",
        "--",
        "sh",
        "-c",
        "echo $CUDA_VISIBLE_DEVICES; kill -KILL $$",
        env=chronos_env,
    )
    assert proc.stdout.strip() == "1"
    assert proc.returncode == 128 + signal.SIGKILL
    assert cli_json("list", env=chronos_env) == []


def test_run_missing_command(chronos_env: dict[str, str]) -> None:
    proc = run_cli(
        "run", "--memory", "0.1", "--duration", "60", "--", "no-such-cmd-xyz", env=chronos_env
    )
    assert proc.returncode != 0
    assert "Traceback" not in proc.stderr
    assert "no-such-cmd-xyz" in proc.stderr
    assert cli_json("list", env=chronos_env) == []


def test_run_stops_command_at_expiry(chronos_env: dict[str, str], tmp_path: Path) -> None:
    grandchild = tmp_path / "grandchild.pid"
    script = f'(sleep 300 & echo $! > {grandchild}) ; trap "" TERM; sleep 300'
    start = time.monotonic()
    try:
        proc = run_cli(
            "run",
            "--memory",
            "0.1",
            "--duration",
            "1.5s",
            "--grace",
            "1",
            "--",
            "sh",
            "-c",
            script,
            env=chronos_env,
            timeout=15,
        )
        elapsed = time.monotonic() - start
        assert proc.returncode == 124, proc.stderr
        assert "Traceback" not in proc.stderr
        assert "expired" in proc.stderr
        assert elapsed < 1.5 + 1 + 5
        (record,) = cli_json("list", "--all", env=chronos_env)
        assert record["state"] == "expired"
        assert record["id"] in proc.stderr
        # Nothing started inside the partition survives, double-forked or not.
        assert grandchild.exists(), "the grandchild never started"
        gpid = int(grandchild.read_text())
        deadline = time.monotonic() + 3
        while (left := processes_with_env("CHRONOS_PARTITION_ID", record["id"])) or alive(gpid):
            assert time.monotonic() < deadline, f"still running: {left}, grandchild {gpid}"
            time.sleep(0.05)
    finally:
        kill_partition_processes(chronos_env)


def test_run_refused_does_not_start_the_command(
    chronos_env: dict[str, str], tmp_path: Path
) -> None:
    create(chronos_env, "0", "0.9", "1h")
    marker = tmp_path / "ran"
    proc = run_cli(
        "run", "--memory", "0.2", "--duration", "60", "--", "touch", str(marker), env=chronos_env
    )
    line = assert_one_line_error(proc)
    assert "free" in line
    assert not marker.exists()
    assert len(cli_json("list", env=chronos_env)) == 1


def test_run_forwards_sigterm_and_releases(chronos_env: dict[str, str]) -> None:
    child = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "run", "--memory", "0.1", "--duration", "60"]
        + ["--", "sh", "-c", 'trap "echo stopping; exit 5" TERM; echo up; sleep 30 & wait'],
        env=chronos_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert readline_within(child.stdout, 15).strip() == "up"
        child.send_signal(signal.SIGTERM)
        out, err = child.communicate(timeout=10)
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        kill_partition_processes(chronos_env)
    assert child.returncode == 5, err
    assert "stopping" in out
    (record,) = cli_json("list", "--all", env=chronos_env)
    assert record["state"] == "released"


def test_run_killed_supervisor_frees_the_partition(
    chronos_env: dict[str, str], tmp_path: Path
) -> None:
    pidfile = tmp_path / "child.pid"
    child = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "run", "--memory", "1", "--duration", "1h"]
        + ["--", "sh", "-c", f"echo $$ > {pidfile}; echo up; exec sleep 30"],
        env=chronos_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
    )
    try:
        assert child.stdout is not None
        assert readline_within(child.stdout, 15).strip() == "up"
        assert len(cli_json("list", env=chronos_env)) == 1
        child.kill()
        child.wait(timeout=10)
        # The partition belonged to the supervisor process, which is gone.
        assert cli_json("list", env=chronos_env) == []
        create(chronos_env, "0", "1", "10s")
    finally:
        if child.poll() is None:
            child.kill()
            child.wait()
        child.stdout.close()  # type: ignore[union-attr]
        if pidfile.exists():
            try:
                os.kill(int(pidfile.read_text()), signal.SIGKILL)
            except (OSError, ValueError):
                pass


# ------------------------------------------------------------- two users


@pytest.fixture
def shared_env(chronos_env: dict[str, str]) -> dict[str, str]:
    """A state dir that an unprivileged account can reach too (pytest's tmp is 0700)."""
    base = Path(tempfile.mkdtemp(prefix="chronos-test-"))
    base.chmod(0o755)
    env = {**chronos_env, "CHRONOS_HOME": str(base / "home")}
    yield env
    shutil.rmtree(base, ignore_errors=True)


@functools.cache
def nobody() -> TestUser:
    """``nobody``, with an interpreter it can run (the venv's, or a system one as fallback).

    The venv's interpreter may live under a home directory other users cannot enter
    (pyenv or conda under a 0700 home): then the same fallback the multi-user fixtures
    use applies, and the test skips only if no interpreter can import chronos at all.
    """
    import pwd

    entry = pwd.getpwnam("nobody")
    probe = TestUser("nobody", entry.pw_uid, entry.pw_gid)
    python, extra = pick_user_python(probe)
    return TestUser("nobody", entry.pw_uid, entry.pw_gid, python, extra)


def run_as_nobody(*args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return nobody().cli(*args, env=env)


@pytest.mark.skipif(os.geteuid() != 0, reason="needs root to act as a second user")
def test_second_user_shares_the_ledger_but_not_the_partitions(shared_env: dict[str, str]) -> None:
    mine = create(shared_env, "0", "0.5", "1h")
    listed = run_as_nobody("list", "--json", env=shared_env)
    assert listed.returncode == 0, listed.stderr
    assert [p["id"] for p in json.loads(listed.stdout)] == [mine["id"]]

    before = ledger_rows(shared_env)
    denied = assert_one_line_error(run_as_nobody("release", mine["id"], env=shared_env))
    assert mine["id"] in denied and "root" in denied
    as_root = assert_one_line_error(
        run_as_nobody("create", "0", "0.1", "1h", "--user", "root", env=shared_env)
    )
    assert "administrator" in as_root
    assert ledger_rows(shared_env) == before

    theirs = run_as_nobody("create", "0", "0.25", "1h", "--json", env=shared_env)
    assert theirs.returncode == 0, theirs.stderr
    data = json.loads(theirs.stdout)
    assert data["user"] == "nobody"
    # Root's process is named as root's (root's uid 0 once read as "no owner": -1).
    foreign = assert_one_line_error(run_as_nobody("attach", data["id"], "1", env=shared_env))
    assert "process 1 belongs to root" in foreign
    # Admission counts both users' partitions.
    line = assert_one_line_error(run_cli("create", "0", "0.5", "1h", env=shared_env))
    assert "20.0 GiB free" in line
    # The administrator may end anyone's partition.
    assert cli_json("release", data["id"], env=shared_env)["state"] == "released"


# ------------------------------------------------------------- help, exit codes


@pytest.mark.parametrize("args", [(), ("config",)], ids=["chronos", "chronos config"])
def test_no_subcommand_prints_help_and_succeeds(
    chronos_env: dict[str, str], args: tuple[str, ...]
) -> None:
    proc = run_cli(*args, env=chronos_env)
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("Usage: chronos")
    assert "Commands:" in proc.stdout
    assert proc.stderr == ""


def test_chronosd_version(chronos_env: dict[str, str]) -> None:
    from chronos import __version__

    proc = subprocess.run(
        [sys.executable, "-m", "chronos.daemon.main", "--version"],
        env=chronos_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.strip() == f"chronosd {__version__}"


@pytest.mark.parametrize("command", ["run", "create", "list", "stats"])
def test_help_lists_cluster_and_the_cluster_form_has_its_own(
    chronos_env: dict[str, str], command: str
) -> None:
    local = run_cli(command, "--help", env=chronos_env)
    assert local.returncode == 0 and "--cluster" in local.stdout, local.stdout
    cluster = run_cli(command, "--cluster", "--help", env=chronos_env)
    assert cluster.returncode == 0, cluster.stderr
    assert f"chronos {command} --cluster" in cluster.stdout
    assert cluster.stdout != local.stdout


def _no_slurm(env: dict[str, str], tmp_path: Path, how: str) -> dict[str, str]:
    """No Slurm cluster: a PATH without sbatch, or a SLURM_CONF that is not there."""
    if how == "no sbatch":
        empty = tmp_path / "bin"
        empty.mkdir()
        return {**env, "PATH": str(empty)}
    return {**env, "SLURM_CONF": str(tmp_path / "missing" / "slurm.conf")}


@pytest.mark.parametrize("how", ["no sbatch", "no slurm.conf"])
def test_submit_without_a_cluster_is_one_line(
    chronos_env: dict[str, str], tmp_path: Path, how: str
) -> None:
    env = _no_slurm(chronos_env, tmp_path, how)
    args = ("submit", "--memory", "4GiB", "--duration", "1h", "--", "true")
    proc = run_cli(*args, env=env)
    message = assert_one_line_error(proc)
    assert proc.returncode == 125
    assert "local batch jobs need chronosd" in message and "chronos run" in message
    error = assert_json_error(run_cli(*args[:-2], "--json", *args[-2:], env=env))
    assert error["code"] == "not_available" and error["exit_code"] == 125


def test_cluster_forms_without_slurm_are_one_line(
    chronos_env: dict[str, str], tmp_path: Path
) -> None:
    env = _no_slurm(chronos_env, tmp_path, "no sbatch")
    for args, code in (
        (("list", "--cluster"), 1),
        (("stats", "--cluster", "--json"), 1),
        (("run", "--cluster", "--memory", "2GiB", "--", "true"), 125),
        (("create", "--cluster", "--memory", "2GiB"), 1),
        (("run", "--cluster", "--memory", "0.5", "--", "true"), 125),  # a share means nothing
        (("submit", "--cluster", "--memory", "2GiB", "--device", "1", "--", "true"), 125),
    ):
        proc = run_cli(*args, env=env)
        message = assert_one_line_error(proc)
        assert proc.returncode == code, (args, message)
        assert "not installed here" in message or "--memory" in message or "--device" in message


def test_run_checks_options_and_program_before_reserving(
    chronos_env: dict[str, str], tmp_path: Path
) -> None:
    marker = tmp_path / "ran"
    before = ledger_rows(chronos_env)
    # The case: a mistyped option before -- used to be run as the command.
    typo = run_cli(
        "run",
        "--memory",
        "0.1",
        "--duration",
        "1m",
        "--wiat",
        "--",
        "touch",
        str(marker),
        env=chronos_env,
    )
    assert typo.returncode == 125
    assert "--wiat" in assert_one_line_error(typo)
    missing = run_cli(
        "run", "--memory", "0.1", "--duration", "1m", "--", "no-such-cmd-xyz", env=chronos_env
    )
    assert missing.returncode == 127
    assert "no-such-cmd-xyz" in assert_one_line_error(missing)
    script = tmp_path / "not-executable.sh"
    script.write_text("#!/bin/sh\ntouch " + str(marker) + "\n")
    plain = run_cli(
        "run", "--memory", "0.1", "--duration", "1m", "--", str(script), env=chronos_env
    )
    assert plain.returncode == 126
    assert "not executable" in assert_one_line_error(plain)
    assert not marker.exists()
    assert ledger_rows(chronos_env) == before  # nothing was reserved, not even briefly


def test_run_exit_codes_do_not_collide(chronos_env: dict[str, str]) -> None:
    own = run_cli(
        "run", "--memory", "0.1", "--duration", "1m", "--", "sh", "-c", "exit 3", env=chronos_env
    )
    assert own.returncode == 3  # the command's status: AdmissionRefused's 3 elsewhere
    create(chronos_env, "0", "0.95", "1h")
    refused = run_cli("run", "--memory", "0.5", "--duration", "1m", "--", "true", env=chronos_env)
    assert refused.returncode == 125
    assert "free" in assert_one_line_error(refused)
    plain = run_cli("create", "0", "0.5", "1m", env=chronos_env)
    assert plain.returncode == 3  # other commands keep the documented codes


def test_run_wait_queues_then_runs(chronos_env: dict[str, str]) -> None:
    blocker = create(chronos_env, "0", "1.0", "2s")
    proc = run_cli(
        "run",
        "--memory",
        "0.5",
        "--duration",
        "1m",
        "--wait",
        "--",
        "sh",
        "-c",
        "echo $CHRONOS_PARTITION_ID",
        env=chronos_env,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    assert "waiting: position 1 in the queue" in proc.stderr
    ran_in = proc.stdout.strip()
    records = {r["id"]: r for r in cli_json("list", "--all", env=chronos_env)}
    assert records[blocker["id"]]["state"] == "expired"
    assert records[ran_in]["kind"] == "run" and records[ran_in]["state"] == "released"
    assert parse_iso(records[ran_in]["starts_at"]) >= parse_iso(
        records[blocker["id"]]["expires_at"]
    )


def test_run_wait_timeout_says_it_once(chronos_env: dict[str, str]) -> None:
    create(chronos_env, "0", "1.0", "1h")
    proc = run_cli("create", "0", "0.5", "1m", "--wait", "--timeout", "1s", env=chronos_env)
    assert proc.returncode == 10
    progress, line = proc.stderr.splitlines()
    assert progress.startswith("waiting: position 1")
    assert line.startswith("chronos: error: ")
    assert line.count("waiting") == 1 and "timed out" not in line  # said once, not twice
    assert "after 1s" in line
    assert cli_json("queue", env=chronos_env) == []


def test_nested_run_warns_and_reuse_runs_in_the_outer_partition(
    chronos_env: dict[str, str],
) -> None:
    inner = f"{sys.executable} -m chronos.cli run"
    nested = run_cli(
        "run",
        "--memory",
        "0.1",
        "--duration",
        "1m",
        "--",
        "sh",
        "-c",
        f"{inner} --memory 0.1 --duration 1m -- true",
        env=chronos_env,
    )
    assert nested.returncode == 0, nested.stderr
    assert "warning: already inside partition" in nested.stderr and "--reuse" in nested.stderr
    assert len(cli_json("list", "--all", env=chronos_env)) == 2  # a second share, as warned

    reused = run_cli(
        "run",
        "--memory",
        "0.1",
        "--duration",
        "1m",
        "--",
        "sh",
        "-c",
        f"echo outer $CHRONOS_PARTITION_ID; {inner} --reuse -- "
        'sh -c "echo inner $CHRONOS_PARTITION_ID; exit 4"',
        env=chronos_env,
    )
    assert reused.returncode == 4, reused.stderr
    assert "warning" not in reused.stderr
    words = reused.stdout.split()
    assert words[0] == "outer" and words[2] == "inner" and words[1] == words[3]
    assert len(cli_json("list", "--all", env=chronos_env)) == 3  # one more, not two


def test_run_json_summary_goes_to_stderr_or_a_file(
    chronos_env: dict[str, str], tmp_path: Path
) -> None:
    target = tmp_path / "summary.json"
    proc = run_cli(
        "run",
        "--memory",
        "0.1",
        "--duration",
        "1m",
        "--json",
        "--json-file",
        str(target),
        "--",
        "echo",
        "hello",
        env=chronos_env,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout == "hello\n"  # the command's output alone
    summary = json.loads(proc.stderr)
    assert summary["exit_code"] == 0 and summary["partition"]["state"] == "released"
    assert json.loads(target.read_text()) == summary


# -------------------------------------------------------------------- ids


def _prefix(target: str, others: list[str]) -> str:
    for n in range(1, len(target) + 1):
        if sum(o.startswith(target[:n]) for o in others) == 1:
            return target[:n]
    raise AssertionError(target)


def test_any_unique_prefix_works_everywhere(chronos_env: dict[str, str]) -> None:
    made = [create(chronos_env, "1", "0.05", "1h")["id"] for _ in range(6)]
    a, b, c = made[:3]
    pa, pb, pc = (_prefix(i, made) for i in (a, b, c))
    assert cli_json_here("get", pa, env=chronos_env)["id"] == a
    extended = cli_json_here("extend", pa, "30m", env=chronos_env)
    assert extended["id"] == a
    attached = cli_json_here("attach", pa, str(os.getpid()), env=chronos_env)
    assert attached == {"id": a, "pid": os.getpid()}
    kinds = [e["kind"] for e in cli_json_here("events", "--id", pa, env=chronos_env)]
    assert kinds == ["created", "extended", "attached"] or kinds[:2] == ["created", "extended"]
    both = cli_json_here("release", pb, pc, env=chronos_env)
    assert [r["id"] for r in both] == [b, c] and {r["state"] for r in both} == {"released"}
    firsts = [i[0] for i in made]
    shared = next((ch for ch in firsts if firsts.count(ch) > 1), None)
    if shared is not None:
        line = assert_one_line_error(cli_in_process("get", shared, env=chronos_env))
        assert "ambiguous id" in line


def test_release_several_ids_reports_each_failure(chronos_env: dict[str, str]) -> None:
    good = create(chronos_env, "0", "0.1", "1h")["id"]
    proc = cli_in_process("release", "deadbeef", good, "feedface", env=chronos_env)
    assert proc.returncode == 4  # the first failure's code
    assert f"released partition {good}" in proc.stdout
    errors = proc.stderr.splitlines()
    assert len(errors) == 2 and "deadbeef" in errors[0] and "feedface" in errors[1]
    assert cli_json_here("list", env=chronos_env) == []


def test_cancel_a_queued_request_from_another_shell(chronos_env: dict[str, str]) -> None:
    create(chronos_env, "0", "1.0", "1h")
    waiter = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "create", "0", "0.5", "1h", "--wait"],
        env=chronos_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert "waiting" in readline_within(waiter.stderr, 15)  # type: ignore[arg-type]
        (entry,) = cli_json("queue", env=chronos_env)
        cancelled = run_cli("cancel", entry["ticket"][:4], env=chronos_env)
        assert cancelled.returncode == 0, cancelled.stderr
        assert entry["ticket"] in cancelled.stdout
        assert waiter.wait(15) != 0
    finally:
        if waiter.poll() is None:
            waiter.kill()
            waiter.wait()
    assert "cancelled" in waiter.stderr.read()  # type: ignore[union-attr]
    assert cli_json("queue", env=chronos_env) == []


# -------------------------------------------------------------------- list


def test_list_shows_start_state_and_filters(chronos_env: dict[str, str]) -> None:
    now = create(chronos_env, "0", "0.25", "1h")["id"]
    later = create(chronos_env, "1", "0.25", "1h", "--start", "+1d")["id"]
    ended = create(chronos_env, "1", "0.1", "1h")["id"]
    cli_json_here("release", ended, env=chronos_env)

    lines = cli_in_process("list", env=chronos_env).stdout.splitlines()
    header = lines[0].split()
    assert header[:4] == ["ID", "GPU", "USER", "STATE"] and "START" in header
    rows = {line.split()[0]: line.split() for line in lines[1:]}
    assert set(rows) == {now, later}
    assert rows[now][3] == "active" and rows[later][3] == "booked"

    def ids(*args: str) -> set[str]:
        out = cli_in_process("list", "--format", "id", "--no-header", *args, env=chronos_env)
        assert out.returncode == 0, out.stderr
        return set(out.stdout.split())

    assert ids("--device", "1") == {later}
    assert ids("--state", "booked") == {later}
    assert ids("--state", "released") == {ended}
    assert ids("--state", "active", "--state", "released") == {now, ended}
    assert ids("--me") == {now, later}
    assert ids("--user", "nobody") == set()
    assert ids("--all") == {now, later, ended}
    empty = cli_in_process("list", "--user", "nobody", env=chronos_env)
    assert empty.stdout.strip() == "no active partitions match"
    quiet = cli_in_process("list", "--user", "nobody", "--no-header", env=chronos_env)
    assert quiet.stdout == ""


def test_ended_partitions_show_their_end(chronos_env: dict[str, str]) -> None:
    ended = create(chronos_env, "0", "0.1", "1h")
    gone = cli_json_here("release", ended["id"], env=chronos_env)
    out = cli_in_process(
        "list", "--all", "--format", "end,remaining", "--no-header", env=chronos_env
    )
    end_clock = datetime.fromisoformat(gone["ended_at"]).strftime("%m-%d %H:%M")
    assert out.stdout.split() == [*end_clock.split(), "-"]


def _on_a_terminal(args: list[str], env: dict[str, str]) -> str:
    import pty

    leader, follower = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", *args],
        env=env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    while True:
        try:
            chunk = os.read(leader, 65536)
        except OSError:
            break
        if not chunk:
            break
        seen += chunk
    proc.wait(timeout=30)
    os.close(leader)
    return seen.decode()


def _too_wide(text: str, width: int = 80) -> list[str]:
    plain = re.sub(r"\x1b\[[0-9;]*m", "", text)
    return [line for line in plain.splitlines() if len(line) > width]


def test_tables_fit_an_80_column_terminal(chronos_env: dict[str, str]) -> None:
    import pwd

    long_user = max((p.pw_name for p in pwd.getpwall()), key=len)
    create(chronos_env, "0", "0.25", "1h")
    create(chronos_env, "1", "512MiB", "3d", "--start", "+2d")
    if os.geteuid() == 0:
        create(chronos_env, "1", "0.1", "1h", "--user", long_user)
    ended = create(chronos_env, "0", "0.1", "10m")
    cli_json("release", ended["id"], env=chronos_env)
    terminal = {**chronos_env, "COLUMNS": "80"}
    for args in (
        ["list"],
        ["list", "--all"],
        ["stats"],
        ["events"],
        ["usage"],
        ["calendar"],
        ["calendar", "--days", "7"],
        ["queue"],
    ):
        out = _on_a_terminal(args, terminal)
        assert "Traceback" not in out
        assert not _too_wide(out), (args, _too_wide(out))
    # Off a terminal nothing is cut: a script finds the whole user name.
    if os.geteuid() == 0:
        assert long_user in run_cli("list", env=chronos_env).stdout
    # Sizes are right-aligned: the MEMORY column's values end where its header ends.
    lines = run_cli("list", env=chronos_env).stdout.splitlines()
    end = lines[0].index("MEMORY") + len("MEMORY")
    assert all(line[end - 3 : end] in ("GiB", "MiB") for line in lines[1:])


def test_colour_on_a_terminal_only_and_never_with_no_color(chronos_env: dict[str, str]) -> None:
    create(chronos_env, "0", "0.6", "1h")
    coloured = _on_a_terminal(["list"], chronos_env)
    assert "\x1b[32m" in coloured  # active, in green
    assert "\x1b[" not in _on_a_terminal(["list"], {**chronos_env, "NO_COLOR": "1"})
    assert "\x1b[" not in run_cli("list", env=chronos_env).stdout  # not a terminal
    assert "\x1b[" in _on_a_terminal(["stats"], chronos_env)
    assert "\x1b[" not in _on_a_terminal(["stats"], {**chronos_env, "NO_COLOR": "1"})


# -------------------------------------------------------------------- json


def test_json_times_are_iso_everywhere(chronos_env: dict[str, str]) -> None:
    p = create(chronos_env, "0", "1.0", "1h")
    cli_json_here("extend", p["id"], "10m", env=chronos_env)
    waiter = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "create", "0", "0.5", "1h", "--wait"],
        env=chronos_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        readline_within(waiter.stderr, 15)  # type: ignore[arg-type]
        (entry,) = cli_json_here("queue", env=chronos_env)
        parse_iso(entry["enqueued_at"])
        parse_iso(entry["estimated_start"])
        cal = cli_json_here("calendar", env=chronos_env)
        parse_iso(cal["queue"][0]["enqueued_at"])
    finally:
        waiter.kill()
        waiter.wait()
    (extended,) = [e for e in cli_json_here("events", env=chronos_env) if e["kind"] == "extended"]
    parse_iso(extended["at"])
    parse_iso(extended["detail"]["from"])
    parse_iso(extended["detail"]["to"])


def test_stats_json_names_mode_and_backend(chronos_env: dict[str, str]) -> None:
    data = cli_json_here("stats", env=chronos_env)
    assert {(d["mode"], d["backend"]) for d in data} == {("embedded", "simulated")}
    (one,) = cli_json_here("stats", "--device", "1", env=chronos_env)
    assert one["index"] == 1


def test_stats_watch_json_is_one_object_per_refresh(chronos_env: dict[str, str]) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "stats", "--watch", "--json", "--interval", "0.2"],
        env=chronos_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        frames = [json.loads(readline_within(watch.stdout, 15)) for _ in range(3)]  # type: ignore[arg-type]
    finally:
        watch.send_signal(signal.SIGINT)
        watch.communicate(timeout=20)
    for frame in frames:
        assert frame["mode"] == "embedded" and frame["backends"] == ["simulated"]
        assert [d["index"] for d in frame["devices"]] == [0, 1]
        parse_iso(frame["at"])
    assert watch.returncode == 0


# ---------------------------------------------------------- messages, docs


def test_limit_refusals_name_the_maximum_and_share_one_code(chronos_env: dict[str, str]) -> None:
    p = create(chronos_env, "0", "0.1", "1h")
    extend = cli_in_process("extend", p["id"], "7d", env=chronos_env)
    line = assert_one_line_error(extend)
    assert "over the max_duration limit" in line and "7d1h asked, at most 7d" in line
    too_long = cli_in_process("create", "0", "0.1", "8d", env=chronos_env)
    line = assert_one_line_error(too_long)
    assert "over the max_duration limit: 8d asked, at most 7d" in line
    assert extend.returncode == too_long.returncode == 3  # as every quota refusal


def test_confirmation_echoes_how_input_was_read(chronos_env: dict[str, str]) -> None:
    out = cli_in_process("create", "0", "2G", "3600", env=chronos_env)
    assert out.returncode == 0, out.stderr
    assert "3600 → 1h (a bare number is seconds)" in out.stdout
    (made,) = cli_json_here("list", env=chronos_env)
    shown = f"{made['memory_bytes'] / GIB:.1f} GiB"  # 2.0 GiB (Slurm, Docker) or 1.9 (GB)
    assert f"2G → {shown}" in out.stdout
    explicit = cli_in_process("create", "1", "512MiB", "1h", env=chronos_env)
    assert "→" not in explicit.stdout  # nothing to explain: no bare number, a binary unit


def test_man_page_is_made_from_the_cli(chronos_env: dict[str, str], tmp_path: Path) -> None:
    page = run_cli("man", env=chronos_env)
    assert page.returncode == 0, page.stderr
    text = page.stdout
    assert text.startswith(".TH CHRONOS 1")
    for command in ("create", "run", "list", "release", "cancel", "stats"):
        assert f".SS chronos {command}" in text
    assert "\\-\\-reuse" in text and ".B 125" in text
    wrote = run_cli("man", "--output", str(tmp_path), env=chronos_env)
    assert wrote.returncode == 0 and (tmp_path / "chronos.1").read_text() == text
    if shutil.which("man"):
        rendered = subprocess.run(
            ["man", "-l", str(tmp_path / "chronos.1")],
            capture_output=True,
            text=True,
            env={**chronos_env, "MANPAGER": "cat"},
        )
        assert "chronos run" in rendered.stdout


def test_shell_completion_offers_partition_ids(chronos_env: dict[str, str]) -> None:
    made = create(chronos_env, "0", "0.1", "1h")["id"]
    script = run_cli(env={**chronos_env, "_CHRONOS_COMPLETE": "bash_source"})
    assert script.returncode == 0 and "complete" in script.stdout
    env = {
        **chronos_env,
        "_CHRONOS_COMPLETE": "bash_complete",
        "COMP_WORDS": f"chronos release {made[:2]}",
        "COMP_CWORD": "2",
    }
    offered = run_cli(env=env)
    assert f"plain,{made}" in offered.stdout.splitlines()  # click's bash protocol: type,value
    # A repeated booking's series id is offered too.
    until = time.strftime("%Y-%m-%d", time.localtime(time.time() + 2 * 86400))
    repeat = ("--start", "09:00", "--repeat", "daily", "--until", until)
    series = cli_json_here("create", "0", "0.1", "1h", *repeat, env=chronos_env)[0]["series"]
    offered = run_cli(env={**env, "COMP_WORDS": "chronos release s"})
    assert offered.stdout.splitlines() == [f"plain,{series}"]


# ------------------------------------------------- through a real daemon


@pytest.fixture(scope="module")
def daemon_env() -> Iterator[dict[str, str]]:
    """A running chronosd (simulated GPUs) shared by this module's daemon-mode tests."""
    with daemons() as make:
        yield make().env


FULL_CLI = "import sys; from chronos.cli import main; sys.exit(main(sys.argv[1:], fast_path=False))"
FAST_CLI = (
    "import sys; from chronos.cli_fast import main; code = main(); "
    "print(sorted(m for m in ('click', 'chronos.api', 'chronos.service', 'chronos.ledger') "
    "if m in sys.modules), file=sys.stderr); sys.exit(code)"
)


def _python(code: str, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=30
    )


@pytest.mark.parametrize(
    "args",
    [("list",), ("list", "--all"), ("list", "--no-header"), ("stats",), ("stats", "--json")],
    ids=" ".join,
)
def test_fast_path_prints_what_the_full_cli_prints(
    daemon_env: dict[str, str], args: tuple[str, ...]
) -> None:
    ids = [cli_json("create", "0", "0.1", "1h", env=daemon_env)["id"] for _ in range(2)]
    cli_json("release", ids[1], env=daemon_env)
    try:
        fast = _python(FAST_CLI, *args, env=daemon_env)
        full = _python(FULL_CLI, *args, env=daemon_env)
        assert fast.returncode == full.returncode == 0, (fast.stderr, full.stderr)
        assert fast.stderr.strip() == "[]"  # neither click nor the API nor the ledger loaded
        assert _minutes_only(fast.stdout) == _minutes_only(full.stdout)
    finally:
        run_cli("release", ids[0], env=daemon_env)


@pytest.mark.parametrize(
    "args",
    [("list",), ("list", "--all"), ("list", "--no-header"), ("stats",), ("stats", "--json")],
    ids=" ".join,
)
def test_embedded_fast_path_prints_what_the_full_cli_prints(
    tmp_path: Path, args: tuple[str, ...]
) -> None:
    """No daemon: the same forms go through the API in the process, never through click."""
    env = make_env(tmp_path, CHRONOS_CONFIG=str(tmp_path / "absent.toml"))
    ids = [cli_json("create", "0", "0.1", "1h", env=env)["id"] for _ in range(2)]
    cli_json("release", ids[1], env=env)
    fast = _python(FAST_CLI, *args, env=env)
    full = _python(FULL_CLI, *args, env=env)
    assert fast.returncode == full.returncode == 0, (fast.stderr, full.stderr)
    assert fast.stderr.strip() == "['chronos.api', 'chronos.ledger', 'chronos.service']"
    assert _minutes_only(fast.stdout) == _minutes_only(full.stdout)
    assert ids[0] in fast.stdout if args[0] == "list" else "embedded" in fast.stdout
    # Without a policy file no TOML parser is loaded for a list.
    with_toml = FAST_CLI.replace("'click', ", "'click', 'tomllib', ")
    loaded = _python(with_toml, "list", env=env)
    assert loaded.returncode == 0 and "tomllib" not in loaded.stderr, loaded.stderr


def test_embedded_fast_path_leaves_errors_to_the_full_cli(tmp_path: Path) -> None:
    env = make_env(tmp_path / "missing" / "home")  # a state dir that cannot be used
    (tmp_path / "missing").write_text("a file where a directory should be")
    proc = _python(FAST_CLI, "list", env=env)
    assert proc.returncode != 0
    assert "'click'" in proc.stderr and "chronos: error:" in proc.stderr
    assert "Traceback" not in proc.stderr


def _minutes_only(text: str) -> str:
    """A table without the ticking REMAINING seconds (the two runs are a moment apart)."""
    return re.sub(r"\b\d+m\d+s\b|\b\d+s\b", "<span>", text)


def test_anything_else_takes_the_full_cli(daemon_env: dict[str, str]) -> None:
    for args in (
        ("list", "--me"),
        ("list", "--json"),
        ("list", "--bogus"),
        ("stats", "--device", "0"),
        ("queue",),
        ("list", "--cluster"),  # the Slurm front end: squeue, never this machine's ledger
        ("stats", "--cluster"),
    ):
        proc = _python(FAST_CLI, *args, env=daemon_env)
        assert "'click'" in proc.stderr, (args, proc.stderr)
    bogus = _python(FAST_CLI, "list", "--bogus", env=daemon_env)
    assert bogus.returncode == 2 and "chronos: error: No such option" in bogus.stderr


def test_prefixes_and_json_errors_through_the_daemon(daemon_env: dict[str, str]) -> None:
    made = cli_json("create", "1", "0.1", "1h", env=daemon_env)["id"]
    others = [r["id"] for r in cli_json("list", "--all", env=daemon_env)]
    prefix = _prefix(made, others)
    assert cli_json("get", prefix, env=daemon_env)["id"] == made
    assert cli_json("release", prefix, env=daemon_env)["state"] == "released"
    again = run_cli("release", made, "--json", env=daemon_env)
    error = assert_json_error(again)
    assert error["code"] == "ended" and again.returncode == 6


@pytest.mark.parametrize(
    "settings",
    [{"CHRONOS_SOCKET": "/x/s.sock", "CHRONOS_HOME": "/y"}, {"CHRONOS_HOME": "/y"}, {}],
    ids=["socket", "home", "system"],
)
def test_fast_path_finds_the_socket_where_the_client_does(
    monkeypatch: pytest.MonkeyPatch, settings: dict[str, str]
) -> None:
    from chronos import cli_fast, paths

    for name in ("CHRONOS_SOCKET", "CHRONOS_HOME"):
        monkeypatch.delenv(name, raising=False)
    for name, value in settings.items():
        monkeypatch.setenv(name, value)
    assert cli_fast.socket_path() == str(paths.socket_path())
