"""Collaborators come through constructors, and a mismatched wiring fails at construction,
not later in a reap or a plan (issue #12, "wiring through constructors")."""

from __future__ import annotations

import asyncio
from pathlib import Path

import pytest
from helpers import GIB

from chronos.config import parse_config
from chronos.daemon.clock import SteadyClock
from chronos.daemon.deadlines import Deadlines
from chronos.ledger import Ledger, Member
from chronos.service import Service, ledger_policy


def test_the_ledger_asks_the_policy_in_force_at_each_use(tmp_path: Path) -> None:
    configs = [parse_config({"reservable_share": 0.5}, "test")]
    policy = ledger_policy(lambda: configs[-1])
    member = Member(0, "GPU-0", 80 * GIB, 80 * GIB, GIB)
    assert policy.capacity_of(member) == 40 * GIB
    configs.append(parse_config({"reservable_share": 0.25, "fairshare": {"half_life": "1d"}}, "t"))
    assert policy.capacity_of(member) == 20 * GIB  # a reload reaches waiting requests
    assert policy.fairshare_half_life() == 86400.0


def test_the_service_made_on_a_ledger_sets_its_policy_and_a_reload_reaches_it(
    tmp_path: Path,
) -> None:
    ledger = Ledger(tmp_path / "a.db", durable=False)
    member = Member(0, "GPU-0", 80 * GIB, 80 * GIB, GIB)
    assert ledger.policy.capacity_of(member) == 80 * GIB  # as admitted, before a service
    service = Service(ledger, parse_config({"fairshare": {"half_life": "1d"}}, "t"), "embedded")
    assert ledger.policy.fairshare_half_life() == 86400.0
    service.config = parse_config({"reservable_share": 0.5}, "t")  # what SIGHUP does
    assert ledger.policy.capacity_of(member) == 40 * GIB
    assert ledger.policy.fairshare_half_life() == 7 * 86400.0
    service.close()


def test_the_deadline_keeper_refuses_a_ledger_on_another_clock(tmp_path: Path) -> None:
    clock = SteadyClock()

    async def build(ledger: Ledger) -> None:
        Deadlines(ledger, lambda: 30.0, clock=clock).close()

    wall = Ledger(tmp_path / "a.db", durable=False)  # time.time: a clock that can step
    with pytest.raises(ValueError, match="this clock"):
        asyncio.run(build(wall))
    asyncio.run(build(Ledger(tmp_path / "b.db", durable=False, clock=clock.now)))
