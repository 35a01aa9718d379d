"""Reading what Slurm says about a job: ``scontrol show job -d`` and ``squeue``.

Slurm 22.05 gives the Prolog neither the shard count nor the time limit, so the
prolog asks ``scontrol show job -d $SLURM_JOB_ID`` (≈25 ms), whose per-node lines
say which GPU (``IDX``) and how many shards each node got::

     Nodes=ci[0-1] CPU_IDs=0 Mem=0 GRES=shard:g1:7(IDX:1)

Stdlib only: the node hooks import this on every job start.
"""

from __future__ import annotations

import re
import subprocess
import time
from dataclasses import dataclass, field

SCONTROL_TIMEOUT_S = 10.0
_FIELD = re.compile(r"(\S+?)=(\S*)")
_SHARD = re.compile(r"shard(?::[^:(,]+)?:(\d+)\(IDX:([0-9,\-]+)\)")
ENDED_STATES = frozenset(
    {
        "BOOT_FAIL",
        "CANCELLED",
        "COMPLETED",
        "DEADLINE",
        "FAILED",
        "NODE_FAIL",
        "OUT_OF_MEMORY",
        "PREEMPTED",
        "TIMEOUT",
        "PENDING",  # requeued: it will get a new allocation (and a new prolog)
        "REQUEUED",
        "REQUEUE_HOLD",
        "REQUEUE_FED",
        "SPECIAL_EXIT",
        "REVOKED",
    }
)


class SlurmError(Exception):
    """A Slurm command failed or said something we cannot read."""


@dataclass(frozen=True)
class Shards:
    """A job's GPU shards on one GPU of a node (``gres/shard``): its share is count / total."""

    device: int
    """The GPU's index on the node, as Slurm allocated it (IDX), never the job's renumbering."""
    count: int


@dataclass(frozen=True)
class JobInfo:
    """What ``scontrol show job`` says of a job, as far as Chronos needs it."""

    job_id: str
    user_id: int | None
    user: str | None
    state: str
    end_time: float | None
    """When Slurm will end the job (start + time limit), epoch seconds; None if unlimited."""
    node_list: str
    shards: dict[str, list[Shards]] = field(default_factory=dict)
    """Per node name: the shards it got on which GPU."""
    shards_per_node: int = 0
    """What the job asked for per node (``TresPerNode=gres:shard:N``)."""
    restarts: int = 0
    """How often the job was requeued (its run: ``SLURM_JOB_RESTART_COUNT``)."""


def expand_hostlist(text: str) -> list[str]:
    """``ci[0-1,3],gpu7`` → ``['ci0', 'ci1', 'ci3', 'gpu7']`` (Slurm's compressed lists)."""
    out: list[str] = []
    for prefix, ranges, suffix in re.findall(r"([^,\[]*)(?:\[([^\]]*)\])?([^,\[]*),?", text):
        if not prefix and not ranges:
            continue
        if not ranges:
            out.append(prefix + suffix)
            continue
        for part in ranges.split(","):
            low, _, high = part.partition("-")
            width = len(low)
            for n in range(int(low), int(high or low) + 1):
                out.append(f"{prefix}{n:0{width}d}{suffix}")
    return out


def _indices(text: str) -> list[int]:
    out: list[int] = []
    for part in text.split(","):
        low, _, high = part.partition("-")
        out.extend(range(int(low), int(high or low) + 1))
    return out


def _epoch(text: str) -> float | None:
    if not text or text in ("Unknown", "None", "N/A"):
        return None
    try:
        return time.mktime(time.strptime(text, "%Y-%m-%dT%H:%M:%S"))
    except ValueError:
        return None


def parse_job(text: str) -> JobInfo:
    """One job from ``scontrol show job -d`` output (several lines) or ``-o`` (one line)."""
    fields: dict[str, str] = {}
    shards: dict[str, list[Shards]] = {}
    for line in text.splitlines():
        pairs = _FIELD.findall(line)
        names = {k for k, _ in pairs}
        if "Nodes" in names and "GRES" in names and "JobId" not in names:
            per_node = dict(pairs)
            found = _shards(per_node["GRES"])
            if found:
                for node in expand_hostlist(per_node["Nodes"]):
                    shards.setdefault(node, []).extend(found)
            continue
        for key, value in pairs:
            fields.setdefault(key, value)
    if "JobId" not in fields:
        raise SlurmError("scontrol printed no job")
    uid_match = re.match(r"(.*)\((\d+)\)$", fields.get("UserId", ""))
    limit = fields.get("TimeLimit", "")
    return JobInfo(
        job_id=fields["JobId"],
        user=uid_match.group(1) if uid_match else None,
        user_id=int(uid_match.group(2)) if uid_match else None,
        state=fields.get("JobState", "UNKNOWN"),
        end_time=None if limit in ("UNLIMITED", "INFINITE") else _epoch(fields.get("EndTime", "")),
        node_list=fields.get("NodeList", ""),
        shards=shards,
        shards_per_node=shard_count(fields.get("TresPerNode", "")),
        restarts=int(fields["Restarts"]) if fields.get("Restarts", "").isdigit() else 0,
    )


def shard_count(tres: str) -> int:
    """Shards per node in a TRES string (scontrol's ``TresPerNode``, squeue's ``%b``:
    ``gres:shard:4``, ``gres/shard:g0:4``...); 0 where it asks for none."""
    for item in tres.split(","):
        parts = item.replace("/", ":").split(":")
        if "shard" in parts and parts[-1].isdigit():
            return int(parts[-1])
    return 0


def _shards(gres: str) -> list[Shards]:
    out = []
    for count, idx in _SHARD.findall(gres):
        devices = _indices(idx)
        # 22.05 puts one job's shards on one GPU per node; split evenly if ever not.
        for device in devices:
            out.append(Shards(device=device, count=int(count) // len(devices)))
    return out


def _slurm_command(argv: list[str]) -> subprocess.CompletedProcess[str]:
    """Run a Slurm command within the timeout; SlurmError where it cannot run at all."""
    try:
        return subprocess.run(argv, capture_output=True, text=True, timeout=SCONTROL_TIMEOUT_S)
    except (OSError, subprocess.TimeoutExpired) as exc:
        raise SlurmError(f"{argv[0]}: {exc}") from None


def show_job(job_id: str) -> JobInfo:
    """``scontrol show job -d JOB``, parsed; raises SlurmError if Slurm cannot say."""
    proc = _slurm_command(["scontrol", "show", "job", "-d", job_id])
    if proc.returncode != 0:
        raise SlurmError((proc.stderr or proc.stdout).strip() or f"scontrol exit {proc.returncode}")
    return parse_job(proc.stdout)


@dataclass(frozen=True)
class QueueEntry:
    job_id: str
    state: str
    end_time: float | None
    nodes: tuple[str, ...]


def queue_states(job_ids: list[str]) -> dict[str, QueueEntry]:
    """What ``squeue`` knows of ``job_ids`` (any state); a job it has forgotten is absent.

    Raises SlurmError when Slurm cannot answer: the caller must then change nothing.
    """
    if not job_ids:
        return {}
    proc = _slurm_command(
        ["squeue", "-h", "-t", "all", "-j", ",".join(job_ids), "-o", "%A|%T|%e|%N"]
    )
    if proc.returncode != 0:
        if "Invalid job id" in proc.stderr:
            return {}  # every one of them is gone (squeue fails only when none is known)
        raise SlurmError(proc.stderr.strip() or f"squeue exit {proc.returncode}")
    return parse_queue(proc.stdout)


def parse_queue(text: str) -> dict[str, QueueEntry]:
    out = {}
    for line in text.splitlines():
        parts = line.strip().split("|")
        if len(parts) != 4:
            continue
        job, state, end, nodes = parts
        out[job] = QueueEntry(job, state, _epoch(end), tuple(expand_hostlist(nodes)))
    return out


def running_with_shards(node: str) -> list[str]:
    """Jobs running on ``node`` that asked for shards (RUNNING: past their prolog)."""
    proc = _slurm_command(["squeue", "-h", "-w", node, "-t", "RUNNING", "-o", "%A|%b"])
    if proc.returncode != 0:
        raise SlurmError(proc.stderr.strip() or f"squeue exit {proc.returncode}")
    out = []
    for line in proc.stdout.splitlines():
        job, _, tres = line.strip().partition("|")
        if job and shard_count(tres):
            out.append(job)
    return out
