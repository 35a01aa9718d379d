"""Which partition a GPU process counts toward.

A process belongs to a partition when (checked in this order):
0. it runs in a Slurm job that has a partition here, as the job's user
   (slurm/membership.py: the job's cgroup, else its environment and ancestry);
1. the daemon placed it (or an ancestor) in the partition's cgroup (cgroups.py),
   which no ordinary process can leave; or
2. it, or an ancestor, is attached to the partition or is its owner process; or
3. it was started with ``CHRONOS_PARTITION_ID=<id>`` in its environment (every
   child inherits that, double-forked or not).
In cases 2 and 3 it counts only if it runs as the partition's user, unless an
administrator attached it: nobody can charge their work to someone else's
partition, or hide it in one, by setting an environment variable.
"""

from __future__ import annotations

from collections.abc import Iterable

from chronos import cgroups, procs
from chronos.devices import Machine
from chronos.ledger import Attached
from chronos.models import PartitionRecord, ProcessUse
from chronos.slurm.membership import SlurmJobs

MARKER = "CHRONOS_PARTITION_ID"


class Attributor:
    """Maps PIDs to open partitions, for one snapshot of the process table."""

    def __init__(
        self,
        records: Iterable[PartitionRecord],
        attached: Iterable[Attached],
        table: procs.ProcessTable | None = None,
    ) -> None:
        self.table = table or procs.ProcessTable()
        self.records = {r.id: r for r in records}
        self._anchors: dict[int, tuple[str, bool]] = {}
        for r in self.records.values():
            if r.owner_pid is not None and procs.is_same_process(r.owner_pid, r.owner_start):
                self._anchors[r.owner_pid] = (r.id, False)
        for a in attached:
            if a.partition_id in self.records and procs.is_same_process(a.pid, a.start_ticks):
                by_admin = a.uid != self.records[a.partition_id].uid
                self._anchors[a.pid] = (a.partition_id, by_admin)
        self._slurm = SlurmJobs(self.records.values(), self.table)

    def partition_of(self, pid: int) -> str | None:
        in_job = self._slurm.partition_of(pid) if self._slurm else None
        if in_job is not None:
            return in_job  # Slurm's job cgroup: the kernel's word, and the job's user only
        placed = cgroups.partition_of(pid)
        if placed in self.records:
            return placed  # only the daemon (root) can put a process there, after authorizing
        uid = self.table.uid(pid)
        current: int | None = pid
        for _ in range(64):
            if current is None or current <= 1:
                break
            anchor = self._anchors.get(current)
            if anchor is not None:
                pid_id, by_admin = anchor
                if by_admin or uid == self.records[pid_id].uid:
                    return pid_id
            current = self.table.parent(current)
        marked = self.table.environ(pid, MARKER)
        if marked in self.records and uid == self.records[marked].uid:
            return marked
        return None

    def members(self, partition_id: str) -> set[int]:
        """Every live process that counts toward ``partition_id``."""
        roots = [pid for pid, (pid_id, _) in self._anchors.items() if pid_id == partition_id]
        tree = self.table.children()
        found = {p for p in procs.descendants(roots, tree) if self.partition_of(p) == partition_id}
        found |= cgroups.members(partition_id)
        found |= self._slurm.members(partition_id) if self._slurm else set()
        for pid in self.table.pids():
            if (
                pid not in found
                and self.table.environ(pid, MARKER) == partition_id
                and self.partition_of(pid) == partition_id
            ):
                found.add(pid)
        return found

    def signallable(self, partition_id: str, pids: Iterable[int]) -> set[int]:
        """Those of ``pids`` the daemon may signal for ``partition_id``.

        A process runs as the partition's user, or descends from one an
        administrator attached: a process of anyone else that landed in the
        partition's cgroup (a recycled PID, a setuid program) is never signalled.
        """
        record = self.records[partition_id]
        admin_roots = {
            pid
            for pid, (pid_id, by_admin) in self._anchors.items()
            if pid_id == partition_id and by_admin
        }
        return {
            pid
            for pid in pids
            if self.table.uid(pid) == record.uid or self._descends(pid, admin_roots)
        }

    def _descends(self, pid: int, roots: set[int]) -> bool:
        current: int | None = pid
        for _ in range(64):
            if current is None or current <= 1:
                return False
            if current in roots:
                return True
            current = self.table.parent(current)
        return False


def attribute_processes(
    machine: Machine, records: Iterable[PartitionRecord], attached: Iterable[Attached]
) -> list[ProcessUse]:
    records = list(records)
    attributor = Attributor(records, attached)
    uuids_of = {r.id: {share.device_uuid for share in r.shares} for r in records}
    index = {d.uuid: d.index for d in machine.devices}
    out = []
    for proc in machine.processes():
        if proc.device_uuid not in index:
            continue
        uid = procs.process_uid(proc.pid)
        partition_id = attributor.partition_of(proc.pid)
        if partition_id is not None and proc.device_uuid not in uuids_of[partition_id]:
            partition_id = None  # memory on a GPU outside its partition is unpartitioned
        out.append(
            ProcessUse(
                pid=proc.pid,
                device=index[proc.device_uuid],
                used_bytes=proc.used_bytes,
                user=procs.user_name(uid) if uid is not None else None,
                command=procs.command_line(proc.pid),
                partition_id=partition_id,
            )
        )
    return out
