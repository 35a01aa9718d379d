"""Fixtures: every test runs against the simulated backend in its own state dir."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import UNSET, chronos_settings, make_env  # noqa: E402


@pytest.fixture
def chronos_env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> dict[str, str]:
    """Point Chronos at ``tmp_path/home`` with simulated GPUs, embedded mode.

    Sets the variables in this process (for the Python API) and returns the
    same environment as a dict for subprocesses.
    """
    home = tmp_path / "home"
    for name in UNSET:
        monkeypatch.delenv(name, raising=False)
    for name, value in chronos_settings(home).items():
        monkeypatch.setenv(name, value)
    return make_env(home)
