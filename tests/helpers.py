"""Shared helpers for the Chronos test suite (simulated backend, isolated state)."""

from __future__ import annotations

import json
import os
import select
import sqlite3
import subprocess
import sys
from pathlib import Path
from typing import IO, Any

#: Variables that could point a test at a real machine's Chronos.
UNSET = (
    "CHRONOS_SOCKET",
    "CHRONOS_CONFIG",
    "CHRONOS_SIMULATED_GPUS",
    "CHRONOS_SIMULATED_PROCESSES",
)

GIB = 1024**3
MIB = 1024**2
#: Size of each default simulated GPU (CHRONOS_SIMULATED_GPUS unset).
SIM_GPU_BYTES = 80 * GIB


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


def cli_json(*args: str, env: dict[str, str]) -> Any:
    """Run a ``--json`` command that must succeed, and parse its output."""
    proc = run_cli(*args, "--json", env=env)
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


def assert_one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    """A user error: non-zero exit, one 'chronos: error:' line on stderr, no traceback.

    Under ``--json`` the one line is ``{"error": {"code", "message", "exit_code"}}``;
    then the message is returned in the plain form, so callers check it alike.
    """
    assert proc.returncode != 0, f"expected failure, got success: {proc.stdout!r}"
    assert "Traceback" not in proc.stderr, proc.stderr
    assert "Traceback" not in proc.stdout, proc.stdout
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    if lines[0].startswith("{"):
        error = json.loads(lines[0])["error"]
        assert error["exit_code"] == proc.returncode, lines[0]
        return f"chronos: error: {error['message']}"
    assert lines[0].startswith("chronos: error:"), lines[0]
    return lines[0]


def readline_within(stream: IO[str], seconds: float) -> str:
    """The next line of a child's pipe, or an assertion failure if none comes in time."""
    ready, _, _ = select.select([stream], [], [], seconds)
    assert ready, f"no output within {seconds}s"
    return stream.readline()
