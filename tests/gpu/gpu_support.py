"""Shared pieces of the GPU suites: a real daemon on the NVML backend, and timing files."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import pytest
from helpers import GIB as GIB


def nvml_ready() -> str | None:
    """None if a real NVIDIA GPU is usable here, else why not."""
    try:
        from chronos.devices.nvidia import NvidiaBackend

        backend = NvidiaBackend()
        devices = backend.devices()
        backend.close()
    except Exception as exc:  # noqa: BLE001 - any failure means "no GPU here"
        return f"no usable NVIDIA GPU: {exc}"
    return None if devices else "NVML lists no GPU"


def shared_tmpdir() -> Path:
    path = Path(tempfile.mkdtemp(prefix="chronos-gpu-", dir="/tmp"))
    path.chmod(0o755)
    return path


@pytest.fixture(name="out")
def events_out() -> Path:
    """Where a GPU program writes its JSON events: a file in a directory every test
    account may write (the programs run as other users too). Test modules import it."""
    path = shared_tmpdir() / "events.jsonl"
    path.parent.chmod(0o777)
    return path


@contextmanager
def real_daemon(extra_env: dict[str, str] | None = None) -> Iterator[dict[str, str]]:
    """A chronosd on the NVIDIA backend; yields the environment its clients need."""
    home = shared_tmpdir()
    env = {
        **os.environ,
        "CHRONOS_BACKEND": "nvidia",
        "CHRONOS_HOME": str(home),
        "CHRONOS_SOCKET": str(home / "chronosd.sock"),
        "CHRONOS_MODE": "daemon",
        "PYTHONUNBUFFERED": "1",
        **(extra_env or {}),
    }
    env.pop("CHRONOS_CONFIG", None)
    with open(home / "daemon.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "chronos.daemon.main"], env=env, stderr=log)
        try:
            deadline = time.time() + 30
            while not (home / "chronosd.sock").exists():
                if proc.poll() is not None or time.time() > deadline:
                    raise RuntimeError(
                        f"chronosd did not start: {(home / 'daemon.log').read_text()}"
                    )
                time.sleep(0.05)
            env["CHRONOS_TEST_DAEMON_LOG"] = str(home / "daemon.log")
            yield env
        finally:
            proc.terminate()
            proc.wait(timeout=30)


def chronos(
    env: dict[str, str], *args: str, user: str | None = None, timeout: float = 300
) -> subprocess.CompletedProcess[str]:
    prefix: list[str] = []
    if user is not None:
        prefix = [
            "runuser",
            "-u",
            user,
            "--",
            "env",
            *[f"{k}={v}" for k, v in env.items() if k.startswith(("CHRONOS", "PYTHON", "PATH"))],
        ]
    return subprocess.run(
        [*prefix, sys.executable, "-m", "chronos.cli", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def read_events(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def nvml_pid_bytes(pid: int) -> int | None:
    """Bytes NVML reports for ``pid`` on any GPU, or None if it holds none."""
    import pynvml

    pynvml.nvmlInit()
    total = None
    for i in range(pynvml.nvmlDeviceGetCount()):
        handle = pynvml.nvmlDeviceGetHandleByIndex(i)
        for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
            if p.pid == pid:
                total = (total or 0) + (p.usedGpuMemory or 0)
    return total


def wait_pid_freed(pid: int, timeout: float = 10.0) -> float | None:
    """Seconds until NVML no longer lists ``pid`` (polled every 5 ms), or None."""
    start = time.time()
    while time.time() - start < timeout:
        if nvml_pid_bytes(pid) is None:
            return time.time()
        time.sleep(0.005)
    return None
