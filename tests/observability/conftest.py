"""Fixtures of the observability tests: real daemons (simulated GPUs) and a headless browser."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from typing import Any

import pytest
from chronos_testing import daemons

from .support import CHROMIUM, CHROMIUM_ARGS, Daemon, find_browser


@pytest.fixture
def daemon_factory() -> Iterator[Callable[..., Daemon]]:
    """Start chronosd with a policy (TOML text) and flags; all are stopped at teardown."""
    with daemons() as make:
        yield lambda config="", args=(): make(factory=Daemon, config=config, args=args)


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    """Debian's Chromium driven by Playwright (skipped, with the reason, where either lacks)."""
    missing = find_browser()
    if missing:
        pytest.skip(f"browser test needs Chromium and Playwright: {missing}")
    from playwright.sync_api import sync_playwright

    with sync_playwright() as pw:
        launched = pw.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        try:
            yield launched
        finally:
            launched.close()
