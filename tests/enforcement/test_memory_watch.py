"""MemoryWatch: the hard cap's decision rule, fed synthetic samples at explicit times."""

from __future__ import annotations

import pytest

from chronos.enforcement import MemoryWatch, Violation
from chronos.models import ProcessUse

from .support import GIB, record


def use(
    pid: int,
    used: int | None,
    partition_id: str | None = "p1",
    device: int = 0,
    user: str | None = "alice",
    command: str | None = "python train.py",
) -> ProcessUse:
    return ProcessUse(pid, device, used, user, command, partition_id)


P1 = record("p1", memory=10 * GIB)


# ----------------------------------------------------------------------- the hard cap


def test_over_for_less_than_grace_is_not_a_violation() -> None:
    watch = MemoryWatch(grace_s=0.5)
    assert watch.observe(100.0, [P1], [use(10, 12 * GIB)]) == []
    assert watch.observe(100.2, [P1], [use(10, 12 * GIB)]) == []
    assert watch.observe(100.49, [P1], [use(10, 12 * GIB)]) == []


def test_a_brief_spike_that_goes_back_under_restarts_the_grace() -> None:
    watch = MemoryWatch(grace_s=0.5)
    assert watch.observe(0.0, [P1], [use(10, 12 * GIB)]) == []
    assert watch.observe(0.3, [P1], [use(10, 2 * GIB)]) == []
    assert watch.observe(0.6, [P1], [use(10, 12 * GIB)]) == []  # over again: a new grace
    assert watch.observe(1.0, [P1], [use(10, 12 * GIB)]) == []
    assert len(watch.observe(1.1, [P1], [use(10, 12 * GIB)])) == 1


def test_exactly_the_partition_bytes_is_not_over() -> None:
    watch = MemoryWatch(grace_s=0.0)
    assert watch.observe(0.0, [P1], [use(10, 4 * GIB), use(11, 6 * GIB)]) == []
    assert watch.observe(5.0, [P1], [use(10, 4 * GIB), use(11, 6 * GIB)]) == []


def test_over_for_the_grace_is_one_violation_with_bytes_and_pids() -> None:
    watch = MemoryWatch(grace_s=0.5)
    procs = [use(31, 7 * GIB), use(12, 5 * GIB), use(20, None)]
    assert watch.observe(10.0, [P1], procs) == []
    found = watch.observe(10.5, [P1], procs)
    assert found == [
        Violation(
            kind="memory",
            partition_id="p1",
            pids=(12, 20, 31),
            used_bytes=12 * GIB,
            allowed_bytes=10 * GIB,
            device=0,
            over_since=10.0,
        )
    ]


def test_a_violation_is_reported_once_while_still_over() -> None:
    watch = MemoryWatch(grace_s=0.2)
    watch.observe(0.0, [P1], [use(10, 11 * GIB)])
    assert len(watch.observe(0.2, [P1], [use(10, 11 * GIB)])) == 1
    for t in (0.3, 0.4, 1.0, 5.0):
        assert watch.observe(t, [P1], [use(10, 11 * GIB)]) == [], t


def test_reported_again_after_going_under_then_over() -> None:
    watch = MemoryWatch(grace_s=0.2)
    watch.observe(0.0, [P1], [use(10, 11 * GIB)])
    assert len(watch.observe(0.3, [P1], [use(10, 11 * GIB)])) == 1
    assert watch.observe(0.4, [P1], [use(10, 9 * GIB)]) == []
    assert watch.observe(1.0, [P1], [use(10, 11 * GIB)]) == []  # the grace starts over
    again = watch.observe(1.5, [P1], [use(10, 11 * GIB)])
    assert len(again) == 1
    assert again[0].over_since == 1.0


def test_zero_grace_reports_on_the_first_sample_over() -> None:
    watch = MemoryWatch(grace_s=0.0)
    found = watch.observe(3.0, [P1], [use(10, 10 * GIB + 1)])
    assert [(v.kind, v.used_bytes, v.over_since) for v in found] == [("memory", 10 * GIB + 1, 3.0)]


def test_each_partition_is_judged_on_its_own_bytes() -> None:
    p2 = record("p2", memory=20 * GIB)
    watch = MemoryWatch(grace_s=0.0)
    procs = [use(10, 15 * GIB, "p1"), use(11, 15 * GIB, "p2")]
    found = watch.observe(0.0, [P1, p2], procs)
    assert [(v.partition_id, v.pids) for v in found] == [("p1", (10,))]


def test_memory_of_a_process_of_no_open_partition_does_not_count() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="off")
    # "gone" is not among the open records: its process is charged to nobody.
    assert watch.observe(0.0, [P1], [use(10, 50 * GIB, "gone"), use(11, 1 * GIB)]) == []


def test_a_closed_partition_forgets_that_it_was_over() -> None:
    watch = MemoryWatch(grace_s=0.5)
    watch.observe(0.0, [P1], [use(10, 11 * GIB)])
    watch.observe(0.2, [], [])  # p1 no longer open
    assert watch.observe(0.6, [P1], [use(10, 11 * GIB)]) == []  # a fresh grace, not 0.6 s over


# ------------------------------------------------------------------------- devices


def test_memory_on_another_device_does_not_count_toward_the_partition() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="off")
    procs = [use(10, 6 * GIB, device=0), use(10, 30 * GIB, device=1)]
    assert watch.observe(0.0, [P1], procs) == []
    assert watch.usage["p1"].used_bytes == 6 * GIB


def test_memory_on_another_device_counts_as_unpartitioned() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="enforce")
    procs = [use(10, 6 * GIB, device=0), use(10, 30 * GIB, device=1)]
    found = watch.observe(0.0, [P1], procs)
    assert [(v.kind, v.partition_id, v.pids, v.used_bytes, v.device) for v in found] == [
        ("unpartitioned", None, (10,), 30 * GIB, 1)
    ]


def test_memory_on_another_device_is_warned_about_under_warn() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="warn")
    procs = [use(10, 6 * GIB, device=0), use(10, 30 * GIB, device=1)]
    assert watch.observe(0.0, [P1], procs) == []
    assert [(p.pid, p.device) for p in watch.warnings(procs)] == [(10, 1)]


# ------------------------------------------------------------------ unpartitioned


def stray(pid: int, used: int | None = 2 * GIB, **kw: str) -> ProcessUse:
    return use(pid, used, partition_id=None, **kw)  # type: ignore[arg-type]


@pytest.mark.parametrize("policy", ["off", "warn"])
def test_unpartitioned_memory_is_never_stopped_unless_enforced(policy: str) -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned=policy)
    for t in (0.0, 1.0, 60.0):
        assert watch.observe(t, [P1], [stray(50, 70 * GIB)]) == []


def test_enforce_stops_unpartitioned_memory_after_the_grace() -> None:
    watch = MemoryWatch(grace_s=0.3, unpartitioned="enforce")
    assert watch.observe(0.0, [], [stray(50)]) == []
    assert watch.observe(0.2, [], [stray(50)]) == []
    found = watch.observe(0.3, [], [stray(50)])
    assert found == [Violation("unpartitioned", None, (50,), 2 * GIB, 0, 0, 0.0)]
    assert watch.observe(0.4, [], [stray(50)]) == []  # once


def test_enforce_restarts_the_grace_for_a_process_that_went_away() -> None:
    watch = MemoryWatch(grace_s=0.3, unpartitioned="enforce")
    watch.observe(0.0, [], [stray(50)])
    assert len(watch.observe(0.3, [], [stray(50)])) == 1
    watch.observe(0.4, [], [])
    assert watch.observe(0.5, [], [stray(50)]) == []
    assert len(watch.observe(0.8, [], [stray(50)])) == 1


def test_enforce_restarts_the_grace_for_a_process_that_freed_its_memory() -> None:
    watch = MemoryWatch(grace_s=0.3, unpartitioned="enforce")
    watch.observe(0.0, [], [stray(50)])
    watch.observe(0.1, [], [stray(50, 0)])  # still listed by the driver, holding nothing
    watch.observe(5.0, [], [stray(50, 0)])
    assert watch.observe(5.1, [], [stray(50)]) == []  # holds memory again: a fresh grace
    assert len(watch.observe(5.4, [], [stray(50)])) == 1


def test_enforce_ignores_processes_holding_nothing() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="enforce")
    assert watch.observe(0.0, [], [stray(50, 0), stray(51, None)]) == []


def test_warnings_once_per_pid() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="warn")
    procs = [stray(50), stray(51), use(10, 1 * GIB), stray(52, 0)]
    watch.observe(0.0, [P1], procs)
    assert [p.pid for p in watch.warnings(procs)] == [50, 51]
    watch.observe(1.0, [P1], procs)
    assert watch.warnings(procs) == []
    later = [*procs, stray(53)]
    watch.observe(2.0, [P1], later)
    assert [p.pid for p in watch.warnings(later)] == [53]


def test_exempt_users_and_commands_are_neither_stopped_nor_warned() -> None:
    watch = MemoryWatch(
        grace_s=0.0,
        unpartitioned="enforce",
        exempt_users=frozenset({"gdm"}),
        exempt_commands=frozenset({"Xorg", "nvidia-persistenced"}),
    )
    procs = [
        stray(60, user="gdm", command="/usr/libexec/gnome-shell"),
        stray(61, user="root", command="/usr/lib/xorg/Xorg :0 -nolisten tcp"),
        stray(62, user="root", command="nvidia-persistenced --verbose"),
        stray(63, user="bob", command="/usr/bin/python3 mine.py"),
    ]
    assert [v.pids for v in watch.observe(0.0, [], procs)] == [(63,)]
    assert [p.pid for p in watch.warnings(procs)] == [63]


def test_exempt_command_matches_the_program_not_a_substring() -> None:
    watch = MemoryWatch(grace_s=0.0, unpartitioned="enforce", exempt_commands=frozenset({"Xorg"}))
    procs = [stray(70, command="/home/bob/Xorg-not-really --x"), stray(71, command="python Xorg")]
    assert sorted(v.pids[0] for v in watch.observe(0.0, [], procs)) == [70, 71]


# ----------------------------------------------------------------------- accounting


def test_usage_peak_and_byte_seconds() -> None:
    watch = MemoryWatch(grace_s=100.0)
    watch.observe(0.0, [P1], [use(10, 1 * GIB)])
    watch.observe(2.0, [P1], [use(10, 3 * GIB), use(11, 1 * GIB)])
    watch.observe(3.0, [P1], [use(10, 2 * GIB)])
    watch.observe(5.0, [P1], [])
    acc = watch.usage["p1"]
    assert acc.peak_bytes == 4 * GIB
    assert acc.used_bytes == 0
    # 1 GiB for 2 s + 4 GiB for 1 s + 2 GiB for 2 s
    assert acc.byte_seconds == pytest.approx(float(2 * GIB + 4 * GIB + 4 * GIB))
    assert acc.last_at == 5.0


def test_usage_counts_only_the_partitions_device() -> None:
    watch = MemoryWatch(grace_s=100.0, unpartitioned="off")
    watch.observe(0.0, [P1], [use(10, 1 * GIB), use(10, 9 * GIB, device=1)])
    watch.observe(1.0, [P1], [use(10, 1 * GIB), use(10, 9 * GIB, device=1)])
    assert watch.usage["p1"].peak_bytes == 1 * GIB
    assert watch.usage["p1"].byte_seconds == pytest.approx(float(GIB))


def test_finish_returns_the_usage_and_forgets_the_partition() -> None:
    watch = MemoryWatch(grace_s=0.0)
    watch.observe(0.0, [P1], [use(10, 12 * GIB)])
    watch.observe(1.0, [P1], [use(10, 12 * GIB)])
    done = watch.finish("p1")
    assert done is not None
    assert done.peak_bytes == 12 * GIB
    assert done.byte_seconds == pytest.approx(12.0 * GIB)
    assert "p1" not in watch.usage
    assert watch.finish("p1") is None
    assert watch.finish("never-seen") is None


def test_a_partition_with_no_process_accounts_zero() -> None:
    watch = MemoryWatch(grace_s=0.0)
    watch.observe(0.0, [P1], [])
    watch.observe(10.0, [P1], [])
    assert watch.usage["p1"].peak_bytes == 0
    assert watch.usage["p1"].byte_seconds == 0.0


# ------------------------------------------------------- time over within a window


def _duty_cycle(watch: MemoryWatch, phase: float, until: float) -> float | None:
    """Sample every 0.1 s a process at 2x the cap for 0.25 s, 0.5x for 0.12 s, repeated."""
    for step in range(int(until / 0.1) + 1):
        t = phase + step * 0.1
        over = (t % 0.37) < 0.25
        if watch.observe(t, [P1], [use(10, (20 if over else 5) * GIB)]):
            return t - phase
    return None


@pytest.mark.parametrize("phase", [0.0, 0.03, 0.05, 0.08, 0.2, 0.3])
def test_duty_cycling_over_the_cap_is_stopped_within_about_a_second(phase: float) -> None:
    stopped_after = _duty_cycle(MemoryWatch(grace_s=0.3), phase, until=5.0)
    assert stopped_after is not None, "2x the cap 68% of the time was never stopped"
    assert stopped_after <= 1.5


def test_one_sample_under_does_not_forgive_the_time_over() -> None:
    watch = MemoryWatch(grace_s=0.3)
    for t in (0.0, 0.1, 0.2):
        assert watch.observe(t, [P1], [use(10, 12 * GIB)]) == []
    assert watch.observe(0.25, [P1], [use(10, 2 * GIB)]) == []
    assert watch.observe(0.3, [P1], [use(10, 12 * GIB)]) == []
    assert len(watch.observe(0.4, [P1], [use(10, 12 * GIB)])) == 1  # 0.2 s + 0.1 s over


def test_a_single_spike_shorter_than_the_grace_is_allowed_however_it_is_sampled() -> None:
    for phase in (0.0, 0.01, 0.05, 0.09):
        watch = MemoryWatch(grace_s=0.3)
        for step in range(40):
            t = step * 0.1 + phase
            over = 1.0 <= t < 1.29  # one 0.29 s spike
            assert watch.observe(t, [P1], [use(10, (12 if over else 5) * GIB)]) == [], (phase, t)


def test_spikes_far_apart_are_each_allowed() -> None:
    watch = MemoryWatch(grace_s=0.3)
    for step in range(100):
        t = step * 0.1
        over = (t % 2.0) < 0.25  # 0.25 s over every 2 s
        assert watch.observe(t, [P1], [use(10, (12 if over else 5) * GIB)]) == [], t
