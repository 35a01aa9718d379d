"""The words Chronos stores and compares: one ``StrEnum`` per kind of word.

Partition states, event kinds, ticket states and the rest are written to the
ledger, sent on the wire and compared in several modules. Spelling each once
here means a typo is a NameError instead of a silent never-true comparison,
and a reader can see the whole vocabulary in one place.

Every member's value is the exact string the ledger stores (and always has),
and ``StrEnum`` members *are* those strings: ``PartitionState.ACTIVE ==
"active"`` holds, they format as themselves in f-strings and JSON, and SQLite
binds them as text. So an existing ledger file reads the same, and code that
still compares with literals keeps working.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple


class PartitionState(StrEnum):
    """A partition's stored state (``PartitionRecord.state_at`` gives the effective one)."""

    BOOKED = "booked"
    """Starts later (``starts_at`` is in the future)."""
    ACTIVE = "active"
    RELEASED = "released"
    """Ended before (or at) its expiry: by its user, an administrator or its owner's exit."""
    EXPIRED = "expired"


OPEN_STATES = (PartitionState.ACTIVE, PartitionState.BOOKED)
"""States of a partition that still holds (or will hold) its memory."""


class EventKind(StrEnum):
    """What one line of the ledger's history records."""

    CREATED = "created"
    STARTED = "started"
    """A booking's start came."""
    RELEASED = "released"
    EXPIRED = "expired"
    EXTENDED = "extended"
    ATTACHED = "attached"
    SUPERVISED = "supervised"
    """The daemon saw a ``chronos run`` supervisor attach its gated child."""
    REFUSED = "refused"
    WARNED = "warned"
    TERMINATED = "terminated"
    KILLED = "killed"
    MEMORY_EXCEEDED = "memory_exceeded"
    UNPARTITIONED = "unpartitioned"
    USAGE = "usage"
    CLOCK_STEPPED = "clock_stepped"
    QUEUED = "queued"
    QUEUE_CANCELLED = "queue_cancelled"
    QUEUE_TIMEOUT = "queue_timeout"
    QUEUE_REFUSED = "queue_refused"
    EXPIRY_WARNED = "expiry_warned"
    """A gentle end (``on_expiry`` raise/notify): the processes were warned, the SIGTERM
    comes after the grace to those still holding memory."""

    @classmethod
    def queue_closed(cls, state: TicketState) -> EventKind:
        """The event of a ticket that left the queue without a partition."""
        return cls(f"queue_{state}")


ENDED_KINDS = (EventKind.RELEASED, EventKind.EXPIRED)
"""Events that end a partition."""


class TicketState(StrEnum):
    """What became of a queued request."""

    WAITING = "waiting"
    GRANTED = "granted"
    CANCELLED = "cancelled"
    TIMEOUT = "timeout"
    REFUSED = "refused"


class Mode(StrEnum):
    """Where the :class:`~chronos.service.Service` runs."""

    EMBEDDED = "embedded"
    """In the caller's own process, on the shared ledger file."""
    DAEMON = "daemon"
    """In chronosd, for every socket client."""


class Origin(StrEnum):
    """Who made a partition (stored as its ``kind``); Slurm jobs' kinds are ``slurm:<job>``."""

    API = "api"
    API_RAISE = "api-raise"
    """An API partition made with ``on_expiry="raise"``: a gentle end (chronos.expiry)."""
    API_NOTIFY = "api-notify"
    """``on_expiry="notify"``: a gentle end without the exception."""
    CLI = "cli"
    RUN = "run"
    """``chronos run`` (only a label until the daemon sees its supervisor attach)."""
    JOB = "job"
    """A batch job's partition (``chronos submit``; a label: jobs are the ``jobs`` table)."""


class ViolationKind(StrEnum):
    """What the memory watch found."""

    MEMORY = "memory"
    """A partition's processes over its bytes."""
    UNPARTITIONED = "unpartitioned"
    """GPU memory held by a process of no partition, where the policy enforces."""


class RefusalKind(StrEnum):
    """Why admission said no; the values are the ``reason`` label of the refusal metric."""

    QUOTA = "quota"
    """A policy limit (waiting never helps)."""
    CAPACITY = "capacity"
    """No room on the device (now, or ever for this size)."""


class RefusalCause(NamedTuple):
    """A refusal's cause as data: ``quota`` with the limit's name, or ``capacity``.

    (A NamedTuple, not a dataclass: :mod:`chronos.errors` imports this module, and
    light entry points such as the Slurm hooks import the errors.)
    """

    kind: RefusalKind
    limit: str | None = None
    """The policy limit broken (``max_share``, ``max_waiting``, …); None for capacity."""

    @staticmethod
    def quota(limit: str) -> RefusalCause:
        return RefusalCause(RefusalKind.QUOTA, limit)

    @staticmethod
    def capacity() -> RefusalCause:
        return RefusalCause(RefusalKind.CAPACITY)

    def to_detail(self) -> dict[str, str]:
        """The keys a ``refused`` event stores, so readers of history need not parse prose."""
        if self.limit is None:
            return {"cause": self.kind}
        return {"cause": self.kind, "limit": self.limit}


class JobState(StrEnum):
    """A batch job's stored state (``chronos submit``; docs/DAEMON.md, "Batch jobs")."""

    WAITING = "waiting"
    """In the fair queue (or after ``--after`` jobs, or before ``--start``)."""
    STARTING = "starting"
    """Written before the fork: a restarted daemon that finds it never starts it again."""
    RUNNING = "running"
    DONE = "done"
    """The command exited (``exit_code``; None when its end was not seen)."""
    EXPIRED = "expired"
    """Stopped at its partition's expiry."""
    MEMORY = "memory"
    """Stopped for using more GPU memory than its partition."""
    CANCELLED = "cancelled"
    FAILED = "failed"
    """Failed to start (``reason`` says why); its partition was released at once."""


JOB_ENDED = (
    JobState.DONE,
    JobState.EXPIRED,
    JobState.MEMORY,
    JobState.CANCELLED,
    JobState.FAILED,
)
"""States of a job that has ended (``--after`` waits for any of them)."""
