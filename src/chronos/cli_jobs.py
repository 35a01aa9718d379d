"""``chronos submit`` on one machine, ``chronos jobs`` and ``chronos log`` (issue 15).

The client runs as the submitting user, so it checks what only that user can tell
before anything is queued: the command resolves on the user's ``PATH`` and is
executable for them, the working directory is readable, the output files can be
opened for append (or, for a name with ``%j``, their directory written). chronosd
checks again at start, as the user (the stub in :mod:`chronos._jobstub`). ``log``
reads the output file here, as the user: the daemon never reads a job's output.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Sequence
from typing import Any

import click

from chronos.errors import BadRequest

JOB_STATE_WORDS = {
    "waiting": "waiting",
    "starting": "starting",
    "running": "running",
    "done": "done",
    "expired": "stopped at expiry",
    "memory": "stopped over memory",
    "cancelled": "cancelled",
    "failed": "failed to start",
}
SLURM_ONLY = ("time_limit", "nodes", "partition", "gpu_type", "extra")


def submit_local(options: dict[str, Any], command: Sequence[str]) -> None:
    """Queue COMMAND in chronosd's fair queue; print the job id and return."""
    from chronos.api import Partitioner
    from chronos.batch import JobsUnavailable
    from chronos.supervisor import check_program

    client = Partitioner()
    if client.mode != "daemon":
        raise JobsUnavailable()
    for name in SLURM_ONLY:
        if options.get(name):
            flag = "--time" if name == "time_limit" else "--" + name.replace("_", "-")
            raise BadRequest(f"{flag} is a Slurm option: on one machine leave it out")
    if not command:
        raise BadRequest("nothing to run: give the command after --")
    if not options.get("duration"):
        raise BadRequest("--duration is required (e.g. 2h)")
    check_program(command[0])
    cwd = os.getcwd()
    if not os.access(cwd, os.R_OK | os.X_OK):
        raise BadRequest(f"working directory {cwd} is not readable")
    output = _absolute(options.get("output") or "chronos-%j.out", cwd)
    error = _absolute(options["error"], cwd) if options.get("error") else None
    for path in filter(None, (output, error)):
        check_writable(path)
    if len(options.get("after") or ()) > 1:
        raise BadRequest("--after: one job on one machine (give the latest)")
    job = client.submit(
        command,
        partition=_partition_args(options),
        output=output,
        error=error,
        name=options.get("name"),
        after=(options.get("after") or (None,))[0],
        cwd=cwd,
    )
    click.echo(json.dumps({"job_id": job["id"]}) if options["as_json"] else job["id"])


def _partition_args(options: dict[str, Any]) -> dict[str, Any]:
    """The create request's arguments: ``--device``/``--gpus`` pass through as they are
    (a create request that does not take one says so in one line)."""
    from chronos.api import start_timestamp

    args: dict[str, Any] = {"memory": options["memory"], "duration": options["duration"]}
    device = options.get("device")
    args["device"] = 0 if device is None else int(device) if str(device).isdigit() else device
    if options.get("gpus") is not None:
        args["gpus"] = options["gpus"]
    if options.get("start"):
        args["start"] = start_timestamp(options["start"], time.time())
    return args


def _absolute(path: str, cwd: str) -> str:
    return path if os.path.isabs(path) else os.path.join(cwd, path)


def check_writable(path: str) -> None:
    """As the user: the file opens for append (``%j``: its directory is writable)."""
    if "%j" in path:
        folder = os.path.dirname(path)
        if not os.access(folder, os.W_OK | os.X_OK):
            raise BadRequest(f"cannot write output in {folder}: permission denied")
        return
    flags = os.O_WRONLY | os.O_APPEND | os.O_CREAT | os.O_NOFOLLOW | os.O_CLOEXEC
    try:
        os.close(os.open(path, flags, 0o666))
    except OSError as exc:
        raise BadRequest(f"cannot write output {path}: {exc.strerror}") from None


@click.command("jobs")
@click.option("--all", "show_all", is_flag=True, help="Everyone's jobs, not only yours.")
@click.option("--json", "as_json", is_flag=True, help="Machine-readable output.")
def jobs(show_all: bool, as_json: bool) -> None:
    """Your batch jobs (chronos submit) and where each stands."""
    from chronos import cli_render as render
    from chronos.api import Partitioner

    items = Partitioner().jobs(all=show_all)
    if as_json:
        click.echo(json.dumps(items, indent=2))
        return
    columns = render.columns("JOB|~USER|STATE|~DETAIL|~COMMAND")
    rows = [
        [j["id"], j["user"], JOB_STATE_WORDS.get(j["state"], j["state"]), _detail(j), _cmd(j)]
        for j in items
    ]
    click.echo(render.table(columns, rows, width=render.table_width()))


def _detail(job: dict[str, Any]) -> str:
    from chronos import cli_render as render

    state = job["state"]
    if state == "waiting":
        if "position" in job:
            est = job.get("estimated_start")
            return f"position {job['position']}, " + (
                f"start ~{render.clock(est)}" if est else "start unknown"
            )
        return f"after {job['after']}" if job.get("after") else "booked"
    if state == "running":
        return f"{render.span(job.get('time_left_s', 0))} left"
    if state in ("done", "expired", "memory", "cancelled"):
        code = job.get("exit_code")
        return "exit status unknown" if code is None else f"exit {code}"
    return str(job.get("reason") or "")


def _cmd(job: dict[str, Any]) -> str:
    import shlex

    return shlex.join(job["argv"]) if "argv" in job else ""


@click.command("log")
@click.argument("job_id", metavar="JOB")
@click.option("--follow", "-f", is_flag=True, help="Keep printing as the job writes.")
@click.option("--error", "stderr", is_flag=True, help="The --error file instead.")
def log(job_id: str, follow: bool, stderr: bool) -> None:
    """Print JOB's output file (read by you, as yourself)."""
    from chronos.api import Partitioner

    client = Partitioner()
    job = client.jobs(id=job_id)[0]
    path = job.get("error") if stderr else job.get("output")
    if not path:
        raise BadRequest(f"job {job['id']} has no {'--error' if stderr else 'output'} file")
    try:
        stream = open(path, "rb")  # noqa: SIM115 - followed below
    except OSError as exc:
        raise BadRequest(f"cannot read {path}: {exc.strerror}") from None
    with stream:
        _copy(stream)
        while follow and not _ended(client, job["id"]):
            time.sleep(0.5)  # a file has nothing to wait on portably; inotify is not worth it
            _copy(stream)
        _copy(stream)


def _copy(stream: Any) -> None:
    data = stream.read()
    if data:
        sys.stdout.buffer.write(data)
        sys.stdout.buffer.flush()


def _ended(client: Any, job_id: str) -> bool:
    return client.jobs(id=job_id)[0]["state"] not in ("waiting", "starting", "running")
