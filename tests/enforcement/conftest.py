"""Fixtures of the enforcement tests: real daemons, a throwaway Unix account, embedded homes."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path

import pytest
from chronos_testing import clean_env, daemons, unix_accounts

from .support import Daemon, OtherUser

THROWAWAY = "chronos_t_enf"

#: The cap tests' policy: a short memory grace, frequent samples, unpartitioned = warn.
CAP_CONFIG = 'memory_grace = "0.3s"\nsample_interval = "0.1s"\nunpartitioned = "warn"\n'


@pytest.fixture
def daemon_factory() -> Iterator[Callable[[str], Daemon]]:
    """Start a chronosd with the given policy TOML; each is stopped and removed at teardown."""
    with daemons() as make:
        yield lambda config=CAP_CONFIG: make(factory=Daemon, config=config)


@pytest.fixture(scope="module")
def cap_daemon() -> Iterator[Daemon]:
    """One chronosd (CAP_CONFIG) shared by a module's tests."""
    with daemons() as make:
        yield make(factory=Daemon, config=CAP_CONFIG)


@pytest.fixture(scope="session")
def other_user() -> Iterator[OtherUser]:
    """A throwaway Unix account (created with useradd, removed afterwards)."""
    with unix_accounts(THROWAWAY, why="needs root to create a Unix account and run as it") as (
        user,
    ):
        yield user


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
