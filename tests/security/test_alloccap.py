"""Attacks on the allocation-time cap's shared accounting (docs/ALLOCATION_CAP.md).

A partition's processes share one counter in a memory-mapped file. Another user
must not be able to open it (to raise the counter and deny the owner her share, or
lower it), nor replace or remove it, nor plant a directory the owner would use.
Each test fails on the base commit, which had no allocation-time cap at all.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Iterator

import pytest
from chronos_testing import DaemonProcess, clean_env, shared_tmpdir, wait_for
from native.conftest import CHUNK, GIB, Native, allowed, build_native, run_argv

from .conftest import Users

ATTACK = r"""
import os, sys
path = sys.argv[1]
for name, attempt in (
    ("open for writing", lambda: open(path, "r+b")),
    ("open for reading", lambda: open(path, "rb")),
    ("unlink", lambda: os.unlink(path)),
    ("replace", lambda: os.rename("/etc/hostname", path)),
    ("plant", lambda: open(os.path.join(os.path.dirname(path), "x.cap"), "wb")),
):
    try:
        attempt()
        print(name, "succeeded")
    except OSError as exc:
        print(name, "refused", type(exc).__name__)
"""


@pytest.fixture(scope="module")
def native() -> Iterator[Native]:
    """The fake CUDA driver and test client of tests/native (built once here)."""
    yield from build_native()


def test_another_user_cannot_touch_a_partitions_counter(
    native: Native,
    daemon_factory: object,
    users: Users,
) -> None:
    daemon: DaemonProcess = daemon_factory(extra_env={"CHRONOS_ALLOC_CAP": "on"})  # type: ignore[operator]
    env = native.env(daemon.env, CHRONOS_ALLOC_CAP="on")
    proc = users.alice.popen(
        run_argv(str(native.client), "dlsym", "wait", f"fill:{CHUNK}"),
        env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
    )
    try:
        cap = wait_for(lambda: next((daemon.home / "cap").glob("*.cap"), None), 30, "cap file")
        attack = users.bob.run(users.bob.python_argv("-c", ATTACK, str(cap)), env)
        out, err = proc.communicate(b"go\n", timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()
    lines = attack.stdout.splitlines()
    assert len(lines) == 5, attack.stderr
    assert all(" refused " in line for line in lines), lines
    assert proc.returncode == 0, err
    assert f"fill {allowed(10 * GIB)} 2" in out.decode()  # alice still got exactly her share


def test_a_planted_cap_directory_is_not_used(
    native: Native,
    users: Users,
) -> None:
    """Embedded mode: bob creates alice's cap directory first, world-writable."""
    tmp_path = shared_tmpdir("chronos-plant-")
    home = tmp_path / "home"
    home.mkdir()
    home.chmod(0o1777)
    planted = home / f"cap-{users.alice.uid}"
    users.bob.run(users.bob.argv("mkdir", "-m", "0777", str(planted)), clean_env())
    assert planted.stat().st_uid == users.bob.uid
    env = native.env(
        clean_env(
            CHRONOS_HOME=str(home),
            CHRONOS_BACKEND="simulated",
            CHRONOS_MODE="embedded",
            CHRONOS_SOCKET=str(tmp_path / "no-daemon.sock"),
            CHRONOS_ALLOC_CAP="on",
        )
    )
    result = users.alice.run(
        users.alice.argv(*run_argv(str(native.client), "dlsym", f"fill:{GIB}")), env, 120
    )
    assert result.returncode == 0, result.stderr
    assert "allocation-time cap unavailable" in result.stderr
    assert "not a private directory" in result.stderr
    assert os.listdir(planted) == []  # nothing of alice's went into bob's directory
    shutil.rmtree(tmp_path)
