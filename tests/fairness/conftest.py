"""Fixtures of the fair-sharing tests: in-process harnesses, real daemons, real accounts."""

from __future__ import annotations

import os
import pwd
import shutil
import subprocess
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import pytest

from .support import Account, FairDaemon, Harness, clean_env, make_service, python_candidates

ANN = "chronos_f_ann"
BEN = "chronos_f_ben"


@pytest.fixture(autouse=True)
def _simulated(monkeypatch: pytest.MonkeyPatch) -> None:
    """Never touch a real machine's Chronos: simulated GPUs, no stray settings."""
    for name in (
        "CHRONOS_CONFIG",
        "CHRONOS_SOCKET",
        "CHRONOS_SIMULATED_GPUS",
        "CHRONOS_SIMULATED_PROCESSES",
    ):
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
    made: list[FairDaemon] = []

    def make(policy: str = "") -> FairDaemon:
        d = FairDaemon(policy)
        made.append(d)
        return d.start()

    yield make
    for d in made:
        d.cleanup()


@dataclass
class Accounts:
    ann: Account
    ben: Account


def _run(*argv: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(list(argv), capture_output=True, text=True, timeout=60)


@pytest.fixture(scope="session")
def accounts() -> Iterator[Accounts]:
    """Two ordinary Unix accounts (created here, removed afterwards)."""
    if os.geteuid() != 0:
        pytest.skip("needs root to create accounts and switch to them")
    for tool in ("useradd", "userdel", "setpriv"):
        if shutil.which(tool) is None:
            pytest.skip(f"needs {tool}")
    created: list[str] = []
    try:
        for name in (ANN, BEN):
            try:
                pwd.getpwnam(name)
            except KeyError:
                proc = _run(
                    "useradd",
                    "--no-create-home",
                    "--shell",
                    "/usr/sbin/nologin",
                    "--user-group",
                    name,
                )
                if proc.returncode != 0:
                    pytest.skip(f"cannot create user {name}: {proc.stderr.strip()}")
                created.append(name)
        a, b = pwd.getpwnam(ANN), pwd.getpwnam(BEN)
        probe = Account(ANN, a.pw_uid, a.pw_gid)
        tried = []
        for python, extra in python_candidates():
            probe.python, probe.python_env = python, extra
            proc = subprocess.run(
                probe.argv(*python, "-c", "import chronos.cli"),
                env=probe.env(clean_env()),
                capture_output=True,
                text=True,
                timeout=30,
                cwd="/",
            )
            if proc.returncode == 0:
                break
            tried.append(f"{python}: {proc.stderr.strip()[-200:]}")
        else:
            pytest.skip(
                "no interpreter can import chronos as an ordinary user: " + "; ".join(tried)
            )
        yield Accounts(
            Account(ANN, a.pw_uid, a.pw_gid, probe.python, probe.python_env),
            Account(BEN, b.pw_uid, b.pw_gid, probe.python, probe.python_env),
        )
    finally:
        for name in reversed(created):
            _run("userdel", name)
