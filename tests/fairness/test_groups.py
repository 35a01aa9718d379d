"""Groups (issue #13): partitions of several GPUs, admitted on all of them or none.

In process (a service over a private ledger, a fake clock) for the rules, real
processes on one ledger for the race, a real chronosd for the queue's timing. The
simulated machine has 8 GPUs of 80 GiB here.
"""

from __future__ import annotations

import json
import sqlite3
import subprocess
import sys
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import daemons
from helpers import (
    assert_one_line_error,
    cli_in_process,
    make_env,
    readline_within,
    run_cli,
    schema_3_ledger,
)
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronos.errors import BadRequest
from chronos.ledger import SCHEMA_VERSION, Ledger

from .support import GIB, T0, FairDaemon, Harness, caller, make_service, wait_for

GPUS = 8
EIGHT = ",".join(["80GiB"] * GPUS)
ALICE = caller("alice", 1000)
BOB = caller("bob", 1001)


@pytest.fixture(autouse=True)
def _eight_gpus(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("CHRONOS_SIMULATED_GPUS", EIGHT)
    monkeypatch.delenv("CHRONOS_SIMULATED_TOPOLOGY", raising=False)


@pytest.fixture
def h() -> Iterator[Harness]:
    harness = make_service()
    yield harness
    harness.close()


def committed(h: Harness) -> list[int]:
    stats = h.ok(ALICE, "stats", processes=False)
    return [d["committed_bytes"] // GIB for d in stats["devices"]]


def rows(h: Harness) -> tuple[list[Any], list[Any]]:
    db = h.ledger.connection
    return (
        db.execute("SELECT * FROM partitions").fetchall(),
        db.execute("SELECT * FROM group_shares").fetchall(),
    )


# ----------------------------------------------------------------------- admission


def test_a_group_is_admitted_on_every_gpu_or_on_none(h: Harness) -> None:
    h.ok(BOB, "create", device=1, memory=0.75, duration=600, persist=True)
    before = rows(h)
    error = h.error(ALICE, "create", devices=[0, 1], memory=0.5, duration=600, persist=True)
    assert error["message"].startswith("GPU 1 has 20.0 GiB free now, 40.0 GiB requested")
    assert rows(h) == before  # nothing written on GPU 0 either
    group = h.ok(ALICE, "create", devices=[2, 0], memory=0.5, duration=600, persist=True)
    assert group["device"] == 2 and [s["device"] for s in group["more_shares"]] == [0]
    assert committed(h) == [40, 60, 40, 0, 0, 0, 0, 0]
    listed = h.ok(ALICE, "list")
    assert [r["id"] for r in listed].count(group["id"]) == 1  # one id for the group


def test_memory_is_per_gpu_fractions_and_sizes_alike(h: Harness) -> None:
    half = h.ok(ALICE, "create", devices=[0, 1], memory=0.5, duration=60, persist=True)
    sized = h.ok(ALICE, "create", devices=[2, 3], memory="10GiB", duration=60, persist=True)
    assert [half["memory_bytes"], half["more_shares"][0]["memory_bytes"]] == [40 * GIB] * 2
    assert [sized["memory_bytes"], sized["more_shares"][0]["memory_bytes"]] == [10 * GIB] * 2


def test_release_frees_every_gpu_of_the_group(h: Harness) -> None:
    group = h.ok(ALICE, "create", devices=[0, 1, 2], memory=1.0, duration=60, persist=True)
    assert committed(h)[:3] == [80, 80, 80]
    h.ok(ALICE, "release", id=group["id"])
    assert committed(h)[:3] == [0, 0, 0]
    assert rows(h)[1] == []  # its room-check rows went with it
    h.ok(BOB, "create", device=2, memory=1.0, duration=60, persist=True)


def test_a_group_expires_whole(h: Harness) -> None:
    h.ok(ALICE, "create", devices=[0, 1], memory=1.0, duration=60, persist=True)
    h.clock.advance(61)
    assert committed(h)[:2] == [0, 0]
    h.ok(BOB, "create", devices=[1, 0], memory=1.0, duration=60, persist=True)


def test_gpus_n_places_the_group_and_records_why(h: Harness) -> None:
    h.ok(BOB, "create", device=5, memory=0.5, duration=600, persist=True)
    group = h.ok(ALICE, "create", gpus=2, memory=0.5, duration=600, persist=True)
    devices = [group["device"], *(s["device"] for s in group["more_shares"])]
    assert devices == [0, 5]  # best fit: GPU 5 is left full; then the lowest index
    (created,) = h.ledger.events(partition_id=group["id"], kinds=["created"])
    assert created.detail["devices"] == [0, 5]
    assert "best fit" in created.detail["placement"]
    assert [s["device"] for s in created.detail["shares"]] == [0, 5]


def test_auto_takes_the_best_fit_and_keeps_free_gpus_whole(h: Harness) -> None:
    h.ok(BOB, "create", device=3, memory=0.5, duration=600, persist=True)
    h.ok(BOB, "create", device=6, memory=0.25, duration=600, persist=True)
    auto = h.ok(ALICE, "create", device="auto", memory=0.25, duration=600, persist=True)
    assert auto["device"] == 3  # leaves 20 GiB; GPU 6 would leave 40; the others stay whole
    whole = h.ok(ALICE, "create", device="auto", memory=1.0, duration=600, persist=True)
    assert whole["device"] == 0


def test_linked_gpus_are_preferred_where_the_backend_tells(
    h: Harness, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setenv("CHRONOS_SIMULATED_TOPOLOGY", "0,1,2,3;4,5,6,7")
    h.ok(BOB, "create", device=0, memory=0.5, duration=600, persist=True)
    h.ok(BOB, "create", device=4, memory=0.5, duration=600, persist=True)
    group = h.ok(ALICE, "create", gpus=2, memory=0.5, duration=600, persist=True)
    assert [group["device"], group["more_shares"][0]["device"]] == [0, 1]  # not 0 and 4
    (created,) = h.ledger.events(partition_id=group["id"], kinds=["created"])
    assert "link level 0" in created.detail["placement"]


def test_no_placement_says_how_many_gpus_have_room(h: Harness) -> None:
    for gpu in range(7):
        h.ok(BOB, "create", device=gpu, memory=0.75, duration=600, persist=True)
    error = h.error(ALICE, "create", gpus=2, memory=0.5, duration=600, persist=True)
    assert error["message"] == "no 2 GPUs have 40.0 GiB free each now (1 have)"


@pytest.mark.parametrize(
    ("args", "message"),
    [
        ({"devices": [0, 0]}, "GPU 0 is named twice"),
        ({"gpus": 9}, "9 GPUs asked for: this machine has 8"),
        ({"devices": list(range(9))}, "9 GPUs asked for: this machine has 8"),
        ({"devices": [0, 8]}, "no GPU 8: this machine has 8 (valid: 0-7)"),
        ({"devices": [0], "gpus": 1}, "name the GPUs (devices) or ask for a number"),
        ({"device": "any"}, "device must be a GPU index or 'auto', not 'any'"),
        ({"devices": []}, "create: devices must list 1 to 64 GPUs"),
        ({"devices": ["0"]}, "create: devices must list GPU indices"),
        ({"gpus": 0}, "create: gpus is out of range"),
    ],
)
def test_bad_gpu_requests_are_one_clear_refusal(
    h: Harness, args: dict[str, Any], message: str
) -> None:
    before = rows(h)
    error = h.error(ALICE, "create", memory=0.5, duration=60, **args)
    assert error["code"] == BadRequest.code and error["message"].startswith(message)
    assert rows(h) == before


# --------------------------------------------------------- extension, quotas, queue


def test_a_group_extends_on_every_gpu_or_on_none(h: Harness) -> None:
    group = h.ok(ALICE, "create", devices=[0, 1], memory=0.5, duration=100, persist=True)
    h.ok(BOB, "create", device=1, memory=0.75, duration=100, start=T0 + 100, persist=True)
    error = h.error(ALICE, "extend", id=group["id"], duration=50)
    assert error["message"].startswith(f"cannot extend {group['id']}")
    assert h.ok(ALICE, "get", id=group["id"])["expires_at"] == group["expires_at"]
    other = h.ok(ALICE, "create", devices=[2, 3], memory=0.5, duration=100, persist=True)
    assert h.ok(ALICE, "extend", id=other["id"], duration=50)["expires_at"] == T0 + 150


def test_quotas_count_gpu_equivalents() -> None:
    h = make_service({"limits": {"default": {"max_total_share": 1.0}}})
    try:
        h.ok(ALICE, "create", devices=[0, 1], memory=0.5, duration=60, persist=True)
        error = h.error(ALICE, "create", device=2, memory=0.1, duration=60, persist=True)
        assert "max_total_share" in error["message"] and "holds 100.0%" in error["message"]
    finally:
        h.close()


def test_a_gang_ticket_reserves_every_gpu_and_small_requests_only_backfill(h: Harness) -> None:
    h.ok(BOB, "create", device=0, memory=1.0, duration=100, persist=True)
    h.ok(BOB, "create", device=1, memory=1.0, duration=200, persist=True)
    gang = h.ok(ALICE, "create", devices=[0, 1], memory=1.0, duration=300, wait=True)
    assert gang["state"] == "waiting" and gang["estimated_start"] == T0 + 200
    assert gang["waiting_for"]  # what ends by then, on either GPU
    h.clock.advance(100)  # GPU 0 is free now, but the gang needs GPU 1 too
    assert h.service.grant_waiting() == []
    # A short request fits before the gang's slot on GPU 0: it backfills...
    short = h.ok(BOB, "create", device=0, memory=1.0, duration=50, persist=True)
    # ...a long one would delay the gang: refused, and queued only behind it.
    error = h.error(BOB, "create", device=0, memory=1.0, duration=500, persist=True)
    assert "waiting request(s) ahead" in error["message"]
    h.ok(BOB, "release", id=short["id"])
    h.clock.advance(100)
    granted = h.service.grant_waiting()
    assert len(granted) == 1
    record = h.ok(ALICE, "get", id=granted[0])
    assert [record["device"], record["more_shares"][0]["device"]] == [0, 1]


def test_an_auto_request_that_waits_is_queued_where_it_starts_soonest(h: Harness) -> None:
    for gpu in range(GPUS):
        h.ok(BOB, "create", device=gpu, memory=1.0, duration=100 + 10 * (GPUS - gpu), persist=True)
    ticket = h.ok(ALICE, "create", gpus=2, memory=0.5, duration=60, wait=True)
    (entry,) = h.queue()
    assert ticket["state"] == "waiting" and sorted(entry["devices"]) == [6, 7]


def test_an_old_ledger_migrates_with_every_partition_a_one_share_group(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    schema_3_ledger(path)
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO partitions VALUES ('0abc1234', 0, 'SIM-0', 100, 25, 1000, 'alice', "
            f"{T0}, {T0}, {T0 + 3600}, 'active', NULL, NULL, NULL, NULL, 'cli', 5.0, NULL, "
            "'SIGUSR1')"
        )
    db.close()
    led = Ledger(path, clock=lambda: T0 + 1)
    try:
        (record,) = led.partitions()
        assert record.devices == (0,) and len(record.shares) == 1
        assert led.connection.execute("PRAGMA user_version").fetchone()[0] == SCHEMA_VERSION
        assert led.committed_bytes("SIM-0") == 25
    finally:
        led.close()


# ------------------------------------------------------------------ the property


ops = st.lists(
    st.one_of(
        st.tuples(
            st.just("create"),
            st.lists(st.integers(0, 3), min_size=1, max_size=3, unique=True),
            st.sampled_from([0.25, 0.5, 0.75, 1.0]),
            st.sampled_from([30, 60, 200]),
            st.sampled_from([None, 20.0, 100.0]),
            st.booleans(),
        ),
        st.tuples(st.just("auto"), st.integers(1, 3), st.sampled_from([0.25, 0.5, 1.0])),
        st.tuples(st.just("advance"), st.sampled_from([5.0, 25.0, 70.0])),
        st.tuples(st.just("release"), st.integers(0, 20)),
        st.tuples(st.just("extend"), st.integers(0, 20), st.sampled_from([10, 100])),
    ),
    max_size=25,
)


@settings(max_examples=60, deadline=None, suppress_health_check=list(HealthCheck))
@given(ops)
def test_no_gpu_is_ever_overcommitted_with_groups_bookings_and_the_queue(
    script: list[tuple[Any, ...]],
) -> None:
    h = make_service()
    try:
        made: list[str] = []
        for op in script:
            _apply(h, op, made)
            h.service.grant_waiting()
            _assert_within_capacity(h)
    finally:
        h.close()


def _apply(h: Harness, op: tuple[Any, ...], made: list[str]) -> None:
    who = ALICE if len(made) % 2 else BOB
    if op[0] == "create":
        _, devices, fraction, duration, ahead, wait = op
        start = None if ahead is None else h.clock() + ahead
        reply = h.call(
            who, "create", devices=devices, memory=fraction, duration=duration,
            start=start, wait=wait and start is None, persist=True,
        )  # fmt: skip
        if reply["ok"] and "id" in reply["result"]:
            made.append(reply["result"]["id"])
    elif op[0] == "auto":
        reply = h.call(who, "create", gpus=op[1], memory=op[2], duration=60, persist=True)
        if reply["ok"]:
            made.append(reply["result"]["id"])
    elif op[0] == "advance":
        h.clock.advance(op[1])
    elif made and op[0] == "release":
        h.call(ALICE, "release", id=made[op[1] % len(made)])
    elif made and op[0] == "extend":
        h.call(caller("root", 0, admin=True), "extend", id=made[op[1] % len(made)], duration=op[2])


def _assert_within_capacity(h: Harness) -> None:
    """At every moment any partition starts, no GPU holds more than its capacity."""
    records = h.ledger.open_at()
    moments = {h.clock()} | {r.starts_at for r in records if r.starts_at > h.clock()}
    for at in moments:
        held: dict[str, int] = {}
        for r in records:
            if r.starts_at <= at < r.expires_at:
                for share in r.shares:
                    held[share.device_uuid] = held.get(share.device_uuid, 0) + share.memory_bytes
        assert all(v <= 80 * GIB for v in held.values()), (at, held)


# ------------------------------------------------------------------------ the race


_WORKER = r"""
import json, os, sys, time
from chronos import AdmissionRefused, Partitioner
devices, go = json.loads(sys.argv[1]), sys.argv[2]
client = Partitioner()
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.0005)
try:
    if devices == "auto":
        p = client.create(gpus=3, memory=0.4, duration=3600, persist=True)
    else:
        p = client.create(devices=devices, memory=0.4, duration=3600, persist=True)
    out = ["granted", list(p.record.devices)]
except AdmissionRefused as exc:
    out = ["refused", str(exc)]
print(json.dumps(out), flush=True)
"""


def test_gang_admission_under_a_race_of_processes_never_overcommits(tmp_path: Path) -> None:
    env = make_env(tmp_path / "home", CHRONOS_SIMULATED_GPUS=EIGHT)
    go = tmp_path / "go"
    asks: list[Any] = [[i % 8, (i + 1) % 8, (i + 3) % 8] for i in range(12)] + ["auto"] * 6
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", _WORKER, json.dumps(a), str(go)],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )  # fmt: skip
        for a in asks
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            assert readline_within(p.stdout, 60).strip() == "ready"
        go.touch()
        outcomes = [json.loads(p.communicate(timeout=120)[0]) for p in procs]
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
    granted = [o[1] for o in outcomes if o[0] == "granted"]
    assert granted and len(granted) < len(asks)  # 18 asks of 3 × 40%: not all fit
    per_gpu = [sum(1 for g in granted if gpu in g) for gpu in range(GPUS)]
    assert max(per_gpu) <= 2  # two 40% shares fit on a GPU, three never
    ledger = Ledger(tmp_path / "home" / "ledger.db")
    try:
        stored = {r.id: r.devices for r in ledger.partitions()}
    finally:
        ledger.close()
    assert sorted(map(sorted, stored.values())) == sorted(map(sorted, granted))


# ---------------------------------------------------------------------- the daemon


@pytest.fixture
def eight_gpu_daemon() -> Iterator[Callable[[], FairDaemon]]:
    with daemons() as make:

        def start() -> FairDaemon:
            d: FairDaemon = make(factory=FairDaemon, start=False)
            d.env["CHRONOS_SIMULATED_GPUS"] = EIGHT
            d.daemon_env["CHRONOS_SIMULATED_GPUS"] = EIGHT
            d.start()
            return d

        yield start


def test_a_gang_at_the_head_is_granted_within_100ms_of_its_last_gpu_freeing(
    eight_gpu_daemon: Callable[[], FairDaemon],
) -> None:
    d = eight_gpu_daemon()
    first = _made(d.cli("create", "0", "1.0", "1h"))
    last = _made(d.cli("create", "1", "1.0", "1h"))
    waiter = d.popen("create", "0,1", "1.0", "1h", "--wait")
    try:
        wait_for(lambda: len(d.queue()) == 1 or None, 10, "the gang waiting")
        assert d.cli("release", first).returncode == 0
        # Small requests keep coming on the GPU that freed: none may take the gang's room.
        for _ in range(5):
            small = d.cli("create", "0", "0.25", "2h")
            assert small.returncode != 0 and "waiting request(s) ahead" in small.stderr
        assert d.queue()[0]["devices"] == [0, 1]
        assert d.cli("release", last).returncode == 0
        assert waiter.wait(10) == 0, waiter.err()
    finally:
        waiter.kill()
    gang = d.call("get", id=_id_in(waiter.out()))
    freed = d.call("get", id=last)
    delay_ms = (gang["created_at"] - freed["ended_at"]) * 1000
    print(f"\ngang grant latency: {delay_ms:.1f} ms after its last GPU freed")
    assert 0 <= delay_ms < 100
    assert [gang["device"], *(s["device"] for s in gang["more_shares"])] == [0, 1]


def _made(proc: Any) -> str:
    assert proc.returncode == 0, proc.stderr
    return _id_in(proc.stdout)


def _id_in(stdout: str) -> str:
    """The id in ``created partition ID: ...``."""
    return stdout.split()[2].rstrip(":")


# --------------------------------------------------------------------------- the CLI


def test_cli_forms_and_bad_input(tmp_path: Path) -> None:
    env = make_env(tmp_path / "home", CHRONOS_SIMULATED_GPUS=EIGHT)
    made = cli_in_process("create", "0,1", "0.5", "2h", env=env)
    assert made.returncode == 0 and "GPU 0,1, 40.0 GiB each" in made.stdout
    placed = cli_in_process("create", "--gpus", "2", "0.5", "2h", "--json", env=env)
    assert placed.returncode == 0 and json.loads(placed.stdout)["devices"] == [0, 1]
    auto = cli_in_process("create", "--device", "auto", "0.25", "1h", "--json", env=env)
    assert json.loads(auto.stdout)["devices"] == [2]
    assert cli_in_process("create", "3", "0.5", "3600", env=env).returncode == 0  # unchanged
    listed = cli_in_process("list", "--device", "1", "--format", "gpu", "--no-header", env=env)
    assert listed.stdout.split() == ["0,1", "0,1"]
    shown = json.loads(cli_in_process("list", "--json", env=env).stdout)
    assert shown[0]["shares"][1]["device"] == 1 and shown[0]["devices"] == [0, 1]
    for args, message in [
        (("0,x", "0.5", "1h"), "DEVICE must be a GPU index (0), several (0,1) or auto"),
        (("0,0", "0.5", "1h"), "GPU 0 is named twice"),
        (("--gpus", "9", "0.5", "1h"), "9 GPUs asked for: this machine has 8"),
        (("--gpus", "2", "1", "0.5", "1h"), "chronos create takes MEMORY DURATION (3 given)"),
        (("--gpus", "2", "--device", "1", "0.5", "1h"), "--gpus N chooses the GPUs"),
    ]:
        assert message in assert_one_line_error(cli_in_process("create", *args, env=env))
    run = cli_in_process("run", "--gpus", "2", "--device", "1", "--memory", "0.1",
                         "--duration", "1m", "--", "true", env=env)  # fmt: skip
    assert "--gpus N chooses the GPUs" in assert_one_line_error(run, 125)


def test_run_takes_gpus_and_auto(tmp_path: Path) -> None:
    env = make_env(tmp_path / "home", CHRONOS_SIMULATED_GPUS=EIGHT)
    for form in (("--gpus", "3"), ("--device", "auto"), ("--device", "4,5")):
        done = run_cli("run", *form, "--memory", "0.1", "--duration", "1m", "--", "true", env=env)
        assert done.returncode == 0, done.stderr
    ledger = Ledger(tmp_path / "home" / "ledger.db")
    try:
        ended = [r.devices for r in ledger.partitions(include_ended=True)]
    finally:
        ledger.close()
    assert ended == [(0, 1, 2), (0,), (4, 5)]


# ----------------------------------------------------------- dashboard and metrics


def test_the_dashboard_state_and_the_metrics_show_a_group_under_one_id(
    h: Harness, tmp_path: Path
) -> None:
    from chronos.dashboard.server import collect
    from chronos.metrics import read_state

    group = h.ok(ALICE, "create", devices=[1, 3], memory=0.5, duration=600, persist=True)
    metrics = read_state(h.service)
    series = [(p.id, p.gpu, p.reserved_bytes) for p in metrics.partitions]
    assert series == [(group["id"], 1, 40 * GIB), (group["id"], 3, 40 * GIB)]
    assert [g.stats.active_partitions for g in metrics.gpus][:4] == [0, 1, 0, 1]

    env = make_env(tmp_path / "home", CHRONOS_SIMULATED_GPUS=EIGHT)
    assert cli_in_process("create", "2,5", "0.25", "1h", env=env).returncode == 0
    from chronos import Partitioner

    with pytest.MonkeyPatch.context() as mp:
        for key, val in env.items():
            mp.setenv(key, val)
        with Partitioner() as client:
            (shown,) = collect(client).state["partitions"]
    assert shown["devices"] == [2, 5] and [s["device"] for s in shown["shares"]] == [2, 5]
