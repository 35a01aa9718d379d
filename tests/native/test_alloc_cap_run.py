"""``chronos run`` and the API preload the cap library, in embedded and daemon mode.

The fake driver stands in for the GPU; the simulated backend (two 80 GiB GPUs)
stands in for NVML. ``CHRONOS_ALLOC_CAP=on`` enables the library on the simulated
backend (it is on by default only for NVIDIA GPUs).
"""

from __future__ import annotations

import os
import stat
import subprocess
from pathlib import Path

import pytest
from chronos_testing import DaemonProcess, clean_env, wait_for

from chronos import alloccap

from .conftest import CHUNK, GIB, Native, Users, allowed, run_argv

LIMIT = 10 * GIB


@pytest.fixture
def embedded(tmp_path: Path, native: Native) -> dict[str, str]:
    return native.env(
        clean_env(
            CHRONOS_HOME=str(tmp_path / "home"),
            CHRONOS_BACKEND="simulated",
            CHRONOS_MODE="embedded",
            CHRONOS_SOCKET=str(tmp_path / "no-daemon.sock"),
            CHRONOS_ALLOC_CAP="on",
        )
    )


def fill_line(stdout: str) -> list[str]:
    return next(line.split() for line in stdout.splitlines() if line.startswith("fill"))


def test_embedded_run_caps_its_command_at_allocation_time(
    native: Native, embedded: dict[str, str], tmp_path: Path
) -> None:
    result = subprocess.run(
        run_argv(str(native.client), "dlsym", "info", f"fill:{CHUNK}"),
        env=embedded,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert fill_line(result.stdout) == ["fill", str(allowed(LIMIT)), "2"]
    info = next(line.split() for line in result.stdout.splitlines() if line.startswith("info"))
    assert int(info[3]) == LIMIT
    cap_dir = tmp_path / "home" / f"cap-{os.getuid()}"
    assert stat.S_IMODE(cap_dir.stat().st_mode) == 0o700  # private to the user
    assert list(cap_dir.glob("*.cap")) == []  # removed with the partition


def test_children_of_the_command_share_the_cap(native: Native, embedded: dict[str, str]) -> None:
    client = str(native.client)
    # Each holds what it got until its stdin (a pipe from sleep) closes, so they overlap.
    script = (
        f"sleep 3 | {client} direct fill:{CHUNK} hold & "
        f"sleep 3 | {client} gpa fill:{CHUNK} hold & wait"
    )
    result = subprocess.run(
        run_argv("sh", "-c", script), env=embedded, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr
    fills = [int(line.split()[1]) for line in result.stdout.splitlines() if line.startswith("fill")]
    # Each process is charged its own reserve; together they never pass the partition.
    assert len(fills) == 2
    assert allowed(LIMIT, processes=2) <= sum(fills) <= alloccap.allocatable(LIMIT)


def test_with_the_switch_off_the_command_runs_as_before(
    native: Native, embedded: dict[str, str]
) -> None:
    env = {**embedded, "CHRONOS_ALLOC_CAP": "off"}
    result = subprocess.run(
        run_argv(str(native.client), "dlsym", f"fill:{GIB}"),
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert result.returncode == 0, result.stderr
    assert fill_line(result.stdout)[1] == str(80 * GIB)


def test_limits_env_preloads_the_library(
    embedded: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> None:
    for name, value in embedded.items():
        monkeypatch.setenv(name, value)
    from chronos import Partitioner

    with Partitioner() as client, client.create(device=0, memory="10GiB", duration=60) as p:
        env = p.limits_env()
        assert env["LD_PRELOAD"].split()[0] == str(alloccap.library_path())
        cap = Path(env[alloccap.ENV_FILE])
        state = alloccap.read_file(cap)
        assert state is not None and state.limit_bytes == p.memory_bytes == LIMIT
        # Frameworks' fractions are of the total the library reports: the share.
        assert int(env["CHRONOS_DEVICE_TOTAL_BYTES"]) == LIMIT
        assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) == pytest.approx(
            int(env["CHRONOS_SOFT_LIMIT_BYTES"]) / LIMIT, abs=1e-4
        )
    assert not cap.exists()


def test_without_the_library_chronos_says_so_once_and_falls_back(
    embedded: dict[str, str],
    monkeypatch: pytest.MonkeyPatch,
    tmp_path: Path,
    capsys: pytest.CaptureFixture[str],
) -> None:
    for name, value in embedded.items():
        monkeypatch.setenv(name, value)
    monkeypatch.setattr(alloccap, "NATIVE_DIR", tmp_path / "not-built")
    monkeypatch.setattr(alloccap, "_said", set())
    from chronos import Partitioner

    with Partitioner() as client:
        for _ in range(2):
            with client.create(device=0, memory="10GiB", duration=60) as p:
                env = p.limits_env()
                assert "LD_PRELOAD" not in env and alloccap.ENV_FILE not in env
                assert int(env["CHRONOS_DEVICE_TOTAL_BYTES"]) == 80 * GIB  # as before
    assert capsys.readouterr().err.count("allocation-time cap unavailable") == 1


def test_daemon_run_caps_the_command_and_the_file_is_the_users(
    native: Native, daemon_factory: object, users: Users
) -> None:
    daemon: DaemonProcess = daemon_factory(extra_env={"CHRONOS_ALLOC_CAP": "on"})  # type: ignore[operator]
    env = native.env(daemon.env, CHRONOS_ALLOC_CAP="on")
    alice = users.alice
    proc = alice.popen(
        run_argv(str(native.client), "dlsym", "wait", f"fill:{CHUNK}"),
        env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        cap_dir = daemon.home / "cap"
        cap = wait_for(lambda: next(cap_dir.glob("*.cap"), None), 30, "the accounting file")
        st = cap.stat()
        assert (st.st_uid, stat.S_IMODE(st.st_mode)) == (alice.uid, 0o600)
        assert (cap_dir.stat().st_uid, stat.S_IMODE(cap_dir.stat().st_mode)) == (0, 0o755)
        out, err = proc.communicate(b"go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0, err
    assert fill_line(out.decode()) == ["fill", str(allowed(LIMIT)), "2"]
    assert not cap.exists()  # released with the partition


def test_files_of_partitions_that_ended_unseen_are_swept(
    embedded: dict[str, str], monkeypatch: pytest.MonkeyPatch, tmp_path: Path
) -> None:
    for name, value in embedded.items():
        monkeypatch.setenv(name, value)
    from chronos import Partitioner

    with Partitioner() as client, client.create(device=0, memory="1GiB", duration=60) as first:
        kept = Path(first.limits_env()[alloccap.ENV_FILE])
        stale = alloccap.create_file(kept.with_name("0badc0de.cap"), GIB)  # expired unseen
        with client.create(device=1, memory="1GiB", duration=60):
            assert kept.exists()  # still open: kept
            assert not stale.exists()  # no such open partition: removed
