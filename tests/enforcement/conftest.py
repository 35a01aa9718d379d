"""Fixtures of the enforcement tests: real daemons, a throwaway Unix account, embedded homes."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from .support import Daemon, OtherUser, clean_env

THROWAWAY = "chronos_t_enf"

#: The cap tests' policy: a short memory grace, frequent samples, unpartitioned = warn.
CAP_CONFIG = 'memory_grace = "0.3s"\nsample_interval = "0.1s"\nunpartitioned = "warn"\n'


@pytest.fixture
def daemon_factory() -> Iterator[Callable[[str], Daemon]]:
    """Start a chronosd with the given policy TOML; each is stopped and removed at teardown."""
    made: list[Daemon] = []

    def make(config: str = CAP_CONFIG) -> Daemon:
        d = Daemon(config)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.stop()


@pytest.fixture(scope="module")
def cap_daemon() -> Iterator[Daemon]:
    """One chronosd (CAP_CONFIG) shared by a module's tests."""
    d = Daemon(CAP_CONFIG)
    try:
        yield d.start()
    finally:
        d.stop()


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """A throwaway Unix account (created with useradd, removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create a Unix account and run as it")
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    created = False
    try:
        pwd.getpwnam(THROWAWAY)
    except KeyError:
        proc = subprocess.run(
            [
                "useradd",
                "--no-create-home",
                "--shell",
                "/usr/sbin/nologin",
                "--user-group",
                THROWAWAY,
            ],
            capture_output=True,
            text=True,
        )
        if proc.returncode != 0:
            pytest.skip(f"useradd failed: {proc.stderr.strip()}")
        created = True
    entry = pwd.getpwnam(THROWAWAY)
    try:
        yield OtherUser(THROWAWAY, entry.pw_uid, entry.pw_gid)
    finally:
        if created:
            subprocess.run(["userdel", THROWAWAY], capture_output=True)


@pytest.fixture
def embedded_env(tmp_path: Path) -> dict[str, str]:
    """Environment for an embedded-mode ``chronos`` (no daemon) on a fresh home."""
    home = tmp_path / "home"
    config = tmp_path / "config.toml"
    config.write_text(CAP_CONFIG)
    return clean_env(
        CHRONOS_HOME=str(home),
        CHRONOS_BACKEND="simulated",
        CHRONOS_MODE="embedded",
        CHRONOS_CONFIG=str(config),
        CHRONOS_SOCKET=str(tmp_path / "no-daemon.sock"),
    )
