"""The node hooks: Slurm's Prolog, TaskProlog and Epilog on a Chronos node.

* **prolog** (root, ``PrologFlags=Alloc``: before any job process): creates the
  job's partition on this node through chronosd, as an administrator on behalf of
  the job's user: memory = the job's shards on this node × ``slurm.shard_bytes``,
  device = the GPU index Slurm allocated (``IDX``; never the job's renumbered
  ``CUDA_VISIBLE_DEVICES``), end = the job's end time + ``slurm.end_margin``.
  Idempotent on the job id: the partition's kind is ``slurm:<job id>``, and a
  retried prolog or a requeued job finds it instead of making a second one.
* **taskprolog** (the job's user, once per task): prints ``export`` lines for
  ``CHRONOS_PARTITION_ID`` and the framework caps. It only reads the partition
  the prolog made, so the user's identity never decides its size.
* **epilog** (root): releases the job's partitions.

No hook ever fails the node: Slurm drains a node whose prolog or epilog exits
non-zero. Problems are logged to syslog and stderr and the hook exits 0; the
daemon's reconciler (reconcile.py) catches up with whatever a hook could not do.

Every job start pays for this file, so it is written to start fast: run it by
path with ``python3 -I -S …/chronos/slurm/hook.py prolog`` and it loads only
the few stdlib-only modules it needs (not the package's ``__init__``, the API,
click or the CLI; see ``_bootstrap_package``). ``chronos slurm wrapper`` prints
such a wrapper script for slurm.conf.
"""

from __future__ import annotations

import os
import sys
import time
from typing import Any

RETRY_S = 3.0
"""How long a hook keeps trying to reach a daemon that is briefly down."""
HOOKS = ("prolog", "epilog", "taskprolog")


def log(message: str) -> None:
    """To stderr (slurmd's log with debug) and syslog (where the site collects it)."""
    line = f"chronos-slurm[{os.getpid()}]: {message}"
    print(line, file=sys.stderr)
    try:
        import syslog

        syslog.openlog("chronos-slurm", 0, syslog.LOG_DAEMON)
        syslog.syslog(syslog.LOG_WARNING, message)
    except OSError:
        pass


def _settings(env: dict[str, str]) -> Any:
    from pathlib import Path

    from chronos.config import load_config

    path = env.get("CHRONOS_CONFIG")
    return load_config(Path(path) if path else None)


def _connect(env: dict[str, str], retry_s: float = RETRY_S) -> Any:
    """A client of this node's chronosd (a Partitioner), retried for ``retry_s`` if it is
    down."""
    from pathlib import Path

    from chronos.api import Partitioner
    from chronos.errors import DaemonUnavailable
    from chronos.paths import socket_path
    from chronos.transport import SocketTransport

    explicit = env.get("CHRONOS_SOCKET")
    path = Path(explicit) if explicit else socket_path()
    deadline = time.monotonic() + retry_s
    while True:
        try:
            return Partitioner(SocketTransport(path, timeout=10.0))
        except DaemonUnavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def job_partitions(client: Any, job_id: str) -> list[dict[str, Any]]:
    """The open partitions of this node that belong to Slurm job ``job_id`` (any run)."""
    from chronos.slurm.settings import job_of

    return [r for r in client.records() if job_of(str(r.get("kind", ""))) == job_id]


def restart_count(env: dict[str, str]) -> int | None:
    text = env.get("SLURM_JOB_RESTART_COUNT", "")
    return int(text) if text.isdigit() else None


def prolog(env: dict[str, str]) -> int:
    from chronos.errors import PartitionEnded
    from chronos.slurm.scontrol import show_job
    from chronos.slurm.settings import job_kind, run_of, valid_job_id

    job_id = env.get("SLURM_JOB_ID", "")
    if not valid_job_id(job_id):
        log(f"prolog: no usable SLURM_JOB_ID ({job_id!r}); nothing done")
        return 0
    requeued = bool(restart_count(env))
    if not (env.get("SLURM_JOB_GPUS") or env.get("CUDA_VISIBLE_DEVICES") or requeued):
        return 0  # no GPU gres at all: not ours, and no Slurm command run for it
    config = _settings(env)
    if not config.slurm.enabled:
        return 0
    node = env.get("SLURMD_NODENAME") or config.slurm.node_name or ""
    info = show_job(job_id)
    shards = info.shards.get(node, []) or _from_environment(info, env)
    if not shards:
        if info.shards_per_node:
            log(f"prolog: job {job_id} asked for shards but Slurm names no GPU on {node}")
        return 0  # GPUs but no shards: a whole-GPU job is Slurm's alone
    user = env.get("SLURM_JOB_USER") or info.user
    if not user:
        log(f"prolog: job {job_id}: no user; nothing done")
        return 0
    now = time.time()
    end = (info.end_time or now + config.max_duration_s) + config.slurm.end_margin_s
    duration = max(1.0, min(end - now, config.max_duration_s))
    run = restart_count(env) or 0
    client = _connect(env)
    try:
        existing = set()
        for r in job_partitions(client, job_id):
            if run_of(r["kind"]) == run:
                existing.add(r["device"])
                log(f"prolog: job {job_id} run {run}: partition {r['id']} already there")
                continue
            try:  # a requeued job: the previous run's partition, whose epilog came late
                client.release(r["id"])
            except PartitionEnded:
                pass
        for share in shards:
            if share.device in existing:
                continue  # a retried prolog or a requeued job: keep its one partition
            made = client.create(
                device=share.device,
                memory=f"{share.count * config.slurm.shard_bytes}B",
                duration=duration,
                user=user,
                persist=True,
                kind=job_kind(job_id, run),
            )
            log(
                f"prolog: job {job_id} on {node}: partition {made.id} of {share.count} "
                f"shards on GPU {share.device} for {user}"
            )
    finally:
        client.close()
    return 0


def _from_environment(info: Any, env: dict[str, str]) -> list[Any]:
    """Shards from TresPerNode and ``SLURM_JOB_GPUS`` when the per-node detail lacks them."""
    from chronos.slurm.scontrol import Shards

    gpus = [g for g in env.get("SLURM_JOB_GPUS", "").split(",") if g.isdigit()]
    if not info.shards_per_node or len(gpus) != 1:
        return []
    return [Shards(device=int(gpus[0]), count=info.shards_per_node)]


def taskprolog(env: dict[str, str], out: Any = None) -> int:
    from chronos.frameworks import limits_env
    from chronos.slurm.settings import run_of, valid_job_id

    out = out or sys.stdout
    job_id = env.get("SLURM_JOB_ID", "")
    if not valid_job_id(job_id) or not (
        env.get("SLURM_JOB_GPUS") or env.get("SLURM_SHARDS_ON_NODE")
    ):
        return 0
    client = _connect(env, retry_s=0.0)  # per task: no daemon, no caps, no delay
    try:
        mine = job_partitions(client, job_id)
    finally:
        client.close()
    if not mine:
        return 0
    first = max(mine, key=lambda r: run_of(r["kind"]))  # this run's, if a requeue raced
    exports = {
        "CHRONOS_PARTITION_ID": first["id"],
        **limits_env(int(first["memory_bytes"]), int(first["device_total_bytes"]), base=env),
    }
    for name, value in exports.items():
        print(f"export {name}={value}", file=out)
    return 0


def epilog(env: dict[str, str]) -> int:
    from chronos.errors import PartitionEnded
    from chronos.slurm.settings import run_of, valid_job_id

    job_id = env.get("SLURM_JOB_ID", "")
    if not valid_job_id(job_id):
        return 0
    run = restart_count(env)
    client = _connect(env)
    try:
        mine = job_partitions(client, job_id)
        if mine and _running_here_again(job_id, env.get("SLURMD_NODENAME", "")):
            log(f"epilog: job {job_id} runs here again (requeued): its partition stays")
            return 0  # a requeued job's previous run: its next run (and prolog) came first
        for record in mine:
            if run is not None and run_of(record["kind"]) > run:
                continue  # the next run's (a requeue raced this epilog): not ours to end
            try:
                client.release(record["id"])
                log(f"epilog: job {job_id} run {run}: released {record['id']}")
            except PartitionEnded:
                pass  # ended meanwhile (expiry, memory stop): nothing to release
    finally:
        client.close()
    return 0


def _running_here_again(job_id: str, node: str) -> bool:
    """Whether Slurm runs ``job_id`` on ``node`` now (so this epilog is a requeued run's)."""
    from chronos.slurm.scontrol import SlurmError, queue_states

    try:
        entry = queue_states([job_id]).get(job_id)
    except SlurmError:
        return False  # cannot tell: release (the usual case), the reconciler follows up
    return entry is not None and entry.state in ("CONFIGURING", "RUNNING") and node in entry.nodes


def run_hook(name: str, env: dict[str, str] | None = None) -> int:
    """Run one hook; whatever goes wrong is logged and the exit status stays 0."""
    env = dict(os.environ if env is None else env)
    try:
        if name == "prolog":
            return prolog(env)
        if name == "epilog":
            return epilog(env)
        if name == "taskprolog":
            return taskprolog(env)
    except Exception as exc:  # noqa: BLE001 - a hook must never take the node down
        log(f"{name}: job {env.get('SLURM_JOB_ID', '?')}: {type(exc).__name__}: {exc}")
        return 0
    log(f"unknown hook {name!r} (use {', '.join(HOOKS)})")
    return 2


def main(argv: list[str] | None = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if len(args) != 1:
        print(f"usage: chronos-slurm-hook {'|'.join(HOOKS)}", file=sys.stderr)
        return 2
    return run_hook(args[0])


def _bootstrap_package() -> None:
    """Make ``chronos.*`` importable without running the package's ``__init__``.

    That ``__init__`` imports the whole client API (~100 ms); the hook needs only
    stdlib-only modules (config, the API's Partitioner and its transport, units, frameworks).
    """
    import types
    from pathlib import Path

    here = Path(__file__).resolve().parent
    if sys.path and Path(sys.path[0] or ".").resolve() == here:
        del sys.path[0]  # our own folder must not shadow top-level modules
    if "chronos" not in sys.modules:
        package = types.ModuleType("chronos")
        package.__path__ = [str(here.parent)]
        sys.modules["chronos"] = package


if __name__ == "__main__":
    _bootstrap_package()
    sys.exit(main())
