"""The ``chronos`` command line.

Every command prints a human table by default and JSON with ``--json``.
Errors are one line on stderr (a JSON object there under ``--json``) and a
non-zero exit code; docs/CLI.md has the table of codes. ``chronos list`` and
``chronos stats`` through the daemon take a fast path that skips click
(cli_fast.py); everything here imports the API, the models and the units only
inside the command that needs them, so start-up stays short.
"""

from __future__ import annotations

import json
import os
import sys
import time
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

import click

from chronos import cli_render as render
from chronos.errors import (
    RUN_FAILED_EXIT,
    AdmissionRefused,
    BadRequest,
    ChronosError,
    CommandNotRunnable,
)

if TYPE_CHECKING:
    from chronos.api import Partitioner
    from chronos.models import PartitionRecord

F = TypeVar("F", bound=Callable[..., Any])

STATES = ("booked", "active", "released", "expired")
MIN_WATCH_INTERVAL_S = 0.2
"""``stats --watch`` refreshes at most five times a second (0 used to busy-loop)."""
MAX_CALENDAR_DAYS = 366.0


def finite(ctx: click.Context, param: click.Parameter, value: float | None) -> float | None:
    """Refuse NaN and infinity, which click's FloatRange lets through."""
    import math

    if value is not None and not math.isfinite(value):
        raise click.BadParameter(f"{value} is not a finite number")
    return value


def _client() -> Partitioner:
    from chronos.api import Partitioner

    return Partitioner()


def json_option(func: F) -> F:
    return click.option("--json", "as_json", is_flag=True, help="Print JSON.")(func)


def emit_json(data: Any) -> None:
    click.echo(json.dumps(data, indent=2))


def iso(ts: float | None) -> str | None:
    from chronos.units import iso as to_iso

    return to_iso(ts)


def describe(record: PartitionRecord, now: float) -> str:
    state = record.state_at(now)
    head = (
        f"partition {record.id}: GPU {render.gpus(record.devices)}, "
        f"{render.size(record.memory_bytes)}{' each' if record.more_shares else ''} "
        f"({record.memory_fraction:.1%}), user {record.user}"
    )
    if state == "booked":
        return (
            f"{head}, booked from {render.when(record.starts_at)} "
            f"until {render.when(record.expires_at)}"
        )
    if state == "active":
        return (
            f"{head}, until {render.when(record.expires_at)} "
            f"({render.span(record.expires_at - now)} left)"
        )
    return f"{head}, {state} at {render.when(record.ended_at or record.expires_at)}"


def interpretation(memory: str, duration: str, record: PartitionRecord) -> str:
    """How the typed MEMORY and DURATION were read, for the confirmation line."""
    notes = []
    text = duration.strip()
    if text.replace(".", "", 1).isdigit():
        length = record.expires_at - record.starts_at
        notes.append(f"{text} → {render.span(length)} (a bare number is seconds)")
    mem = memory.strip()
    if mem[-1:].isalpha() and not mem.lower().endswith("ib"):  # 40G, 40GB: say which it was
        notes.append(f"{mem} → {render.size(record.memory_bytes)}")
    return "; ".join(notes)


# ---------------------------------------------------------------------- group


class ClusterAware(click.Command):
    """A local command whose ``--cluster`` form is its Slurm twin in chronos/slurm/cli.py.

    ``chronos run --cluster …`` is parsed and run by ``chronos slurm run`` (srun), and so
    on: one implementation each, and each form's --help lists its own options.
    """

    twin: str = ""

    def make_context(
        self,
        info_name: str | None,
        args: list[str],
        parent: click.Context | None = None,
        **extra: Any,
    ) -> click.Context:
        at = self._cluster_flag(args)
        if at is None:
            return super().make_context(info_name, args, parent=parent, **extra)
        from chronos.slurm.cli import slurm

        twin = slurm.commands[self.twin]
        rest = args[:at] + args[at + 1 :]
        return twin.make_context(info_name, rest, parent=parent, **extra)

    def _cluster_flag(self, args: Sequence[str]) -> int | None:
        """Where ``--cluster`` is among this command's own options (not COMMAND's)."""
        takes_value = {
            name
            for p in self.params
            if isinstance(p, click.Option) and not p.is_flag and not p.count
            for name in p.opts
        }
        skip = False
        for i, arg in enumerate(args):
            if skip:
                skip = False
            elif arg == "--cluster":
                return i
            elif arg == "--":
                return None
            elif arg in takes_value:
                skip = True
            elif not arg.startswith("-") and not self.allow_interspersed_args:
                return None  # COMMAND has begun: its own --cluster is its business
        return None


def cluster_option(what: str) -> Callable[[F], F]:
    """``--cluster`` in the local form's help (the flag itself is read by ClusterAware)."""
    return click.option("--cluster", is_flag=True, expose_value=False, help=what)


class ChronosGroup(click.Group):
    """Prints help, and exits 0, when no subcommand is given (instead of an error)."""

    def parse_args(self, ctx: click.Context, args: list[str]) -> list[str]:
        if not args:
            click.echo(ctx.get_help())
            ctx.exit(0)
        return super().parse_args(ctx, args)


@click.group(cls=ChronosGroup, context_settings={"help_option_names": ["-h", "--help"]})
@click.version_option(package_name="chronos-gpu", prog_name="chronos")
def cli() -> None:
    """Reserve a share of a GPU's memory for a span of time, on a shared machine.

    Exit codes: 0 success; 2 bad input; 3 refused (no capacity or over a quota); 4 no such
    partition; 5 not allowed; 6 already ended; 7 daemon unreachable; 9 GPU error; 10 timed
    out. chronos run: the command's own status, 124 stopped at the partition's end, 125
    Chronos failed (chronos submit too), 126 command not executable, 127 command not
    found. On a Slurm login node: chronos submit, and --cluster. See docs/CLI.md.
    """


def partition_ids(ctx: click.Context, param: click.Parameter, incomplete: str) -> list[Any]:
    """Shell completion of partition ids (and series ids, queue tickets) from the ledger."""
    from click.shell_completion import CompletionItem

    try:
        client = _client()
        records = [p.record for p in client.list(all=True)]
        items = [
            CompletionItem(r.id, help=f"GPU {r.device} {r.user} {r.state}")
            for r in records
            if r.id.startswith(incomplete)
        ]
        series = {r.series: r.user for r in records if r.series}
        items += [
            CompletionItem(s, help=f"series, {user}")
            for s, user in sorted(series.items())
            if s.startswith(incomplete)
        ]
        items += [
            CompletionItem(q["ticket"], help=f"queued, GPU {q['device']} {q['user']}")
            for q in client.queue()
            if q["ticket"].startswith(incomplete)
        ]
        client.close()
        return items
    except ChronosError:
        return []


# --------------------------------------------------------------------- create


# ignore_unknown_options: "-1" is a (bad) MEMORY, and should be told so, not "no such option".
@cli.command(cls=ClusterAware, context_settings={"ignore_unknown_options": True})
@cluster_option("On the Slurm cluster: salloc with --memory (see chronos create --cluster --help).")
@click.argument("args", nargs=-1, metavar="[DEVICE] MEMORY DURATION")
@click.option(
    "--gpus",
    type=click.IntRange(min=1),
    help="A group of this many GPUs, chosen by Chronos (leave out DEVICE).",
)
@click.option("--device", "device_option", help="DEVICE as an option (auto: Chronos picks).")
@click.option("--user", help="Owner of the partition (administrators only).")
@click.option("--grace", help="Delay between SIGTERM and SIGKILL at expiry (default 30s).")
@click.option("--warn", help="Signal the partition's processes this long before the end.")
@click.option("--warn-signal", help="Signal sent at --warn time (default SIGUSR1).")
@click.option("--start", help="Book ahead: +2h, 09:00, 'tomorrow 09:00', 2026-12-01T09:00.")
@click.option(
    "--repeat",
    type=click.Choice(["daily", "weekdays"]),
    help="Repeat the booking every day (or weekday) until --until (one series id for all).",
)
@click.option("--until", "until", help="Last day of a --repeat (YYYY-MM-DD).")
@click.option("--wait", is_flag=True, help="If it does not fit now, wait in the fair queue.")
@click.option("--timeout", help="With --wait: give up after this long (e.g. 10m).")
@json_option
def create(
    args: tuple[str, ...],
    gpus: int | None,
    device_option: str | None,
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

    DEVICE: a GPU index (0), several (0,1: a group, granted on all at once or not at
    all), or auto (Chronos picks one); --gpus N instead: any N GPUs, Chronos picks.
    MEMORY: a fraction (0.5), a percent (50%) or a size (40G = 40GiB, 512MiB), of each GPU.
    DURATION: seconds (3600) or 90s, 45m, 2h, 1h30m, 1d, or Slurm's forms (1-12:00:00).
    The partition lives until it expires or is released.
    """
    from chronos.api import start_timestamp

    gpu_options, memory, duration = _create_arguments(args, gpus, device_option)
    if warn_signal and not warn:
        raise BadRequest("--warn-signal needs --warn")
    if (repeat is None) != (until is None):
        raise BadRequest("--repeat and --until go together")
    if wait and start:
        raise BadRequest("--wait is for requests that start now; --start books ahead")
    if timeout and not wait:
        raise BadRequest("--timeout goes with --wait")
    _check_warn(warn, duration)
    now = time.time()
    starts_at = start_timestamp(start, now) if start else None
    # The options as the API's create takes them (checked there, or by chronosd).
    options: dict[str, Any] = dict(
        **gpu_options,
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
    on_wait = WaitDisplay(as_json) if wait else None
    p = client.create(**options, start=starts_at, wait=wait, timeout=timeout, on_wait=on_wait)
    if on_wait is not None:
        on_wait.done()
    if as_json:
        emit_json(p.to_json())
        return
    verb = "booked" if p.record.state_at(time.time()) == "booked" else "created"
    click.echo(f"{verb} " + describe(p.record, time.time()))
    note = interpretation(memory, duration, p.record)
    if note:
        click.echo(f"  ({note})")


def _create_arguments(
    args: tuple[str, ...], gpus: int | None, device_option: str | None
) -> tuple[dict[str, Any], str, str]:
    """``create``'s GPUs (as ``Partitioner.create`` takes them), MEMORY and DURATION."""
    named = device_option is not None or gpus is not None
    want = 2 if named else 3
    if len(args) != want:
        form = "MEMORY DURATION" if named else "DEVICE MEMORY DURATION"
        raise BadRequest(f"chronos create takes {form} ({len(args)} given)")
    if device_option is not None and gpus is not None:
        raise BadRequest("--gpus N chooses the GPUs: leave out --device")
    if gpus is not None:
        return {"gpus": gpus}, args[0], args[1]
    text = device_option if device_option is not None else args[0]
    return gpu_arguments(text), args[-2], args[-1]


def gpu_arguments(text: str) -> dict[str, Any]:
    """DEVICE as typed (``0``, ``0,1``, ``auto``) as ``Partitioner.create``'s arguments."""
    text = text.strip()
    if text == "auto":
        return {"device": "auto"}
    parts = text.split(",")
    if not all(p.strip().isdigit() for p in parts):
        raise BadRequest(f"DEVICE must be a GPU index (0), several (0,1) or auto, not {text!r}")
    indices = [int(p) for p in parts]
    if len(indices) == 1:
        return {"device": indices[0]}
    return {"devices": indices}


def _check_warn(warn: str | None, duration: str) -> None:
    """A warning must come before the end: not as long as the partition, or longer."""
    if not warn:
        return
    from chronos.units import parse_duration

    try:
        length = parse_duration(duration, float("inf"))
    except BadRequest:
        return  # the service names what is wrong with DURATION
    ahead = parse_duration(warn, float("inf"))
    if ahead >= length:
        raise BadRequest(
            f"--warn {warn} is not shorter than the partition ({render.span(length)}): "
            "the warning would come before it starts"
        )


def _create_repeated(
    client: Partitioner,
    options: dict[str, Any],
    first: float,
    repeat: str,
    until: str,
    as_json: bool,
) -> int:
    """One booking per day from ``first`` to ``until``; report the days that did not fit."""
    from datetime import datetime, timedelta

    from chronos.models import new_series_id
    from chronos.units import parse_date

    last = parse_date(until)
    if last.timestamp() < time.time():
        raise BadRequest(f"--until {until} is in the past")
    day = datetime.fromtimestamp(first)  # local wall time: 09:00 stays 09:00 across DST
    if day.astimezone() > last:
        raise BadRequest(f"--until {until} is before the first start, {render.when(first)}")
    series = new_series_id()
    made: list[PartitionRecord] = []
    failed: list[tuple[str, ChronosError]] = []
    while day.astimezone() <= last:
        if repeat == "daily" or day.weekday() < 5:
            start = day.astimezone()  # this day's own UTC offset
            try:
                made.append(client.create(**options, start=start.timestamp(), series=series).record)
            except ChronosError as exc:
                failed.append((start.isoformat(), exc))
        day += timedelta(days=1)
    _show_series(series, made, failed, as_json)
    return 0 if not failed else AdmissionRefused.exit_code


class _DayNotBooked(ChronosError):
    """One day of a series that was not booked: the day's own error, named by its day."""

    def __init__(self, day: str, cause: ChronosError) -> None:
        super().__init__(f"not booked {day}: {cause}")
        self.code, self.exit_code = cause.code, cause.exit_code


def _show_series(
    series: str,
    made: list[PartitionRecord],
    failed: list[tuple[str, ChronosError]],
    as_json: bool,
) -> None:
    """A series as a single booking is shown, once per booking; the days that did not fit
    as errors (JSON on stderr under --json), and the series id that releases them all."""
    now = time.time()
    if as_json:
        emit_json([r.to_json(now) for r in made])
    else:
        for record in made:
            click.echo("booked " + describe(record, now))
    for day, exc in failed:
        report_error(_DayNotBooked(day, exc))
    if not as_json:
        click.echo(
            f"series {series}: {len(made)} booked, {len(failed)} did not fit "
            f"(chronos release {series} ends every booking of it)"
        )


class WaitDisplay:
    """Shows a waiting request's place in the queue.

    On a terminal: one line, redrawn in place and cut to the terminal's width.
    Off a terminal: a line only when the position, the blockers or the estimate change.
    """

    def __init__(self, quiet: bool) -> None:
        self.quiet = quiet
        self.tty = sys.stderr.isatty()
        self.shown = False
        self.last_key: tuple[Any, ...] | None = None

    def __call__(self, status: dict[str, Any]) -> None:
        if self.quiet:
            return
        if self.tty:
            width = render.terminal_width(sys.stderr)
            sys.stderr.write("\r\x1b[K" + render.fit(self.describe(status), width - 1))
            sys.stderr.flush()
            self.shown = True
            return
        key = self.key(status)
        if key != self.last_key:
            click.echo(self.describe(status), err=True)
            self.last_key = key

    @staticmethod
    def key(status: dict[str, Any]) -> tuple[Any, ...]:
        est = status.get("estimated_start")
        return (
            status.get("position"),
            tuple(status.get("waiting_for") or ()),
            None if est is None else round(est),
        )

    @staticmethod
    def describe(status: dict[str, Any]) -> str:
        now = time.time()
        est = status.get("estimated_start")
        when = "unknown" if est is None else f"{render.when(est)} (in {render.span(est - now)})"
        blockers = ", ".join(status.get("waiting_for") or []) or "waiting requests ahead"
        return (
            f"waiting: position {status.get('position', '?')} in the queue, for {blockers}; "
            f"estimated start {when} [Ctrl-C leaves the queue]"
        )

    def done(self) -> None:
        if self.tty and self.shown and not self.quiet:
            sys.stderr.write("\r\x1b[K")
            sys.stderr.flush()


# ---------------------------------------------------------------------- queue


def queue_json(q: dict[str, Any]) -> dict[str, Any]:
    """A queue entry with ISO-8601 times, as every other --json time."""
    return {
        **q,
        "enqueued_at": iso(q.get("enqueued_at")),
        "estimated_start": iso(q.get("estimated_start")),
    }


@cli.command()
@json_option
def queue(as_json: bool) -> None:
    """Show the requests waiting for GPU capacity, in the order they will be served."""
    items = _client().queue()
    if as_json:
        emit_json([queue_json(q) for q in items])
        return
    if not items:
        click.echo("no waiting requests")
        return
    columns = render.columns(
        f"TICKET|>GPU|>POS|~USER|>MEMORY|>DURATION|>WAITED|EST. START {render.zone()}"
    )
    rows = [
        [
            q["ticket"],
            render.gpus(q.get("devices") or [q["device"]]),
            str(q["position"]),
            q["user"],
            render.size(q["memory_bytes"]),
            render.span(q["duration_s"]),
            render.span(q["waited_s"]),
            render.clock(q["estimated_start"]) if q["estimated_start"] else "unknown",
        ]
        for q in items
    ]
    click.echo(render.table(columns, rows, width=render.table_width()))


@cli.command()
@click.argument(
    "tickets", nargs=-1, required=True, metavar="TICKET|JOB...", shell_complete=partition_ids
)
@json_option
def cancel(tickets: tuple[str, ...], as_json: bool) -> None:
    """Take queued requests out of the queue, or cancel batch jobs (waiting or running).

    Any unique prefix of a ticket or a job id works. A series id (from create --repeat)
    ends every booking of the series not yet ended.
    """
    from chronos.models import SERIES_PREFIX

    client = _client()

    def cancel_one(text: str) -> dict[str, Any]:
        if text.strip().startswith(SERIES_PREFIX):  # a series: its bookings not yet ended
            records = client.release_series(client.resolve(text))
            return {"series": records[0].series, "released": [r.to_json() for r in records]}
        return client.cancel(text)

    done, failures = _each(tickets, cancel_one)
    if as_json and done:
        emit_json(done)
    else:
        for status in done:
            if "series" in status:
                click.echo(f"released series {status['series']} ({len(status['released'])})")
            elif "ticket" in status:
                click.echo(f"cancelled queued request {status['ticket']}")
            else:
                click.echo(f"cancelled job {status['id']}")
    _exit_for(failures)


def _each(
    ids: Sequence[str], act: Callable[[str], Any]
) -> tuple[list[Any], list[tuple[str, ChronosError]]]:
    """``act`` on every id; collect the results and, per id, the errors (all ids are tried)."""
    done, failures = [], []
    for text in ids:
        try:
            done.append(act(text))
        except ChronosError as exc:
            failures.append((text, exc))
    return done, failures


def _exit_for(failures: list[tuple[str, ChronosError]]) -> None:
    """Report each failed id, in order; exit with the first failure's code (none: return)."""
    if not failures:
        return
    for _text, exc in failures:
        report_error(exc)
    sys.exit(failures[0][1].exit_code)


# ------------------------------------------------------------------- calendar


@cli.command()
@click.option("--device", type=click.IntRange(min=0), help="Only this GPU.")
@click.option(
    "--days",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=0, max=MAX_CALENDAR_DAYS, min_open=True),
    callback=finite,
    help="How far ahead to show (more than 0, at most a year).",
)
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
        emit_json(
            {
                "partitions": [r.to_json() for r in records],
                "queue": [queue_json(q) for q in waiting],
            }
        )
        return
    click.echo(render_calendar(records, waiting, time.time(), days * 86400.0))


# ---------------------------------------------------------------------- usage


@cli.command()
@click.option("--since", default="7d", show_default=True, help="How far back (e.g. 24h, 30d).")
@click.option("--user", help="Only this user.")
@json_option
def usage(since: str, user: str | None, as_json: bool) -> None:
    """GPU-hours reserved and used per user, and how their partitions ended."""
    from chronos.units import parse_duration

    cutoff = time.time() - parse_duration(since, float("inf"))
    rows = _client().usage(since=cutoff, user=user)
    if as_json:
        emit_json(rows)
        return
    if not rows:
        click.echo("no usage in that period")
        return
    columns = render.columns(
        "~USER|>GPU-H RESERVED|>GPU-H USED|>CREATED|>RELEASED|>EXPIRED|>REFUSED|>KILLED"
    )
    body = [
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
    ]
    click.echo(render.table(columns, body, width=render.table_width()))
    click.echo("RELEASED: released early; KILLED: stopped for holding more than their memory")


# --------------------------------------------------------------------- config


@cli.group(cls=ChronosGroup)
def config() -> None:
    """The machine policy file."""


@config.command(name="check")
@click.argument("path", required=False, type=click.Path(dir_okay=False))
@json_option
def config_check(path: str | None, as_json: bool) -> None:
    """Validate the policy file (default $CHRONOS_CONFIG or /etc/chronos/config.toml).

    Prints the effective policy, built-in defaults included, in the file's own syntax.
    """
    from dataclasses import asdict
    from pathlib import Path

    from chronos.config import config_path, load_config, to_toml

    where = Path(path) if path else config_path()
    policy = load_config(where, missing_ok=path is None)  # a FILE named here must exist
    exists = where.exists()
    if as_json:
        emit_json({"path": str(where), "exists": exists, "policy": asdict(policy)})
        return
    click.echo(f"{where}: {'ok' if exists else 'not found: built-in defaults apply'}")
    click.echo("# the effective policy (built-in defaults where the file is silent):")
    click.echo(to_toml(policy), nl=False)


# ----------------------------------------------------------------------- list


def _list_fields(text: str | None) -> tuple[str, ...]:
    if text is None:
        return render.DEFAULT_LIST_FORMAT
    fields = tuple(f.strip().lower() for f in text.split(",") if f.strip())
    unknown = [f for f in fields if f not in render.LIST_FIELDS]
    if unknown or not fields:
        raise BadRequest(
            f"unknown --format field(s) {', '.join(unknown) or '(none)'}; "
            f"choose from {','.join(render.LIST_FIELDS)}"
        )
    return fields


@cli.command(name="list", cls=ClusterAware)
@cluster_option("Your Slurm jobs holding GPU shares, across the cluster (squeue).")
@click.option("--all", "show_all", is_flag=True, help="Include released and expired partitions.")
@click.option("--me", is_flag=True, help="Only my partitions.")
@click.option("--user", help="Only this user's partitions.")
@click.option("--device", type=click.IntRange(min=0), help="Only this GPU's partitions.")
@click.option(
    "--state",
    "states",
    multiple=True,
    type=click.Choice(STATES),
    help="Only partitions in this state (repeatable); released/expired imply --all.",
)
@click.option(
    "--format",
    "fields",
    metavar="FIELD,...",
    help=f"Columns to show, in order: {','.join(render.LIST_FIELDS)}.",
)
@click.option("--no-header", is_flag=True, help="Leave out the header line (for scripts).")
@json_option
def list_(
    show_all: bool,
    me: bool,
    user: str | None,
    device: int | None,
    states: tuple[str, ...],
    fields: str | None,
    no_header: bool,
    as_json: bool,
) -> None:
    """Show the partitions of this machine (active and booked; --all: ended ones too)."""
    columns = _list_fields(fields)
    if me and user:
        raise BadRequest("--me and --user name the owner twice: give one")
    if me:
        import pwd

        user = pwd.getpwuid(os.getuid()).pw_name
    include_ended = show_all or any(s in ("released", "expired") for s in states)
    client = _client()
    wire = client.records(all=include_ended)
    now = time.time()
    records = [
        r
        for r in wire
        if (user is None or r["user"] == user)
        and (device is None or device in render.wire_devices(r))
        and (not states or render.state_at(r, now) in states)
    ]
    print_list(
        records,
        now,
        columns,
        as_json=as_json,
        header=not no_header,
        any_filter=bool(user or device is not None or states),
        show_all=include_ended,
    )


def print_list(
    records: list[dict[str, Any]],
    now: float,
    columns: Sequence[str],
    *,
    as_json: bool,
    header: bool,
    any_filter: bool,
    show_all: bool,
) -> None:
    if as_json:
        from chronos.models import PartitionRecord

        emit_json([PartitionRecord.from_wire(r).to_json(now) for r in records])
        return
    if not records:
        if header:  # a script that asked for no header wants no chatter either
            what = "partitions" if show_all else "active partitions"
            click.echo(f"no {what}" + (" match" if any_filter else ""))
        return
    click.echo(
        render.render_list(
            records,
            now,
            columns,
            header=header,
            colour=render.use_colour(),
            width=render.table_width(),
        )
    )


# ------------------------------------------------------- release, extend, ...


@cli.command(name="get")
@click.argument("partition_id", metavar="ID", shell_complete=partition_ids)
@json_option
def get_(partition_id: str, as_json: bool) -> None:
    """Show partition ID (any unique prefix of it)."""
    p = _client().get(partition_id)
    if as_json:
        emit_json(p.to_json())
    else:
        click.echo(describe(p.record, time.time()))


@cli.command()
@click.argument("ids", nargs=-1, required=True, metavar="ID...", shell_complete=partition_ids)
@json_option
def release(ids: tuple[str, ...], as_json: bool) -> None:
    """End partitions now (any unique prefix of an id works).

    A series id (from create --repeat) ends every booking of the series not yet ended.
    """
    from chronos.models import is_series_id

    client = _client()

    def end(text: str) -> list[PartitionRecord]:
        full = client.resolve(text)
        if is_series_id(full):
            return client.release_series(full)
        client.release(full)
        return [client.get(full).record]

    ended, failures = _each(ids, end)
    done = [record for records in ended for record in records]
    now = time.time()
    if as_json and done:
        single = len(ids) == 1 and len(done) == 1 and not is_series_id(done[0].series or "")
        emit_json(done[0].to_json() if single else [r.to_json() for r in done])
    else:
        for record in done:
            click.echo("released " + describe(record, now))
    _exit_for(failures)


@cli.command(context_settings={"ignore_unknown_options": True})
@click.argument("partition_id", metavar="ID", shell_complete=partition_ids)
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
@click.argument("partition_id", metavar="ID", shell_complete=partition_ids)
@click.argument("pid", type=int)
@json_option
def attach(partition_id: str, pid: int, as_json: bool) -> None:
    """Count process PID (and its children) toward partition ID."""
    p = _client().get(partition_id)
    p.attach(pid)
    if as_json:
        emit_json({"id": p.id, "pid": pid})
    else:
        click.echo(f"attached process {pid} to partition {p.id}")


# --------------------------------------------------------------------- events


def event_json(e: dict[str, Any]) -> dict[str, Any]:
    """An event with every time in it ISO-8601 (the detail's epoch seconds too)."""
    detail = {
        k: iso(v) if k in ("from", "to") or k.endswith("_at") and isinstance(v, int | float) else v
        for k, v in (e.get("detail") or {}).items()
    }
    return {**e, "detail": detail}


@cli.command()
@click.option("--since", help="Only events newer than this (e.g. 1h, 7d).")
@click.option(
    "--id",
    "partition_id",
    shell_complete=partition_ids,
    help="Only events of this partition (or an id prefix).",
)
@json_option
def events(since: str | None, partition_id: str | None, as_json: bool) -> None:
    """Show the ledger's history (created, released, expired, refused …)."""
    from chronos.units import parse_duration

    cutoff = time.time() - parse_duration(since, float("inf")) if since else None
    client = _client()
    if partition_id is not None:
        partition_id = client.resolve(partition_id)
    items = [event_json(e) for e in client.events(since=cutoff, partition_id=partition_id)]
    if as_json:
        emit_json(items)
        return
    from datetime import datetime

    columns = render.columns(
        f"AT {render.zone()}|EVENT|PARTITION|~BY",
        render.Column("DETAIL", squeeze=True, min_width=10),
    )
    rows = [
        [
            render.clock(datetime.fromisoformat(e["at"]).timestamp()),
            e["kind"],
            e["partition_id"] or "-",
            e["user"] or "-",
            json.dumps(e["detail"]) if e["detail"] else "",
        ]
        for e in items
    ]
    click.echo(render.table(columns, rows, width=render.table_width()))


# ---------------------------------------------------------------------- stats


@cli.command(cls=ClusterAware)
@cluster_option("Reserved vs used GPU memory of your Slurm jobs, across the cluster.")
@click.option(
    "--device", "devices", type=click.IntRange(min=0), multiple=True, help="Only this GPU."
)
@click.option("--watch", is_flag=True, help="Refresh in place until interrupted.")
@click.option(
    "--interval",
    default=1.0,
    show_default=True,
    type=click.FloatRange(min=MIN_WATCH_INTERVAL_S),
    callback=finite,
    help=f"Seconds between refreshes (at least {MIN_WATCH_INTERVAL_S}).",
)
@json_option
def stats(devices: tuple[int, ...], watch: bool, interval: float, as_json: bool) -> None:
    """Show each GPU: memory, committed partitions and the processes using it.

    With --json: one object per GPU, each with the mode (daemon or embedded) and its
    backend; with --watch --json, one JSON object per refresh, one per line.
    """
    from chronos.cli_stats import render_stats, stats_json, watch_stats

    client = _client()
    if watch:
        watch_stats(client, interval, list(devices), as_json)
        return
    data = client.stats_report()
    if as_json:
        emit_json(stats_json(data, list(devices)))
    else:
        click.echo(render_stats(data, list(devices)))


# ------------------------------------------------------------------------ run


@cli.command(cls=ClusterAware, context_settings={"allow_interspersed_args": False})
@cluster_option("On the Slurm cluster: srun with --memory (see chronos run --cluster --help).")
@click.option(
    "--device",
    default="0",
    show_default=True,
    help="GPU index, several (0,1: a group), or auto (Chronos picks).",
)
@click.option(
    "--gpus", type=click.IntRange(min=1), help="A group of this many GPUs, chosen by Chronos."
)
@click.option("--memory", help="Fraction, percent or size (0.25, 25%, 20G), of each GPU.")
@click.option("--duration", help="How long (3600, 2h, 1h30m, 1-00:00:00).")
@click.option("--grace", help="Delay between SIGTERM and SIGKILL at expiry (default 30s).")
@click.option("--wait", is_flag=True, help="If it does not fit now, wait in the fair queue.")
@click.option("--timeout", help="With --wait: give up after this long (e.g. 10m).")
@click.option(
    "--reuse",
    is_flag=True,
    help="Inside a partition (CHRONOS_PARTITION_ID set): run in it, reserve nothing new.",
)
@click.option(
    "--json",
    "as_json",
    is_flag=True,
    help="When COMMAND ends, write a JSON summary to stderr (not mixed into its stdout).",
)
@click.option(
    "--json-file",
    type=click.Path(dir_okay=False, writable=True),
    help="When COMMAND ends, write the JSON summary to this file.",
)
@click.argument("command", nargs=-1, required=True, type=click.UNPROCESSED)
def run(
    device: str,
    gpus: int | None,
    memory: str | None,
    duration: str | None,
    grace: str | None,
    wait: bool,
    timeout: str | None,
    reuse: bool,
    as_json: bool,
    json_file: str | None,
    command: tuple[str, ...],
) -> None:
    """Run COMMAND inside a new partition; release it when COMMAND exits.

    Exits with COMMAND's status; 124 if the partition's end stopped it; 125 if Chronos
    itself failed (bad option, no capacity, no daemon); 126 if COMMAND cannot be run,
    127 if it is not found. Options go before COMMAND (or before --).
    Example: chronos run --memory 0.25 --duration 2h -- python train.py
    """
    from chronos.supervisor import check_program, reuse_partition, run_in_partition

    program = check_program(command[0])  # before anything is reserved
    outer = os.environ.get("CHRONOS_PARTITION_ID")
    if reuse:
        if memory or duration or wait:
            raise BadRequest(
                "--reuse runs in the outer partition: leave out --memory, --duration, --wait"
            )
        reuse_partition(outer, program, list(command))  # does not return
    if memory is None or duration is None:
        raise BadRequest("chronos run needs --memory and --duration (or --reuse)")
    if gpus is not None and device != "0":
        raise BadRequest("--gpus N chooses the GPUs: leave out --device")
    if timeout and not wait:
        raise BadRequest("--timeout goes with --wait")
    if outer:
        click.echo(
            f"chronos: warning: already inside partition {outer}; reserving a second share "
            f"(use --reuse to run inside {outer} instead)",
            err=True,
        )
    on_wait = WaitDisplay(False) if wait else None
    code, summary = run_in_partition(
        {"gpus": gpus} if gpus is not None else gpu_arguments(device),
        memory,
        duration,
        grace,
        [program, *command[1:]],
        argv0=command[0],
        wait=wait,
        timeout=timeout,
        on_wait=on_wait,
    )
    text = json.dumps(summary, indent=2)
    if json_file:
        with open(json_file, "w") as f:
            f.write(text + "\n")
    if as_json:
        click.echo(text, err=True)
    sys.exit(code)


# ------------------------------------------------------------------ the rest


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


@cli.command(hidden=True)
@click.option("--output", "-o", type=click.Path(file_okay=False), help="Write chronos*.1 here.")
def man(output: str | None) -> None:
    """Write the manual page (roff), made from this CLI's own help."""
    from chronos.cli_man import write_pages

    for line in write_pages(cli, output):
        click.echo(line)


from chronos import cli_jobs as _jobs  # noqa: E402
from chronos.slurm.cli import slurm as _slurm  # noqa: E402 - its commands import lazily

cli.add_command(_slurm)  # chronos slurm …: docs/SLURM.md
cli.add_command(_slurm.commands["submit"])  # chronos submit: sbatch, or chronosd's queue
cli.add_command(_jobs.jobs)  # chronos jobs, chronos log: batch jobs (issue 15)
cli.add_command(_jobs.log)
for _name in ("create", "list", "stats", "run"):
    _command = cli.commands[_name]
    assert isinstance(_command, ClusterAware)
    _command.twin = _name


# ----------------------------------------------------------------------- main


def report_error(exc: ChronosError, as_json: bool | None = None, code: int | None = None) -> None:
    """One line on stderr; a JSON object there under --json."""
    if as_json is None:
        as_json = _wants_json(sys.argv[1:])
    exit_code = exc.exit_code if code is None else code
    if as_json:
        body = {"error": {"code": exc.code, "message": str(exc), "exit_code": exit_code}}
        click.echo(json.dumps(body), err=True)
    else:
        click.echo(f"chronos: error: {exc}", err=True)


def _wants_json(argv: Sequence[str]) -> bool:
    """``--json`` among the options (not inside a ``chronos run`` command)."""
    for arg in argv:
        if arg == "--":
            return False
        if arg in ("--json",):
            return True
    return False


def _is_run(argv: Sequence[str]) -> bool:
    """``run`` and ``submit`` keep 125 for Chronos's own failures (a command's codes apart)."""
    return bool(argv) and argv[0] in ("run", "submit")


def fail(exc: ChronosError, argv: Sequence[str]) -> int:
    own = _is_run(argv) and not isinstance(exc, CommandNotRunnable)
    code = RUN_FAILED_EXIT if own else exc.exit_code
    report_error(exc, _wants_json(argv), code)
    return code


def main(argv: Sequence[str] | None = None, fast_path: bool = True) -> int:
    args = list(sys.argv[1:] if argv is None else argv)
    if fast_path:
        from chronos.cli_fast import try_fast_path

        fast = try_fast_path(args)
        if fast is not None:
            return fast
    try:
        cli.main(args=args, prog_name="chronos", standalone_mode=False)
    except ChronosError as exc:
        return fail(exc, args)
    except click.exceptions.Abort:
        click.echo("chronos: interrupted", err=True)
        return 130
    except click.exceptions.Exit as exc:
        return exc.exit_code
    except click.ClickException as exc:
        hint = ""
        ctx = getattr(exc, "ctx", None)
        if ctx is not None:
            hint = f" (see '{ctx.command_path} --help')"
        error = BadRequest(f"{exc.format_message()}{hint}")
        code = RUN_FAILED_EXIT if _is_run(args) else exc.exit_code
        report_error(error, _wants_json(args), code)
        return code
    except KeyboardInterrupt:
        click.echo("chronos: interrupted", err=True)
        return 130
    return 0


if __name__ == "__main__":
    sys.exit(main())
