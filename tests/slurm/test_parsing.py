"""Slurm's texts read by Chronos, from fixtures: /proc files, scontrol, squeue, gres.conf, policy.

These need no Slurm installed.
"""

from __future__ import annotations

from pathlib import Path
from unittest import mock

import pytest

from chronos import procs
from chronos.config import parse_config
from chronos.devices.base import Device
from chronos.errors import BadRequest
from chronos.models import ACTIVE, PartitionRecord
from chronos.slurm import membership
from chronos.slurm.gres import check_gres
from chronos.slurm.reconcile import decide
from chronos.slurm.scontrol import QueueEntry, expand_hostlist, parse_job, parse_queue
from chronos.slurm.settings import GIB, job_of, parse_slurm, run_of

V1 = """12:pids:/slurm_ci1/uid_1006/job_42/step_batch
6:freezer:/slurm_ci1/uid_1006/job_42/step_batch
5:devices:/slurm_ci1/uid_1006/job_42/step_batch/task_0
4:memory:/process_api/abc
0::/
"""
V1_SINGLE = "6:freezer:/slurm/uid_1006/job_7/step_0\n0::/\n"
V2 = "0::/system.slice/slurmstepd.scope/job_99/step_0/user/task_0\n"
V2_MULTI = "0::/system.slice/ci0_slurmstepd.scope/job_99/step_batch/user/task_0\n"
NOT_SLURM = "0::/user.slice/user-1000.slice/session-3.scope\n1:name=systemd:/job_5\n"


@pytest.mark.parametrize(
    ("text", "job", "node", "uid"),
    [
        (V1, "42", "ci1", 1006),
        (V1_SINGLE, "7", None, 1006),
        (V2, "99", None, None),
        (V2_MULTI, "99", "ci0", None),
    ],
)
def test_job_cgroup_of_v1_and_v2_layouts(
    text: str, job: str, node: str | None, uid: int | None
) -> None:
    found = membership.parse_cgroup(text)
    assert found == membership.JobCgroup(job, node, uid)


def test_paths_outside_slurm_name_no_job() -> None:
    assert membership.parse_cgroup(NOT_SLURM) is None
    assert membership.parse_cgroup("") is None


def record(job: str, uid: int = 1006, pid_id: str = "p1") -> PartitionRecord:
    return PartitionRecord(
        id=pid_id, device=0, device_uuid="GPU-0", device_total_bytes=80 * GIB,
        memory_bytes=4 * GIB, uid=uid, user="alice", created_at=0.0, starts_at=0.0,
        expires_at=1e12, state=ACTIVE, kind=f"slurm:{job}",
    )  # fmt: skip


class FixtureTable(procs.ProcessTable):
    """A process table read from fixture /proc files, uids from a dict (no chown needed)."""

    def __init__(self, uids: dict[int, int]) -> None:
        super().__init__()
        self.uids = uids

    def uid(self, pid: int) -> int | None:
        return self.uids.get(pid)


def fake_proc(
    root: Path, pid: int, ppid: int, cmdline: str, env: dict[str, str], cgroup: str
) -> None:
    d = root / str(pid)
    d.mkdir()
    (d / "stat").write_text(
        f"{pid} (x) S {ppid} {pid} {pid} 0 -1 0 0 0 0 0 0 0 0 0 20 0 1 0 100 0 0\n"
    )
    (d / "cmdline").write_bytes(cmdline.replace(" ", "\0").encode() + b"\0")
    (d / "environ").write_bytes(b"\0".join(f"{k}={v}".encode() for k, v in env.items()))
    (d / "cgroup").write_text(cgroup)


def test_cgroup_membership_counts_only_the_jobs_user_on_this_node(tmp_path: Path) -> None:
    fake_proc(tmp_path, 10, 1, "slurmstepd: [42.batch]", {}, V1)  # root's helper
    fake_proc(tmp_path, 11, 10, "python train.py", {}, V1)  # the job's task
    fake_proc(tmp_path, 12, 1, "python escaped.py", {}, V1)  # setsid + double fork: still in
    fake_proc(tmp_path, 13, 1, "python other.py", {}, V1.replace("slurm_ci1", "slurm_ci0"))
    with mock.patch.object(procs, "PROC", str(tmp_path)):
        table = FixtureTable({10: 0, 11: 1006, 12: 1006, 13: 1006})
        jobs = membership.SlurmJobs([record("42")], table, node="ci1")
        assert jobs.partition_of(11) == "p1"
        assert jobs.partition_of(12) == "p1"
        assert jobs.partition_of(10) is None  # slurmstepd runs as root
        assert jobs.partition_of(13) is None  # the same job on the host's other slurmd
        assert jobs.members("p1") == {11, 12}


def test_fallback_without_cgroups_uses_environment_and_slurmstepd_ancestry(tmp_path: Path) -> None:
    plain = "0::/\n"
    fake_proc(tmp_path, 20, 1, "slurmstepd: [77.0]", {}, plain)
    fake_proc(tmp_path, 21, 20, "python a.py", {"SLURM_JOB_ID": "77"}, plain)
    fake_proc(tmp_path, 22, 21, "python b.py", {}, plain)  # cleared its environment: ancestry
    fake_proc(tmp_path, 23, 1, "python c.py", {"SLURM_JOB_ID": "77"}, plain)  # bob, faking it
    fake_proc(tmp_path, 24, 1, "python d.py", {}, plain)  # nothing to go by
    fake_proc(tmp_path, 25, 1, "x", {"SLURM_JOB_ID": "77", "SLURMD_NODENAME": "ci0"}, plain)
    with mock.patch.object(procs, "PROC", str(tmp_path)):
        table = FixtureTable({20: 0, 21: 1006, 22: 1006, 23: 1007, 24: 1006, 25: 1006})
        jobs = membership.SlurmJobs([record("77")], table, node="ci1")
        assert [jobs.partition_of(p) for p in (21, 22, 23, 24, 25)] == [
            "p1",
            "p1",
            None,
            None,
            None,
        ]


DETAIL = """JobId=5 JobName=train
   UserId=alice(1006) GroupId=alice(1007) MCS_label=N/A
   JobState=RUNNING Reason=None Dependency=(null)
   RunTime=00:00:01 TimeLimit=00:02:00 TimeMin=N/A
   StartTime=2026-12-01T20:06:38 EndTime=2026-12-01T20:08:38 Deadline=N/A
   NodeList=ci[0-1]
     Nodes=ci0 CPU_IDs=0 Mem=0 GRES=gpu:g0:1(IDX:0),shard:g1:7(IDX:1)
     Nodes=ci1 CPU_IDs=0 Mem=0 GRES=shard:40(IDX:0)
   TresPerNode=gres:shard:7
"""


def test_scontrol_detail_gives_each_nodes_shards_gpu_and_end() -> None:
    info = parse_job(DETAIL)
    assert (info.job_id, info.user, info.user_id, info.state) == ("5", "alice", 1006, "RUNNING")
    assert [(s.device, s.count) for s in info.shards["ci0"]] == [(1, 7)]
    assert [(s.device, s.count) for s in info.shards["ci1"]] == [(0, 40)]
    assert info.end_time is not None and info.end_time > 0
    unlimited = parse_job(DETAIL.replace("TimeLimit=00:02:00", "TimeLimit=UNLIMITED"))
    assert unlimited.end_time is None


def test_hostlists_expand() -> None:
    assert expand_hostlist("ci[0-1,3],gpu7") == ["ci0", "ci1", "ci3", "gpu7"]
    assert expand_hostlist("n[08-10]") == ["n08", "n09", "n10"]
    assert expand_hostlist("") == []


def test_reconciler_decisions() -> None:
    queue = parse_queue(
        "1|RUNNING|2026-12-01T20:08:38|ci[0-1]\n2|COMPLETED|2026-12-01T20:00:00|ci0\n"
        "3|PENDING|N/A|\n4|RUNNING|2026-12-01T20:08:38|ci1\n5|COMPLETING|N/A|ci0\n"
    )
    end = queue["1"].end_time
    assert end is not None
    records = [record(j, pid_id=f"p{j}") for j in ("1", "2", "3", "4", "5", "6")]
    actions = {a.partition_id: a for a in decide(records, queue, "ci0", 30.0)}
    assert actions["p1"].what == "move_end" and actions["p1"].new_end == end + 30.0
    assert {k: a.what for k, a in actions.items() if k != "p1"} == {
        "p2": "release", "p3": "release", "p4": "release", "p6": "release",
    }  # fmt: skip
    assert decide(records, {**queue, "1": QueueEntry("1", "RUNNING", 1e12 - 30, ("ci0",))},
                  "ci0", 30.0)[0].partition_id != "p1"  # fmt: skip


def test_gres_check_names_a_gpu_whose_shards_do_not_fit(tmp_path: Path) -> None:
    gres = tmp_path / "gres.conf"
    gres.write_text(
        "NodeName=n[1-2] Name=gpu File=/dev/nvidia0\n"
        "NodeName=n[1-2] Name=shard Count=80 File=/dev/nvidia0\n"
        "NodeName=n1 Name=shard Count=90 File=/dev/nvidia1  # too many\n"
    )
    config = parse_config({"slurm": {"enabled": True, "gres_conf": str(gres)}})
    devices = [Device(i, f"GPU-{i}", "g", "sim", 80 * GIB, "simulated") for i in range(2)]
    [problem] = check_gres(config, devices, "n1")
    assert "GPU 1 of n1 has 90 shards" in problem and "Count=80" in problem
    assert check_gres(config, devices, "n2") == []


def test_policy_table() -> None:
    s = parse_slurm({"enabled": True, "shard_bytes": "512MiB", "gpus": [0], "end_margin": "5m"})
    assert (s.enabled, s.shard_bytes, s.gpus, s.end_margin_s) == (True, 512 << 20, (0,), 300.0)
    assert parse_config({}).slurm.shard_bytes == GIB
    for bad in ({"shard_bytes": "0.5"}, {"enabled": "yes"}, {"gpus": [-1]}, {"nope": 1}):
        with pytest.raises(BadRequest, match="slurm"):
            parse_slurm(bad)
    assert job_of("slurm:42") == "42" and job_of("slurm:x") is None and job_of("cli") is None
    assert job_of("slurm:42.3") == "42" and run_of("slurm:42.3") == 3 and run_of("slurm:42") == 0
    assert job_of("slurm:42.0") is None and job_of("slurm:42.") is None


def test_chronos_slurm_check_says_which_gpu_does_not_fit(tmp_path: Path) -> None:
    import subprocess

    from chronos_testing import chronos_argv, clean_env

    gres = tmp_path / "gres.conf"
    gres.write_text(
        "Name=shard Count=79 File=/dev/nvidia0\nName=shard Count=81 File=/dev/nvidia1\n"
    )
    policy = tmp_path / "config.toml"
    policy.write_text(f'[slurm]\nenabled = true\ngres_conf = "{gres}"\nnode_name = "n1"\n')
    env = clean_env(
        CHRONOS_BACKEND="simulated", CHRONOS_CONFIG=str(policy), CHRONOS_HOME=str(tmp_path)
    )
    proc = subprocess.run(chronos_argv("slurm", "check"), env=env, capture_output=True, text=True)
    assert proc.returncode == 1
    assert proc.stderr.strip().splitlines() == [
        f"chronos: {gres}: GPU 1 of n1 has 81 shards of 1.0 GiB = 81.0 GiB, but only "
        "80.0 GiB reservable: set Count=80 there"
    ]
    gres.write_text("Name=shard Count=80 File=/dev/nvidia0\n")
    proc = subprocess.run(chronos_argv("slurm", "check"), env=env, capture_output=True, text=True)
    assert proc.returncode == 0 and "fit" in proc.stdout
