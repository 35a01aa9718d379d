"""One plan for stopping processes: (warn) → SIGTERM → grace → SIGKILL → done.

Three places stop processes: chronosd (``daemon/stopper.py``: a partition's end,
a memory violation, a leftover supervisor), the ``chronos run`` supervisor
(``supervisor.py``) and the API's expiry thread (``api.py``). They wait in
different ways (asyncio timers, ``sigtimedwait``, a thread) and find their
processes differently, but the steps and their times are the same, so they
are written once here, pure: times in, stages out, no clock, no signals.

A plan starts at :meth:`Escalation.begin` (``WARNED`` if it warns first, else
``TERMINATED``: send SIGTERM) and each :meth:`~Escalation.advance` at or after
``due_at`` moves it one stage on: ``WARNED`` → ``TERMINATED`` → ``KILLED``
(send SIGKILL). ``due_at`` is None when nothing more is planned (the caller then
waits for the processes to exit), never an infinite or far-future stand-in.
"""

from __future__ import annotations

import signal
from dataclasses import dataclass
from enum import StrEnum


class Stage(StrEnum):
    RUNNING = "running"
    """Nothing done yet."""
    WARNED = "warned"
    """Told, not signalled: the processes have the grace to let go of the GPU."""
    TERMINATED = "terminated"
    """SIGTERM sent; SIGKILL at ``due_at`` unless the plan ends here."""
    KILLED = "killed"
    """SIGKILL sent: nothing more to do but wait for the exit."""
    DONE = "done"
    """The processes are gone (or no longer concern the plan)."""


SIGNAL_OF = {Stage.TERMINATED: signal.SIGTERM, Stage.KILLED: signal.SIGKILL}
"""The signal a driver sends on entering a stage (the others send none)."""
_NEXT = {Stage.WARNED: Stage.TERMINATED, Stage.TERMINATED: Stage.KILLED}


@dataclass
class Escalation:
    """The escalation for one set of processes, as explicit state and times."""

    grace_s: float
    """Time between two stages (SIGTERM → SIGKILL; warning → SIGTERM)."""
    warn_first: bool = False
    """Begin with a warning (``WARNED``) instead of SIGTERM."""
    last: Stage = Stage.KILLED
    """The furthest stage this plan goes (the API stops at ``TERMINATED``)."""
    stage: Stage = Stage.RUNNING
    due_at: float | None = None
    """When the next stage falls due; None once nothing more is planned."""

    def begin(self, now: float) -> Stage:
        """Start the plan at ``now``: the first stage, entered now."""
        return self._enter(Stage.WARNED if self.warn_first else Stage.TERMINATED, now)

    def advance(self, now: float) -> Stage | None:
        """The stage entered at ``now``, if one fell due; None if nothing did."""
        if self.due_at is None or now < self.due_at:
            return None
        following = _NEXT.get(self.stage)
        if following is None:
            self.due_at = None
            return None
        return self._enter(following, now)

    def finish(self) -> None:
        """The processes are gone: nothing more is due."""
        self.stage, self.due_at = Stage.DONE, None

    @property
    def signal(self) -> signal.Signals | None:
        """The signal of the current stage (SIGTERM, SIGKILL) or None."""
        return SIGNAL_OF.get(self.stage)

    @property
    def signalled(self) -> bool:
        """Whether SIGTERM (or more) has been sent."""
        return self.stage in (Stage.TERMINATED, Stage.KILLED)

    def _enter(self, stage: Stage, now: float) -> Stage:
        self.stage = stage
        self.due_at = None if stage == self.last or stage not in _NEXT else now + self.grace_s
        return stage
