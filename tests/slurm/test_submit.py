"""job_submit.lua on a real slurmctld, and the login-node front end.

``chronos submit`` (sbatch), ``chronos run|create --cluster`` (srun, salloc) and
``chronos list|stats --cluster`` (squeue), run as an ordinary user on this host.
"""

from __future__ import annotations

import json
import re
import subprocess

import pytest
from chronos_testing import TestUser, wait_for

from .support import NODES, SlurmCluster


def _sbatch(cluster: SlurmCluster, user: TestUser, *args: str) -> tuple[int, str]:
    proc = user.run(
        user.argv("sbatch", "-o", "/dev/null", *args, "--wrap", "true"),
        {**cluster.env, **cluster.user_env},
    )
    return proc.returncode, proc.stderr


def test_job_submit_lua_rejects_impossible_shard_requests(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    if not cluster.lua:
        pytest.skip("Slurm's job_submit/lua plugin is not installed (job_submit_lua.so)")
    code, err = _sbatch(cluster, alice, "--gres=shard:150", "-t", "1")
    assert code != 0 and "150 shards do not fit on one GPU (at most 80" in err
    code, err = _sbatch(cluster, alice, "--gres=shard:4")
    assert code != 0 and "needs a time limit" in err
    code, err = _sbatch(cluster, alice, "--gres=shard:70", "-t", "1")
    assert code != 0 and "partition debug allows at most 60 shards" in err
    code, err = _sbatch(cluster, alice, "-t", "1")  # no shards: untouched
    assert code == 0, err
    assert "chronos" not in err


def _chronos(cluster: SlurmCluster, user: TestUser, *args: str) -> subprocess.CompletedProcess[str]:
    """``chronos ARGS`` as ``user`` on the login node (this host, the test cluster's Slurm)."""
    env = {**cluster.env, **cluster.user_env, "USER": user.name}
    return user.run(user.python_argv("-m", "chronos.cli", *args), env)


def test_chronos_submit_places_a_job_and_list_cluster_shows_it(
    cluster: SlurmCluster, bob: TestUser
) -> None:
    proc = _chronos(
        cluster, bob, "submit", "--memory", "2.5GiB", "--duration", "90s", "--name", "train",
        "--output", f"{cluster.out}/%j.named", "--", "sh", "-c", "echo started; sleep 30",
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.startswith("submitted job ")
    job = proc.stdout.split()[-1]
    try:
        cluster.wait_state(job, {"RUNNING"})
        fields = cluster.job(job)
        assert fields["TimeLimit"] == "00:02:00"  # 90 s, rounded up to Slurm's whole minutes
        assert fields["JobName"] == "train"
        listed = _chronos(cluster, bob, "list", "--cluster", "--json")
        assert listed.returncode == 0, listed.stderr
        [mine] = [j for j in json.loads(listed.stdout) if j["job_id"] == job]
        assert mine["shards"] == 3 and mine["memory_bytes"] == 3 << 30  # 2.5 GiB: 3 shards
        assert mine["state"] == "RUNNING" and mine["name"] == "train"
        node = mine["nodes"]
        wait_for(lambda: cluster.partitions(node, job), 10, what="the job's partition")
        table = _chronos(cluster, bob, "list", "--cluster")
        assert job in table.stdout and "3.0 GiB" in table.stdout
        stats = _chronos(cluster, bob, "stats", "--cluster", "--json")
        assert stats.returncode == 0, stats.stderr
        [row] = [r for r in json.loads(stats.stdout) if r["job_id"] == job]
        assert row["memory_bytes"] == 3 << 30
        named = cluster.out / f"{job}.named"
        wait_for(lambda: named.exists() and "started" in named.read_text(), 10, what="--output")
        alias = _chronos(cluster, bob, "slurm", "list", "--json")  # the older name still works
        assert job in [j["job_id"] for j in json.loads(alias.stdout)]
    finally:
        cluster.slurm("scancel", job)


def test_submit_after_waits_for_the_first_job(cluster: SlurmCluster, bob: TestUser) -> None:
    first = _chronos(cluster, bob, "submit", "--json", "--memory", "1GiB", "--time", "1",
                     "--output", "/dev/null", "--", "sleep", "30")  # fmt: skip
    assert first.returncode == 0, first.stderr
    job = json.loads(first.stdout)["job_id"]
    second = _chronos(cluster, bob, "submit", "--json", "--memory", "1GiB", "--time", "1",
                      "--after", job, "--output", "/dev/null", "--", "true")  # fmt: skip
    assert second.returncode == 0, second.stderr
    then = json.loads(second.stdout)["job_id"]
    try:
        assert cluster.job(then)["Dependency"].startswith(f"afterany:{job}")
        cluster.wait_state(job, {"RUNNING"})
        assert cluster.state(then) == "PENDING"
    finally:
        cluster.slurm("scancel", job, then)


def test_run_cluster_runs_the_command_with_srun(cluster: SlurmCluster, bob: TestUser) -> None:
    script = 'echo "job=$SLURM_JOB_ID partition=$CHRONOS_PARTITION_ID"; exit 3'
    proc = _chronos(cluster, bob, "run", "--cluster", "--memory", "2GiB", "--duration", "1m",
                    "--", "sh", "-c", script)  # fmt: skip
    assert proc.returncode == 3, proc.stderr  # the command's own status, through srun
    match = re.search(r"job=(\d+) partition=(\S+)", proc.stdout)
    assert match, proc.stdout  # the TaskProlog exported the partition the prolog made
    job, partition = match.groups()
    records = [r for node in NODES for r in cluster.partitions(node, job, all=True)]
    assert [r["id"] for r in records] == [partition]
    assert records[0]["memory_bytes"] == 2 << 30 and records[0]["user"] == bob.name


def test_create_cluster_holds_an_allocation_with_salloc(
    cluster: SlurmCluster, bob: TestUser
) -> None:
    script = 'echo "job=$SLURM_JOB_ID"; squeue -h -j "$SLURM_JOB_ID" -o "%b %T"'
    proc = _chronos(cluster, bob, "create", "--cluster", "--memory", "4GiB", "--duration", "1m",
                    "--", "sh", "-c", script)  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    match = re.search(r"job=(\d+)\n(\S+) RUNNING", proc.stdout)
    assert match, proc.stdout
    assert match.group(2).endswith("shard:4"), match.group(2)  # the allocation holds 4 shards
    cluster.wait_state(match.group(1), {"COMPLETED", "CANCELLED"})  # salloc gave it back


def test_slurm_errors_come_back_as_one_line(cluster: SlurmCluster, bob: TestUser) -> None:
    proc = _chronos(cluster, bob, "submit", "--memory", "4GiB", "--time", "1",
                    "--partition", "nosuch", "--", "true")  # fmt: skip
    assert proc.returncode == 125  # submit keeps run's codes: 125 is Chronos's (or Slurm's) failure
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chronos: error: sbatch: "), proc.stderr
    assert "nosuch" in lines[0] or "partition" in lines[0].lower()
    assert "Traceback" not in proc.stderr
