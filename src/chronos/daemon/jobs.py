"""Starting, watching and ending batch jobs in chronosd (``chronos submit``).

After every change the daemon asks :meth:`JobRunner.changed` to act on the few open
jobs: a waiting job whose partition is active is started; one held by ``--after`` asks
for its partition once that job has ended; a running job not watched yet (a restart)
is re-adopted from its ``(pid, start_ticks)``.

Starting (docs/DAEMON.md, "Batch jobs"): the job is written ``starting`` *before* the
fork, so a daemon that dies in between finds it so and fails it, never starting it
twice. ``subprocess`` forks and execs :mod:`chronos._jobstub` with the user's uid,
gid, supplementary groups and umask, in a new session, with every other descriptor
closed and no PDEATHSIG (the job outlives the daemon); the stub waits at a gate pipe
while the daemon moves it into the partition's cgroup and records it as attached, then
enters the working directory, opens the output files as the user and execs the command.
Its exit status comes back through a file of the daemon's state directory (the stub
holds it open), read when the stub's pidfd says it is gone: so a restarted daemon,
which cannot reap a previous incarnation's child, still learns how its job ended.
Stopping is the daemon's usual stop plan (:class:`ProcessStopper`): expiry and the
memory watch stop the partition's processes as for ``chronos run``; ``cancel`` calls
:meth:`stop`.
"""

from __future__ import annotations

import asyncio
import contextlib
import os
import subprocess
import sys
from pathlib import Path
from typing import TYPE_CHECKING

from chronos import alloccap, batch, procs
from chronos.daemon.log import log
from chronos.errors import ChronosError
from chronos.frameworks import limits_env
from chronos.ledger.jobs import Job
from chronos.models import PartitionRecord
from chronos.vocabulary import EventKind, JobState, Origin, PartitionState, TicketState

if TYPE_CHECKING:
    from chronos.daemon.stopper import ProcessStopper
    from chronos.service import Service

STUB_SOURCE = (Path(__file__).resolve().parent.parent / "_jobstub.py").read_text()
"""Passed with ``-c``: the user need not be able to read the installed package."""
STUB_PYTHON = "/usr/bin/python3" if os.access("/usr/bin/python3", os.X_OK) else sys.executable
"""The stub is stdlib only: the system interpreter, which every user may run (a venv's
may live where only root can enter)."""
STATUS_MAX = 4096
AS_ROOT = os.geteuid() == 0
"""chronosd runs as root and drops to each job's user; a daemon run as one user (tests
without root) starts only that user's jobs, with nothing to drop."""


class JobRunner:
    def __init__(self, service: Service, stopper: ProcessStopper, state_dir: Path) -> None:
        self.service = service
        self.ledger = service.ledger
        self.stopper = stopper
        self.dir = state_dir / "jobs"
        self.dir.mkdir(mode=0o755, exist_ok=True)
        self._watched: dict[str, tuple[int, subprocess.Popen[bytes] | None]] = {}
        """Job id → (pidfd, our own child or None when re-adopted)."""
        self._end_orphans()

    def _end_orphans(self) -> None:
        """End job partitions and queued requests that no open job names.

        A submit asks for the partition, then writes the job (two transactions, in one
        handler call: nothing else runs between them). A daemon that died between the
        two left a partition, or a place in the queue, that no job will ever use; the
        client never got a job id. At start nothing is half-submitted, so whatever of
        kind ``job`` no open job names is such a leftover (or the rest of a job that
        ended while the daemon was down): it is ended here, not left holding memory
        until its end.
        """
        jobs = self.ledger.jobs.open()
        named = {j.partition_id for j in jobs} | {j.ticket_id for j in jobs}
        for record in self.ledger.partitions():
            if record.kind == Origin.JOB and record.id not in named:
                with contextlib.suppress(ChronosError):
                    self.ledger.release(record.id, 0, "chronosd", reason="its job is gone")
                    log("job_orphan_released", partition=record.id, user=record.user)
        for ticket in self.ledger.waiting():
            if ticket.request.kind == Origin.JOB and ticket.id not in named:
                with contextlib.suppress(ChronosError):
                    self.ledger.cancel(ticket.id, reason="its job is gone")
                    log("job_orphan_cancelled", ticket=ticket.id)

    # -------------------------------------------------------------- the loop

    def changed(self) -> None:
        """Act on every open job (there are few): start, hold, adopt, or fail it."""
        for job in self.ledger.jobs.open():
            try:
                self._step(job)
            except Exception as exc:  # noqa: BLE001 - one job's failure must not stop the rest
                log("job_failed", level="error", job=job.id, error=repr(exc))

    def _step(self, job: Job) -> None:
        if job.id in self._watched:
            return
        if job.state == JobState.RUNNING:
            self._adopt(job)
        elif job.state == JobState.STARTING:
            self._fail(job, "chronosd stopped while starting it; it was not started again")
        elif job.state == JobState.WAITING:
            self._wait_step(job)

    def _wait_step(self, job: Job) -> None:
        if job.ticket_id is None and job.partition_id is None:
            after = self.ledger.job(job.after) if job.after else None
            if after is not None and not after.ended:
                return
            try:
                asked = batch.request_partition(self.service, job)
            except ChronosError as exc:
                self._fail(job, f"its partition was refused: {exc}")
                return
            job = self.ledger.update_job(
                job, ticket_id=asked.ticket_id, partition_id=asked.partition_id
            )
        if job.partition_id is None and job.ticket_id is not None:
            ticket = self.ledger.ticket(job.ticket_id)
            if ticket.state == TicketState.WAITING:
                return
            if ticket.state != TicketState.GRANTED or not ticket.partition_id:
                self._fail(job, f"its request left the queue: {ticket.reason or ticket.state}")
                return
            job = self.ledger.update_job(job, partition_id=ticket.partition_id)
        assert job.partition_id is not None
        record = self.ledger.get(job.partition_id)
        state = record.state_at(self.ledger.clock())
        if state == PartitionState.ACTIVE:
            self._start(job, record)
        elif state != PartitionState.BOOKED:
            self._fail(job, f"its partition ended before it started ({state})")

    # ------------------------------------------------------------- starting

    def _start(self, job: Job, record: PartitionRecord) -> None:
        job = self.ledger.update_job(job, state=JobState.STARTING, started_at=self.ledger.clock())
        status_path = self.dir / f"{job.id}.status"
        status = os.open(
            status_path, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_NOFOLLOW | os.O_CLOEXEC, 0o600
        )
        gate_r, gate_w = os.pipe2(os.O_CLOEXEC)
        try:
            os.fchown(status, job.uid, job.gid)
            child = subprocess.Popen(
                self._argv(job, gate_r, status),
                env=self._env(job, record),
                user=job.uid if AS_ROOT else None,
                group=job.gid if AS_ROOT else None,
                extra_groups=list(job.groups) if AS_ROOT else None,
                umask=job.umask,
                start_new_session=True,
                close_fds=True,
                pass_fds=(gate_r, status),
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
                cwd="/",
            )
        except (OSError, subprocess.SubprocessError) as exc:
            os.close(gate_w)
            self._fail(job, f"could not start: {exc}")
            return
        finally:
            os.close(gate_r)
            os.close(status)
        self._admit(job, record, child, gate_w)

    def _admit(
        self, job: Job, record: PartitionRecord, child: subprocess.Popen[bytes], gate: int
    ) -> None:
        """Put the gated stub in the partition, record it, then let it go."""
        try:
            ticks = procs.start_ticks(child.pid)
            cgroups = self.service.cgroups
            if cgroups is not None and cgroups.available:
                cgroups.place(record.id, child.pid)
            self.ledger.attach(record.id, child.pid, ticks, job.uid, 0)
            job = self.ledger.update_job(
                job, state=JobState.RUNNING, pid=child.pid, start_ticks=ticks
            )
            os.write(gate, b"1")
        finally:
            os.close(gate)
        self._watch(job, child)
        log("job_started", job=job.id, user=job.user, partition=record.id, pid=child.pid)

    @staticmethod
    def _argv(job: Job, gate: int, status: int) -> list[str]:
        error = job.error or ""
        head = [STUB_PYTHON, "-I", "-S", "-c", STUB_SOURCE, str(gate), str(status)]
        return [*head, job.cwd, job.output, error, "--", *job.argv]

    def _env(self, job: Job, record: PartitionRecord) -> dict[str, str]:
        """The submit-time environment, then the partition's: its GPU, soft caps, the
        allocation-time cap, ``CHRONOS_PARTITION_ID`` and ``CHRONOS_JOB_ID``."""
        env = batch.job_env(job)
        env.update(self.service.visible_env(record))  # every GPU of a group, in share order
        files = alloccap.active_files(record, self.service.mode)
        shares = [(s.memory_bytes, s.device_total_bytes) for s in record.shares]
        capped = files is not None
        total = record.device_total_bytes
        env.update(limits_env(record.memory_bytes, total, env, capped, shares=shares))
        if files is not None:
            env.update(alloccap.preload_env(files, env))
        env.update(CHRONOS_PARTITION_ID=record.id, CHRONOS_JOB_ID=job.id)
        return env

    # ------------------------------------------------------------- watching

    def _watch(self, job: Job, child: subprocess.Popen[bytes] | None) -> None:
        assert job.pid is not None
        try:
            fd = os.pidfd_open(job.pid)
        except ProcessLookupError:
            self._ended(job.id, child)
            return
        if child is None and not procs.is_same_process(job.pid, job.start_ticks):
            os.close(fd)  # the number names another process now: ours is gone
            self._ended(job.id, None)
            return
        self._watched[job.id] = (fd, child)
        asyncio.get_running_loop().add_reader(fd, self._exited, job.id)

    def _adopt(self, job: Job) -> None:
        """A running job of a previous daemon: watch its stub again (it cannot be reaped)."""
        if job.pid is None or not procs.is_same_process(job.pid, job.start_ticks):
            self._ended(job.id, None)
            return
        log("job_adopted", job=job.id, pid=job.pid)
        self._watch(job, None)

    def _exited(self, job_id: str) -> None:
        fd, child = self._watched.pop(job_id)
        asyncio.get_running_loop().remove_reader(fd)
        os.close(fd)
        self._ended(job_id, child)

    def _ended(self, job_id: str, child: subprocess.Popen[bytes] | None) -> None:
        if child is not None:
            child.wait()
        job = self.ledger.job(job_id)
        assert job is not None
        state, code, reason = self._outcome(job, self._read_status(job))
        job = self.ledger.update_job(
            job, state=state, exit_code=code, reason=reason, ended_at=self.ledger.clock()
        )
        batch.release_partition(self.service, job, "job ended")
        log("job_ended", job=job.id, state=state, exit_code=code)
        self.service.on_change()

    def _read_status(self, job: Job) -> str:
        path = self.dir / f"{job.id}.status"
        try:
            fd = os.open(path, os.O_RDONLY | os.O_NOFOLLOW | os.O_CLOEXEC)
        except OSError:
            return ""
        try:
            return os.read(fd, STATUS_MAX).decode(errors="replace").strip()
        finally:
            os.close(fd)
            path.unlink(missing_ok=True)

    def _outcome(self, job: Job, status: str) -> tuple[JobState, int | None, str | None]:
        """How the job ended: the stub's word, read against what happened to its partition."""
        word, _, rest = status.partition(" ")
        code = int(rest) if word == "exit" and rest.lstrip("-").isdigit() else None
        if word == "signal" and rest.isdigit():
            code = 128 + int(rest)
        if job.state == JobState.CANCELLED:
            return JobState.CANCELLED, code, job.reason
        if word == "failed":
            return JobState.FAILED, None, rest
        assert job.partition_id is not None
        record = self.ledger.get(job.partition_id)
        if record.state == PartitionState.EXPIRED:
            return JobState.EXPIRED, code, "stopped at its partition's expiry"
        if self.ledger.events(partition_id=record.id, kinds=[EventKind.MEMORY_EXCEEDED]):
            return JobState.MEMORY, code, "stopped for using more GPU memory than its partition"
        return JobState.DONE, code, None if status else "exit status unknown"

    # ------------------------------------------------------------ stopping

    def stop(self, job: Job) -> None:
        """Stop a running job's processes (``cancel``): SIGTERM, grace, SIGKILL."""
        if job.partition_id is not None:
            self.stopper.stop(self.ledger.get(job.partition_id), "job cancelled")

    def _fail(self, job: Job, reason: str) -> None:
        """The job cannot start: it fails with ``reason`` and its partition goes at once."""
        if job.partition_id is not None and job.state == JobState.STARTING:
            self.stopper.stop(self.ledger.get(job.partition_id), "job failed to start")
        job = self.ledger.update_job(
            job, state=JobState.FAILED, reason=reason, ended_at=self.ledger.clock()
        )
        batch.release_partition(self.service, job, "job failed to start")
        log("job_failed", job=job.id, reason=reason)
        self.service.on_change()

    def close(self) -> None:
        """Stop watching (the jobs keep running; the next daemon adopts them)."""
        loop = asyncio.get_running_loop()
        for fd, _ in self._watched.values():
            loop.remove_reader(fd)
            os.close(fd)
        self._watched.clear()
