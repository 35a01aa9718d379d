"""Batch jobs in the service: submit, list, cancel (``chronos submit``, issue 15).

A job is a partition request plus a command. ``submit`` checks the job's own fields,
then makes the partition exactly as a ``create`` with ``wait`` does (the same typed
``CreateRequest``, so the same priority, ``max_waiting``, quotas and refusals, and
whatever device options the create request takes), never tied to the client's process
(``persist``; the ticket has no waiter process), and records the job. Starting it is
the daemon's (:mod:`chronos.daemon.jobs`): only chronosd can start a command as
another user, so embedded mode refuses ``submit``.

Identity: the uid is the caller's (``SO_PEERCRED``); the gid and supplementary groups
are the account's (the password and group databases), never from the request. The
environment, working directory and umask are the request's: they are the user's own
choices and the job runs with the user's privileges only.
"""

from __future__ import annotations

import os
import pwd
from collections.abc import Callable
from dataclasses import replace
from typing import TYPE_CHECKING, Any

from chronos import messages, protocol
from chronos.errors import RUN_FAILED_EXIT, BadRequest, ChronosError, PermissionDenied
from chronos.identity import Caller
from chronos.ledger.jobs import Job
from chronos.vocabulary import JobState, Mode, Origin, TicketState

if TYPE_CHECKING:
    from chronos.service import Service

StopJob = Callable[[Job], None]
"""The daemon's way to stop a running job's processes (SIGTERM, grace, SIGKILL)."""


class JobsUnavailable(ChronosError, code="not_available", exit_code=RUN_FAILED_EXIT):
    """``chronos submit`` with no chronosd (and no Slurm cluster): nothing would start the job."""

    def __init__(self) -> None:
        super().__init__(
            "local batch jobs need chronosd and no daemon runs here (and no Slurm cluster): "
            "use chronos run"
        )


def submit(service: Service, caller: Caller, ask: messages.SubmitRequest) -> dict[str, Any]:
    if service.mode != Mode.DAEMON:
        raise JobsUnavailable()
    _check_fields(ask)
    create = _create_request(ask.partition)
    if create.user is not None:
        raise BadRequest("a job runs as the user who submits it: leave out user")
    after = _after(service, caller, ask.after) if ask.after else None
    account = pwd.getpwuid(caller.uid)
    job = Job(
        id=service.ledger.jobs.new_id(),
        created_at=service.ledger.clock(),
        uid=caller.uid,
        user=caller.user,
        gid=account.pw_gid,
        groups=tuple(os.getgrouplist(account.pw_name, account.pw_gid)),
        name=ask.name,
        argv=tuple(ask.argv),
        env=dict(ask.env),
        cwd=ask.cwd,
        umask=ask.umask,
        output=ask.output,
        error=ask.error,
        after=after,
        ticket_id=None,
        partition_id=None,
        state=JobState.WAITING,
        request=messages.wire_args(create),
    )
    if after is None or _after_ended(service, after):
        job = request_partition(service, job, create)
    # else: held behind --after; the daemon asks for its partition once that job ends
    service.ledger.add_job(job)
    service.on_change()
    return describe(service, job)


def request_partition(
    service: Service, job: Job, create: messages.CreateRequest | None = None
) -> Job:
    """Ask for the job's partition as a ``create`` with ``wait`` (refusals raise)."""
    ask = create or _create_request(job.request)
    owner = Caller(job.uid, job.gid, None, job.user, False)  # no process: it outlives the client
    ask = ask._replace(persist=True, wait=ask.start is None, kind=Origin.JOB, user=None)
    reply = messages.create_reply(service.op_create(owner, ask))
    if isinstance(reply, messages.TicketStatus):
        return replace(job, ticket_id=reply.ticket)
    return replace(job, partition_id=reply.record.id)


def job_env(job: Job) -> dict[str, str]:
    """The submit-time environment, as the command gets it (before the partition's own)."""
    return dict(job.env)


def _create_request(args: dict[str, Any]) -> messages.CreateRequest:
    """The partition's arguments, checked exactly as a ``create`` message is."""
    message = protocol.request("create", **args)
    request = protocol.parse_request(message)
    assert isinstance(request, messages.CreateRequest)
    return request


def _check_fields(ask: messages.SubmitRequest) -> None:
    if not ask.argv or not ask.argv[0]:
        raise BadRequest("nothing to run: give the command after --")
    for name, path in (("working directory", ask.cwd), ("--output", ask.output)):
        if not os.path.isabs(path):
            raise BadRequest(f"{name} must be an absolute path, not {path!r}")
    if ask.error is not None and not os.path.isabs(ask.error):
        raise BadRequest(f"--error must be an absolute path, not {ask.error!r}")
    if not 0 <= ask.umask <= 0o777:
        raise BadRequest("umask must be between 000 and 777")


def find(service: Service, caller: Caller, prefix: str) -> Job:
    """The job ``prefix`` names (a unique prefix, as elsewhere), if the caller may see it."""
    matches = service.ledger.jobs.by_prefix(prefix) if prefix.startswith("j") else []
    if not matches:
        raise BadRequest(f"no job {prefix}")
    if len(matches) > 1:
        raise BadRequest(f"{prefix} names more than one job: give more of its id")
    job = matches[0]
    if job.uid != caller.uid and not caller.is_admin:
        raise PermissionDenied(f"job {job.id} belongs to {job.user}")
    return job


def _after(service: Service, caller: Caller, prefix: str) -> str:
    return find(service, caller, prefix).id


def _after_ended(service: Service, job_id: str) -> bool:
    job = service.ledger.job(job_id)
    return job is None or job.ended


def listing(service: Service, caller: Caller, ask: messages.JobsRequest) -> list[dict[str, Any]]:
    if ask.id is not None:
        return [describe(service, find(service, caller, ask.id))]
    # Everyone's jobs are visible with ``all``, as ``chronos list --all``; another user's
    # command and paths are not (nor anyone's environment).
    jobs = service.ledger.jobs.listing(None if ask.all else caller.uid)
    return [
        describe(service, job, private=job.uid != caller.uid and not caller.is_admin)
        for job in jobs
    ]


def describe(service: Service, job: Job, private: bool = False) -> dict[str, Any]:
    """A job as listed: its row (never its environment), and where it stands."""
    out = job.to_wire()
    if private:
        for key in ("argv", "cwd", "output", "error"):
            out.pop(key, None)
    if job.state == JobState.WAITING and job.ticket_id:
        status = service.queue_statuses(only=job.ticket_id)
        if status:
            out.update(position=status[0]["position"], estimated_start=status[0]["estimated_start"])
    if job.partition_id:
        record = service.ledger.get(job.partition_id)
        out["expires_at"] = record.expires_at
        out["time_left_s"] = max(0.0, record.expires_at - service.ledger.clock())
    return out


def cancel(service: Service, caller: Caller, job: Job, stop_job: StopJob) -> dict[str, Any]:
    """Leave the queue (the ticket is cancelled), or stop a running job (the stop plan)."""
    if job.ended:
        raise BadRequest(f"job {job.id} has already ended ({job.state})")
    if job.ticket_id and service.ledger.ticket(job.ticket_id).state == TicketState.WAITING:
        service.ledger.cancel(job.ticket_id)
    running = job.state in (JobState.RUNNING, JobState.STARTING)
    job = service.ledger.update_job(
        job,
        state=JobState.CANCELLED,
        reason=f"cancelled by {caller.user}",
        **({} if running else {"ended_at": service.ledger.clock()}),
    )
    if running:
        stop_job(job)  # the partition is released when its processes are gone
    elif job.partition_id:
        release_partition(service, job, "job cancelled")
    service.on_change()
    return describe(service, job)


def release_partition(service: Service, job: Job, reason: str) -> None:
    """End the job's partition if it is still open (its job has ended)."""
    if not job.partition_id:
        return
    record = service.ledger.get(job.partition_id)
    if record.state_at(service.ledger.clock()) in ("active", "booked"):
        service.ledger.release(record.id, job.uid, job.user, reason)
