"""What each request does, and who may do it.

The same :class:`Service` serves the embedded client (in the caller's own
process) and the daemon (for every socket client), so both modes share one
set of rules. The caller's identity is always passed in by whoever knows it
for sure: the process itself when embedded, the kernel (``SO_PEERCRED``) in the
daemon.
"""

from __future__ import annotations

import json
import math
import time
from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

from chronos import alloccap, batch, messages, procs, protocol
from chronos.cgroups import PartitionCgroups
from chronos.cgroups import cgroup_of as cgroups_of
from chronos.config import Config, Limits
from chronos.errors import BadRequest, CapacityRefused, ChronosError, PermissionDenied
from chronos.groups import Placer, gpu_choice, members
from chronos.identity import Caller, resolve_user
from chronos.ledger import Attached, Ledger, LedgerPolicy, Member, NewPartition, QuotaCheck
from chronos.models import (
    ACTIVE,
    BOOKED,
    DeviceStats,
    PartitionRecord,
    ProcessUse,
    Share,
    is_series_id,
)
from chronos.policy import Ask, check_limits, needs_history, priority
from chronos.slurm import policy as slurm_policy
from chronos.units import format_duration, parse_duration, parse_signal_name
from chronos.vocabulary import EventKind, Mode, Origin, TicketState

if TYPE_CHECKING:
    from chronos.devices import Device, DeviceUsage, Machine

KINDS = tuple(Origin)
"""``api-raise``/``api-notify``: an API partition made with ``on_expiry="raise"``/``"notify"``."""
MAX_POLL_S = 5.0
"""Longest one ``wait`` call blocks; clients call again."""
EMBEDDED_POLL_S = 0.05
MAX_BOOK_AHEAD_S = 366 * 86400.0
"""Latest start a booking may ask for, from now."""
MAX_PAGE = 500
"""Most records one page of ``list``, ``events`` or ``queue`` carries."""
PAGE_BYTES = 256 * 1024
"""A page also stops once its records' JSON passes this (events' details vary in size),
far below the protocol's frame limit, so no ledger content can make a reply too large."""
MAX_CURSOR = 1 << 62


class Service:
    def __init__(
        self,
        ledger: Ledger,
        config: Config,
        mode: str,
        machine_factory: Callable[[], Machine] | None = None,
        *,
        cgroups: PartitionCgroups | None = None,
        on_change: Callable[[], None] = lambda: None,
        on_supervised: Callable[[str, int, int | None], None] = lambda i, pid, start: None,
        stop_job: batch.StopJob = lambda job: None,
    ) -> None:
        """``cgroups``: where the daemon can place attached processes in cgroups.
        ``on_change``: called after any change to the set of open partitions (the daemon
        re-arms its timers). ``on_supervised``: called when a ``chronos run`` supervisor
        attached its gated child (the daemon spares that process, and only it, when it
        stops the partition)."""
        self.ledger = ledger
        self._config = config
        self.mode = mode
        self._machine_factory = machine_factory or _open_machine
        self._machine: Machine | None = None
        self.on_change = on_change
        ledger.follow_policy(ledger_policy(lambda: self.config))
        self.cgroups = cgroups
        self.on_supervised = on_supervised
        self.stop_job = stop_job
        """Stops a running batch job's processes (the daemon's job runner)."""

    @property
    def config(self) -> Config:
        return self._config

    @config.setter
    def config(self, config: Config) -> None:
        """A new policy (a reload): capacities may differ, so the queue is planned afresh."""
        self._config = config
        self.ledger.invalidate_plan()

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
        """Check and run one request message; always returns a reply, never raises a
        ChronosError. Both modes come here: the embedded transport with the message
        it built, the daemon's server with the one it read and checked already
        (``protocol.CheckedMessage``, not checked twice)."""
        try:
            request = protocol.parse_request(message)
        except ChronosError as exc:
            return protocol.error(exc)
        return self.serve(caller, request)

    def serve(self, caller: Caller, request: messages.Request) -> dict[str, Any]:
        """Run one checked request; always returns a reply, never raises a ChronosError."""
        try:
            return protocol.ok(getattr(self, f"op_{messages.op_of(request)}")(caller, request))
        except ChronosError as exc:
            return protocol.error(exc)

    # ----------------------------------------------------------------------- ops

    def op_ping(self, caller: Caller, request: messages.PingRequest) -> dict[str, Any]:
        from chronos import __version__

        return {
            "version": __version__,
            "mode": self.mode,
            "uid": caller.uid,
            "user": caller.user,
            "admin": caller.is_admin,
        }

    def op_create(self, caller: Caller, ask: messages.CreateRequest) -> dict[str, Any]:
        memory, duration, kind = ask.memory, ask.duration, ask.kind
        start, wait, timeout, warn = ask.start, ask.wait, ask.timeout, ask.warn
        if kind not in KINDS and not slurm_policy.may_use_kind(caller, kind):
            raise BadRequest(f"unknown partition kind {kind!r}")
        uid, name = self._owner(caller, ask.user)
        self._check_series(ask.series, uid)
        choice = gpu_choice(ask, self.machine)
        for dev in choice.named:
            slurm_policy.check_create(self.config.slurm, caller, dev.index)
        candidates = choice.named or self._creatable(caller)
        shares = members(candidates, memory, self.config.reservable_bytes)
        seconds = self._within_max_duration(parse_duration(duration, math.inf))
        if start is not None and not (
            math.isfinite(start) and start <= self.ledger.clock() + MAX_BOOK_AHEAD_S
        ):  # NaN broke the insert; 1e300 was stored and then crashed every `chronos list`
            raise BadRequest("start must be a time (epoch seconds) at most a year from now")
        owner_pid = None if ask.persist or caller.pid is None else caller.pid
        first = shares[0]
        request = NewPartition(
            **first._asdict(),  # the primary GPU: device, uuid, total, capacity, bytes
            uid=uid,
            user=name,
            duration_s=seconds,
            starts_at=start,
            owner_pid=owner_pid,
            owner_start=procs.start_ticks(owner_pid) if owner_pid else None,
            # ``run`` is only what the client asks for: the daemon spares a supervisor only
            # once it has seen it attach its gated child (op_attach), never on the client's word.
            kind=kind,
            grace_s=self._grace_of(ask.grace),  # keeps its terms
            warn_s=self.config.warn_s if warn is None else parse_duration(warn),
            warn_signal=_signal_name(ask.warn_signal or self.config.warn_signal),
            exempt=caller.is_admin,
            series=ask.series,
            # Named: the group itself. Chosen: a stand-in of as many GPUs (what quotas
            # count), which the placer replaces by the GPUs it picks.
            more=shares[1 : choice.gpus],
        )
        will_queue = wait and start is None
        placer = None
        if choice.chosen_by_chronos:
            placer = Placer(request, shares, choice.gpus, self.machine.link_level, will_queue)
        try:
            record = self.ledger.create(
                request,
                self._quota_check(request),
                self.priority,
                will_queue=will_queue,
                place=placer,
            )
        except CapacityRefused as refusal:
            if not wait or start is not None:
                raise
            if timeout is not None and not (math.isfinite(timeout) and timeout >= 0):
                raise BadRequest("timeout must be a number of seconds") from None
            timeout_at = None if timeout is None else self.ledger.clock() + timeout
            queued = placer.placed if placer is not None and placer.placed else request
            ticket = self.ledger.enqueue(queued, caller.pid, timeout_at, self._max_waiting(queued))
            self.on_change()
            return self._ticket_status(ticket.id, note=str(refusal))
        self.on_change()
        self._on_granted(record)
        alloccap.sweep(self._is_open, self.mode)
        return messages.Granted(record=record, visible_env=self.visible_env(record)).to_wire()

    def _check_series(self, series: str | None, uid: int) -> None:
        """A series id is ``s`` and seven hex digits, and a series has one owner."""
        if series is None:
            return
        if not is_series_id(series):
            raise BadRequest(f"series id {series!r} is not s and seven hex digits")
        others = {r.user for r in self.ledger.series(series) if r.uid != uid}
        if others:
            raise PermissionDenied(f"series {series} belongs to {', '.join(sorted(others))}")

    def _creatable(self, caller: Caller) -> tuple[Device, ...]:
        """The GPUs ``caller`` may have Chronos choose among (not those Slurm schedules)."""
        devices = self.machine.devices
        allowed = tuple(
            d for d in devices if slurm_policy.may_create(self.config.slurm, caller, d.index)
        )
        if not allowed:
            slurm_policy.check_create(self.config.slurm, caller, devices[0].index)
        return allowed

    def _on_granted(self, record: PartitionRecord) -> None:
        """The allocation-time cap's file of a new partition (of its primary GPU's vendor)."""
        dev = self.machine.by_uuid(record.device_uuid)
        if dev is not None and alloccap.wanted_for(dev.vendor):
            alloccap.on_create(record, self.mode)

    # ----------------------------------------------------------------- queue

    def op_wait(self, caller: Caller, request: messages.WaitRequest) -> dict[str, Any]:
        """Where ticket ``id`` stands; embedded mode polls up to ``max_wait`` seconds."""
        id, max_wait = request.id, request.max_wait
        self._authorize_ticket(caller, id)
        deadline = time.monotonic() + min(max(0.0, max_wait), MAX_POLL_S)
        while True:
            self.grant_waiting()
            status = self._ticket_status(id)
            if status["state"] != TicketState.WAITING or self.mode == Mode.DAEMON:
                return status
            if time.monotonic() >= deadline:
                return status
            time.sleep(EMBEDDED_POLL_S)

    def op_cancel(self, caller: Caller, request: messages.CancelRequest) -> dict[str, Any]:
        id = request.id
        if id.startswith("j"):  # a batch job (chronos submit): leave the queue, or stop it
            return batch.cancel(self, caller, batch.find(self, caller, id), self.stop_job)
        self._authorize_ticket(caller, id)
        self.ledger.cancel(id)
        self.on_change()
        return self._ticket_status(id)

    def op_submit(self, caller: Caller, request: messages.SubmitRequest) -> dict[str, Any]:
        return batch.submit(self, caller, request)

    def op_jobs(self, caller: Caller, request: messages.JobsRequest) -> list[dict[str, Any]]:
        return batch.listing(self, caller, request)

    def op_queue(
        self, caller: Caller, request: messages.QueueRequest
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """The queue in serving order; with ``limit``/``after`` one page of it (``after`` is
        the position already seen), as ``{"items", "next"}``."""
        limit, after = request.limit, request.after
        self.grant_waiting()
        if limit is None and after is None:
            return self.queue_statuses()
        start = _cursor(after)
        items = self.queue_statuses(start, _page_size(limit))
        page, cut = _fill_page(items)
        more = cut < len(items) or len(items) == _page_size(limit)
        return {"items": page, "next": start + cut if more and page else None}

    def grant_waiting(self) -> list[str]:
        """Admit queued requests that now fit; return their partition ids."""
        granted = self.ledger.grant_waiting(self.priority, self._quota_check)
        ids = [self.ledger.ticket(t.id).partition_id or "" for t in granted]
        if granted:
            self.on_change()
        for record in map(self.ledger.get, filter(None, ids)):
            self._on_granted(record)
        return ids

    def _grace_of(self, grace: Any) -> float:
        """The SIGTERM → SIGKILL grace a partition gets: at most the policy's max_grace."""
        if grace is None:
            return min(self.config.grace_s, self.config.max_grace_s)
        seconds = _grace(grace)
        if seconds > self.config.max_grace_s:
            raise BadRequest(
                f"grace {format_duration(seconds)} is more than the maximum "
                f"({format_duration(self.config.max_grace_s)}, max_grace in the policy)"
            )
        return seconds

    def _is_open(self, partition_id: str) -> bool:
        try:
            return self.ledger.get(partition_id).state_at(self.ledger.clock()) in (ACTIVE, BOOKED)
        except ChronosError:
            return False

    def priority(self, user: str, waited_s: float, usage_gpu_hours: float) -> float:
        """A waiter's fair-share priority under the policy in force (higher is served first)."""
        return priority(usage_gpu_hours, waited_s, self.config.fairshare_age_weight)

    def _quota_check(self, request: NewPartition) -> QuotaCheck | None:
        if request.exempt:
            return None
        limits = self.config.limits_for(request.user)
        if limits == Limits():
            return None
        return _Quota(limits, request)

    def _max_waiting(self, request: NewPartition) -> int | None:
        """How many waiting requests the user may have (administrators: no limit)."""
        return None if request.exempt else self.config.limits_for(request.user).max_waiting

    def queue_statuses(
        self, start: int = 0, count: int | None = None, only: str | None = None
    ) -> list[dict[str, Any]]:
        """Waiters in serving order (``count`` of them from position ``start``, or just the
        ticket ``only``); what each waits for is looked up only for those returned."""
        now = self.ledger.clock()
        out = []
        per_device: dict[str, int] = {}
        stop = None if count is None else start + count
        for n, (ticket, estimate) in enumerate(self.ledger.queue(self.priority)):
            req = ticket.request
            for m in req.members:  # a gang's position: its place on its primary GPU
                per_device[m.device_uuid] = per_device.get(m.device_uuid, 0) + 1
            if n < start or (only is not None and ticket.id != only):
                continue
            if stop is not None and n >= stop:
                break
            out.append(
                {
                    "ticket": ticket.id,
                    "state": ticket.state,
                    "user": req.user,
                    "device": req.device,
                    "devices": [m.device for m in req.members],
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
        """Partitions on the request's GPUs that end by the estimated start (what it waits for)."""
        if estimate is None:
            return []
        ids: list[str] = []
        for m in req.members:
            ids += [
                i for i in self.ledger.ending_by(m.device_uuid, estimate + 1e-6) if i not in ids
            ]
        return ids

    def visible_env(self, record: PartitionRecord) -> dict[str, str]:
        """The environment that shows a process exactly the record's GPUs, in share order."""
        from chronos.devices.base import visible_env_for  # with the backends: when used

        found = [self.machine.by_uuid(share.device_uuid) for share in record.shares]
        present = [device for device in found if device is not None]
        return visible_env_for(present) if len(present) == len(found) else {}

    def _ticket_status(self, ticket_id: str, note: str | None = None) -> dict[str, Any]:
        ticket = self.ledger.ticket(ticket_id)
        status: dict[str, Any] = {
            "ticket": ticket.id,
            "state": ticket.state,
            "reason": ticket.reason or note,
        }
        if ticket.state == TicketState.GRANTED and ticket.partition_id:
            record = self.ledger.get(ticket.partition_id)
            env = self.visible_env(record)
            status["partition"] = messages.Granted(record=record, visible_env=env).to_wire()
        elif ticket.state == TicketState.WAITING:
            mine = next(iter(self.queue_statuses(only=ticket.id)), None)
            if mine is not None:
                status.update(
                    {k: mine[k] for k in ("position", "estimated_start", "waiting_for", "waited_s")}
                )
        return status

    def _authorize_ticket(self, caller: Caller, ticket_id: str) -> None:
        ticket = self.ledger.ticket(ticket_id)
        if caller.uid != ticket.request.uid and not caller.is_admin:
            raise PermissionDenied(f"queued request {ticket_id} belongs to {ticket.request.user}")

    def op_release(self, caller: Caller, request: messages.ReleaseRequest) -> dict[str, Any]:
        id = request.id

        def may_release(record: PartitionRecord) -> None:
            self._authorize(caller, record, "release")

        record = self.ledger.release(id, caller.uid, caller.user, may_end=may_release)
        self.on_change()
        alloccap.on_release(record, self.mode)
        return record.to_wire()

    def op_get(self, caller: Caller, request: messages.GetRequest) -> dict[str, Any]:
        self.ledger.reap()
        return self.ledger.get(request.id).to_wire()

    def op_list(
        self, caller: Caller, request: messages.ListRequest
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Partitions, oldest first; with ``limit``/``after`` one page, as ``{"items", "next"}``
        (``next`` is the cursor for the following page, None after the last)."""
        all, limit, after = request.all, request.limit, request.after
        self._reap()
        now = self.ledger.clock()
        if limit is None and after is None:  # the unpaged form of older clients: one page
            records, more = self.ledger.partitions_page(all, 0, MAX_PAGE)
            _refuse_if_more("partitions", more)
            return [r.to_wire() for r in records if all or r.state_at(now) in (ACTIVE, BOOKED)]
        records, cursor = self.ledger.partitions_page(all, _cursor(after), _page_size(limit))
        items = [r.to_wire() for r in records if all or r.state_at(now) in (ACTIVE, BOOKED)]
        return {"items": items, "next": cursor}

    def op_stats(self, caller: Caller, request: messages.StatsRequest) -> dict[str, Any]:
        processes = request.processes
        self._reap()
        machine = self.machine
        now = self.ledger.clock()
        open_records = self.ledger.open_at(now, started=True)
        usage = machine.usage()
        found = _attribute(machine, open_records, self.ledger.attached()) if processes else []
        devices = [d.to_json() for d in self.device_stats(now, open_records, usage, found)]
        return {
            "mode": self.mode,
            "backends": machine.backend_names,
            "per_process_memory": machine.per_process_memory,
            "devices": devices,
            "alloc_cap": alloccap.stats_rows(open_records, found, self.mode) if processes else [],
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
            # A group counts on each GPU it uses, with its share of that GPU.
            held = [
                (r, share)
                for r in records
                if r.state_at(now) == ACTIVE and (share := r.share_on(dev.uuid)) is not None
            ]
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
                    committed_bytes=sum(share.memory_bytes for _, share in held),
                    active_partitions=len(held),
                    pci_bus_id=dev.pci_bus_id,
                    details=dict(dev.details),
                    processes=[p for p in found if p.device == dev.index],
                )
            )
        return out

    def op_attach(self, caller: Caller, request: messages.AttachRequest) -> dict[str, Any]:
        id, pid = request.id, request.pid
        record = self.ledger.get(id)
        self._authorize(caller, record, "attach to")
        with procs.Pinned(pid) as pinned:
            owner = self._attachable(caller, record, pid)
            # A Slurm job's processes stay in Slurm's job cgroup (moved out, one survives
            # scancel): they are attached, never moved.
            movable = slurm_policy.may_move(record, pid)
            placed = self._place(id, pinned) if movable else _verified(pinned)
            try:
                self.ledger.attach(id, pid, pinned.ticks, owner, caller.uid)
            except BaseException:
                if placed and self.cgroups is not None:
                    self.cgroups.unplace(pid, None)
                raise
        if self._is_gate(caller, record, pid):
            self.ledger.log(EventKind.SUPERVISED, id, detail={"pid": caller.pid, "child": pid})
            self.on_supervised(id, record.owner_pid or 0, record.owner_start)
        self.on_change()
        return {"id": id, "pid": pid, "cgroup": placed}

    def _attachable(self, caller: Caller, record: PartitionRecord, pid: int) -> int:
        """The uid of ``pid``, if ``caller`` may attach it to ``record``."""
        owner = procs.process_uid(pid)
        if owner is None:
            raise BadRequest(f"no process {pid}")
        if owner != record.uid and not caller.is_admin:
            raise PermissionDenied(
                f"process {pid} belongs to {procs.user_name(owner)}, not to "
                f"{record.user}; only an administrator may attach it"
            )
        return owner

    def _place(self, partition_id: str, pinned: procs.Pinned) -> bool:
        """Move the pinned process into the partition's cgroup; undo it if it changed meanwhile.

        Its owner and start time were checked before; after the move the pin says
        whether the PID still names that process (it cannot be reused while the
        process lives), and owner and start time are read again.
        """
        if self.cgroups is None or not self.cgroups.available:
            pinned.verify()
            return False
        owner = procs.process_uid(pinned.pid)
        origin = cgroups_of(pinned.pid)
        placed = self.cgroups.place(partition_id, pinned.pid)
        try:
            pinned.verify()
            if procs.process_uid(pinned.pid) != owner:
                raise BadRequest(f"process {pinned.pid} changed owner while it was attached")
        except BadRequest:
            if placed:
                self.cgroups.unplace(pinned.pid, origin)
            raise
        return placed

    def _is_gate(self, caller: Caller, record: PartitionRecord, pid: int) -> bool:
        """``chronos run``'s gate: the partition's owner attaching the child it just forked.

        The child still runs the supervisor's own program (it execs only once
        attached). A client that merely asks for ``kind="run"`` gains nothing; one
        that imitates the gate is spared only while it holds no GPU memory itself
        (Deadlines.members), which is all a real supervisor needs.
        """
        return (
            self.mode == Mode.DAEMON
            and record.kind == Origin.RUN
            and caller.pid is not None
            and caller.pid == record.owner_pid
            and procs.parent_pid(pid) == caller.pid
            and procs.executable(pid) is not None
            and procs.executable(pid) == procs.executable(caller.pid)
        )

    def op_attached_pids(
        self, caller: Caller, request: messages.AttachedPidsRequest
    ) -> list[dict[str, Any]]:
        return [
            {"pid": a.pid, "start_ticks": a.start_ticks, "uid": a.uid}
            for a in self.ledger.attached(request.id)
        ]

    def op_extend(self, caller: Caller, request: messages.ExtendRequest) -> dict[str, Any]:
        id, duration = request.id, request.duration
        record = self.ledger.get(id)
        self._authorize(caller, record, "extend")
        slurm_policy.check_extend(caller, record)
        extra = parse_duration(duration, math.inf)
        new_end = record.expires_at + extra
        self._within_max_duration(new_end - record.starts_at)
        if not caller.is_admin:
            self._check_extension(record, new_end)

        def capacity(share: Share) -> int:
            return self.config.reservable_bytes(share.device, share.device_total_bytes)

        updated = self.ledger.extend_expiry(
            id, new_end, capacity, caller.uid, caller.user, self.priority
        )
        self.on_change()
        return updated.to_wire()

    def op_events(
        self, caller: Caller, request: messages.EventsRequest
    ) -> list[dict[str, Any]] | dict[str, Any]:
        """Events in order; with ``limit``/``after`` (a ``seq``) one page: ``{"items", "next"}``."""
        since, id, limit, after = request.since, request.id, request.limit, request.after
        if limit is None and after is None:  # the unpaged form of older clients: one page
            events, more = self.ledger.events_page(since, id, 0, MAX_PAGE)
            _refuse_if_more("events", more)
            return [e.to_json() for e in events]
        events, cursor = self.ledger.events_page(since, id, _cursor(after), _page_size(limit))
        items = [e.to_json() for e in events]
        page, cut = _fill_page(items)
        if cut < len(items):
            cursor = events[cut - 1].seq
        return {"items": page, "next": cursor}

    def _within_max_duration(self, seconds: float) -> float:
        """The machine's longest partition is a limit like the per-user ones: refused as they
        are (same wording, same exit code), naming the maximum."""
        if seconds > self.config.max_duration_s + 1e-6:
            from chronos.refusals import OverLimit, refusal

            standing = (
                f"{format_duration(seconds)} asked, "
                f"at most {format_duration(self.config.max_duration_s)}"
            )
            raise refusal(OverLimit("max_duration", standing))
        return seconds

    def _check_extension(self, record: PartitionRecord, new_end: float) -> None:
        """An extension must pass the same quotas as a partition of the new length."""
        limits = self.config.limits_for(record.user)
        now = self.ledger.clock()
        mine = [r for r in self.ledger.recent(now - 8 * 86400.0, record.uid) if r.id != record.id]
        ask = Ask(
            record.user,
            record.device,
            record.memory_fraction,
            record.starts_at,
            new_end,
            len(record.shares),
        )
        check_limits(limits, ask, mine, now)

    def op_usage(self, caller: Caller, request: messages.UsageRequest) -> list[dict[str, Any]]:
        from chronos.accounting import usage_rows

        since, user = request.since, request.user

        now = self.ledger.clock()
        try:
            since = now - 7 * 86400.0 if since is None else float(since)
        except OverflowError:
            since = math.inf
        if not math.isfinite(since):
            raise BadRequest("since must be a time (epoch seconds)")
        return usage_rows(self.ledger.usage_totals(since, now, user))

    def compact_history(self, batch: int = 500) -> int:
        """Delete one batch of history older than the retention; return rows deleted."""
        retention = self.config.history_retention_s
        return self.ledger.compact(self.ledger.clock() - retention, batch)

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


class _Quota:
    """A user's quota check for one request (see ``ledger.QuotaCheck``)."""

    def __init__(self, limits: Limits, request: NewPartition) -> None:
        self.limits = limits
        self.request = request
        self.needs_history = needs_history(limits)
        """Only GPU-hour budgets need the user's ended partitions: others skip reading them."""

    def __call__(self, mine: list[PartitionRecord], start: float, end: float, now: float) -> None:
        req = self.request
        fraction = req.memory_bytes / req.device_total_bytes
        ask = Ask(req.user, req.device, fraction, start, end, len(req.members))
        check_limits(self.limits, ask, mine, now)


def ledger_policy(current: Callable[[], Config]) -> LedgerPolicy:
    """What the ledger asks of the policy in force, read from ``current()`` at each use:
    a reload (the daemon replaces the service's config) then also reaches requests
    still waiting."""

    def capacity_of(member: Member) -> int:
        return current().reservable_bytes(member.device, member.device_total_bytes)

    return LedgerPolicy(capacity_of, lambda: current().fairshare_half_life_s)


def _verified(pinned: procs.Pinned) -> bool:
    """Attached without a move: the pin is still checked (the PID names the same process)."""
    pinned.verify()
    return False


def _refuse_if_more(what: str, more: int | None) -> None:
    """An unpaged listing is answered only while it fits one page: its work stays bounded."""
    if more is not None:
        raise BadRequest(
            f"more than {MAX_PAGE} {what}: ask page by page with limit and after "
            "(the chronos CLI and API do)"
        )


def _page_size(limit: int | None) -> int:
    return MAX_PAGE if limit is None else max(1, min(limit, MAX_PAGE))


def _cursor(after: int | None) -> int:
    return 0 if after is None else max(0, min(after, MAX_CURSOR))


def _fill_page(items: list[dict[str, Any]]) -> tuple[list[dict[str, Any]], int]:
    """The leading items that fit in PAGE_BYTES (at least one), and how many that is."""
    size = 0
    for n, item in enumerate(items):
        size += len(json.dumps(item, separators=(",", ":")))
        if size > PAGE_BYTES and n > 0:
            return items[:n], n
    return items, len(items)


def _grace(value: Any) -> float:
    zero_text = isinstance(value, str) and value.strip() in ("0", "0s")
    if zero_text or (type(value) in (int, float) and value == 0):
        return 0.0
    # A kill delay, not a share of time: under a second is the owner's own choice.
    return parse_duration(value, minimum=0.0)


def _signal_name(name: Any) -> str:
    """The warning signal of a request, checked as the policy file's is (``parse_signal_name``)."""
    return parse_signal_name(name)


def _open_machine() -> Machine:
    """The GPUs, found only when a request needs them (a list does not, nor its imports)."""
    from chronos.devices import open_machine

    return open_machine()


def _attribute(
    machine: Machine, records: Iterable[PartitionRecord], attached: Iterable[Attached]
) -> list[ProcessUse]:
    from chronos.attribution import attribute_processes

    return attribute_processes(machine, records, attached)
