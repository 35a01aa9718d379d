"""Unit tests of fair sharing: quotas, GPU-hours, decay, aging, backfill and the policy file.

Pure functions of :mod:`chronos.policy` are called directly; what depends on
the ledger goes through a :class:`~chronos.service.Service` on a fake clock
(``harness_factory``), so nothing here sleeps.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from chronos.config import Config, Limits, load_config, parse_config
from chronos.errors import AdmissionRefused, BadRequest, CapacityRefused
from chronos.models import ACTIVE, BOOKED, EXPIRED, RELEASED, PartitionRecord
from chronos.policy import (
    DAY,
    Ask,
    Waiter,
    check_limits,
    decayed_usage,
    earliest_fit,
    gpu_hours,
    peak_usage,
    plan_queue,
    priority,
)

from .support import GPU_BYTES, T0, caller

H = 3600.0
ALICE = caller("alice", 2001)
BOB = caller("bob", 2002)
CAROL = caller("carol", 2003)
OPS = caller("ops", 2100, admin=True)


def rec(
    start: float,
    end: float,
    fraction: float = 1.0,
    state: str = ACTIVE,
    ended_at: float | None = None,
    pid: str = "p",
    user: str = "alice",
) -> PartitionRecord:
    """A partition of ``fraction`` of an 80 GiB GPU held over ``[start, end)``."""
    return PartitionRecord(
        id=pid,
        device=0,
        device_uuid="GPU-0",
        device_total_bytes=GPU_BYTES,
        memory_bytes=int(GPU_BYTES * fraction),
        uid=2001,
        user=user,
        created_at=start,
        starts_at=start,
        expires_at=end,
        state=state,
        ended_at=ended_at,
    )


def ask(fraction: float, start: float, end: float) -> Ask:
    return Ask("alice", 0, fraction, start, end)


def refusal(limits: Limits, a: Ask, mine: list[PartitionRecord], now: float = T0) -> str:
    with pytest.raises(AdmissionRefused) as info:
        check_limits(limits, a, mine, now)
    assert not isinstance(info.value, CapacityRefused), "a quota is no lack of room"
    return str(info.value)


# ------------------------------------------------------------------------ check_limits


def test_max_share_names_the_limit_and_the_ask() -> None:
    msg = refusal(Limits(max_share=0.5), ask(0.6, T0, T0 + H), [])
    assert msg.startswith("over the max_share limit")
    assert "60.0%" in msg and "50.0%" in msg
    check_limits(Limits(max_share=0.5), ask(0.5, T0, T0 + H), [], T0)  # the limit itself fits


def test_max_duration_names_the_limit_and_the_ask() -> None:
    msg = refusal(Limits(max_duration_s=8 * H), ask(0.1, T0, T0 + 9 * H), [])
    assert "max_duration" in msg and "9h" in msg and "8h" in msg


def test_max_partitions_counts_partitions_open_at_once_during_the_ask() -> None:
    mine = [
        rec(T0 - H, T0 + H, 0.1, pid="a"),
        rec(T0 + 5 * H, T0 + 6 * H, 0.1, state=BOOKED, pid="b"),
        rec(T0 - 3 * H, T0 - 2 * H, 0.1, state=RELEASED, ended_at=T0 - 2 * H, pid="c"),
        rec(T0 - 3 * H, T0 - H, 0.1, state=EXPIRED, ended_at=T0 - H, pid="d"),
        rec(T0 - 2 * H, T0, 0.1, pid="e"),
    ]  # due now, not reaped yet: not open
    # Only "a" overlaps the ask; "b" is booked later and does not count at the same time.
    msg = refusal(Limits(max_partitions=1), ask(0.1, T0, T0 + H), mine)
    assert "max_partitions" in msg
    assert "alice already holds 1 partition(s) at once then, at most 1" in msg
    check_limits(Limits(max_partitions=2), ask(0.1, T0, T0 + H), mine, T0)
    # An ask spanning both still meets only one of them at any instant.
    check_limits(Limits(max_partitions=2), ask(0.1, T0, T0 + 6 * H), mine, T0)
    # A second partition beside "a" makes two at once.
    both = [*mine, rec(T0 - H, T0 + 2 * H, 0.1, pid="f")]
    msg = refusal(Limits(max_partitions=2), ask(0.1, T0, T0 + H), both)
    assert "2 partition(s) at once" in msg


def test_max_total_share_looks_at_what_overlaps_the_ask() -> None:
    mine = [rec(T0, T0 + 2 * H, 0.6, pid="a"), rec(T0 + 3 * H, T0 + 4 * H, 0.9, pid="b")]
    limits = Limits(max_total_share=1.0)
    msg = refusal(limits, ask(0.5, T0 + H, T0 + 2.5 * H), mine)
    assert "max_total_share" in msg and "holds 60.0% then" in msg and "asks 50.0%" in msg
    assert "at most 100.0%" in msg
    check_limits(limits, ask(0.4, T0 + H, T0 + 2.5 * H), mine, T0)  # 0.6 + 0.4
    check_limits(limits, ask(1.0, T0 + 2 * H, T0 + 3 * H), mine, T0)  # in the gap
    refusal(limits, ask(0.2, T0 + 2.5 * H, T0 + 3.5 * H), mine)  # meets the 0.9 booking


@pytest.mark.parametrize(
    "name, window, limits",
    [
        ("max_gpu_hours_day", "24 h", Limits(max_gpu_hours_day=8)),
        ("max_gpu_hours_week", "7 days", Limits(max_gpu_hours_week=8)),
    ],
)
def test_gpu_hours_limits_name_the_limit_and_the_standing(
    name: str, window: str, limits: Limits
) -> None:
    mine = [rec(T0 - 7 * H, T0, 1.0, state=RELEASED, ended_at=T0)]  # 7 GPU-hours just now
    msg = refusal(limits, ask(0.5, T0, T0 + 4 * H), mine)
    assert msg.startswith(f"over the {name} limit")
    assert "alice has 7.00 GPU-hours" in msg and window in msg
    assert "asks 2.00 more" in msg and "at most 8" in msg
    check_limits(limits, ask(0.5, T0, T0 + 2 * H), mine, T0)  # 7 + 1 = 8: at the limit


def test_gpu_hours_day_forgets_what_is_older_than_a_day() -> None:
    limits = Limits(max_gpu_hours_day=8)
    old = [rec(T0 - 32 * H, T0 - 25 * H, 1.0, state=EXPIRED, ended_at=T0 - 25 * H)]
    check_limits(limits, ask(1.0, T0, T0 + 8 * H), old, T0)  # no day holds both
    recent = [rec(T0 - 17 * H, T0 - 10 * H, 1.0, state=EXPIRED, ended_at=T0 - 10 * H)]
    check_limits(limits, ask(1.0, T0, T0 + H), recent, T0)  # 7 + 1 within [T0-17h, T0+7h)
    refusal(limits, ask(1.0, T0, T0 + 2 * H), recent)


def test_a_booking_placed_before_an_existing_one_respects_every_rolling_day() -> None:
    """Found by the property tests: only the 24 h ending with the ask used to be checked."""
    later = [rec(T0 + 20 * H, T0 + 28 * H, 1.0, state=BOOKED)]  # 8 GPU-h tomorrow
    limits = Limits(max_gpu_hours_day=10)
    msg = refusal(limits, ask(1.0, T0 + 14 * H, T0 + 18 * H), later)  # 4 more within 24 h
    assert "max_gpu_hours_day" in msg and "8.00 GPU-hours" in msg
    check_limits(limits, ask(1.0, T0 + 14 * H, T0 + 16 * H), later, T0)  # 2 more: 10


def test_a_day_long_ask_counts_only_its_part_of_each_day() -> None:
    limits = Limits(max_gpu_hours_day=12)
    check_limits(limits, ask(0.5, T0, T0 + 48 * H), [], T0)  # 12 GPU-h in any 24 h
    refusal(limits, ask(0.6, T0, T0 + 48 * H), [])


def test_the_first_broken_limit_is_named() -> None:
    limits = Limits(max_share=0.5, max_duration_s=H, max_partitions=1)
    msg = refusal(limits, ask(0.9, T0, T0 + 2 * H), [rec(T0, T0 + H)])
    assert msg.startswith("over the max_share limit")


def test_service_applies_quotas_to_users_and_not_to_administrators(harness_factory: Any) -> None:
    h = harness_factory(
        {"limits": {"default": {"max_share": 0.5}, "users": {"bob": {"max_share": 0.8}}}}
    )
    err = h.error(ALICE, "create", device=0, memory=0.6, duration=60, persist=True)
    assert err["code"] == "refused" and "max_share" in err["message"]
    h.ok(BOB, "create", device=0, memory=0.6, duration=60, persist=True)
    h.ok(OPS, "create", device=1, memory=1.0, duration=60, persist=True)
    # A quota refusal never queues, even with wait: waiting cannot make it pass.
    err = h.error(ALICE, "create", device=0, memory=0.6, duration=60, persist=True, wait=True)
    assert "max_share" in err["message"] and h.queue() == []


# --------------------------------------------------------------------------- gpu_hours


def test_gpu_hours_counts_the_part_inside_the_window() -> None:
    r = rec(T0, T0 + 4 * H, 0.5)
    assert gpu_hours([r], T0 - DAY, T0 + DAY, T0) == pytest.approx(2.0)
    assert gpu_hours([r], T0 + H, T0 + 2 * H, T0) == pytest.approx(0.5)
    assert gpu_hours([r], T0 + 4 * H, T0 + 5 * H, T0) == 0.0  # half-open: ends at T0+4h


def test_gpu_hours_of_released_and_booked_partitions() -> None:
    released = rec(T0 - 4 * H, T0 + 4 * H, 1.0, state=RELEASED, ended_at=T0 - 3 * H)
    booked = rec(T0 + 10 * H, T0 + 12 * H, 0.25, state=BOOKED)
    assert gpu_hours([released], T0 - DAY, T0 + DAY, T0) == pytest.approx(1.0)
    assert gpu_hours([booked], T0, T0 + DAY, T0) == pytest.approx(0.5)  # reserved counts
    assert gpu_hours([released, booked], T0 - DAY, T0 + 11 * H, T0) == pytest.approx(1.25)


# ---------------------------------------------------------------------- decayed usage


def test_usage_one_half_life_ago_counts_half() -> None:
    half_life = 7 * DAY
    one_hour = rec(T0 - half_life - H, T0 - half_life, 1.0, state=EXPIRED, ended_at=T0 - half_life)
    assert decayed_usage([one_hour], T0, half_life) == pytest.approx(0.5)
    two = rec(
        T0 - 2 * half_life - H, T0 - 2 * half_life, 1.0, state=EXPIRED, ended_at=T0 - 2 * half_life
    )
    assert decayed_usage([two], T0, half_life) == pytest.approx(0.25)
    fresh = rec(T0 - H, T0, 1.0, state=EXPIRED, ended_at=T0)
    assert decayed_usage([fresh], T0, half_life) == pytest.approx(1.0)


def test_usage_counts_held_time_only() -> None:
    half_life = DAY
    active = rec(T0 - 2 * H, T0 + 6 * H, 0.5)  # 1 GPU-hour so far; the rest is not used yet
    booked = rec(T0 + H, T0 + 3 * H, 1.0, state=BOOKED)
    released = rec(T0 - 2 * H, T0 + 6 * H, 1.0, state=RELEASED, ended_at=T0 - H)
    assert decayed_usage([active], T0, half_life) == pytest.approx(1.0)
    assert decayed_usage([booked], T0, half_life) == 0.0
    assert decayed_usage([released], T0, half_life) == pytest.approx(0.5 ** (1 / 24))


# -------------------------------------------------------------------------- priority


def test_priority_ages_without_bound() -> None:
    assert priority(2.0, 0.0, 1.0) > priority(0.0, 0.0, 1.0)
    assert priority(2.0, 3 * H, 1.0) < priority(0.0, 0.0, 1.0)  # waited 3 h: worth 3 GPU-h
    assert priority(2.0, 2 * H, 1.0) == pytest.approx(priority(0.0, 0.0, 1.0))
    assert priority(100.0, 1e6 * H, 0.001) < priority(0.0, 0.0, 0.001)


def _queue_users(h: Any) -> list[str]:
    return [q["user"] for q in h.queue()]


def test_a_long_waiter_overtakes_a_newcomer_with_no_usage(harness_factory: Any) -> None:
    """carol used 2 GPU-hours; age_weight 1: after 2 h of waiting she goes before a newcomer."""
    h = harness_factory({"fairshare": {"half_life": "30d", "age_weight": 1.0}})
    h.ok(CAROL, "create", device=0, memory=1.0, duration="2h", persist=True)
    h.clock.advance(2 * H)
    h.ok(OPS, "create", device=0, memory=1.0, duration="8h", persist=True)  # GPU 0 full
    h.ok(CAROL, "create", device=0, memory=1.0, duration="1h", wait=True, persist=True)
    h.clock.advance(60)
    h.ok(BOB, "create", device=0, memory=1.0, duration="1h", wait=True, persist=True)
    assert _queue_users(h) == ["bob", "carol"]  # fair share: bob has used nothing
    h.clock.advance(2 * H)  # both waited 2 more hours: the gap between them stays 1 min
    assert _queue_users(h) == ["bob", "carol"]
    h.ok(DAVE, "create", device=0, memory=1.0, duration="1h", wait=True, persist=True)
    assert _queue_users(h) == ["bob", "carol", "dave"]  # carol waited 2 h+: before dave
    q = {x["user"]: x for x in h.queue()}
    assert q["bob"]["position"] == 1 and q["carol"]["position"] == 2
    assert q["bob"]["estimated_start"] < q["carol"]["estimated_start"]


DAVE = caller("dave", 2004)


def test_equal_usage_is_served_first_come_first_served(harness_factory: Any) -> None:
    h = harness_factory()
    h.ok(OPS, "create", device=0, memory=1.0, duration="1h", persist=True)
    for who in (BOB, ALICE, DAVE):
        h.ok(who, "create", device=0, memory=1.0, duration="1h", wait=True, persist=True)
        h.clock.advance(1)
    assert _queue_users(h) == ["bob", "alice", "dave"]


# ---------------------------------------------------------------- plan_queue (backfill)

CAP = 100


def waiter(wid: str, nbytes: int, duration: float) -> Waiter:
    return Waiter(wid, "GPU-0", nbytes, duration, CAP)


def test_small_job_starts_ahead_when_it_cannot_delay_the_head() -> None:
    held = {"GPU-0": [(0.0, 100.0, 60, "p")]}
    head = waiter("head", 100, 50)  # needs the whole GPU: from t=100
    short = waiter("short", 30, 100)  # fits beside p and ends by t=100
    plan = plan_queue([head, short], held, now=0.0)
    assert plan.grant == ["short"]
    assert plan.estimated_start == {"head": 100.0}


def test_small_job_that_would_delay_the_head_waits_behind_it() -> None:
    held = {"GPU-0": [(0.0, 100.0, 60, "p")]}
    head = waiter("head", 100, 50)
    long = waiter("long", 30, 101)  # one second too long: it would push the head back
    plan = plan_queue([head, long], held, now=0.0)
    assert plan.grant == []
    assert plan.estimated_start == {"head": 100.0, "long": 150.0}


def test_small_job_that_fits_beside_the_head_starts_now_however_long() -> None:
    held = {"GPU-0": [(0.0, 100.0, 50, "p")]}
    head = waiter("head", 60, 50)
    side = waiter("side", 40, 10_000)  # 50+40 now, 60+40 once the head runs: fits
    plan = plan_queue([head, side], held, now=0.0)
    assert plan.grant == ["side"]


def test_order_is_priority_order_not_size() -> None:
    held = {"GPU-0": [(0.0, 100.0, 60, "p")]}
    small = waiter("small", 50, 100)  # does not fit now (60 + 50)
    big = waiter("big", 100, 10)
    plan = plan_queue([small, big], held, now=0.0)
    assert plan.estimated_start == {"small": 100.0, "big": 200.0}
    plan = plan_queue([big, small], held, now=0.0)
    assert plan.estimated_start == {"big": 100.0, "small": 110.0}


def test_a_waiter_larger_than_the_device_has_no_estimate_and_blocks_nobody() -> None:
    plan = plan_queue([waiter("huge", 101, 10), waiter("ok", 10, 10)], {}, now=0.0)
    assert plan.grant == ["ok"] and plan.estimated_start == {"huge": None}


def test_earliest_fit_and_peak_usage_treat_ends_as_freeing_at_that_instant() -> None:
    held = [(0.0, 10.0, 70, "a"), (10.0, 20.0, 70, "b")]
    assert peak_usage(held, 0.0, 20.0) == 70  # a ends as b starts: never both
    assert earliest_fit(held, 30, 5.0, 0.0, 100) == 0.0
    assert earliest_fit(held, 40, 5.0, 0.0, 100) == 20.0
    assert earliest_fit(held, 101, 5.0, 0.0, 100) is None


# ------------------------------------------------------------------- queue in the ledger


def _full(h: Any, fraction: float = 0.6, duration: str = "100s") -> dict[str, Any]:
    result: dict[str, Any] = h.ok(
        OPS, "create", device=0, memory=fraction, duration=duration, persist=True
    )
    return result


def test_a_request_larger_than_the_reservable_share_is_refused_not_queued(
    harness_factory: Any,
) -> None:
    h = harness_factory({"devices": {"0": {"reservable_share": 0.5}}})
    err = h.error(ALICE, "create", device=0, memory=0.6, duration=60, wait=True, persist=True)
    assert err["code"] == "refused"
    assert "more than GPU 0 lets partitions reserve" in err["message"]
    assert h.queue() == [] and h.ledger.waiting() == []


def test_a_dead_waiter_holds_no_room_for_direct_requests(harness_factory: Any) -> None:
    alive = {"ok": True}
    h = harness_factory(owner_alive=lambda pid, start: alive["ok"])
    _full(h)  # 60% until +100 s
    waiting = caller("carol", 2003, pid=424242)
    status = h.ok(waiting, "create", device=0, memory=0.7, duration=100, wait=True, persist=True)
    assert status["state"] == "waiting"  # holds [100, 200) for 70%
    err = h.error(BOB, "create", device=0, memory=0.4, duration=1000, persist=True)
    assert "1 waiting request(s) ahead" in err["message"]
    alive["ok"] = False  # the waiting process died: its ticket must not block anybody
    h.ok(BOB, "create", device=0, memory=0.4, duration=1000, persist=True)
    assert h.ledger.ticket(status["ticket"]).state == "cancelled"


def test_direct_requests_fit_around_the_queue_in_priority_order(harness_factory: Any) -> None:
    """Found by the property tests: reservations used to be laid out first come first served.

    carol (past usage) queued first, ops (none) second; ops is served first, so
    a direct request may not take the room ops will need, even where carol's
    place in a first-come-first-served layout would have left it free.
    """
    h = harness_factory({"fairshare": {"half_life": "30d", "age_weight": 0.001}})
    h.ok(CAROL, "create", device=1, memory=1.0, duration="10h", persist=True)
    h.clock.advance(10 * H)
    _full(h, 0.6, "100s")
    h.ok(CAROL, "create", device=0, memory=0.5, duration=100, wait=True, persist=True)
    h.ok(OPS, "create", device=0, memory=1.0, duration=100, wait=True, persist=True)
    before = {q["user"]: q["estimated_start"] - h.clock.now for q in h.queue()}
    assert before == {"ops": 100.0, "carol": 200.0}
    err = h.error(BOB, "create", device=0, memory=0.3, duration=150, persist=True)
    assert "2 waiting request(s) ahead" in err["message"]
    h.ok(BOB, "create", device=0, memory=0.3, duration=100, persist=True)  # ends in time
    after = {q["user"]: q["estimated_start"] - h.clock.now for q in h.queue()}
    assert after == before


def test_an_extension_may_not_delay_a_waiter(harness_factory: Any) -> None:
    """Found by the property tests: extensions used to ignore the queue."""
    h = harness_factory()
    p = _full(h, 0.6, "100s")
    status = h.ok(ALICE, "create", device=0, memory=0.5, duration=100, wait=True, persist=True)
    err = h.error(OPS, "extend", id=p["id"], duration=50)
    assert err["code"] == "refused"
    assert f"queued request {status['ticket']}" in err["message"]
    assert h.queue()[0]["estimated_start"] == pytest.approx(h.clock.now + 100)
    h.ok(OPS, "cancel", id=status["ticket"])
    h.ok(OPS, "extend", id=p["id"], duration=50)  # nobody waits now: fine


def test_an_extension_refusal_names_the_booking_in_the_way(harness_factory: Any) -> None:
    h = harness_factory()
    p = _full(h, 0.6, "1h")
    b = h.ok(
        BOB, "create", device=0, memory=0.6, duration="1h", start=h.clock.now + 2 * H, persist=True
    )
    h.ok(OPS, "extend", id=p["id"], duration="1h")  # up to the booking's start
    err = h.error(OPS, "extend", id=p["id"], duration="1s")
    assert f"booking {b['id']}" in err["message"]


def test_extension_quota_refusal_names_the_limit(harness_factory: Any) -> None:
    h = harness_factory({"limits": {"default": {"max_duration": "2h"}}})
    p = h.ok(ALICE, "create", device=0, memory=0.2, duration="90m", persist=True)
    err = h.error(ALICE, "extend", id=p["id"], duration="1h")
    assert err["code"] == "refused" and "max_duration" in err["message"]
    h.ok(ALICE, "extend", id=p["id"], duration="30m")


def test_a_waiter_refused_at_grant_time_leaves_its_room_to_the_next(harness_factory: Any) -> None:
    """Found by the property tests: one round granted nothing after a refusal."""
    h = harness_factory({"limits": {"default": {"max_partitions": 1}}})
    p = _full(h, 1.0, "100s")
    first = h.ok(ALICE, "create", device=0, memory=0.6, duration=100, wait=True, persist=True)
    h.clock.advance(1)
    second = h.ok(BOB, "create", device=0, memory=0.6, duration=100, wait=True, persist=True)
    h.ok(ALICE, "create", device=1, memory=0.1, duration="1h", persist=True)  # her one
    h.ok(OPS, "release", id=p["id"])
    h.service.grant_waiting()
    assert h.ledger.ticket(first["ticket"]).state == "refused"
    assert "max_partitions" in (h.ledger.ticket(first["ticket"]).reason or "")
    assert h.ledger.ticket(second["ticket"]).state == "granted"


def test_new_partitions_keep_the_grace_of_the_policy_they_were_granted_under(
    harness_factory: Any,
) -> None:
    h = harness_factory({"grace": "5s"})
    p = h.ok(ALICE, "create", device=0, memory=0.1, duration=60, persist=True)
    own = h.ok(ALICE, "create", device=0, memory=0.1, duration=60, grace="2s", persist=True)
    h.service.config = parse_config({"grace": "90s"})  # what SIGHUP does
    assert h.ok(ALICE, "get", id=p["id"])["grace_s"] == 5.0
    assert h.ok(ALICE, "get", id=own["id"])["grace_s"] == 2.0


def test_a_lowered_reservable_share_applies_to_requests_still_waiting(harness_factory: Any) -> None:
    h = harness_factory()
    p = _full(h, 1.0, "100s")
    w = h.ok(ALICE, "create", device=0, memory=0.6, duration=60, wait=True, persist=True)
    h.service.config = parse_config({"reservable_share": 0.5})  # what SIGHUP does
    h.ok(OPS, "release", id=p["id"])
    h.service.grant_waiting()
    assert h.ledger.ticket(w["ticket"]).state != "granted"  # 60% of a GPU half reservable


def test_usage_counts_a_queued_then_granted_request_as_no_refusal(harness_factory: Any) -> None:
    h = harness_factory({"limits": {"default": {"max_share": 0.9}}})
    p = _full(h, 0.6, "100s")
    h.ok(ALICE, "create", device=0, memory=0.5, duration=60, wait=True, persist=True)
    h.error(ALICE, "create", device=0, memory=0.95, duration=60, persist=True)  # quota
    h.error(ALICE, "create", device=0, memory=0.5, duration=60, persist=True)  # no room
    h.ok(OPS, "release", id=p["id"])
    assert len(h.service.grant_waiting()) == 1
    (row,) = h.ok(ALICE, "usage", user="alice")
    assert row["refused"] == 2 and row["queued"] == 1 and row["created"] == 1


def test_usage_report_rows_from_a_history() -> None:
    from chronos.accounting import usage_report
    from chronos.models import Event

    since, now = T0 - DAY, T0
    records = [
        rec(T0 - 10 * H, T0 - 8 * H, 0.5, state=EXPIRED, ended_at=T0 - 8 * H, pid="a"),
        rec(T0 - 6 * H, T0 - 2 * H, 1.0, state=RELEASED, ended_at=T0 - 5 * H, pid="b"),
        rec(T0 - H, T0 + H, 0.25, pid="c"),
        rec(T0 + H, T0 + 2 * H, 1.0, state=BOOKED, pid="d"),
        rec(T0 - 3 * H, T0 - 2 * H, 0.5, state=RELEASED, ended_at=T0 - 2 * H, pid="e", user="bob"),
    ]

    def event(kind: str, user: str, pid: str | None = None, **detail: Any) -> Event:
        return Event(0, T0 - H, kind, pid, 0, user, "GPU-0", 0, detail)

    events = [
        event("refused", "alice"),
        event("queued", "alice"),  # no room now, so it waited: not a refusal
        event("queue_refused", "alice"),  # refused later, at grant time (a quota)
        event("memory_exceeded", "bob", "e"),
        event("usage", "alice", "a", byte_seconds=GPU_BYTES * 0.25 * 2 * H),
    ]
    rows = {r["user"]: r for r in usage_report(records, events, since, now)}
    alice, bob = rows["alice"], rows["bob"]
    assert alice["created"] == 4 and alice["expired"] == 1 and alice["released_early"] == 1
    assert alice["refused"] == 2 and alice["queued"] == 1 and alice["killed_for_memory"] == 0
    assert alice["gpu_hours_reserved"] == pytest.approx(0.5 * 2 + 1.0 * 1 + 0.25 * 1)
    assert alice["gpu_hours_used"] == pytest.approx(0.5) and alice["used_measured_partitions"] == 1
    assert bob["killed_for_memory"] == 1 and bob["released_early"] == 0  # ended on time
    assert [r["user"] for r in usage_report(records, events, since, now, "bob")] == ["bob"]


# ----------------------------------------------------------------------- policy file


@pytest.mark.parametrize(
    "data, named",
    [
        ({"max_sahre": 0.5}, "'max_sahre'"),
        ({"grace": "soon"}, "grace"),
        ({"warn": "x"}, "warn"),
        ({"max_duration": 0}, "max_duration"),
        ({"reservable_share": 0}, "reservable_share"),
        ({"reservable_share": 1.5}, "reservable_share"),
        ({"unpartitioned": "kill"}, "unpartitioned"),
        ({"exempt_users": "root"}, "exempt_users"),
        ({"admin_group": 5}, "admin_group"),
        ({"limits": {"default": {"max_sahre": 0.5}}}, "'max_sahre'"),
        ({"limits": {"default": {"max_share": 1.5}}}, "max_share"),
        ({"limits": {"default": {"max_share": "half"}}}, "max_share"),
        ({"limits": {"default": {"max_total_share": 0}}}, "max_total_share"),
        ({"limits": {"default": {"max_partitions": 0}}}, "max_partitions"),
        ({"limits": {"default": {"max_partitions": 2.5}}}, "max_partitions"),
        ({"limits": {"default": {"max_duration": "forever"}}}, "max_duration"),
        ({"limits": {"default": {"max_gpu_hours_day": -1}}}, "max_gpu_hours_day"),
        ({"limits": {"default": {"max_gpu_hours_week": True}}}, "max_gpu_hours_week"),
        ({"limits": {"users": {"alice": {"max_share": 2}}}}, "limits.users.alice"),
        ({"limits": {"users": {"alice": 3}}}, "alice"),
        ({"limits": {"group": {}}}, "limits.group"),
        ({"limits": 5}, "limits"),
        ({"fairshare": {"half_life": "soon"}}, "half_life"),
        ({"fairshare": {"age_weight": 0}}, "age_weight"),
        ({"fairshare": {"decay": 1}}, "fairshare.decay"),
        ({"devices": {"0": {"reservable_share": 1.5}}}, "devices.0.reservable_share"),
        ({"devices": {"0": {"share": 0.5}}}, "devices.0.share"),
        ({"devices": {"gpu0": {"reservable_share": 0.5}}}, "devices.gpu0"),
    ],
)
def test_a_bad_policy_is_refused_naming_the_key(data: dict[str, Any], named: str) -> None:
    with pytest.raises(BadRequest) as info:
        parse_config(data, "policy.toml")
    message = str(info.value)
    assert named in message, message
    assert message.startswith("policy.toml"), message
    assert "\n" not in message


def test_a_policy_file_with_bad_toml_is_refused_naming_the_file(tmp_path: Path) -> None:
    path = tmp_path / "config.toml"
    path.write_text("[limits.default\nmax_share = 0.5\n")
    with pytest.raises(BadRequest) as info:
        load_config(path)
    assert str(path) in str(info.value)


def test_the_documented_policy_parses_to_what_it_says() -> None:
    doc = (Path(__file__).resolve().parents[2] / "docs" / "POLICY.md").read_text()
    toml = doc.split("```toml\n", 1)[1].split("```", 1)[0]
    import tomllib

    config = parse_config(tomllib.loads(toml), "POLICY.md")
    assert config.grace_s == 30.0 and config.max_duration_s == 7 * DAY
    assert config.max_grace_s == 300.0
    assert config.reservable(0) == 0.8 and config.reservable(1) == 1.0
    assert config.fairshare_half_life_s == 7 * DAY and config.fairshare_age_weight == 1.0
    assert config.limits_for("bob") == Limits(
        max_share=0.5,
        max_total_share=1.0,
        max_duration_s=8 * H,
        max_partitions=3,
        max_gpu_hours_day=8,
        max_gpu_hours_week=30,
        max_waiting=4,
        max_bookings=20,
    )
    assert config.limits_for("alice").max_share == 1.0
    assert config.limits_for("alice").max_partitions == 3  # the rest comes from default


def test_a_missing_policy_file_means_the_defaults(tmp_path: Path) -> None:
    assert load_config(tmp_path / "absent.toml") == Config()


# ------------------------------------------------------- rolling windows, exhaustively

spans = st.lists(
    st.tuples(
        st.integers(-40, 40),
        st.integers(1, 30),
        st.sampled_from([0.25, 0.5, 1.0]),
        st.sampled_from([ACTIVE, BOOKED, RELEASED]),
        st.integers(0, 30),
    ),
    max_size=8,
)


@settings(max_examples=150, deadline=None)
@given(
    spans=spans,
    start=st.integers(0, 30),
    length=st.integers(1, 30),
    fraction=st.sampled_from([0.25, 0.5, 1.0]),
    window_h=st.sampled_from([6, 24]),
)
@example(  # found by hypothesis: the busiest window only touches the ask's end
    spans=[(0, 1, 0.25, ACTIVE, 0)] * 4
    + [(-1, 1, 0.25, ACTIVE, 0), (6, 1, 0.25, RELEASED, 0), (7, 6, 0.5, ACTIVE, 0)],
    start=0,
    length=7,
    fraction=0.25,
    window_h=6,
)
def test_gpu_hours_limit_checks_the_busiest_window_of_all(
    spans: list[tuple[int, int, float, str, int]],
    start: int,
    length: int,
    fraction: float,
    window_h: int,
) -> None:
    """The rolling limit holds iff no window of the length, anywhere, goes over it."""
    now = T0
    mine = []
    for i, (s, d, f, state, cut) in enumerate(spans):
        begin = now + s * H
        ended = begin + cut * H if state == RELEASED else None
        if state == BOOKED and begin <= now:
            state = ACTIVE
        mine.append(rec(begin, begin + d * H, f, state=state, ended_at=ended, pid=f"p{i}"))
    a = ask(fraction, now + start * H, now + (start + length) * H)
    intervals = [
        (r.starts_at, min(r.expires_at, r.ended_at or r.expires_at), r.memory_fraction)
        for r in mine
    ] + [(a.start, a.end, fraction)]
    edges = {x for s, e, _ in intervals for x in (s, e)}
    window = window_h * H
    worst = (
        max(
            sum(w * max(0.0, min(lo + window, e) - max(lo, s)) for s, e, w in intervals)
            for x in edges
            for lo in (x, x - window)
            if lo <= a.end and lo + window >= a.start  # the windows touching it: the closure
        )
        / 3600.0
    )
    limit = 8.0
    limits = Limits(max_gpu_hours_day=limit) if window_h == 24 else None
    if limits is None:  # the same check, for a window of another length
        from chronos.policy import _busiest_window

        used, added = _busiest_window(mine, a, window, now)
        assert used + added == pytest.approx(worst)
        return
    if worst > limit + 1e-6:
        refusal(limits, a, mine)
    elif worst < limit - 1e-6:
        check_limits(limits, a, mine, now)
