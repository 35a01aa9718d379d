"""The daemon's steady clock: wall-clock seconds that follow monotonic time, and step detection."""

from __future__ import annotations

from chronos.daemon.clock import STEP_S, SteadyClock


class Clocks:
    """A wall and a monotonic clock the test moves by hand."""

    def __init__(self) -> None:
        self.wall_s = 1_000_000.0
        self.mono_s = 50.0

    def wall(self) -> float:
        return self.wall_s

    def mono(self) -> float:
        return self.mono_s

    def tick(self, seconds: float) -> None:
        self.wall_s += seconds
        self.mono_s += seconds


def test_now_follows_monotonic_time_not_a_stepped_wall_clock() -> None:
    c = Clocks()
    clock = SteadyClock(c.wall, c.mono)
    c.tick(10.0)
    assert clock.now() == 1_000_010.0
    c.wall_s += 86400.0  # date -s tomorrow
    assert clock.now() == 1_000_010.0
    assert clock.step() == 86400.0


def test_small_discrepancies_are_not_steps() -> None:
    c = Clocks()
    clock = SteadyClock(c.wall, c.mono)
    c.wall_s += STEP_S * 0.9
    assert clock.step() == 0.0


def test_rebase_moves_the_clock_by_the_step_exactly() -> None:
    c = Clocks()
    clock = SteadyClock(c.wall, c.mono)
    c.tick(5.0)
    c.wall_s -= 3600.0
    step = clock.step()
    assert step == -3600.0
    clock.rebase(step)
    assert clock.now() == c.wall_s
    assert clock.step() == 0.0
    c.tick(2.0)
    assert clock.now() == c.wall_s
