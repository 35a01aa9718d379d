"""End-to-end: real Slurm jobs, as ordinary users, fenced by each node's chronosd."""

from __future__ import annotations

import json

from chronos_testing import TestUser, wait_for

from .support import SlurmCluster


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
