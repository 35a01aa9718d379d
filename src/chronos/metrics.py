"""Prometheus metrics of ``chronosd`` (text exposition on a local HTTP address).

Off unless the policy file sets ``metrics_address`` (or ``chronosd --metrics
ADDRESS``). The daemon imports this module only then, so ``prometheus_client``
is never loaded by the CLI. See ``docs/METRICS.md`` for every metric.

Where the numbers come from, on each scrape:

* gauges (GPUs, partitions, queue) are read from the daemon's own state, on
  its event loop, by :class:`ChronosCollector`: the same ledger and device
  backends that ``chronos stats`` / ``list`` / ``queue`` show, and the
  sampler's last per-process sample for the memory each partition uses;
* counters are derived from the ledger's ``events`` table, read from where
  the last scrape stopped (by ``seq``) on a read-only connection of their
  own (:class:`EventCounts`); they count the whole history of the ledger, so
  a daemon restart does not reset them;
* the request latency histogram is fed by the socket server's
  ``on_request`` hook.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import json
import sqlite3
import threading
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar
from urllib.parse import quote

from prometheus_client import Histogram, disable_created_metrics
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
    Metric,
)
from prometheus_client.exposition import make_wsgi_app
from prometheus_client.registry import Collector, CollectorRegistry

from chronos.httpserve import (
    IDLE_TIMEOUT_S,
    App,
    LocalHTTPServer,
    Request,
    Response,
    Site,
    text_response,
)
from chronos.models import ACTIVE, BOOKED, DeviceStats
from chronos.slurm.settings import job_of
from chronos.vocabulary import EventKind, RefusalKind, TicketState, ViolationKind

if TYPE_CHECKING:
    from chronos.daemon.sampler import Sampler
    from chronos.daemon.server import Server
    from chronos.service import Service

PREFIX = "chronos"
SCRAPE_TIMEOUT_S = 5.0
"""Longest a scrape waits for the daemon's event loop to read its state."""
LATENCY_BUCKETS = (
    0.0005,
    0.001,
    0.0025,
    0.005,
    0.01,
    0.025,
    0.05,
    0.1,
    0.25,
    0.5,
    1.0,
    2.5,
    5.0,
    10.0,
)
REFUSED_REASONS: tuple[str, ...] = tuple(RefusalKind)
TERMINATED_REASONS = (
    EventKind.EXPIRED.value,
    ViolationKind.MEMORY.value,
    ViolationKind.UNPARTITIONED.value,
)
KILLED_REASONS = (EventKind.EXPIRED.value, ViolationKind.MEMORY.value)
"""SIGKILLs of unpartitioned processes are logged by the daemon, not recorded in the ledger."""
QUEUE_DROP_REASONS: tuple[str, ...] = (
    TicketState.CANCELLED,
    TicketState.TIMEOUT,
    TicketState.REFUSED,
)
_COUNTED_KINDS = (
    EventKind.CREATED,
    EventKind.RELEASED,
    EventKind.EXPIRED,
    EventKind.REFUSED,
    EventKind.TERMINATED,
    EventKind.KILLED,
    EventKind.UNPARTITIONED,
    EventKind.MEMORY_EXCEEDED,
    EventKind.QUEUED,
    EventKind.QUEUE_CANCELLED,
    EventKind.QUEUE_TIMEOUT,
    EventKind.QUEUE_REFUSED,
)
_BATCH = 10_000

T = TypeVar("T")


# --------------------------------------------------------------------------- state


@dataclass(frozen=True)
class GpuState:
    """A GPU as ``chronos stats`` sees it, plus what only the metrics show."""

    stats: DeviceStats
    booked_partitions: int
    queue_length: int
    unpartitioned_bytes: int | None


@dataclass(frozen=True)
class PartitionState:
    id: str
    user: str
    gpu: int
    reserved_bytes: int
    used_bytes: int | None
    expires_at: float
    remaining_s: float
    slurm_job: str = ""
    """The Slurm job id of a ``slurm:<job>`` partition; empty for others."""


@dataclass(frozen=True)
class State:
    """What the gauges show, read at one instant."""

    gpus: list[GpuState]
    partitions: list[PartitionState]
    sampled_at: float | None = None
    sample_seconds: float | None = None
    connections: int | None = None


def read_state(
    service: Service, sampler: Sampler | None = None, server: Server | None = None
) -> State:
    """The daemon's current state; call it on the daemon's event loop (it uses the ledger)."""
    ledger = service.ledger
    now = ledger.clock()
    machine = service.machine
    records = ledger.open_at(now)
    usage = machine.usage()
    waiting = ledger.waiting()
    per_process = machine.per_process_memory
    processes = list(sampler.last) if sampler is not None else []
    sampled = sampler is not None and sampler.last_at is not None
    used_by: dict[tuple[str | None, int], int] = {}
    """Bytes in use per (partition, GPU index): a group has a series on each of its GPUs."""
    unpartitioned: dict[int, int] = {}
    for p in processes:
        if p.used_bytes is None:
            continue
        key = (p.partition_id, p.device)
        used_by[key] = used_by.get(key, 0) + p.used_bytes
        if p.partition_id is None:
            unpartitioned[p.device] = unpartitioned.get(p.device, 0) + p.used_bytes
    gpus = []
    for stats in service.device_stats(now, records, usage, []):
        gpus.append(
            GpuState(
                stats=stats,
                booked_partitions=sum(
                    1
                    for r in records
                    if r.share_on(stats.uuid) is not None and r.state_at(now) == BOOKED
                ),
                queue_length=sum(
                    1
                    for t in waiting
                    if any(m.device_uuid == stats.uuid for m in t.request.members)
                ),
                unpartitioned_bytes=unpartitioned.get(stats.index, 0)
                if per_process and sampled
                else None,
            )
        )
    partitions = []
    for r in records:
        if r.state_at(now) != ACTIVE:
            continue
        for share in r.shares:  # a group: one series per GPU, under its one id
            found = machine.by_uuid(share.device_uuid)
            gpu = found.index if found else share.device
            partitions.append(
                PartitionState(
                    id=r.id,
                    user=r.user,
                    gpu=gpu,
                    reserved_bytes=share.memory_bytes,
                    used_bytes=used_by.get((r.id, gpu), 0) if per_process and sampled else None,
                    expires_at=r.expires_at,
                    remaining_s=max(0.0, r.expires_at - now),
                    slurm_job=job_of(r.kind) or "",
                )
            )
    return State(
        gpus=gpus,
        partitions=partitions,
        sampled_at=sampler.last_at if sampler is not None else None,
        sample_seconds=sampler.sample_seconds if sampler is not None else None,
        connections=server.connections if server is not None else None,
    )


def call_on_loop(
    loop: asyncio.AbstractEventLoop, fn: Callable[[], T], timeout: float = SCRAPE_TIMEOUT_S
) -> T:
    """Run ``fn`` on ``loop`` (where the daemon's state lives) and wait for its result."""
    try:
        if asyncio.get_running_loop() is loop:
            return fn()
    except RuntimeError:
        pass
    future: concurrent.futures.Future[T] = concurrent.futures.Future()

    def run() -> None:
        if not future.set_running_or_notify_cancel():
            return
        try:
            future.set_result(fn())
        except BaseException as exc:  # noqa: BLE001 - handed to the waiting thread
            future.set_exception(exc)

    loop.call_soon_threadsafe(run)
    try:
        return future.result(timeout)
    except concurrent.futures.TimeoutError:
        future.cancel()
        raise


# ------------------------------------------------------------------------ counters


class EventCounts:
    """Totals derived from the ledger's ``events`` table, tailed by ``seq``.

    Uses its own read-only SQLite connection (never the daemon's), so a scrape
    does not touch the daemon's transactions, and a first scrape of a long
    history does not stall the event loop.
    """

    def __init__(self, ledger_path: Path) -> None:
        self.path = ledger_path
        self.seq = 0
        self.created = 0
        self.released = 0
        self.expired = 0
        self.memory_exceeded = 0
        self.queued = 0
        self.refused = dict.fromkeys(REFUSED_REASONS, 0)
        self.terminated = dict.fromkeys(TERMINATED_REASONS, 0)
        self.killed = dict.fromkeys(KILLED_REASONS, 0)
        self.queue_dropped = dict.fromkeys(QUEUE_DROP_REASONS, 0)
        self._lock = threading.Lock()
        self._db: sqlite3.Connection | None = None

    def _connect(self) -> sqlite3.Connection:
        if self._db is None:
            uri = f"file:{quote(str(self.path))}?mode=ro"
            self._db = sqlite3.connect(uri, uri=True, timeout=5.0, check_same_thread=False)
        return self._db

    def update(self) -> None:
        """Count every event added since the last call."""
        marks = ", ".join("?" * len(_COUNTED_KINDS))
        sql = (
            f"SELECT seq, kind, detail FROM events WHERE seq > ? AND kind IN ({marks}) "
            f"ORDER BY seq LIMIT {_BATCH}"
        )
        with self._lock:
            db = self._connect()
            while True:
                rows = db.execute(sql, (self.seq, *_COUNTED_KINDS)).fetchall()
                for seq, kind, detail in rows:
                    self.count(kind, _detail(detail))
                    self.seq = seq
                if len(rows) < _BATCH:
                    return

    def count(self, kind: str, detail: dict[str, Any]) -> None:
        if kind == EventKind.CREATED:
            self.created += 1
        elif kind == EventKind.RELEASED:
            self.released += 1
        elif kind == EventKind.EXPIRED:
            self.expired += 1
        elif kind == EventKind.MEMORY_EXCEEDED:
            self.memory_exceeded += 1
        elif kind == EventKind.QUEUED:
            self.queued += 1
        elif kind == EventKind.REFUSED:
            self.refused[refusal_reason(detail)] += 1
        elif kind in (EventKind.TERMINATED, EventKind.KILLED):
            table = self.terminated if kind == EventKind.TERMINATED else self.killed
            why = detail.get("why")
            if isinstance(why, str) and why in table:
                table[why] += _count(detail.get("processes"))
        elif kind == EventKind.UNPARTITIONED:
            if detail.get("action") == "enforce":
                self.terminated[ViolationKind.UNPARTITIONED] += _count(detail.get("pids"))
        elif kind.startswith("queue_"):
            reason = kind.removeprefix("queue_")
            if reason in self.queue_dropped:
                self.queue_dropped[reason] += 1

    def close(self) -> None:
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None


def refusal_reason(detail: dict[str, Any]) -> str:
    """The ``reason`` label of a ``refused`` event: its stored cause (``quota`` or ``capacity``).

    Events written before causes were stored have only the sentence; for them a policy
    limit's refusal is told by its wording ("over the <limit> limit: ..."), which those
    events can no longer change.
    """
    cause = detail.get("cause")
    if cause in REFUSED_REASONS:
        return str(cause)
    reason = detail.get("reason")
    return "quota" if isinstance(reason, str) and reason.startswith("over the ") else "capacity"


def _detail(text: Any) -> dict[str, Any]:
    try:
        value = json.loads(text) if isinstance(text, str) else {}
    except ValueError:
        return {}
    return value if isinstance(value, dict) else {}


def _count(items: Any) -> int:
    if isinstance(items, list):
        return len(items)
    if isinstance(items, int) and not isinstance(items, bool):
        return items
    return 0


# ----------------------------------------------------------------------- collector


class ChronosCollector(Collector):
    """Builds every chronos_* family afresh on each scrape."""

    def __init__(
        self, state: Callable[[], State], counts: EventCounts | None, version: str = ""
    ) -> None:
        self._state = state
        self._counts = counts
        self._version = version

    def describe(self) -> Iterable[Metric]:
        return []  # no collect() at registration: it would run on the daemon's loop

    def collect(self) -> Iterator[Metric]:
        state = self._state()
        yield from self.gauges(state)
        if self._counts is not None:
            self._counts.update()
            yield from self.counters(self._counts)
        build = InfoMetricFamily(f"{PREFIX}_build", "Chronos version.", labels=["version"])
        build.add_metric([self._version], {})
        yield build

    @staticmethod
    def gauges(state: State) -> Iterator[Metric]:
        info = InfoMetricFamily(
            f"{PREFIX}_gpu", "Each GPU Chronos manages (value 1).", labels=["gpu"]
        )

        def gpu_gauge(name: str, doc: str) -> GaugeMetricFamily:
            return GaugeMetricFamily(f"{PREFIX}_gpu_{name}", doc, labels=["gpu"])

        total = gpu_gauge("memory_total_bytes", "Memory of the GPU.")
        used = gpu_gauge(
            "memory_used_bytes", "Memory in use on the GPU (by anyone), as the driver reports it."
        )
        committed = gpu_gauge(
            "memory_committed_bytes", "Memory reserved by the GPU's active partitions."
        )
        reservable = gpu_gauge(
            "memory_reservable_bytes", "Memory partitions may reserve (total x reservable_share)."
        )
        unpartitioned = gpu_gauge(
            "memory_unpartitioned_bytes", "Memory held by processes in no partition (last sample)."
        )
        util = gpu_gauge("utilization_ratio", "GPU utilization, 0 to 1.")
        active = gpu_gauge("active_partitions", "Partitions active on the GPU now.")
        booked = gpu_gauge("booked_partitions", "Partitions booked on the GPU for later.")
        queue = gpu_gauge("queue_length", "Requests waiting in the queue for the GPU.")
        for g in state.gpus:
            label = [str(g.stats.index)]
            info.add_metric(
                label,
                {
                    "uuid": g.stats.uuid,
                    "name": g.stats.name,
                    "vendor": g.stats.vendor,
                    "backend": g.stats.backend,
                },
            )
            total.add_metric(label, g.stats.total_bytes)
            if g.stats.used_bytes is not None:
                used.add_metric(label, g.stats.used_bytes)
            committed.add_metric(label, g.stats.committed_bytes)
            reservable.add_metric(label, g.stats.reservable_bytes)
            if g.unpartitioned_bytes is not None:
                unpartitioned.add_metric(label, g.unpartitioned_bytes)
            if g.stats.utilization_pct is not None:
                util.add_metric(label, g.stats.utilization_pct / 100.0)
            active.add_metric(label, g.stats.active_partitions)
            booked.add_metric(label, g.booked_partitions)
            queue.add_metric(label, g.queue_length)
        yield from (
            info,
            total,
            used,
            committed,
            reservable,
            unpartitioned,
            util,
            active,
            booked,
            queue,
        )

        labels = ["partition", "user", "gpu", "slurm_job"]
        reserved = GaugeMetricFamily(
            f"{PREFIX}_partition_reserved_bytes",
            "Memory an active partition reserves.",
            labels=labels,
        )
        p_used = GaugeMetricFamily(
            f"{PREFIX}_partition_used_bytes",
            "Memory the partition's processes hold (last sample).",
            labels=labels,
        )
        remaining = GaugeMetricFamily(
            f"{PREFIX}_partition_remaining_seconds",
            "Seconds until the partition expires.",
            labels=labels,
        )
        expiry = GaugeMetricFamily(
            f"{PREFIX}_partition_expiry_timestamp_seconds",
            "When the partition expires (Unix time).",
            labels=labels,
        )
        for p in state.partitions:
            label = [p.id, p.user, str(p.gpu), p.slurm_job]
            reserved.add_metric(label, p.reserved_bytes)
            if p.used_bytes is not None:
                p_used.add_metric(label, p.used_bytes)
            remaining.add_metric(label, round(p.remaining_s, 3))
            expiry.add_metric(label, p.expires_at)
        yield from (reserved, p_used, remaining, expiry)

        if state.sampled_at is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_sample_timestamp_seconds",
                "When the daemon last sampled per-process GPU memory.",
                value=state.sampled_at,
            )
        if state.sample_seconds is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_sample_duration_seconds",
                "How long the last per-process sample took.",
                value=state.sample_seconds,
            )
        if state.connections is not None:
            yield GaugeMetricFamily(
                f"{PREFIX}_daemon_connections",
                "Clients connected to the daemon's socket.",
                value=state.connections,
            )

    @staticmethod
    def counters(c: EventCounts) -> Iterator[Metric]:
        def plain(name: str, doc: str, value: float) -> CounterMetricFamily:
            return CounterMetricFamily(f"{PREFIX}_{name}", doc, value=value)

        def by(
            name: str, doc: str, values: dict[str, int], label: str = "reason"
        ) -> CounterMetricFamily:
            family = CounterMetricFamily(f"{PREFIX}_{name}", doc, labels=[label])
            for key, value in values.items():
                family.add_metric([key], value)
            return family

        yield plain("partitions_created", "Partitions created (now or booked ahead).", c.created)
        yield plain(
            "partitions_released",
            "Partitions released (by a user, or because their owner process exited).",
            c.released,
        )
        yield plain("partitions_expired", "Partitions that reached their end.", c.expired)
        yield by(
            "partitions_refused",
            "Requests refused: no room on the GPU (capacity) or over a policy limit (quota).",
            c.refused,
        )
        yield plain(
            "partitions_memory_exceeded",
            "Times a partition's processes were stopped for using more memory than it reserves.",
            c.memory_exceeded,
        )
        yield by(
            "processes_terminated", "Processes sent SIGTERM by the daemon, by reason.", c.terminated
        )
        yield by(
            "processes_killed",
            "Processes sent SIGKILL after the grace period, by "
            "reason (unpartitioned kills are not recorded in the ledger).",
            c.killed,
        )
        yield plain("queue_enqueued", "Requests that entered the queue.", c.queued)
        yield by(
            "queue_dropped", "Requests that left the queue without a partition.", c.queue_dropped
        )


# -------------------------------------------------------------------------- server


class MetricsEndpoint(LocalHTTPServer):
    """``GET /metrics`` on a local address, served from a thread of the daemon.

    The exposition is prometheus-client's own WSGI app (content negotiation,
    OpenMetrics, gzip, ``name[]`` filters), answered through Chronos's one HTTP
    layer (:mod:`chronos.httpserve`: bind address, read-only, idle timeout).
    """

    def __init__(
        self,
        address: str,
        registry: CollectorRegistry,
        on_close: Callable[[], None] = lambda: None,
        idle_timeout_s: float = IDLE_TIMEOUT_S,
    ) -> None:
        self.registry = registry
        self._on_close = on_close
        site = Site(app=metrics_app(registry), name="metrics", idle_timeout_s=idle_timeout_s)
        super().__init__(address, site, what="metrics", exposed_as="metrics endpoint")
        self.start()

    def close(self) -> None:
        super().close()
        self._on_close()


INDEX_PAGE = b'<html><body><a href="/metrics">metrics</a></body></html>'


def metrics_app(registry: CollectorRegistry) -> App:
    """``/metrics`` from prometheus-client's exposition app, a link at ``/``, 404 elsewhere.

    A scrape that fails (the daemon's loop did not answer in time) is a 503 saying why,
    never a dropped connection.
    """
    exposition = make_wsgi_app(registry)

    def app(request: Request) -> Response:
        if request.path == "/":
            return Response(200, INDEX_PAGE, "text/html; charset=utf-8")
        if request.path != "/metrics":
            return text_response(404, "not found: try /metrics\n")
        try:
            return _call_wsgi(exposition, request)
        except Exception as exc:  # noqa: BLE001 - a failed scrape must say why, not hang up
            return text_response(503, f"scrape failed: {exc!r}\n")

    return app


def _call_wsgi(wsgi_app: Callable[..., Iterable[bytes]], request: Request) -> Response:
    """One GET through a WSGI app; its status, headers and body as a Response."""
    environ = {
        "REQUEST_METHOD": "GET",
        "PATH_INFO": request.path,
        "QUERY_STRING": request.query,
        "HTTP_ACCEPT": request.headers.get("Accept", ""),
        "HTTP_ACCEPT_ENCODING": request.headers.get("Accept-Encoding", ""),
    }
    started: list[tuple[str, list[tuple[str, str]]]] = []

    def start_response(status: str, headers: list[tuple[str, str]], *_: Any) -> None:
        started.append((status, headers))

    body = b"".join(wsgi_app(environ, start_response))
    status, headers = started[-1]
    found = dict(headers)
    content_type = found.pop("Content-Type", "text/plain; charset=utf-8")
    return Response(int(status.split(" ", 1)[0]), body, content_type, found)


def start_metrics(
    address: str,
    service: Service,
    sampler: Sampler,
    server: Server,
    ledger_path: Path,
    loop: asyncio.AbstractEventLoop | None = None,
) -> MetricsEndpoint:
    """Serve the daemon's metrics on ``address``; hooks the request latency histogram."""
    from chronos import __version__

    loop = loop or asyncio.get_running_loop()
    disable_created_metrics()  # type: ignore[no-untyped-call]  # no *_created series: the process start time says as much
    registry = CollectorRegistry(auto_describe=False)
    latency = Histogram(
        f"{PREFIX}_request_duration_seconds",
        "Time the daemon took to answer a request, by operation (a 'wait' includes its long poll).",
        ["op"],
        registry=registry,
        buckets=LATENCY_BUCKETS,
    )
    counts = EventCounts(ledger_path)
    registry.register(
        ChronosCollector(
            lambda: call_on_loop(loop, lambda: read_state(service, sampler, server)),
            counts,
            __version__,
        )
    )
    _add_process_collector(registry)
    previous = server.on_request

    def observe(op: str, seconds: float) -> None:
        previous(op, seconds)
        latency.labels(op).observe(seconds)

    server.on_request = observe
    return MetricsEndpoint(address, registry, on_close=counts.close)


def _add_process_collector(registry: CollectorRegistry) -> None:
    from prometheus_client import ProcessCollector

    ProcessCollector(registry=registry)


def scrape_once(registry: CollectorRegistry) -> str:
    """The text exposition of ``registry`` (for tests and debugging)."""
    from prometheus_client import generate_latest

    return generate_latest(registry).decode()
