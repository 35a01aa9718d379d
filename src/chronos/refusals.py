"""Why a request was refused: the facts as data, and the one sentence each says to users.

The ledger decides *that* a request does not fit and returns *why* as one of the
dataclasses here (which device, how many bytes free, when it would fit, what is in
the way); :func:`refusal` turns facts into the error users see, with a structured
:class:`~chronos.vocabulary.RefusalCause` for whoever counts refusals (the metrics
read the cause, never the wording). Tests assert on these sentences: reword with care.

Pure and small: no database, no policy, so the ledger, the policy checks and the
service can all use it. The records are NamedTuples, not dataclasses: this module is
imported on every CLI start, and a NamedTuple class costs a fifth as much to make.
"""

from __future__ import annotations

from enum import StrEnum
from typing import NamedTuple

from chronos.errors import AdmissionRefused, CapacityRefused
from chronos.units import format_bytes, format_duration, local_clock
from chronos.vocabulary import RefusalCause


class HolderKind(StrEnum):
    """What holds a device in an interval, as a refusal names it."""

    PARTITION = "partition"
    BOOKING = "booking"
    QUEUED = "queued request"


class Holder(NamedTuple):
    kind: HolderKind
    id: str

    def __str__(self) -> str:
        return f"{self.kind} {self.id}"


class TooLarge(NamedTuple):
    """More than the device lets partitions reserve at all: waiting can never help."""

    device: int
    requested: int
    capacity: int


class NoRoom(NamedTuple):
    """Not enough free on the device over the asked time (waiting may help)."""

    device: int
    requested: int
    free: int
    start: float
    now: float
    ahead: int
    """Waiting requests whose reserved room counted against this one."""
    fits_at: float | None
    """The earliest start at which it would fit (None: not within the plan)."""


class NoPlacement(NamedTuple):
    """Chronos was to choose the GPUs, and fewer than asked have room (waiting may help)."""

    gpus: int
    requested: int
    """Bytes asked of each GPU (of the first, where GPU sizes differ)."""
    fitting: int
    """How many GPUs have room over the asked time."""
    start: float
    now: float


class ExtensionBlocked(NamedTuple):
    """Something needs the device before the asked new end."""

    partition_id: str
    until: float
    free: int
    in_the_way: tuple[Holder, ...]


class TooManyWaiting(NamedTuple):
    """The user already has as many requests waiting as the policy allows."""

    user: str
    waiting: int
    limit: int


class OverLimit(NamedTuple):
    """A policy limit (a quota) the request would break."""

    limit: str
    standing: str
    """Where the user stands against it, in words (policy.check_limits writes these)."""


Facts = TooLarge | NoRoom | NoPlacement | ExtensionBlocked | TooManyWaiting | OverLimit


def refusal(facts: Facts) -> AdmissionRefused:
    """The error for ``facts``: a sentence for users, the cause and the facts as data."""
    if isinstance(facts, NoRoom | NoPlacement):
        return CapacityRefused(message(facts), facts=facts)
    if isinstance(facts, OverLimit):
        cause = RefusalCause.quota(facts.limit)
    elif isinstance(facts, TooManyWaiting):
        cause = RefusalCause.quota("max_waiting")
    else:
        cause = RefusalCause.capacity()
    return AdmissionRefused(message(facts), cause, facts=facts)


def message(facts: Facts) -> str:
    """What a refusal says to users."""
    if isinstance(facts, OverLimit):
        return f"over the {facts.limit} limit: {facts.standing}"
    if isinstance(facts, TooManyWaiting):
        return (
            f"over the max_waiting limit: {facts.user} already has {facts.waiting} waiting "
            f"request(s), at most {facts.limit}"
        )
    if isinstance(facts, TooLarge):
        return (
            f"{format_bytes(facts.requested)} is more than GPU {facts.device} lets partitions "
            f"reserve ({format_bytes(facts.capacity)})"
        )
    if isinstance(facts, ExtensionBlocked):
        in_the_way = ", ".join(str(h) for h in facts.in_the_way) or "nothing"
        return (
            f"cannot extend {facts.partition_id}: other partitions, bookings or waiting "
            f"requests need the device before {local_clock(facts.until)} "
            f"(only {format_bytes(max(0, facts.free))} free then; in the way: {in_the_way})"
        )
    if isinstance(facts, NoPlacement):
        return _no_placement(facts)
    return _no_room(facts)


def _no_placement(facts: NoPlacement) -> str:
    when = "now" if facts.start <= facts.now else f"at {local_clock(facts.start)}"
    each = format_bytes(facts.requested)
    if facts.gpus == 1:
        return f"no GPU has {each} free {when}"
    return f"no {facts.gpus} GPUs have {each} free each {when} ({facts.fitting} have)"


def _no_room(facts: NoRoom) -> str:
    when = "now" if facts.start <= facts.now else f"at {local_clock(facts.start)}"
    text = (
        f"GPU {facts.device} has {format_bytes(facts.free)} free {when}, "
        f"{format_bytes(facts.requested)} requested"
    )
    if facts.ahead:
        text += f" ({facts.ahead} waiting request(s) ahead)"
    if facts.fits_at is not None:
        text += (
            f"; it fits from {local_clock(facts.fits_at)} "
            f"(in {format_duration(facts.fits_at - facts.now)})"
        )
    return text
