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

Typed named tuples, not dataclasses or msgspec: defining these sixteen classes as
frozen dataclasses cost every ``import chronos.api`` (the API, the full CLI, each
Slurm prolog) about 10 ms more, msgspec about as much for its import and a compiled
dependency besides, ``NamedTuple`` about 1 ms; and the schema needs our own checks
anyway (the 64 KiB cap before parsing, per-field ranges, the exact refusal
wording clients and tests rely on). docs/ARCHITECTURE.md, "Typed messages", has
the figures. Build them with keywords only: their fields are many and in no
order a caller should rely on.
"""

from typing import TYPE_CHECKING, Any, NamedTuple, get_origin

if TYPE_CHECKING:
    from chronos.models import PartitionRecord

# No ``from __future__ import annotations`` here: the schema is read from the fields'
# annotations at import time, so they must be real types, not strings.

Spec = str | int | float
"""A memory or duration as given: text (``"10GiB"``, ``"1h30m"``) or a number."""


class PingRequest(NamedTuple):
    """Who the daemon sees (uid, user, administrator) and its version."""


class CreateRequest(NamedTuple):
    """A new partition (``start``: a booking ahead; ``wait``: queue it if it does not fit).

    Its GPUs: ``device`` (one index, or ``"auto"``: Chronos picks one), or ``devices``
    (a group of the GPUs named, the first the primary), or ``gpus`` (a group of that many,
    Chronos picks them). ``memory`` is per GPU.
    """

    memory: Spec
    duration: Spec
    device: int | str = 0
    user: str | None = None
    persist: bool = False
    kind: str = "api"
    grace: Spec | None = None
    warn: Spec | None = None
    warn_signal: str | None = None
    start: float | None = None
    wait: bool = False
    timeout: float | None = None
    series: str | None = None
    """A repeated booking's series id (``s`` and seven hex digits), the same for each day."""
    devices: list[int] | None = None
    gpus: int | None = None


class WaitRequest(NamedTuple):
    """Where a queued ticket stands; the daemon holds it up to ``max_wait`` (a long poll)."""

    id: str
    max_wait: float = 0.0


class CancelRequest(NamedTuple):
    id: str


class QueueRequest(NamedTuple):
    limit: int | None = None
    after: int | None = None


class UsageRequest(NamedTuple):
    since: float | None = None
    user: str | None = None


class ReleaseRequest(NamedTuple):
    id: str


class GetRequest(NamedTuple):
    id: str


class ListRequest(NamedTuple):
    all: bool = False
    limit: int | None = None
    after: int | None = None


class StatsRequest(NamedTuple):
    processes: bool = True


class AttachRequest(NamedTuple):
    id: str
    pid: int


class AttachedPidsRequest(NamedTuple):
    id: str


class ExtendRequest(NamedTuple):
    id: str
    duration: Spec


class EventsRequest(NamedTuple):
    since: float | None = None
    id: str | None = None
    limit: int | None = None
    after: int | None = None


class SubmitRequest(NamedTuple):
    """A batch job: ``partition`` is a create request's arguments (the same options,
    checked as a create), the rest what chronosd starts when it is granted. The user
    and groups are never sent: they come from ``SO_PEERCRED`` and the account database."""

    partition: dict[str, Any]
    argv: list[str]
    env: dict[str, str]
    cwd: str
    umask: int
    output: str
    error: str | None = None
    name: str | None = None
    after: str | None = None


class JobsRequest(NamedTuple):
    """Jobs: the caller's, or everyone's with ``all``; ``id`` one job (a prefix)."""

    all: bool = False
    id: str | None = None


Request = (
    PingRequest
    | CreateRequest
    | WaitRequest
    | CancelRequest
    | QueueRequest
    | UsageRequest
    | ReleaseRequest
    | GetRequest
    | ListRequest
    | StatsRequest
    | AttachRequest
    | AttachedPidsRequest
    | ExtendRequest
    | EventsRequest
    | SubmitRequest
    | JobsRequest
)
"""Any request."""

REQUESTS: dict[str, type[Request]] = {
    "ping": PingRequest,
    "create": CreateRequest,
    "wait": WaitRequest,
    "cancel": CancelRequest,
    "queue": QueueRequest,
    "usage": UsageRequest,
    "release": ReleaseRequest,
    "get": GetRequest,
    "list": ListRequest,
    "stats": StatsRequest,
    "attach": AttachRequest,
    "attached_pids": AttachedPidsRequest,
    "extend": ExtendRequest,
    "events": EventsRequest,
    "submit": SubmitRequest,
    "jobs": JobsRequest,
}
"""Every operation the daemon answers, by name."""

_OP_OF: dict[type[Request], str] = {cls: op for op, cls in REQUESTS.items()}


def op_of(request: Request) -> str:
    """The name of the operation ``request`` asks for."""
    return _OP_OF[type(request)]


def wire_args(request: Request) -> dict[str, Any]:
    """The arguments as sent: those left unset (None) are not sent at all."""
    return {name: value for name, value in request._asdict().items() if value is not None}


def schema_of(cls: type[Request]) -> dict[str, tuple[tuple[type, ...], bool]]:
    """``{argument: (accepted JSON types, required)}``: required where it has no default."""
    return {
        name: (accepted_types(cls.__annotations__[name]), name not in cls._field_defaults)
        for name in cls._fields
    }


def accepted_types(annotation: Any) -> tuple[type, ...]:
    """The JSON value types a field takes, from its annotation (``None`` aside).

    A ``float`` field takes an integer too (JSON has one kind of number).
    """
    if get_origin(annotation) in (list, dict):  # list[str]: a JSON array (items: check_bounds)
        return (get_origin(annotation),)
    members = getattr(annotation, "__args__", (annotation,))
    types = tuple(get_origin(t) or t for t in members if t is not type(None))
    return (int, *types) if float in types and int not in types else types


# ---------------------------------------------------------------------- replies


class Granted(NamedTuple):
    """A create that was admitted: the partition, and the environment that shows its GPU."""

    record: "PartitionRecord"
    visible_env: dict[str, str]

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "Granted":
        from chronos.models import PartitionRecord

        return cls(
            record=PartitionRecord.from_wire(data), visible_env=dict(data.get("visible_env") or {})
        )

    def to_wire(self) -> dict[str, Any]:
        return {**self.record.to_wire(), "visible_env": dict(self.visible_env)}


class TicketStatus(NamedTuple):
    """A queued request's standing (a create with ``wait`` that did not fit, ``wait``,
    ``cancel``). ``status`` is the whole reply: position, estimate and what it waits for
    while ``waiting``; the granted partition once ``granted``."""

    ticket: str
    state: str
    reason: str | None
    status: dict[str, Any]

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> "TicketStatus":
        return cls(
            ticket=str(data["ticket"]),
            state=str(data["state"]),
            reason=data.get("reason"),
            status=data,
        )

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
