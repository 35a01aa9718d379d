"""A partition of several GPUs (a group): each GPU held to its own share.

Groups are not stored yet (the ``groups`` work), so these tests build two-share records
through the test seam ``helpers.group_of`` (a ``PartitionRecord`` whose ``shares`` lists
more GPUs), which is all the enforcement code reads.
"""

from __future__ import annotations

import dataclasses
import json
import os
import subprocess
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import PY
from helpers import group_of

from chronos import alloccap, procs
from chronos.api import Partition
from chronos.attribution import attribute_processes
from chronos.devices import open_machine
from chronos.devices.base import Device, visible_env_for
from chronos.devices.simulated import declare_process, simulated_uuid
from chronos.enforcement import MemoryWatch
from chronos.frameworks import STARTUP_DIR, limits_env, soft_limit_bytes
from chronos.models import ProcessUse, Share
from chronos.transport import Transport

from .support import GIB, MIB, SIM_GPU_BYTES, record
from .test_soft_caps import fakes as fakes  # noqa: F401 - fixtures are found by name
from .test_soft_caps import framework_log as framework_log  # noqa: F401
from .test_soft_caps import recorded

GROUP = group_of(record("g1", memory=10 * GIB), Share(1, "GPU-1", 4 * GIB, SIM_GPU_BYTES))


def use(pid: int, used: int, device: int, partition_id: str | None = "g1") -> ProcessUse:
    return ProcessUse(pid, device, used, "alice", "torchrun", partition_id)


# ---------------------------------------------------------------------- the hard cap
def test_each_gpu_is_held_to_its_own_share_not_the_groups_sum() -> None:
    """8 GiB of 10 on GPU 0 and 6 GiB of 4 on GPU 1: 14 of 14 in all, yet GPU 1 is over."""
    watch = MemoryWatch(grace_s=0.5)
    sample = [use(10, 8 * GIB, device=0), use(11, 6 * GIB, device=1)]
    assert watch.observe(0.0, [GROUP], sample) == []
    (violation,) = watch.observe(0.6, [GROUP], sample)
    assert (violation.partition_id, violation.device) == ("g1", 1)
    assert (violation.used_bytes, violation.allowed_bytes, violation.pids) == (
        6 * GIB,
        4 * GIB,
        (11,),
    )


def test_memory_under_one_gpus_share_does_not_offset_another_gpus_excess() -> None:
    watch = MemoryWatch(grace_s=0.0)
    sample = [use(10, 1 * GIB, device=0), use(10, 5 * GIB, device=1)]
    assert [v.device for v in watch.observe(0.0, [GROUP], sample)] == [1]


def test_a_group_over_on_both_gpus_is_one_violation_for_the_partition() -> None:
    """Stopping the partition ends every rank: one violation is enough."""
    watch = MemoryWatch(grace_s=0.0)
    sample = [use(10, 11 * GIB, device=0), use(11, 5 * GIB, device=1)]
    assert [v.partition_id for v in watch.observe(0.0, [GROUP], sample)] == ["g1"]
    assert watch.observe(0.1, [GROUP], sample) == []  # nor a second one for the other GPU


def test_memory_on_a_gpu_outside_the_group_is_unpartitioned() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="enforce")
    sample = [use(10, GIB, device=0), use(10, 2 * GIB, device=2)]
    (violation,) = watch.observe(0.0, [GROUP], sample)
    assert (violation.kind, violation.device, violation.pids) == ("unpartitioned", 2, (10,))


def test_usage_counts_every_gpu_of_the_group() -> None:
    watch = MemoryWatch(grace_s=10.0)
    sample = [use(10, 3 * GIB, device=0), use(11, 2 * GIB, device=1)]
    watch.observe(0.0, [GROUP], sample)
    watch.observe(2.0, [GROUP], sample)
    used = watch.finish("g1")
    assert used is not None
    assert (used.peak_bytes, used.byte_seconds) == (5 * GIB, 10.0 * GIB)


def test_a_gpu_back_under_its_share_starts_a_fresh_grace_on_that_gpu_only() -> None:
    watch = MemoryWatch(grace_s=0.5)
    over_both = [use(10, 11 * GIB, device=0), use(11, 5 * GIB, device=1)]
    over_zero = [use(10, 11 * GIB, device=0), use(11, GIB, device=1)]
    assert watch.observe(0.0, [GROUP], over_both) == []
    assert watch.observe(0.3, [GROUP], over_zero) == []  # GPU 1 forgiven, GPU 0 still over
    assert [v.device for v in watch.observe(0.6, [GROUP], over_zero)] == [0]


def test_memory_on_each_gpu_of_the_group_is_the_groups_and_elsewhere_unpartitioned(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHRONOS_HOME", str(tmp_path))
    monkeypatch.delenv("CHRONOS_SIMULATED_PROCESSES", raising=False)
    monkeypatch.setenv("CHRONOS_SIMULATED_GPUS", "80GiB,80GiB,80GiB")
    me = os.getpid()
    primary = dataclasses.replace(
        record("g2", memory=GIB, uid=os.getuid()),
        device_uuid=simulated_uuid(0),
        owner_pid=me,
        owner_start=procs.start_ticks(me),
    )
    group = group_of(primary, Share(1, simulated_uuid(1), GIB, SIM_GPU_BYTES))
    for device in (0, 1, 2):
        declare_process(me, device, (device + 1) * MIB)
    found = attribute_processes(open_machine("simulated"), [group], [])
    assert {p.device: p.partition_id for p in found if p.pid == me} == {0: "g2", 1: "g2", 2: None}


# ---------------------------------------------------------------- what a process sees
def nvidia(index: int) -> Device:
    uuid = f"GPU-{index}"
    return Device(
        index, uuid, "H200", "nvidia", 1, "nvml", visible_env={"CUDA_VISIBLE_DEVICES": uuid}
    )


def test_one_gpu_keeps_its_own_visible_env_unchanged() -> None:
    assert visible_env_for([nvidia(3)]) == {"CUDA_VISIBLE_DEVICES": "GPU-3"}


def test_a_group_sees_exactly_its_gpus_in_share_order() -> None:
    assert visible_env_for([nvidia(3), nvidia(1)]) == {"CUDA_VISIBLE_DEVICES": "GPU-3,GPU-1"}


def test_rocm_and_oneapi_groups_list_their_gpus_too() -> None:
    amd = [
        Device(
            i,
            f"amd{i}",
            "MI300",
            "amd",
            1,
            "amd",
            visible_env={"ROCR_VISIBLE_DEVICES": f"GPU-{i}abc", "HIP_VISIBLE_DEVICES": "0"},
        )
        for i in (2, 0)
    ]
    assert visible_env_for(amd) == {
        "ROCR_VISIBLE_DEVICES": "GPU-2abc,GPU-0abc",
        "HIP_VISIBLE_DEVICES": "0,1",  # counts within what ROCr left visible
    }
    intel = [
        Device(
            i,
            f"i{i}",
            "Max",
            "intel",
            1,
            "intel",
            visible_env={"ZE_AFFINITY_MASK": str(i), "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1"},
        )
        for i in (1, 2)
    ]
    assert visible_env_for(intel) == {
        "ZE_AFFINITY_MASK": "1,2",
        "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
    }


def test_limits_env_gives_each_gpu_its_cap_and_one_number_frameworks_the_smallest() -> None:
    shares = [(10 * GIB, SIM_GPU_BYTES), (4 * GIB, SIM_GPU_BYTES)]
    env = limits_env(10 * GIB, SIM_GPU_BYTES, base={}, shares=shares)
    soft0, soft1 = soft_limit_bytes(10 * GIB), soft_limit_bytes(4 * GIB)
    assert env["CHRONOS_SOFT_LIMITS"] == f"{soft0}:{SIM_GPU_BYTES},{soft1}:{SIM_GPU_BYTES}"
    assert env["CHRONOS_SOFT_LIMIT_BYTES"] == str(soft0)  # the primary, as before
    assert env["CUPY_GPU_MEMORY_LIMIT"] == str(soft1)
    assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) <= soft1 / SIM_GPU_BYTES
    capped = limits_env(10 * GIB, SIM_GPU_BYTES, base={}, capped=True, shares=shares)
    assert capped["CHRONOS_SOFT_LIMITS"] == f"{soft0}:{10 * GIB},{soft1}:{4 * GIB}"


def test_one_gpu_limits_env_is_as_before_plus_its_one_entry() -> None:
    one = limits_env(10 * GIB, SIM_GPU_BYTES, base={})
    listed = limits_env(10 * GIB, SIM_GPU_BYTES, base={}, shares=[(10 * GIB, SIM_GPU_BYTES)])
    assert one == listed
    assert one["CHRONOS_SOFT_LIMITS"] == f"{soft_limit_bytes(10 * GIB)}:{SIM_GPU_BYTES}"


def test_torch_and_tensorflow_cap_each_visible_gpu_to_its_share(
    fakes: Path,
    framework_log: Path,  # noqa: F811 - the fixtures imported above
) -> None:
    env = {
        **{k: v for k, v in os.environ.items() if not k.startswith("CHRONOS_")},
        **limits_env(
            10 * GIB, SIM_GPU_BYTES, base={}, shares=[(10 * GIB, 80 * GIB), (4 * GIB, 40 * GIB)]
        ),
        "FAKE_FRAMEWORK_LOG": str(framework_log),
        "FAKE_TORCH_DEVICES": "2",
        "FAKE_TF_GPUS": "2",
    }
    env["PYTHONPATH"] = os.pathsep.join([str(STARTUP_DIR), str(fakes)])
    code = "import torch, tensorflow; torch.cuda._run_lazy()"
    proc = subprocess.run([PY, "-c", code], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0 and "chronos:" not in proc.stderr, proc.stderr
    soft0, soft1 = soft_limit_bytes(10 * GIB), soft_limit_bytes(4 * GIB)
    got = recorded(framework_log)
    assert {"framework": "torch", "fraction": soft0 / (80 * GIB), "device": 0} in got
    assert {"framework": "torch", "fraction": soft1 / (40 * GIB), "device": 1} in got
    tf = [r["memory_limits"] for r in got if r["framework"] == "tensorflow"]
    assert tf == [[soft0 >> 20], [soft1 >> 20]]


class _Embedded(Transport):
    mode = "embedded"

    def exchange(self, message: dict[str, Any]) -> Any:
        raise AssertionError(f"no round trip expected: {message}")


def test_a_group_partitions_child_env_lists_its_gpus_caps_and_files(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHRONOS_HOME", str(tmp_path))
    monkeypatch.setenv(alloccap.ENV_SWITCH, "on")
    if alloccap.library_path() is None:
        pytest.skip("libchronos_cap.so was not built")
    assert alloccap.on_create(GROUP, "embedded") is not None
    partition = Partition(GROUP, _Embedded(), {"CUDA_VISIBLE_DEVICES": "0,1"})
    env = partition.limits_env()
    assert env["CUDA_VISIBLE_DEVICES"] == "0,1"
    assert len(env["CHRONOS_SOFT_LIMITS"].split(",")) == 2
    files = env[alloccap.ENV_FILE].split(":")
    assert [Path(f).name for f in files] == ["g1.cap", "g1.1.cap"]
    assert json.dumps(env)  # all strings


def test_a_stopped_groups_lingering_memory_counts_on_each_of_its_gpus() -> None:
    """Until its processes are gone, a stopped group still holds each GPU's share there."""
    from chronos.daemon.stopper import _share_on

    assert [_share_on(GROUP, uuid) for uuid in ("GPU-0", "GPU-1", "GPU-2")] == [
        10 * GIB,
        4 * GIB,
        0,
    ]


def test_the_service_shows_a_group_exactly_its_gpus_in_share_order(tmp_path: Path) -> None:
    from chronos.config import Config
    from chronos.ledger import Ledger
    from chronos.service import Service

    service = Service(
        Ledger(tmp_path / "ledger.db", durable=False),
        Config(),
        "embedded",
        machine_factory=lambda: open_machine("simulated"),
    )
    one = dataclasses.replace(record("g3", memory=GIB), device=1, device_uuid=simulated_uuid(1))
    group = group_of(one, Share(0, simulated_uuid(0), GIB, SIM_GPU_BYTES))
    assert service.visible_env(one) == {"CUDA_VISIBLE_DEVICES": "1"}  # as before
    assert service.visible_env(group) == {"CUDA_VISIBLE_DEVICES": "1,0"}
    gone = group_of(one, Share(5, "SIM-gone", GIB, SIM_GPU_BYTES))
    assert service.visible_env(gone) == {}  # a GPU no longer there: nothing half-right
