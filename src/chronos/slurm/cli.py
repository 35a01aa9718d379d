"""``chronos slurm …``: the node hooks, the gres.conf check, and the login-node front end.

Imported by the ``chronos`` command only; each subcommand imports what it needs
when it runs. The hooks themselves are fastest run by path (see hook.py and
``chronos slurm wrapper``); ``chronos slurm prolog`` is the same code behind the
full CLI's start-up.
"""

from __future__ import annotations

import getpass
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

from chronos.errors import BadRequest
from chronos.slurm.hook import HOOKS

if TYPE_CHECKING:
    from chronos.slurm.frontend import Request


@click.group("slurm")
def slurm() -> None:
    """Chronos on Slurm nodes: hooks, checks, and sbatch/srun/salloc with --memory."""


for _name in HOOKS:  # chronos slurm prolog | epilog | taskprolog

    def _make(name: str) -> click.Command:
        @click.command(name, help=f"Slurm's {name.capitalize()} (exits 0 whatever happens).")
        def command() -> None:
            from chronos.slurm.hook import run_hook

            sys.exit(run_hook(name))

        return command

    slurm.add_command(_make(_name))


@slurm.command("wrapper")
@click.argument("name", type=click.Choice(HOOKS))
@click.option("--python", default="/usr/bin/python3", show_default=True, help="Interpreter.")
def wrapper(name: str, python: str) -> None:
    """Print a fast wrapper script for slurm.conf's Prolog=/Epilog=/TaskProlog=."""
    hook = Path(__file__).with_name("hook.py")
    click.echo(f'#!/bin/sh\n# Chronos {name} (docs/SLURM.md)\nexec {python} -I -S "{hook}" {name}')


@slurm.command("lua-path")
def lua_path() -> None:
    """Print where the packaged job_submit.lua is (copy it next to slurm.conf)."""
    click.echo(Path(__file__).with_name("job_submit.lua"))


@slurm.command("check")
@click.option("--node", help="This node's Slurm name (default: slurm.node_name or host name).")
def check(node: str | None) -> None:
    """Check gres.conf's shard counts against this node's GPU memory."""
    from chronos.config import load_config
    from chronos.devices import open_machine
    from chronos.slurm.gres import check_gres
    from chronos.slurm.reconcile import node_name

    config = load_config()
    machine = open_machine()
    try:
        problems = check_gres(config, machine.devices, node or node_name(config))
    finally:
        machine.close()
    for problem in problems:
        click.echo(f"chronos: {problem}", err=True)
    if problems:
        sys.exit(1)
    click.echo(f"{config.slurm.gres_conf}: every GPU's shards fit its memory")


def _request_options(f: click.decorators.FC) -> click.decorators.FC:
    for option in reversed(
        [
            click.option("--memory", required=True, help="GPU memory per node, e.g. 40GiB."),
            click.option("--duration", help="Time limit, Chronos's forms (2h, 90m, 1-12:00:00)."),
            click.option("--time", "time_limit", help="Slurm's own --time (60 = 60 minutes)."),
            click.option("--nodes", type=int, help="Nodes (one share of --memory on each)."),
            click.option("--partition", help="Slurm partition."),
            click.option("--gpu-type", help="GPU type (gres.conf Type=)."),
            click.option("--slurm-option", "extra", multiple=True, help="Passed to Slurm."),
        ]
    ):
        f = option(f)
    return f


def _request(options: dict[str, Any], more: Sequence[str] = ()) -> Request:
    from chronos.slurm.frontend import Request, slurm_time

    duration, time_limit = options["duration"], options["time_limit"]
    if duration and time_limit:
        raise BadRequest("--duration and --time are both a time limit: give one")
    return Request(
        memory=options["memory"],
        time=slurm_time(duration) if duration else time_limit,
        nodes=options["nodes"],
        partition=options["partition"],
        gpu_type=options["gpu_type"],
        extra=(*more, *options["extra"]),
    )


def _shard_bytes() -> int:
    from chronos.config import load_config

    return load_config().slurm.shard_bytes


# One implementation each: ``chronos submit`` and ``chronos run|create|list|stats --cluster``
# (chronos/cli.py hands the --cluster forms here) are these commands, and so are their
# older names ``chronos slurm submit|run|create|list|stats``.


@slurm.command("submit", context_settings={"ignore_unknown_options": True})
@_request_options
@click.option("--name", help="Job name (sbatch --job-name).")
@click.option("--output", help="File for the job's stdout (sbatch --output; %j is the job id).")
@click.option("--error", help="File for the job's stderr (sbatch --error).")
@click.option("--after", multiple=True, metavar="JOB", help="Start once JOB has ended.")
@click.option("--start", help="Not before this time: +2h, 09:00, 'tomorrow 09:00', ISO.")
@click.option("--device", help="A GPU index or auto (local jobs; on a cluster Slurm picks).")
@click.option("--gpus", type=int, help="GPUs (on a cluster: 1, shards share one GPU per node).")
@click.option(
    "--cluster", is_flag=True, help="Submit to the Slurm cluster (the default on a login node)."
)
@click.option("--json", "as_json", is_flag=True, help='Print {"job_id": …}.')
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
@click.pass_context
def submit(ctx: click.Context, /, command: tuple[str, ...], **options: Any) -> None:
    """Submit COMMAND as a batch job and return at once; print its job id.

    On a Slurm login node this is sbatch, with the shards for --memory
    (rounded up to whole shards). Elsewhere chronosd queues it in its fair queue and
    starts it as you when its share is granted (chronos jobs, chronos log, chronos cancel).
    Example: chronos submit --memory 40GiB --duration 2h -- python train.py
    """
    from chronos.slurm.frontend import (
        cluster_configured,
        run_slurm,
        sbatch_argv,
    )

    explicit = options["cluster"] or (ctx.parent is not None and ctx.parent.info_name == "slurm")
    if not explicit and not cluster_configured():
        from chronos.cli_jobs import submit_local

        submit_local(options, command)  # one machine: chronosd's fair queue (issue 15)
        return
    if options["device"] is not None:
        raise BadRequest("--device: on a cluster Slurm picks the GPU; leave it out")
    if options["gpus"] not in (None, 1):
        raise BadRequest("--gpus: a job's shards are on one GPU per node (Slurm 22.05)")
    request = _request(options, _batch_options(options))
    out = run_slurm(sbatch_argv(request, command, _shard_bytes()))
    job_id = out.strip().split(";")[0]  # --parsable: "<id>" or "<id>;<cluster>"
    click.echo(json.dumps({"job_id": job_id}) if options["as_json"] else f"submitted job {job_id}")


def _batch_options(options: dict[str, Any]) -> list[str]:
    from chronos.slurm.frontend import begin_time, dependency

    out = []
    for name, flag in (("name", "--job-name"), ("output", "--output"), ("error", "--error")):
        if options[name]:
            out.append(f"{flag}={options[name]}")
    if options["after"]:
        out.append(f"--dependency={dependency(options['after'])}")
    if options["start"]:
        out.append(f"--begin={begin_time(options['start'])}")
    return out


@slurm.command("run", context_settings={"ignore_unknown_options": True})
@_request_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(command: tuple[str, ...], **options: Any) -> None:
    """chronos run --cluster: run COMMAND on the cluster now (srun), with the shards for --memory.

    Exits with COMMAND's status (srun's); 125 if Chronos failed before srun started.
    Example: chronos run --cluster --memory 8GiB --duration 30m -- python eval.py
    """
    from chronos.slurm.frontend import exec_slurm, srun_argv

    exec_slurm(srun_argv(_request(options), command, _shard_bytes()))


@slurm.command("create", context_settings={"ignore_unknown_options": True})
@_request_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def create(command: tuple[str, ...], **options: Any) -> None:
    """chronos create --cluster: hold an allocation (salloc), then run COMMAND or a shell.

    Example: chronos create --cluster --memory 20GiB --duration 4h
    """
    from chronos.slurm.frontend import exec_slurm, salloc_argv

    exec_slurm(salloc_argv(_request(options), command, _shard_bytes()))


@slurm.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_jobs(as_json: bool) -> None:
    """chronos list --cluster: your Slurm jobs that hold shards, across the cluster."""
    from chronos.slurm.frontend import jobs
    from chronos.units import format_bytes

    found = jobs(getpass.getuser(), _shard_bytes())
    if as_json:
        click.echo(json.dumps([j.to_json() for j in found], indent=2))
        return
    if not found:
        click.echo("no jobs with GPU shares")
        return
    from chronos import cli_render as render

    columns = render.columns(">JOB|STATE|>MEMORY|>LEFT|~NODES|~NAME")
    rows = [
        [j.job_id, j.state, format_bytes(j.memory_bytes), j.time_left, j.nodes, j.name]
        for j in found
    ]
    click.echo(render.table(columns, rows, width=render.table_width()))


@slurm.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(as_json: bool) -> None:
    """chronos stats --cluster: your jobs' reserved vs used GPU memory (squeue, node metrics)."""
    from chronos.config import load_config
    from chronos.slurm.frontend import job_usage, jobs, node_addresses
    from chronos.slurm.scontrol import expand_hostlist
    from chronos.units import format_bytes

    config = load_config()
    found = jobs(getpass.getuser(), config.slurm.shard_bytes)
    nodes = sorted({n for j in found for n in expand_hostlist(j.nodes)})
    used = job_usage(node_addresses(nodes), config.slurm.metrics_port) if nodes else {}
    rows = [{**j.to_json(), "used_bytes": used.get(j.job_id)} for j in found]
    if as_json:
        click.echo(json.dumps(rows, indent=2))
        return
    for row in rows:
        u = row["used_bytes"]
        click.echo(
            f"job {row['job_id']} ({row['state']}, {row['nodes']}): "
            f"{format_bytes(int(str(row['memory_bytes'])))} reserved per node, "
            f"{'?' if u is None else format_bytes(int(str(u)))} used"
        )
