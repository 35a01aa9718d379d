"""The placement rule (chronos.placement), alone: which GPUs Chronos picks, and why."""

from __future__ import annotations

from helpers import GIB

from chronos.placement import UNKNOWN_LINK, Candidate, place

CAP = 80 * GIB


def gpu(index: int, peak: int = 0, need: int = 20 * GIB, mine: int = 0) -> Candidate:
    return Candidate(index, CAP, need, peak, mine)


def no_topology(a: int, b: int) -> int | None:
    return None


def islands(*groups: set[int]) -> object:
    def level(a: int, b: int) -> int | None:
        return 0 if any(a in g and b in g for g in groups) else 50

    return level


def test_best_fit_takes_the_gpu_left_fullest() -> None:
    chosen = place([gpu(0, 10 * GIB), gpu(1, 50 * GIB), gpu(2, 30 * GIB)], 1, no_topology)
    assert chosen is not None and chosen.devices == (1,)
    assert "best fit" in chosen.reason


def test_a_gpu_without_room_is_never_chosen() -> None:
    chosen = place([gpu(0, 70 * GIB), gpu(1, 10 * GIB)], 1, no_topology)
    assert chosen is not None and chosen.devices == (1,)
    assert place([gpu(0, 70 * GIB), gpu(1, 61 * GIB)], 1, no_topology) is None


def test_whole_free_gpus_are_kept_for_whole_gpu_requests() -> None:
    """A free GPU that leaves less (a smaller one) would win on best fit alone; the rule
    keeps free GPUs whole first."""
    small_free = Candidate(0, 40 * GIB, 20 * GIB, 0)  # leaves 20 GiB, but is whole-free
    big_used = Candidate(1, CAP, 20 * GIB, 10 * GIB)  # leaves 50 GiB
    chosen = place([small_free, big_used], 1, no_topology)
    assert chosen is not None and chosen.devices == (1,)
    whole = place([gpu(0, 10 * GIB, need=CAP), gpu(1, 0, need=CAP)], 1, no_topology)
    assert whole is not None and whole.devices == (1,)  # only the free one fits whole


def test_ties_go_to_the_gpu_with_fewest_of_the_users_shares_then_lowest_index() -> None:
    chosen = place([gpu(0, 40 * GIB, mine=2), gpu(1, 40 * GIB, mine=1)], 1, no_topology)
    assert chosen is not None and chosen.devices == (1,)
    chosen = place([gpu(3, 40 * GIB), gpu(1, 40 * GIB), gpu(2, 40 * GIB)], 1, no_topology)
    assert chosen is not None and chosen.devices == (1,)


def test_several_gpus_prefer_linked_sets_before_best_fit() -> None:
    # GPUs 0 and 4 are the best fit (partly used), but not linked; 0-3 and 4-7 are islands.
    candidates = [gpu(i, 40 * GIB if i in (0, 4) else 0) for i in range(8)]
    chosen = place(candidates, 2, islands({0, 1, 2, 3}, {4, 5, 6, 7}))  # type: ignore[arg-type]
    assert chosen is not None and chosen.devices == (0, 1)
    assert "link level 0" in chosen.reason
    unlinked = place(candidates, 2, no_topology)
    assert unlinked is not None and unlinked.devices == (0, 4)
    assert "not available" in unlinked.reason


def test_an_unknown_link_ranks_after_every_known_one() -> None:
    def partial(a: int, b: int) -> int | None:
        return 50 if {a, b} == {1, 2} else None

    chosen = place([gpu(0), gpu(1), gpu(2)], 2, partial)
    assert chosen is not None and chosen.devices == (1, 2)
    assert UNKNOWN_LINK > 50


def test_four_of_eight_gpus_fill_one_island_and_keep_the_other_free() -> None:
    candidates = [gpu(i, 20 * GIB if i == 5 else 0) for i in range(8)]
    chosen = place(candidates, 4, islands({0, 1, 2, 3}, {4, 5, 6, 7}))  # type: ignore[arg-type]
    assert chosen is not None and chosen.devices == (4, 5, 6, 7)


def test_too_few_gpus_with_room_is_no_placement() -> None:
    assert place([gpu(0), gpu(1, 70 * GIB)], 2, no_topology) is None


# ------------------------------------------------------------ the planner's gangs


def test_a_gang_starts_when_every_gpu_has_room_at_once() -> None:
    from chronos.policy import Interval, Profile, common_fit

    gpu0 = Profile([Interval(0, 100, CAP, "a"), Interval(150, 200, CAP, "b")], 0)
    gpu1 = Profile([Interval(0, 120, CAP, "c")], 0)
    # GPU 0 is free over [100, 150) and from 200; GPU 1 from 120: 30 s fits at 120, 60 s at 200.
    assert common_fit([(gpu0, CAP, CAP), (gpu1, CAP, CAP)], 30, 0) == 120
    assert common_fit([(gpu0, CAP, CAP), (gpu1, CAP, CAP)], 60, 0) == 200
    assert common_fit([(gpu0, CAP + 1, CAP)], 10, 0) is None


def test_the_planner_reserves_a_gangs_slot_on_each_gpu_and_smaller_waiters_backfill() -> None:
    from chronos.policy import Interval, Waiter, plan_queue

    held = {"G0": [Interval(0, 100, CAP, "a")], "G1": [Interval(0, 200, CAP, "b")]}
    gang = Waiter("gang", "G0", CAP, 300, CAP, (("G1", CAP, CAP),))
    backfill = Waiter("short", "G0", CAP, 100, CAP)  # fits on G0 in [100, 200)
    late = Waiter("long", "G0", CAP, 150, CAP)  # would run into the gang's slot at 200
    plan = plan_queue([gang, backfill, late], held, 0)
    assert plan.estimated_start["gang"] == 200
    assert plan.estimated_start["short"] == 100
    assert plan.estimated_start["long"] == 500  # after the gang, never before it
