"""Groups and placement with real NVML (issue #13), on one NVIDIA GPU or more.

On the single H200: ``--device auto`` picks GPU 0 (the only one, or the best fit on an
empty machine: the lowest index), a one-GPU group (``create(devices=[0])``) is a normal
partition of one share, and the NVIDIA backend answers the link level between two GPUs
(0 for a GPU with itself; on several GPUs a level on NVML's scale, or "not available").

Run (on the GPU machine, from the repository root):
    CHRONOS_BACKEND=nvidia .venv/bin/pytest -m gpu -s tests/gpu/test_placement_real.py
"""

from __future__ import annotations

import json
from collections.abc import Iterator

import pytest
from gpu_support import chronos, nvml_ready, real_daemon

from chronos.devices.base import LINK_LEVELS

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(nvml_ready() is not None, reason=str(nvml_ready())),
]


@pytest.fixture(scope="module")
def daemon() -> Iterator[dict[str, str]]:
    with real_daemon() as env:
        yield env


def test_auto_picks_gpu_0_on_an_empty_machine(daemon: dict[str, str]) -> None:
    made = chronos(daemon, "create", "--device", "auto", "0.25", "2m", "--json")
    assert made.returncode == 0, made.stderr
    record = json.loads(made.stdout)
    try:
        assert record["devices"] == [0] and record["device"] == 0
        events = json.loads(chronos(daemon, "events", "--id", record["id"], "--json").stdout)
        created = next(e for e in events if e["kind"] == "created")
        assert "best fit" in created["detail"]["placement"]
        print(f"\n[groups-real] auto placed on GPU 0: {created['detail']['placement']}")
    finally:
        chronos(daemon, "release", record["id"])


def test_a_one_gpu_group_is_a_partition_of_one_share(daemon: dict[str, str]) -> None:
    import os

    from chronos import Partitioner

    os.environ.update({k: v for k, v in daemon.items() if k.startswith("CHRONOS_")})
    with Partitioner() as client:
        p = client.create(devices=[0], memory=0.25, duration=120, persist=True)
        try:
            assert p.record.devices == (0,) and len(p.record.shares) == 1
            assert p.record.more_shares == ()
            stats = json.loads(chronos(daemon, "stats", "--json").stdout)
            assert stats[0]["committed_bytes"] >= p.record.memory_bytes
        finally:
            p.release()


def test_the_nvidia_backend_tells_link_levels() -> None:
    from chronos.devices import open_machine

    machine = open_machine("nvidia")
    try:
        assert machine.link_level(0, 0) == 0
        levels = {
            (a, b): machine.link_level(a, b)
            for a in range(len(machine.devices))
            for b in range(a + 1, len(machine.devices))
        }
        assert all(level is None or level in LINK_LEVELS for level in levels.values())
        print(f"\n[groups-real] link levels: {levels or 'one GPU: none to compare'}")
    finally:
        machine.close()
