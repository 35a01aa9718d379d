"""The start-up hook of ``chronos run`` hands over to the distribution's own sitecustomize.

Debian's and Ubuntu's system Python ship a ``sitecustomize`` in the standard library's
directory; ``chronos run`` puts ``_startup/sitecustomize.py`` first on PYTHONPATH, which
shadows it, so ours must import the next one itself. It used to call ``importlib.util``
without importing it: every Python program under ``chronos run`` printed "the next
sitecustomize failed" and the distribution's was skipped. Here a real sitecustomize
lies further down the path (a directory on PYTHONPATH after ours, as the standard
library's is) and a real ``chronos run`` starts Python programs under each interpreter
at hand, the system's included.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest

from .support import PY

DISTRIBUTION_SITECUSTOMIZE = """
    import os, sys
    with open(os.environ["DIST_SITE_MARK"], "w") as f:
        f.write("ran under %d.%d" % sys.version_info[:2])
"""


def interpreters() -> list[str]:
    """This test's Python, and the system's own where it is another one (Debian's)."""
    found = [sys.executable]
    system = Path("/usr/bin/python3")
    if system.exists() and system.resolve() != Path(sys.executable).resolve():
        found.append(str(system))
    return found


@pytest.fixture
def distribution_site(tmp_path: Path) -> Path:
    site = tmp_path / "dist-packages"
    site.mkdir()
    (site / "sitecustomize.py").write_text(textwrap.dedent(DISTRIBUTION_SITECUSTOMIZE))
    return site


@pytest.mark.parametrize("python", interpreters())
def test_chronos_run_chains_to_the_distributions_sitecustomize(
    python: str, embedded_env: dict[str, str], distribution_site: Path, tmp_path: Path
) -> None:
    mark = tmp_path / "dist-site-ran"
    env = {
        **embedded_env,
        "PYTHONPATH": str(distribution_site),  # chronos run puts _startup before it
        "DIST_SITE_MARK": str(mark),
    }
    program = "import sys; print('program ran', 'sitecustomize' in sys.modules)"
    proc = subprocess.run(
        [PY, "-m", "chronos.cli", "run", "--memory", "0.25", "--duration", "60"]
        + ["--", python, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    assert proc.stdout.splitlines()[-1] == "program ran True"
    assert "failed" not in proc.stderr, proc.stderr
    assert "chronos:" not in proc.stderr, proc.stderr
    assert mark.read_text().startswith("ran under 3."), "the distribution's sitecustomize ran"


def test_the_startup_hook_is_what_chronos_run_puts_first(
    embedded_env: dict[str, str], distribution_site: Path
) -> None:
    """The chain test above is only meaningful if ours really comes first and shadows it."""
    env = {**embedded_env, "PYTHONPATH": str(distribution_site), "DIST_SITE_MARK": os.devnull}
    program = "import sitecustomize; print(sitecustomize.__file__)"
    proc = subprocess.run(
        [PY, "-m", "chronos.cli", "run", "--memory", "0.25", "--duration", "60"]
        + ["--", sys.executable, "-c", program],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr
    loaded = Path(proc.stdout.splitlines()[-1])
    assert loaded.parent.name == "_startup" and loaded.parent.parent.name == "chronos"
