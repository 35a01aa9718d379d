"""Several real NVIDIA GPUs: told apart by UUID, memory attributed to the right one.

Skipped unless NVML sees at least two GPUs (``nvidia-h200-x2`` or larger).
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpu_support import chronos, nvml_ready, read_events, real_daemon, shared_tmpdir


def _gpu_count() -> int:
    if nvml_ready() is not None:
        return 0
    import pynvml

    pynvml.nvmlInit()
    return int(pynvml.nvmlDeviceGetCount())


pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(_gpu_count() < 2, reason="needs at least two NVIDIA GPUs"),
]
HOLD = (
    "import json, os, sys, time, torch\n"
    "x = torch.empty(3 * 2**30, dtype=torch.uint8, device='cuda:0'); torch.cuda.synchronize()\n"
    "open(sys.argv[1], 'a').write(json.dumps({'event': 'holding', 'pid': os.getpid()}) + '\\n')\n"
    "time.sleep(120)\n"
)


@pytest.fixture(scope="module")
def daemon() -> Iterator[dict[str, str]]:
    with real_daemon() as env:
        yield env


def stats(env: dict[str, str]) -> list[dict[str, object]]:
    return list(json.loads(chronos(env, "stats", "--json").stdout))


def wait_holding(out: Path, child: subprocess.Popen[bytes]) -> int:
    deadline = time.time() + 120
    while not read_events(out):
        assert child.poll() is None and time.time() < deadline
        time.sleep(0.1)
    return int(read_events(out)[0]["pid"])


def test_devices_are_told_apart_by_uuid(daemon: dict[str, str]) -> None:
    devices = stats(daemon)
    uuids = [d["uuid"] for d in devices]
    print(f"\n[multi-gpu] {len(devices)} GPUs: {uuids}")
    assert len(set(uuids)) == len(uuids) >= 2


@pytest.mark.parametrize("visible", ["partition", "1,0"])
def test_memory_on_gpu1_counts_for_the_partition_on_gpu1(
    daemon: dict[str, str], visible: str
) -> None:
    """Whatever CUDA_VISIBLE_DEVICES the process used, its memory lands on GPU 1."""
    out = shared_tmpdir() / "hold.jsonl"
    created = json.loads(chronos(daemon, "create", "1", "0.1", "600", "--json").stdout)
    env = {**daemon, "CHRONOS_PARTITION_ID": created["id"]}
    if visible == "partition":
        gpu1 = next(d for d in stats(daemon) if d["index"] == 1)
        env["CUDA_VISIBLE_DEVICES"] = str(gpu1["uuid"])
    else:
        env["CUDA_VISIBLE_DEVICES"] = visible  # cuda:0 is physical GPU 1
    child = subprocess.Popen([sys.executable, "-c", HOLD, str(out)], env=env)
    try:
        pid = wait_holding(out, child)
        time.sleep(0.3)
        seen = [(d["index"], p) for d in stats(daemon) for p in d["processes"] if p["pid"] == pid]
        print(
            f"\n[multi-gpu] CUDA_VISIBLE_DEVICES={env['CUDA_VISIBLE_DEVICES']}: "
            f"{[(i, p['partition_id'], p['used_bytes']) for i, p in seen]}"
        )
        assert [i for i, _ in seen] == [1]
        assert seen[0][1]["partition_id"] == created["id"]
    finally:
        child.kill()
        child.wait()
        chronos(daemon, "release", created["id"])
