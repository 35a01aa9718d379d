"""What changes on a node whose GPUs Slurm schedules (``[slurm] enabled = true``).

Slurm is the one admission authority for its GPUs: an ordinary user's own
``chronos create``, bookings and the local queue (all one ``create`` request)
are refused there, so nothing can over-commit behind Slurm's back. Partitions
of Slurm jobs (kind ``slurm:<job>``) are made only by administrators (the
prolog runs as root), are not extended by their users (Slurm owns the time
limit), and their processes are never moved into cgroups of ours: one moved
out of Slurm's job cgroup would survive ``scancel`` and leave the job's limits.
"""

from __future__ import annotations

from chronos.errors import PermissionDenied
from chronos.identity import Caller
from chronos.models import PartitionRecord
from chronos.slurm.membership import slurm_job_of_pid
from chronos.slurm.settings import SlurmSettings, job_of, refusal


def may_use_kind(caller: Caller, kind: str) -> bool:
    """A ``slurm:<job>`` kind is for administrators (the prolog) only."""
    return caller.is_admin and job_of(kind) is not None


def check_create(settings: SlurmSettings, caller: Caller, device: int) -> None:
    if caller.is_admin:
        return
    reason = refusal(settings, device)
    if reason is not None:
        raise PermissionDenied(reason)


def may_create(settings: SlurmSettings, caller: Caller, device: int) -> bool:
    """Whether :func:`check_create` lets ``caller`` create on ``device``."""
    return caller.is_admin or refusal(settings, device) is None


def check_extend(caller: Caller, record: PartitionRecord) -> None:
    if is_job_partition(record) and not caller.is_admin:
        raise PermissionDenied(
            f"partition {record.id} belongs to Slurm job {job_of(record.kind)}: "
            "its time limit is Slurm's (scontrol update job=... TimeLimit=...)"
        )


def is_job_partition(record: PartitionRecord) -> bool:
    return job_of(record.kind) is not None


def may_move(record: PartitionRecord, pid: int) -> bool:
    """Whether the daemon may move ``pid`` into a cgroup of its own for ``record``."""
    return not is_job_partition(record) and slurm_job_of_pid(pid) is None
