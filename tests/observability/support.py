"""Helpers of the observability tests: a real chronosd, the CLI, scrapes and a browser."""

from __future__ import annotations

import contextlib
import json
import os
import re
import shutil
import signal
import subprocess
import sys
import tempfile
import time
import urllib.error
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
GIB = 1 << 30
SIM_GPU_BYTES = 80 * GIB
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = [
    "--headless",
    "--no-sandbox",
    "--disable-gpu",
    "--disable-quic",
    "--no-first-run",
    "--disable-background-networking",
    "--disable-component-update",
    "--disable-sync",
]

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


class Daemon:
    """A chronosd on a private state dir (simulated GPUs), with its own policy file."""

    def __init__(self, config: str = "", args: tuple[str, ...] = ()) -> None:
        self.base = Path(tempfile.mkdtemp(prefix="chronos-obs-", dir="/tmp"))
        os.chmod(self.base, 0o755)
        self.sock = self.base / "chronosd.sock"
        self.config_path = self.base / "config.toml"
        self.config_path.write_text(config)
        self.args = args
        self.log_path = self.base / "chronosd.log"
        self.env = {k: v for k, v in os.environ.items() if k not in SCRUBBED}
        self.env.update(
            CHRONOS_BACKEND="simulated",
            CHRONOS_HOME=str(self.base),
            CHRONOS_SOCKET=str(self.sock),
            CHRONOS_CONFIG=str(self.config_path),
            PYTHONDONTWRITEBYTECODE="1",
        )
        self.proc: subprocess.Popen[bytes] | None = None
        self.children: list[subprocess.Popen[Any]] = []

    def start(self) -> Daemon:
        argv = [
            sys.executable,
            "-m",
            "chronos.daemon.main",
            "--state-dir",
            str(self.base),
            "--socket",
            str(self.sock),
            "--config",
            str(self.config_path),
            *self.args,
        ]
        with open(self.log_path, "ab") as err:
            self.proc = subprocess.Popen(
                argv,
                env=self.env,
                stdin=subprocess.DEVNULL,
                stdout=subprocess.DEVNULL,
                stderr=err,
                cwd="/",
            )
        wait_for(lambda: self.logged("started") or self._died(), 15, what="chronosd to start")
        return self

    def _died(self) -> bool:
        assert self.proc is not None
        if self.proc.poll() is not None:
            raise AssertionError(f"chronosd exited {self.proc.returncode}:\n{self.log_text()}")
        return False

    def log_text(self) -> str:
        return self.log_path.read_text(errors="replace") if self.log_path.exists() else ""

    def logged(self, event: str) -> dict[str, Any] | None:
        for line in self.log_text().splitlines():
            with contextlib.suppress(ValueError):
                record = json.loads(line)
                if isinstance(record, dict) and record.get("event") == event:
                    return record
        return None

    def address_of(self, event: str) -> str:
        """``host:port`` a server logged it listens on (``metrics_serving``, …)."""
        record = wait_for(lambda: self.logged(event), 5, what=f"log event {event}")
        return str(record["address"])

    def cli(
        self, *args: str, timeout: float = 30, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = subprocess.run(
            [sys.executable, "-m", "chronos.cli", *args],
            env={**self.env, "CHRONOS_MODE": "daemon", **(env or {})},
            capture_output=True,
            text=True,
            timeout=timeout,
            cwd="/",
        )
        if check:
            assert proc.returncode == 0, f"chronos {' '.join(args)}: {proc.stderr}"
        return proc

    def cli_json(self, *args: str) -> Any:
        return json.loads(self.cli(*args, "--json").stdout)

    def spawn(
        self, argv: list[str], env: dict[str, str] | None = None, **kwargs: Any
    ) -> subprocess.Popen[Any]:
        """A background process, ended at teardown (its whole process group)."""
        kwargs.setdefault("cwd", "/")
        proc = subprocess.Popen(
            argv,
            env={**self.env, "CHRONOS_MODE": "daemon", **(env or {})},
            stdin=subprocess.DEVNULL,
            start_new_session=True,
            **kwargs,
        )
        self.children.append(proc)
        return proc

    def stop(self) -> None:
        for child in self.children:
            if child.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(child.pid, signal.SIGKILL)
                child.wait(10)
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait(10)
        shutil.rmtree(self.base, ignore_errors=True)


def http_get(
    url: str, headers: dict[str, str] | None = None, method: str = "GET", timeout: float = 10
) -> tuple[int, dict[str, str], bytes]:
    request = urllib.request.Request(url, headers=headers or {}, method=method)
    try:
        with urllib.request.urlopen(request, timeout=timeout) as reply:
            return reply.status, dict(reply.headers.items()), reply.read()
    except urllib.error.HTTPError as exc:
        return exc.code, dict(exc.headers.items()), exc.read()


def python_holding(partition_memory: int, device: int, seconds: float = 120) -> list[str]:
    """argv of a Python process that declares ``partition_memory`` bytes on ``device``, then
    sleeps (it counts toward whatever partition its environment names)."""
    code = (
        "import os, sys, time\n"
        "from chronos.devices.simulated import declare_process\n"
        f"declare_process(os.getpid(), {device}, {partition_memory})\n"
        "print('ready', flush=True)\n"
        f"time.sleep({seconds})\n"
    )
    return [sys.executable, "-c", code]


@contextlib.contextmanager
def dashboard_process(daemon: Daemon, bind: str = "127.0.0.1:0") -> Iterator[str]:
    """``chronos dashboard --bind BIND`` against ``daemon``; yields its URL."""
    proc = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "dashboard", "--bind", bind],
        env={**daemon.env, "CHRONOS_MODE": "daemon"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
        start_new_session=True,
    )
    try:
        assert proc.stdout is not None
        line = proc.stdout.readline()
        match = re.search(r"(http://\S+/)", line)
        assert match, f"no URL in {line!r}; stderr: {proc.stderr.read() if proc.stderr else ''}"
        yield match.group(1)
    finally:
        proc.send_signal(signal.SIGINT)
        try:
            proc.wait(10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(10)


def find_browser() -> str | None:
    """Why the browser tests cannot run here, or None when they can."""
    if not os.path.exists(CHROMIUM):
        return f"{CHROMIUM} is missing (apt-get install chromium; .ci/run installs it)"
    try:
        import playwright.sync_api  # noqa: F401
    except ImportError:
        return "playwright is not installed (pip install -e '.[test]')"
    return None
