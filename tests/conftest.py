"""Fixtures: every test runs against the simulated backend in its own state dir.

Also what keeps the suite parallel-safe under pytest-xdist (``pytest -n 2``): every
test already has its own state directory, socket and port 0, and Unix accounts are
made under a machine-wide lock (chronos_testing.unix_accounts); what cannot be had
twice on one machine runs on one worker (``pytest_xdist_make_scheduler`` below).
"""

from __future__ import annotations

import signal
import sys
from pathlib import Path
from typing import Any

import pytest

sys.path.insert(0, str(Path(__file__).parent))

from helpers import UNSET, chronos_settings, make_env  # noqa: E402


def _undo_an_inherited_sigint_ignore() -> None:
    """A suite started as a background job (``nohup pytest &``, a CI step's ``&``) inherits
    SIGINT ignored, and every CLI it starts would too: the tests that press Ctrl-C on one
    would wait out their timeouts and fail. Python's own handler, as on a terminal."""
    if signal.getsignal(signal.SIGINT) is signal.SIG_IGN:
        signal.signal(signal.SIGINT, signal.default_int_handler)


_undo_an_inherited_sigint_ignore()


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


#: Tests that share what one machine has once (the real Slurm cluster: fixed ports, one
#: munge, one session-scoped cluster per worker) run together on one xdist worker.
MACHINE_WIDE = {"tests/slurm/": "slurm"}


@pytest.hookimpl(tryfirst=True, optionalhook=True)  # an xdist hook; before xdist's own
def pytest_xdist_make_scheduler(config: pytest.Config, log: Any) -> Any:
    """``-n N`` (``--dist load``, or ``loadgroup``): load-balance test by test, except that
    each MACHINE_WIDE group goes to one worker whole.

    By node id, as xdist's own ``loadgroup`` does; its ``xdist_group`` marker cannot be
    used here: xdist 3.8 tags node ids through ``item._nodeid``, which pytest 9 no
    longer reads, so the marked tests are spread over workers anyway.
    """
    if config.option.dist not in ("load", "loadgroup"):
        return None  # an explicit --dist loadfile, loadscope, worksteal: as asked
    from xdist.scheduler import LoadScopeScheduling

    class MachineWideGroups(LoadScopeScheduling):
        def _split_scope(self, nodeid: str) -> str:
            for prefix, group in MACHINE_WIDE.items():
                if nodeid.startswith(prefix):
                    return group
            return nodeid

    return MachineWideGroups(config, log)
