"""Attacks on a Slurm node's Chronos (issue 14), by ordinary local users, on a real chronosd.

* Taking a Slurm GPU's memory by hand (``chronos create``, a booking, the queue)
  behind Slurm's back: refused on a node with ``[slurm] enabled``.
* Making or stretching a Slurm job's partition: its kind ``slurm:<job>`` is the
  prolog's (root) alone, and its end is Slurm's time limit.
* Getting the daemon to move a Slurm job's process into a cgroup of ours (it would
  then survive ``scancel`` and leave the job's limits): never done.
* Getting root to write the overuse reason into a file the user cannot write.

Each would fail on the base commit f798f96 (no ``[slurm]`` table: the policy is
refused and the daemon does not start; nothing stops the create or the move).
"""

from __future__ import annotations

import json
import os
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import DaemonProcess, TestUser, wait_for
from daemon.conftest import Users

SLURM_POLICY = '[slurm]\nenabled = true\nnode_name = "sec0"\ngres_conf = "/nonexistent"\n'
CALL = (
    "import json, sys\n"
    "from chronos.transport import SocketTransport\n"
    "from chronos.errors import ChronosError\n"
    "t = SocketTransport()\n"
    "try:\n"
    "    print(json.dumps({'ok': t.call(sys.argv[1], **json.loads(sys.argv[2]))}))\n"
    "except ChronosError as exc:\n"
    "    print(json.dumps({'error': type(exc).__name__, 'message': str(exc)}))\n"
)


def call_as(user: TestUser, d: DaemonProcess, op: str, **args: Any) -> dict[str, Any]:
    proc = user.run_python(CALL, op, json.dumps(args), env=d.env)
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)  # type: ignore[no-any-return]


@pytest.fixture
def slurm_node(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    return daemon_factory(config=SLURM_POLICY)


def test_users_cannot_take_a_slurm_gpu_behind_slurms_back(
    users: Users, slurm_node: DaemonProcess
) -> None:
    d = slurm_node
    asks = [
        {},  # a plain create
        {"start": __import__("time").time() + 3600},  # a booking
        {"wait": True},  # the local queue
    ]
    for extra in asks:
        got = call_as(users.alice, d, "create", device=0, memory="1GiB", duration=60, **extra)
        assert got.get("error") == "PermissionDenied", got
        assert got["message"] == "GPU 0 is scheduled by Slurm: use sbatch/srun --gres=shard:N"
    assert d.call("list") == [] and d.queue() == []


def test_only_the_prolog_makes_or_stretches_a_jobs_partition(
    users: Users, slurm_node: DaemonProcess
) -> None:
    d = slurm_node
    forged = call_as(
        users.alice, d, "create", device=0, memory="1GiB", duration=60, kind="slurm:12345"
    )
    assert forged.get("error") == "BadRequest", forged
    made = d.call(  # as root, the way the prolog does
        "create", device=0, memory="4GiB", duration=60, user=users.alice.name, persist=True,
        kind="slurm:12345",
    )  # fmt: skip
    stretched = call_as(users.alice, d, "extend", id=made["id"], duration=3600)
    assert stretched.get("error") == "PermissionDenied", stretched
    assert "Slurm job 12345" in stretched["message"]
    assert d.record(made["id"])["expires_at"] == made["expires_at"]


@pytest.fixture
def process_in_a_slurm_job_cgroup(users: Users) -> Iterator[subprocess.Popen[bytes]]:
    """alice's process in a Slurm-style job cgroup (v1 freezer), as slurmstepd would place it."""
    freezer = Path("/sys/fs/cgroup/freezer")
    if not freezer.is_dir() or not os.access(freezer, os.W_OK):
        pytest.skip("needs a writable cgroup v1 freezer hierarchy (Slurm's job cgroup layout)")
    group = freezer / "slurm_sec0" / f"uid_{users.alice.uid}" / "job_4242" / "step_0"
    group.mkdir(parents=True, exist_ok=True)
    proc = users.alice.popen(["sleep", "60"], env={"PATH": "/usr/bin:/bin"})
    try:
        wait_for(lambda: _runs_as(proc.pid, users.alice.uid), 5, what="sleep as alice")
        (group / "cgroup.procs").write_text(str(proc.pid))
        yield proc
    finally:
        proc.kill()
        proc.wait(10)
        for path in (group, group.parent, group.parent.parent, group.parent.parent.parent):
            wait_for(lambda p=path: _rmdir(p), 5, what=f"rmdir {path}")


def _runs_as(pid: int, uid: int) -> bool:
    status = Path(f"/proc/{pid}/status").read_text()
    return f"Uid:\t{uid}\t" in status and "sleep" in Path(f"/proc/{pid}/comm").read_text()


def _rmdir(path: Path) -> bool:
    try:
        path.rmdir()
    except FileNotFoundError:
        return True
    except OSError:
        return False
    return True


def test_a_slurm_job_process_is_never_moved_into_our_cgroup(
    users: Users,
    daemon_factory: Callable[..., DaemonProcess],
    process_in_a_slurm_job_cgroup: subprocess.Popen[bytes],
) -> None:
    d = daemon_factory()  # an ordinary node: alice may create, and attach her own processes
    pid = process_in_a_slurm_job_cgroup.pid
    before = Path(f"/proc/{pid}/cgroup").read_text()
    made = call_as(users.alice, d, "create", device=0, memory="1GiB", duration=60, persist=True)
    assert "ok" in made, made
    mine = made["ok"]
    attached = call_as(users.alice, d, "attach", id=mine["id"], pid=pid)
    assert "ok" in attached, attached
    assert attached["ok"]["cgroup"] is False, attached
    assert Path(f"/proc/{pid}/cgroup").read_text() == before


def test_overuse_reason_never_goes_into_a_file_the_user_cannot_write(
    users: Users, tmp_path: Path
) -> None:
    from chronos.slurm.overuse import append_to_stderr

    os.chmod(tmp_path, 0o755)
    victim = tmp_path / "root-owned"
    victim.write_text("root's data\n")
    os.chmod(victim, 0o644)  # alice may read it, not write it
    with open(victim) as readable:
        proc = subprocess.Popen(
            users.alice.argv("sleep", "30"), stderr=readable, env={"PATH": "/usr/bin:/bin"}
        )
    try:
        wait_for(lambda: _runs_as(proc.pid, users.alice.uid), 5, what="sleep as alice")
        assert append_to_stderr(proc.pid, users.alice.uid, b"chronos: over\n") is False
    finally:
        proc.kill()
        proc.wait(10)
    assert victim.read_text() == "root's data\n"
