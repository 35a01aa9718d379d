"""Processes: identity that survives PID reuse, and signalling them safely.

A PID alone is not an identity: after a process exits the kernel may give its
number to a new one. Chronos records ``(pid, start_ticks)`` (field 22 of
``/proc/<pid>/stat``) and checks both before it signals, and signals through a
pidfd where the kernel has one so the check and the kill name the same process.
"""

from __future__ import annotations

import errno
import os
import pwd
import signal
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass

from chronos.errors import BadRequest

PROC = "/proc"
"""The one /proc root every reader here (and cgroups, Slurm membership, DRM) uses.

Read at each call, so tests point it at a fixture tree (``mock.patch.object``)."""


@dataclass(frozen=True)
class ProcStat:
    """The fields of ``/proc/<pid>/stat`` Chronos uses, from one read of the file."""

    state: str
    """Field 3: ``R``, ``S``, ``Z`` (zombie), ``X`` (dead), …"""
    ppid: int
    """Field 4."""
    start_ticks: int
    """Field 22: start time in clock ticks since boot; with the pid, the identity."""

    @property
    def exited(self) -> bool:
        return self.state in ("Z", "X")


def read_stat(pid: int) -> ProcStat | None:
    """``/proc/<pid>/stat`` parsed, or None if the process is gone or unreadable.

    The only parser of that file: the identity ``(pid, start_ticks)`` is always
    read from the kernel the same way. Only "no such process" (or no right to
    look) means None; any other failure (EMFILE) raises, so it never reads as
    a death: the daemon's guarded callers retry instead of skipping a signal.
    """
    try:
        with open(f"{PROC}/{pid}/stat", "rb") as f:
            raw = f.read()
    except (FileNotFoundError, ProcessLookupError, PermissionError):
        return None
    # The command name (field 2) may hold spaces and parentheses: split after the last ')'.
    rest = raw[raw.rfind(b")") + 2 :].split()
    try:
        return ProcStat(rest[0].decode(), int(rest[1]), int(rest[19]))
    except (IndexError, ValueError, UnicodeDecodeError):
        return None


def start_ticks(pid: int) -> int | None:
    """Start time of ``pid`` in clock ticks since boot, or None if it is gone."""
    stat = read_stat(pid)
    return None if stat is None else stat.start_ticks


def parent_pid(pid: int) -> int | None:
    try:
        stat = read_stat(pid)
    except OSError:
        return None  # an unknown parent: ancestry stops here, as for a gone process
    return None if stat is None else stat.ppid


def is_same_process(pid: int, ticks: int | None) -> bool:
    """True if ``pid`` is alive and is the process that started at ``ticks``."""
    stat = read_stat(pid)
    if stat is None:
        return False
    if ticks is None:
        return True
    return stat.start_ticks == ticks and not stat.exited


def process_uid(pid: int) -> int | None:
    try:
        return os.stat(f"{PROC}/{pid}").st_uid
    except OSError:
        return None


def catches(pid: int, sig: int) -> bool:
    """Whether ``pid`` has a handler for ``sig`` (``SigCgt`` of /proc/<pid>/status).

    For a signal whose default action ends the process (SIGUSR1): a warning sent to a
    process that does not catch it would kill it.
    """
    try:
        with open(f"{PROC}/{pid}/status", "rb") as f:
            text = f.read()
    except OSError:
        return False
    for line in text.splitlines():
        if line.startswith(b"SigCgt:"):
            try:
                return bool(int(line.split()[1], 16) >> (sig - 1) & 1)
            except (IndexError, ValueError):
                return False
    return False


def user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return str(uid)


def command_line(pid: int, limit: int = 120) -> str | None:
    try:
        with open(f"{PROC}/{pid}/cmdline", "rb") as f:
            raw = f.read(4096)
    except OSError:
        return None
    text = raw.replace(b"\0", b" ").decode(errors="replace").strip()
    if not text:
        try:
            with open(f"{PROC}/{pid}/comm") as f:
                text = f"[{f.read().strip()}]"
        except OSError:
            return None
    return text if len(text) <= limit else text[: limit - 1] + "…"


def environ_value(pid: int, name: str) -> str | None:
    """Value of ``name`` in the environment ``pid`` started with (needs same uid or root)."""
    try:
        with open(f"{PROC}/{pid}/environ", "rb") as f:
            raw = f.read()
    except OSError:
        return None
    prefix = name.encode() + b"="
    for item in raw.split(b"\0"):
        if item.startswith(prefix):
            return item[len(prefix) :].decode(errors="replace")
    return None


def all_pids(root: str | None = None) -> Iterator[int]:
    """Every process visible in ``root`` (default: :data:`PROC`)."""
    for entry in os.listdir(PROC if root is None else root):
        if entry.isdigit():
            yield int(entry)


def children_map() -> dict[int, list[int]]:
    """Parent PID -> child PIDs, for every process visible now."""
    return ProcessTable().children()


def descendants(roots: Iterable[int], tree: dict[int, list[int]] | None = None) -> set[int]:
    """``roots`` and every process below them."""
    tree = children_map() if tree is None else tree
    seen: set[int] = set()
    stack = list(roots)
    while stack:
        pid = stack.pop()
        if pid in seen:
            continue
        seen.add(pid)
        stack.extend(tree.get(pid, ()))
    return seen


_GONE = (errno.ESRCH,)
_UNSUPPORTED = (errno.ENOSYS, errno.EPERM, errno.EACCES, errno.EINVAL)
_pidfd_usable: bool | None = None


def pidfd_usable() -> bool:
    """Whether ``pidfd_open`` works here; probed once, like psutil's ``can_use_pidfd_open``.

    It may exist in Python and still fail: ENOSYS on old kernels, EPERM or ENOSYS
    under a seccomp filter (containers). A probe that fails for lack of
    descriptors (EMFILE) says nothing, so it is asked again next time.
    """
    global _pidfd_usable
    if _pidfd_usable is not None:
        return _pidfd_usable
    pidfd_open = getattr(os, "pidfd_open", None)
    if pidfd_open is None:
        _pidfd_usable = False
        return False
    try:
        fd = pidfd_open(os.getpid())
    except OSError as exc:
        if exc.errno in _UNSUPPORTED:
            _pidfd_usable = False
        return False
    os.close(fd)
    _pidfd_usable = True
    return True


def open_pidfd(pid: int) -> int | None:
    """A pidfd for ``pid``; None where pidfds cannot be used or descriptors ran out.

    Raises ProcessLookupError if ``pid`` does not exist: only that means "gone".
    """
    if not pidfd_usable():
        return None
    try:
        return os.pidfd_open(pid)
    except OSError as exc:
        if exc.errno in _GONE:
            raise ProcessLookupError(pid) from None
        return None  # EMFILE, ENFILE, ENOMEM…: not a death; the caller falls back


def signal_process(pid: int, ticks: int | None, sig: int) -> bool:
    """Send ``sig`` to ``pid`` only if it is still the process that started at ``ticks``.

    Returns True if the signal was delivered. Through a pidfd where one can be
    opened (the check and the kill then name the same process); where none can
    (no pidfds, seccomp, no descriptors left) through ``kill`` right after a fresh
    ``(pid, start_ticks)`` check, so a failing pidfd never means "not signalled".
    """
    try:
        fd = open_pidfd(pid)
    except ProcessLookupError:
        return False
    if fd is None:
        if not is_same_process(pid, ticks):
            return False
        try:
            os.kill(pid, sig)
        except OSError:
            return False
        return True
    try:
        # The pidfd pins the identity; verify it is the one we recorded.
        if not is_same_process(pid, ticks):
            return False
        signal.pidfd_send_signal(fd, sig)
        return True
    except OSError:
        return False
    finally:
        os.close(fd)


def pidfd_alive(fd: int) -> bool:
    """Whether the process a pidfd names still runs (its PID is then still its own)."""
    return _answers_null_signal(signal.pidfd_send_signal, fd)


def pid_exists(pid: int) -> bool:
    """Whether some process has ``pid`` now (not which one: see :func:`is_same_process`)."""
    return _answers_null_signal(os.kill, pid)


def _answers_null_signal(send: Callable[[int, int], None], target: int) -> bool:
    # Signal 0 checks without delivering; EPERM means it exists but is another user's.
    try:
        send(target, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def executable(pid: int) -> str | None:
    """The program ``pid`` runs (/proc/<pid>/exe), or None."""
    try:
        return os.readlink(f"{PROC}/{pid}/exe")
    except OSError:
        return None


class Pinned:
    """A process held by a pidfd (where one can be had) from a check to an action.

    While the pinned process lives its PID cannot name another one; so a check
    made before an action and :meth:`verify` after it prove the action reached
    the process that was checked, even if its number was recycled in between.
    """

    def __init__(self, pid: int) -> None:
        self.pid = pid
        self.fd: int | None = None
        self.ticks: int | None = None

    def __enter__(self) -> Pinned:
        try:
            self.fd = open_pidfd(self.pid)
        except ProcessLookupError:
            raise BadRequest(f"no process {self.pid}") from None
        self.ticks = start_ticks(self.pid)
        if self.ticks is None or not self._alive():
            self.close()
            raise BadRequest(f"no process {self.pid}")
        return self

    def _alive(self) -> bool:
        return pidfd_alive(self.fd) if self.fd is not None else True

    def verify(self) -> None:
        """Raise BadRequest unless ``pid`` is still the process pinned at the start."""
        if not self._alive() or start_ticks(self.pid) != self.ticks:
            raise BadRequest(f"process {self.pid} exited while it was being attached")

    def close(self) -> None:
        if self.fd is not None:
            os.close(self.fd)
            self.fd = None

    def __exit__(self, *exc: object) -> None:
        self.close()


def set_parent_death_signal(sig: int) -> bool:
    """Ask the kernel to send ``sig`` to this process when its parent dies (Linux)."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_pdeathsig = 1
        return bool(libc.prctl(pr_set_pdeathsig, sig, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def set_child_subreaper() -> bool:
    """Make orphaned descendants re-parent to us (Linux), so none escapes by double-forking."""
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        pr_set_child_subreaper = 36
        return bool(libc.prctl(pr_set_child_subreaper, 1, 0, 0, 0) == 0)
    except (OSError, AttributeError):
        return False


def snapshot(pids: Iterable[int]) -> dict[int, int]:
    """``{pid: start_ticks}`` for those of ``pids`` still alive."""
    out = {}
    for pid in pids:
        ticks = start_ticks(pid)
        if ticks is not None:
            out[pid] = ticks
    return out


def signal_all(members: dict[int, int], sig: int) -> int:
    """Signal every ``{pid: start_ticks}`` that is still that process; return how many."""
    return sum(signal_process(pid, ticks, sig) for pid, ticks in members.items())


def pids_with_marker(name: str, value: str, uid: int | None) -> set[int]:
    """Processes started with ``name=value`` in their environment, of ``uid`` if given."""
    found = set()
    for pid in all_pids():
        if uid is not None and process_uid(pid) != uid:
            continue
        if environ_value(pid, name) == value:
            found.add(pid)
    return found


class ProcessTable:
    """One look at the process table, read lazily and cached, for many questions at once.

    The one process-tree builder: each process's ``stat`` is read at most once.
    """

    def __init__(self) -> None:
        self._stats: dict[int, ProcStat | None] = {}
        self._children: dict[int, list[int]] | None = None
        self._uids: dict[int, int | None] = {}
        self._environ: dict[tuple[int, str], str | None] = {}
        self._pids: list[int] | None = None

    def stat(self, pid: int) -> ProcStat | None:
        if pid not in self._stats:
            self._stats[pid] = read_stat(pid)
        return self._stats[pid]

    def parent(self, pid: int) -> int | None:
        if pid not in self._stats:
            try:
                self._stats[pid] = read_stat(pid)
            except OSError:
                return None  # as parent_pid: ancestry stops at an unreadable process
        stat = self._stats[pid]
        return None if stat is None else stat.ppid

    def children(self) -> dict[int, list[int]]:
        if self._children is None:
            tree: dict[int, list[int]] = {}
            for pid in self.pids():
                ppid = self.parent(pid)
                if ppid is not None:
                    tree.setdefault(ppid, []).append(pid)
            self._children = tree
        return self._children

    def pids(self) -> list[int]:
        if self._pids is None:
            self._pids = list(all_pids())
        return self._pids

    def uid(self, pid: int) -> int | None:
        if pid not in self._uids:
            self._uids[pid] = process_uid(pid)
        return self._uids[pid]

    def environ(self, pid: int, name: str) -> str | None:
        key = (pid, name)
        if key not in self._environ:
            self._environ[key] = environ_value(pid, name)
        return self._environ[key]
