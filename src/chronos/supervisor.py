"""``chronos run``: run a command inside a partition for as long as it lasts.

The supervisor owns the partition (it ends when the supervisor exits, even by
SIGKILL) and becomes a child subreaper, so descendants that double-fork stay
its children and are found and stopped with the rest. It waits for signals
with ``sigtimedwait`` so expiry acts at the exact deadline, not at a poll tick.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from collections.abc import Sequence

from chronos import procs
from chronos.api import Partition, Partitioner
from chronos.attribution import MARKER
from chronos.errors import ChronosError, PartitionEnded
from chronos.units import format_duration, local_clock

EXPIRED_EXIT = 124
"""Exit status of ``chronos run`` when the partition's end stopped the command."""

_WATCHED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)
DEFAULT_GRACE_S = 30.0
DAEMON_FALLBACK_S = 0.5
"""With a daemon, it stops the processes at expiry; we act only if it has not."""


def say(message: str) -> None:
    print(f"chronos: {message}", file=sys.stderr, flush=True)


def run_in_partition(device: int, memory: str, duration: str, grace: str | None,
                     command: Sequence[str]) -> int:
    client = Partitioner()
    partition = client.create(device=device, memory=memory, duration=duration, kind="run",
                              grace=grace)
    try:
        return Supervisor(partition, client.mode).run(command)
    finally:
        try:
            partition.release()
        except (PartitionEnded, ChronosError):
            pass
        client.close()


class Supervisor:
    def __init__(self, partition: Partition, mode: str) -> None:
        self.partition = partition
        self.mode = mode
        self.grace = partition.record.grace_s
        if self.grace is None:
            self.grace = DEFAULT_GRACE_S
        self.expired = False
        self.kill_at: float | None = None
        self.term_sent: dict[int, int] = {}

    def members(self) -> dict[int, int]:
        me = os.getpid()
        pids = procs.descendants([me]) | procs.pids_with_marker(MARKER, self.partition.id,
                                                                 os.getuid())
        pids.discard(me)
        return procs.snapshot(pids)

    def run(self, command: Sequence[str]) -> int:
        procs.set_child_subreaper()
        env = {**os.environ, **self.partition.env}
        signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        try:
            child = self._spawn(command, env)
            if child is None:
                return 127
            if self.mode == "daemon":
                self.partition.attach(child.pid)
            return self._wait(child.pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)

    def _spawn(self, command: Sequence[str], env: dict[str, str]) -> subprocess.Popen[bytes] | None:
        try:
            return subprocess.Popen(
                list(command), env=env,
                preexec_fn=lambda: signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED),
            )
        except OSError as exc:
            say(f"cannot run {command[0]!r}: {exc.strerror}")
            return None

    def _wait(self, child_pid: int) -> int:
        status: int | None = None
        expires_at = self.partition.record.expires_at
        deadline = expires_at + (DAEMON_FALLBACK_S if self.mode == "daemon" else 0.0)
        while True:
            status, remaining = self._reap(child_pid, status)
            if not remaining:
                break
            wake = self.kill_at if self.kill_at is not None else deadline
            timeout = None if wake == float("inf") else max(0.0, wake - time.time())
            info = (signal.sigtimedwait(_WATCHED, timeout) if timeout is not None
                    else signal.sigwaitinfo(_WATCHED))
            if info is None:
                self._on_deadline(expires_at)
            elif info.si_signo in _FORWARDED:
                procs.signal_all(self.members(), info.si_signo)
        if not self.expired and time.time() >= expires_at:
            self.expired = True
            say(f"partition {self.partition.id} expired at {local_clock(expires_at)}; "
                "chronosd stopped the command")
        if self.expired:
            return EXPIRED_EXIT
        return _exit_code(status)

    def _reap(self, child_pid: int, status: int | None) -> tuple[int | None, bool]:
        while True:
            try:
                pid, raw = os.waitpid(-1, os.WNOHANG)
            except ChildProcessError:
                return status, False
            if pid == 0:
                return status, True
            if pid == child_pid:
                status = raw

    def _on_deadline(self, expires_at: float) -> None:
        if self.kill_at is None and self.mode == "daemon" and self._daemon_ended_it():
            self.expired = True
            say(f"partition {self.partition.id} expired at {local_clock(expires_at)}; "
                "chronosd is stopping the command (SIGTERM, then SIGKILL after the grace)")
            self.kill_at = float("inf")
            return
        members = self.members()
        if self.kill_at is None:
            self.expired = True
            self.term_sent = members
            sent = procs.signal_all(members, signal.SIGTERM)
            say(f"partition {self.partition.id} expired at {local_clock(expires_at)}: sent "
                f"SIGTERM to {sent} process(es); SIGKILL in {format_duration(self.grace or 0)} "
                "if still running")
            self.kill_at = time.time() + (self.grace or 0.0)
        else:
            killed = procs.signal_all(members, signal.SIGKILL)
            if killed:
                say(f"sent SIGKILL to {killed} process(es) still running after the grace period")
            self.kill_at = time.time() + 3600.0


    def _daemon_ended_it(self) -> bool:
        try:
            return self.partition.state != "active"
        except ChronosError:
            return False


def _exit_code(status: int | None) -> int:
    if status is None:
        return 1
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)
