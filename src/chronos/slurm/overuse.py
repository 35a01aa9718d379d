"""A Slurm job over its shards: tell the job why, and (by policy) cancel it.

The daemon stops the job's processes on this node as for any partition
(sampler.py). This adds what a Slurm user looks for: one line in the job's own
stderr (``slurm-<job>.out`` by default) and, with ``slurm.cancel_on_overuse``,
``scancel`` so the whole job (every node) ends at once.

The line goes only into the job user's own file or a pipe (see
``append_to_stderr``), so root never writes where the user could not.
"""

from __future__ import annotations

import os
import stat
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
    """Before the stop (the processes must still be there): the reason, then maybe scancel."""
    job = job_of(record.kind)
    if job is None:
        return
    text = message(record, used, allowed).encode()
    told = [pid for pid in pids[:8] if append_to_stderr(pid, record.uid, text)]
    log("slurm_overuse", job=job, partition=record.id, stderr_of=told)
    if settings.cancel_on_overuse:
        threading.Thread(target=_scancel, args=(job,), daemon=True).start()


def append_to_stderr(pid: int, uid: int, text: bytes) -> bool:
    """Append ``text`` to ``pid``'s stderr if that is the user's own file or a pipe.

    Opened through ``/proc/<pid>/fd/2`` with ``O_APPEND`` (never at offset 0 of the
    job's output) and checked after opening: a regular file must belong to the job's
    user (so root never writes into a file the user merely holds, or swapped in
    meanwhile); pipes are fine; anything else (ttys, devices, sockets) is left alone.
    """
    flags = os.O_WRONLY | os.O_APPEND | os.O_NONBLOCK | os.O_NOCTTY | os.O_CLOEXEC
    path = f"/proc/{pid}/fd/2"
    try:
        mode = os.stat(path).st_mode
        if not (stat.S_ISREG(mode) or stat.S_ISFIFO(mode)):
            return False  # not opened at all: a device's open can have side effects
        fd = os.open(path, flags)
    except OSError:
        return False
    try:
        return _write_if_theirs(fd, uid, text)
    finally:
        os.close(fd)


def _write_if_theirs(fd: int, uid: int, text: bytes) -> bool:
    """Write to the opened stderr if it is the user's own file or a pipe: checked again
    on the open file, since the link may have been swapped between the stat and the open."""
    try:
        info = os.fstat(fd)
        theirs = stat.S_ISREG(info.st_mode) and info.st_uid == uid
        if not (theirs or stat.S_ISFIFO(info.st_mode)):
            return False
        os.write(fd, text)
    except OSError:
        return False
    return True


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
