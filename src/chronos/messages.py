"""The typed messages of the daemon protocol: one request class per operation, typed replies.

Each operation's arguments are written here once, as a frozen dataclass, and
everything else is derived from it: the wire schema (``protocol.OPS``: each
field's accepted JSON types from its annotation, required where it has no
default), the validation both modes go through (``protocol.parse_request``, in
the daemon's server and in the embedded transport alike), the arguments the
service's ``op_*`` method reads, and what a client sends (``to_wire``). A
request is built only from arguments that passed validation, so an ``op_*``
method never sees an unknown argument, a wrong type or an out-of-range number.

Replies stay the JSON the daemon has always sent; the one reply that is either
of two things, a create's, is told apart here once (:func:`create_reply`)
rather than by each caller.

Dataclasses, not msgspec: the schema needs our own checks anyway (the 64 KiB
cap before parsing, per-field ranges, the exact refusal wording clients and
tests rely on), and dataclasses cost the full CLI no import it does not already
pay (docs/ARCHITECTURE.md, "Typed messages", has the figures).
"""

import dataclasses
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, ClassVar

if TYPE_CHECKING:
    from chronos.models import PartitionRecord

# No ``from __future__ import annotations`` here: the schema is read from the fields'
# annotations at import time, so they must be real types, not strings.

Spec = str | int | float
"""A memory or duration as given: text (``"10GiB"``, ``"1h30m"``) or a number."""


@dataclass(frozen=True, slots=True, kw_only=True)
class Request:
    """One request; subclasses name their operation (``op``) and declare its arguments."""

    op: ClassVar[str] = ""

    def wire_args(self) -> dict[str, Any]:
        """The arguments as sent: those left unset (None) are not sent at all."""
        return {
            f.name: value
            for f in dataclasses.fields(self)
            if (value := getattr(self, f.name)) is not None
        }


@dataclass(frozen=True, slots=True, kw_only=True)
class PingRequest(Request):
    op: ClassVar[str] = "ping"


@dataclass(frozen=True, slots=True, kw_only=True)
class CreateRequest(Request):
    """A new partition (``start``: a booking ahead; ``wait``: queue it if it does not fit)."""

    op: ClassVar[str] = "create"
    device: int
    memory: Spec
    duration: Spec
    user: str | None = None
    persist: bool = False
    kind: str = "api"
    grace: Spec | None = None
    warn: Spec | None = None
    warn_signal: str | None = None
    start: float | None = None
    wait: bool = False
    timeout: float | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class WaitRequest(Request):
    """Where a queued ticket stands; the daemon holds it up to ``max_wait`` (a long poll)."""

    op: ClassVar[str] = "wait"
    id: str
    max_wait: float = 0.0


@dataclass(frozen=True, slots=True, kw_only=True)
class CancelRequest(Request):
    op: ClassVar[str] = "cancel"
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class QueueRequest(Request):
    op: ClassVar[str] = "queue"
    limit: int | None = None
    after: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class UsageRequest(Request):
    op: ClassVar[str] = "usage"
    since: float | None = None
    user: str | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class ReleaseRequest(Request):
    op: ClassVar[str] = "release"
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class GetRequest(Request):
    op: ClassVar[str] = "get"
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ListRequest(Request):
    op: ClassVar[str] = "list"
    all: bool = False
    limit: int | None = None
    after: int | None = None


@dataclass(frozen=True, slots=True, kw_only=True)
class StatsRequest(Request):
    op: ClassVar[str] = "stats"
    processes: bool = True


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachRequest(Request):
    op: ClassVar[str] = "attach"
    id: str
    pid: int


@dataclass(frozen=True, slots=True, kw_only=True)
class AttachedPidsRequest(Request):
    op: ClassVar[str] = "attached_pids"
    id: str


@dataclass(frozen=True, slots=True, kw_only=True)
class ExtendRequest(Request):
    op: ClassVar[str] = "extend"
    id: str
    duration: Spec


@dataclass(frozen=True, slots=True, kw_only=True)
class EventsRequest(Request):
    op: ClassVar[str] = "events"
    since: float | None = None
    id: str | None = None
    limit: int | None = None
    after: int | None = None


REQUESTS: dict[str, type[Request]] = {
    cls.op: cls
    for cls in (
        PingRequest,
        CreateRequest,
        WaitRequest,
        CancelRequest,
        QueueRequest,
        UsageRequest,
        ReleaseRequest,
        GetRequest,
        ListRequest,
        StatsRequest,
        AttachRequest,
        AttachedPidsRequest,
        ExtendRequest,
        EventsRequest,
    )
}
"""Every operation the daemon answers, by name."""


def accepted_types(annotation: Any) -> tuple[type, ...]:
    """The JSON value types a field takes, from its annotation (``None`` aside).

    A ``float`` field takes an integer too (JSON has one kind of number).
    """
    members = getattr(annotation, "__args__", (annotation,))
    types = tuple(t for t in members if t is not type(None))
    return (int, *types) if float in types and int not in types else types


# ---------------------------------------------------------------------- replies


@dataclass(frozen=True, slots=True)
class Granted:
    """A create that was admitted: the partition, and the environment that shows its GPU."""

    record: "PartitionRecord"
    visible_env: dict[str, str]

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Granted":
        from chronos.models import PartitionRecord

        return cls(PartitionRecord.from_wire(data), dict(data.get("visible_env") or {}))

    def to_wire(self) -> dict[str, Any]:
        return {**self.record.to_wire(), "visible_env": dict(self.visible_env)}


@dataclass(frozen=True, slots=True)
class TicketStatus:
    """A queued request's standing (a create with ``wait`` that did not fit, ``wait``,
    ``cancel``). ``status`` is the whole reply: position, estimate and what it waits for
    while ``waiting``; the granted partition once ``granted``."""

    ticket: str
    state: str
    reason: str | None
    status: dict[str, Any]

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "TicketStatus":
        return cls(str(data["ticket"]), str(data["state"]), data.get("reason"), data)

    @property
    def granted(self) -> "Granted | None":
        """The partition the ticket became, once it was granted."""
        partition = self.status.get("partition")
        return Granted.from_wire(partition) if isinstance(partition, dict) else None


CreateReply = Granted | TicketStatus
"""What a create answers: the partition, or (``wait``, no room now) a place in the queue."""


def create_reply(result: dict[str, Any]) -> CreateReply:
    """A create's reply as its type. The wire tells the two apart by the ``ticket`` key
    (the JSON shape predates these types, and older clients read it)."""
    return TicketStatus.from_wire(result) if "ticket" in result else Granted.from_wire(result)
