"""Fair sharing: quotas, fair-share priority and the backfill rule, as pure functions.

Everything here works on plain records and explicit times, so the ledger can
call it inside its write transaction (quotas then hold under races) and tests
can drive it with any clock.
"""

from __future__ import annotations

from bisect import bisect_right
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, NamedTuple

from chronos.errors import AdmissionRefused
from chronos.models import ACTIVE, BOOKED, PartitionRecord
from chronos.refusals import OverLimit, refusal
from chronos.units import format_duration

if TYPE_CHECKING:  # only for annotations: keeps tomllib out of the CLI's import
    from chronos.config import Limits

DAY = 86400.0
WEEK = 7 * DAY


class Interval(NamedTuple):
    """Something holding ``memory_bytes`` of a device over ``[start, end)``."""

    start: float
    end: float
    memory_bytes: int
    holder: str
    """The partition's or queued request's id."""


@dataclass(frozen=True)
class Ask:
    """What a user asks for, in the terms quotas speak."""

    user: str
    device: int
    fraction: float
    """Of each GPU asked for (``max_share`` is per GPU)."""
    start: float
    end: float
    gpus: int = 1
    """How many GPUs at ``fraction`` each: totals and GPU-hours count ``fraction × gpus``."""

    @property
    def gpu_equivalents(self) -> float:
        return self.fraction * self.gpus


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
            total += r.gpu_equivalents * overlap / 3600.0
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
    if limits.max_bookings is not None and ask.start > now:
        booked = sum(1 for r in open_now if r.starts_at > now)
        if booked >= limits.max_bookings:
            raise _over(
                "max_bookings",
                f"{ask.user} already has {booked} booking(s), at most {limits.max_bookings}",
            )
    if limits.max_total_share is not None:
        held = peak_share(open_now, ask.start, ask.end)
        if held + ask.gpu_equivalents > limits.max_total_share + 1e-9:
            raise _over(
                "max_total_share",
                f"{ask.user} holds {held:.1%} then, asks "
                f"{ask.gpu_equivalents:.1%}, at most {limits.max_total_share:.1%} at once",
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
            change[start] = change.get(start, 0.0) + r.gpu_equivalents
            change[end] = change.get(end, 0.0) - r.gpu_equivalents
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

    # The windows that overlap the ask form an open range of positions; the total is
    # continuous in the position, so its supremum is at a breakpoint or at one of the
    # range's two ends (a window just touching the ask), which are therefore included.
    best = (0.0, 0.0)
    for edge in {ask.start, ask.end, *times}:
        for lo in (edge, edge - window):
            hi = lo + window
            if hi < ask.start or lo > ask.end:
                continue
            used = (held_before(hi) - held_before(lo)) / 3600.0
            added = ask.gpu_equivalents * (min(hi, ask.end) - max(lo, ask.start)) / 3600.0
            if used + added > sum(best):
                best = (used, added)
    return best


def peak_share(records: Sequence[PartitionRecord], start: float, end: float) -> float:
    """Largest sum of fractions of ``records`` open at one instant of ``[start, end)``."""
    return _peak(records, start, end, lambda r: r.gpu_equivalents)


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


def needs_history(limits: Limits) -> bool:
    """Whether checking ``limits`` needs the user's ended partitions (GPU-hour budgets)."""
    return limits.max_gpu_hours_day is not None or limits.max_gpu_hours_week is not None


def _over(limit: str, standing: str) -> AdmissionRefused:
    return refusal(OverLimit(limit, standing))


def decayed_usage(records: Iterable[PartitionRecord], now: float, half_life: float) -> float:
    """GPU-hours held, each hour weighted 0.5^(age / half_life) (age at its end)."""
    total = 0.0
    for r in records:
        end = min(held_until(r, now), now)
        if end <= r.starts_at:
            continue
        hours = r.gpu_equivalents * (end - r.starts_at) / 3600.0
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
    return Profile(intervals, not_before).fit(nbytes, duration, not_before, capacity)


@dataclass(frozen=True)
class Waiter:
    """A queued request, as the planner sees it (a gang: ``more`` GPUs besides the first)."""

    id: str
    device_uuid: str
    memory_bytes: int
    duration_s: float
    capacity_bytes: int
    more: tuple[tuple[str, int, int], ...] = ()
    """``(device_uuid, memory_bytes, capacity_bytes)`` of each further GPU of a gang."""

    @property
    def needs(self) -> tuple[tuple[str, int, int], ...]:
        """Every GPU's ``(device_uuid, memory_bytes, capacity_bytes)``, the first first."""
        return ((self.device_uuid, self.memory_bytes, self.capacity_bytes), *self.more)


def common_fit(
    needs: Sequence[tuple[Profile, int, int]], duration: float, not_before: float
) -> float | None:
    """The first moment from ``not_before`` on when every ``(profile, nbytes, capacity)``
    has room for ``duration`` at once (a gang's start: all of its GPUs, or none).

    Each GPU's earliest fit from a candidate start is never earlier than the candidate,
    so taking the latest of them and asking again climbs to the common start; it stops
    when every GPU agrees (at most one step per breakpoint of the profiles).
    """
    start = not_before
    while True:
        latest = start
        for profile, nbytes, capacity in needs:
            fit = profile.fit(nbytes, duration, start, capacity)
            if fit is None:
                return None
            latest = max(latest, fit)
        if latest == start:
            return start
        start = latest


@dataclass(frozen=True)
class Plan:
    grant: list[str]
    """Waiters that fit now without delaying anyone ahead of them, in order."""
    estimated_start: dict[str, float | None]
    """For every waiter not granted, when it would start if nothing else changed."""


PLAN_DEPTH = 100
"""Waiters (in priority order) that get a reservation and an estimated start; deeper ones
start only when they fit now around those (Slurm's ``bf_max_job_test``), which keeps a
plan over a thousand waiters to milliseconds."""


class Profile:
    """Bytes held on one device over time, as a step function from ``now`` on.

    ``times[i]`` starts a segment that holds ``levels[i]`` bytes until
    ``times[i + 1]``; the last segment (after everything ends) holds 0. Finding
    where a request fits skips past each segment that is too full, so a plan
    costs about one pass over the profile per waiter instead of a peak
    computation per candidate start.
    """

    def __init__(self, intervals: Iterable[Interval], now: float) -> None:
        deltas: dict[float, int] = {now: 0}
        for s, e, nbytes, _ in intervals:
            if e <= now:
                continue
            s = max(s, now)
            deltas[s] = deltas.get(s, 0) + nbytes
            deltas[e] = deltas.get(e, 0) - nbytes
        self.times = sorted(deltas)
        self.levels: list[int] = []
        level = 0
        for t in self.times:
            level += deltas[t]
            self.levels.append(level)

    def fit(self, nbytes: int, duration: float, not_before: float, capacity: int) -> float | None:
        """The first moment from ``not_before`` on when ``nbytes`` fits for ``duration``."""
        if nbytes > capacity:
            return None
        times, levels, room = self.times, self.levels, capacity - nbytes
        i = max(0, bisect_right(times, not_before) - 1)
        start = max(not_before, times[i])
        n = len(times)
        while True:
            end = start + duration
            j, bad = i, -1
            while j < n and (j == i or times[j] < end):
                if levels[j] > room:
                    bad = j
                j += 1
            if bad < 0:
                return start
            if bad + 1 >= n:  # unreachable: the last segment holds nothing
                return None
            i = bad + 1
            start = times[i]

    def fits_now(self, nbytes: int, duration: float, now: float, capacity: int) -> bool:
        """Whether ``nbytes`` fits over ``[now, now + duration)`` (looks at that window only)."""
        times, levels, room = self.times, self.levels, capacity - nbytes
        i = max(0, bisect_right(times, now) - 1)
        end = now + duration
        for j in range(i, len(times)):
            if j > i and times[j] >= end:
                return True
            if levels[j] > room:
                return False
        return True

    def add(self, start: float, end: float, nbytes: int) -> None:
        """Hold ``nbytes`` more over ``[start, end)``."""
        lo = self._breakpoint(start)
        hi = self._breakpoint(end)
        for k in range(lo, hi):
            self.levels[k] += nbytes

    def _breakpoint(self, t: float) -> int:
        """Index of the segment starting at ``t``, splitting the one that contains it."""
        i = bisect_right(self.times, t) - 1
        if i >= 0 and self.times[i] == t:
            return i
        level = self.levels[i] if i >= 0 else 0
        self.times.insert(i + 1, t)
        self.levels.insert(i + 1, level)
        return i + 1


def plan_queue(
    ordered: Sequence[Waiter],
    intervals: dict[str, list[Interval]],
    now: float,
    depth: int = PLAN_DEPTH,
) -> Plan:
    """Conservative backfill over waiters already in priority order.

    Each waiter that does not fit now is given a virtual reservation at its
    earliest fit; later (lower-priority) waiters must fit around those, so a
    small request may start ahead of a large one only when it cannot delay it.
    Beyond the first ``depth`` waiters nobody gets a reservation or an estimate
    (None): such a waiter starts when it fits now around everyone planned.
    """
    profiles: dict[str, Profile] = {}
    grant: list[str] = []
    estimate: dict[str, float | None] = {}

    def profile_of(uuid: str) -> Profile:
        profile = profiles.get(uuid)
        if profile is None:
            profile = profiles[uuid] = Profile(intervals.get(uuid, []), now)
        return profile

    for n, w in enumerate(ordered):
        needs = [(profile_of(uuid), nbytes, cap) for uuid, nbytes, cap in w.needs]
        if n < depth:
            start = common_fit(needs, w.duration_s, now)
        else:  # the profile starts at now: levels[0] is what is held now (a quick no)
            fits = all(
                p.levels[0] <= cap - nbytes and p.fits_now(nbytes, w.duration_s, now, cap)
                for p, nbytes, cap in needs
            )
            start = now if fits else None
        if start is not None and start <= now:
            grant.append(w.id)
        else:
            estimate[w.id] = start
        if start is not None:  # a gang reserves its slot on every one of its GPUs
            for profile, nbytes, _ in needs:
                profile.add(start, start + w.duration_s, nbytes)
    return Plan(grant, estimate)
