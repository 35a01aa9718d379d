"""The daemon's clock: wall-clock seconds that never jump.

The ledger stores wall-clock times (users read them, bookings name them), but
the daemon must not act on a wall clock that steps: a ``date -s`` or a bad
NTP server moving it a day ahead would expire every partition at the next
request, and an hour back would keep a five-second partition for an hour.

So the daemon's ``now`` is the wall time at start-up plus the *monotonic* time
elapsed since: partitions last their real duration whatever the wall clock
does. When the wall clock moves away from it by more than :data:`STEP_S` (a
step, not NTP's gentle slewing, which moves both clocks alike), the daemon
shifts every open partition by the step in one transaction and re-bases onto
the new wall time (see Deadlines.check_clock), so remaining times are kept
and the times shown to users agree with the machine's clock again.
"""

from __future__ import annotations

import time
from collections.abc import Callable

STEP_S = 1.0
"""A discrepancy between wall and monotonic time above this is a step."""


class SteadyClock:
    def __init__(
        self,
        wall: Callable[[], float] = lambda: time.time(),
        monotonic: Callable[[], float] = time.monotonic,
    ) -> None:
        # ``wall`` looks time.time up at each call, so a test can replace it in the process.
        self._wall = wall
        self._monotonic = monotonic
        self._base_wall = wall()
        self._base_mono = monotonic()

    def now(self) -> float:
        """Wall-clock seconds as of the last re-base, advanced by monotonic time."""
        return self._base_wall + (self._monotonic() - self._base_mono)

    def step(self) -> float:
        """How far the wall clock has stepped away from :meth:`now` (0.0 if not beyond STEP_S)."""
        offset = self._wall() - self.now()
        return offset if abs(offset) > STEP_S else 0.0

    def rebase(self, step: float) -> None:
        """Move this clock by ``step`` (what the open partitions were just shifted by)."""
        self._base_wall += step
