"""Fixtures of the daemon tests: ``daemon`` (a real chronosd) and ``users`` (real accounts)."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from chronos_testing import DaemonProcess, TestUser, daemons, unix_accounts

ALICE = "chronos_t_alice"
BOB = "chronos_t_bob"
ADMIN = "chronos_t_admin"
ADMIN_GROUP = "chronos-admin"


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., DaemonProcess]]:
    """Make (and start) daemons; every one is stopped and its directory removed at teardown."""
    with daemons() as make:
        yield make


@pytest.fixture
def daemon(daemon_factory: Callable[..., DaemonProcess]) -> DaemonProcess:
    """A running chronosd on a fresh state dir (simulated GPUs: two of 80 GiB)."""
    return daemon_factory()


@pytest.fixture(scope="module")
def shared_daemon() -> Iterator[DaemonProcess]:
    """One chronosd for a whole module, for tests that need no fresh state."""
    with daemons() as make:
        yield make()


@dataclass
class Users:
    alice: TestUser
    bob: TestUser
    admin: TestUser


@pytest.fixture(scope="session")
def users() -> Iterator[Users]:
    """alice and bob (ordinary users) and admin (member of chronos-admin), created for real."""
    with unix_accounts(
        ALICE,
        BOB,
        ADMIN,
        groups={ADMIN: (ADMIN_GROUP,)},
        why="multi-user daemon tests need root (to create accounts and switch to them)",
    ) as (alice, bob, admin):
        yield Users(alice=alice, bob=bob, admin=admin)
