"""The Python API, in-process against the embedded ledger and simulated GPUs."""

from __future__ import annotations

import subprocess
import sys
import time
from datetime import datetime, timedelta

import pytest
from helpers import SIM_GPU_BYTES

import chronos
from chronos import (
    AdmissionRefused,
    BadRequest,
    ChronosError,
    DeviceStats,
    NotFound,
    Partition,
    PartitionEnded,
    Partitioner,
)
from chronos.models import RELEASED


@pytest.fixture
def client(chronos_env: dict[str, str]) -> Partitioner:
    p = Partitioner()
    yield p
    p.close()


def test_context_manager_fields_and_release(client: Partitioner) -> None:
    assert client.mode == "embedded"
    before = datetime.now().astimezone()
    with Partitioner().create(device=0, memory=0.5, duration=3600) as p:
        assert isinstance(p, Partition)
        assert p.id and isinstance(p.id, str)
        assert p.device == 0
        assert p.memory_fraction == 0.5
        assert p.memory_bytes == SIM_GPU_BYTES // 2
        assert p.user  # running as some account
        assert p.state == "active"
        for stamp in (p.created_at, p.expires_at):
            assert isinstance(stamp, datetime)
            assert stamp.tzinfo is not None and stamp.utcoffset() is not None
        assert before - timedelta(seconds=1) <= p.created_at <= datetime.now().astimezone()
        assert (p.expires_at - p.created_at).total_seconds() == pytest.approx(3600)
        first = p.time_remaining
        assert isinstance(first, float)
        assert 3590 < first <= 3600
        time.sleep(0.02)
        assert p.time_remaining < first
        assert p.env["CHRONOS_PARTITION_ID"] == p.id
        assert p.env["CUDA_VISIBLE_DEVICES"] == "0"
        assert [q.id for q in client.list()] == [p.id]
        pid = p.id
    assert p.state == RELEASED
    assert p.time_remaining == 0
    assert client.list() == []
    assert [q.id for q in client.list(all=True)] == [pid]
    assert client.get(pid).state == RELEASED


def test_partition_that_expires_inside_the_block(client: Partitioner) -> None:
    with client.create(device=0, memory=0.25, duration=1, persist=True) as p:  # 1 s: the shortest
        time.sleep(1.15)
    assert p.state == "expired"
    assert p.time_remaining == 0
    assert client.list() == []
    # Its memory is free again: the whole GPU can be taken.
    client.create(device=0, memory=1.0, duration=10).release()


_EXPIRE_IN_BLOCK = """
import signal, time
from chronos import Partitioner
got = []
signal.signal(signal.SIGTERM, lambda signo, frame: got.append(signo))
with Partitioner().create(device=0, memory=0.5, duration=1) as p:  # 1 s: the shortest
    time.sleep(1.3)
print(p.state, p.time_remaining, "sigterm" if got else "no-sigterm", flush=True)
"""


def test_owned_partition_that_expires_inside_the_block(chronos_env: dict[str, str]) -> None:
    # An owner-bound partition's process is told about the expiry with SIGTERM (as the
    # daemon would do): run it in a child, with a handler, so the runner survives it.
    out = subprocess.run(
        [sys.executable, "-c", _EXPIRE_IN_BLOCK],
        env=chronos_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert out.returncode == 0, f"exit {out.returncode}: {out.stderr}"
    assert "Traceback" not in out.stderr
    state, remaining, _signalled = out.stdout.split()
    assert (state, float(remaining)) == ("expired", 0.0)
    with Partitioner() as client:
        assert client.list() == []


def test_block_exits_quietly_after_manual_release(client: Partitioner) -> None:
    with client.create(device=1, memory="10GiB", duration="1m") as p:
        p.release()
    assert p.state == RELEASED


def test_exception_in_block_still_releases(client: Partitioner) -> None:
    with pytest.raises(RuntimeError), client.create(device=0, memory=0.5, duration=60) as p:
        raise RuntimeError("boom")
    assert p.state == RELEASED


def test_release_twice_raises_partition_ended(client: Partitioner) -> None:
    p = client.create(device=0, memory=0.1, duration=60)
    p.release()
    with pytest.raises(PartitionEnded) as info:
        p.release()
    assert isinstance(info.value, ChronosError)
    assert p.id in str(info.value)
    with pytest.raises(PartitionEnded):
        client.release(p.id)


def test_list_and_stats_are_typed(client: Partitioner) -> None:
    a = client.create(device=0, memory=0.5, duration=60, persist=True)
    b = client.create(device=0, memory="8GiB", duration=60, persist=True)
    c = client.create(device=1, memory="25%", duration=60, persist=True)
    ended = client.create(device=1, memory=0.5, duration=60, persist=True)
    ended.release()
    listed = client.list()
    assert all(isinstance(p, Partition) for p in listed)
    assert {p.id for p in listed} == {a.id, b.id, c.id}
    stats = client.stats()
    assert len(stats) == 2
    assert all(isinstance(s, DeviceStats) for s in stats)
    by_index = {s.index: s for s in stats}
    assert by_index[0].committed_bytes == SIM_GPU_BYTES // 2 + 8 * 1024**3
    assert by_index[0].active_partitions == 2
    assert by_index[1].committed_bytes == SIM_GPU_BYTES // 4
    assert by_index[1].active_partitions == 1
    assert by_index[0].total_bytes == SIM_GPU_BYTES
    assert by_index[0].vendor == "simulated"


def test_error_classes(client: Partitioner) -> None:
    client.create(device=0, memory=0.75, duration=60, persist=True)
    with pytest.raises(AdmissionRefused, match="free"):
        client.create(device=0, memory=0.5, duration=60)
    for memory, duration, device in [
        (0, 60, 0),
        (1.5, 60, 0),
        ("abc", 60, 0),
        ("200GiB", 60, 0),
        (0.1, 0, 0),
        (0.1, "abc", 0),
        (0.1, 60, 7),
        (0.1, 60, -1),
    ]:
        with pytest.raises(BadRequest):
            client.create(device=device, memory=memory, duration=duration)
    with pytest.raises(NotFound):
        client.get("nope")
    with pytest.raises(NotFound):
        client.release("nope")
    assert issubclass(AdmissionRefused, ChronosError)
    assert issubclass(BadRequest, ChronosError)
    assert issubclass(NotFound, ChronosError)
    assert chronos.Partitioner is Partitioner


def test_non_persistent_partition_ends_with_its_owner(chronos_env: dict[str, str]) -> None:
    code = (
        "from chronos import Partitioner; p = Partitioner().create(device=0, memory=0.9, "
        "duration=3600); print(p.id)"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], env=chronos_env, capture_output=True, text=True, timeout=30
    )
    assert out.returncode == 0, out.stderr
    pid = out.stdout.strip()
    client = Partitioner()
    try:
        # The creating process is gone: its partition no longer blocks anyone.
        assert client.list() == []
        assert client.get(pid).state == RELEASED
        client.create(device=0, memory=0.9, duration=10).release()
    finally:
        client.close()
