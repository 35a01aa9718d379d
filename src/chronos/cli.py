"""The ``chronos`` command line.

Every command prints a human table by default and JSON with ``--json``.
Errors are one line on stderr and a non-zero exit code (see errors.py).
"""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, TypeVar

import click

from chronos.errors import AdmissionRefused, BadRequest, ChronosError
from chronos.models import ACTIVE, BOOKED, PartitionRecord
from chronos.units import format_bytes, format_duration, local_clock

F = TypeVar("F", bound=Callable[..., Any])


def _client() -> Any:
    from chronos.api import Partitioner

    return Partitioner()


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    widths = [
        max(len(h), *(len(r[i]) for r in rows)) if rows else len(h) for i, h in enumerate(headers)
    ]
    lines = ["  ".join(h.ljust(w) for h, w in zip(headers, widths)).rstrip()]
    for row in rows:
        lines.append("  ".join(c.ljust(w) for c, w in zip(row, widths)).rstrip())
    return "\n".join(lines)


def describe(record: PartitionRecord, now: float) -> str:
    state = record.state_at(now)
    head = (
        f"partition {record.id}: GPU {record.device}, {format_bytes(record.memory_bytes)} "
        f"({record.memory_fraction:.1%}), user {record.user}"
    )
    if state == BOOKED:
        return (
            f"{head}, booked from {local_clock(record.starts_at)} "
            f"until {local_clock(record.expires_at)}"
        )
    if state == ACTIVE:
        return (
            f"{head}, until {local_clock(record.expires_at)} "
            f"({format_duration(record.expires_at - now)} left)"
        )
    return f"{head}, {state} at {local_clock(record.ended_at or record.expires_at)}"


@click.group(context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chronos-gpu", prog_name="chronos")
def cli() -> None:
    """Reserve a share of a GPU's memory for a span of time, on a shared machine."""


# ignore_unknown_options: "-1" is a (bad) MEMORY, and should be told so, not "no such option".
@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("device", type=int)
@click.argument("memory")
@click.argument("duration")
@click.option("--user", help="Owner of the partition (administrators only).")
@click.option("--grace", help="Delay between SIGTERM and SIGKILL at expiry (default 30s).")
@click.option("--warn", help="Signal the partition's processes this long before the end.")
@click.option("--warn-signal", help="Signal sent at --warn time (default SIGUSR1).")
@click.option("--start", help="Book ahead: +2h, 09:00, 'tomorrow 09:00', 2026-12-01T09:00.")
@click.option(
    "--repeat",
    type=click.Choice(["daily", "weekdays"]),
    help="Repeat the booking every day (or weekday) until --until.",
)
@click.option("--until", "until", help="Last day of a --repeat (YYYY-MM-DD).")
@click.option("--wait", is_flag=True, help="If it does not fit now, wait in the fair queue.")
@click.option("--timeout", help="With --wait: give up after this long (e.g. 10m).")
@json_option
def create(
    device: int,
    memory: str,
    duration: str,
    user: str | None,
    grace: str | None,
    warn: str | None,
    warn_signal: str | None,
    start: str | None,
    repeat: str | None,
    until: str | None,
    wait: bool,
    timeout: str | None,
    as_json: bool,
) -> None:
    """Reserve MEMORY of GPU DEVICE for DURATION.

    MEMORY: a fraction (0.5), a percent (50%) or a size (40GiB, 512MiB).
    DURATION: seconds (3600) or 90s, 45m, 2h, 1h30m.
    The partition lives until it expires or is released.
    """
    from chronos.units import parse_duration, parse_start

    if warn_signal and not warn:
        raise BadRequest("--warn-signal needs --warn")
    if (repeat is None) != (until is None):
        raise BadRequest("--repeat and --until go together")
    if wait and start:
        raise BadRequest("--wait is for requests that start now; --start books ahead")
    now = time.time()
    starts_at = parse_start(start, now) if start else None
    options = dict(
        device=device,
        memory=memory,
        duration=duration,
        user=user,
        persist=True,
        grace=grace,
        warn=warn,
        warn_signal=warn_signal,
        kind="cli",
    )
    client = _client()
    if repeat is not None:
        assert until is not None
        if starts_at is None:
            raise BadRequest("--repeat needs --start (the first day's start time)")
        sys.exit(_create_repeated(client, options, starts_at, repeat, until, as_json))
    wait_s = parse_duration(timeout) if timeout else None
    if timeout and not wait:
        raise BadRequest("--timeout goes with --wait")
    on_wait = WaitDisplay(as_json) if wait else None
    p = client.create(**options, start=starts_at, wait=wait, timeout=wait_s, on_wait=on_wait)
    if on_wait is not None:
        on_wait.done()
    if as_json:
        emit_json(p.to_json())
    else:
        verb = "booked" if p.record.state_at(time.time()) == BOOKED else "created"
        click.echo(f"{verb} " + describe(p.record, time.time()))


def _create_repeated(
    client: Any, options: dict[str, Any], first: float, repeat: str, until: str, as_json: bool
) -> int:
    """One booking per day from ``first`` to ``until``; report the days that did not fit."""
    from datetime import datetime, timedelta

    from chronos.units import parse_date

    last = parse_date(until)
    day = datetime.fromtimestamp(first)  # local wall time: 09:00 stays 09:00 across DST
    made, failed = [], []
    while day.astimezone() <= last:
        if repeat == "daily" or day.weekday() < 5:
            start = day.astimezone()  # this day's own UTC offset
            try:
                made.append(client.create(**options, start=start.timestamp()).to_json())
            except ChronosError as exc:
                failed.append({"start": start.isoformat(), "error": str(exc)})
        day += timedelta(days=1)
    if as_json:
        emit_json({"booked": made, "failed": failed})
    else:
        for item in made:
            click.echo(f"booked {item['id']}: GPU {item['device']} from {item['starts_at']}")
        for item in failed:
            click.echo(f"not booked {item['start']}: {item['error']}", err=True)
        click.echo(f"{len(made)} booked, {len(failed)} did not fit")
    return 0 if not failed else AdmissionRefused.exit_code


class WaitDisplay:
    """Shows a waiting request's place in the queue: in place on a terminal, else as lines."""

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.last = ""

    def __call__(self, status: dict[str, Any]) -> None:
        if self.quiet:
            return
        line = self.describe(status)
        if self.tty:
            sys.stderr.write("\r\x1b[K" + line)
            sys.stderr.flush()
        elif line != self.last:
            click.echo(line, err=True)
        self.last = line

    @staticmethod
    def describe(status: dict[str, Any]) -> str:
        now = time.time()
        est = status.get("estimated_start")
        when = (
            "unknown"
            if est is None
            else f"{local_clock(est)} (in {format_duration(max(0.0, est - now))})"
        )
        blockers = ", ".join(status.get("waiting_for") or []) or "waiting requests ahead"
        return (
            f"waiting: position {status.get('position', '?')} in the queue, for {blockers}; "
            f"estimated start {when} [Ctrl-C leaves the queue]"
        )

    def done(self) -> None:
        if self.tty and self.last and not self.quiet:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


@cli.command()
@json_option
def queue(as_json: bool) -> None:
    """Show the requests waiting for GPU capacity, in the order they will be served."""
    items = _client().queue()
    if as_json:
        emit_json(items)
        return
    if not items:
        click.echo("no waiting requests")
        return
    rows = [
        [
            q["ticket"],
            str(q["device"]),
            str(q["position"]),
            q["user"],
            f"{q['memory_fraction']:.1%} ({format_bytes(q['memory_bytes'])})",
            format_duration(q["duration_s"]),
            format_duration(q["waited_s"]),
            local_clock(q["estimated_start"]) if q["estimated_start"] else "unknown",
        ]
        for q in items
    ]
    click.echo(
        table(["TICKET", "GPU", "POS", "USER", "MEMORY", "DURATION", "WAITED", "EST. START"], rows)
    )


@cli.command()
@click.option("--device", type=int, help="Only this GPU.")
@click.option("--days", default=1.0, show_default=True, help="How far ahead to show.")
@json_option
def calendar(device: int | None, days: float, as_json: bool) -> None:
    """Bookings, active partitions and the queue per GPU, as a timeline."""
    from chronos.cli_calendar import render_calendar

    client = _client()
    records = [p.record for p in client.list()]
    waiting = client.queue()
    if device is not None:
        records = [r for r in records if r.device == device]
        waiting = [q for q in waiting if q["device"] == device]
    if as_json:
        emit_json({"partitions": [r.to_json() for r in records], "queue": waiting})
        return
    click.echo(render_calendar(records, waiting, time.time(), days * 86400.0))


@cli.command()
@click.option("--since", default="7d", show_default=True, help="How far back (e.g. 24h, 30d).")
@click.option("--user", help="Only this user.")
@json_option
def usage(since: str, user: str | None, as_json: bool) -> None:
    """GPU-hours reserved and used per user, and how their partitions ended."""
    from chronos.units import parse_duration

    cutoff = time.time() - parse_duration(since, float("inf"))
    rows = _client().transport.call("usage", since=cutoff, user=user)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no usage in that period")
        return
    headers = [
        "USER",
        "GPU-H RESERVED",
        "GPU-H USED",
        "CREATED",
        "RELEASED EARLY",
        "EXPIRED",
        "REFUSED",
        "KILLED (MEMORY)",
    ]
    click.echo(
        table(
            headers,
            [
                [
                    r["user"],
                    f"{r['gpu_hours_reserved']:.2f}",
                    f"{r['gpu_hours_used']:.2f}" if r["used_measured_partitions"] else "n/a",
                    str(r["created"]),
                    str(r["released_early"]),
                    str(r["expired"]),
                    str(r["refused"]),
                    str(r["killed_for_memory"]),
                ]
                for r in rows
            ],
        )
    )


@cli.group()
def config() -> None:
    """The machine policy file."""


@config.command(name="check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@json_option
def config_check(path: str | None, as_json: bool) -> None:
    """Validate the policy file (default $CHRONOS_CONFIG or /etc/chronos/config.toml)."""
    from dataclasses import asdict
    from pathlib import Path

    from chronos.config import config_path, load_config

    where = Path(path) if path else config_path()
    effective = asdict(load_config(where))
    if as_json:
        emit_json({"path": str(where), "exists": where.exists(), "policy": effective})
        return
    state = "ok" if where.exists() else "not found: built-in defaults apply"
    click.echo(f"{where}: {state}")
    for key, value in effective.items():
        click.echo(f"  {key} = {json.dumps(value)}")


@cli.command(name="list")
@click.option("--all", "show_all", is_flag=True, help="Include released and expired partitions.")
@json_option
def list_(show_all: bool, as_json: bool) -> None:
    """Show the partitions of this machine."""
    records = [p.record for p in _client().list(all=show_all)]
    now = time.time()
    if as_json:
        emit_json([r.to_json(now) for r in records])
        return
    if not records:
        click.echo("no active partitions" if not show_all else "no partitions")
        return
    headers = ["ID", "GPU", "MEMORY", "USER", "CREATED", "EXPIRES", "REMAINING"]
    if show_all:
        headers.append("STATE")
    rows = []
    for r in records:
        row = [
            r.id,
            str(r.device),
            f"{r.memory_fraction:.1%} ({format_bytes(r.memory_bytes)})",
            r.user,
            local_clock(r.created_at),
            local_clock(r.expires_at),
            format_duration(r.time_remaining_at(now)),
        ]
        if show_all:
            row.append(r.state_at(now))
        rows.append(row)
    click.echo(table(headers, rows))


@cli.command()
@click.argument("partition_id", metavar="ID")
@json_option
def release(partition_id: str, as_json: bool) -> None:
    """End partition ID now."""
    client = _client()
    client.release(partition_id)
    record = client.get(partition_id).record
    if as_json:
        emit_json(record.to_json())
    else:
        click.echo("released " + describe(record, time.time()))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("partition_id", metavar="ID")
@click.argument("duration")
@json_option
def extend(partition_id: str, duration: str, as_json: bool) -> None:
    """Make partition ID last DURATION longer, if capacity allows."""
    p = _client().get(partition_id)
    p.extend(duration)
    if as_json:
        emit_json(p.to_json())
    else:
        click.echo("extended " + describe(p.record, time.time()))


@cli.command()
@click.argument("partition_id", metavar="ID")
@click.argument("pid", type=int)
@json_option
def attach(partition_id: str, pid: int, as_json: bool) -> None:
    """Count process PID (and its children) toward partition ID."""
    _client().get(partition_id).attach(pid)
    if as_json:
        emit_json({"id": partition_id, "pid": pid})
    else:
        click.echo(f"attached process {pid} to partition {partition_id}")


@cli.command()
@click.option("--since", help="Only events newer than this (e.g. 1h, 7d).")
@click.option("--id", "partition_id", help="Only events of this partition.")
@json_option
def events(since: str | None, partition_id: str | None, as_json: bool) -> None:
    """Show the ledger's history (created, released, expired, refused …)."""
    from chronos.units import parse_duration

    cutoff = time.time() - parse_duration(since, float("inf")) if since else None
    items = _client().transport.call("events", since=cutoff, id=partition_id)
    if as_json:
        emit_json(items)
        return
    rows = [
        [
            e["at"][:23],
            e["kind"],
            e["partition_id"] or "-",
            e["user"] or "-",
            json.dumps(e["detail"]),
        ]
        for e in items
    ]
    click.echo(table(["AT", "EVENT", "PARTITION", "BY", "DETAIL"], rows))


@cli.command()
@click.option("--watch", is_flag=True, help="Refresh in place until interrupted.")
@click.option("--interval", default=1.0, show_default=True, help="Seconds between refreshes.")
@json_option
def stats(watch: bool, interval: float, as_json: bool) -> None:
    """Show each GPU: memory, committed partitions and the processes using it."""
    from chronos.cli_stats import render_stats, watch_stats

    client = _client()
    if watch:
        watch_stats(client, interval)
        return
    data = client.transport.call("stats")
    if as_json:
        emit_json(data["devices"])
    else:
        click.echo(render_stats(data))


@cli.command(context_settings={"ignore_unknown_options": True, "allow_interspersed_args": False})
@click.option("--device", default=0, show_default=True, type=int, help="GPU index.")
@click.option("--memory", required=True, help="Fraction, percent or size (0.25, 25%, 20GiB).")
@click.option("--duration", required=True, help="How long (3600, 2h, 1h30m).")
@click.option("--grace", help="Delay between SIGTERM and SIGKILL at expiry (default 30s).")
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="When COMMAND ends, print a JSON summary (partition, exit code, why).",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    device: int,
    memory: str,
    duration: str,
    grace: str | None,
    as_json: bool,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND inside a new partition; release it when COMMAND exits.

    Exits with COMMAND's status, or 124 if the partition's end stopped it.
    Example: chronos run --memory 0.25 --duration 2h -- python train.py
    """
    from chronos.supervisor import run_in_partition

    code, summary = run_in_partition(device, memory, duration, grace, list(command))
    if as_json:
        emit_json(summary)
    sys.exit(code)


@cli.command()
@click.option(
    "--bind",
    metavar="HOST:PORT",
    help="Address to serve on (default 127.0.0.1:8080, this machine only; a "
    "non-loopback address exposes the page to the network).",
)
def dashboard(bind: str | None) -> None:
    """Serve a live, read-only web page of the GPUs, partitions, queue and processes."""
    from chronos.dashboard.server import run_dashboard

    sys.exit(run_dashboard(bind))


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("args", nargs=-1, type=click.UNPROCESSED)
def daemon(args: tuple[str, ...]) -> None:
    """Run chronosd, the per-machine authority (see chronosd --help)."""
    from chronos.daemon.main import main as daemon_main

    sys.exit(daemon_main(list(args)))


from chronos.slurm.cli import slurm as _slurm  # noqa: E402 - its commands import lazily

cli.add_command(_slurm)  # chronos slurm …: docs/SLURM.md


def main(argv: Sequence[str] | None = None) -> int:
    try:
        cli.main(args=argv, prog_name="chronos", standalone_mode=False)
    except ChronosError as exc:
        click.echo(f"chronos: error: {exc}", err=True)
        return exc.exit_code
    except click.exceptions.Abort:
        click.echo("chronos: interrupted", err=True)
        return 130
    except click.ClickException as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} --help')"
        click.echo(f"chronos: error: {exc.format_message()}{hint}", err=True)
        return exc.exit_code
    except KeyboardInterrupt:
        click.echo("chronos: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
