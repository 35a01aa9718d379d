"""Which GPUs Chronos picks when the user lets it (``--device auto``, ``--gpus N``).

Pure: the service hands in one :class:`Candidate` per GPU (what the share would need
there, the most already held there over the partition's span, the user's own shares
there) and the backend's link levels, and gets back the GPUs and a sentence saying why.
The rule, exactly (docs/PLACEMENT.md says the same):

1. A GPU is *eligible* when the share fits there for the whole span
   (``peak + need <= capacity``). Fewer eligible GPUs than asked: no placement.
2. Sets of ``count`` eligible GPUs are compared by, in order:
   a. *links* (several GPUs only): the worst link level between two of them, lowest
      first (NVML's scale, ``devices.base.LINK_LEVELS``); a pair the backend cannot
      tell about counts as worse than any known level. Then the sum of the levels.
   b. *whole GPUs kept free*: a share smaller than a whole GPU avoids GPUs that nothing
      holds over the span, so whole-GPU requests still find them (fewest such GPUs first).
   c. *best fit*: the least memory left free on the chosen GPUs over the span
      (``capacity - peak - need``, summed).
   d. *spread across users*: fewest of this user's shares on the chosen GPUs.
   e. the lowest indices.
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from itertools import combinations

from chronos.lean import format_bytes

UNKNOWN_LINK = 1000
"""A pair whose link the backend cannot tell: ranked after every known level."""
MAX_SETS = 20_000
"""Most sets of GPUs compared (C(16, 8) is 12,870): past that, only the best-fit GPUs."""


@dataclass(frozen=True)
class Candidate:
    """One GPU as placement sees it for one request."""

    index: int
    capacity_bytes: int
    """What admission may hand out on it."""
    need_bytes: int
    """The share the request would take there."""
    peak_bytes: int
    """The most held there at once over the request's span (partitions, bookings, queue)."""
    mine: int = 0
    """How many of this user's partitions hold a share there over the span."""

    @property
    def fits(self) -> bool:
        return self.peak_bytes + self.need_bytes <= self.capacity_bytes

    @property
    def left_bytes(self) -> int:
        return self.capacity_bytes - self.peak_bytes - self.need_bytes

    @property
    def whole_free(self) -> bool:
        return self.peak_bytes == 0

    @property
    def whole_request(self) -> bool:
        return self.need_bytes >= self.capacity_bytes


@dataclass(frozen=True)
class Placement:
    devices: tuple[int, ...]
    reason: str


LinkLevel = Callable[[int, int], "int | None"]


def place(candidates: Sequence[Candidate], count: int, link_level: LinkLevel) -> Placement | None:
    """The best ``count`` GPUs by the rule above, or ``None`` if fewer than ``count`` fit."""
    eligible = [c for c in candidates if c.fits]
    if len(eligible) < count:
        return None
    sets = _sets(eligible, count)
    links = {pair: _level(link_level, *pair) for pair in _pairs(eligible)} if count > 1 else {}
    best = min(sets, key=lambda chosen: _rank(chosen, links))
    return Placement(tuple(c.index for c in best), _reason(best, links, len(eligible)))


def _sets(eligible: list[Candidate], count: int) -> list[tuple[Candidate, ...]]:
    if _combinations_count(len(eligible), count) <= MAX_SETS:
        return list(combinations(eligible, count))
    by_fit = sorted(eligible, key=lambda c: _own_rank(c))[: max(count, 12)]
    return list(combinations(by_fit, count))


def _combinations_count(n: int, k: int) -> int:
    from math import comb

    return comb(n, k)


def _pairs(eligible: list[Candidate]) -> list[tuple[int, int]]:
    return [(a.index, b.index) for a, b in combinations(eligible, 2)]


def _level(link_level: LinkLevel, a: int, b: int) -> int:
    level = link_level(a, b)
    return UNKNOWN_LINK if level is None else level


def _own_rank(c: Candidate) -> tuple[bool, int, int, int]:
    keeps_whole = c.whole_free and not c.whole_request
    return (keeps_whole, c.left_bytes, c.mine, c.index)


def _rank(
    chosen: tuple[Candidate, ...], links: dict[tuple[int, int], int]
) -> tuple[int, int, int, int, int, tuple[int, ...]]:
    levels = [links[(a.index, b.index)] for a, b in combinations(chosen, 2)]
    worst, total = (max(levels), sum(levels)) if levels else (0, 0)
    whole_taken = sum(1 for c in chosen if c.whole_free and not c.whole_request)
    left = sum(c.left_bytes for c in chosen)
    mine = sum(c.mine for c in chosen)
    return (worst, total, whole_taken, left, mine, tuple(c.index for c in chosen))


def _reason(chosen: tuple[Candidate, ...], links: dict[tuple[int, int], int], eligible: int) -> str:
    gpus = ",".join(str(c.index) for c in chosen)
    left = format_bytes(sum(c.left_bytes for c in chosen))
    parts = [f"GPU {gpus} of {eligible} with room: best fit ({left} left free over the span)"]
    if len(chosen) > 1:
        levels = [links[(a.index, b.index)] for a, b in combinations(chosen, 2)]
        worst = max(levels)
        parts.insert(
            0, "link level not available" if worst == UNKNOWN_LINK else f"link level {worst}"
        )
    taken = sum(1 for c in chosen if c.whole_free and not c.whole_request)
    parts.append(f"{taken} free GPU(s) taken" if taken else "free GPUs kept whole")
    return "; ".join(parts)
