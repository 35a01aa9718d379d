"""Shared helpers for the Chronos test suite: sizes, a fake clock, isolated environments,
the CLI as a process, and what a user error must look like.

One place for each: every test folder imports these (``from helpers import ...``; the
rootdir conftest puts ``tests/`` on ``sys.path``) instead of keeping its own copy. The
real daemon, accounts and polling live in ``chronos_testing``.
"""

from __future__ import annotations

import json
import os
import select
import sqlite3
import subprocess
import sys
import traceback
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from chronos.models import PartitionRecord, Share

#: Variables that could point a test at a real machine's Chronos (removed from the
#: test process by the ``chronos_env`` fixture, and from its subprocesses' environment).
UNSET = (
    "CHRONOS_SOCKET",
    "CHRONOS_CONFIG",
    "CHRONOS_SIMULATED_GPUS",
    "CHRONOS_SIMULATED_PROCESSES",
)

GIB = 1 << 30
MIB = 1 << 20
#: Size of each default simulated GPU (CHRONOS_SIMULATED_GPUS unset).
SIM_GPU_BYTES = 80 * GIB
T0 = 1_800_000_000.0
"""Where a FakeClock starts unless told (nothing depends on the date)."""


@dataclass(frozen=True)
class GroupRecord(PartitionRecord):
    """A partition of several GPUs, for tests written before groups are stored.

    The test seam of the multi-GPU contract: ``shares`` is the primary share (from the
    record's own fields) followed by ``others``; everything that reads ``record.shares``
    sees a group. Build one with :func:`group_of`.
    """

    others: tuple[Share, ...] = ()

    @property
    def shares(self) -> tuple[Share, ...]:
        return (*super().shares, *self.others)


def group_of(record: PartitionRecord, *others: Share) -> GroupRecord:
    """``record`` with more GPUs after its primary one."""
    fields = {name: getattr(record, name) for name in record.__dataclass_fields__}
    return GroupRecord(**fields, others=tuple(others))


class FakeClock:
    """A clock that moves only when a test says so (``Ledger(clock=)``, services)."""

    def __init__(self, now: float = T0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0, "a FakeClock only moves forward; set .now to go back"
        self.now += seconds


def chronos_settings(home: Path) -> dict[str, str]:
    """The variables every test sets."""
    return {
        "CHRONOS_HOME": str(home),
        "CHRONOS_BACKEND": "simulated",
        "CHRONOS_MODE": "embedded",
    }


def make_env(home: Path, **extra: str) -> dict[str, str]:
    """An environment for a subprocess: this one, isolated at ``home``."""
    env = {k: v for k, v in os.environ.items() if k not in UNSET}
    env.update(chronos_settings(home))
    env.update(extra)
    return env


def run_cli(
    *args: str,
    env: dict[str, str],
    input: str | None = None,
    timeout: float = 30,
) -> subprocess.CompletedProcess[str]:
    """Run ``python -m chronos.cli ARGS`` as a real process."""
    return subprocess.run(
        [sys.executable, "-m", "chronos.cli", *args],
        env=env,
        input=input,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def cli_in_process(
    *args: str, env: dict[str, str], input: str | None = None
) -> subprocess.CompletedProcess[str]:
    """``chronos ARGS`` run in this process (``chronos.cli.main`` under click's CliRunner
    isolation), with exactly ``env`` as its environment; the result as ``run_cli``'s.

    For tests of what the CLI says and does, not of a process: it saves an interpreter
    start (a few hundred ms on a loaded machine) per call. An exception that escapes
    ``main`` is written to stderr as a traceback, exactly as the process would, so
    "no traceback" checks still hold.
    """
    from click.testing import CliRunner

    from chronos.cli import main

    overrides: dict[str, str | None] = {k: None for k in os.environ if k not in env}
    overrides.update(env)
    argv, sys.argv = sys.argv, ["chronos", *args]  # messages look at sys.argv (--json)
    try:
        with CliRunner().isolation(input=input, env=overrides) as (out, err, _):
            try:
                code = main(list(args))
            except SystemExit as exc:
                code = _exit_status(exc.code)
            except Exception:  # noqa: BLE001 - what the interpreter would print, and exit 1
                traceback.print_exc()
                code = 1
            sys.stdout.flush()
            sys.stderr.flush()
            stdout = out.getvalue().decode()
            stderr = err.getvalue().decode(errors="backslashreplace")
    finally:
        sys.argv = argv
    return subprocess.CompletedProcess(["chronos", *args], code, stdout, stderr)


def _exit_status(code: object) -> int:
    """The status ``sys.exit(code)`` gives a process (a message: printed, then 1)."""
    if code is None:
        return 0
    if isinstance(code, int):
        return code
    print(code, file=sys.stderr)
    return 1


def cli_json(*args: str, env: dict[str, str], in_process: bool = False) -> Any:
    """Run a ``--json`` command that must succeed, and parse its output."""
    run = cli_in_process if in_process else run_cli
    proc = run(*args, "--json", env=env)
    assert proc.returncode == 0, f"chronos {' '.join(args)} failed: {proc.stderr}"
    return json.loads(proc.stdout)


def ledger_path(env: dict[str, str]) -> Path:
    return Path(env["CHRONOS_HOME"]) / "ledger.db"


def ledger_rows(env: dict[str, str]) -> tuple[list[tuple[Any, ...]], list[tuple[Any, ...]]]:
    """Every stored partition row and event row, read straight from the database."""
    path = ledger_path(env)
    if not path.exists():
        return [], []
    db = sqlite3.connect(path)
    try:
        partitions = db.execute("SELECT * FROM partitions ORDER BY id").fetchall()
        events = db.execute("SELECT * FROM events ORDER BY seq").fetchall()
    finally:
        db.close()
    return partitions, events


def assert_one_line_error(
    proc: subprocess.CompletedProcess[str],
    code: int | None = None,
    *,
    prefix: str = "chronos: error:",
    among_other_lines: bool = False,
) -> str:
    """A user error: non-zero exit (``code`` if given), one error line on stderr starting
    with ``prefix``, no traceback anywhere; returns that line.

    ``among_other_lines``: stderr may hold other lines too (a ``--wait`` status line),
    but exactly one of them is the error. Under ``--json`` the one line is
    ``{"error": {"code", "message", "exit_code"}}``; then the message is returned in the
    plain form, so callers check it alike.
    """
    assert proc.returncode != 0, f"expected failure, got success: {proc.stdout!r}"
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    lines = proc.stderr.splitlines()
    if among_other_lines:
        lines = [line for line in lines if line.startswith(prefix)]
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    if lines[0].startswith("{"):
        error = json.loads(lines[0])["error"]
        assert error["exit_code"] == proc.returncode, lines[0]
        return f"chronos: error: {error['message']}"
    assert lines[0].startswith(prefix), lines[0]
    return lines[0]


def readline_within(stream: IO[str], seconds: float) -> str:
    """The next line of a child's pipe, or an assertion failure if none comes in time."""
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"no output within {seconds}s"
    return stream.readline()


SCHEMA_3 = """
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS partitions (
    id TEXT PRIMARY KEY,
    device INTEGER NOT NULL,
    device_uuid TEXT NOT NULL,
    device_total_bytes INTEGER NOT NULL,
    memory_bytes INTEGER NOT NULL,
    uid INTEGER NOT NULL,
    user TEXT NOT NULL,
    created_at REAL NOT NULL,
    starts_at REAL NOT NULL,
    expires_at REAL NOT NULL,
    state TEXT NOT NULL,
    ended_at REAL,
    end_reason TEXT,
    owner_pid INTEGER,
    owner_start INTEGER,
    kind TEXT NOT NULL,
    grace_s REAL,
    warn_s REAL,
    warn_signal TEXT
);
CREATE INDEX IF NOT EXISTS partitions_open
    ON partitions (device_uuid, expires_at) WHERE state IN ('active', 'booked');
CREATE TABLE IF NOT EXISTS events (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    at REAL NOT NULL,
    kind TEXT NOT NULL,
    partition_id TEXT,
    uid INTEGER,
    user TEXT,
    device_uuid TEXT,
    memory_bytes INTEGER,
    detail TEXT NOT NULL DEFAULT '{}'
);
CREATE INDEX IF NOT EXISTS partitions_booked
    ON partitions (starts_at) WHERE state = 'booked';
CREATE INDEX IF NOT EXISTS events_at ON events (at);
CREATE TABLE IF NOT EXISTS waiting (
    id TEXT PRIMARY KEY,
    enqueued_at REAL NOT NULL,
    state TEXT NOT NULL,
    partition_id TEXT,
    reason TEXT,
    waiter_pid INTEGER,
    waiter_start INTEGER,
    timeout_at REAL,
    request TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS attached (
    partition_id TEXT NOT NULL REFERENCES partitions(id),
    pid INTEGER NOT NULL,
    start_ticks INTEGER,
    uid INTEGER NOT NULL,
    attached_at REAL NOT NULL,
    attached_by INTEGER NOT NULL,
    PRIMARY KEY (partition_id, pid)
);
"""
"""The ledger's tables as schema 3 (the last before series, groups and jobs) made them,
written out as they were, for migration tests."""


def schema_3_ledger(path: Path) -> None:
    """An empty ledger file as schema 3 made it, for migration tests."""
    with sqlite3.connect(path) as db:
        db.executescript(
            f"PRAGMA journal_mode = WAL; BEGIN; {SCHEMA_3} PRAGMA user_version = 3; COMMIT;"
        )
    db.close()


def sql_steps(ledger: Any, work: Callable[[], Any], per: int = 1000) -> int:
    """SQLite virtual-machine steps (in units of ``per``) that ``work()`` costs on
    ``ledger``'s connection: work done, not time, so a bound on it holds on a busy machine."""
    steps = [0]

    def tick() -> int:
        steps[0] += 1
        return 0

    ledger.connection.set_progress_handler(tick, per)
    try:
        work()
    finally:
        ledger.connection.set_progress_handler(None, per)
    return steps[0]
