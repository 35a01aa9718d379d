"""Helpers of the enforcement tests: records, a real chronosd, the CLI, declared memory."""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any
from unittest import mock

from chronos.devices.simulated import declare_process
from chronos.errors import ChronosError
from chronos.models import ACTIVE, PartitionRecord
from chronos.transport import SocketTransport

GIB = 1 << 30
MIB = 1 << 20
SIM_GPU_BYTES = 80 * GIB
PY = sys.executable

#: Variables of the surrounding shell that could point a test at another Chronos.
SCRUBBED = (
    "CHRONOS_CONFIG",
    "CHRONOS_SOCKET",
    "CHRONOS_HOME",
    "CHRONOS_MODE",
    "CHRONOS_BACKEND",
    "CHRONOS_SIMULATED_GPUS",
    "CHRONOS_SIMULATED_PROCESSES",
    "CHRONOS_PARTITION_ID",
    "CHRONOS_SOFT_LIMIT_BYTES",
    "CHRONOS_DEVICE_TOTAL_BYTES",
    "CHRONOS_PARTITION_BYTES",
    "PYTHONPATH",
    "NOTIFY_SOCKET",
)


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


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env["PYTHONDONTWRITEBYTECODE"] = "1"
    env.update(extra)
    return env


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.05, what: str = "condition"
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


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


class Daemon:
    """A real ``chronosd`` on its own state directory under /tmp (simulated GPUs)."""

    def __init__(self, config: str = "") -> None:
        self.home = Path(tempfile.mkdtemp(prefix="chronos-enf-", dir="/tmp"))
        os.chmod(self.home, 0o755)
        self.sock = self.home / "chronosd.sock"
        self.config_path = self.home / "config.toml"
        self.config_path.write_text(config)
        self.log_path = self.home / "chronosd.log"
        self.env = clean_env(
            CHRONOS_BACKEND="simulated",
            CHRONOS_HOME=str(self.home),
            CHRONOS_SOCKET=str(self.sock),
            CHRONOS_CONFIG=str(self.config_path),
            CHRONOS_MODE="daemon",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> Daemon:
        env = {k: v for k, v in self.env.items() if k != "CHRONOS_MODE"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    PY,
                    "-m",
                    "chronos.daemon.main",
                    "--state-dir",
                    str(self.home),
                    "--socket",
                    str(self.sock),
                ],
                env=env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd="/",
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(f"chronosd exited early:\n{self.log_text()}")
            try:
                transport = SocketTransport(self.sock, timeout=1.0)
                try:
                    transport.call("ping")
                finally:
                    transport.close()
                return self
            except (ChronosError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"chronosd did not answer:\n{self.log_text()}")
            time.sleep(0.02)

    def reconfigure(self, config: str) -> None:
        """Rewrite the policy file and SIGHUP the daemon; wait until it reloaded."""
        assert self.proc is not None
        before = len(self.log_events("config_reloaded"))
        self.config_path.write_text(config)
        self.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: len(self.log_events("config_reloaded")) > before, 5.0, what="config_reloaded"
        )

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.home, ignore_errors=True)

    # ----------------------------------------------------------------- logs

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def log_events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                item = json.loads(line)
            except ValueError:
                continue
            if (
                isinstance(item, dict)
                and item.get("event") == name
                and all(item.get(k) == v for k, v in match.items())
            ):
                out.append(item)
        return out

    def wait_log(self, name: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        found = wait_for(
            lambda: self.log_events(name, **match), timeout, what=f"log {name} {match}"
        )
        return found[0]  # type: ignore[no-any-return]

    # --------------------------------------------------------------- clients

    def call(self, op: str, **args: Any) -> Any:
        transport = SocketTransport(self.sock, timeout=10.0)
        try:
            return transport.call(op, **args)
        finally:
            transport.close()

    def cli(self, *args: str, timeout: float = 30.0) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            [PY, "-m", "chronos.cli", *args],
            env=self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def cli_json(self, *args: str) -> Any:
        proc = self.cli(*args, "--json")
        assert proc.returncode == 0, proc.stderr
        return json.loads(proc.stdout)

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


@dataclass
class OtherUser:
    name: str
    uid: int
    gid: int

    def argv(self, *command: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *command]

    def popen(self, command: list[str], env: dict[str, str]) -> subprocess.Popen[bytes]:
        return subprocess.Popen(
            self.argv(*command),
            env={**env, "HOME": "/", "USER": self.name, "LOGNAME": self.name},
            cwd="/",
            stdin=subprocess.DEVNULL,
            stdout=subprocess.DEVNULL,
            stderr=subprocess.DEVNULL,
        )


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
