"""The login-node front end: Chronos words, Slurm commands.

``--memory 40GiB`` becomes ``--gres=shard:40`` (one shard is ``slurm.shard_bytes``,
1 GiB by default; rounded up), then ``sbatch``/``srun``/``salloc`` do the rest:
placement, queueing, fair share and accounting stay Slurm's. ``jobs`` and
``job_usage`` read back what the user has across the cluster: ``squeue`` for
the jobs, each node's metrics endpoint for the memory their processes use.
Errors from Slurm come back as one line (``SlurmCommandError``).
"""

from __future__ import annotations

import math
import os
import shlex
import shutil
import subprocess
import urllib.request
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import NoReturn

from chronos.errors import BadRequest, ChronosError
from chronos.slurm.scontrol import shard_count
from chronos.units import parse_duration, parse_memory

TIMEOUT_S = 60.0
SLURM_CONF_PATHS = (
    "/etc/slurm/slurm.conf",
    "/etc/slurm-llnl/slurm.conf",
    "/run/slurm/conf/slurm.conf",  # configless: slurmd's cached copy
    "/var/spool/slurmd/conf-cache/slurm.conf",
)


class SlurmCommandError(ChronosError, code="slurm_error", exit_code=1):
    """A Slurm command was missing, timed out or failed; its own message, in one line."""


def cluster_configured() -> bool:
    """Whether this is a Slurm login node: ``sbatch`` on PATH and a slurm.conf it would read."""
    if shutil.which("sbatch") is None:
        return False
    explicit = os.environ.get("SLURM_CONF")
    if explicit:
        return Path(explicit).is_file()
    return any(Path(path).is_file() for path in SLURM_CONF_PATHS)


def slurm_time(duration: str) -> str:
    """A Chronos duration (``2h``, ``90m``, ``3600`` seconds, ``1-12:00:00``) as Slurm's ``--time``.

    Slurm's own bare number is minutes and Chronos's is seconds, so the value is always
    written out as ``D-HH:MM:SS`` (Slurm rounds seconds up to a whole minute).
    """
    seconds = math.ceil(parse_duration(duration, float("inf")))
    days, rest = divmod(seconds, 86400)
    return f"{days}-{rest // 3600:02d}:{rest % 3600 // 60:02d}:{rest % 60:02d}"


def begin_time(start: str) -> str:
    """``--start`` (``+2h``, ``09:00``, ``tomorrow 09:00``, ISO) as sbatch's ``--begin``."""
    import time
    from datetime import datetime

    from chronos.api import start_timestamp

    at = start_timestamp(start, time.time())
    return datetime.fromtimestamp(at).strftime("%Y-%m-%dT%H:%M:%S")  # local, as Slurm reads it


def dependency(after: Sequence[str]) -> str:
    """``--after JOB`` (repeatable): start once every JOB has ended, whatever its outcome."""
    from chronos.slurm.settings import valid_job_id

    for job in after:
        if not valid_job_id(job):
            raise BadRequest(f"--after {job!r}: a Slurm job id is a number, e.g. 4242")
    return "afterany:" + ":".join(after)


def shards_for(memory: str, shard_bytes: int) -> int:
    """Shards that hold ``memory`` (a size; a fraction means nothing across GPU types)."""
    text = str(memory).strip()
    if text and (text[-1].isdigit() or text.endswith("%")):
        raise BadRequest(
            f"--memory {text!r}: on a cluster give a size (e.g. 40GiB), not a share of a GPU"
        )
    return max(1, math.ceil(parse_memory(text, 1 << 60) / shard_bytes))


def gres(shards: int, gpu_type: str | None = None) -> str:
    return f"shard:{gpu_type}:{shards}" if gpu_type else f"shard:{shards}"


@dataclass(frozen=True)
class Request:
    memory: str
    time: str | None = None
    """Slurm's time limit (``--time``: minutes, ``H:MM:SS``, ``D-HH``); required by most sites."""
    nodes: int | None = None
    partition: str | None = None
    gpu_type: str | None = None
    extra: tuple[str, ...] = ()
    """More options passed to Slurm as they are."""

    def options(self, shard_bytes: int) -> list[str]:
        out = [f"--gres={gres(shards_for(self.memory, shard_bytes), self.gpu_type)}"]
        if self.time:
            out.append(f"--time={self.time}")
        if self.nodes:
            out.append(f"--nodes={self.nodes}")
        if self.partition:
            out.append(f"--partition={self.partition}")
        return out + list(self.extra)


def sbatch_argv(request: Request, command: Sequence[str], shard_bytes: int) -> list[str]:
    if not command:
        raise BadRequest("nothing to run: give the command after --")
    return ["sbatch", "--parsable", *request.options(shard_bytes), "--wrap", shlex.join(command)]


def srun_argv(request: Request, command: Sequence[str], shard_bytes: int) -> list[str]:
    if not command:
        raise BadRequest("nothing to run: give the command after --")
    return ["srun", *request.options(shard_bytes), *command]


def salloc_argv(request: Request, command: Sequence[str], shard_bytes: int) -> list[str]:
    return ["salloc", *request.options(shard_bytes), *command]


def exec_slurm(argv: Sequence[str]) -> NoReturn:
    """Become ``srun``/``salloc``: the job's output and exit status are the command's own."""
    program = shutil.which(argv[0])
    if program is None:
        raise SlurmCommandError(f"{argv[0]} is not installed here (is this a Slurm login node?)")
    os.execv(program, list(argv))


def run_slurm(argv: Sequence[str]) -> str:
    """Run a Slurm command; its stdout, or SlurmCommandError with its message in one line."""
    try:
        proc = subprocess.run(list(argv), capture_output=True, text=True, timeout=TIMEOUT_S)
    except FileNotFoundError:
        raise SlurmCommandError(
            f"{argv[0]} is not installed here (is this a Slurm login node?)"
        ) from None
    except subprocess.TimeoutExpired:
        raise SlurmCommandError(f"{argv[0]} did not answer within {TIMEOUT_S:g}s") from None
    if proc.returncode != 0:
        raise SlurmCommandError(one_line(proc.stderr or proc.stdout, argv[0], proc.returncode))
    return proc.stdout


def one_line(text: str, program: str, code: int) -> str:
    lines = [line.strip() for line in text.splitlines() if line.strip()]
    if not lines:
        return f"{program} failed (exit {code})"
    last = lines[-1]
    for prefix in (f"{program}: error: ", "error: "):
        last = last.removeprefix(prefix)
    return f"{program}: {last}"


@dataclass(frozen=True)
class ClusterJob:
    job_id: str
    name: str
    state: str
    nodes: str
    shards: int
    memory_bytes: int
    time_left: str

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)


def jobs(user: str, shard_bytes: int) -> list[ClusterJob]:
    """The user's jobs that hold shards, from ``squeue``."""
    text = run_slurm(["squeue", "-h", "-u", user, "-o", "%A|%j|%T|%N|%b|%L"])
    out = []
    for line in text.splitlines():
        parts = line.split("|")
        if len(parts) != 6:
            continue
        job_id, name, state, nodes, tres, left = parts
        count = shard_count(tres)
        if count:
            out.append(ClusterJob(job_id, name, state, nodes, count, count * shard_bytes, left))
    return out


def job_usage(addresses: Sequence[str], port: int) -> dict[str, int]:
    """Bytes each Slurm job's processes use now, summed from the nodes' metrics endpoints."""
    used: dict[str, int] = {}
    for address in addresses:
        try:
            with urllib.request.urlopen(f"http://{address}:{port}/metrics", timeout=5) as reply:
                text = reply.read().decode()
        except OSError:
            continue  # a node without an endpoint: its jobs show no usage
        for job, value in _used_by_job(text).items():
            used[job] = used.get(job, 0) + value
    return used


def _used_by_job(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        if not line.startswith("chronos_partition_used_bytes{"):
            continue
        labels, _, value = line.rpartition("} ")
        marker = 'slurm_job="'
        start = labels.find(marker)
        if start < 0:
            continue
        job = labels[start + len(marker) : labels.find('"', start + len(marker))]
        if job:
            out[job] = out.get(job, 0) + int(float(value))
    return out


def node_addresses(node_list: Sequence[str]) -> list[str]:
    """The addresses of Slurm nodes (``sinfo``'s NodeAddr), deduplicated."""
    text = run_slurm(["sinfo", "-h", "-N", "-o", "%N %o"])
    wanted = set(node_list)
    found = []
    for line in text.splitlines():
        name, _, address = line.partition(" ")
        if name in wanted and address and address not in found:
            found.append(address)
    return found
