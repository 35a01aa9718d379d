"""Helpers of the fair-sharing tests: a fake clock, an in-process service, a real daemon.

* :class:`FakeClock` is handed to ``Ledger(clock=...)`` so policy tests move
  time by hand and never sleep.
* :func:`make_service` builds a :class:`~chronos.service.Service` over a fresh
  ledger and the simulated backend (two 80 GiB GPUs), with a policy given as
  the dict a TOML file would parse to.
* :class:`FairDaemon` is the shared :class:`~chronos_testing.DaemonProcess` (a real
  ``chronosd`` under /tmp, with a policy file it can rewrite and reload with SIGHUP)
  whose background CLI processes are time-stamped :class:`Popen`.
* :class:`Account` runs the CLI as an ordinary Unix account through ``setpriv``.
"""

from __future__ import annotations

import os
import shutil
import subprocess
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import IO, Any

from chronos_testing import DaemonProcess, TestUser, chronos_argv
from chronos_testing import wait_for as wait_for  # re-exported for the tests
from helpers import GIB as GIB
from helpers import FakeClock as FakeClock
from helpers import assert_one_line_error

from chronos import protocol
from chronos.config import parse_config
from chronos.devices import open_machine
from chronos.identity import Caller
from chronos.ledger import Ledger
from chronos.service import Service

ROOT = Path(__file__).resolve().parents[2]
GPU_BYTES = 80 * GIB
"""Size of each default simulated GPU."""
T0 = 1_750_000_000.0
"""Where fake clocks start (a Sunday evening, UTC; nothing depends on the weekday)."""

# --------------------------------------------------------------------------- in process


def caller(name: str, uid: int, admin: bool = False, pid: int | None = None) -> Caller:
    """A fake user (no account needed: the service never looks them up)."""
    return Caller(uid=uid, gid=uid, pid=pid, user=name, is_admin=admin)


@dataclass
class Harness:
    """A service over a private ledger, with a fake clock."""

    clock: FakeClock
    ledger: Ledger
    service: Service
    directory: Path

    def call(self, who: Caller, op: str, **args: Any) -> dict[str, Any]:
        """The raw reply (``{"ok": ..., "result"|"error": ...}``) of one request."""
        return self.service.handle(who, protocol.request(op, **args))

    def ok(self, who: Caller, op: str, **args: Any) -> Any:
        reply = self.call(who, op, **args)
        assert reply["ok"], reply
        return reply["result"]

    def error(self, who: Caller, op: str, **args: Any) -> dict[str, str]:
        reply = self.call(who, op, **args)
        assert not reply["ok"], reply
        return reply["error"]  # type: ignore[no-any-return]

    def queue(self) -> list[dict[str, Any]]:
        return self.service.queue_statuses()

    def close(self) -> None:
        self.service.close()
        shutil.rmtree(self.directory, ignore_errors=True)


def make_service(
    policy: dict[str, Any] | None = None,
    clock: FakeClock | None = None,
    owner_alive: Callable[[int, int | None], bool] = lambda pid, start: True,
    directory: Path | None = None,
) -> Harness:
    """A fresh ledger (fsync off: it lives only for the test) behind a Service."""
    os.environ.setdefault("CHRONOS_BACKEND", "simulated")
    directory = directory or Path(tempfile.mkdtemp(prefix="chronos-fair-"))
    clock = clock or FakeClock(T0)
    config = parse_config(policy or {}, "test policy")
    ledger = Ledger(
        directory / "ledger.db",
        clock=clock,
        owner_alive=owner_alive,
        durable=False,
    )
    service = Service(ledger, config, "embedded", machine_factory=lambda: open_machine("simulated"))
    return Harness(clock, ledger, service, directory)


# ------------------------------------------------------------------------------ daemon


def toml_policy(text: str) -> str:
    """Dedent a policy written inline in a test."""
    import textwrap

    return textwrap.dedent(text).strip() + "\n"


class FairDaemon(DaemonProcess):
    """A real chronosd on simulated GPUs with a policy file of the test's choosing.

    Its ``cli`` runs as root (an administrator: quotas do not apply).
    """

    def __init__(self, policy: str = "") -> None:
        super().__init__(config=policy, prefix="chronos-fair-")

    def popen(self, *args: str) -> Popen:
        return Popen(chronos_argv(*args), self.env)


class Popen:
    """A CLI process in the background whose output lines are time-stamped as they arrive."""

    def __init__(self, argv: Sequence[str], env: dict[str, str]) -> None:
        env = {**env, "PYTHONUNBUFFERED": "1"}  # lines are stamped when written, not at exit
        self.proc = subprocess.Popen(
            list(argv),
            env=env,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            cwd="/",
        )
        self.stdout: list[tuple[float, str]] = []
        self.stderr: list[tuple[float, str]] = []
        self._threads = [
            self._reader(self.proc.stdout, self.stdout),
            self._reader(self.proc.stderr, self.stderr),
        ]

    @staticmethod
    def _reader(pipe: IO[bytes] | None, into: list[tuple[float, str]]) -> threading.Thread:
        assert pipe is not None

        def run() -> None:
            for raw in pipe:
                into.append((time.monotonic(), raw.decode(errors="replace")))

        thread = threading.Thread(target=run, daemon=True)
        thread.start()
        return thread

    @property
    def pid(self) -> int:
        return self.proc.pid

    def wait(self, timeout: float = 30) -> int:
        code = self.proc.wait(timeout)
        for t in self._threads:
            t.join(5)
        return code

    def out(self) -> str:
        return "".join(line for _, line in self.stdout)

    def err(self) -> str:
        return "".join(line for _, line in self.stderr)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


# ------------------------------------------------------------------------------ users


@dataclass
class Account:
    """An ordinary Unix account the CLI runs as (through setpriv), against a daemon."""

    user: TestUser

    @property
    def name(self) -> str:
        return self.user.name

    @property
    def uid(self) -> int:
        return self.user.uid

    def cli(
        self, daemon: FairDaemon, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return self.user.cli(*args, env=daemon.env, timeout=timeout)

    def popen(self, daemon: FairDaemon, *args: str) -> Popen:
        return Popen(self.user.python_argv("-m", "chronos.cli", *args), self.user.env(daemon.env))


def one_line_error(proc: subprocess.CompletedProcess[str] | Popen, code: int | None = None) -> str:
    """A user error: non-zero exit, one ``chronos: error:`` line on stderr, no traceback
    (other stderr lines, such as a ``--wait`` status, may come with it)."""
    if isinstance(proc, Popen):
        proc = subprocess.CompletedProcess(
            proc.proc.args, proc.proc.returncode, proc.out(), proc.err()
        )
    return assert_one_line_error(proc, code, among_other_lines=True)
