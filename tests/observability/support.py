"""Helpers of the observability tests: a real chronosd, the CLI, scrapes and a browser."""

from __future__ import annotations

import contextlib
import os
import re
import signal
import subprocess
import sys
import urllib.error
import urllib.request
from collections.abc import Iterator
from pathlib import Path

from chronos_testing import DaemonProcess
from chronos_testing import wait_for as wait_for  # re-exported for the tests
from helpers import GIB as GIB

ROOT = Path(__file__).resolve().parents[2]
ARTIFACTS = ROOT / "test-artifacts"
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


class Daemon(DaemonProcess):
    """A chronosd on a private state dir (simulated GPUs), with its own policy file.

    Its ``cli`` checks the command succeeded (``check=False``: not) and takes extra
    variables in ``env``.
    """

    def __init__(self, config: str = "", args: tuple[str, ...] = ()) -> None:
        super().__init__(config=config, args=args, prefix="chronos-obs-")

    def start(self, wait: bool = True, extra_env: dict[str, str] | None = None) -> Daemon:
        super().start(wait, extra_env)
        if wait:
            self.wait_event("started", timeout=15)
        return self

    def cli(  # type: ignore[override]
        self, *args: str, timeout: float = 30, check: bool = True, env: dict[str, str] | None = None
    ) -> subprocess.CompletedProcess[str]:
        proc = super().cli(*args, timeout=timeout, env={**self.env, **(env or {})})
        if check:
            assert proc.returncode == 0, f"chronos {' '.join(args)}: {proc.stderr}"
        return proc


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
        env=daemon.env,
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
        return "playwright is not installed (pip install -e '.[browser]')"
    return None
