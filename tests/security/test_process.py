"""Attacks on the gentle end of ``on_expiry="raise"``/``"notify"`` partitions.

A process whose partition ends gently is only warned at the end. These tests make
sure that this grace cannot be turned into keeping the GPU: the memory stays
committed (nobody else is admitted into it) while the process still holds it, and
a process that ignores SIGTERM is SIGKILLed one grace later, like any other.
"""

from __future__ import annotations

import signal
import subprocess
import sys
import textwrap
import time

import pytest
from chronos_testing import DaemonProcess, wait_for

from chronos.errors import ChronosError

GRACE_S = 2.0

KEEPS_THE_GPU = f"""
import os, signal, time
from chronos import Partitioner
from chronos.devices.simulated import declare_process
signal.signal(signal.SIGTERM, signal.SIG_IGN)  # and ignores every SIGTERM
p = Partitioner().create(device=0, memory="70GiB", duration=2, grace={GRACE_S},
                         on_expiry="notify")
declare_process(os.getpid(), 0, 70 << 30)
print(p.id, flush=True)
time.sleep(120)
"""


def test_a_gentle_end_cannot_be_used_to_keep_the_gpu(daemon: DaemonProcess) -> None:
    env = {**daemon.env, "CHRONOS_HOME": str(daemon.home)}
    holder = subprocess.Popen(
        [sys.executable, "-c", textwrap.dedent(KEEPS_THE_GPU)],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        assert holder.stdout is not None
        partition_id = holder.stdout.readline().strip()
        assert partition_id, holder.stderr.read() if holder.stderr else ""
        expires_at = daemon.call("get", id=partition_id)["expires_at"]
        wait_for(lambda: daemon.call("get", id=partition_id)["state"] == "expired", 10, "end")
        assert holder.poll() is None  # warned, not signalled, at the end
        with pytest.raises(ChronosError):  # the memory it still holds stays committed
            daemon.call("create", device=0, memory="40GiB", duration=5, persist=True)
        holder.wait(timeout=2 * GRACE_S + 10)
        assert holder.returncode == -signal.SIGKILL  # SIGTERM ignored: SIGKILL one grace later
        assert time.time() >= expires_at + 2 * GRACE_S
        granted = wait_for(
            lambda: _try_create(daemon), 10, "the memory to be free once the process is gone"
        )
        daemon.call("release", id=granted)
    finally:
        if holder.poll() is None:
            holder.kill()
        holder.communicate(timeout=10)


def _try_create(daemon: DaemonProcess) -> str | None:
    try:
        return str(daemon.call("create", device=0, memory="40GiB", duration=5, persist=True)["id"])
    except ChronosError:
        return None
