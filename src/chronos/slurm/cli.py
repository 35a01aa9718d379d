"""``chronos slurm …``: the node hooks, the gres.conf check, and the login-node front end.

Imported by the ``chronos`` command only; each subcommand imports what it needs
when it runs. The hooks themselves are fastest run by path (see hook.py and
``chronos slurm wrapper``); ``chronos slurm prolog`` is the same code behind the
full CLI's start-up.
"""

from __future__ import annotations

import getpass
import json
import os
import sys
from pathlib import Path
from typing import TYPE_CHECKING, Any

import click

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
            click.option("--time", "time_limit", help="Slurm time limit (e.g. 60, 2:00:00)."),
            click.option("--nodes", type=int, help="Nodes (one share of --memory on each)."),
            click.option("--partition", help="Slurm partition."),
            click.option("--gpu-type", help="GPU type (gres.conf Type=)."),
            click.option("--slurm-option", "extra", multiple=True, help="Passed to Slurm."),
        ]
    ):
        f = option(f)
    return f


def _request(options: dict[str, Any]) -> Request:
    from chronos.slurm.frontend import Request

    return Request(
        memory=options["memory"],
        time=options["time_limit"],
        nodes=options["nodes"],
        partition=options["partition"],
        gpu_type=options["gpu_type"],
        extra=tuple(options["extra"]),
    )


def _shard_bytes() -> int:
    from chronos.config import load_config

    return load_config().slurm.shard_bytes


@slurm.command("submit", context_settings={"ignore_unknown_options": True})
@_request_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def submit(command: tuple[str, ...], **options: Any) -> None:
    """Submit COMMAND as a batch job (sbatch) with the shards for --memory."""
    from chronos.slurm.frontend import run_slurm, sbatch_argv

    request = _request(options)
    out = run_slurm(sbatch_argv(request, command, _shard_bytes()))
    click.echo(f"submitted job {out.strip().split(';')[0]}")


@slurm.command("run", context_settings={"ignore_unknown_options": True})
@_request_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def run(command: tuple[str, ...], **options: Any) -> None:
    """Run COMMAND on the cluster now (srun), with the shards for --memory."""
    from chronos.slurm.frontend import srun_argv

    request = _request(options)
    argv = srun_argv(request, command, _shard_bytes())
    os.execvp(argv[0], argv)


@slurm.command("create", context_settings={"ignore_unknown_options": True})
@_request_options
@click.argument("command", nargs=-1, type=click.UNPROCESSED)
def create(command: tuple[str, ...], **options: Any) -> None:
    """Hold an allocation with the shards for --memory (salloc), then run COMMAND or a shell."""
    from chronos.slurm.frontend import salloc_argv

    request = _request(options)
    argv = salloc_argv(request, command, _shard_bytes())
    os.execvp(argv[0], argv)


@slurm.command("list")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def list_jobs(as_json: bool) -> None:
    """Your shares across the cluster: your Slurm jobs that hold shards."""
    from chronos.slurm.frontend import jobs
    from chronos.units import format_bytes

    found = jobs(getpass.getuser(), _shard_bytes())
    if as_json:
        click.echo(json.dumps([j.to_json() for j in found], indent=2))
        return
    if not found:
        click.echo("no jobs with GPU shares")
        return
    click.echo(f"{'JOB':>8}  {'STATE':<10} {'MEMORY':>10}  {'LEFT':>10}  NODES  NAME")
    for j in found:
        click.echo(
            f"{j.job_id:>8}  {j.state:<10} {format_bytes(j.memory_bytes):>10}  "
            f"{j.time_left:>10}  {j.nodes}  {j.name}"
        )


@slurm.command("stats")
@click.option("--json", "as_json", is_flag=True, help="Print JSON.")
def stats(as_json: bool) -> None:
    """Your jobs' reserved vs used GPU memory, from Slurm and each node's metrics."""
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
