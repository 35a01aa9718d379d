"""End-to-end: real Slurm jobs, as ordinary users, fenced by each node's chronosd."""

from __future__ import annotations

import json
import subprocess
import time
import urllib.request
from datetime import datetime

from chronos_testing import PY, TestUser, wait_for

from .support import HOOK, SlurmCluster


def test_job_within_its_shards_runs_to_the_end(cluster: SlurmCluster, alice: TestUser) -> None:
    job = cluster.holds_memory(alice, {"ci0": 5}, 2.0, "--gres=shard:10", "-t", "1", "-w", "ci0")
    cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=40)
    assert cluster.state(job) == "COMPLETED", cluster.output(job)
    assert cluster.mark(job, "ci0", "done").exists()
    seen = json.loads(cluster.mark(job, "ci0", "start").read_text())
    [record] = cluster.partitions("ci0", job, all=True)
    assert record["user"] == "alice" and record["memory_bytes"] == 10 << 30
    assert seen["CHRONOS_PARTITION_ID"] == record["id"]
    assert int(seen["CHRONOS_SOFT_LIMIT_BYTES"]) == (10 << 30) - (1 << 30)
    assert record["state"] == "released"  # by the epilog
    assert "chronos" not in cluster.output(job)  # the caps' start-up hook ran quietly


def _events(cluster: SlurmCluster, node: str, partition_id: str, kind: str) -> list[dict]:
    return [e for e in cluster.daemons[node].call("events", id=partition_id) if e["kind"] == kind]


def test_job_over_its_shards_is_stopped_within_a_second_and_fails(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    job = cluster.holds_memory(alice, {"ci0": 6}, 60.0, "--gres=shard:4", "-t", "1", "-w", "ci0")
    assert cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=40) == "FAILED"
    started = json.loads(cluster.mark(job, "ci0", "start").read_text())["t0"]
    [record] = cluster.partitions("ci0", job, all=True)
    [stopped] = _events(cluster, "ci0", record["id"], "terminated")
    assert stopped["detail"]["why"] == "memory"
    assert (
        datetime.fromisoformat(stopped["at"]).timestamp() - started < 1.0
    )  # declared over at t0, SIGTERM under a second later
    assert not cluster.mark(job, "ci0", "done").exists()
    reason = wait_for(lambda: "over the job's" in cluster.output(job), 5, what="reason in stderr")
    assert reason and f"job {job}" in cluster.output(job)


def test_two_node_job_is_stopped_only_where_it_went_over(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    job = cluster.holds_memory(
        alice,
        {"ci0": 1, "ci1": 6},
        3.0,
        "--gres=shard:4",
        "-t",
        "1",
        "--ntasks-per-node=1",
        nodes=2,
    )
    cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=40)
    [on_ci0] = cluster.partitions("ci0", job, all=True)
    [on_ci1] = cluster.partitions("ci1", job, all=True)
    assert _events(cluster, "ci1", on_ci1["id"], "terminated")
    assert not _events(cluster, "ci0", on_ci0["id"], "terminated")
    assert cluster.mark(job, "ci0", "done").exists()  # ran to its end on the node within
    assert not cluster.mark(job, "ci1", "done").exists()


def test_job_without_shards_gets_no_partition(cluster: SlurmCluster, alice: TestUser) -> None:
    job = cluster.submit(alice, "-w", "ci0", "-t", "1", script="#!/bin/sh\ntrue\n")
    assert cluster.wait_state(job, {"COMPLETED", "FAILED"}, timeout=30) == "COMPLETED"
    assert cluster.partitions("ci0", job, all=True) == []


def test_users_cannot_take_slurm_gpus_by_hand_but_the_prolog_can(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    daemon = cluster.daemons["ci0"]
    for args in (
        ("create", "0", "1GiB", "60"),
        ("create", "1", "1GiB", "60", "--wait"),
        ("create", "0", "1GiB", "60", "--start", "+2h"),
    ):
        proc = alice.cli(*args, env=daemon.env)
        assert proc.returncode != 0
        assert (
            "GPU" in proc.stderr
            and "is scheduled by Slurm: use sbatch/srun --gres=shard:N" in proc.stderr
        )
        assert "Traceback" not in proc.stderr
    assert not [r for r in daemon.call("list") if r["user"] == "alice" and r["kind"] == "cli"]
    assert daemon.queue() == []
    made = daemon.cli("create", "0", "1GiB", "60", "--json")  # root: an administrator
    assert made.returncode == 0, made.stderr
    daemon.call("release", id=json.loads(made.stdout)["id"])


def _run_hook(cluster: SlurmCluster, name: str, node: str, job: str) -> None:
    """Run a hook by hand as slurmd would (root, the job's variables)."""
    info = cluster.job(job)
    daemon = cluster.daemons[node]
    env = {
        **cluster.env,
        "SLURM_JOB_ID": job,
        "SLURMD_NODENAME": node,
        "SLURM_JOB_USER": info["UserId"].split("(")[0],
        "SLURM_JOB_GPUS": "0",
        "CHRONOS_SOCKET": str(daemon.sock),
        "CHRONOS_CONFIG": str(daemon.config_path),
    }
    proc = subprocess.run(
        [PY, "-I", "-S", str(HOOK), name], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


def test_retried_prolog_and_requeued_job_get_one_partition(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    job = cluster.holds_memory(alice, {"ci0": 1}, 60.0, "--gres=shard:3", "-t", "1", "-w", "ci0")
    cluster.wait_state(job, {"RUNNING"})
    wait_for(lambda: cluster.mark(job, "ci0", "start").exists(), 20, what="the job's task")
    [first] = cluster.partitions("ci0", job)
    _run_hook(cluster, "prolog", "ci0", job)  # slurmd retrying the prolog
    assert cluster.partitions("ci0", job) == [first]

    cluster.mark(job, "ci0", "start").unlink()
    requeued = cluster.slurm("scontrol", "requeue", job)
    assert requeued.returncode == 0, requeued.stderr
    requeued_at = time.monotonic()
    cluster.wait_state(job, {"PENDING"})

    seen: dict[str, str] = {}

    def ran_again() -> bool:
        # Slurm holds a requeued job back (BeginTime); we move it up, but never into the
        # second of the requeue: slurmd refuses a launch while the revocation of the last
        # run's credential is that fresh ("Job credential revoked", the job FAILED with
        # exit 1 and never ran: the flake seen under load, which was Slurm's, not ours).
        if cluster.state(job) == "PENDING" and time.monotonic() - requeued_at > 2.5:
            update = cluster.slurm("scontrol", "update", f"jobid={job}", "StartTime=now")
            seen["update"] = (update.stderr or update.stdout).strip()
        info = cluster.job(job)
        seen.update({k: str(info.get(k)) for k in ("JobState", "Reason", "StartTime", "Restarts")})
        return info.get("Restarts") == "1" and info.get("JobState") not in ("PENDING", "REQUEUED")

    # (StartTime=now does not always take; Slurm starts it by itself within ~2 minutes.)
    try:
        wait_for(ran_again, 150, what="the requeued job running again", interval=0.5)
    except AssertionError as exc:
        raise AssertionError(f"{exc}; last seen: {seen}") from None
    assert seen["JobState"] == "RUNNING", seen
    wait_for(lambda: cluster.mark(job, "ci0", "start").exists(), 20, what="the job's task again")
    # slurmd skips the prolog of a run relaunched before the last run's epilog ended; then
    # the reconciler makes the partition (within reconcile_interval): either way, one.
    open_now = wait_for(lambda: cluster.partitions("ci0", job), 10, what="the new run's partition")
    assert len(open_now) == 1, open_now
    assert open_now[0]["kind"] == f"slurm:{job}.1"  # the second run's
    assert all(r["state"] != "active" for r in cluster.partitions("ci0", job, all=True)
               if r["id"] != open_now[0]["id"])  # fmt: skip
    assert open_now[0]["memory_bytes"] == 3 << 30
    cluster.slurm("scancel", job)
    cluster.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"})


def test_job_whose_epilog_never_ran_is_cleaned_up_by_the_reconciler(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    daemon = cluster.daemons["ci1"]
    job = cluster.holds_memory(alice, {"ci1": 1}, 1.0, "--gres=shard:2", "-t", "1", "-w", "ci1")
    wait_for(lambda: cluster.mark(job, "ci1", "start").exists(), 20, what="the job's task")
    [record] = cluster.partitions("ci1", job)
    daemon.stop()  # the epilog cannot reach it: it retries briefly and exits 0
    cluster.wait_state(job, {"COMPLETED", "FAILED"}, timeout=40)
    assert cluster.node_state("ci1") in ("idle", "mixed")  # not drained
    daemon.start()
    wait_for(
        lambda: daemon.record(record["id"])["state"] == "released", 15, what="reconciler release"
    )
    assert daemon.events("slurm_reconciled", partition=record["id"], action="release")


def test_time_limit_change_moves_the_partitions_end(cluster: SlurmCluster, alice: TestUser) -> None:
    job = cluster.holds_memory(alice, {"ci0": 1}, 60.0, "--gres=shard:2", "-t", "2", "-w", "ci0")
    cluster.wait_state(job, {"RUNNING"})
    wait_for(lambda: cluster.partitions("ci0", job), 20, what="the job's partition")
    changed = cluster.slurm("scontrol", "update", f"jobid={job}", "TimeLimit=5")
    assert changed.returncode == 0, changed.stderr
    end = time.mktime(time.strptime(cluster.job(job)["EndTime"], "%Y-%m-%dT%H:%M:%S"))

    def moved() -> bool:
        [record] = cluster.partitions("ci0", job)
        expires = float(record["expires_at"])
        return abs(expires - (end + 30)) < 2

    wait_for(moved, 10, what="the partition's end to follow the new time limit")
    cluster.slurm("scancel", job)
    cluster.wait_state(job, {"CANCELLED", "COMPLETED", "FAILED"})


def test_node_metrics_carry_the_job_id_and_user(cluster: SlurmCluster, alice: TestUser) -> None:
    job = cluster.holds_memory(alice, {"ci0": 2}, 30.0, "--gres=shard:4", "-t", "1", "-w", "ci0")
    try:
        wait_for(lambda: cluster.mark(job, "ci0", "start").exists(), 20, what="the job's task")
        address = cluster.daemons["ci0"].address_of("metrics_serving")

        def scrape() -> str:
            with urllib.request.urlopen(f"http://{address}/metrics", timeout=5) as reply:
                return str(reply.read().decode())

        def line(name: str) -> str | None:
            return next(
                (
                    x
                    for x in scrape().splitlines()
                    if x.startswith(name) and f'slurm_job="{job}"' in x
                ),
                None,
            )

        used = wait_for(
            lambda: (
                (u := line("chronos_partition_used_bytes{"))
                and u.endswith(" 2.147483648e+09")
                and u
            ),
            10,
            what="the job's used bytes in the metrics",
        )
        assert 'user="alice"' in used
        reserved = line("chronos_partition_reserved_bytes{")
        assert reserved is not None and reserved.endswith(" 4.294967296e+09")
    finally:
        cluster.slurm("scancel", job)


def test_a_node_whose_chronosd_is_down_still_runs_jobs(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    daemon = cluster.daemons["ci0"]
    daemon.stop()
    try:
        job = cluster.holds_memory(alice, {"ci0": 1}, 0.5, "--gres=shard:2", "-t", "1", "-w", "ci0")
        assert cluster.wait_state(job, {"COMPLETED", "FAILED"}, timeout=40) == "COMPLETED"
        assert cluster.node_state("ci0") in ("idle", "mixed")  # hooks exited 0: not drained
    finally:
        daemon.start()
    assert cluster.partitions("ci0", job, all=True) == []  # it ran unfenced (docs/SLURM.md)


def test_cancel_on_overuse_ends_the_job_on_every_node(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    daemon = cluster.daemons["ci1"]
    policy = daemon.config_path.read_text()
    daemon.reconfigure(policy + "cancel_on_overuse = true\n")
    try:
        job = cluster.holds_memory(
            alice, {"ci0": 1, "ci1": 6}, 20.0, "--gres=shard:4", "-t", "1",
            "--ntasks-per-node=1", nodes=2,
        )  # fmt: skip
        cluster.wait_state(job, {"COMPLETED", "FAILED", "CANCELLED"}, timeout=40)
        daemon.wait_event("slurm_scancelled", job=job, timeout=10)
        assert not cluster.mark(job, "ci0", "done").exists()  # ended on the node within, too
    finally:
        daemon.reconfigure(policy)


def test_reconciler_fences_a_job_that_started_while_chronosd_was_down(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    daemon = cluster.daemons["ci1"]
    daemon.stop()
    try:
        job = cluster.holds_memory(
            alice, {"ci1": 1}, 60.0, "--gres=shard:5", "-t", "1", "-w", "ci1"
        )
        cluster.wait_state(job, {"RUNNING"})
        # The task runs only after the prolog gave up on the daemon: only the reconciler
        # can fence this job now (a daemon back within the prolog's retries would not test it).
        wait_for(lambda: cluster.mark(job, "ci1", "start").exists(), 30, what="the job's task")
    finally:
        daemon.start()
    try:
        [record] = wait_for(lambda: cluster.partitions("ci1", job), 10, what="adopted partition")
        assert record["user"] == "alice" and record["memory_bytes"] == 5 << 30
        assert daemon.events("slurm_adopted", job=job)
    finally:
        cluster.slurm("scancel", job)


def test_a_job_that_started_without_a_partition_is_fenced_within_seconds(
    cluster: SlurmCluster, alice: TestUser
) -> None:
    """A job running here without its partition (its prolog made none, the daemon up all
    along: a requeued run relaunched before the last run's epilog ended) is adopted as soon
    as the sampler sees its memory, not at the next ``reconcile_interval`` (here 120 s)."""
    daemon = cluster.daemons["ci1"]
    policy = daemon.config_path.read_text()
    daemon.reconfigure(policy.replace('reconcile_interval = "1s"', 'reconcile_interval = "120s"'))
    time.sleep(2.5)  # the reconciler's pass after the reload is over: it now waits 120 s
    # The prolog reads the policy file itself: with Slurm disabled there, it makes nothing,
    # while the running daemon (not reloaded) still follows Slurm.
    daemon.write_config(policy.replace("enabled = true", "enabled = false"))
    job = None
    try:
        job = cluster.holds_memory(
            alice, {"ci1": 1}, 60.0, "--gres=shard:2", "-t", "1", "-w", "ci1"
        )
        wait_for(lambda: cluster.mark(job, "ci1", "start").exists(), 30, what="the job's task")
        daemon.write_config(policy)
        started = time.monotonic()
        [record] = wait_for(lambda: cluster.partitions("ci1", job), 10, what="adopted partition")
        assert time.monotonic() - started < 10
        assert record["user"] == "alice" and record["memory_bytes"] == 2 << 30
        assert daemon.events("slurm_adopted", job=job)
    finally:
        if job is not None:
            cluster.slurm("scancel", job)
        daemon.reconfigure(policy)
