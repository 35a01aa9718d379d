"""Where Chronos keeps its state, where the daemon listens, and how its files are opened.

State directory (the ledger database): ``$CHRONOS_HOME`` if set; else the
daemon's ``/var/lib/chronos`` if it exists; else ``/var/tmp/chronos``, the
shared embedded ledger of a machine with no daemon (world-writable with the
sticky bit, like /tmp).

Socket: ``$CHRONOS_SOCKET`` if set; else ``$CHRONOS_HOME/chronosd.sock`` when
``CHRONOS_HOME`` is set (so tests never meet the system daemon); else
``/run/chronos/chronosd.sock``.

Every file Chronos creates in a directory other users can write (the shared
ledger's) could be a trap another user planted: a symlink to ``/etc/ld.so.preload``,
a hard link, a FIFO. So files are opened here, never by name elsewhere: with
``O_NOFOLLOW`` (a planted symlink is refused, not followed), created with
``O_EXCL`` (never adopting a file someone slipped in between a check and the
open), verified on the descriptor (a regular file with one link) and given
their mode with ``fchmod`` (never ``chmod`` on a name that may have changed).
A directory is checked the way sshd checks ``~/.ssh``: not a symlink, owned by
root or the caller, and sticky if everyone may write it.
"""

from __future__ import annotations

import errno
import os
import pwd
import stat
from pathlib import Path

from chronos.errors import ChronosError

SYSTEM_STATE_DIR = Path("/var/lib/chronos")
SHARED_STATE_DIR = Path("/var/tmp/chronos")
SYSTEM_SOCKET = Path("/run/chronos/chronosd.sock")
LEDGER_FILE = "ledger.db"
LEDGER_ID_FILE = "ledger.id"
"""The daemon's record that it had a ledger (its id); also the sign that a daemon owns
the directory, so clients never fall back to an embedded ledger beside it."""

#: SQLite's companions of a database in WAL mode; it opens them itself, by name.
LEDGER_SUFFIXES = ("", "-wal", "-shm")

_OPEN_FLAGS = os.O_RDWR | os.O_NOFOLLOW | os.O_CLOEXEC | os.O_NONBLOCK  # NONBLOCK: a FIFO
_CREATE_ATTEMPTS = 5


class UnsafePath(ChronosError):
    """A file or directory Chronos will not use: it could be another user's trap."""


def state_dir() -> Path:
    home = os.environ.get("CHRONOS_HOME")
    if home:
        return Path(home)
    if SYSTEM_STATE_DIR.is_dir():
        return SYSTEM_STATE_DIR
    return SHARED_STATE_DIR


def socket_path() -> Path:
    explicit = os.environ.get("CHRONOS_SOCKET")
    if explicit:
        return Path(explicit)
    home = os.environ.get("CHRONOS_HOME")
    if home:
        return Path(home) / "chronosd.sock"
    return SYSTEM_SOCKET


def is_shared_default(path: Path) -> bool:
    """``path`` is the machine-wide shared embedded directory (no ``CHRONOS_HOME`` chose it)."""
    return not os.environ.get("CHRONOS_HOME") and path == SHARED_STATE_DIR


def ensure_shared_dir(path: Path) -> None:
    """Make sure ``path`` is a directory safe to keep a ledger in; create it if missing.

    A directory we create is shared like /tmp (mode 1777) so other users can use the
    ledger too; an existing one is left as its owner set it, but must pass
    :func:`check_dir`.
    """
    try:
        os.mkdir(path, 0o755)
    except FileNotFoundError:
        path.parent.mkdir(parents=True, exist_ok=True, mode=0o755)
        return ensure_shared_dir(path)
    except FileExistsError:
        pass
    except OSError as exc:
        raise ChronosError(f"cannot create {path}: {exc.strerror}") from None
    else:
        fd = open_dir(path)
        try:
            os.fchmod(fd, 0o1777)
        finally:
            os.close(fd)
    check_dir(path)


def open_dir(path: Path) -> int:
    """A descriptor of the directory ``path`` itself, never of a symlink's target."""
    try:
        return os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW | os.O_CLOEXEC)
    except OSError as exc:
        if exc.errno in (errno.ELOOP, errno.ENOTDIR) and os.path.islink(path):
            raise UnsafePath(f"{path} is a symlink; Chronos uses only a real directory") from None
        raise ChronosError(f"cannot use {path}: {exc.strerror}") from None


def check_dir(path: Path) -> os.stat_result:
    """``path`` is a real directory, owned by root or us, sticky if everyone may write it."""
    fd = open_dir(path)
    try:
        st = os.fstat(fd)
    finally:
        os.close(fd)
    if st.st_uid not in (0, os.geteuid()):
        raise UnsafePath(
            f"{path} belongs to {_user_name(st.st_uid)}, not to root or you: it could hold "
            "another user's traps; ask an administrator to start chronosd (or to create it "
            "as root with mode 1777), or set CHRONOS_HOME to a directory of yours"
        )
    if st.st_mode & stat.S_IWOTH and not st.st_mode & stat.S_ISVTX:
        raise UnsafePath(
            f"{path} is writable by everyone but not sticky (mode "
            f"{stat.S_IMODE(st.st_mode):o}): anyone could replace its files; chmod +t it"
        )
    return st


def check_trusted_path(path: Path) -> None:
    """Nobody but root or us can redirect ``path``: for a daemon running as root.

    Every existing component must be a directory owned by root or us and writable by
    nobody else (or sticky, like /tmp), and a symlink on the way must be root's or ours;
    so no other user can swap a directory, or plant a link, anywhere along it (as sshd
    checks the path to ``authorized_keys``).
    """
    todo = list(Path(os.path.abspath(path)).parts[1:])
    current, hops = Path("/"), 0
    while todo:
        step = current / todo.pop(0)
        try:
            st = os.lstat(step)
        except FileNotFoundError:
            return  # the rest is created by the caller, as root
        if st.st_uid not in (0, os.geteuid()):
            kind = "a symlink" if stat.S_ISLNK(st.st_mode) else "a directory"
            raise UnsafePath(
                f"{path}: {step} is {kind} that belongs to {_user_name(st.st_uid)}; a "
                "daemon's directory must be on a path only root can change"
            )
        if stat.S_ISLNK(st.st_mode):
            hops += 1
            if hops > 40:
                raise UnsafePath(f"{path}: too many symlinks")
            target = os.path.normpath(os.path.join(current, os.readlink(step)))
            todo = list(Path(target).parts[1:]) + todo
            current = Path("/")
            continue
        if st.st_mode & (stat.S_IWGRP | stat.S_IWOTH) and not st.st_mode & stat.S_ISVTX:
            raise UnsafePath(
                f"{path}: {step} is writable by others (mode {stat.S_IMODE(st.st_mode):o}); "
                "a daemon's directory must be on a path only root can change"
            )
        current = step


def open_file(path: Path, mode: int) -> tuple[int, bool]:
    """Open the regular file ``path`` read-write, creating it (``mode``) if missing.

    Returns ``(fd, created)``. Never follows a symlink; a file we create is made with
    ``O_EXCL`` and given ``mode`` on its descriptor. Between "missing" and our create,
    someone may create it first: then it is opened (and verified) like any existing one.
    """
    for _ in range(_CREATE_ATTEMPTS):
        try:
            fd = os.open(path, _OPEN_FLAGS)
            created = False
        except FileNotFoundError:
            try:
                fd = os.open(path, _OPEN_FLAGS | os.O_CREAT | os.O_EXCL, 0o600)
            except FileExistsError:
                continue  # created by another process just now: open the existing one
            except OSError as exc:
                raise ChronosError(f"cannot create {path}: {exc.strerror}") from None
            created = True
        except OSError as exc:
            if exc.errno == errno.ELOOP:
                raise UnsafePath(f"{path} is a symlink; Chronos never follows one") from None
            raise ChronosError(f"cannot open {path}: {exc.strerror}") from None
        try:
            verify_regular(fd, path)
            if created:
                os.fchmod(fd, mode)
        except BaseException:
            os.close(fd)
            raise
        return fd, created
    raise ChronosError(f"cannot open {path}: it keeps appearing and disappearing")


def verify_regular(fd: int, path: Path) -> os.stat_result:
    """The descriptor is a plain file with one name (not a FIFO, device or hard link)."""
    st = os.fstat(fd)
    if not stat.S_ISREG(st.st_mode):
        raise UnsafePath(f"{path} is not a regular file; Chronos will not use it")
    if st.st_nlink != 1:
        raise UnsafePath(
            f"{path} has {st.st_nlink} hard links; Chronos will not use a file that has "
            "another name elsewhere"
        )
    return st


def _user_name(uid: int) -> str:
    try:
        return pwd.getpwuid(uid).pw_name
    except KeyError:
        return f"uid {uid}"
