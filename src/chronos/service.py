"""What each request does, and who may do it.

The same :class:`Service` serves the embedded client (in the caller's own
process) and the daemon (for every socket client), so both modes share one
set of rules. The caller's identity is always passed in by whoever knows it
for sure: the process itself when embedded, the kernel (``SO_PEERCRED``) in the
daemon.
"""

from __future__ import annotations

import signal
from collections.abc import Callable
from typing import Any

from chronos import procs, protocol
from chronos.attribution import attribute_processes
from chronos.config import Config
from chronos.devices import Machine, open_machine
from chronos.errors import BadRequest, ChronosError, PermissionDenied
from chronos.identity import Caller, resolve_user
from chronos.ledger import Ledger, NewPartition
from chronos.models import ACTIVE, BOOKED, DeviceStats, PartitionRecord
from chronos.units import parse_duration, parse_memory

KINDS = ("api", "cli", "run")


class Service:
    def __init__(
        self,
        ledger: Ledger,
        config: Config,
        mode: str,
        machine_factory: Callable[[], Machine] = open_machine,
    ) -> None:
        self.ledger = ledger
        self.config = config
        self.mode = mode
        self._machine_factory = machine_factory
        self._machine: Machine | None = None
        self.on_change: Callable[[], None] = lambda: None
        """Called after any change to the set of open partitions (the daemon re-arms timers)."""

    @property
    def machine(self) -> Machine:
        if self._machine is None:
            self._machine = self._machine_factory()
        return self._machine

    def close(self) -> None:
        if self._machine is not None:
            self._machine.close()
        self.ledger.close()

    # ----------------------------------------------------------------- dispatch

    def handle(self, caller: Caller, message: Any) -> dict[str, Any]:
        """Run one request; always returns a reply, never raises a ChronosError."""
        try:
            op, args = protocol.validate(message)
            return protocol.ok(getattr(self, f"op_{op}")(caller, **args))
        except ChronosError as exc:
            return protocol.error(exc)

    # ----------------------------------------------------------------------- ops

    def op_ping(self, caller: Caller) -> dict[str, Any]:
        from chronos import __version__

        return {
            "version": __version__,
            "mode": self.mode,
            "uid": caller.uid,
            "user": caller.user,
            "admin": caller.is_admin,
        }

    def op_create(
        self,
        caller: Caller,
        device: int,
        memory: Any,
        duration: Any,
        user: str | None = None,
        persist: bool = False,
        kind: str = "api",
        grace: Any = None,
        warn: Any = None,
        warn_signal: str | None = None,
        start: float | None = None,
    ) -> dict[str, Any]:
        if kind not in KINDS:
            raise BadRequest(f"unknown partition kind {kind!r}")
        uid, name = self._owner(caller, user)
        dev = self.machine.device(device)
        nbytes = parse_memory(memory, dev.total_bytes)
        seconds = parse_duration(duration, self.config.max_duration_s)
        owner_pid = None if persist or caller.pid is None else caller.pid
        request = NewPartition(
            device=dev.index,
            device_uuid=dev.uuid,
            device_total_bytes=dev.total_bytes,
            capacity_bytes=int(dev.total_bytes * self.config.reservable(dev.index)),
            memory_bytes=nbytes,
            uid=uid,
            user=name,
            duration_s=seconds,
            starts_at=start,
            owner_pid=owner_pid,
            owner_start=procs.start_ticks(owner_pid) if owner_pid else None,
            kind=kind,
            grace_s=None if grace is None else _grace(grace),
            warn_s=None if warn is None else parse_duration(warn),
            warn_signal=None if warn_signal is None else _signal_name(warn_signal),
        )
        record = self.ledger.create(request)
        self.on_change()
        return {**record.to_wire(), "visible_env": dict(dev.visible_env)}

    def op_release(self, caller: Caller, id: str) -> dict[str, Any]:
        self._authorize(caller, self.ledger.get(id), "release")
        record = self.ledger.release(id, caller.uid, caller.user)
        self.on_change()
        return record.to_wire()

    def op_get(self, caller: Caller, id: str) -> dict[str, Any]:
        self.ledger.reap()
        return self.ledger.get(id).to_wire()

    def op_list(self, caller: Caller, all: bool = False) -> list[dict[str, Any]]:
        self._reap()
        now = self.ledger.clock()
        records = self.ledger.list(include_ended=all)
        return [r.to_wire() for r in records if all or r.state_at(now) in (ACTIVE, BOOKED)]

    def op_stats(self, caller: Caller, processes: bool = True) -> dict[str, Any]:
        self._reap()
        machine = self.machine
        now = self.ledger.clock()
        open_records = self.ledger.active(now)
        usage = machine.usage()
        found = (
            attribute_processes(machine, open_records, self.ledger.attached()) if processes else []
        )
        devices = []
        for dev in machine.devices:
            mine = [
                r for r in open_records if r.device_uuid == dev.uuid and r.state_at(now) == ACTIVE
            ]
            use = usage.get(dev.uuid)
            devices.append(
                DeviceStats(
                    index=dev.index,
                    uuid=dev.uuid,
                    name=dev.name,
                    vendor=dev.vendor,
                    backend=dev.backend,
                    total_bytes=dev.total_bytes,
                    used_bytes=use.used_bytes if use else None,
                    free_bytes=use.free_bytes if use else None,
                    utilization_pct=use.utilization_pct if use else None,
                    reservable_bytes=int(dev.total_bytes * self.config.reservable(dev.index)),
                    committed_bytes=sum(r.memory_bytes for r in mine),
                    active_partitions=len(mine),
                    pci_bus_id=dev.pci_bus_id,
                    details=dict(dev.details),
                    processes=[p for p in found if p.device == dev.index],
                ).to_json()
            )
        return {
            "mode": self.mode,
            "backends": machine.backend_names,
            "per_process_memory": machine.per_process_memory,
            "devices": devices,
        }

    def op_attach(self, caller: Caller, id: str, pid: int) -> dict[str, Any]:
        record = self.ledger.get(id)
        self._authorize(caller, record, "attach to")
        ticks = procs.start_ticks(pid)
        if ticks is None:
            raise BadRequest(f"no process {pid}")
        owner = procs.process_uid(pid)
        if owner != record.uid and not caller.is_admin:
            raise PermissionDenied(
                f"process {pid} belongs to {procs.user_name(owner or -1)}, not to "
                f"{record.user}; only an administrator may attach it"
            )
        self.ledger.attach(id, pid, ticks, owner if owner is not None else -1, caller.uid)
        self.on_change()
        return {"id": id, "pid": pid}

    def op_extend(self, caller: Caller, id: str, duration: Any) -> dict[str, Any]:
        record = self.ledger.get(id)
        self._authorize(caller, record, "extend")
        extra = parse_duration(duration, self.config.max_duration_s)
        new_end = record.expires_at + extra
        if new_end - record.starts_at > self.config.max_duration_s:
            raise BadRequest("that would make the partition longer than the maximum duration")
        capacity = int(record.device_total_bytes * self.config.reservable(record.device))
        updated = self.ledger.extend_expiry(id, new_end, capacity, caller.uid, caller.user)
        self.on_change()
        return updated.to_wire()

    def op_events(
        self, caller: Caller, since: float | None = None, id: str | None = None
    ) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.ledger.events(since, id)]

    # ------------------------------------------------------------------ helpers

    def _reap(self) -> None:
        if self.ledger.reap():
            self.on_change()

    def _owner(self, caller: Caller, user: str | None) -> tuple[int, str]:
        if user is None or user in (caller.user, str(caller.uid)):
            return caller.uid, caller.user
        if not caller.is_admin:
            raise PermissionDenied(
                f"only an administrator may create partitions for another user ({user})"
            )
        return resolve_user(user)

    @staticmethod
    def _authorize(caller: Caller, record: PartitionRecord, verb: str) -> None:
        if caller.uid != record.uid and not caller.is_admin:
            raise PermissionDenied(
                f"partition {record.id} belongs to {record.user}; you ({caller.user}) "
                f"may not {verb} it"
            )


def _grace(value: Any) -> float:
    if str(value).strip() in ("0", "0s"):
        return 0.0
    return parse_duration(value)


def _signal_name(name: str) -> str:
    text = name.upper()
    text = text if text.startswith("SIG") else "SIG" + text
    if not hasattr(signal, text) or text in ("SIGKILL", "SIGSTOP"):
        raise BadRequest(f"unknown or unusable warning signal {name!r}")
    return text
