"""The Python API: ``Partitioner`` and the ``Partition`` handles it returns.

This is the one client of the transport: the CLI, ``chronos run``, the Slurm hooks
and the dashboard all go through ``Partitioner`` and ``Partition``, which send the
typed requests of :mod:`chronos.messages` and read typed replies.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, overload

from chronos.errors import (
    AdmissionRefused,
    BadRequest,
    ChronosError,
    NotFound,
    PartitionEnded,
    Timeout,
)
from chronos.expiry import KIND_OF, TERMINATE, ExpiryMonitor, choose
from chronos.messages import (
    AttachedPidsRequest,
    AttachRequest,
    CancelRequest,
    CreateRequest,
    EventsRequest,
    ExtendRequest,
    GetRequest,
    Granted,
    JobsRequest,
    ListRequest,
    QueueRequest,
    ReleaseRequest,
    Request,
    StatsRequest,
    SubmitRequest,
    TicketStatus,
    UsageRequest,
    WaitRequest,
    create_reply,
)
from chronos.models import ACTIVE, BOOKED, SERIES_PREFIX, DeviceStats, PartitionRecord
from chronos.transport import Transport, connect
from chronos.vocabulary import Mode, Origin, TicketState

if TYPE_CHECKING:
    from chronos.service import Service

PAGE = 500
"""Records asked for per page of a listing (the daemon sends at most its own maximum)."""


def _when(ts: float | None) -> datetime | None:
    return None if ts is None else datetime.fromtimestamp(ts, tz=UTC).astimezone()


StartTime = datetime | str | float | int
"""What ``start=`` takes: a datetime (naive means local time), ``"+2h"``/``"09:00"``/ISO
text as the CLI's ``--start``, or epoch seconds."""


def start_timestamp(start: StartTime, now: float) -> float:
    """Epoch seconds of a booking's start; a start in the past is refused."""
    if isinstance(start, bool):
        raise BadRequest(f"start must be a time, not {start!r}")
    if isinstance(start, datetime):
        at = start.timestamp()  # a naive datetime is local time, as datetime.now() gives
    elif isinstance(start, str):
        from chronos.units import parse_start

        at = parse_start(start, now)
    elif isinstance(start, int | float):
        at = float(start)
    else:
        raise BadRequest(f"start must be a datetime, a string or epoch seconds, not {start!r}")
    if at < now - START_SLACK_S:
        from chronos.units import local_clock

        raise BadRequest(f"start {local_clock(at)} is in the past; leave it out to start now")
    return at


START_SLACK_S = 1.0
"""A start this close behind the clock is "now" (the caller's clock read a moment ago)."""


def timeout_seconds(timeout: float | str | None) -> float | None:
    """``timeout=`` as seconds: a number, or text such as ``"30m"``."""
    if timeout is None or isinstance(timeout, int | float) and not isinstance(timeout, bool):
        return None if timeout is None else float(timeout)
    if isinstance(timeout, str):
        from chronos.units import parse_duration

        return parse_duration(timeout, float("inf"))
    raise BadRequest(f"timeout must be seconds or a duration such as '30m', not {timeout!r}")


T = TypeVar("T")


class _RecordField(Generic[T]):
    """A read-only attribute of a :class:`Partition` that is its record's field of the
    same name, as last read from the ledger (no round trip)."""

    def __set_name__(self, owner: type, name: str) -> None:
        self._name = name

    @overload
    def __get__(self, partition: None, owner: type) -> _RecordField[T]: ...
    @overload
    def __get__(self, partition: Partition, owner: type | None = None) -> T: ...
    def __get__(
        self, partition: Partition | None, owner: type | None = None
    ) -> T | _RecordField[T]:
        if partition is None:
            return self  # on the class (help(), inspection): the descriptor itself
        value: T = getattr(partition._record, self._name)
        return value

    def __set__(self, partition: Partition, value: T) -> None:
        raise AttributeError(f"{self._name} is the ledger's: it cannot be set")


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
        self._monitor: ExpiryMonitor | None = None
        self.on_expiry = TERMINATE
        """What its end does to this process (see :meth:`Partitioner.create`)."""

    # ----------------------------------------------------------------- fields
    id = _RecordField[str]()
    device = _RecordField[int]()
    """The primary GPU's index."""
    devices = _RecordField[tuple[int, ...]]()
    """Every GPU of the partition (a group's all, the primary ``device`` first)."""
    device_uuid = _RecordField[str]()
    memory_bytes = _RecordField[int]()
    memory_fraction = _RecordField[float]()
    user = _RecordField[str]()

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
        self._record = PartitionRecord.from_wire(self._transport.send(GetRequest(id=self.id)))
        return self

    def release(self) -> None:
        """End the partition now; harmless if it already ended (released or expired)."""
        try:
            reply = self._transport.send(ReleaseRequest(id=self.id))
            self._record = PartitionRecord.from_wire(reply)
        except PartitionEnded:
            self.refresh()  # released elsewhere or expired: the goal is met
        if self._monitor is not None:
            self._monitor.stop()

    def extend(self, duration: float | str) -> None:
        """Move the end later by ``duration`` (seconds or ``30m``) if capacity allows."""
        self._record = PartitionRecord.from_wire(
            self._transport.send(ExtendRequest(id=self.id, duration=duration))
        )

    def attach(self, pid: int) -> None:
        """Count process ``pid`` (and its children) toward this partition."""
        self._transport.send(AttachRequest(id=self.id, pid=pid))

    def events(self) -> list[dict[str, Any]]:
        """This partition's events in the ledger (``chronos events --id``), oldest first."""
        events: list[dict[str, Any]] = self._transport.send(EventsRequest(id=self.id))
        return events

    @property
    def mode(self) -> str:
        """``"daemon"`` or ``"embedded"``: who keeps this partition's deadlines."""
        return self._transport.mode

    def attached_pids(self) -> list[dict[str, Any]]:
        """The processes attached to this partition (embedded mode: what its end signals)."""
        attached: list[dict[str, Any]] = self._transport.send(AttachedPidsRequest(id=self.id))
        return attached

    def device_stats(self) -> dict[str, Any]:
        """``stats`` with processes, as the service answers it (the devices and who holds what)."""
        report: dict[str, Any] = self._transport.send(StatsRequest(processes=True))
        return report

    @property
    def local_service(self) -> Service | None:
        """The in-process service where there is no daemon (embedded mode), else None."""
        return self._transport.local_service

    def limits_env(self) -> dict[str, str]:
        """Environment for a child process: its GPUs only, and every framework capped.

        A group's GPUs are ordinals 0..n-1 in share order, each capped to its own share.
        """
        from chronos import alloccap
        from chronos.frameworks import limits_env

        cap_files = alloccap.active_files(self._record, self._transport.mode)
        total = self._record.device_total_bytes
        capped = cap_files is not None
        shares = self._share_sizes()
        env = {**self.env, **limits_env(self.memory_bytes, total, capped=capped, shares=shares)}
        if cap_files is not None:  # the allocation-time cap (docs/ALLOCATION_CAP.md)
            env.update(alloccap.preload_env(cap_files))
        return env

    def _share_sizes(self) -> list[tuple[int, int]]:
        """``(bytes, GPU total)`` of each GPU's share, primary first."""
        return [(s.memory_bytes, s.device_total_bytes) for s in self._record.shares]

    def apply_framework_limits(self) -> dict[str, str]:
        """Cap PyTorch, TensorFlow, JAX and CuPy in this process to the partition.

        Call it before the framework first uses the GPU. Returns, per framework,
        what was done.
        """
        from chronos.frameworks import apply_in_process

        for name, value in self._visible_env.items():
            os.environ.setdefault(name, value)
        return apply_in_process(
            self.memory_bytes, self._record.device_total_bytes, shares=self._share_sizes()
        )

    def on_expiring(self, seconds_before: float, callback: Callable[[Partition], Any]) -> None:
        """Call ``callback(partition)`` ``seconds_before`` the end.

        In a background thread; in an interactive interpreter (Jupyter, the REPL)
        in the main thread, so that what it prints shows in the running cell. There
        it runs as a signal handler between two steps of whatever the main thread
        was doing: keep it short (print, save a checkpoint), and do not call this
        client from it (the main thread may be in the middle of a call).
        """
        self._ensure_monitor().add_warning(float(seconds_before), callback)

    def _ensure_monitor(self) -> ExpiryMonitor:
        if self._monitor is None:
            self._monitor = ExpiryMonitor(self, self.on_expiry)
        return self._monitor

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
        device: int | str = 0,
        memory: float | str = 0.5,
        duration: float | str = 3600,
        *,
        devices: Sequence[int] | None = None,
        gpus: int | None = None,
        user: str | None = None,
        persist: bool = False,
        grace: float | str | None = None,
        warn: float | str | None = None,
        warn_signal: str | None = None,
        start: StartTime | None = None,
        wait: bool = False,
        timeout: float | str | None = None,
        on_wait: Callable[[dict[str, Any]], Any] | None = None,
        kind: str = Origin.API,
        on_expiry: str | None = None,
        series: str | None = None,
    ) -> Partition:
        """Reserve ``memory`` (fraction, ``50%`` or ``40GiB``) of GPU ``device`` for ``duration``.

        ``device="auto"``: Chronos picks the GPU (docs/PLACEMENT.md). A group of several
        GPUs, admitted on all at once or not at all: ``devices=[0, 1]`` (those GPUs, the
        first the primary) or ``gpus=2`` (any two, Chronos picks). ``memory`` is per GPU:
        ``0.5`` is half of each.

        By default the partition belongs to this process and ends when it exits;
        ``persist=True`` keeps it until it expires or is released. ``warn``
        sends ``warn_signal`` (default SIGUSR1) to its processes that long before
        the end. ``start`` books it ahead of time: a ``datetime``, text as the
        CLI's ``--start`` (``"+2h"``, ``"09:00"``, ISO) or epoch seconds; a
        start in the past is refused. With ``wait=True`` a request that does
        not fit now waits in the fair queue (at most ``timeout``: seconds or
        ``"30m"``; ``on_wait(status)`` is called as it waits) instead of failing.

        ``on_expiry`` says what the end does to this process (docs/API.md):
        ``"terminate"`` (SIGTERM at the end; the default in scripts), ``"raise"``
        (the default in Jupyter and the REPL: a process that holds no memory on the
        GPU is left alone; one that does is warned and gets ``PartitionEnded``
        raised in its main thread, and SIGTERM only if it still holds the memory
        after the grace) or ``"notify"`` (as ``"raise"``, without the exception).
        ``series`` (from :func:`chronos.models.new_series_id`) ties bookings of one
        repeated series together, as ``chronos create --repeat`` does.
        """
        on_expiry = choose(on_expiry)
        if kind == Origin.API:
            kind = KIND_OF[on_expiry]  # the daemon reads the choice from the kind
        starts_at = None if start is None else start_timestamp(start, time.time())
        request = CreateRequest(
            device=device,
            devices=None if devices is None else [int(d) for d in devices],
            gpus=gpus,
            memory=memory,
            duration=duration,
            user=user,
            persist=persist,
            kind=kind,
            grace=grace,
            warn=warn,
            warn_signal=warn_signal,
            start=starts_at,
            wait=wait,
            timeout=timeout_seconds(timeout),
            series=series,
        )
        reply = create_reply(self._transport.send(request))
        if isinstance(reply, TicketStatus):
            reply = self._wait_for(reply, on_wait, request.timeout)
        partition = Partition(reply.record, self._transport, reply.visible_env)
        partition.on_expiry = on_expiry
        owned_here = partition.record.owner_pid == os.getpid() and kind != Origin.RUN
        if owned_here and (self.mode == Mode.EMBEDDED or on_expiry != TERMINATE):
            # No daemon will end it on time, or this process warns and raises itself:
            # it keeps the deadline. (Not for ``chronos run``: its supervisor keeps the
            # deadline, and a thread here would take the SIGTERM it blocks and forwards.)
            partition._ensure_monitor()
        return partition

    def _wait_for(
        self,
        status: TicketStatus,
        on_wait: Callable[[dict[str, Any]], Any] | None,
        timeout: float | None = None,
    ) -> Granted:
        """Poll a queued request until it is granted; leave the queue if interrupted."""
        ticket = status.ticket
        try:
            while status.state == TicketState.WAITING:
                if on_wait is not None:
                    on_wait(status.status)
                reply = self._transport.send(WaitRequest(id=ticket, max_wait=1.0))
                status = TicketStatus.from_wire(reply)
        except BaseException:
            with contextlib.suppress(ChronosError):
                self._transport.send(CancelRequest(id=ticket))
            raise
        if status.state == TicketState.TIMEOUT:
            from chronos.units import format_duration

            after = "" if timeout is None else f" after {format_duration(timeout)}"
            raise Timeout(f"gave up waiting for GPU capacity{after}; left the queue")
        granted = status.granted
        if status.state != TicketState.GRANTED or granted is None:
            raise AdmissionRefused(f"queued request {ticket} {status.state}: {status.reason}")
        return granted

    def queue(self) -> list[dict[str, Any]]:
        """Requests waiting for capacity, in the order they will be served."""
        return self._pages(QueueRequest())

    def events(
        self, since: float | None = None, partition_id: str | None = None
    ) -> list[dict[str, Any]]:
        """The ledger's events (newer than ``since``; of ``partition_id`` only), oldest first."""
        return self._pages(EventsRequest(since=since, id=partition_id))

    def usage(self, since: float | None = None, user: str | None = None) -> list[dict[str, Any]]:
        """GPU-hours reserved and used per user since ``since`` (default: the last 7 days)."""
        result: list[dict[str, Any]] = self._transport.send(UsageRequest(since=since, user=user))
        return result

    def _pages(self, request: QueueRequest | EventsRequest | ListRequest) -> list[dict[str, Any]]:
        """Every record of a listing, fetched page by page (each reply stays small)."""
        items: list[dict[str, Any]] = []
        after = None
        while True:
            try:
                page = self._transport.send(request._replace(limit=PAGE, after=after))
            except BadRequest as exc:
                if after is not None or "unknown argument" not in str(exc):
                    raise
                legacy: list[dict[str, Any]] = self._transport.send(request)
                return legacy  # a daemon older than this client: it does not page
            items.extend(page["items"])
            after = page["next"]
            if after is None:
                return items

    def get(self, partition_id: str) -> Partition:
        """The partition ``partition_id`` (or a unique prefix of it)."""
        record = self._send_with_id(GetRequest, partition_id)
        return Partition(PartitionRecord.from_wire(record), self._transport)

    def release(self, partition_id: str) -> None:
        """End ``partition_id`` (or a unique prefix) now; PartitionEnded if it already ended."""
        self._send_with_id(ReleaseRequest, partition_id)

    def cancel(self, ticket: str) -> dict[str, Any]:
        """Take queued request ``ticket`` (or a unique prefix) out of the queue; a batch
        job's id (``j…``, or a prefix) leaves the queue or is stopped if it runs."""
        if ticket.strip().startswith("j"):  # the daemon resolves a job's prefix itself
            job: dict[str, Any] = self._transport.send(CancelRequest(id=ticket.strip()))
            return job
        result: dict[str, Any] = self._send_with_id(CancelRequest, ticket, tickets=True)
        return result

    def submit(
        self,
        argv: Sequence[str],
        *,
        partition: dict[str, Any],
        output: str,
        error: str | None = None,
        name: str | None = None,
        after: str | None = None,
        cwd: str | None = None,
        env: dict[str, str] | None = None,
        umask: int | None = None,
    ) -> dict[str, Any]:
        """A batch job (chronosd starts ``argv`` as this user once ``partition`` — a
        create request's arguments — is granted); returns the job. The working
        directory, environment and umask are this process's unless given."""
        if umask is None:
            umask = os.umask(0o22)
            os.umask(umask)
        request = SubmitRequest(
            partition=partition,
            argv=list(argv),
            env=dict(os.environ if env is None else env),
            cwd=cwd or os.getcwd(),
            umask=umask,
            output=output,
            error=error,
            name=name,
            after=after,
        )
        job: dict[str, Any] = self._transport.send(request)
        return job

    def jobs(self, all: bool = False, id: str | None = None) -> list[dict[str, Any]]:
        """Batch jobs: this user's (``all``: everyone's; ``id``: one, by a unique prefix)."""
        jobs: list[dict[str, Any]] = self._transport.send(JobsRequest(all=all, id=id))
        return jobs

    def _send_with_id(
        self, request: Callable[..., Request], text: str, *, tickets: bool = False
    ) -> Any:
        """Send ``request(id=...)`` for the id ``text`` names: itself, or the one id it is a
        prefix of. A full id costs one round trip; only a miss looks the prefix up."""
        text = text.strip()
        if not text:
            raise BadRequest("an id must not be empty")
        try:
            return self._transport.send(request(id=text))
        except NotFound:
            full = self.resolve(text, tickets=tickets)
            if full == text:
                raise
        return self._transport.send(request(id=full))

    def resolve(self, text: str, *, tickets: bool = False) -> str:
        """The full id that ``text`` names: itself, or the one id it is a prefix of.

        As in git and docker, any unique prefix will do. Ids are matched among
        the ledger's partitions (ended ones too) and their series (``create
        --repeat``) or, with ``tickets``, the waiting requests; several matches
        are an error that lists them.
        """
        text = text.strip()
        known: set[str]
        if tickets:
            known = {q["ticket"] for q in self._pages(QueueRequest())}
        else:
            records = self.records(all=True)
            known = {r["id"] for r in records} | {r["series"] for r in records if r.get("series")}
        if text in known:
            return text
        matches: list[str] = sorted(i for i in known if i.startswith(text))
        if len(matches) == 1:
            return matches[0]
        what = "queued request" if tickets else "partition"
        if not tickets and text.startswith(SERIES_PREFIX):
            what = "partition or series"
        if not matches:
            raise NotFound(f"no {what} {text!r}")
        raise BadRequest(f"ambiguous id {text!r}: it is a prefix of {', '.join(matches)}")

    def release_series(self, series: str) -> list[PartitionRecord]:
        """End every booking of ``series`` not yet ended; return them as they are now."""
        members = [
            PartitionRecord.from_wire(r)
            for r in self.records(all=True)
            if r.get("series") == series
        ]
        if not members:
            raise NotFound(f"no series {series!r}")
        now = time.time()
        for record in members:
            if record.state_at(now) in (ACTIVE, BOOKED):
                with contextlib.suppress(PartitionEnded):  # it ended meanwhile: the goal is met
                    self._transport.send(ReleaseRequest(id=record.id))
        wanted = {r.id for r in members}
        return [PartitionRecord.from_wire(r) for r in self.records(all=True) if r["id"] in wanted]

    def stats(self) -> list[DeviceStats]:
        return [DeviceStats.from_wire(d) for d in self.stats_report()["devices"]]

    def stats_report(self) -> dict[str, Any]:
        """The machine's report as ``chronos stats --json`` is made from: ``mode``,
        ``backends``, ``per_process_memory``, ``devices`` (each GPU with its partitions and
        processes) and ``alloc_cap``, as plain JSON values."""
        report: dict[str, Any] = self._transport.send(StatsRequest())
        return report

    def close(self) -> None:
        self._transport.close()

    def __enter__(self) -> Partitioner:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def records(self, all: bool = False) -> list[dict[str, Any]]:
        """The partitions as the daemon sends them (``all``: ended ones too), every page."""
        return self._pages(ListRequest(all=all))

    def list(self, all: bool = False) -> list[Partition]:
        return [Partition(PartitionRecord.from_wire(r), self._transport) for r in self.records(all)]
