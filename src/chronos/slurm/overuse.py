"""A Slurm job over its shards: tell the job why, and (by policy) cancel it.

The daemon stops the job's processes on this node as for any partition
(sampler.py). This adds what a Slurm user looks for: one line in the job's own
stderr (``slurm-<job>.out`` by default) and, with ``slurm.cancel_on_overuse``,
``scancel`` so the whole job (every node) ends at once.

The line is written as the job's user (``tee -a /proc/<pid>/fd/2`` started with
the user's uid and gid), so root never writes into a file
the user could not write: a job whose stderr is some other file it merely holds
open for reading gets nothing.
"""

from __future__ import annotations

import os
import subprocess
import threading

from chronos.daemon.log import log
from chronos.models import PartitionRecord
from chronos.slurm.settings import SlurmSettings, job_of
from chronos.units import format_bytes


def message(record: PartitionRecord, used: int, allowed: int) -> str:
    job = job_of(record.kind)
    return (
        f"chronos: job {job}: GPU {record.device} memory {format_bytes(used)} is over the job's "
        f"{format_bytes(allowed)} (its --gres=shard request); its processes on this node are "
        "being stopped\n"
    )


def report(
    record: PartitionRecord,
    pids: list[int],
    used: int,
    allowed: int,
    settings: SlurmSettings,
) -> None:
    """In a thread: the loop goes on stopping processes meanwhile."""
    job = job_of(record.kind)
    if job is None:
        return
    text = message(record, used, allowed)
    threading.Thread(
        target=_report, args=(job, pids[:8], record.uid, text, settings), daemon=True
    ).start()


def _report(job: str, pids: list[int], uid: int, text: str, settings: SlurmSettings) -> None:
    for pid in pids:
        write_as_user(pid, uid, text)
    if settings.cancel_on_overuse:
        _scancel(job)


def write_as_user(pid: int, uid: int, text: str) -> bool:
    """Append ``text`` to ``pid``'s stderr with the rights of ``uid`` only (``tee -a``)."""
    try:
        gid = os.stat(f"/proc/{pid}").st_gid
        proc = subprocess.run(
            ["tee", "-a", f"/proc/{pid}/fd/2"],
            input=text,
            text=True,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
            user=uid,
            group=gid,
            extra_groups=[],
            timeout=5,
        )
    except (OSError, subprocess.SubprocessError):
        return False
    return proc.returncode == 0


def _scancel(job: str) -> None:
    try:
        proc = subprocess.run(["scancel", job], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired) as exc:
        log("slurm_scancel_failed", level="warning", job=job, error=str(exc))
        return
    if proc.returncode != 0:
        log("slurm_scancel_failed", level="warning", job=job, error=proc.stderr.strip())
    else:
        log("slurm_scancelled", job=job)
