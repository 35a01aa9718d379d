"""Fixtures of the fair-sharing tests: in-process harnesses, real daemons, real accounts."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest
from chronos_testing import daemons, unix_accounts
from helpers import UNSET

from .support import Account, FairDaemon, Harness, make_service

ANN = "chronos_f_ann"
BEN = "chronos_f_ben"


@pytest.fixture(autouse=True)
def _simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch a real machine's Chronos: simulated GPUs, no stray settings."""
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("CHRONOS_BACKEND", "simulated")


@pytest.fixture
def harness_factory() -> Iterator[Callable[..., Harness]]:
    made: list[Harness] = []

    def make(policy: dict[str, object] | None = None, **kwargs: object) -> Harness:
        h = make_service(policy, **kwargs)  # type: ignore[arg-type]
        made.append(h)
        return h

    yield make
    for h in made:
        h.close()


@pytest.fixture
def daemon_factory() -> Iterator[Callable[[str], FairDaemon]]:
    with daemons() as make:
        yield lambda policy="": make(factory=FairDaemon, policy=policy)


@dataclass
class Accounts:
    ann: Account
    ben: Account


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    """Two ordinary Unix accounts (created here, removed afterwards)."""
    with unix_accounts(ANN, BEN, why="needs root to create accounts and switch to them") as (
        ann,
        ben,
    ):
        yield Accounts(Account(ann), Account(ben))
