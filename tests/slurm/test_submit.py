"""job_submit.lua on a real slurmctld, and the login-node front end (``chronos slurm``)."""

from __future__ import annotations

import json

import pytest
from chronos_testing import TestUser, wait_for

from .support import SlurmCluster


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


def test_chronos_submit_places_a_job_and_list_cluster_shows_it(
    cluster: SlurmCluster, bob: TestUser
) -> None:
    env = {**cluster.env, **cluster.user_env, "USER": bob.name}
    proc = bob.run(
        bob.python_argv(
            "-m", "chronos.cli", "slurm", "submit", "--memory", "3GiB", "--time", "1",
            f"--slurm-option=--output={cluster.out}/%j.out", "--", "sleep", "30",
        ),
        env,
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.split()[-1]
    assert proc.stdout.startswith("submitted job ")
    try:
        cluster.wait_state(job, {"RUNNING"})
        listed = bob.run(bob.python_argv("-m", "chronos.cli", "slurm", "list", "--json"), env)
        assert listed.returncode == 0, listed.stderr
        [mine] = [j for j in json.loads(listed.stdout) if j["job_id"] == job]
        assert mine["shards"] == 3 and mine["memory_bytes"] == 3 << 30
        assert mine["state"] == "RUNNING"
        node = mine["nodes"]
        wait_for(lambda: cluster.partitions(node, job), 10, what="the job's partition")
        table = bob.run(bob.python_argv("-m", "chronos.cli", "slurm", "list"), env)
        assert job in table.stdout and "3.0 GiB" in table.stdout
    finally:
        cluster.slurm("scancel", job)


def test_slurm_errors_come_back_as_one_line(cluster: SlurmCluster, bob: TestUser) -> None:
    env = {**cluster.env, **cluster.user_env}
    proc = bob.run(
        bob.python_argv(
            "-m", "chronos.cli", "slurm", "submit", "--memory", "4GiB", "--time", "1",
            "--partition", "nosuch", "--", "true",
        ),
        env,
    )  # fmt: skip
    assert proc.returncode != 0
    lines = proc.stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("chronos: error: sbatch: "), proc.stderr
    assert "Traceback" not in proc.stderr
