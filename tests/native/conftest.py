"""Fixtures of the allocation-cap tests: a fake CUDA driver and programs, built from C here.

``native`` compiles, once per session, into a directory every test account can read:
the fake ``libcuda.so.1`` (tests/native/fake_cuda.c, one pretend 80 GiB device), the
``cap_client`` test program linked against it, and the cap library itself from its
source with ``-Wall -Wextra -Werror`` (the tests then use the *installed* library,
the one Chronos preloads). Without a C compiler these tests are skipped.
"""

from __future__ import annotations

import shutil
import subprocess
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path

import pytest
from chronos_testing import PY, clean_env, shared_tmpdir
from daemon.conftest import (  # noqa: F401 - fixtures are found by name
    Users,
    daemon,
    daemon_factory,
    users,
)
from helpers import GIB as GIB
from helpers import MIB as MIB

from chronos import alloccap

HERE = Path(__file__).parent
NATIVE_SRC = Path(alloccap.__file__).parent / "native"
STRICT = ["-std=gnu11", "-Wall", "-Wextra", "-Werror"]
CHUNK = 256 * MIB
FAKE_TOTAL = 80 * GIB


def run_argv(*command: str, memory: str = "10GiB") -> list[str]:
    """``chronos run`` of ``command`` in a partition of ``memory`` for two minutes."""
    return [PY, "-m", "chronos.cli", "run", "--memory", memory, "--duration", "120", "--", *command]


@dataclass
class Native:
    dir: Path
    fake_driver: Path
    client: Path
    library: Path
    strict_library: Path

    def env(self, base: Mapping[str, str] | None = None, **extra: str) -> dict[str, str]:
        """An environment whose libcuda.so.1 is the fake."""
        env = dict(clean_env() if base is None else base)
        env.pop("LD_PRELOAD", None)
        env.pop(alloccap.ENV_FILE, None)
        env["LD_LIBRARY_PATH"] = str(self.dir)
        env.update(extra)
        return env

    def capped(self, cap_file: Path, base: Mapping[str, str] | None = None) -> dict[str, str]:
        return {**self.env(base), **alloccap.preload_env(cap_file, base={})}

    def run(
        self, env: Mapping[str, str], mode: str, *ops: str, timeout: float = 60
    ) -> list[list[str]]:
        """Run cap_client; return its output lines, split into words."""
        result = subprocess.run(
            [str(self.client), mode, *ops],
            env=dict(env),
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        assert result.returncode == 0, result.stderr
        return [line.split() for line in result.stdout.splitlines()]


def compile_c(*argv: str) -> None:
    result = subprocess.run(["cc", *argv], capture_output=True, text=True)
    assert result.returncode == 0, f"cc {' '.join(argv)}:\n{result.stderr}"


@pytest.fixture(scope="session")
def native() -> Iterator[Native]:
    yield from build_native()


def build_native() -> Iterator[Native]:
    """Build the fake driver, the client and the strict library (a fixture's body)."""
    if shutil.which("cc") is None:
        pytest.skip("no C compiler")
    where = shared_tmpdir("chronos-native-")
    fake = where / "libcuda.so.1"
    compile_c(
        *STRICT,
        "-O1",
        "-fPIC",
        "-shared",
        "-Wl,-soname,libcuda.so.1",
        "-o",
        str(fake),
        str(HERE / "fake_cuda.c"),
    )
    (where / "libcuda.so").symlink_to(fake.name)
    client = where / "cap_client"
    compile_c(
        *STRICT, "-o", str(client), str(HERE / "cap_client.c"), f"-L{where}", "-lcuda", "-ldl"
    )
    strict = where / "libchronos_cap_strict.so"
    compile_c(
        *STRICT,
        "-O2",
        "-fPIC",
        "-shared",
        "-fvisibility=hidden",
        "-o",
        str(strict),
        str(NATIVE_SRC / "chronos_cap.c"),
        "-ldl",
        "-lpthread",
    )
    library = alloccap.library_path()
    if library is None:
        pytest.fail("the installed package has no libchronos_cap.so (pip install -e . failed?)")
    for path in where.iterdir():
        if not path.is_symlink():
            path.chmod(0o755)
    yield Native(where, fake, client, library, strict)
    shutil.rmtree(where, ignore_errors=True)


@pytest.fixture
def cap_file(tmp_path: Path) -> Path:
    """A fresh accounting file for a 10 GiB partition."""
    return alloccap.create_file(tmp_path / "p.cap", 10 * GIB)


def reserve_of(limit: int) -> int:
    return alloccap.process_reserve(limit)


def allowed(limit: int, processes: int = 1, chunk: int = CHUNK) -> int:
    """What fill:CHUNK must get in a partition of ``limit`` bytes shared by ``processes``."""
    return alloccap.allocatable(limit, processes) // chunk * chunk
