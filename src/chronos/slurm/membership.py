"""Which Slurm job a process belongs to, read from the kernel and never changed.

With ``proctrack/cgroup`` Slurm puts every job process in the job's cgroup, and
``/proc/<pid>/cgroup`` says which:

* cgroup v1: ``…/slurm[_<node>]/uid_<U>/job_<J>/step_<S>[/task_<T>]`` in the
  freezer, devices, … hierarchies (``slurm_<node>`` with several slurmd per host);
* cgroup v2: ``…/[<node>_]slurmstepd.scope/job_<J>/step_<S>/…``.

A process that ``setsid``s, double-forks and clears its environment stays there;
an ordinary user cannot move it out. Chronos only reads this membership: a
process moved out of the job's cgroup would survive ``scancel`` (policy.py keeps
the daemon from ever doing that).

Where Slurm tracks processes without cgroups (``proctrack/linuxproc``), the
fallback is the ``SLURM_JOB_ID`` a process started with (root can read every
environment) or an ancestor ``slurmstepd: [<job>.<step>]``. That fallback is
weaker: a job process that clears its environment and leaves slurmstepd's tree
escapes it (its memory is then unpartitioned, which ``unpartitioned`` governs).

Either way only processes of the job's user count: the job-level cgroup also
holds root's slurmstepd helpers, and nobody may charge work to another's job.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass

from chronos import procs
from chronos.models import PartitionRecord
from chronos.slurm.settings import job_of

_V1 = re.compile(r"/slurm(?:_([^/]+))?/uid_(\d+)/job_(\d+)(?:/|$)")
_V2 = re.compile(r"/(?:([^/]+)_)?slurmstepd\.scope/job_(\d+)(?:/|$)")
_STEPD = re.compile(r"slurmstepd: \[(\d+)\.")
ANCESTRY_DEPTH = 64
this_node: str | None = None
"""This node's Slurm name, set by the daemon (several slurmd may share one host)."""


@dataclass(frozen=True)
class JobCgroup:
    job_id: str
    node: str | None
    """The node named in the path (several slurmd per host), else None."""
    uid: int | None
    """The uid named in the path (v1), else None."""


def parse_cgroup(text: str) -> JobCgroup | None:
    """The Slurm job in a ``/proc/<pid>/cgroup`` text, or None if it names none."""
    for line in text.splitlines():
        parts = line.split(":", 2)
        if len(parts) != 3:
            continue
        path = parts[2]
        v1 = _V1.search(path)
        if v1 is not None:
            return JobCgroup(v1.group(3), v1.group(1), int(v1.group(2)))
        v2 = _V2.search(path) if parts[0] == "0" else None
        if v2 is not None:
            return JobCgroup(v2.group(2), v2.group(1), None)
    return None


def job_cgroup(pid: int) -> JobCgroup | None:
    try:
        with open(f"{procs.PROC}/{pid}/cgroup") as f:
            return parse_cgroup(f.read())
    except OSError:
        return None


def slurm_job_of_pid(pid: int) -> str | None:
    """The job whose cgroup holds ``pid`` (None outside Slurm's cgroups)."""
    found = job_cgroup(pid)
    return None if found is None else found.job_id


def stepd_job(cmdline: str | None) -> str | None:
    """The job of a ``slurmstepd: [<job>.<step>]`` command line."""
    if not cmdline:
        return None
    match = _STEPD.match(cmdline)
    return None if match is None else match.group(1)


class SlurmJobs:
    """Slurm job membership of processes, for one snapshot of the process table."""

    def __init__(
        self,
        records: Iterable[PartitionRecord],
        table: procs.ProcessTable,
        node: str | None = None,
    ) -> None:
        self.table = table
        self.node = node if node is not None else this_node
        self.by_job: dict[str, PartitionRecord] = {}
        for r in records:
            job = job_of(r.kind)
            if job is not None:
                self.by_job.setdefault(job, r)

    def __bool__(self) -> bool:
        return bool(self.by_job)

    def job_of(self, pid: int) -> str | None:
        """The job ``pid`` runs in on this node: its cgroup, else the fallback."""
        found = job_cgroup(pid)
        if found is not None:
            if found.node is not None and self.node is not None and found.node != self.node:
                return None  # a job's process on another slurmd of this host
            return found.job_id
        return self._fallback(pid)

    def _fallback(self, pid: int) -> str | None:
        marked = self.table.environ(pid, "SLURM_JOB_ID")
        if marked is not None:
            node = self.table.environ(pid, "SLURMD_NODENAME")
            if node is not None and self.node is not None and node != self.node:
                return None
            return marked
        current = self.table.parent(pid)
        for _ in range(ANCESTRY_DEPTH):
            if current is None or current <= 1:
                return None
            job = stepd_job(procs.command_line(current))
            if job is not None:
                return job
            current = self.table.parent(current)
        return None

    def partition_of(self, pid: int) -> str | None:
        """The partition of the job ``pid`` runs in, if ``pid`` runs as the job's user."""
        job = self.job_of(pid)
        record = None if job is None else self.by_job.get(job)
        if record is None or self.table.uid(pid) != record.uid:
            return None
        return record.id

    def members(self, partition_id: str) -> set[int]:
        """Every live process of the partition's job (on this node) that runs as its user."""
        if not any(r.id == partition_id for r in self.by_job.values()):
            return set()
        return {pid for pid in self.table.pids() if self.partition_of(pid) == partition_id}
