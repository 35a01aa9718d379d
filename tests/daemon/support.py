"""Helpers for the daemon tests: a real ``chronosd`` process and real Unix users.

:class:`DaemonProcess` runs ``python -m chronos.daemon.main`` on its own state
directory and socket under ``/tmp`` (traversable by every user, so clients
running as other accounts can reach it). :class:`TestUser` runs commands as an
ordinary account through ``setpriv``.
"""

from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import socket
import struct
import subprocess
import sys
import sysconfig
import tempfile
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from chronos.api import Partitioner
from chronos.errors import ChronosError
from chronos.transport import SocketTransport

ROOT = Path(__file__).resolve().parents[2]
SRC = ROOT / "src"
SITE_PACKAGES = Path(sysconfig.get_paths()["purelib"])

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

READY_TIMEOUT_S = 15.0


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
    env.update(extra)
    return env


def shared_tmpdir(prefix: str) -> Path:
    """A fresh directory under /tmp that every user may traverse (0755)."""
    path = Path(tempfile.mkdtemp(prefix=prefix, dir="/tmp"))
    os.chmod(path, 0o755)
    return path


def wait_for(
    predicate: Callable[[], Any], timeout: float, interval: float = 0.02, what: str = "condition"
) -> Any:
    """Poll ``predicate`` until it returns something truthy; return that or fail."""
    deadline = time.monotonic() + timeout
    while True:
        value = predicate()
        if value:
            return value
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out after {timeout}s waiting for {what}")
        time.sleep(interval)


# ----------------------------------------------------------------------------- daemon


class DaemonProcess:
    """One ``chronosd`` on a private state directory; restartable on the same state."""

    def __init__(self, base: Path, extra_env: dict[str, str] | None = None) -> None:
        self.base = base
        self.state_dir = base
        self.sock = base / "sock"
        self.config_path = base / "config.toml"  # absent: the defaults, whatever /etc holds
        self.env = clean_env(
            CHRONOS_BACKEND="simulated",
            CHRONOS_HOME=str(self.state_dir),
            CHRONOS_SOCKET=str(self.sock),
            CHRONOS_MODE="daemon",
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.daemon_env = {**self.env, **(extra_env or {})}
        del self.daemon_env["CHRONOS_MODE"]
        self.proc: subprocess.Popen[bytes] | None = None
        self.logs: list[Path] = []

    # ------------------------------------------------------------------ lifecycle

    def argv(self, sock: Path | None = None) -> list[str]:
        return [
            sys.executable,
            "-m",
            "chronos.daemon.main",
            "--state-dir",
            str(self.state_dir),
            "--socket",
            str(sock or self.sock),
            "--config",
            str(self.config_path),
        ]

    def start(self, wait: bool = True, extra_env: dict[str, str] | None = None) -> None:
        assert self.proc is None or self.proc.poll() is not None, "daemon already running"
        log_path = self.base / f"chronosd.{len(self.logs)}.log"
        self.logs.append(log_path)
        with open(log_path, "wb") as err:
            self.proc = subprocess.Popen(
                self.argv(),
                env={**self.daemon_env, **(extra_env or {})},
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd="/",
            )
        if wait:
            self.wait_ready()

    def wait_ready(self, timeout: float = READY_TIMEOUT_S) -> None:
        deadline = time.monotonic() + timeout
        while True:
            assert self.proc is not None
            if self.proc.poll() is not None:
                raise AssertionError(
                    f"chronosd exited with {self.proc.returncode} before answering:\n"
                    + self.log_text()
                )
            try:
                self.ping(timeout=1.0)
                return
            except (ChronosError, OSError):
                pass
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"chronosd did not answer within {timeout}s:\n{self.log_text()}"
                )
            time.sleep(0.02)

    def ping(self, timeout: float = 5.0) -> dict[str, Any]:
        transport = SocketTransport(self.sock, timeout=timeout)
        try:
            result: dict[str, Any] = transport.call("ping")
            return result
        finally:
            transport.close()

    def alive(self) -> bool:
        return self.proc is not None and self.proc.poll() is None

    def kill(self, sig: int = signal.SIGKILL, timeout: float = 10.0) -> int:
        """Send ``sig`` and wait for the daemon to exit; return its exit status."""
        assert self.proc is not None
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.proc.wait(timeout)

    def stop(self) -> None:
        if self.proc is None or self.proc.poll() is not None:
            return
        self.proc.send_signal(signal.SIGTERM)
        try:
            self.proc.wait(10)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            self.proc.wait(10)

    def restart(self, sig: int = signal.SIGTERM) -> None:
        """Stop (with ``sig``) if running, then start again on the same state and socket."""
        if self.alive():
            self.kill(sig)
        self.start()

    # ----------------------------------------------------------------------- logs

    def log_text(self, all_runs: bool = False) -> str:
        paths = self.logs if all_runs else self.logs[-1:]
        return "".join(p.read_text(errors="replace") for p in paths if p.exists())

    def log_lines(self, all_runs: bool = False) -> list[dict[str, Any]]:
        """The JSON log records of the current run (``all_runs``: of every run)."""
        out = []
        for line in self.log_text(all_runs).splitlines():
            try:
                record = json.loads(line)
            except ValueError:
                record = {"event": "_raw", "text": line}
            if not isinstance(record, dict):
                record = {"event": "_raw", "text": line}
            out.append(record)
        return out

    def events(self, name: str, **match: Any) -> list[dict[str, Any]]:
        return [
            r
            for r in self.log_lines(all_runs=True)
            if r.get("event") == name and all(r.get(k) == v for k, v in match.items())
        ]

    def wait_event(self, name: str, timeout: float = 5.0, **match: Any) -> dict[str, Any]:
        found = wait_for(
            lambda: self.events(name, **match), timeout, what=f"log event {name} {match}"
        )
        return found[0]  # type: ignore[no-any-return]

    # --------------------------------------------------------------------- clients

    def transport(self, timeout: float = 30.0) -> SocketTransport:
        return SocketTransport(self.sock, timeout=timeout)

    def call(self, op: str, **args: Any) -> Any:
        transport = self.transport()
        try:
            return transport.call(op, **args)
        finally:
            transport.close()

    @contextlib.contextmanager
    def partitioner(self) -> Iterator[Partitioner]:
        client = Partitioner(self.transport())
        try:
            yield client
        finally:
            client.close()

    def record(self, partition_id: str) -> dict[str, Any]:
        result: dict[str, Any] = self.call("get", id=partition_id)
        return result

    def open_ids(self) -> set[str]:
        return {r["id"] for r in self.call("list")}

    def cli(
        self, *args: str, timeout: float = 30, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        """``chronos ARGS`` as this test's user (root in CI), in daemon mode."""
        return subprocess.run(
            [sys.executable, "-m", "chronos.cli", *args],
            env=env or self.env,
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )

    def cleanup(self) -> None:
        self.stop()
        shutil.rmtree(self.base, ignore_errors=True)


# ---------------------------------------------------------------------------- frames


def frame(body: bytes) -> bytes:
    return struct.pack(">I", len(body)) + body


def request_frame(message: Any) -> bytes:
    return frame(json.dumps(message).encode())


def recv_exactly(sock: socket.socket, n: int) -> bytes | None:
    """``n`` bytes, or None if the peer closed first."""
    chunks = []
    while n:
        try:
            chunk = sock.recv(n)
        except ConnectionResetError:
            return None
        if not chunk:
            return None
        chunks.append(chunk)
        n -= len(chunk)
    return b"".join(chunks)


def recv_reply(sock: socket.socket) -> Any | None:
    """The next reply on ``sock``, or None if the daemon hung up instead."""
    header = recv_exactly(sock, 4)
    if header is None:
        return None
    (length,) = struct.unpack(">I", header)
    body = recv_exactly(sock, length)
    if body is None:
        return None
    return json.loads(body)


def raw_connect(path: Path, timeout: float = 5.0) -> socket.socket:
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.settimeout(timeout)
    sock.connect(str(path))
    return sock


# ----------------------------------------------------------------------------- users


@dataclass
class TestUser:
    """An ordinary Unix account the tests run commands as (through setpriv)."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    name: str
    uid: int
    gid: int
    python: list[str] = field(default_factory=lambda: [sys.executable])
    python_env: dict[str, str] = field(default_factory=dict)

    def argv(self, *command: str) -> list[str]:
        return [
            "setpriv",
            f"--reuid={self.uid}",
            f"--regid={self.gid}",
            "--init-groups",
            *command,
        ]

    def python_argv(self, *args: str) -> list[str]:
        return self.argv(*self.python, *args)

    def env(self, base: dict[str, str], **extra: str) -> dict[str, str]:
        return {
            **base,
            **self.python_env,
            "HOME": "/",
            "USER": self.name,
            "LOGNAME": self.name,
            "PYTHONDONTWRITEBYTECODE": "1",
            **extra,
        }

    def run(
        self,
        argv: Sequence[str],
        env: dict[str, str],
        timeout: float = 30,
        input: str | None = None,
    ) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv),
            env=self.env(env),
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
            input=input,
        )

    def cli(
        self, *args: str, env: dict[str, str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:
        """``chronos ARGS`` run as this user."""
        return self.run(self.python_argv("-m", "chronos.cli", *args), env, timeout)

    def run_python(
        self, code: str, *args: str, env: dict[str, str], timeout: float = 30
    ) -> subprocess.CompletedProcess[str]:  # noqa: E501
        return self.run(self.python_argv("-c", code, *args), env, timeout)

    def popen(
        self, command: Sequence[str], env: dict[str, str], **kwargs: Any
    ) -> subprocess.Popen[bytes]:
        return subprocess.Popen(self.argv(*command), env=self.env(env), cwd="/", **kwargs)


def assert_one_line_error(proc: subprocess.CompletedProcess[str], code: int | None = None) -> str:
    """A user error: non-zero exit, one 'chronos: error:' line on stderr, no traceback."""
    assert proc.returncode != 0, f"expected failure, got success: {proc.stdout!r}"
    if code is not None:
        assert proc.returncode == code, (proc.returncode, proc.stderr)
    assert "Traceback" not in proc.stderr + proc.stdout, proc.stderr
    lines = proc.stderr.splitlines()
    assert len(lines) == 1, f"expected one stderr line, got {lines!r}"
    assert lines[0].startswith("chronos: error:"), lines[0]
    return lines[0]


def json_out(proc: subprocess.CompletedProcess[str]) -> Any:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return json.loads(proc.stdout)


def user_python_candidates() -> list[tuple[list[str], dict[str, str]]]:
    """Interpreters an ordinary user may run the source tree with, best first.

    The venv's interpreter can be a link into a directory other users cannot
    enter (e.g. pyenv under /root); then a system Python of the same minor
    version runs the same source and the venv's (pure and ABI-compatible)
    packages through PYTHONPATH.
    """
    ver = f"{sys.version_info.major}.{sys.version_info.minor}"
    path_env = {"PYTHONPATH": os.pathsep.join([str(SRC), str(SITE_PACKAGES)])}
    out: list[tuple[list[str], dict[str, str]]] = [([sys.executable], {})]
    for candidate in (f"/usr/bin/python{ver}", f"/usr/local/bin/python{ver}"):
        if os.path.exists(candidate):
            out.append(([candidate], path_env))
    return out
