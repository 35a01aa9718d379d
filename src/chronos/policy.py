"""Fair sharing: quotas, fair-share priority and the backfill rule, as pure functions.

Everything here works on plain records and explicit times, so the ledger can
call it inside its write transaction (quotas then hold under races) and tests
can drive it with any clock.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from chronos.errors import AdmissionRefused
from chronos.models import ACTIVE, BOOKED, PartitionRecord
from chronos.units import format_duration

if TYPE_CHECKING:  # only for annotations: keeps tomllib out of the CLI's import
    from chronos.config import Limits

DAY = 86400.0
WEEK = 7 * DAY

Interval = tuple[float, float, int, str]
"""(start, end, bytes, id) of something holding a device."""


@dataclass(frozen=True)
class Ask:
    """What a user asks for, in the terms quotas speak."""

    user: str
    device: int
    fraction: float
    start: float
    end: float


def held_until(record: PartitionRecord, now: float) -> float:
    """When ``record`` stops (or stopped) holding its share."""
    if record.state in (ACTIVE, BOOKED):
        return record.expires_at
    return min(record.expires_at, record.ended_at or record.expires_at)


def gpu_hours(records: Iterable[PartitionRecord], lo: float, hi: float, now: float) -> float:
    """Fraction × hours of ``records`` that falls inside ``[lo, hi)``."""
    total = 0.0
    for r in records:
        overlap = min(hi, held_until(r, now)) - max(lo, r.starts_at)
        if overlap > 0:
            total += r.memory_fraction * overlap / 3600.0
    return total


def check_limits(limits: Limits, ask: Ask, mine: Sequence[PartitionRecord], now: float) -> None:
    """Raise :class:`AdmissionRefused` naming the first limit ``ask`` would break.

    ``mine`` are the user's partitions (open ones, and ended ones of the last week).
    """
    duration = ask.end - ask.start
    open_now = [r for r in mine if r.state in (ACTIVE, BOOKED) and r.expires_at > now]
    if limits.max_share is not None and ask.fraction > limits.max_share + 1e-9:
        raise _over(
            "max_share",
            f"{ask.fraction:.1%} of a GPU asked, at most {limits.max_share:.1%} per partition",
        )
    if limits.max_duration_s is not None and duration > limits.max_duration_s + 1e-6:
        raise _over(
            "max_duration",
            f"{format_duration(duration)} asked, at most {format_duration(limits.max_duration_s)}",
        )
    if limits.max_partitions is not None:
        at_once = peak_count(open_now, ask.start, ask.end)
        if at_once >= limits.max_partitions:
            raise _over(
                "max_partitions",
                f"{ask.user} already holds {at_once} partition(s) "
                f"at once then, at most {limits.max_partitions}",
            )
    if limits.max_total_share is not None:
        held = peak_share(open_now, ask.start, ask.end)
        if held + ask.fraction > limits.max_total_share + 1e-9:
            raise _over(
                "max_total_share",
                f"{ask.user} holds {held:.1%} then, asks "
                f"{ask.fraction:.1%}, at most {limits.max_total_share:.1%} at once",
            )
    for name, window, limit in (
        ("max_gpu_hours_day", DAY, limits.max_gpu_hours_day),
        ("max_gpu_hours_week", WEEK, limits.max_gpu_hours_week),
    ):
        if limit is None:
            continue
        used, added = _busiest_window(mine, ask, window, now)
        if used + added > limit + 1e-9:
            span = "24 h" if window == DAY else "7 days"
            raise _over(
                name,
                f"{ask.user} has {used:.2f} GPU-hours in the busiest {span} "
                f"around it, asks {added:.2f} more, at most {limit:g}",
            )


def _busiest_window(
    mine: Sequence[PartitionRecord], ask: Ask, window: float, now: float
) -> tuple[float, float]:
    """(GPU-hours already held, GPU-hours asked) in the rolling window that would hold most.

    Every window of length ``window`` that overlaps the ask counts, not only the
    one ending with it: a booking placed before an existing one must not push
    a later day over. The total is piecewise linear in the window's position,
    so its maximum is where a window edge meets a partition's start or end;
    each candidate is summed in O(log n) from a running total of share-seconds.
    """
    change: dict[float, float] = {}
    for r in mine:
        start, end = r.starts_at, held_until(r, now)
        if start < end and start < ask.end + window and end > ask.start - window:
            change[start] = change.get(start, 0.0) + r.memory_fraction
            change[end] = change.get(end, 0.0) - r.memory_fraction
    times = sorted(change)
    before: list[float] = []  # share-seconds held before times[i]
    level_from: list[float] = []  # share held from times[i] to the next time
    level = total = 0.0
    for i, t in enumerate(times):
        if i:
            total += level * (t - times[i - 1])
        before.append(total)
        level += change[t]
        level_from.append(level)

    def held_before(t: float) -> float:
        i = bisect_right(times, t) - 1
        return 0.0 if i < 0 else before[i] + level_from[i] * (t - times[i])

    best = (0.0, 0.0)
    for edge in {ask.start, ask.end, *times}:
        for lo in (edge, edge - window):
            hi = lo + window
            if hi <= ask.start or lo >= ask.end:
                continue
            used = (held_before(hi) - held_before(lo)) / 3600.0
            added = ask.fraction * (min(hi, ask.end) - max(lo, ask.start)) / 3600.0
            if used + added > sum(best):
                best = (used, added)
    return best


def peak_share(records: Sequence[PartitionRecord], start: float, end: float) -> float:
    """Largest sum of fractions of ``records`` open at one instant of ``[start, end)``."""
    return _peak(records, start, end, lambda r: r.memory_fraction)


def peak_count(records: Sequence[PartitionRecord], start: float, end: float) -> int:
    """Most of ``records`` open at one instant of ``[start, end)``."""
    return int(_peak(records, start, end, lambda r: 1.0))


def _peak(
    records: Sequence[PartitionRecord],
    start: float,
    end: float,
    weight: Callable[[PartitionRecord], float],
) -> float:
    points: list[tuple[float, float]] = []
    for r in records:
        if r.expires_at <= start or r.starts_at >= end:
            continue
        points.append((max(r.starts_at, start), weight(r)))
        points.append((r.expires_at, -weight(r)))
    # At equal times, ends (negative) come first: a partition ending at t frees room at t.
    points.sort()
    level = peak = 0.0
    for _, delta in points:
        level += delta
        peak = max(peak, level)
    return peak


def _over(limit: str, standing: str) -> AdmissionRefused:
    return AdmissionRefused(f"over the {limit} limit: {standing}")


def decayed_usage(records: Iterable[PartitionRecord], now: float, half_life: float) -> float:
    """GPU-hours held, each hour weighted 0.5^(age / half_life) (age at its end)."""
    total = 0.0
    for r in records:
        end = min(held_until(r, now), now)
        if end <= r.starts_at:
            continue
        hours = r.memory_fraction * (end - r.starts_at) / 3600.0
        total += hours * 0.5 ** ((now - end) / half_life)
    return total


def priority(usage_gpu_hours: float, waited_s: float, age_weight: float) -> float:
    """Lower goes first. Waiting lowers it without bound, so nobody waits forever."""
    return usage_gpu_hours - age_weight * waited_s / 3600.0


def peak_usage(intervals: Sequence[Interval], start: float, end: float) -> int:
    """Most bytes held at any instant of ``[start, end)``."""
    points: list[tuple[float, int]] = []
    for s, e, nbytes, _ in intervals:
        if e <= start or s >= end:
            continue
        points.append((max(s, start), nbytes))
        points.append((e, -nbytes))
    # At equal times, ends (negative) come first: a partition ending at t frees room at t.
    points.sort(key=lambda p: (p[0], p[1]))
    peak = level = 0
    for _, delta in points:
        level += delta
        peak = max(peak, level)
    return peak


def earliest_fit(
    intervals: Sequence[Interval], nbytes: int, duration: float, not_before: float, capacity: int
) -> float | None:
    """The first moment from ``not_before`` on when ``nbytes`` fits for ``duration``."""
    if nbytes > capacity:
        return None
    candidates = sorted({not_before} | {e for _, e, _, _ in intervals if e > not_before})
    for t in candidates:
        if peak_usage(intervals, t, t + duration) + nbytes <= capacity:
            return t
    return None


@dataclass(frozen=True)
class Waiter:
    """A queued request, as the planner sees it."""

    id: str
    device_uuid: str
    memory_bytes: int
    duration_s: float
    capacity_bytes: int


@dataclass(frozen=True)
class Plan:
    grant: list[str]
    """Waiters that fit now without delaying anyone ahead of them, in order."""
    estimated_start: dict[str, float | None]
    """For every waiter not granted, when it would start if nothing else changed."""


def plan_queue(ordered: Sequence[Waiter], intervals: dict[str, list[Interval]], now: float) -> Plan:
    """Conservative backfill over waiters already in priority order.

    Each waiter that does not fit now is given a virtual reservation at its
    earliest fit; later (lower-priority) waiters must fit around those, so a
    small request may start ahead of a large one only when it cannot delay it.
    """
    held = {uuid: list(ints) for uuid, ints in intervals.items()}
    grant: list[str] = []
    estimate: dict[str, float | None] = {}
    for w in ordered:
        ints = held.setdefault(w.device_uuid, [])
        start = earliest_fit(ints, w.memory_bytes, w.duration_s, now, w.capacity_bytes)
        if start is not None and start <= now:
            grant.append(w.id)
        else:
            estimate[w.id] = start
        if start is not None:
            ints.append((start, start + w.duration_s, w.memory_bytes, w.id))
    return Plan(grant, estimate)
