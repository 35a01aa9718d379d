"""Plain records passed between the ledger, the daemon and clients.

Each record converts to and from the JSON shape users see with ``--json`` and
the daemon sends on the wire, so there is one naming of every field.
"""

from __future__ import annotations

import time
from dataclasses import asdict, dataclass, field, fields
from functools import cached_property
from typing import Any

from chronos.units import iso
from chronos.vocabulary import OPEN_STATES, Origin, PartitionState

# The short names many modules import; the vocabulary is chronos.vocabulary.
ACTIVE = PartitionState.ACTIVE
RELEASED = PartitionState.RELEASED
EXPIRED = PartitionState.EXPIRED
BOOKED = PartitionState.BOOKED
STATES = (BOOKED, ACTIVE, RELEASED, EXPIRED)
SERIES_PREFIX = "s"
"""A series id is this and seven hex digits: never a partition's (hex) or a ticket's (``q``)."""


def new_series_id() -> str:
    """A fresh id for a repeated booking's series (its bookings all carry it)."""
    import os

    return SERIES_PREFIX + os.urandom(4).hex()[1:]


def is_series_id(text: str) -> bool:
    return (
        len(text) == 8
        and text.startswith(SERIES_PREFIX)
        and all(c in "0123456789abcdef" for c in text[1:])
    )


@dataclass(frozen=True)
class Share:
    """One GPU's part of a partition: a partition of several GPUs (a group) has one per GPU."""

    device: int
    device_uuid: str
    memory_bytes: int
    device_total_bytes: int

    @property
    def memory_fraction(self) -> float:
        return self.memory_bytes / self.device_total_bytes


@dataclass(frozen=True)
class PartitionRecord:
    """One partition as stored in the ledger."""

    id: str
    device: int
    device_uuid: str
    device_total_bytes: int
    memory_bytes: int
    uid: int
    user: str
    created_at: float
    starts_at: float
    expires_at: float
    state: str
    """Stored state; use :meth:`state_at` for the effective one."""
    ended_at: float | None = None
    end_reason: str | None = None
    owner_pid: int | None = None
    owner_start: int | None = None
    kind: str = Origin.API
    """An :class:`~chronos.vocabulary.Origin`, or ``slurm:<job>``."""
    grace_s: float | None = None
    warn_s: float | None = None
    warn_signal: str | None = None
    series: str | None = None
    """The series this booking belongs to (``create --repeat``), or None."""
    more_shares: tuple[Share, ...] = ()
    """A group's shares beyond the primary one (empty for a partition of one GPU)."""

    @property
    def memory_fraction(self) -> float:
        """The primary share's fraction of its GPU (every share of a group asks the same)."""
        return self.memory_bytes / self.device_total_bytes

    @cached_property
    def shares(self) -> tuple[Share, ...]:
        """Every GPU's share, the primary (``device``, ``memory_bytes``, …) first."""
        primary = Share(self.device, self.device_uuid, self.memory_bytes, self.device_total_bytes)
        return (primary, *self.more_shares)

    @property
    def gpu_equivalents(self) -> float:
        """What quotas and fair share count: the shares' fractions summed (two halves = 1)."""
        return self.memory_fraction + sum(s.memory_fraction for s in self.more_shares)

    def share_on(self, device_uuid: str) -> Share | None:
        """This partition's share of the GPU ``device_uuid``, if it has one."""
        return next((s for s in self.shares if s.device_uuid == device_uuid), None)

    @property
    def devices(self) -> tuple[int, ...]:
        return tuple(share.device for share in self.shares)

    @property
    def is_open(self) -> bool:
        """Stored as active or booked (it may have passed its end unreaped: see state_at)."""
        return self.state in OPEN_STATES

    def state_at(self, now: float) -> str:
        if self.state != ACTIVE and self.state != BOOKED:
            return self.state
        if now >= self.expires_at:
            return EXPIRED
        return ACTIVE if now >= self.starts_at else BOOKED

    def time_remaining_at(self, now: float) -> float:
        if self.state_at(now) not in OPEN_STATES:
            return 0.0
        return max(0.0, self.expires_at - now)

    def to_json(self, now: float | None = None) -> dict[str, Any]:
        now = time.time() if now is None else now
        out = self.to_wire()
        del out["more_shares"]
        out["devices"] = list(self.devices)
        out["shares"] = [_share_dict(share) for share in self.shares]
        out["state"] = self.state_at(now)
        out["memory_fraction"] = round(self.memory_fraction, 6)
        out["time_remaining"] = round(self.time_remaining_at(now), 3)
        for key in ("created_at", "starts_at", "expires_at", "ended_at"):
            out[key] = iso(out[key])
        return out

    def to_wire(self) -> dict[str, Any]:
        """Every field, as it is (all are JSON values but the shares): a shallow copy, not
        ``asdict``, whose deep copy of each field was a fifth of a create+release."""
        out = {name: getattr(self, name) for name in _RECORD_FIELDS}
        out["more_shares"] = [_share_dict(share) for share in self.more_shares]
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> PartitionRecord:
        names = _RECORD_NAMES
        known = {k: v for k, v in data.items() if k in names}
        known["more_shares"] = tuple(Share(**s) for s in known.get("more_shares") or ())
        return cls(**known)


_RECORD_FIELDS = tuple(f.name for f in fields(PartitionRecord))
_RECORD_NAMES = frozenset(_RECORD_FIELDS)
"""For ``from_wire``'s look-ups (a reply's two dozen keys, each tested against the tuple,
were a tenth of a client's create+release)."""


def _share_dict(share: Share) -> dict[str, Any]:
    return {
        "device": share.device,
        "device_uuid": share.device_uuid,
        "memory_bytes": share.memory_bytes,
        "device_total_bytes": share.device_total_bytes,
    }


@dataclass(frozen=True)
class ProcessUse:
    """A process holding GPU memory, and whose partition it counts toward."""

    pid: int
    device: int
    used_bytes: int | None
    user: str | None
    command: str | None
    partition_id: str | None
    """``None`` means unpartitioned."""

    def to_json(self) -> dict[str, Any]:
        return asdict(self)


@dataclass(frozen=True)
class DeviceStats:
    """One GPU as ``chronos stats`` shows it."""

    index: int
    uuid: str
    name: str
    vendor: str
    backend: str
    total_bytes: int
    used_bytes: int | None
    free_bytes: int | None
    utilization_pct: float | None
    reservable_bytes: int
    committed_bytes: int
    active_partitions: int
    pci_bus_id: str | None = None
    details: dict[str, str] = field(default_factory=dict)
    processes: list[ProcessUse] = field(default_factory=list)

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["processes"] = [p.to_json() for p in self.processes]
        return out

    @classmethod
    def from_wire(cls, data: dict[str, Any]) -> DeviceStats:
        data = dict(data)
        data["processes"] = [ProcessUse(**p) for p in data.get("processes", [])]
        return cls(**data)


@dataclass(frozen=True)
class Event:
    """One line of the ledger's history."""

    seq: int
    at: float
    kind: str
    partition_id: str | None
    uid: int | None
    user: str | None
    device_uuid: str | None
    memory_bytes: int | None
    detail: dict[str, Any]

    def to_json(self) -> dict[str, Any]:
        out = asdict(self)
        out["at"] = iso(self.at)
        return out
