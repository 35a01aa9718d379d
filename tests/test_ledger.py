"""The SQLite ledger, driven directly with a fake clock (no sleeping)."""

from __future__ import annotations

import dataclasses
import json
import os
import random
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import pytest
from helpers import GIB, FakeClock, sql_steps
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from chronos.errors import AdmissionRefused, NotFound, PartitionEnded
from chronos.ledger import SCHEMA_VERSION, Ledger, NewPartition, earliest_fit, peak_usage
from chronos.models import (
    ACTIVE,
    BOOKED,
    EXPIRED,
    RELEASED,
    STATES,
    Event,
    PartitionRecord,
)
from chronos.units import format_bytes, local_clock

CAP = 80 * GIB
DEV_A = "GPU-A"
DEV_B = "GPU-B"
T0 = 1_800_000_000.0


def req(
    nbytes: int,
    duration: float,
    *,
    uuid: str = DEV_A,
    device: int = 0,
    capacity: int = CAP,
    starts_at: float | None = None,
    owner_pid: int | None = None,
    user: str = "alice",
    uid: int = 1000,
) -> NewPartition:
    return NewPartition(
        device=device,
        device_uuid=uuid,
        device_total_bytes=CAP,
        capacity_bytes=capacity,
        memory_bytes=nbytes,
        uid=uid,
        user=user,
        duration_s=duration,
        starts_at=starts_at,
        owner_pid=owner_pid,
        owner_start=None,
    )


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest.fixture
def ledger(tmp_path: Path, clock: FakeClock) -> Ledger:
    led = Ledger(tmp_path / "ledger.db", clock=clock, owner_alive=lambda pid, ticks: True)
    yield led
    led.close()


def snapshot(led: Ledger) -> tuple[list[object], list[object]]:
    return led.partitions(include_ended=True), led.events()


# ------------------------------------------------------------ basic writes


def test_create_list_release(ledger: Ledger, clock: FakeClock) -> None:
    a = ledger.create(req(10 * GIB, 3600))
    b = ledger.create(req(20 * GIB, 60, uuid=DEV_B, device=1, user="bob", uid=1001))
    assert a.id != b.id
    assert a.state == ACTIVE and a.created_at == T0 and a.starts_at == T0
    assert a.expires_at == T0 + 3600
    assert a.memory_fraction == pytest.approx(10 / 80)
    assert [r.id for r in ledger.partitions()] == [a.id, b.id]
    assert ledger.get(b.id).user == "bob"
    assert ledger.committed_bytes(DEV_A) == 10 * GIB
    assert ledger.committed_bytes(DEV_B) == 20 * GIB

    clock.advance(5)
    done = ledger.release(a.id, 1000, "alice")
    assert done.state == RELEASED
    assert done.ended_at == T0 + 5
    assert [r.id for r in ledger.partitions()] == [b.id]
    assert {r.id for r in ledger.partitions(include_ended=True)} == {a.id, b.id}
    assert ledger.committed_bytes(DEV_A) == 0


def test_release_twice_and_unknown(ledger: Ledger) -> None:
    a = ledger.create(req(GIB, 60))
    ledger.release(a.id, 1000, "alice")
    before = snapshot(ledger)
    with pytest.raises(PartitionEnded, match="released"):
        ledger.release(a.id, 1000, "alice")
    with pytest.raises(NotFound):
        ledger.release("deadbeef", 1000, "alice")
    with pytest.raises(NotFound):
        ledger.get("deadbeef")
    assert snapshot(ledger) == before


def test_release_of_expired_partition_says_expired(ledger: Ledger, clock: FakeClock) -> None:
    a = ledger.create(req(GIB, 60))
    clock.advance(61)
    before = ledger.events()
    with pytest.raises(PartitionEnded, match="expired"):
        ledger.release(a.id, 1000, "alice")
    assert ledger.get(a.id).state_at(clock.now) == EXPIRED
    assert [e.kind for e in ledger.events()] == [e.kind for e in before]  # no 'released'
    ledger.reap()
    assert ledger.get(a.id).state == EXPIRED
    assert ledger.get(a.id).ended_at == a.expires_at


# --------------------------------------------------------------- admission


def test_admission_refuses_over_commit(ledger: Ledger, clock: FakeClock) -> None:
    first = ledger.create(req(50 * GIB, 3600))
    clock.advance(10)
    with pytest.raises(AdmissionRefused) as info:
        ledger.create(req(40 * GIB, 600))
    message = str(info.value)
    assert format_bytes(30 * GIB) in message  # what is free now
    assert format_bytes(40 * GIB) in message  # what was asked
    assert local_clock(first.expires_at) in message  # when it fits
    # The other device is unaffected, and exactly the free amount still fits.
    ledger.create(req(40 * GIB, 600, uuid=DEV_B, device=1))
    ledger.create(req(30 * GIB, 600))
    assert ledger.committed_bytes(DEV_A) == CAP


def test_refusal_names_earliest_fit_not_first_expiry(ledger: Ledger, clock: FakeClock) -> None:
    ledger.create(req(30 * GIB, 100))
    late = ledger.create(req(40 * GIB, 500))
    with pytest.raises(AdmissionRefused) as info:
        ledger.create(req(45 * GIB, 60))
    # At +100 only 40 GiB free again (not enough); at +500 everything is free.
    assert local_clock(late.expires_at) in str(info.value)
    assert format_bytes(10 * GIB) in str(info.value)


def test_refusal_respects_reservable_capacity(ledger: Ledger) -> None:
    with pytest.raises(AdmissionRefused, match=format_bytes(60 * GIB)):
        ledger.create(req(70 * GIB, 60, capacity=60 * GIB))
    ledger.create(req(60 * GIB, 60, capacity=60 * GIB))
    with pytest.raises(AdmissionRefused):
        ledger.create(req(1, 60, capacity=60 * GIB))


# ------------------------------------------------------------------ expiry


def test_expiry_is_exact(ledger: Ledger, clock: FakeClock) -> None:
    a = ledger.create(req(CAP, 100))
    clock.now = a.expires_at - 1e-6
    assert [r.id for r in ledger.open_at()] == [a.id]
    assert ledger.committed_bytes(DEV_A) == CAP
    assert ledger.get(a.id).state_at(clock.now) == ACTIVE
    with pytest.raises(AdmissionRefused):
        ledger.create(req(1, 1))

    clock.now = a.expires_at
    assert ledger.open_at() == []
    assert ledger.committed_bytes(DEV_A) == 0
    assert ledger.get(a.id).state_at(clock.now) == EXPIRED
    assert ledger.get(a.id).time_remaining_at(clock.now) == 0
    # A full-GPU partition right at the expiry instant is admitted.
    b = ledger.create(req(CAP, 100))
    assert b.starts_at == a.expires_at
    assert [r.id for r in ledger.partitions()] == [b.id]


def test_reaping_records_the_real_expiry_time(ledger: Ledger, clock: FakeClock) -> None:
    a = ledger.create(req(GIB, 10))
    b = ledger.create(req(GIB, 20))
    c = ledger.create(req(GIB, 1000))
    clock.advance(500)  # reaped long after both expiries
    ended = ledger.reap()
    assert {e.record.id for e in ended} == {a.id, b.id}
    assert all(e.reason == "expired" for e in ended)
    for rec in (a, b):
        stored = ledger.get(rec.id)
        assert stored.state == EXPIRED
        assert stored.ended_at == rec.expires_at
        (event,) = [e for e in ledger.events(partition_id=rec.id) if e.kind == "expired"]
        assert event.at == rec.expires_at
        assert event.user == "alice"
    assert ledger.get(c.id).state == ACTIVE
    assert ledger.reap() == []  # nothing left to do, and nothing logged twice
    assert len([e for e in ledger.events() if e.kind == "expired"]) == 2


def test_owner_death_releases_owner_bound_partitions(tmp_path: Path, clock: FakeClock) -> None:
    alive = {111: True, 222: True}
    led = Ledger(
        tmp_path / "ledger.db", clock=clock, owner_alive=lambda pid, ticks: alive.get(pid, False)
    )
    try:
        bound = led.create(req(40 * GIB, 3600, owner_pid=111))
        other = led.create(req(30 * GIB, 3600, owner_pid=222))
        free = led.create(req(10 * GIB, 3600))
        with pytest.raises(AdmissionRefused):
            led.create(req(10 * GIB, 60))
        clock.advance(3)
        alive[111] = False
        # Admission itself notices the dead owner and frees its memory.
        new = led.create(req(30 * GIB, 60))
        assert new.state == ACTIVE
        gone = led.get(bound.id)
        assert gone.state == RELEASED
        assert gone.ended_at == clock.now
        assert "111" in (gone.end_reason or "")
        assert led.get(other.id).state == ACTIVE
        assert led.get(free.id).state == ACTIVE
        (event,) = [e for e in led.events(partition_id=bound.id) if e.kind == RELEASED]
        assert "owner" in event.detail["reason"]
        alive[222] = False
        ended = led.reap()
        assert [e.record.id for e in ended] == [other.id]
    finally:
        led.close()


def test_event_history(ledger: Ledger, clock: FakeClock) -> None:
    a = ledger.create(req(60 * GIB, 100))
    clock.advance(1)
    with pytest.raises(AdmissionRefused):
        ledger.create(req(30 * GIB, 100, user="bob", uid=1001))
    clock.advance(1)
    ledger.release(a.id, 0, "root")
    b = ledger.create(req(30 * GIB, 10, user="bob", uid=1001))
    clock.advance(20)
    ledger.reap()
    events = ledger.events()
    assert [e.kind for e in events] == ["created", "refused", "released", "created", "expired"]
    assert [e.seq for e in events] == sorted(e.seq for e in events)
    created, refused, released, created_b, expired = events
    assert created.partition_id == a.id and created.user == "alice" and created.at == T0
    assert created.memory_bytes == 60 * GIB
    assert refused.partition_id is None and refused.user == "bob" and refused.uid == 1001
    assert "free" in refused.detail["reason"]
    assert refused.memory_bytes == 30 * GIB
    assert released.user == "root" and released.detail["reason"] == "released"
    assert released.detail["owner_uid"] == 1000
    assert created_b.partition_id == b.id
    assert expired.partition_id == b.id and expired.detail["reason"] == "expired"
    assert expired.at == b.expires_at
    assert ledger.events(since=T0 + 1.5) == [released, created_b, expired]
    assert ledger.events(partition_id=a.id) == [created, released]
    json.dumps([e.to_json() for e in events])


# ------------------------------------------------------------ future bookings


def test_booking_counts_only_in_its_window(ledger: Ledger, clock: FakeClock) -> None:
    booking = ledger.create(req(60 * GIB, 100, starts_at=T0 + 1000))
    assert booking.state == BOOKED
    assert ledger.committed_bytes(DEV_A) == 0
    # Before the booking starts the whole GPU is free ...
    ledger.create(req(CAP, 1000))
    # ... but nothing more may overlap the booked window.
    with pytest.raises(AdmissionRefused):
        ledger.create(req(30 * GIB, 1001))
    ledger.create(req(20 * GIB, 100, starts_at=T0 + 1000))
    with pytest.raises(AdmissionRefused):
        ledger.create(req(1, 10, starts_at=T0 + 1050))
    clock.now = T0 + 1000
    assert ledger.reap() != []  # the full-GPU one expired
    assert ledger.get(booking.id).state == ACTIVE
    # Becoming active is a state change, and is in the history at the booked start.
    started = [e for e in ledger.events(partition_id=booking.id) if e.kind == "started"]
    assert [e.at for e in started] == [T0 + 1000]
    assert ledger.committed_bytes(DEV_A) == CAP
    clock.now = T0 + 1100
    assert ledger.committed_bytes(DEV_A) == 0
    ledger.create(req(CAP, 10))


# ------------------------------------------------- peak_usage / earliest_fit


def iv(start: float, end: float, nbytes: int, pid: str = "x") -> tuple[float, float, int, str]:
    return (start, end, nbytes, pid)


def test_peak_usage_adjacent_intervals_do_not_overlap() -> None:
    intervals = [iv(0, 10, 5), iv(10, 20, 7), iv(20, 30, 3)]
    assert peak_usage(intervals, 0, 30) == 7
    assert peak_usage(intervals, 0, 10) == 5
    assert peak_usage(intervals, 10, 20) == 7
    assert peak_usage(intervals, 20, 25) == 3
    assert peak_usage(intervals, 30, 40) == 0
    assert peak_usage([], 0, 1) == 0


def test_peak_usage_overlaps_and_future_bookings() -> None:
    intervals = [iv(0, 100, 5), iv(50, 60, 10), iv(55, 70, 1)]
    assert peak_usage(intervals, 0, 50) == 5
    assert peak_usage(intervals, 0, 51) == 15
    assert peak_usage(intervals, 56, 57) == 16
    assert peak_usage(intervals, 60, 100) == 6
    assert peak_usage(intervals, 70, 100) == 5
    # A booking far in the future counts only inside its window.
    assert peak_usage([iv(1000, 2000, 9)], 0, 1000) == 0
    assert peak_usage([iv(1000, 2000, 9)], 0, 1000.001) == 9


def test_earliest_fit() -> None:
    intervals = [iv(0, 100, 6), iv(0, 50, 3), iv(200, 300, 8)]
    assert earliest_fit(intervals, 1, 10, 0, 10) == 0
    assert earliest_fit(intervals, 2, 10, 0, 10) == 50
    assert earliest_fit(intervals, 5, 10, 0, 10) == 100
    # Fits between 100 and 200 only if short enough; else after the booking.
    assert earliest_fit(intervals, 5, 100, 0, 10) == 100
    assert earliest_fit(intervals, 5, 101, 0, 10) == 300
    assert earliest_fit(intervals, 11, 1, 0, 10) is None
    assert earliest_fit([], 10, 1, 42, 10) == 42


# ------------------------------------------------------- property: no over-commit

SMALL_CAP = 100

op_create = st.tuples(
    st.just("create"),
    st.sampled_from([0, 0, 0, 1]),  # device
    st.sampled_from([10, 20, 30, 45, 60, 100, 101]),  # bytes (may exceed capacity)
    st.sampled_from([1.0, 2.0, 5.0, 10.0, 0.5, 7.25]),  # duration
    st.sampled_from([None, 0.0, 1.0, 3.0, 5.0, 12.5]),  # start offset
)
op_release = st.tuples(st.just("release"), st.integers(0, 50))
op_advance = st.tuples(st.just("advance"), st.sampled_from([0.0, 0.5, 1.0, 2.5, 5.0, 1e-6]))
ops = st.lists(st.one_of(op_create, op_release, op_advance), max_size=40)


def open_interval(rec: object) -> tuple[float, float]:
    """When a partition really held its memory: start to end (or release)."""
    start, end = rec.starts_at, rec.expires_at  # type: ignore[attr-defined]
    if rec.state == RELEASED:  # type: ignore[attr-defined]
        end = min(end, rec.ended_at)  # type: ignore[attr-defined]
    return start, end


def check_history(records: list[PartitionRecord], events: list[Event]) -> None:
    """Every partition's events tell its story: created, [started], [ended]."""
    by_id: dict[str, list[str]] = {}
    for e in events:
        if e.partition_id is not None:
            by_id.setdefault(e.partition_id, []).append(e.kind)
    for r in records:
        kinds = by_id.get(r.id, [])
        booking = r.starts_at > r.created_at
        began = r.state == ACTIVE or (r.state in (RELEASED, EXPIRED) and r.ended_at >= r.starts_at)
        expected = ["created"]
        if booking and began:
            expected.append("started")
        if r.state in (RELEASED, EXPIRED):
            expected.append(r.state)
        assert kinds == expected, f"{r.id} ({r.state}): {kinds}"


@settings(
    max_examples=100,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow],
)
@given(ops)
def test_no_overcommit_property(sequence: list[tuple[object, ...]]) -> None:
    clock = FakeClock()
    with tempfile.TemporaryDirectory() as tmp:
        led = Ledger(Path(tmp) / "l.db", clock=clock, owner_alive=lambda pid, ticks: True)
        created: list[str] = []
        try:
            for op in sequence:
                if op[0] == "create":
                    _, dev, nbytes, duration, offset = op
                    start = None if offset is None else clock.now + offset
                    try:
                        rec = led.create(
                            req(
                                nbytes,
                                duration,
                                uuid=f"D{dev}",
                                device=dev,
                                capacity=SMALL_CAP,
                                starts_at=start,
                            )
                        )
                    except AdmissionRefused:
                        continue
                    assert nbytes <= SMALL_CAP
                    created.append(rec.id)
                elif op[0] == "release":
                    if created:
                        pid = created[op[1] % len(created)]
                        try:
                            led.release(pid, 1000, "alice")
                        except PartitionEnded:
                            pass
                else:
                    clock.advance(op[1])
            led.reap()
            records = led.partitions(include_ended=True)
            events = led.events()
        finally:
            led.close()
    check_history(records, events)
    for dev in ("D0", "D1"):
        spans = [(open_interval(r), r.memory_bytes) for r in records if r.device_uuid == dev]
        boundaries = {t for (s, e), _ in spans for t in (s, e)}
        for t in boundaries:
            held = sum(b for (s, e), b in spans if s <= t < e)
            assert held <= SMALL_CAP, f"{dev} holds {held} > {SMALL_CAP} at t={t - T0}"


# --------------------------------------------------- bad requests change nothing


def test_refusals_and_errors_leave_partitions_alone(ledger: Ledger, clock: FakeClock) -> None:
    a = ledger.create(req(70 * GIB, 100))
    ledger.release(ledger.create(req(5 * GIB, 100)).id, 1000, "alice")
    before_list, before_events = snapshot(ledger)
    for bad in (
        lambda: ledger.release("nope", 1000, "alice"),
        lambda: ledger.release(before_list[1].id, 1000, "alice"),
        lambda: ledger.get("nope"),
        lambda: ledger.attach("nope", os.getpid(), None, 0, 0),
        lambda: ledger.extend_expiry("nope", T0 + 1e6, CAP, 0, "root"),
    ):
        with pytest.raises((NotFound, PartitionEnded)):
            bad()
        assert snapshot(ledger) == (before_list, before_events)
    # A refusal appends exactly one 'refused' event and changes no partition.
    with pytest.raises(AdmissionRefused):
        ledger.create(req(20 * GIB, 10))
    after_list, after_events = snapshot(ledger)
    assert after_list == before_list
    assert after_events[:-1] == before_events
    assert after_events[-1].kind == "refused"
    assert ledger.get(a.id).state == ACTIVE


# ---------------------------------------------------------- crash consistency

_WORKER = r"""
import random, sys, time
from chronos.errors import AdmissionRefused, ChronosError
from chronos.ledger import Ledger, NewPartition
led = Ledger(sys.argv[1])
mine = []
rng = random.Random()
print("ready", flush=True)
while True:
    if mine and rng.random() < 0.45:
        try:
            led.release(mine.pop(rng.randrange(len(mine))), 0, "root")
        except ChronosError:
            pass
        continue
    req = NewPartition(device=0, device_uuid="GPU-A", device_total_bytes=100,
                       capacity_bytes=100, memory_bytes=rng.randint(1, 30), uid=0,
                       user="root", duration_s=rng.choice([0.01, 0.05, 5.0, 60.0]))
    try:
        mine.append(led.create(req).id)
    except AdmissionRefused:
        pass
"""


def check_consistent(path: Path) -> None:
    db = sqlite3.connect(path)
    try:
        assert db.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
        rows = db.execute(
            "SELECT id, state, memory_bytes, starts_at, expires_at, ended_at FROM partitions"
        ).fetchall()
        events: dict[str, list[str]] = {}
        for pid, kind in db.execute(
            "SELECT partition_id, kind FROM events WHERE partition_id IS NOT NULL ORDER BY seq"
        ):
            events.setdefault(pid, []).append(kind)
    finally:
        db.close()
    for pid, state, _nbytes, _start, _end, ended_at in rows:
        assert state in STATES
        kinds = events.get(pid, [])
        assert kinds[:1] == ["created"], f"{pid}: events {kinds}"
        if state in (RELEASED, EXPIRED):
            assert kinds[1:] == [state], f"{pid} is {state} but events say {kinds}"
            assert ended_at is not None
        else:
            assert kinds == ["created"], f"{pid} is {state} but events say {kinds}"
            assert ended_at is None
    assert set(events) <= {r[0] for r in rows}, "event for a partition that was never stored"
    # Never over-committed at any stored instant.
    spans = []
    for _pid, state, nbytes, start, end, ended_at in rows:
        if state == RELEASED:
            end = min(end, ended_at)
        spans.append((start, end, nbytes))
    for t in {s for s, _, _ in spans}:
        assert sum(b for s, e, b in spans if s <= t < e) <= 100


def test_crash_consistency_under_sigkill(tmp_path: Path) -> None:
    path = tmp_path / "ledger.db"
    rng = random.Random(1234)
    for _round in range(6):
        workers = [
            subprocess.Popen(
                [sys.executable, "-c", _WORKER, str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(2)
        ]
        try:
            for w in workers:
                assert w.stdout is not None
                assert w.stdout.readline().strip() == "ready", w.stderr.read()  # type: ignore[union-attr]
            time.sleep(rng.uniform(0.05, 0.4))
            for w in workers:
                w.send_signal(signal.SIGKILL)
        finally:
            for w in workers:
                if w.poll() is None:
                    w.kill()
                w.wait(timeout=10)
                w.stdout.close()  # type: ignore[union-attr]
                w.stderr.close()  # type: ignore[union-attr]
        for w in workers:
            assert w.returncode == -signal.SIGKILL, "worker died on its own"
        check_consistent(path)
    # The ledger still works after the crashes: reaping and admission go on.
    clock_now = time.time() + 10_000
    led = Ledger(path, clock=lambda: clock_now, owner_alive=lambda pid, ticks: True)
    try:
        led.reap()
        assert led.open_at() == []
        full = NewPartition(
            device=0,
            device_uuid="GPU-A",
            device_total_bytes=100,
            capacity_bytes=100,
            memory_bytes=100,
            uid=0,
            user="root",
            duration_s=1.0,
        )
        led.create(full)
        counts = {k: 0 for k in ("created", "released", "expired")}
        for e in led.events():
            if e.kind in counts:
                counts[e.kind] += 1
        assert counts["created"] > 6, counts  # the workers really did work
    finally:
        led.close()
    check_consistent(path)


def test_many_processes_can_create_the_same_new_ledger_at_once(tmp_path: Path) -> None:
    """The first use on a machine may come from several users at the same instant."""
    path = tmp_path / "ledger.db"
    code = (
        "import sys; from chronos.ledger import Ledger; "
        "Ledger(sys.argv[1]).partitions(); print('ok')"
    )
    for _ in range(3):
        path.unlink(missing_ok=True)
        procs = [
            subprocess.Popen(
                [sys.executable, "-c", code, str(path)],
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                text=True,
            )
            for _ in range(8)
        ]
        results = [p.communicate(timeout=60) for p in procs]
        assert [out.strip() for out, _ in results] == ["ok"] * 8, [e for _, e in results]


# ------------------------------------------------- structure (issue #12): causes, names


def test_refused_events_store_their_cause_as_data(ledger: Ledger) -> None:
    """The refusal metric reads the stored cause, so rewording a refusal changes no label."""
    from chronos.metrics import refusal_reason
    from chronos.refusals import OverLimit, refusal
    from chronos.vocabulary import RefusalCause, RefusalKind

    def over_share(mine: object, start: float, end: float, now: float) -> None:
        raise refusal(OverLimit("max_share", "90.0% of a GPU asked, at most 50.0% per partition"))

    with pytest.raises(AdmissionRefused) as quota:
        ledger.create(req(10 * GIB, 60), check=over_share)
    assert quota.value.cause == RefusalCause.quota("max_share")
    assert str(quota.value) == (
        "over the max_share limit: 90.0% of a GPU asked, at most 50.0% per partition"
    )
    ledger.create(req(CAP, 60))
    with pytest.raises(AdmissionRefused) as capacity:
        ledger.create(req(GIB, 60))
    assert capacity.value.cause == RefusalCause.capacity()
    quota_event, capacity_event = [e for e in ledger.events() if e.kind == "refused"]
    assert quota_event.detail["cause"] == "quota"
    assert quota_event.detail["limit"] == "max_share"
    assert capacity_event.detail["cause"] == "capacity"
    assert "limit" not in capacity_event.detail
    # A reworded sentence keeps its label: the cause decides, not the text.
    assert refusal_reason({"reason": "policy says no", "cause": RefusalKind.QUOTA}) == "quota"
    assert refusal_reason({"reason": "over the top", "cause": "capacity"}) == "capacity"


def test_too_many_waiting_is_a_quota_refusal_with_its_limit(ledger: Ledger) -> None:
    from chronos.vocabulary import RefusalCause

    ledger.create(req(CAP, 3600))
    ledger.enqueue(req(GIB, 60), None, None, max_waiting=1)
    with pytest.raises(AdmissionRefused, match="over the max_waiting limit") as info:
        ledger.enqueue(req(GIB, 60), None, None, max_waiting=1)
    assert info.value.cause == RefusalCause.quota("max_waiting")
    refused = [e for e in ledger.events() if e.kind == "refused"]
    assert [e.detail["limit"] for e in refused] == ["max_waiting"]


def test_extension_refusal_names_what_is_in_the_way_by_kind(
    ledger: Ledger, clock: FakeClock
) -> None:
    """Queued requests are told apart from partitions and bookings by where they come from
    (the queue's reservations), not by the spelling of their ids."""
    short = ledger.create(req(40 * GIB, 100))
    long = ledger.create(req(40 * GIB, 1000, user="bob", uid=1001))
    ticket = ledger.enqueue(req(40 * GIB, 100, user="carol", uid=1002), None, None)
    booking = ledger.create(req(40 * GIB, 10, starts_at=T0 + 250, user="dan", uid=1003))
    with pytest.raises(AdmissionRefused) as info:
        ledger.extend_expiry(short.id, T0 + 300, CAP, 1000, "alice")
    assert str(info.value).endswith(
        f"in the way: partition {long.id}, queued request {ticket.id}, booking {booking.id})"
    )
    assert ledger.get(short.id).expires_at == short.expires_at  # unchanged


def test_rows_become_records_by_column_name(ledger: Ledger) -> None:
    """A query's column order does not matter, and a missing column is an error, never a
    field silently shifted by one."""
    from chronos.ledger.records import PARTITIONS

    a = ledger.create(req(10 * GIB, 60))
    backwards = ", ".join(reversed(PARTITIONS.names))
    rows = ledger.connection.execute(f"SELECT {backwards} FROM partitions")
    assert PARTITIONS.all(rows) == [a]
    short = ", ".join(PARTITIONS.names[:-1])
    with pytest.raises(LookupError, match=PARTITIONS.names[-1]):
        PARTITIONS.all(ledger.connection.execute(f"SELECT {short} FROM partitions"))


def test_a_ledger_written_by_the_schema_as_stored_opens(tmp_path: Path) -> None:
    """The split changed no table: a file with rows written by plain SQL in the stored
    column order (as every earlier Chronos wrote them) reads back field by field; and
    schema 4 (groups) migrates it, the partition a one-share group."""
    from helpers import schema_3_ledger

    path = tmp_path / "ledger.db"
    schema_3_ledger(path)  # the schema, as any version of schema 3 made it
    with sqlite3.connect(path) as db:
        db.execute(
            "INSERT INTO partitions VALUES ('0abc1234', 1, 'GPU-B', 100, 25, 1000, 'alice', "
            "1.0, 2.0, 3.0, 'released', 2.5, 'released', 4242, 77, 'run', 5.0, 6.0, 'SIGUSR2')"
        )
        db.execute(
            "INSERT INTO events (at, kind, partition_id, uid, user, device_uuid, memory_bytes, "
            "detail) VALUES (2.5, 'released', '0abc1234', 1000, 'alice', 'GPU-B', 25, "
            '\'{"reason": "released"}\')'
        )
    led = Ledger(path)
    try:
        assert led.get("0abc1234") == PartitionRecord(
            "0abc1234", 1, "GPU-B", 100, 25, 1000, "alice", 1.0, 2.0, 3.0, "released", 2.5,
            "released", 4242, 77, "run", 5.0, 6.0, "SIGUSR2",
        )  # fmt: skip
        assert led.get("0abc1234").devices == (1,)
        (event,) = led.events(partition_id="0abc1234")
        assert (event.kind, event.user, event.detail) == (
            "released",
            "alice",
            {"reason": "released"},
        )
    finally:
        led.close()


# ------------------------------------------------------------ schema migration


def _schema_3_ledger(path: Path) -> None:
    """A schema 3 ledger file with one partition in it."""
    from helpers import schema_3_ledger

    schema_3_ledger(path)
    db = sqlite3.connect(path)
    db.execute(
        "INSERT INTO partitions (id, device, device_uuid, device_total_bytes, memory_bytes, uid, "
        "user, created_at, starts_at, expires_at, state, kind) "
        "VALUES ('0123abcd', 0, ?, ?, ?, 1000, 'alice', ?, ?, ?, 'active', 'cli')",
        (DEV_A, CAP, GIB, T0, T0, T0 + 3600),
    )
    db.commit()
    db.close()


def test_a_schema_3_ledger_gains_the_series_column_and_keeps_its_rows(
    tmp_path: Path, clock: FakeClock
) -> None:
    path = tmp_path / "ledger.db"
    _schema_3_ledger(path)
    led = Ledger(path, clock=clock, owner_alive=lambda pid, ticks: True)
    try:
        old = led.get("0123abcd")
        assert old.series is None and old.user == "alice" and old.memory_bytes == GIB
        day = dataclasses.replace(req(GIB, 60, starts_at=T0 + 7200), series="s1234567")
        made = led.create(day)
        assert led.series("s1234567") == [led.get(made.id)]
        assert led.get(made.id).series == "s1234567"
    finally:
        led.close()
    version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
    assert version == SCHEMA_VERSION == 6
    # Opened again (already migrated): nothing to do, the rows are as they were.
    again = Ledger(path, clock=clock, owner_alive=lambda pid, ticks: True)
    try:
        assert [r.series for r in again.partitions()] == [None, "s1234567"]
    finally:
        again.close()


def test_a_partition_keeps_every_term_it_was_asked_with(tmp_path: Path) -> None:
    """The record takes the request's fields by name (NewPartition.kept_terms): a field
    added to both types is carried without a list to keep, and none is dropped."""
    clock = FakeClock(1_000_000.0)
    ledger = Ledger(tmp_path / "ledger.db", clock=clock, durable=False)
    asked = NewPartition(
        device=1,
        device_uuid="GPU-1",
        device_total_bytes=80 * GIB,
        capacity_bytes=80 * GIB,
        memory_bytes=3 * GIB,
        uid=1234,
        user="alice",
        duration_s=600.0,
        owner_pid=4242,
        owner_start=99,
        kind="cli",
        grace_s=7.0,
        warn_s=30.0,
        warn_signal="SIGUSR2",
        series="s1234abc",
    )
    record = ledger.create(asked)
    stored = ledger.get(record.id)
    kept = asked.kept_terms()
    assert set(kept) == {f.name for f in dataclasses.fields(asked) if hasattr(stored, f.name)} - {
        "starts_at"
    }
    for name, value in kept.items():
        assert getattr(stored, name) == value, name
    assert (stored.starts_at, stored.expires_at) == (clock(), clock() + 600.0)
    ledger.close()


def test_a_schema_4_ledger_gains_the_open_partition_indexes_and_keeps_its_rows(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Schema 5 changed indexes only: a file as schema 4 left it (these indexes missing,
    its open-partitions index there, version 4) opens with its rows, has the new indexes
    and not the old one, and is version 5; opened again, as is."""
    from chronos.ledger.schema import OPEN_INDEXES

    path = tmp_path / "ledger.db"
    led = Ledger(path, clock=clock, owner_alive=lambda pid, ticks: True)
    made = led.create(req(GIB, 60))
    led.close()
    with sqlite3.connect(path) as db:  # what a schema 4 Chronos wrote
        for name in OPEN_INDEXES:
            db.execute(f"DROP INDEX {name}")
        db.execute(
            "CREATE INDEX partitions_open ON partitions (device_uuid, expires_at) "
            "WHERE state IN ('active', 'booked')"
        )
        db.execute("PRAGMA user_version = 4")
    db.close()

    def indexes() -> set[str]:
        with sqlite3.connect(path) as db:
            rows = db.execute("SELECT name FROM sqlite_master WHERE type = 'index'").fetchall()
        db.close()
        return {name for (name,) in rows}

    assert not indexes() & set(OPEN_INDEXES) and "partitions_open" in indexes()
    for _ in range(2):
        again = Ledger(path, clock=clock, owner_alive=lambda pid, ticks: True)
        try:
            assert again.get(made.id) == made
            assert [r.id for r in again.open_at()] == [made.id]
        finally:
            again.close()
        assert indexes() >= set(OPEN_INDEXES) and "partitions_open" not in indexes()
        version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION


def _seed_bookings_ahead(led: Ledger, count: int) -> None:
    """``count`` one-hour bookings from two hours on, one after the other, on GPU-A."""
    with led.transaction():
        for i in range(count):
            start = T0 + 7200.0 + i * 3600.0
            led.parts.partitions.admit(req(GIB, 3600.0, starts_at=start), T0, start, start + 3600)


def test_reap_deadlines_watch_and_room_check_cost_what_they_return(
    tmp_path: Path, clock: FakeClock
) -> None:
    """With 3,000 bookings ahead, what every change runs (a reap, the next deadline, the
    watched partitions, a room check over the next hour, a create and a release) costs
    about what it costs with 30: each reads the open partitions through an index that
    skips the bookings (before schema 5, each read every booking)."""

    def cost(count: int) -> int:
        led = Ledger(tmp_path / f"ledger-{count}.db", clock=clock, durable=False)
        _seed_bookings_ahead(led, count)
        owned = led.create(req(GIB, 600, owner_pid=os.getpid()))

        def every_change() -> None:
            assert led.reap() == []
            assert led.next_deadline() == T0 + 600
            assert [r.id for r in led.watched()] == [owned.id]
            assert led.committed_bytes(DEV_A) == GIB
            led.release(led.create(req(GIB, 3600)).id, 1000, "alice")

        steps = sql_steps(led, every_change, per=100)
        led.close()
        return steps

    few, many = cost(30), cost(3000)
    assert many <= 2 * few + 20, (few, many)


def test_next_deadline_is_the_first_booking_start_or_active_end(
    ledger: Ledger, clock: FakeClock
) -> None:
    assert ledger.next_deadline() is None
    booked = ledger.create(req(GIB, 600, starts_at=T0 + 1000))
    assert ledger.next_deadline() == booked.starts_at
    ledger.create(req(GIB, 2000))  # ends after the booking starts
    assert ledger.next_deadline() == booked.starts_at
    short = ledger.create(req(GIB, 500))
    assert ledger.next_deadline() == short.expires_at
    ledger.release(booked.id, 1000, "alice")
    ledger.release(short.id, 1000, "alice")
    assert ledger.next_deadline() == T0 + 2000


def test_a_new_partition_whose_random_id_is_taken_gets_another(
    ledger: Ledger, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The primary key, not a SELECT before each insert, finds a taken id: the insert
    that fails is undone alone, and the partition is written under a fresh id."""
    first = ledger.create(req(GIB, 60))
    taken, fresh = bytes.fromhex(first.id), bytes.fromhex("0badcafe")
    draws = iter([taken, fresh])
    monkeypatch.setattr("chronos.ledger.partitions.os.urandom", lambda n: next(draws))
    second = ledger.create(req(GIB, 60))
    assert second.id == "0badcafe"
    assert ledger.get(first.id) == first and ledger.get(second.id) == second
    created = [e.partition_id for e in ledger.events() if e.kind == "created"]
    assert created == [first.id, second.id]


def _group(nbytes: int, duration: float, starts_at: float | None = None) -> NewPartition:
    """A two-GPU request: GPU-A the primary, GPU-B the further share."""
    from chronos.ledger import Member

    more = (Member(1, DEV_B, CAP, CAP, nbytes),)
    return dataclasses.replace(req(nbytes, duration, starts_at=starts_at), more=more)


def _room_on_b(led: Ledger, start: float, end: float) -> list[tuple[float, float, int]]:
    return [(i[0], i[1], i[2]) for i in led.parts.partitions.on_device(DEV_B, T0, start, end)]


def test_a_schema_5_ledger_gives_its_group_rows_their_span(
    tmp_path: Path, clock: FakeClock
) -> None:
    """Schema 6: ``group_shares`` keeps its group's span. A file as schema 5 left it (the
    rows without the span, no index) opens migrated: the open group's row has its span
    from the partition, so the room check on its further GPU still counts it."""
    path = tmp_path / "ledger.db"
    led = Ledger(path, clock=clock, owner_alive=lambda pid, ticks: True)
    group = led.create(_group(10 * GIB, 600))
    booked = led.create(_group(5 * GIB, 600, starts_at=T0 + 7200))
    led.close()
    with sqlite3.connect(path) as db:  # what a schema 5 Chronos wrote
        db.execute("DROP INDEX group_shares_start")
        db.execute("ALTER TABLE group_shares DROP COLUMN starts_at")
        db.execute("ALTER TABLE group_shares DROP COLUMN expires_at")
        db.execute("PRAGMA user_version = 5")
    db.close()
    for _ in range(2):  # migrated once; opened again, as is
        again = Ledger(path, clock=clock, owner_alive=lambda pid, ticks: True)
        try:
            assert _room_on_b(again, T0, T0 + 10_000) == [
                (T0, T0 + 600, 10 * GIB),
                (T0 + 7200, T0 + 7800, 5 * GIB),
            ]
            assert again.committed_bytes(DEV_B) == 10 * GIB
            assert again.ending_by(DEV_B, T0 + 601) == [group.id]
            assert again.get(booked.id).devices == (0, 1)
        finally:
            again.close()
        version = sqlite3.connect(path).execute("PRAGMA user_version").fetchone()[0]
        assert version == SCHEMA_VERSION == 6


def test_a_group_row_follows_its_group_on_extension_and_clock_step(
    tmp_path: Path, clock: FakeClock
) -> None:
    """The room check on a group's further GPU reads the row's own span: an extension and
    a clock step move it with the partition, and an end removes it."""
    led = Ledger(tmp_path / "ledger.db", clock=clock, owner_alive=lambda pid, ticks: True)
    try:
        group = led.create(_group(30 * GIB, 600))
        led.extend_expiry(group.id, T0 + 1200, CAP, 1000, "alice")
        assert _room_on_b(led, T0, T0 + 10_000) == [(T0, T0 + 1200, 30 * GIB)]
        # Room on GPU-B during the extension is the group's to keep.
        after_old_end = req(60 * GIB, 300, uuid=DEV_B, device=1, starts_at=T0 + 700)
        with pytest.raises(AdmissionRefused):
            led.create(after_old_end)
        led.shift_open(50.0)
        assert _room_on_b(led, T0, T0 + 10_000) == [(T0 + 50, T0 + 1250, 30 * GIB)]
        led.release(group.id, 1000, "alice")
        assert _room_on_b(led, T0, T0 + 10_000) == []
        led.create(after_old_end)  # its room is free once the group ended
    finally:
        led.close()


def test_a_ledger_of_a_newer_schema_is_refused_not_misread(tmp_path: Path) -> None:
    """Going back after an upgrade: this Chronos refuses a file of a schema it does not
    know, in one line, and leaves it as it was."""
    from chronos.errors import ChronosError

    path = tmp_path / "ledger.db"
    Ledger(path).close()
    with sqlite3.connect(path) as db:
        db.execute(f"PRAGMA user_version = {SCHEMA_VERSION + 1}")
    db.close()
    before = path.read_bytes()
    with pytest.raises(ChronosError) as info:
        Ledger(path)
    assert str(info.value) == (
        f"ledger {path} has schema {SCHEMA_VERSION + 1}; this Chronos knows {SCHEMA_VERSION}"
    )
    assert path.read_bytes() == before
