"""The Python API, in-process against the embedded ledger and simulated GPUs."""

from __future__ import annotations

import re
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime, timedelta
from pathlib import Path

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


def test_release_twice_is_harmless(client: Partitioner) -> None:
    p = client.create(device=0, memory=0.1, duration=60)
    p.release()
    p.release()  # a second release (or one after expiry) has nothing left to do
    assert p.state == RELEASED
    # Releasing by id is a command about that id: an ended one is still an error.
    with pytest.raises(PartitionEnded) as info:
        client.release(p.id)
    assert isinstance(info.value, ChronosError)
    assert p.id in str(info.value)


def test_release_after_expiry_is_harmless(client: Partitioner) -> None:
    p = client.create(device=0, memory=0.1, duration=1, persist=True)
    wait_until(lambda: p.state == "expired", 5)
    p.release()
    assert p.state == "expired"


def wait_until(predicate: Callable[[], bool], within: float) -> None:
    deadline = time.monotonic() + within
    while not predicate():
        assert time.monotonic() < deadline, "condition not met in time"
        time.sleep(0.05)


def test_timeout_is_a_timeout_error() -> None:
    from chronos import Timeout

    assert issubclass(Timeout, TimeoutError)
    assert issubclass(Timeout, ChronosError)
    err = Timeout("gave up waiting")
    assert str(err) == "gave up waiting"
    with pytest.raises(TimeoutError):
        raise err


ROOT = Path(__file__).resolve().parents[1]


def documented_surface(doc: str = "README.md") -> set[str]:
    """The names a document's exports list (README's "Use it from Python", docs/API.md)
    says the package exports."""
    text = (ROOT / doc).read_text()
    match = re.search(r"<!-- exports -->(.*?)<!-- /exports -->", text, re.S)
    assert match, f"{doc} has no exports list"
    return set(re.findall(r"`([A-Za-z_]+)`", match.group(1)))


def documented_members(cls: type) -> set[str]:
    """The members docs/API.md lists for ``cls`` (first column of its table)."""
    text = (ROOT / "docs" / "API.md").read_text()
    match = re.search(rf"<!-- members {cls.__name__} -->(.*?)<!-- /members -->", text, re.S)
    assert match, f"docs/API.md has no member table for {cls.__name__}"
    first_cells = re.findall(r"^\| (.*?) \|", match.group(1), re.M)
    return {name for cell in first_cells for name in re.findall(r"`([a-z_]+)[`(]", cell)}


def test_all_is_the_documented_surface() -> None:
    assert set(chronos.__all__) == documented_surface()
    assert set(chronos.__all__) == documented_surface("docs/API.md")
    assert len(chronos.__all__) == len(set(chronos.__all__))
    for name in chronos.__all__:
        assert getattr(chronos, name) is not None
    namespace: dict[str, object] = {}
    exec("from chronos import *", namespace)  # every listed name really imports
    assert set(chronos.__all__) <= set(namespace)
    with pytest.raises(AttributeError):
        _ = chronos.NoSuchThing  # type: ignore[attr-defined]


@pytest.mark.parametrize("cls", [Partitioner, Partition])
def test_public_members_are_the_documented_ones(cls: type) -> None:
    """Every public method and property is in docs/API.md, and nothing more is."""
    public = {name for name in vars(cls) if not name.startswith("_")}
    assert public == documented_members(cls)


def test_every_module_is_in_the_architecture_table() -> None:
    """The module table of docs/ARCHITECTURE.md names every module and package of chronos."""
    text = (ROOT / "docs" / "ARCHITECTURE.md").read_text()
    table = text.split("## Modules", 1)[1].split("\n## ", 1)[0]
    package = ROOT / "src" / "chronos"
    names = {p.name for p in package.glob("*.py") if p.name != "__init__.py"}
    names |= {f"{p.name}/" for p in package.iterdir() if p.is_dir() and p.name != "__pycache__"}
    assert {name for name in names if f"`{name}" not in table} == set()


def test_start_takes_datetime_text_or_epoch(client: Partitioner) -> None:
    now = time.time()
    in_two_hours = datetime.now() + timedelta(hours=2)  # naive: local time
    a = client.create(0, 0.1, 60, start=in_two_hours, persist=True)
    b = client.create(0, 0.1, 60, start="+2h", persist=True)
    c = client.create(0, 0.1, 60, start=now + 7200, persist=True)
    d = client.create(0, 0.1, 60, start=int(now) + 7200, persist=True)
    for p in (a, b, c, d):
        assert p.state == "booked"
        assert p.starts_at.timestamp() == pytest.approx(now + 7200, abs=2)
    nine = client.create(0, 0.1, 60, start="09:00", persist=True).starts_at
    assert (nine.hour, nine.minute) == (9, 0) and nine.timestamp() > now


@pytest.mark.parametrize(
    "start",
    [
        datetime.now() - timedelta(hours=1),
        "2020-01-01T09:00",
        time.time() - 3600,
    ],
    ids=["datetime", "text", "epoch"],  # the same on every xdist worker (not the clock's)
)
def test_start_in_the_past_is_refused(client: Partitioner, start: object) -> None:
    with pytest.raises(BadRequest, match="in the past"):
        client.create(0, 0.1, 60, start=start)  # type: ignore[arg-type]
    assert client.list() == []


@pytest.mark.parametrize("start", [True, [1], "whenever"])
def test_start_of_the_wrong_kind_is_refused(client: Partitioner, start: object) -> None:
    with pytest.raises(BadRequest):
        client.create(0, 0.1, 60, start=start)  # type: ignore[arg-type]
    assert client.list() == []


def test_timeout_takes_text(client: Partitioner) -> None:
    client.create(0, 1.0, 60, persist=True)
    began = time.monotonic()
    with pytest.raises(TimeoutError):
        client.create(0, 0.5, 60, wait=True, timeout="1s")
    assert 0.9 <= time.monotonic() - began < 10
    with pytest.raises(BadRequest):
        client.create(0, 0.5, 60, wait=True, timeout="soon")


def test_any_unique_id_prefix_works(client: Partitioner) -> None:
    made = [client.create(0, 0.01, 60, persist=True) for _ in range(12)]
    target = made[0]
    prefix = unique_prefix(target.id, [p.id for p in made])
    assert client.get(prefix).id == target.id
    client.get(prefix).extend(30)
    assert client.get(target.id).expires_at > target.expires_at
    client.release(prefix)
    assert client.get(target.id).state == RELEASED
    with pytest.raises(NotFound, match="no partition"):
        client.get("zzzz")
    shared = shared_prefix([p.id for p in made])
    if shared is not None:
        with pytest.raises(BadRequest, match="ambiguous id"):
            client.get(shared)


def unique_prefix(target: str, ids: list[str]) -> str:
    for n in range(1, len(target) + 1):
        if sum(i.startswith(target[:n]) for i in ids) == 1:
            return target[:n]
    raise AssertionError("no unique prefix")


def shared_prefix(ids: list[str]) -> str | None:
    """A one-character prefix that several of ``ids`` share (likely among 12 hex ids)."""
    firsts = [i[0] for i in ids]
    return next((c for c in firsts if firsts.count(c) > 1), None)


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
