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
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import TestUser
from chronos_testing import _pick_python as pick_user_python
from helpers import (
    GIB,
    MIB,
    SIM_GPU_BYTES,
    assert_one_line_error,
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


def create(env: dict[str, str], *args: str) -> dict[str, Any]:
    return cli_json("create", *args, env=env)


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
    proc = run_cli("stats", env=chronos_env)
    assert proc.returncode == 0, proc.stderr
    for index in (0, 1):
        assert f"GPU {index}" in proc.stdout
        assert f"Simulated GPU {index}" in proc.stdout
    assert "simulated" in proc.stdout
    assert "80.0 GiB" in proc.stdout
    assert "20.0 GiB" in proc.stdout  # committed on GPU 1

    data = cli_json("stats", env=chronos_env)
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
    data = cli_json("stats", env=env)
    assert [d["total_bytes"] for d in data] == [80 * GIB, 24 * GIB]
    assert create(env, "1", "24GiB", "1m")["memory_bytes"] == 24 * GIB
    line = assert_one_line_error(run_cli("create", "1", "25GiB", "1m", env=env))
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
    assert pid in table.stdout and "50.0%" in table.stdout and "40.0 GiB" in table.stdout

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
    extended = cli_json("extend", p["id"], "10m", env=chronos_env)
    assert parse_iso(extended["expires_at"]) > parse_iso(p["expires_at"])
    attached = cli_json("attach", p["id"], str(os.getpid()), env=chronos_env)
    assert attached == {"id": p["id"], "pid": os.getpid()}
    released = cli_json("release", p["id"], env=chronos_env)
    assert released["state"] == "released" and released["time_remaining"] == 0
    parse_iso(released["ended_at"])
    for item in cli_json("events", env=chronos_env):
        parse_iso(item["at"])
    assert isinstance(cli_json("list", "--all", env=chronos_env), list)


def test_refusal_says_what_is_free_and_when(chronos_env: dict[str, str]) -> None:
    first = create(chronos_env, "0", "0.75", "1h")
    proc = run_cli("create", "0", "0.5", "1h", env=chronos_env)
    line = assert_one_line_error(proc)
    assert "20.0 GiB free" in line
    local = parse_iso(first["expires_at"]).astimezone().strftime("%Y-%m-%d %H:%M:%S")
    assert local in line
    events = cli_json("events", env=chronos_env)
    assert events[-1]["kind"] == "refused"
    assert cli_json("list", env=chronos_env)[0]["id"] == first["id"]


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
    cli_json("release", ended["id"], env=env)
    view = (
        without_remaining(cli_json("list", "--all", env=env)),
        cli_json("events", env=env),
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
]


@pytest.mark.parametrize("args", BAD_INPUTS, ids=lambda a: " ".join(a))
def test_bad_input_is_one_line_and_changes_nothing(
    populated: dict[str, Any], args: tuple[str, ...]
) -> None:
    env = populated["env"]
    argv = [a.format(**populated) if a.startswith("{") else a for a in args]
    before = ledger_rows(env)
    proc = run_cli(*argv, env=env)
    assert_one_line_error(proc)
    assert proc.stdout == ""
    assert ledger_rows(env) == before


def test_second_release_and_unknown_id_messages(populated: dict[str, Any]) -> None:
    env = populated["env"]
    again = assert_one_line_error(run_cli("release", populated["released"], env=env))
    assert populated["released"] in again and "released" in again
    unknown = assert_one_line_error(run_cli("release", "deadbeef", env=env))
    assert "deadbeef" in unknown


def test_bad_inputs_left_the_ledger_view_unchanged(populated: dict[str, Any]) -> None:
    env = populated["env"]
    view = (
        without_remaining(cli_json("list", "--all", env=env)),
        cli_json("events", env=env),
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
    # Admission counts both users' partitions.
    line = assert_one_line_error(run_cli("create", "0", "0.5", "1h", env=shared_env))
    assert "20.0 GiB free" in line
    # The administrator may end anyone's partition.
    assert cli_json("release", data["id"], env=shared_env)["state"] == "released"
