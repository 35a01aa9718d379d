"""The hard cap with no daemon: ``chronos run`` samples and stops its own command."""

from __future__ import annotations

import signal
import subprocess
import time
from pathlib import Path

from .support import (
    GIB,
    GROWS_PAST_CAP,
    IGNORES_SIGTERM,
    STAYS_UNDER,
    chronos_argv,
    declare,
    run_args,
)


def embedded_run(env: dict[str, str], code: str, out: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        chronos_argv(*run_args(code, out)),
        env=env,
        capture_output=True,
        text=True,
        timeout=40,
    )


def test_embedded_run_stops_a_command_over_its_cap(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    proc = embedded_run(embedded_env, GROWS_PAST_CAP, tmp_path)
    ended = time.time()
    assert ended - float((tmp_path / "over").read_text()) < 5.0
    assert proc.returncode == 128 + signal.SIGTERM, (proc.returncode, proc.stderr)
    assert "held 12.0 GiB of GPU 0, over the partition's 10.0 GiB" in proc.stderr, proc.stderr
    assert "stopping it" in proc.stderr
    assert "Traceback" not in proc.stderr


def test_embedded_run_leaves_a_compliant_command_alone(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    proc = embedded_run(embedded_env, STAYS_UNDER, tmp_path)
    assert proc.returncode == 0, proc.stderr
    assert proc.stderr == ""


def test_embedded_run_kills_a_command_that_ignores_sigterm(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    started = time.time()
    proc = embedded_run(embedded_env, IGNORES_SIGTERM, tmp_path)
    assert proc.returncode == 128 + signal.SIGKILL, (proc.returncode, proc.stderr)
    assert (tmp_path / "term").exists()
    term_at = float((tmp_path / "term").read_text())
    assert time.time() - term_at >= 0.25  # the memory grace passed between TERM and KILL
    assert time.time() - started < 15.0
    assert "SIGKILL" in proc.stderr


def test_embedded_run_counts_only_its_own_processes(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    """Memory declared by a process outside the command is not charged to it."""
    outsider = subprocess.Popen(["sleep", "30"])
    try:
        declare(Path(embedded_env["CHRONOS_HOME"]), outsider.pid, 40 * GIB)
        proc = embedded_run(embedded_env, STAYS_UNDER, tmp_path)
    finally:
        outsider.kill()
        outsider.wait()
    assert proc.returncode == 0, proc.stderr
