"""What an API partition's end does to the process that made it (``on_expiry=``).

What Chronos enforces is the GPU, not the process. A script's partition ends
the way it always did (``"terminate"``: SIGTERM at the end, so the GPU is freed
on time). In an interactive interpreter — a Jupyter kernel, the REPL — a SIGTERM
would throw away hours of state, so there the default is ``"raise"``: at the
end, a process that holds no memory on the partition's GPU is left alone; one
that holds memory is warned and gets :class:`~chronos.errors.PartitionEnded`
raised in its main thread (so ``finally:`` blocks run and the cell shows why),
and SIGTERM only if it still holds the memory after the partition's grace.
``"notify"`` is the same without the exception.

The warning, the exception and (in an interactive interpreter) ``on_expiring``
callbacks run in the main thread, where a notebook shows their output in the
cell: the expiry thread queues them and wakes the main thread with
:data:`WAKE_SIGNAL` (ignored by default, used by nothing else), whose Python
handler runs them. In a Jupyter kernel the exception is raised only while a
cell runs; an idle kernel just prints the warning.

In daemon mode the daemon does the signalling (``daemon/stopper.py``, which
knows the choice from the partition's kind: ``api``, ``api-raise``,
``api-notify``); this module then only warns and raises.
"""

from __future__ import annotations

import contextlib
import functools
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from types import FrameType
from typing import TYPE_CHECKING, Any

from chronos.errors import BadRequest, PartitionEnded
from chronos.models import ACTIVE, BOOKED, EXPIRED
from chronos.stopping import Escalation, Stage
from chronos.vocabulary import Mode, Origin

if TYPE_CHECKING:
    from chronos.api import Partition

TERMINATE = "terminate"
RAISE = "raise"
NOTIFY = "notify"
ON_EXPIRY = (TERMINATE, RAISE, NOTIFY)
KIND_OF = {TERMINATE: Origin.API, RAISE: Origin.API_RAISE, NOTIFY: Origin.API_NOTIFY}
"""The partition kind that tells the daemon the choice (stored; no schema change)."""
WAKE_SIGNAL = signal.SIGURG
"""Wakes the main thread to run queued calls (its default action is to ignore it)."""
DEFAULT_GRACE_S = 30.0
WARN_AHEAD_S = 60.0
"""With ``raise``/``notify``, a process that holds GPU memory is told this long before the
end (a tenth of the partition's duration if that is shorter)."""


def interactive() -> bool:
    """Whether this is an interactive interpreter: the REPL, ``python -i``, IPython, Jupyter.

    An IPython shell is asked for (``get_ipython()``), not just ipykernel being imported:
    a script or a test run that merely imports it stays a script.
    """
    # ``in vars(sys)``, not hasattr: a missing module attribute costs a formatted
    # AttributeError, on every create.
    return "ps1" in vars(sys) or bool(sys.flags.interactive) or _ipython() is not None


def choose(on_expiry: str | None) -> str:
    """The ``on_expiry`` value to use: the one given (checked), else by the interpreter."""
    if on_expiry is None:
        return RAISE if interactive() else TERMINATE
    if on_expiry not in ON_EXPIRY:
        raise BadRequest(f"on_expiry must be one of {', '.join(ON_EXPIRY)}, not {on_expiry!r}")
    return on_expiry


# ------------------------------------------------------------ the main thread


class MainThreadCalls:
    """Calls queued by any thread and run in the main thread, woken by a signal.

    Installed once per process, from the main thread (signal handlers can only
    be set there); elsewhere :meth:`install` returns None and callers fall back
    to their own thread.
    """

    _instance: MainThreadCalls | None = None

    def __init__(self) -> None:
        self._queue: list[Callable[[], None]] = []
        self._lock = threading.Lock()
        self._main = threading.main_thread().ident
        self._previous = signal.signal(WAKE_SIGNAL, self._handle)
        self._cells = _CellTracker.attach()

    @classmethod
    def install(cls) -> MainThreadCalls | None:
        if cls._instance is None:
            if threading.current_thread() is not threading.main_thread():
                return None
            try:
                cls._instance = cls()
            except (ValueError, OSError):
                return None
        return cls._instance

    def call(self, fn: Callable[[], None]) -> None:
        """Run ``fn`` in the main thread as soon as it runs Python code."""
        with self._lock:
            self._queue.append(fn)
        if self._main is not None:
            with contextlib.suppress(OSError):
                signal.pthread_kill(self._main, WAKE_SIGNAL)

    def may_raise(self) -> bool:
        """Whether an exception now lands in user code (not in a Jupyter kernel's idle loop)."""
        return self._cells is None or self._cells.running

    def _handle(self, signum: int, frame: FrameType | None) -> None:
        with self._lock:
            calls, self._queue = self._queue, []
        ended: PartitionEnded | None = None
        for fn in calls:
            try:
                fn()
            except PartitionEnded as exc:  # raised below, once every queued call has run
                ended = ended or exc
        if callable(self._previous):
            self._previous(signum, frame)
        if ended is not None:
            raise ended  # into the code the main thread runs: its finally: blocks run


class _CellTracker:
    """Whether an IPython cell is running now, from IPython's own events."""

    def __init__(self) -> None:
        self.running = True  # created from code a cell runs

    @classmethod
    def attach(cls) -> _CellTracker | None:
        shell = _ipython()
        if shell is None:
            return None
        tracker = cls()
        shell.events.register("pre_run_cell", tracker._started)
        shell.events.register("post_run_cell", tracker._ended)
        return tracker

    def _started(self, *_: Any) -> None:
        self.running = True

    def _ended(self, *_: Any) -> None:
        self.running = False


def _ipython() -> Any:
    ipython = sys.modules.get("IPython")
    get = getattr(ipython, "get_ipython", None)
    return get() if get is not None else None


# ------------------------------------------------------------ the monitor


class ExpiryMonitor:
    """A background thread that keeps a partition's deadlines in this process.

    It runs ``on_expiring`` callbacks and acts on the end as ``on_expiry`` says.
    Where no daemon runs (embedded mode) it also does what the daemon would:
    the ledger records the expiry, and this process and the processes attached
    to it get SIGTERM (at once with ``terminate``; after the grace, and only
    those still holding GPU memory, otherwise).
    """

    def __init__(self, partition: Partition, on_expiry: str = TERMINATE) -> None:
        self.partition = partition
        self.on_expiry = on_expiry
        self._warnings: list[tuple[float, Callable[[Partition], Any]]] = []
        self._wake = threading.Event()
        self._stopped = False
        self._main = MainThreadCalls.install() if self._in_main_thread_context() else None
        if on_expiry != TERMINATE:
            r = partition.record
            ahead = min(WARN_AHEAD_S, (r.expires_at - r.starts_at) / 10)
            self._warnings.append((ahead, self._warn_ahead))
        self._thread = threading.Thread(
            target=self._run, name=f"chronos-{partition.id}", daemon=True
        )
        self._thread.start()

    def _in_main_thread_context(self) -> bool:
        """Deliver to the main thread where output must reach it: interactive or gentle."""
        return self.on_expiry != TERMINATE or interactive()

    def add_warning(self, seconds_before: float, callback: Callable[[Partition], Any]) -> None:
        self._warnings.append((seconds_before, callback))
        self._wake.set()

    def stop(self) -> None:
        self._stopped = True
        self._wake.set()

    def _run(self) -> None:
        while not self._stopped:
            now = time.time()
            record = self.partition.record
            if record.state_at(now) not in (ACTIVE, BOOKED):
                if self._expire():
                    return
                continue  # extended by another process: keep the new deadline
            due = [(s, cb) for s, cb in self._warnings if now >= record.expires_at - s]
            for item in due:
                self._warnings.remove(item)
                if item[1] == self._warn_ahead:
                    self._warn_ahead(self.partition)  # asks for memory here, prints in main
                else:
                    self._in_main(functools.partial(self._callback, item[1]))
            times = [record.expires_at - s for s, _ in self._warnings] + [record.expires_at]
            self._wake.wait(max(0.0, min(times) - time.time()))
            self._wake.clear()

    def _callback(self, callback: Callable[[Partition], Any]) -> None:
        try:
            callback(self.partition)
        except Exception:  # a failing callback must not stop the deadline keeping
            import traceback  # only on a failing callback: not on every import

            traceback.print_exc()

    def _in_main(self, fn: Callable[[], None]) -> None:
        if self._main is not None:
            self._main.call(fn)
        else:
            fn()

    def _expire(self) -> bool:
        """The end as last known has passed: act on it; False if it lives on (extended)."""
        p = self.partition
        if self._stopped or p.record.owner_pid != os.getpid():
            return True
        embedded = p.mode == Mode.EMBEDDED
        if not embedded and self.on_expiry == TERMINATE:
            return True  # the daemon stops this process
        attached: list[dict[str, Any]] = []
        try:
            p.refresh()  # reaps it: the ledger records the expiry
            if embedded:
                attached = p.attached_pids()
        except Exception:  # noqa: BLE001 - e.g. the client was closed: the clock still rules
            pass
        if p.record.state_at(time.time()) in (ACTIVE, BOOKED):
            return False
        if p.record.state_at(time.time()) != EXPIRED:
            return True  # released meanwhile
        if self.on_expiry == TERMINATE:
            self._terminate(attached)
        else:
            self._end_gently(attached, signal_here=embedded)
        return True

    def _terminate(self, attached: list[dict[str, Any]]) -> None:
        from chronos import procs

        for a in attached:
            procs.signal_process(a["pid"], a["start_ticks"], signal.SIGTERM)
        os.kill(os.getpid(), signal.SIGTERM)

    def _end_gently(self, attached: list[dict[str, Any]], signal_here: bool) -> None:
        """Warn (and raise) now; SIGTERM after the grace what still holds the GPU."""
        record = self.partition.record
        grace = record.grace_s if record.grace_s is not None else DEFAULT_GRACE_S
        plan = Escalation(grace, warn_first=True, last=Stage.TERMINATED)
        plan.begin(time.time())
        held = self._held_bytes()
        message = self._ended_message(held, grace)
        raising = self.on_expiry == RAISE and bool(held)
        self._in_main(lambda: self._tell(message, raising))
        if not signal_here:
            return  # the daemon sends the SIGTERM after the grace, if the memory is still held
        self._wake.wait(grace)
        if self._stopped:
            return
        plan.advance(time.time())
        from chronos import procs

        held_now = self._held_by_pid()
        for a in attached:
            if held_now.get(a["pid"]):
                procs.signal_process(a["pid"], a["start_ticks"], signal.SIGTERM)
        if held_now.get(os.getpid()):
            os.kill(os.getpid(), signal.SIGTERM)

    def _warn_ahead(self, partition: Partition) -> None:
        """Before the end: a process that holds GPU memory is told what is coming.

        Runs in the expiry thread (it asks the backends or the daemon, which must not
        happen inside a signal handler of a main thread that may be mid-call itself).
        """
        from chronos.units import format_bytes, format_duration, local_clock

        held = self._held_bytes()
        if not held:
            return
        r = partition.record
        left = format_duration(max(0.0, r.expires_at - time.time()))
        then = "PartitionEnded is raised" if self.on_expiry == RAISE else "you are told"
        message = (
            f"chronos: partition {r.id} ends at {local_clock(r.expires_at)} (in {left}); this "
            f"process holds {format_bytes(held)} on GPU {r.device}: save your work ({then} "
            "then, and the process gets SIGTERM if it still holds the memory after the grace)"
        )
        self._in_main(functools.partial(print, message, file=sys.stderr, flush=True))

    def _tell(self, message: str, raising: bool) -> None:
        """In the main thread: the warning (on stderr, each time), then (``raise``) the error."""
        print(f"chronos: {message}", file=sys.stderr, flush=True)
        if raising and (self._main is None or self._main.may_raise()):
            raise PartitionEnded(message)

    def _ended_message(self, held: int | None, grace: float) -> str:
        from chronos.units import format_bytes, format_duration, local_clock

        r = self.partition.record
        ended = f"partition {r.id} ended at {local_clock(r.expires_at)}"
        if not held:
            return f"{ended}; this process holds no memory on GPU {r.device} and goes on"
        return (
            f"{ended}; this process still holds {format_bytes(held)} on GPU {r.device}: free it "
            f"within {format_duration(grace)} (del tensors, torch.cuda.empty_cache()) or the "
            "process gets SIGTERM"
        )

    def _held_bytes(self) -> int | None:
        """This process's memory on the partition's GPU now (None: cannot be known)."""
        return self._held_by_pid().get(os.getpid())

    def _held_by_pid(self) -> dict[int, int]:
        """Memory per process on the partition's GPU, from the backends or the daemon."""
        p = self.partition
        try:
            service = p.local_service
            if service is not None:
                return {
                    proc.pid: proc.used_bytes or 0
                    for proc in service.machine.processes()
                    if proc.device_uuid == p.record.device_uuid
                }
            stats = p.device_stats()
        except Exception:  # noqa: BLE001 - unknown counts as holding: the safe side for the GPU
            return {os.getpid(): 1}
        for device in stats["devices"]:
            if device.get("uuid") == p.record.device_uuid:
                return {q["pid"]: q.get("used_bytes") or 0 for q in device.get("processes", [])}
        return {}
