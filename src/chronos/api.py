"""The Python API: ``Partitioner`` and the ``Partition`` handles it returns."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from types import TracebackType
from typing import Any

from chronos.errors import PartitionEnded
from chronos.models import ACTIVE, BOOKED, DeviceStats, PartitionRecord
from chronos.transport import Transport, connect


def _when(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=timezone.utc).astimezone()


class Partition:
    """A reserved share of one GPU, for a span of time.

    Use it as a context manager to release it on leaving the block; a
    partition that expired inside the block leaves quietly.
    """

    def __init__(
        self,
        record: PartitionRecord,
        transport: Transport,
        visible_env: dict[str, str] | None = None,
    ) -> None:
        self._record = record
        self._transport = transport
        self._visible_env = dict(visible_env or {})

    # ----------------------------------------------------------------- fields
    @property
    def id(self) -> str:
        return self._record.id

    @property
    def device(self) -> int:
        return self._record.device

    @property
    def device_uuid(self) -> str:
        return self._record.device_uuid

    @property
    def memory_bytes(self) -> int:
        return self._record.memory_bytes

    @property
    def memory_fraction(self) -> float:
        return self._record.memory_fraction

    @property
    def user(self) -> str:
        return self._record.user

    @property
    def created_at(self) -> datetime:
        return _when(self._record.created_at)  # type: ignore[return-value]

    @property
    def starts_at(self) -> datetime:
        return _when(self._record.starts_at)  # type: ignore[return-value]

    @property
    def expires_at(self) -> datetime:
        return _when(self._record.expires_at)  # type: ignore[return-value]

    @property
    def time_remaining(self) -> float:
        """Seconds until expiry (0 once released or expired); no round trip."""
        return self._record.time_remaining_at(time.time())

    @property
    def state(self) -> str:
        """``booked``, ``active``, ``released`` or ``expired``, asked of the ledger now."""
        return self.refresh()._record.state_at(time.time())

    @property
    def record(self) -> PartitionRecord:
        return self._record

    @property
    def env(self) -> dict[str, str]:
        """Environment for a process that should run inside this partition."""
        return {**self._visible_env, "CHRONOS_PARTITION_ID": self.id}

    # ---------------------------------------------------------------- actions
    def refresh(self) -> Partition:
        self._record = PartitionRecord.from_wire(self._transport.call("get", id=self.id))
        return self

    def release(self) -> None:
        """End the partition now; raises PartitionEnded if it already ended."""
        self._record = PartitionRecord.from_wire(self._transport.call("release", id=self.id))

    def extend(self, duration: float | str) -> None:
        """Move the end later by ``duration`` (seconds or ``30m``) if capacity allows."""
        self._record = PartitionRecord.from_wire(
            self._transport.call("extend", id=self.id, duration=duration)
        )

    def attach(self, pid: int) -> None:
        """Count process ``pid`` (and its children) toward this partition."""
        self._transport.call("attach", id=self.id, pid=pid)

    def to_json(self) -> dict[str, Any]:
        return self._record.to_json()

    def __enter__(self) -> Partition:
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._record.state_at(time.time()) not in (ACTIVE, BOOKED):
            return
        try:
            self.release()
        except PartitionEnded:
            pass  # it expired or was released meanwhile: nothing left to do

    def __repr__(self) -> str:
        r = self._record
        return (
            f"<Partition {r.id} GPU {r.device} {r.memory_fraction:.0%} {r.user} "
            f"{r.state_at(time.time())} {self.time_remaining:.0f}s left>"
        )


class Partitioner:
    """Entry point of the API: create, list and inspect partitions."""

    def __init__(self, transport: Transport | None = None) -> None:
        self._transport = transport or connect()

    @property
    def transport(self) -> Transport:
        """The connection in use (daemon socket or embedded ledger)."""
        return self._transport

    @property
    def mode(self) -> str:
        """``daemon`` or ``embedded``."""
        return self._transport.mode

    def create(
        self,
        device: int = 0,
        memory: float | str = 0.5,
        duration: float | str = 3600,
        *,
        user: str | None = None,
        persist: bool = False,
        grace: float | str | None = None,
        warn: float | str | None = None,
        warn_signal: str | None = None,
        start: float | None = None,
        kind: str = "api",
    ) -> Partition:
        """Reserve ``memory`` (fraction, ``50%`` or ``40GiB``) of GPU ``device`` for ``duration``.

        By default the partition belongs to this process and ends when it exits;
        ``persist=True`` keeps it until it expires or is released. ``warn``
        sends ``warn_signal`` (default SIGUSR1) to its processes that long before the end.
        """
        if warn is not None and warn_signal is None:
            warn_signal = "SIGUSR1"
        result = self._transport.call(
            "create",
            device=device,
            memory=memory,
            duration=duration,
            user=user,
            persist=persist,
            kind=kind,
            grace=grace,
            warn=warn,
            warn_signal=warn_signal,
            start=start,
        )
        return Partition(
            PartitionRecord.from_wire(result), self._transport, result.get("visible_env")
        )

    def get(self, partition_id: str) -> Partition:
        return Partition(
            PartitionRecord.from_wire(self._transport.call("get", id=partition_id)), self._transport
        )

    def list(self, all: bool = False) -> list[Partition]:
        return [
            Partition(PartitionRecord.from_wire(r), self._transport)
            for r in self._transport.call("list", all=all)
        ]

    def release(self, partition_id: str) -> None:
        self._transport.call("release", id=partition_id)

    def stats(self) -> list[DeviceStats]:
        return [DeviceStats.from_wire(d) for d in self._transport.call("stats")["devices"]]

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Partitioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
