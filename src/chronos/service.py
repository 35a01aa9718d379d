"""What each request does, and who may do it.

The same :class:`Service` serves the embedded client (in the caller's own
process) and the daemon (for every socket client), so both modes share one
set of rules. The caller's identity is always passed in by whoever knows it
for sure: the process itself when embedded, the kernel (``SO_PEERCRED``) in the
daemon.
"""

from __future__ import annotations

import math
import signal
import time
from collections.abc import Callable
from typing import Any

from chronos import procs, protocol
from chronos.attribution import attribute_processes
from chronos.cgroups import PartitionCgroups
from chronos.config import Config, Limits
from chronos.devices import DeviceUsage, Machine, open_machine
from chronos.errors import BadRequest, CapacityRefused, ChronosError, PermissionDenied
from chronos.identity import Caller, resolve_user
from chronos.ledger import Ledger, NewPartition, QuotaCheck
from chronos.models import ACTIVE, BOOKED, DeviceStats, PartitionRecord, ProcessUse
from chronos.policy import Ask, check_limits, decayed_usage, priority
from chronos.slurm import policy as slurm_policy
from chronos.units import parse_duration, parse_memory

KINDS = ("api", "cli", "run")
MAX_POLL_S = 5.0
"""Longest one ``wait`` call blocks; clients call again."""
EMBEDDED_POLL_S = 0.05
MAX_BOOK_AHEAD_S = 366 * 86400.0
"""Latest start a booking may ask for, from now."""


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
        ledger.capacity_of = self._capacity_of
        self.cgroups: PartitionCgroups | None = None
        """Set by the daemon where it can place attached processes in cgroups."""
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
        wait: bool = False,
        timeout: float | None = None,
    ) -> dict[str, Any]:
        if kind not in KINDS and not slurm_policy.may_use_kind(caller, kind):
            raise BadRequest(f"unknown partition kind {kind!r}")
        uid, name = self._owner(caller, user)
        dev = self.machine.device(device)
        slurm_policy.check_create(self.config.slurm, caller, dev.index)
        nbytes = parse_memory(memory, dev.total_bytes)
        seconds = parse_duration(duration, self.config.max_duration_s)
        if start is not None and not (
            math.isfinite(start) and start <= self.ledger.clock() + MAX_BOOK_AHEAD_S
        ):  # NaN broke the insert; 1e300 was stored and then crashed every `chronos list`
            raise BadRequest("start must be a time (epoch seconds) at most a year from now")
        owner_pid = None if persist or caller.pid is None else caller.pid
        request = NewPartition(
            device=dev.index,
            device_uuid=dev.uuid,
            device_total_bytes=dev.total_bytes,
            capacity_bytes=self.config.reservable_bytes(dev.index, dev.total_bytes),
            memory_bytes=nbytes,
            uid=uid,
            user=name,
            duration_s=seconds,
            starts_at=start,
            owner_pid=owner_pid,
            owner_start=procs.start_ticks(owner_pid) if owner_pid else None,
            kind=kind,
            grace_s=self.config.grace_s if grace is None else _grace(grace),  # keeps its terms
            warn_s=self.config.warn_s if warn is None else parse_duration(warn),
            warn_signal=_signal_name(warn_signal or self.config.warn_signal),
            exempt=caller.is_admin,
        )
        try:
            record = self.ledger.create(
                request,
                self._quota_check(request),
                self._priority,
                will_queue=wait and start is None,
            )
        except CapacityRefused as refusal:
            if not wait or start is not None:
                raise
            if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
                raise BadRequest("timeout must be a number of seconds") from None
            timeout_at = None if timeout is None else self.ledger.clock() + timeout
            ticket = self.ledger.enqueue(request, caller.pid, timeout_at)
            self.on_change()
            return self._ticket_status(ticket.id, note=str(refusal))
        self.on_change()
        return {**record.to_wire(), "visible_env": dict(dev.visible_env)}

    # ----------------------------------------------------------------- queue

    def op_wait(self, caller: Caller, id: str, max_wait: float = 0.0) -> dict[str, Any]:
        """Where ticket ``id`` stands; embedded mode polls up to ``max_wait`` seconds."""
        self._authorize_ticket(caller, id)
        deadline = time.monotonic() + min(max(0.0, max_wait), MAX_POLL_S)
        while True:
            self.grant_waiting()
            status = self._ticket_status(id)
            if status["state"] != "waiting" or self.mode == "daemon":
                return status
            if time.monotonic() >= deadline:
                return status
            time.sleep(EMBEDDED_POLL_S)

    def op_cancel(self, caller: Caller, id: str) -> dict[str, Any]:
        self._authorize_ticket(caller, id)
        self.ledger.cancel(id)
        self.on_change()
        return self._ticket_status(id)

    def op_queue(self, caller: Caller) -> list[dict[str, Any]]:
        self.grant_waiting()
        return self._queue_statuses()

    def grant_waiting(self) -> list[str]:
        """Admit queued requests that now fit; return their partition ids."""
        granted = self.ledger.grant_waiting(self._priority, self._quota_check)
        ids = [self.ledger.ticket(t.id).partition_id or "" for t in granted]
        if granted:
            self.on_change()
        return ids

    def _capacity_of(self, request: NewPartition) -> int:
        """What admission may hand out on the request's device under the policy in force now."""
        return self.config.reservable_bytes(request.device, request.device_total_bytes)

    def _priority(self, user: str, waited_s: float, mine: list[PartitionRecord]) -> float:
        now = self.ledger.clock()
        usage = decayed_usage(mine, now, self.config.fairshare_half_life_s)
        return priority(usage, waited_s, self.config.fairshare_age_weight)

    def _quota_check(self, request: NewPartition) -> QuotaCheck | None:
        if request.exempt:
            return None
        limits = self.config.limits_for(request.user)
        if limits == Limits():
            return None
        fraction = request.memory_bytes / request.device_total_bytes

        def check(mine: list[PartitionRecord], start: float, end: float, now: float) -> None:
            ask = Ask(request.user, request.device, fraction, start, end)
            check_limits(limits, ask, mine, now)

        return check

    def _queue_statuses(self) -> list[dict[str, Any]]:
        now = self.ledger.clock()
        out = []
        per_device: dict[str, int] = {}
        for ticket, estimate in self.ledger.queue(self._priority):
            req = ticket.request
            per_device[req.device_uuid] = per_device.get(req.device_uuid, 0) + 1
            out.append(
                {
                    "ticket": ticket.id,
                    "state": ticket.state,
                    "user": req.user,
                    "device": req.device,
                    "memory_bytes": req.memory_bytes,
                    "memory_fraction": round(req.memory_bytes / req.device_total_bytes, 6),
                    "duration_s": req.duration_s,
                    "enqueued_at": ticket.enqueued_at,
                    "waited_s": round(now - ticket.enqueued_at, 3),
                    "position": per_device[req.device_uuid],
                    "estimated_start": estimate,
                    "waiting_for": self._blockers(req, estimate),
                }
            )
        return out

    def _blockers(self, req: NewPartition, estimate: float | None) -> list[str]:
        """Partitions on the device that end by the estimated start (what we wait for)."""
        if estimate is None:
            return []
        return self.ledger.ending_by(req.device_uuid, estimate + 1e-6)

    def _ticket_status(self, ticket_id: str, note: str | None = None) -> dict[str, Any]:
        ticket = self.ledger.ticket(ticket_id)
        status: dict[str, Any] = {
            "ticket": ticket.id,
            "state": ticket.state,
            "reason": ticket.reason or note,
        }
        if ticket.state == "granted" and ticket.partition_id:
            record = self.ledger.get(ticket.partition_id)
            dev = self.machine.by_uuid(record.device_uuid)
            status["partition"] = {
                **record.to_wire(),
                "visible_env": dict(dev.visible_env) if dev else {},
            }
        elif ticket.state == "waiting":
            mine = next((q for q in self._queue_statuses() if q["ticket"] == ticket.id), None)
            if mine is not None:
                status.update(
                    {k: mine[k] for k in ("position", "estimated_start", "waiting_for", "waited_s")}
                )
        return status

    def _authorize_ticket(self, caller: Caller, ticket_id: str) -> None:
        ticket = self.ledger.ticket(ticket_id)
        if caller.uid != ticket.request.uid and not caller.is_admin:
            raise PermissionDenied(f"queued request {ticket_id} belongs to {ticket.request.user}")

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
        records = self.ledger.partitions(include_ended=all)
        return [r.to_wire() for r in records if all or r.state_at(now) in (ACTIVE, BOOKED)]

    def op_stats(self, caller: Caller, processes: bool = True) -> dict[str, Any]:
        self._reap()
        machine = self.machine
        now = self.ledger.clock()
        open_records = self.ledger.running(now)
        usage = machine.usage()
        found = (
            attribute_processes(machine, open_records, self.ledger.attached()) if processes else []
        )
        devices = [d.to_json() for d in self.device_stats(now, open_records, usage, found)]
        return {
            "mode": self.mode,
            "backends": machine.backend_names,
            "per_process_memory": machine.per_process_memory,
            "devices": devices,
        }

    def device_stats(
        self,
        now: float,
        records: list[PartitionRecord],
        usage: dict[str, DeviceUsage],
        found: list[ProcessUse],
    ) -> list[DeviceStats]:
        """Each GPU with its memory, the partitions active on it now, and its processes."""
        out = []
        for dev in self.machine.devices:
            mine = [r for r in records if r.device_uuid == dev.uuid and r.state_at(now) == ACTIVE]
            use = usage.get(dev.uuid)
            out.append(
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
                    reservable_bytes=self.config.reservable_bytes(dev.index, dev.total_bytes),
                    committed_bytes=sum(r.memory_bytes for r in mine),
                    active_partitions=len(mine),
                    pci_bus_id=dev.pci_bus_id,
                    details=dict(dev.details),
                    processes=[p for p in found if p.device == dev.index],
                )
            )
        return out

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
        # A Slurm job's processes stay in Slurm's job cgroup (moved out, one survives scancel).
        movable = self.cgroups is not None and slurm_policy.may_move(record, pid)
        placed = self.cgroups.place(id, pid) if movable and self.cgroups is not None else False
        self.on_change()
        return {"id": id, "pid": pid, "cgroup": placed}

    def op_attached_pids(self, caller: Caller, id: str) -> list[dict[str, Any]]:
        return [
            {"pid": a.pid, "start_ticks": a.start_ticks, "uid": a.uid}
            for a in self.ledger.attached(id)
        ]

    def op_extend(self, caller: Caller, id: str, duration: Any) -> dict[str, Any]:
        record = self.ledger.get(id)
        self._authorize(caller, record, "extend")
        slurm_policy.check_extend(caller, record)
        extra = parse_duration(duration, self.config.max_duration_s)
        new_end = record.expires_at + extra
        if new_end - record.starts_at > self.config.max_duration_s:
            raise BadRequest("that would make the partition longer than the maximum duration")
        if not caller.is_admin:
            self._check_extension(record, new_end)
        capacity = self.config.reservable_bytes(record.device, record.device_total_bytes)
        updated = self.ledger.extend_expiry(
            id, new_end, capacity, caller.uid, caller.user, self._priority
        )
        self.on_change()
        return updated.to_wire()

    def op_events(
        self, caller: Caller, since: float | None = None, id: str | None = None
    ) -> list[dict[str, Any]]:
        return [e.to_json() for e in self.ledger.events(since, id)]

    def _check_extension(self, record: PartitionRecord, new_end: float) -> None:
        """An extension must pass the same quotas as a partition of the new length."""
        limits = self.config.limits_for(record.user)
        now = self.ledger.clock()
        mine = [
            r
            for r in self.ledger.recent(now - 8 * 86400.0)
            if r.uid == record.uid and r.id != record.id
        ]
        ask = Ask(record.user, record.device, record.memory_fraction, record.starts_at, new_end)
        check_limits(limits, ask, mine, now)

    def op_usage(
        self, caller: Caller, since: float | None = None, user: str | None = None
    ) -> list[dict[str, Any]]:
        from chronos.accounting import usage_report

        now = self.ledger.clock()
        since = now - 7 * 86400.0 if since is None else since
        return usage_report(self.ledger.recent(since), self.ledger.events(since), since, now, user)

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
