"""Fixtures of the security suite: the daemon tests' real chronosd and real accounts.

Every test here reproduces one attack an ordinary local user can make on chronosd
(issue "Trust"), against a real daemon, real Unix accounts and real sockets.
"""

from __future__ import annotations

from daemon.conftest import (  # noqa: F401 - fixtures are found by name
    ADMIN,
    ALICE,
    BOB,
    Users,
    daemon,
    daemon_factory,
    shared_daemon,
    users,
)
