"""Fixtures of the Slurm tests: one real two-node Slurm cluster per module, and users.

Skips with the reason when this machine cannot run it (not root, packages missing).
"""

from __future__ import annotations

import os
from collections.abc import Iterator

import pytest
from chronos_testing import TestUser, unix_accounts

from .support import SlurmCluster, missing_binaries


@pytest.fixture(scope="session")
def slurm_users() -> Iterator[list[TestUser]]:
    if os.geteuid() != 0:
        pytest.skip("the Slurm tests run slurmctld, slurmd and munged: they need root")
    missing = missing_binaries()
    if missing:
        pytest.skip(
            f"Slurm is not installed ({', '.join(missing)} missing): "
            "apt-get install -y slurm-wlm munge"
        )
    with unix_accounts("alice", "bob") as users:
        yield users


@pytest.fixture(scope="session")
def cluster(slurm_users: list[TestUser]) -> Iterator[SlurmCluster]:
    made = SlurmCluster()
    try:
        made.start()
    except BaseException:
        print(made.logs())
        made.stop()
        raise
    try:
        yield made
    finally:
        made.stop()


@pytest.fixture
def alice(slurm_users: list[TestUser]) -> TestUser:
    return slurm_users[0]


@pytest.fixture
def bob(slurm_users: list[TestUser]) -> TestUser:
    return slurm_users[1]
