"""The daemon follows Slurm: a periodic look at ``squeue`` for this node's job partitions.

Hooks can be missed: an epilog that ran while chronosd was down, a node that
rebooted under running jobs, a time limit changed with ``scontrol update``.
Every ``slurm.reconcile_interval`` (and once at start, which covers a restart)
the daemon asks Slurm about every open ``slurm:<job>`` partition and:

* releases it when the job has ended, was requeued (pending again), is no longer
  known to Slurm, or no longer runs on this node;
* moves its end to the job's end time + ``slurm.end_margin`` when the time
  limit changed (longer or shorter);
* creates the partition of a job that runs here with shards but has none (its
  prolog ran while chronosd was down, or slurmd skipped it: a requeued job
  relaunched before its previous run's epilog finished gets no second prolog).

When Slurm cannot answer (slurmctld down, squeue missing) it changes nothing:
a partition is never released on a guess.
"""

from __future__ import annotations

import asyncio
import contextlib
import socket
import time
from collections.abc import Callable
from dataclasses import dataclass

from chronos.config import Config
from chronos.daemon.log import log
from chronos.errors import ChronosError
from chronos.identity import Caller
from chronos.messages import CreateRequest
from chronos.models import PartitionRecord
from chronos.service import Service
from chronos.slurm import membership
from chronos.slurm.gres import check_gres
from chronos.slurm.scontrol import (
    ENDED_STATES,
    JobInfo,
    QueueEntry,
    SlurmError,
    queue_states,
    running_with_shards,
    show_job,
)
from chronos.slurm.settings import job_kind, job_of

END_TOLERANCE_S = 1.0
"""A partition's end is moved only when it is this far from the job's."""
RECONCILER = (0, "slurm")
ADMIN = Caller(uid=0, gid=0, pid=None, user="root", is_admin=True)
"""The reconciler creates as the prolog would: root, on behalf of the job's user."""
"""uid and name the reconciler's releases and extensions are recorded under."""


@dataclass(frozen=True)
class Action:
    partition_id: str
    job_id: str
    what: str
    """``release`` or ``move_end``."""
    new_end: float | None = None
    reason: str = ""


def node_name(config: Config) -> str:
    return config.slurm.node_name or socket.gethostname().split(".")[0]


def decide(
    records: list[PartitionRecord],
    queue: dict[str, QueueEntry],
    node: str,
    margin_s: float,
) -> list[Action]:
    """What to change so the partitions match what Slurm says (pure)."""
    out = []
    for record in records:
        job = job_of(record.kind)
        if job is None:
            continue
        entry = queue.get(job)
        if entry is None:
            out.append(Action(record.id, job, "release", reason="job unknown to Slurm"))
        elif entry.state in ENDED_STATES:
            out.append(Action(record.id, job, "release", reason=f"job {entry.state.lower()}"))
        elif entry.nodes and node not in entry.nodes:
            out.append(Action(record.id, job, "release", reason=f"job no longer on {node}"))
        elif entry.end_time is not None and entry.state != "COMPLETING":
            want = entry.end_time + margin_s
            if abs(want - record.expires_at) > END_TOLERANCE_S:
                out.append(Action(record.id, job, "move_end", want, "time limit changed"))
    return out


KICK_GAP_S = 1.0
"""A pass asked for early (:meth:`Reconciler.kick`) comes at most this often."""


class Reconciler:
    def __init__(
        self, service: Service, config: Callable[[], Config], on_change: Callable[[], None]
    ) -> None:
        self.service = service
        self.config = config
        self.on_change = on_change
        self._kicked = asyncio.Event()
        self.task: asyncio.Task[None] | None = None

    def kick(self) -> None:
        """Look at Slurm again soon, not only every ``reconcile_interval``.

        The sampler calls this when a process it has not seen before holds GPU memory
        outside every partition: on a Slurm node that is most often a job that started
        without a prolog (a requeued run that slurmd relaunched before the last run's
        epilog ended), and adopting it at once keeps it fenced within about a second
        instead of up to ``reconcile_interval``, and keeps ``unpartitioned = "enforce"``
        from stopping it.
        """
        self._kicked.set()

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            try:
                await self.reconcile_once(loop)
                await self.adopt(loop)
            except Exception as exc:  # noqa: BLE001 - keep following Slurm whatever one look did
                log("slurm_reconcile_failed", level="error", error=repr(exc))
            await asyncio.sleep(KICK_GAP_S)
            self._kicked.clear()  # a kick during that pass or the gap is served by the next
            with contextlib.suppress(TimeoutError):
                interval = max(0.0, self.config().slurm.reconcile_interval_s - KICK_GAP_S)
                await asyncio.wait_for(self._kicked.wait(), interval)

    async def reconcile_once(self, loop: asyncio.AbstractEventLoop | None = None) -> list[Action]:
        loop = loop or asyncio.get_running_loop()
        config = self.config()
        records = [r for r in self.service.ledger.partitions() if job_of(r.kind) is not None]
        if not records:
            return []
        jobs = sorted({job_of(r.kind) or "" for r in records})
        try:
            queue = await loop.run_in_executor(None, queue_states, jobs)
        except SlurmError as exc:
            log("slurm_unreachable", level="warning", error=str(exc))
            return []
        actions = decide(records, queue, node_name(config), config.slurm.end_margin_s)
        for action in actions:
            self._apply(action, config)
        if actions:
            self.on_change()
        return actions

    async def adopt(self, loop: asyncio.AbstractEventLoop) -> int:
        """Partitions for jobs running here with shards and none of ours (see the docstring)."""
        config = self.config()
        node = node_name(config)
        known = {job_of(r.kind) for r in self.service.ledger.partitions()}
        try:
            running = await loop.run_in_executor(None, running_with_shards, node)
            infos = [
                await loop.run_in_executor(None, show_job, job)
                for job in running
                if job not in known
            ]
        except SlurmError as exc:
            log("slurm_unreachable", level="warning", error=str(exc))
            return 0
        made = 0
        known = {
            job_of(r.kind) for r in self.service.ledger.partitions()
        }  # the prolog's, meanwhile
        for info in infos:
            if info.job_id not in known:
                made += self._create_for(info, node, config)
        if made:
            self.on_change()
        return made

    def _create_for(self, info: JobInfo, node: str, config: Config) -> int:
        made = 0
        now = time.time()
        end = (info.end_time or now + config.max_duration_s) + config.slurm.end_margin_s
        for share in info.shards.get(node, []):
            if info.user is None or end <= now:
                continue
            try:
                record = self.service.op_create(
                    ADMIN,
                    CreateRequest(
                        device=share.device,
                        memory=f"{share.count * config.slurm.shard_bytes}B",
                        duration=min(end - now, config.max_duration_s),
                        user=info.user,
                        persist=True,
                        kind=job_kind(info.job_id, info.restarts),
                    ),
                )
            except ChronosError as exc:
                log("slurm_adopt_refused", level="warning", job=info.job_id, error=str(exc))
                continue
            log("slurm_adopted", job=info.job_id, partition=record["id"], device=share.device)
            made += 1
        return made

    def _apply(self, action: Action, config: Config) -> None:
        ledger = self.service.ledger
        try:
            if action.what == "release":
                ledger.release(action.partition_id, *RECONCILER, reason="released")
            elif action.new_end is not None:
                record = ledger.get(action.partition_id)
                capacity = config.reservable_bytes(record.device, record.device_total_bytes)
                ledger.extend_expiry(action.partition_id, action.new_end, capacity, *RECONCILER)
        except ChronosError as exc:
            log(
                "slurm_reconcile_refused",
                level="warning",
                partition=action.partition_id,
                job=action.job_id,
                error=str(exc),
            )
            return
        log(
            "slurm_reconciled",
            partition=action.partition_id,
            job=action.job_id,
            action=action.what,
            reason=action.reason,
            new_end=action.new_end,
        )


def start_slurm(
    service: Service, config: Callable[[], Config], on_change: Callable[[], None]
) -> Reconciler | None:
    """On a node with ``[slurm] enabled``: check gres.conf, start following Slurm."""
    settings = config().slurm
    if not settings.enabled:
        return None
    membership.this_node = node_name(config())
    for problem in check_gres(config(), service.machine.devices, membership.this_node):
        log("slurm_gres_mismatch", level="error", message=problem)
    log("slurm_enabled", node=membership.this_node, shard_bytes=settings.shard_bytes)
    reconciler = Reconciler(service, config, on_change)
    reconciler.task = asyncio.get_running_loop().create_task(reconciler.run())
    return reconciler
