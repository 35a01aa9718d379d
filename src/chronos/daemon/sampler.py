"""The daemon's sampling loop: per-process GPU memory, several times a second.

Backend calls and /proc reads run in a worker thread so a slow driver never
stalls the socket; decisions (``MemoryWatch``) and signals run on the loop.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable

from chronos import alloccap
from chronos.attribution import attribute_processes
from chronos.config import Config
from chronos.daemon.deadlines import Deadlines
from chronos.daemon.log import log
from chronos.enforcement import MemoryWatch, Violation
from chronos.ledger import Ended
from chronos.models import ProcessUse
from chronos.service import Service
from chronos.slurm import overuse
from chronos.slurm.settings import job_of
from chronos.units import format_bytes
from chronos.vocabulary import EventKind, ViolationKind


class Sampler:
    def __init__(
        self,
        service: Service,
        deadlines: Deadlines,
        config: Callable[[], Config],
        on_new_unpartitioned: Callable[[], None] | None = None,
    ) -> None:
        """``on_new_unpartitioned()``: a process not seen before holds memory outside every
        partition (on a Slurm node the reconciler then looks for a job without a prolog)."""
        self.service = service
        self.deadlines = deadlines
        self.config = config
        self.on_new_unpartitioned = on_new_unpartitioned
        self._unpartitioned_seen: set[tuple[int, int]] = set()
        self.watch = self._new_watch()
        self.last: list[ProcessUse] = []
        self.last_at: float | None = None
        self.sample_seconds: float | None = None

    def _new_watch(self) -> MemoryWatch:
        c = self.config()
        return MemoryWatch(
            grace_s=c.memory_grace_s,
            unpartitioned=c.unpartitioned,
            exempt_users=frozenset(c.exempt_users),
            exempt_commands=frozenset(c.exempt_commands),
        )

    def reconfigure(self) -> None:
        c = self.config()
        self.watch.grace_s = c.memory_grace_s
        self.watch.unpartitioned = c.unpartitioned
        self.watch.exempt_users = frozenset(c.exempt_users)
        self.watch.exempt_commands = frozenset(c.exempt_commands)

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        while True:
            started = loop.time()
            try:
                await self.sample_once()
            except Exception as exc:  # noqa: BLE001 - keep sampling whatever one sample did
                log("sample_failed", level="error", error=repr(exc))
            interval = self.config().sample_interval_s
            await asyncio.sleep(max(0.0, interval - (loop.time() - started)))

    def holds_gpu(self, pid: int) -> bool:
        """Whether process ``pid`` held GPU memory at the last sample."""
        return any(p.pid == pid and p.used_bytes for p in self.last)

    async def sample_once(self) -> None:
        ledger = self.service.ledger
        self.deadlines.check_clock()
        if self.deadlines.stopper.prune_lingering():
            self.deadlines.after_time()  # memory held past an end is free now: grant waiters
        records = ledger.open_at(ledger.clock(), started=True)
        attached = ledger.attached()
        counted = alloccap.before_sample(records)  # read before NVML: see after_sample
        t0 = time.perf_counter()
        found = await asyncio.get_running_loop().run_in_executor(
            None, attribute_processes, self.service.machine, records, attached
        )
        self.sample_seconds = time.perf_counter() - t0
        self.last, self.last_at = found, time.time()
        self._notice_unpartitioned(found)
        # Partitions that ended while the sample ran were already finished (on_ended):
        # accounting them now would start a usage entry nobody ever finishes (a leak).
        still_open = {r.id for r in ledger.open_at(self.last_at, started=True)}
        records = [r for r in records if r.id in still_open]
        self._remove_ended_cgroups({r.id for r in records})
        # The hard cap's windows run on monotonic time: a wall-clock step is no "time over".
        for violation in self.watch.observe(time.monotonic(), records, found):
            self._act(violation)
        # allocation-time cap (ALLOCATION_CAP.md): overheads the library did not see
        for partition_id, pid, added in alloccap.after_sample(records, found, counted):
            log("alloc_cap_overhead_raised", partition=partition_id, pid=pid, added=added)
        if self.watch.unpartitioned == "warn":
            for proc in self.watch.warnings(found):
                log(
                    "unpartitioned",
                    level="warning",
                    pid=proc.pid,
                    user=proc.user,
                    device=proc.device,
                    used_bytes=proc.used_bytes,
                    command=proc.command,
                )
                ledger.log(
                    "unpartitioned",
                    uid=None,
                    user=proc.user,
                    detail={
                        "pid": proc.pid,
                        "device": proc.device,
                        "used_bytes": proc.used_bytes,
                        "action": "warn",
                    },
                )

    def _notice_unpartitioned(self, found: list[ProcessUse]) -> None:
        """Call ``on_new_unpartitioned`` once per process that starts holding memory outside."""
        now = {(p.pid, p.device) for p in found if p.partition_id is None and p.used_bytes}
        if self.on_new_unpartitioned is not None and now - self._unpartitioned_seen:
            self.on_new_unpartitioned()
        self._unpartitioned_seen = now

    def _remove_ended_cgroups(self, open_ids: set[str]) -> None:
        """Ended partitions' cgroups go once their last process has exited."""
        cg = self.service.cgroups
        if cg is None or not cg.available:
            return
        for partition_id in cg.leftovers():
            if partition_id not in open_ids:
                cg.remove(partition_id)

    def _act(self, v: Violation) -> None:
        ledger = self.service.ledger
        detail = {
            "used_bytes": v.used_bytes,
            "allowed_bytes": v.allowed_bytes,
            "device": v.device,
            "pids": list(v.pids),
            "over_for_s": round(time.monotonic() - v.over_since, 3),
        }
        if v.kind == ViolationKind.MEMORY and v.partition_id is not None:
            record = ledger.get(v.partition_id)
            log(
                "memory_exceeded",
                level="warning",
                partition=record.id,
                user=record.user,
                used=format_bytes(v.used_bytes),
                allowed=format_bytes(v.allowed_bytes),
                **detail,
            )
            ledger.log(EventKind.MEMORY_EXCEEDED, record.id, record.uid, record.user, detail)
            if job_of(record.kind) is not None:  # a Slurm job: its stderr, maybe scancel
                overuse.report(
                    record, list(v.pids), v.used_bytes, v.allowed_bytes, self.config().slurm
                )
            self.deadlines.stopper.stop(record, "memory", grace=self.config().memory_grace_s)
        else:
            pids = self.deadlines.stopper.outside_gentle_grace(v.pids)
            if not pids:
                return  # an on_expiry=raise/notify process in its grace: the stopper decides
            detail["pids"] = pids
            log("unpartitioned_stopped", level="warning", **detail)
            ledger.log(EventKind.UNPARTITIONED, detail={**detail, "action": "enforce"})
            self.deadlines.stopper.stop_pids(
                dict.fromkeys(pids), "unpartitioned", grace=self.config().memory_grace_s
            )

    def on_ended(self, ended: list[Ended]) -> None:
        for item in ended:
            use = self.watch.finish(item.record.id)
            if use is not None and use.last_at is not None:
                self.service.ledger.log(
                    "usage",
                    item.record.id,
                    item.record.uid,
                    item.record.user,
                    {"peak_bytes": use.peak_bytes, "byte_seconds": round(use.byte_seconds, 1)},
                )
