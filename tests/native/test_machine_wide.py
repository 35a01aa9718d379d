"""The administrator's machine-wide mode, and what ``chronos stats`` shows.

Machine-wide mode puts the library in /etc/ld.so.preload so processes outside any
partition get a clean OOM instead of eating memory that partitions reserved. The
test never touches the host's /etc: it runs in a private mount namespace with an
overlay on /etc, so /etc/ld.so.preload exists only there.
"""

from __future__ import annotations

import os
import shutil
import subprocess
from collections.abc import Callable
from pathlib import Path

import pytest
from chronos_testing import PY, DaemonProcess, wait_for

from chronos import alloccap

from .conftest import CHUNK, FAKE_TOTAL, GIB, Native, run_argv

FAKE_UUID = "GPU-10111213-1415-1617-1819-1a1b1c1d1e1f"  # what the fake driver reports
HOST_PRELOAD = Path("/etc/ld.so.preload")


def in_namespace(native: Native, tmp_path: Path, preload: str | None, *client: str) -> str:
    """Run cap_client in a private mount namespace whose /etc/ld.so.preload is ``preload``."""
    if os.geteuid() != 0 or shutil.which("unshare") is None:
        pytest.skip("needs root and unshare for a private mount namespace")
    upper, work = tmp_path / "upper", tmp_path / "work"
    upper.mkdir()
    work.mkdir()
    setup = (
        "mount --make-rprivate / && "
        f"mount -t overlay overlay -o lowerdir=/etc,upperdir={upper},workdir={work} /etc"
    )
    if preload is not None:
        setup += f" && printf '%s\\n' '{preload}' > /etc/ld.so.preload"
    argv = " ".join([str(native.client), *client])
    result = subprocess.run(
        ["unshare", "-m", "sh", "-c", f"{setup} && exec {argv}"],
        env=native.env(CHRONOS_CAP_GUARD=str(tmp_path / "guard")),
        capture_output=True,
        text=True,
        timeout=60,
    )
    if "overlay" in result.stderr and result.returncode != 0:
        pytest.skip(f"no overlay mounts here: {result.stderr.strip()}")
    assert result.returncode == 0, result.stderr
    return result.stdout


def test_unpartitioned_processes_leave_the_reserved_memory_free(
    native: Native, tmp_path: Path
) -> None:
    host_before = HOST_PRELOAD.read_bytes() if HOST_PRELOAD.exists() else None
    floor = 70 * GIB  # reserved by partitions and not in use
    alloccap.write_guard({FAKE_UUID: floor}, tmp_path / "guard")
    out = in_namespace(native, tmp_path, str(native.library), "dlsym", f"fill:{CHUNK}", "info")
    fill = next(line.split() for line in out.splitlines() if line.startswith("fill"))
    assert fill == ["fill", str(FAKE_TOTAL - floor), "2"]  # a clean OOM at the unreserved
    info = next(line.split() for line in out.splitlines() if line.startswith("info"))
    assert info[2] == "0"  # what is left is the partitions'
    host_after = HOST_PRELOAD.read_bytes() if HOST_PRELOAD.exists() else None
    assert host_after == host_before  # the host's /etc was never touched


def test_off_by_default(native: Native, tmp_path: Path) -> None:
    alloccap.write_guard({FAKE_UUID: 70 * GIB}, tmp_path / "guard")
    out = in_namespace(native, tmp_path, None, "dlsym", f"fill:{GIB}")
    assert f"fill {FAKE_TOTAL} 2" in out  # no preload: the guard file alone changes nothing


def test_enable_and_disable_are_idempotent(tmp_path: Path) -> None:
    preload = tmp_path / "ld.so.preload"
    preload.write_text("/opt/other.so\n")
    for _ in range(2):
        assert alloccap.main(["enable-machine-wide", str(preload)]) == 0
    assert preload.read_text().split() == ["/opt/other.so", str(alloccap.library_path())]
    assert alloccap.main(["disable-machine-wide", str(preload)]) == 0
    assert preload.read_text().split() == ["/opt/other.so"]
    assert alloccap.main(["nonsense"]) == 2


def test_the_daemon_keeps_the_guard_file_and_stats_show_both_counts(
    native: Native, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    if os.geteuid() != 0:
        pytest.skip("the machine-wide guard file is kept by a daemon running as root only")
    daemon = daemon_factory(extra_env={"CHRONOS_ALLOC_CAP": "on"})
    env = native.env(daemon.env, CHRONOS_ALLOC_CAP="on")
    guard = daemon.home / "cap" / alloccap.GUARD_FILE
    holder = subprocess.Popen(
        run_argv(str(native.client), "dlsym", f"alloc:{GIB}", "hold"),
        env=env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        assert holder.stdout.readline().split() == ["alloc", "0"]
        stats = daemon.call("stats")
        (row,) = stats["alloc_cap"]
        assert row["memory_bytes"] == 10 * GIB
        assert row["counted_bytes"] == GIB + alloccap.process_reserve(10 * GIB)
        assert row["nvml_bytes"] == 0  # the simulated backend sees no real process
        assert row["refused"] == 0
        uuid = next(d["uuid"] for d in stats["devices"] if d["index"] == 0)
        wait_for(
            lambda: guard.exists() and f"{uuid} {10 * GIB}" in guard.read_text(),
            10,
            "the guard file",
        )
        text = subprocess.run(
            [PY, "-m", "chronos.cli", "stats"], env=env, capture_output=True, text=True, check=True
        ).stdout
        assert "COUNTED (library)" in text and row["partition_id"] in text
    finally:
        assert holder.stdin is not None
        holder.stdin.close()
        holder.wait(timeout=60)
    wait_for(
        lambda: f"{uuid} " not in guard.read_text() or f"{uuid} 0" in guard.read_text(),
        10,
        "the floor to go with the partition",
    )
