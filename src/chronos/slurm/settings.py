"""The ``[slurm]`` policy table, and what a Slurm job's partition carries.

Kept free of heavy imports (stdlib, ``chronos.units``, ``chronos.errors``) because
the node hooks load it on every job start (see hook.py).

A partition made for a Slurm job carries the job id in its ``kind``:
``slurm:<job id>`` (``slurm:<job id>.<n>`` for the run after the n-th requeue, so
a late epilog of the previous run never releases the new run's partition). That
makes the prolog idempotent on the job id (a retried prolog finds its partition,
a requeued job's prolog replaces the previous run's: one partition, not two),
lets the daemon attribute processes by the job's cgroup and label metrics, and
lets the reconciler follow Slurm, all without a second store next to the ledger.
Only an administrator (the prolog runs as root) may create such a partition.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from chronos.errors import BadRequest
from chronos.units import parse_duration, parse_memory

GIB = 1 << 30
KIND_PREFIX = "slurm:"
_JOB_ID = re.compile(r"[1-9][0-9]{0,18}")
_KIND = re.compile(r"([1-9][0-9]{0,18})(?:\.([1-9][0-9]{0,5}))?")


@dataclass(frozen=True)
class SlurmSettings:
    enabled: bool = False
    """This node's GPUs are scheduled by Slurm: users' own creates, bookings and queue are off."""
    shard_bytes: int = GIB
    """Bytes of GPU memory one ``gres/shard`` stands for (1 GiB: ``shard:40`` is 40 GiB)."""
    gpus: tuple[int, ...] | None = None
    """The GPU indices Slurm schedules (None: every GPU of the node)."""
    end_margin_s: float = 120.0
    """A job's partition ends this long after the job's time limit (Slurm kills first)."""
    reconcile_interval_s: float = 30.0
    """How often the daemon compares its Slurm partitions with ``squeue``."""
    cancel_on_overuse: bool = False
    """Also ``scancel`` a job whose processes went over its shards (besides stopping them)."""
    gres_conf: str = "/etc/slurm/gres.conf"
    node_name: str | None = None
    """This node's name in Slurm (default: the short host name)."""
    metrics_port: int = 9464
    """Port of each node's metrics endpoint, for ``chronos stats --cluster``."""

    def schedules(self, device: int) -> bool:
        return self.enabled and (self.gpus is None or device in self.gpus)


def job_kind(job_id: str, run: int = 0) -> str:
    """``slurm:<job>`` for a job's first run, ``slurm:<job>.<n>`` after its n-th requeue."""
    return KIND_PREFIX + job_id + (f".{run}" if run else "")


def _kind_match(kind: str) -> re.Match[str] | None:
    if not kind.startswith(KIND_PREFIX):
        return None
    return _KIND.fullmatch(kind[len(KIND_PREFIX) :])


def job_of(kind: str) -> str | None:
    """The Slurm job id a partition's kind names, or None for other partitions."""
    match = _kind_match(kind)
    return None if match is None else match.group(1)


def run_of(kind: str) -> int:
    """Which run of its job (``SLURM_JOB_RESTART_COUNT``) a job partition is for."""
    match = _kind_match(kind)
    return int(match.group(2)) if match is not None and match.group(2) else 0


def valid_job_id(text: str) -> bool:
    return _JOB_ID.fullmatch(text) is not None


def refusal(settings: SlurmSettings, device: int) -> str | None:
    """Why an ordinary user may not take memory on ``device`` by hand, or None."""
    if settings.schedules(device):
        return f"GPU {device} is scheduled by Slurm: use sbatch/srun --gres=shard:N"
    return None


_BOOLS = ("enabled", "cancel_on_overuse")
_DURATIONS = {"end_margin": "end_margin_s", "reconcile_interval": "reconcile_interval_s"}


def parse_slurm(table: dict[str, Any], origin: str = "config") -> SlurmSettings:
    """The ``[slurm]`` table; unknown keys and bad values are errors naming the key."""
    changes: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{origin}: slurm.{key}"
        if key in _BOOLS:
            if not isinstance(value, bool):
                raise BadRequest(f"{where} must be true or false")
            changes[key] = value
        elif key == "shard_bytes":
            changes[key] = _shard_bytes(value, where)
        elif key in _DURATIONS:
            try:
                changes[_DURATIONS[key]] = parse_duration(value)
            except BadRequest as exc:
                raise BadRequest(f"{where}: {exc}") from None
        elif key == "gpus":
            if not isinstance(value, list) or not all(
                isinstance(v, int) and not isinstance(v, bool) and v >= 0 for v in value
            ):
                raise BadRequest(f"{where} must be a list of GPU indices")
            changes[key] = tuple(value)
        elif key in ("gres_conf", "node_name"):
            if not isinstance(value, str) or not value:
                raise BadRequest(f"{where} must be a non-empty string")
            changes[key] = value
        elif key == "metrics_port":
            if isinstance(value, bool) or not isinstance(value, int) or not 0 < value < 65536:
                raise BadRequest(f"{where} must be a port number")
            changes[key] = value
        else:
            raise BadRequest(f"{origin}: unknown setting slurm.{key}")
    return SlurmSettings(**changes)


def _shard_bytes(value: Any, where: str) -> int:
    if isinstance(value, int) and not isinstance(value, bool):
        if value < 1 << 20:
            raise BadRequest(f"{where} must be at least 1MiB")
        return value
    if not isinstance(value, str) or not value.strip() or value.strip()[-1].isdigit():
        raise BadRequest(f'{where} must be a size such as "1GiB"')
    try:
        nbytes = parse_memory(value, 1 << 60)
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc}") from None
    if nbytes < 1 << 20:
        raise BadRequest(f"{where} must be at least 1MiB")
    return nbytes
