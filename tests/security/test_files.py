"""Files, paths and split brain (issue "Trust", findings 13-16).

Each test plays one attack of an ordinary local user (or one accident an administrator
must hear about) with real accounts, real processes and, where a daemon is involved,
a real chronosd:

* 13: traps in the shared embedded ledger's directory (a ``ledger.db`` symlink to a
  root file, planted ``-wal``/``-shm`` symlinks, a directory a user made first) and a
  daemon ``--state-dir`` through a symlink;
* 14: a daemon on non-default paths, stopped: a client must not fork the state into
  the embedded ledger;
* 15: a full file system under the daemon's ledger;
* 16: a deleted, emptied or corrupt ledger at the daemon's start.

The machine-wide shared directory (``/var/tmp/chronos``) is replaced per test by a
directory of the test's own: the client runs through :data:`SHARED_RUNNER`, which
points ``chronos.paths``' system locations at it before running the CLI (with no
``CHRONOS_HOME``, exactly as on a machine with no daemon).
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chronos_testing import PY, DaemonProcess, TestUser, clean_env, shared_tmpdir
from helpers import assert_one_line_error

from .conftest import Users

#: ``python -c SHARED_RUNNER SHARED_DIR chronos-args...``: the CLI, with this test's
#: directory standing in for /var/tmp/chronos (and no system daemon anywhere).
#: ``TEST_SYSTEM_STATE`` / ``TEST_SYSTEM_SOCKET`` (read by the runner, not by Chronos) stand
#: in for the system daemon's /var/lib/chronos and /run/chronos/chronosd.sock.
SHARED_RUNNER = r"""
import os, sys
from pathlib import Path
import chronos.paths as paths
shared = Path(sys.argv[1])
paths.SHARED_STATE_DIR = shared
paths.SYSTEM_STATE_DIR = Path(os.environ.get("TEST_SYSTEM_STATE", shared.parent / "no-state"))
paths.SYSTEM_SOCKET = Path(os.environ.get("TEST_SYSTEM_SOCKET", shared.parent / "no.sock"))
from chronos.cli import main
sys.exit(main(sys.argv[2:]))
"""

ROOT_ONLY = pytest.mark.skipif(
    os.geteuid() != 0, reason="needs root (to be root, and to be others)"
)


@pytest.fixture
def sticky_tmp() -> Iterator[Path]:
    """A stand-in for /var/tmp: root's, mode 1777, where every user may make things."""
    base = shared_tmpdir("chronos-files-")
    os.chmod(base, 0o1777)
    yield base
    shutil.rmtree(base, ignore_errors=True)


def client_env(**extra: str) -> dict[str, str]:
    return clean_env(CHRONOS_BACKEND="simulated", **extra)


def as_root(
    shared: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-c", SHARED_RUNNER, str(shared), *args],
        env=env or client_env(),
        capture_output=True,
        text=True,
        timeout=60,
        cwd="/",
    )


def as_user(
    user: TestUser, shared: Path, *args: str, env: dict[str, str] | None = None
) -> subprocess.CompletedProcess[str]:
    return user.run_python(SHARED_RUNNER, str(shared), *args, env=env or client_env(), timeout=60)


def sh_as(user: TestUser, script: str) -> None:
    """Run a shell snippet as ``user`` (the attacker setting up a trap); it must succeed."""
    proc = user.run(user.argv("sh", "-ec", script), env=client_env())
    assert proc.returncode == 0, proc.stderr


def one_line_error(proc: subprocess.CompletedProcess[str], prefix: str = "chronos: error:") -> str:
    return assert_one_line_error(proc, prefix=prefix)


def root_victim(base: Path) -> Path:
    """A directory only root may write, standing in for /etc."""
    victim = base / "etc"
    victim.mkdir(mode=0o755)
    os.chmod(victim, 0o755)
    return victim


def fingerprint(directory: Path) -> dict[str, tuple[int, int, int, bytes]]:
    """Everything in ``directory`` (mode, owner, size, content), without following links."""
    out = {}
    for entry in sorted(directory.iterdir()):
        st = entry.lstat()
        content = entry.read_bytes() if stat.S_ISREG(st.st_mode) else os.readlink(entry).encode()
        out[entry.name] = (st.st_mode, st.st_uid, st.st_size, content)
    return out


# --------------------------------------------------------------------- 13: symlinks


@ROOT_ONLY
def test_root_never_follows_a_ledger_symlink_a_user_planted(
    users: Users, sticky_tmp: Path, tmp_path: Path
) -> None:
    """alice makes the shared dir first and points ledger.db at a root file."""
    victim_dir = root_victim(shared_tmpdir("chronos-victim-"))
    try:
        preload = victim_dir / "ld.so.preload"  # does not exist yet: root must not create it
        existing = victim_dir / "passwd"
        existing.write_text("root:x:0:0\n")
        shared = sticky_tmp / "chronos"
        sh_as(users.alice, f"mkdir -m 1777 {shared}; ln -s {preload} {shared}/ledger.db")
        before, planted = fingerprint(victim_dir), fingerprint(shared)

        # Root keeps its own embedded ledger (the daemon's directory, root's alone): the
        # users' shared directory is never even opened.
        listed = as_root(shared, "list")
        assert listed.returncode == 0, listed.stderr
        assert not preload.exists() and not preload.is_symlink()
        assert fingerprint(victim_dir) == before
        assert fingerprint(shared) == planted

        # The same with the link aimed at a file that exists: never opened, never changed.
        sh_as(users.alice, f"ln -sf {existing} {shared}/ledger.db")
        created = as_root(shared, "create", "0", "1%", "1h")
        assert created.returncode == 0, created.stderr
        assert fingerprint(victim_dir) == before
        root_ledger = sticky_tmp / "no-state" / "ledger.db"
        st = root_ledger.lstat()
        assert stat.S_ISREG(st.st_mode) and st.st_uid == 0 and not st.st_mode & 0o022

        # Told to use the shared directory, root refuses it rather than follow the link.
        line = one_line_error(as_root(shared, "list", env=client_env(CHRONOS_HOME=str(shared))))
        assert fingerprint(victim_dir) == before
        assert "symlink" in line or "belongs to" in line, line
    finally:
        shutil.rmtree(victim_dir.parent, ignore_errors=True)


@ROOT_ONLY
def test_planted_wal_and_shm_symlinks_are_never_followed(users: Users, sticky_tmp: Path) -> None:
    """In a root-made shared dir, alice plants -wal/-shm links into bob's files."""
    shared = sticky_tmp / "chronos"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as an administrator sets it up for several users
    bobs = sticky_tmp / "bob-files"
    sh_as(users.bob, f"mkdir -m 0755 {bobs}; echo 'my notes' > {bobs}/notes")
    sh_as(
        users.alice,
        f"ln -s {bobs}/notes {shared}/ledger.db-wal; ln -s {bobs}/new-shm {shared}/ledger.db-shm",
    )
    before = fingerprint(bobs)

    line = one_line_error(as_user(users.bob, shared, "create", "0", "1%", "1h"))
    assert "symlink" in line, line
    assert fingerprint(bobs) == before  # nothing written through either link
    assert not (bobs / "new-shm").exists()


@ROOT_ONLY
def test_a_shared_dir_a_user_made_is_refused_by_root_and_others(
    users: Users, sticky_tmp: Path
) -> None:
    """alice is the first user: her /var/tmp/chronos must be no one else's ledger."""
    shared = sticky_tmp / "chronos"
    made = as_user(users.alice, shared, "create", "0", "1%", "1h")
    assert made.returncode == 0, made.stderr  # alice's own embedded ledger works
    assert shared.stat().st_uid == users.alice.uid
    before = fingerprint(shared)

    bob_line = one_line_error(as_user(users.bob, shared, "create", "0", "1%", "1h"))
    assert users.alice.name in bob_line, bob_line
    listed = as_root(shared, "list")  # root keeps its own ledger: alice's is never opened
    assert listed.returncode == 0 and "no active partitions" in listed.stdout, listed.stderr
    root_line = one_line_error(as_root(shared, "list", env=client_env(CHRONOS_HOME=str(shared))))
    assert users.alice.name in root_line, root_line
    assert fingerprint(shared) == before


@ROOT_ONLY
def test_root_never_writes_the_shared_embedded_ledger(sticky_tmp: Path) -> None:
    """Even in a root-owned shared dir: ordinary users could write what root reads."""
    shared = sticky_tmp / "chronos"
    shared.mkdir()
    os.chmod(shared, 0o1777)  # as an administrator sets it up for several users
    made = as_root(shared, "create", "0", "1%", "1h")
    assert made.returncode == 0, made.stderr
    assert not (shared / "ledger.db").exists()
    root_ledger = sticky_tmp / "no-state" / "ledger.db"  # the daemon's directory, root's alone
    st = root_ledger.lstat()
    assert (
        st.st_uid == 0
        and not st.st_mode & 0o022
        and not (sticky_tmp / "no-state").stat().st_mode & 0o022
    )


@ROOT_ONLY
def test_daemon_refuses_a_state_dir_through_a_symlink_or_of_another_user(
    users: Users, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    """``--state-dir`` via alice's link to a root directory: nothing there is touched."""
    d = daemon_factory(start=False)
    victim = d.base / "etc"
    victim.mkdir()
    os.chmod(victim, 0o700)
    (victim / "chronosd.lock").write_text("precious\n")
    public = d.base / "tmp"  # like /tmp: anyone may add a name, only its owner may change it
    public.mkdir()
    os.chmod(public, 0o1777)
    mine = public / "alice"
    sh_as(
        users.alice,
        f"ln -s {victim} {public}/state; ln -s {victim} {public}/etc; mkdir {mine}",
    )
    before = fingerprint(victim)

    for state_dir, why in (
        (public / "state", "symlink"),  # the state dir itself
        (public / "etc" / "chronos", "symlink"),  # a link on the way to it
        (mine, "belongs to"),  # a directory alice may fill with links
    ):
        d.state_dir = state_dir
        d.start(wait=False)
        assert d.proc is not None and d.proc.wait(30) != 0
        log = d.log_text()
        assert "Traceback" not in log, log
        assert why in log and log.strip().startswith("chronosd: error:"), log
    assert fingerprint(victim) == before
    assert stat.S_IMODE(victim.stat().st_mode) == 0o700
    assert not any(mine.iterdir())


# -------------------------------------------------------------------- 14: split brain


@ROOT_ONLY
def test_a_stopped_daemon_on_its_own_paths_is_not_replaced_by_an_embedded_ledger(
    users: Users, sticky_tmp: Path, daemon: DaemonProcess
) -> None:
    """DAEMON.md's non-default setup: --state-dir, --socket, clients with CHRONOS_SOCKET."""
    env = client_env(CHRONOS_SOCKET=str(daemon.sock))
    shared = sticky_tmp / "chronos"
    made = as_user(users.alice, shared, "create", "0", "50%", "1h", "--json", env=env)
    assert made.returncode == 0, made.stderr
    daemon.kill(signal.SIGTERM)

    line = one_line_error(as_user(users.alice, shared, "create", "0", "60%", "1h", env=env))
    assert str(daemon.sock) in line and "CHRONOS_SOCKET" in line, line
    assert not shared.exists()  # no second ledger anywhere

    daemon.start()
    assert len(daemon.open_ids()) == 1


@ROOT_ONLY
def test_a_client_waits_for_a_restarting_daemon(
    users: Users, sticky_tmp: Path, daemon: DaemonProcess
) -> None:
    """Down for a moment (a restart): the create waits for it instead of failing or forking."""
    env = client_env(CHRONOS_SOCKET=str(daemon.sock))
    shared = sticky_tmp / "chronos"
    daemon.kill(signal.SIGTERM)
    client = users.alice.popen(
        [*users.alice.python, "-c", SHARED_RUNNER, str(shared), "create", "0", "1%", "1h"],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    daemon.start()
    _, err = client.communicate(timeout=60)
    assert client.returncode == 0, err
    assert len(daemon.open_ids()) == 1 and not shared.exists()


@ROOT_ONLY
def test_root_does_not_write_a_stopped_system_daemons_ledger(
    sticky_tmp: Path, daemon: DaemonProcess
) -> None:
    """Default paths, daemon down: root's create is refused, the daemon's ledger untouched."""
    env = client_env(TEST_SYSTEM_STATE=str(daemon.state_dir), TEST_SYSTEM_SOCKET=str(daemon.sock))
    shared = sticky_tmp / "chronos"
    made = as_root(shared, "create", "0", "50%", "1h", env=env)
    assert made.returncode == 0 and "created" in made.stdout, made.stderr
    daemon.kill(signal.SIGTERM)
    ledger = daemon.state_dir / "ledger.db"
    before = ledger.read_bytes()

    line = one_line_error(as_root(shared, "create", "0", "10%", "1h", env=env))
    assert "ledger.id" in line, line
    assert ledger.read_bytes() == before and not shared.exists()


# ---------------------------------------------------------------------- 15: disk full


@contextlib.contextmanager
def tiny_filesystem(where: Path, size: str) -> Iterator[Path]:
    where.mkdir()
    proc = subprocess.run(
        ["mount", "-t", "tmpfs", "-o", f"size={size},mode=0755", "tmpfs", str(where)],
        capture_output=True,
        text=True,
    )
    if proc.returncode != 0:
        pytest.skip(f"cannot mount a small tmpfs to fill up: {proc.stderr.strip()}")
    try:
        yield where
    finally:
        subprocess.run(["umount", "-l", str(where)], check=False)


def fill(directory: Path) -> Path:
    filler = directory / "filler"
    with open(filler, "wb", buffering=0) as out, contextlib.suppress(OSError):
        while True:
            out.write(b"\0" * 4096)
    return filler


@ROOT_ONLY
def test_a_full_disk_gives_a_clear_error_not_maybe(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    d = daemon_factory(start=False)
    with tiny_filesystem(d.base / "state", "2m") as state:
        d.state_dir = state
        d.start()
        assert d.cli("create", "0", "1%", "1h").returncode == 0
        filler = fill(state)

        failures = []
        for _ in range(40):
            proc = d.cli("create", "0", "1%", "1h")
            if proc.returncode != 0:
                failures.append(one_line_error(proc))
            if len(failures) >= 3:
                break
        assert failures, "the full file system never refused a write"
        for line in failures:
            assert "cannot be written: no space left on device" in line, line
            assert "may or may not" not in line, line
        assert len(d.call("list")) == 1  # still answering, and reads still work

        filler.unlink()
        assert d.cli("create", "0", "1%", "1h").returncode == 0
        d.stop()


# ---------------------------------------------------- 16: vanished, emptied, corrupt


def start_fails(d: DaemonProcess) -> str:
    """Start ``d``, which must exit non-zero with one line for the administrator."""
    d.start(wait=False)
    assert d.proc is not None
    assert d.proc.wait(30) != 0, "chronosd started"
    return one_line_error(
        subprocess.CompletedProcess([], d.proc.returncode, "", d.log_text()), "chronosd: error:"
    )


@pytest.mark.parametrize("damage", ["deleted", "emptied"])
def test_a_vanished_ledger_stops_the_daemon_from_starting_empty(
    daemon: DaemonProcess, damage: str
) -> None:
    for _ in range(3):
        assert daemon.cli("create", "0", "30%", "1h").returncode == 0
    daemon.stop()
    ledger = daemon.state_dir / "ledger.db"
    for suffix in ("-wal", "-shm"):
        Path(f"{ledger}{suffix}").unlink(missing_ok=True)
    if damage == "deleted":
        ledger.unlink()
    else:
        os.truncate(ledger, 0)

    line = start_fails(daemon)
    assert str(ledger) in line and "backup" in line, line
    assert str(daemon.state_dir / "ledger.id") in line, line

    # Following the advice (remove the marker) starts an empty ledger on purpose.
    (daemon.state_dir / "ledger.id").unlink()
    daemon.start()
    assert daemon.open_ids() == set()


def test_another_ledger_in_its_place_stops_the_daemon(
    daemon: DaemonProcess, daemon_factory: Callable[..., DaemonProcess]
) -> None:
    other = daemon_factory()
    other.stop()
    daemon.stop()
    shutil.copy(other.state_dir / "ledger.db", daemon.state_dir / "ledger.db")
    line = start_fails(daemon)
    assert "is not this daemon's" in line, line


def test_a_corrupt_ledger_gives_one_line(daemon: DaemonProcess) -> None:
    assert daemon.cli("create", "0", "30%", "1h").returncode == 0
    daemon.stop()
    ledger = daemon.state_dir / "ledger.db"
    ledger.write_bytes(os.urandom(64 * 1024))
    line = start_fails(daemon)
    assert str(ledger) in line and "corrupt" in line, line
