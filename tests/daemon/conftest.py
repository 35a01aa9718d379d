"""Fixtures of the daemon tests: ``daemon`` (a real chronosd) and ``users`` (real accounts)."""

from __future__ import annotations

import fcntl
import grp
import json
import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest

from .support import DaemonProcess, TestUser, clean_env, shared_tmpdir, user_python_candidates

ALICE = "chronos_t_alice"
BOB = "chronos_t_bob"
ADMIN = "chronos_t_admin"
ADMIN_GROUP = "chronos-admin"


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., DaemonProcess]]:
    """Make (and start) daemons; every one is stopped and its directory removed at teardown."""
    made: list[DaemonProcess] = []

    def make(start: bool = True, extra_env: dict[str, str] | None = None) -> DaemonProcess:
        d = DaemonProcess(shared_tmpdir("chronos-d-"), extra_env)
        made.append(d)
        if start:
            d.start()
        return d

    yield make
    for d in made:
        d.cleanup()


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A running chronosd on a fresh state dir (simulated GPUs: two of 80 GiB)."""
    return daemon_factory()


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    """One chronosd for a whole module, for tests that need no fresh state."""
    d = DaemonProcess(shared_tmpdir("chronos-d-"))
    try:
        d.start()
        yield d
    finally:
        d.cleanup()


# ----------------------------------------------------------------------------- users

#: Several test sessions (several people, one machine) may use the accounts at once:
#: each holds a shared lock while it does; the last one out removes what tests created.
ACCOUNTS_LOCK = Path("/tmp/chronos-test-accounts.lock")
ACCOUNTS_CREATED = Path("/tmp/chronos-test-accounts.json")


@dataclass
class Users:
    alice: TestUser
    bob: TestUser
    admin: TestUser


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


def _created() -> list[list[str]]:
    try:
        return [list(item) for item in json.loads(ACCOUNTS_CREATED.read_text())]
    except (OSError, ValueError):
        return []


def _record_created(items: list[list[str]]) -> None:
    ACCOUNTS_CREATED.write_text(json.dumps(items))


def _ensure_group(name: str, created: list[list[str]]) -> None:
    try:
        grp.getgrnam(name)
        return
    except KeyError:
        pass
    proc = _run("groupadd", name)
    if proc.returncode != 0:
        pytest.skip(f"cannot create group {name}: {proc.stderr.strip()}")
    created.append(["group", name])
    _record_created(created)


def _ensure_user(name: str, created: list[list[str]], groups: tuple[str, ...] = ()) -> None:
    try:
        pwd.getpwnam(name)
    except KeyError:
        argv = ["useradd", "--no-create-home", "--shell", "/usr/sbin/nologin", "--user-group"]
        if groups:
            argv += ["--groups", ",".join(groups)]
        proc = _run(*argv, name)
        if proc.returncode != 0:
            pytest.skip(f"cannot create user {name}: {proc.stderr.strip()}")
        created.append(["user", name])
        _record_created(created)
        return
    for group in groups:  # an account left from an earlier run: make sure of its groups
        if name not in grp.getgrnam(group).gr_mem:
            _run("usermod", "--append", "--groups", group, name)


def _remove_created() -> None:
    for kind, name in reversed(_created()):
        _run("userdel" if kind == "user" else "groupdel", name)
    ACCOUNTS_CREATED.unlink(missing_ok=True)


def _user(name: str, python: list[str], python_env: dict[str, str]) -> TestUser:
    entry = pwd.getpwnam(name)
    return TestUser(name, entry.pw_uid, entry.pw_gid, python, python_env)


def _pick_python(probe: TestUser) -> tuple[list[str], dict[str, str]]:
    tried = []
    for python, extra in user_python_candidates():
        candidate = TestUser(probe.name, probe.uid, probe.gid, python, extra)
        proc = candidate.run_python("import chronos.cli, chronos.api", env=clean_env())
        if proc.returncode == 0:
            return python, extra
        tried.append(f"{' '.join(python)}: {proc.stderr.strip().splitlines()[-1:]}")
    pytest.skip(
        "no Python interpreter can import chronos as an ordinary user (the venv and source "
        "tree must be readable and traversable by every user); tried " + "; ".join(tried)
    )


@pytest.fixture(scope="session")
def users() -> Iterator[Users]:
    """alice and bob (ordinary users) and admin (member of chronos-admin), created for real."""
    if os.geteuid() != 0:
        pytest.skip("multi-user daemon tests need root (to create accounts and switch to them)")
    for tool in ("useradd", "userdel", "groupadd", "groupdel", "usermod", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"multi-user daemon tests need {tool}, which is not installed")
    with open(ACCOUNTS_LOCK, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        try:
            created = _created()
            _ensure_group(ADMIN_GROUP, created)
            _ensure_user(ALICE, created)
            _ensure_user(BOB, created)
            _ensure_user(ADMIN, created, groups=(ADMIN_GROUP,))
            fcntl.flock(lock, fcntl.LOCK_SH)
            python, extra = _pick_python(_user(ALICE, [], {}))
            yield Users(
                alice=_user(ALICE, python, extra),
                bob=_user(BOB, python, extra),
                admin=_user(ADMIN, python, extra),
            )
        finally:
            try:
                fcntl.flock(lock, fcntl.LOCK_EX | fcntl.LOCK_NB)
            except BlockingIOError:
                pass  # another session still uses the accounts; the last one removes them
            else:
                _remove_created()
