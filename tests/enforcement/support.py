"""Helpers of the enforcement tests: records, a real chronosd, the CLI, declared memory."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any
from unittest import mock

from chronos_testing import PY, DaemonProcess, TestUser
from chronos_testing import chronos_argv as chronos_argv  # re-exported for the tests
from chronos_testing import wait_for as wait_for  # re-exported for the tests
from helpers import GIB as GIB
from helpers import MIB as MIB

from chronos.devices.simulated import declare_process
from chronos.models import ACTIVE, PartitionRecord

SIM_GPU_BYTES = 80 * GIB


def record(
    pid_id: str,
    memory: int,
    device: int = 0,
    uid: int = 1000,
    user: str = "alice",
    total: int = SIM_GPU_BYTES,
) -> PartitionRecord:
    return PartitionRecord(
        id=pid_id,
        device=device,
        device_uuid=f"GPU-{device}",
        device_total_bytes=total,
        memory_bytes=memory,
        uid=uid,
        user=user,
        created_at=0.0,
        starts_at=0.0,
        expires_at=1e12,
        state=ACTIVE,
    )


def declare(home: Path, pid: int, nbytes: int, device: int = 0) -> None:
    """Declare (as the test) that ``pid`` holds ``nbytes`` of simulated GPU ``device``."""
    with mock.patch.dict(os.environ, {"CHRONOS_HOME": str(home)}):
        os.environ.pop("CHRONOS_SIMULATED_PROCESSES", None)
        declare_process(pid, device, nbytes)


def stop_process(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.send_signal(signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            proc.wait(10)


def kill_pid(pid: int) -> None:
    with contextlib.suppress(ProcessLookupError):
        os.kill(pid, signal.SIGKILL)


class Daemon(DaemonProcess):
    """A real ``chronosd`` on its own state directory under /tmp (simulated GPUs)."""

    def __init__(self, config: str = "") -> None:
        super().__init__(config=config, prefix="chronos-enf-")

    def process_row(self, pid: int) -> dict[str, Any] | None:
        """``pid``'s row in ``chronos stats --json``, or None if it is not listed."""
        for device in self.cli_json("stats"):
            for row in device["processes"]:
                if row["pid"] == pid:
                    return row  # type: ignore[no-any-return]
        return None

    def declare(self, pid: int, nbytes: int, device: int = 0) -> None:
        declare(self.home, pid, nbytes, device)


@contextlib.contextmanager
def running(proc: subprocess.Popen[Any]) -> Iterator[subprocess.Popen[Any]]:
    try:
        yield proc
    finally:
        stop_process(proc)


#: A Unix account the tests run commands as (through setpriv).
OtherUser = TestUser


def run_args(code: str, out: Path, memory: str = "10GiB") -> list[str]:
    """Arguments of ``chronos run`` that runs ``code`` (given ``out`` for its marks)."""
    return ["run", "--memory", memory, "--duration", "60", "--", PY, "-c", code, str(out)]


# Programs run under ``chronos run``: argv[1] is a directory for their marks.

DECLARE = (
    "import os, sys, time, signal\n"
    "from chronos.devices.simulated import declare_process\n"
    "def declare(gib, pid=None):\n"
    "    declare_process(pid or os.getpid(), 0, int(gib * (1 << 30)))\n"
    "def mark(name):\n"
    "    path = os.path.join(sys.argv[1], name)\n"
    "    with open(path + '.tmp', 'w') as f:\n"
    "        f.write(repr(time.time()))\n"
    "    os.rename(path + '.tmp', path)\n"
)

GROWS_PAST_CAP = (
    DECLARE + "declare(5)\ntime.sleep(1.0)\nmark('over')\ndeclare(12)\ntime.sleep(30)\n"
)
STAYS_UNDER = DECLARE + "declare(5)\ntime.sleep(0.6)\ndeclare(9.5)\ntime.sleep(0.6)\n"
IGNORES_SIGTERM = (
    DECLARE + "def on_term(signum, frame):\n"
    "    mark('term')\n"
    "signal.signal(signal.SIGTERM, on_term)\n"
    "declare(12)\n"
    "mark('over')\n"
    "for _ in range(300):\n"
    "    time.sleep(0.1)\n"
)
