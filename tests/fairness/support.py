"""Helpers of the fair-sharing tests: a fake clock, an in-process service, a real daemon.

* :class:`FakeClock` is handed to ``Ledger(clock=...)`` so policy tests move
  time by hand and never sleep.
* :func:`make_service` builds a :class:`~chronos.service.Service` over a fresh
  ledger and the simulated backend (two 80 GiB GPUs), with a policy given as
  the dict a TOML file would parse to.
* :class:`FairDaemon` runs a real ``chronosd`` (``python -m chronos.daemon.main``)
  on a private state directory under /tmp, with a policy file it can rewrite
  and reload with SIGHUP.
* :class:`Account` runs the CLI as an ordinary Unix account through ``setpriv``.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import sysconfig
import tempfile
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

from chronos import protocol
from chronos.config import parse_config
from chronos.devices import open_machine
from chronos.identity import Caller
from chronos.ledger import Ledger
from chronos.service import Service

ROOT = Path(__file__).resolve().parents[2]
GIB = 1024**3
GPU_BYTES = 80 * GIB
"""Size of each default simulated GPU."""
T0 = 1_750_000_000.0
"""Where fake clocks start (a Sunday evening, UTC; nothing depends on the weekday)."""

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
    "NOTIFY_SOCKET",
)


# --------------------------------------------------------------------------- in process


class FakeClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = T0) -> None:
        self.now = start

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float) -> None:
        assert seconds >= 0
        self.now += seconds


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
        return self.service._queue_statuses()

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
    clock = clock or FakeClock()
    ledger = Ledger(directory / "ledger.db", clock=clock, owner_alive=owner_alive)
    ledger._db.execute("PRAGMA synchronous = OFF")
    config = parse_config(policy or {}, "test policy")
    service = Service(ledger, config, "embedded", machine_factory=lambda: open_machine("simulated"))
    return Harness(clock, ledger, service, directory)


# ------------------------------------------------------------------------------ daemon


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(extra)
    return env


def shared_tmpdir(prefix: str) -> Path:
    """A fresh directory under /tmp that every user may traverse."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def wait_for(
    predicate: Callable[[], Any], timeout: float, what: str, interval: float = 0.01
) -> Any:
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


def toml_policy(text: str) -> str:
    """Dedent a policy written inline in a test."""
    import textwrap

    return textwrap.dedent(text).strip() + "\n"


class FairDaemon:
    """A real chronosd on simulated GPUs with a policy file of the test's choosing."""

    def __init__(self, policy: str = "") -> None:
        self.base = shared_tmpdir("chronos-fair-")
        self.sock = self.base / "chronosd.sock"
        self.config_path = self.base / "config.toml"
        self.config_path.write_text(policy)
        os.chmod(self.config_path, 0o644)
        self.log_path = self.base / "chronosd.log"
        self.env = clean_env(
            CHRONOS_BACKEND="simulated",
            CHRONOS_HOME=str(self.base),
            CHRONOS_SOCKET=str(self.sock),
            CHRONOS_CONFIG=str(self.config_path),
            CHRONOS_MODE="daemon",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self, timeout: float = 15.0) -> FairDaemon:
        daemon_env = {k: v for k, v in self.env.items() if k != "CHRONOS_MODE"}
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chronos.daemon.main",
                    "--state-dir",
                    str(self.base),
                    "--socket",
                    str(self.sock),
                    "--config",
                    str(self.config_path),
                ],
                env=daemon_env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=log,
                cwd="/",
            )
        deadline = time.monotonic() + timeout
        while True:
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"chronosd exited with {self.proc.returncode}:\n" + self.log_text()
                )
            try:
                self.call("ping")
                return self
            except Exception:  # noqa: BLE001 - not listening yet
                pass
            if time.monotonic() > deadline:
                raise AssertionError(f"chronosd did not answer in {timeout}s:\n" + self.log_text())
            time.sleep(0.02)

    def call(self, op: str, **args: Any) -> Any:
        from chronos.transport import SocketTransport

        transport = SocketTransport(self.sock, timeout=10.0)
        try:
            return transport.call(op, **args)
        finally:
            transport.close()

    def cli(
        self, *args: str, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``chronos ARGS`` as root (an administrator: quotas do not apply)."""
        return subprocess.run(
            [sys.executable, "-m", "chronos.cli", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def popen(self, *args: str) -> Popen:
        return Popen([sys.executable, "-m", "chronos.cli", *args], self.env)

    def write_policy(self, text: str) -> None:
        self.config_path.write_text(text)

    def reload(self) -> None:
        """SIGHUP, then wait for the daemon to log that it took the new policy."""
        assert self.proc is not None
        before = len(self.log_events("config_reloaded"))
        self.proc.send_signal(signal.SIGHUP)
        wait_for(
            lambda: len(self.log_events("config_reloaded")) > before,
            5,
            "config_reloaded in the daemon log",
        )

    def log_text(self) -> str:
        try:
            return self.log_path.read_text(errors="replace")
        except OSError:
            return ""

    def log_events(self, name: str) -> list[dict[str, Any]]:
        out = []
        for line in self.log_text().splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                continue
            if isinstance(record, dict) and record.get("event") == name:
                out.append(record)
        return out

    def queue(self) -> list[dict[str, Any]]:
        result: list[dict[str, Any]] = self.call("queue")
        return result

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


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


SRC = ROOT / "src"
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])


@dataclass
class Account:
    """An ordinary Unix account the CLI runs as (through setpriv)."""

    name: str
    uid: int
    gid: int
    python: list[str] = field(default_factory=lambda: [sys.executable])
    python_env: dict[str, str] = field(default_factory=dict)

    def argv(self, *command: str) -> list[str]:
        return ["setpriv", f"--reuid={self.uid}", f"--regid={self.gid}", "--init-groups", *command]

    def env(self, base: dict[str, str]) -> dict[str, str]:
        return {
            **base,
            **self.python_env,
            "HOME": "/",
            "USER": self.name,
            "LOGNAME": self.name,
            "PYTHONDONTWRITEBYTECODE": "1",
        }

    def cli(
        self, daemon: FairDaemon, *args: str, timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            self.argv(*self.python, "-m", "chronos.cli", *args),
            env=self.env(daemon.env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def popen(self, daemon: FairDaemon, *args: str) -> Popen:
        return Popen(self.argv(*self.python, "-m", "chronos.cli", *args), self.env(daemon.env))


def python_candidates() -> list[tuple[list[str], dict[str, str]]]:
    """Interpreters an ordinary user may run this tree with, best first."""
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    path_env = {"PYTHONPATH": os.pathsep.join([str(SRC), str(SITE_PACKAGES)])}
    out: list[tuple[list[str], dict[str, str]]] = [([sys.executable], {})]
    for candidate in (f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"):
        if os.path.exists(candidate):
            out.append(([candidate], path_env))
    return out


def one_line_error(proc: subprocess.CompletedProcess[str] | Popen, code: int | None = None) -> str:
    """A user error: non-zero exit, one ``chronos: error:`` line on stderr, no traceback."""
    if isinstance(proc, Popen):
        rc, err, out = proc.proc.returncode, proc.err(), proc.out()
    else:
        rc, err, out = proc.returncode, proc.stderr, proc.stdout
    assert rc != 0, f"expected a failure, got success: {out!r}"
    if code is not None:
        assert rc == code, (rc, err)
    assert "Traceback" not in err + out, err
    lines = [line for line in err.splitlines() if line.startswith("chronos: error:")]
    assert len(lines) == 1, f"expected one error line, got {err!r}"
    return lines[0]
