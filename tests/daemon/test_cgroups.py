"""cgroup v2 membership: processes the daemon attached cannot slip out of their partition.

The end-to-end tests need root and a writable cgroup2 hierarchy (CI has both);
elsewhere they skip with the reason. The parsing tests run everywhere.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from chronos import cgroups

from .support import DaemonProcess, wait_for

MOUNTINFO = (
    "24 29 0:22 / /sys rw,nosuid,nodev,noexec,relatime shared:7 - sysfs sysfs rw\n"
    "31 24 0:26 / /sys/fs/cgroup ro,nosuid shared:9 - tmpfs tmpfs ro,mode=755\n"
    "41 31 0:38 / /sys/fs/cgroup/unified rw,relatime shared:10 - cgroup2 cgroup2 rw\n"
    "42 31 0:39 / /sys/fs/cgroup/cpu rw,relatime shared:11 - cgroup cgroup rw,cpu\n"
)


def test_finds_the_unified_hierarchy_on_a_hybrid_system(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO)
    assert cgroups.find_cgroup2_root(str(info)) == Path("/sys/fs/cgroup/unified")


def test_no_cgroup2_mount_means_none(tmp_path: Path) -> None:
    info = tmp_path / "mountinfo"
    info.write_text(MOUNTINFO.replace("cgroup2 cgroup2", "cgroup cgroup"))
    assert cgroups.find_cgroup2_root(str(info)) is None


def test_a_process_outside_any_partition_cgroup_has_none() -> None:
    assert cgroups.partition_of(os.getpid()) is None


def _usable() -> str | None:
    if os.geteuid() != 0:
        return "placing processes in cgroups needs root"
    if not cgroups.PartitionCgroups.detect().available:
        return "no writable cgroup2 hierarchy here"
    return None


needs_cgroups = pytest.mark.skipif(_usable() is not None, reason=str(_usable()))

# The command clears its environment (no CHRONOS_PARTITION_ID) and starts a new session:
# the marker and the process-group are both gone, only the cgroup still says where it is.
ESCAPE = (
    "env -i /bin/sh -c 'setsid sleep 60 & echo $! > {pidfile}; wait' & "
    "while [ ! -s {pidfile} ]; do sleep 0.05; done; sleep 60"
)


@needs_cgroups
def test_an_escaped_grandchild_stays_in_the_partition(
    daemon: DaemonProcess, tmp_path: Path
) -> None:
    pidfile = tmp_path / "escaped.pid"
    run = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "chronos.cli",
            "run",
            "--memory",
            "0.1",
            "--duration",
            "3",
            "--grace",
            "1",
            "--",
            "/bin/sh",
            "-c",
            ESCAPE.format(pidfile=pidfile),
        ],
        env=daemon.env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    wait_for(lambda: pidfile.exists() and pidfile.read_text().strip(), timeout=10)
    escaped = int(pidfile.read_text())
    partition = cgroups.partition_of(escaped)
    assert partition is not None and partition in daemon.open_ids()
    assert b"CHRONOS_PARTITION_ID" not in Path(f"/proc/{escaped}/environ").read_bytes()

    # It counts toward the partition in stats once it holds (simulated) GPU memory.
    from chronos.devices.simulated import declare_process

    os.environ["CHRONOS_HOME"] = daemon.env["CHRONOS_HOME"]
    try:
        declare_process(escaped, 0, 1 << 30)
        stats = json.loads(daemon.cli("stats", "--json").stdout)
        seen = [p for d in stats for p in d["processes"] if p["pid"] == escaped]
        assert seen and seen[0]["partition_id"] == partition
    finally:
        declare_process(escaped, 0, 0)
        del os.environ["CHRONOS_HOME"]

    # At expiry the daemon stops it along with the rest: nothing survives the grace.
    run.wait(timeout=20)
    assert run.returncode == 124
    wait_for(
        lambda: (
            not Path(f"/proc/{escaped}").exists()
            or b"Z" in Path(f"/proc/{escaped}/stat").read_bytes().split(b")")[-1][:3]
        ),
        timeout=10,
    )
    # The ended partition's cgroup is removed once empty.
    base = cgroups.PartitionCgroups.detect().base
    assert base is not None
    wait_for(lambda: not (base / partition).exists(), timeout=10)


@needs_cgroups
def test_attach_places_the_process_in_the_partitions_cgroup(daemon: DaemonProcess) -> None:
    sleeper = subprocess.Popen(["sleep", "30"])
    try:
        created = json.loads(daemon.cli("create", "0", "0.1", "60", "--json").stdout)
        out = daemon.cli("attach", created["id"], str(sleeper.pid))
        assert out.returncode == 0, out.stderr
        assert cgroups.partition_of(sleeper.pid) == created["id"]
        assert sleeper.pid in cgroups.members(created["id"])
    finally:
        sleeper.kill()
        sleeper.wait()
    time.sleep(0.1)
