"""``chronos run``: run a command inside a partition for as long as it lasts.

The supervisor owns the partition (it ends when the supervisor exits, even by
SIGKILL) and becomes a child subreaper, so descendants that double-fork stay
its children and are found and stopped with the rest. It waits for signals
with ``sigtimedwait`` so expiry acts at the exact deadline, not at a poll tick.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import sys
import time
from collections.abc import Callable, Sequence
from typing import Any, NoReturn

from chronos import procs
from chronos.api import Partition, Partitioner
from chronos.attribution import MARKER
from chronos.devices import Machine
from chronos.enforcement import MemoryWatch, Violation
from chronos.errors import (
    BadRequest,
    ChronosError,
    CommandNotRunnable,
    PartitionEnded,
    PermissionDenied,
)
from chronos.models import ProcessUse
from chronos.stopping import Escalation
from chronos.units import format_bytes, format_duration, local_clock
from chronos.vocabulary import EventKind, Mode, Origin, PartitionState

EXPIRED_EXIT = 124
"""Exit status of ``chronos run`` when the partition's end stopped the command."""
NOT_EXECUTABLE_EXIT = 126
NOT_FOUND_EXIT = 127
"""As ``timeout``, ``env`` and ``docker run``: the command is there but cannot run / is not."""

_WATCHED = (signal.SIGCHLD, signal.SIGTERM, signal.SIGHUP, signal.SIGINT, signal.SIGQUIT)
_FORWARDED = (signal.SIGTERM, signal.SIGHUP)
DEFAULT_GRACE_S = 30.0
DAEMON_FALLBACK_S = 0.5
"""With a daemon, it stops the processes at expiry; we act only if it has not."""


def say(message: str) -> None:
    print(f"chronos: {message}", file=sys.stderr, flush=True)


def check_program(name: str) -> str:
    """The program ``name`` would run (a path), checked before anything is reserved.

    Raises :class:`CommandNotRunnable` (exit 127 if not found, 126 if not
    executable), as ``timeout`` and ``docker run`` do.
    """
    if not name:
        raise CommandNotRunnable("no command given", NOT_FOUND_EXIT)
    if "/" in name:
        if not os.path.exists(name):
            raise CommandNotRunnable(f"cannot run {name!r}: no such file", NOT_FOUND_EXIT)
        if os.path.isdir(name) or not os.access(name, os.X_OK):
            raise CommandNotRunnable(f"cannot run {name!r}: not executable", NOT_EXECUTABLE_EXIT)
        return name
    found = shutil.which(name)
    if found is None:
        raise CommandNotRunnable(f"cannot run {name!r}: command not found", NOT_FOUND_EXIT)
    return found


def reuse_partition(outer: str | None, program: str, command: Sequence[str]) -> NoReturn:
    """Become ``command`` inside the partition this process already runs in.

    The outer ``chronos run`` (or API partition) counts its descendants and the
    ``CHRONOS_PARTITION_ID`` marker, so the command stays accounted to it.
    """
    if not outer:
        raise BadRequest("--reuse: not inside a partition (CHRONOS_PARTITION_ID is not set)")
    client = Partitioner()
    try:
        record = client.get(outer).record
    finally:
        client.close()
    state = record.state_at(time.time())
    if state != PartitionState.ACTIVE:
        raise PartitionEnded(f"--reuse: partition {record.id} is {state}, not active")
    if record.uid != os.getuid() and os.getuid() != 0:
        # The variable is the caller's to set: it names a partition, it does not grant one.
        raise PermissionDenied(
            f"--reuse: partition {record.id} belongs to {record.user}; a command runs only "
            "in a partition of its own user"
        )
    sys.stdout.flush()
    os.execv(program, list(command))


def run_in_partition(
    device: int | dict[str, Any],
    memory: str,
    duration: str,
    grace: str | None,
    command: Sequence[str],
    *,
    argv0: str | None = None,
    wait: bool = False,
    timeout: str | None = None,
    on_wait: Callable[[dict[str, Any]], Any] | None = None,
) -> tuple[int, dict[str, Any]]:
    """Run ``command`` in a new partition; return its exit code and a summary.

    ``device``: a GPU index, or ``Partitioner.create``'s GPU arguments (``{"gpus": 2}``,
    ``{"devices": [0, 1]}``, ``{"device": "auto"}``). ``command[0]`` is the program's
    path (see :func:`check_program`); ``argv0``
    the name the user typed, which the program sees as its ``argv[0]``. With
    ``wait`` a request that does not fit now waits in the fair queue first.
    """
    client = Partitioner()
    try:
        partition = client.create(
            **(device if isinstance(device, dict) else {"device": device}),
            memory=memory,
            duration=duration,
            kind=Origin.RUN,
            grace=grace,
            wait=wait,
            timeout=timeout,
            on_wait=on_wait,
        )
    except BaseException:
        client.close()
        raise
    finally:
        done = getattr(on_wait, "done", None)
        if done is not None:
            done()
    supervisor = Supervisor(partition, client.mode)
    try:
        code = supervisor.run(command, argv0)
    finally:
        with contextlib.suppress(PartitionEnded, ChronosError):
            partition.release()
        with contextlib.suppress(ChronosError):
            partition.refresh()
        client.close()
    stopped = (
        "expired" if supervisor.expired else "memory" if supervisor.stopped_for_memory else None
    )
    return code, {"partition": partition.to_json(), "exit_code": code, "stopped_by": stopped}


class Supervisor:
    def __init__(self, partition: Partition, mode: str) -> None:
        self.partition = partition
        self.mode = mode
        self.grace = partition.record.grace_s
        if self.grace is None:
            self.grace = DEFAULT_GRACE_S
        self.expired = False
        self.stopped_for_memory = False
        self.stopping: Escalation | None = None
        """Our own SIGTERM → SIGKILL of the command, once begun (expiry or memory)."""
        self.daemon_stops = False
        """chronosd is stopping the command (it sends the SIGKILL): wait for the exits."""
        self.memory = EmbeddedMemoryCap.for_partition(partition) if mode == Mode.EMBEDDED else None

    def members(self) -> dict[int, int]:
        me = os.getpid()
        pids = procs.descendants([me]) | procs.pids_with_marker(
            MARKER, self.partition.id, os.getuid()
        )
        pids.discard(me)
        return procs.snapshot(pids)

    def run(self, command: Sequence[str], argv0: str | None = None) -> int:
        procs.set_child_subreaper()
        env = {**os.environ, **self.partition.limits_env()}
        signal.pthread_sigmask(signal.SIG_BLOCK, _WATCHED)
        # The child waits on this pipe before exec, so the daemon has attached it (and placed
        # it in the partition's cgroup) before the command can run or fork anything.
        try:
            child = Gated(command, env, argv0)
            if self.mode == Mode.DAEMON:
                self.partition.attach(child.pid)
            error = child.release()
            if error is not None:  # checked before reserving; it changed since
                say(f"cannot run {argv0 or command[0]!r}: {error}")
                os.waitpid(child.pid, 0)
                return NOT_FOUND_EXIT
            return self._wait(child.pid)
        finally:
            signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)

    def _wait(self, child_pid: int) -> int:
        status: int | None = None
        expires_at = self.partition.record.expires_at
        deadline = expires_at + (DAEMON_FALLBACK_S if self.mode == Mode.DAEMON else 0.0)
        while True:
            status, remaining = self._reap(child_pid, status)
            if not remaining:
                break
            info = self._next_signal(self._wake_at(deadline))
            if info is None:
                self._on_time(deadline, expires_at)
            elif info.si_signo in _FORWARDED or (
                info.si_signo == signal.SIGINT and info.si_code <= 0  # kill(), not the tty
            ):
                procs.signal_all(self.members(), info.si_signo)
        if self.mode == Mode.DAEMON:
            self._report_daemon_actions()
        if not self.expired and time.time() >= expires_at and not self.stopped_for_memory:
            self.expired = True
            say(
                f"partition {self.partition.id} expired at {local_clock(expires_at)}; "
                "chronosd stopped the command"
            )
        if self.expired:
            return EXPIRED_EXIT
        code = _exit_code(status)
        return code if code or not self.stopped_for_memory else 1

    def _wake_at(self, deadline: float) -> float | None:
        """When to act next without a signal; None: only a signal (a child's exit) wakes us."""
        if self.daemon_stops:
            return None
        if self.stopping is not None:
            return self.stopping.due_at  # the SIGKILL; None once it was sent
        if self.memory is not None:
            return min(deadline, self.memory.next_sample)
        return deadline

    def _on_time(self, deadline: float, expires_at: float) -> None:
        if self.stopping is not None:
            self._escalate()
        elif time.time() < deadline:
            self._sample_memory()
        else:
            self._on_deadline(expires_at)

    @staticmethod
    def _next_signal(wake: float | None) -> signal.struct_siginfo | None:
        """Wait for a watched signal until ``wake`` (for ever if None)."""
        if wake is None:
            return signal.sigwaitinfo(_WATCHED)
        return signal.sigtimedwait(_WATCHED, max(0.0, wake - time.time()))

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
        if self.mode == Mode.DAEMON and self._daemon_ended_it():
            self.expired = True
            say(
                f"partition {self.partition.id} expired at {local_clock(expires_at)}; "
                "chronosd is stopping the command (SIGTERM, then SIGKILL after the grace)"
            )
            self.daemon_stops = True
            return
        self.expired = True
        sent = self._begin_stop(self.grace or 0.0)
        say(
            f"partition {self.partition.id} expired at {local_clock(expires_at)}: sent "
            f"SIGTERM to {sent} process(es); SIGKILL in {format_duration(self.grace or 0)} "
            "if still running"
        )

    def _begin_stop(self, grace_s: float) -> int:
        """SIGTERM the command's processes now (SIGKILL after ``grace_s``); how many got it."""
        self.stopping = Escalation(grace_s)
        self.stopping.begin(time.time())
        return procs.signal_all(self.members(), signal.SIGTERM)

    def _escalate(self) -> None:
        """The stop's next stage, if due: the SIGKILL of what is still running."""
        assert self.stopping is not None
        stage = self.stopping.advance(time.time())
        if stage is None or self.stopping.signal is None:
            return
        killed = procs.signal_all(self.members(), self.stopping.signal)
        if killed:
            say(f"sent SIGKILL to {killed} process(es) still running after the grace period")

    def _sample_memory(self) -> None:
        assert self.memory is not None
        violation = self.memory.check(self.members())
        if violation is None:
            return
        self.stopped_for_memory = True
        say(
            f"partition {self.partition.id}: the command held {format_bytes(violation.used_bytes)}"
            f" of GPU {violation.device}, over the partition's "
            f"{format_bytes(violation.allowed_bytes)}; stopping it"
        )
        self._begin_stop(self.memory.grace_s)
        self.expired = False

    def _report_daemon_actions(self) -> None:
        try:
            events = self.partition.events()
        except ChronosError:
            return
        for event in events:
            if event["kind"] == EventKind.MEMORY_EXCEEDED:
                d = event["detail"]
                self.stopped_for_memory = True
                say(
                    f"chronosd stopped the command: partition {self.partition.id}'s processes "
                    f"held {format_bytes(d['used_bytes'])} of GPU {d['device']}, over its "
                    f"{format_bytes(d['allowed_bytes'])}"
                )

    def _daemon_ended_it(self) -> bool:
        try:
            return self.partition.state != PartitionState.ACTIVE
        except ChronosError:
            return False


class Gated:
    """A forked child that execs the command only once :meth:`release` lets it.

    subprocess.Popen returns only after exec, so it cannot hold a child back
    while the daemon attaches it; a plain fork can.
    """

    def __init__(
        self, command: Sequence[str], env: dict[str, str], argv0: str | None = None
    ) -> None:
        gate_read, self._gate = os.pipe()
        self._errors, errors_write = os.pipe2(os.O_CLOEXEC)
        self.pid = os.fork()
        if self.pid == 0:  # the child: wait for the gate, then become the command
            try:
                os.close(self._gate)
                os.close(self._errors)
                signal.pthread_sigmask(signal.SIG_UNBLOCK, _WATCHED)
                # If the supervisor is killed (even by SIGKILL), the command gets SIGTERM.
                procs.set_parent_death_signal(signal.SIGTERM)
                os.read(gate_read, 2)
                os.execvpe(command[0], [argv0 or command[0], *command[1:]], env)
            except OSError as exc:
                os.write(errors_write, (exc.strerror or str(exc)).encode())
            finally:
                os._exit(127)
        os.close(gate_read)
        os.close(errors_write)

    def release(self) -> str | None:
        """Let the child exec; return why exec failed, or None once it succeeded."""
        os.write(self._gate, b"go")
        os.close(self._gate)
        with os.fdopen(self._errors, "rb") as errors:
            message = errors.read()  # EOF at a successful exec (close-on-exec)
        return message.decode(errors="replace") or None


def _exit_code(status: int | None) -> int:
    if status is None:
        return 1
    if os.WIFSIGNALED(status):
        return 128 + os.WTERMSIG(status)
    return os.WEXITSTATUS(status)


class EmbeddedMemoryCap:
    """With no daemon, ``chronos run`` samples its own processes' GPU memory."""

    def __init__(
        self, partition: Partition, machine: Machine, interval_s: float, grace_s: float
    ) -> None:
        self.partition = partition
        self.machine = machine
        self.interval_s = interval_s
        self.grace_s = grace_s
        self.watch = MemoryWatch(grace_s=grace_s, unpartitioned="off")
        self.next_sample = time.time()

    @classmethod
    def for_partition(cls, partition: Partition) -> EmbeddedMemoryCap | None:
        service = partition.local_service
        if service is None:
            return None
        try:
            machine = service.machine
        except ChronosError:
            return None
        config = service.config
        return cls(partition, machine, config.sample_interval_s, config.memory_grace_s)

    def check(self, members: dict[int, int]) -> Violation | None:
        now = time.time()
        self.next_sample = now + self.interval_s
        record = self.partition.record
        found = [
            ProcessUse(
                pid=p.pid,
                device=record.device,
                used_bytes=p.used_bytes,
                user=None,
                command=None,
                partition_id=record.id,
            )
            for p in self.machine.processes()
            if p.pid in members and p.device_uuid == record.device_uuid
        ]
        violations = self.watch.observe(now, [record], found)
        return violations[0] if violations else None
