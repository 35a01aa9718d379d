"""Soft caps: the environment of ``chronos run`` and the framework import hooks.

PyTorch and TensorFlow are replaced by small fake packages that record what
Chronos asked of them, so the hook is tested without either installed.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest

from chronos.frameworks import STARTUP_DIR, limits_env, soft_limit_bytes

from .support import GIB, MIB, PY, SIM_GPU_BYTES

PARTITION = SIM_GPU_BYTES // 4  # --memory 0.25
SOFT = PARTITION - GIB

FAKE_TORCH = {
    "torch/__init__.py": "from . import cuda\n",
    "torch/cuda.py": """
        import json, os

        _queue = []
        _initialized = os.environ.get("FAKE_TORCH_INITIALIZED") == "1"

        def is_initialized():
            return _initialized

        def _lazy_call(fn):
            _queue.append(fn)

        def _run_lazy():
            global _initialized
            _initialized = True
            while _queue:
                _queue.pop(0)()

        def device_count():
            return int(os.environ.get("FAKE_TORCH_DEVICES", "1"))

        def set_per_process_memory_fraction(fraction, device=None):
            with open(os.environ["FAKE_FRAMEWORK_LOG"], "a") as f:
                f.write(json.dumps({"framework": "torch", "fraction": fraction,
                                    "device": device}) + "\\n")
    """,
}
FAKE_TENSORFLOW = {
    "tensorflow/__init__.py": "from . import config\n",
    "tensorflow/config.py": """
        import json, os

        class LogicalDeviceConfiguration:
            def __init__(self, memory_limit=None):
                self.memory_limit = memory_limit

        def list_physical_devices(kind=None):
            count = int(os.environ.get("FAKE_TF_GPUS", "1"))
            return [f"/physical_device:GPU:{i}" for i in range(count)] if kind == "GPU" else []

        def set_logical_device_configuration(device, configs):
            with open(os.environ["FAKE_FRAMEWORK_LOG"], "a") as f:
                f.write(json.dumps({"framework": "tensorflow", "device": device,
                                    "memory_limits": [c.memory_limit for c in configs]}) + "\\n")
    """,
}
USER_SITECUSTOMIZE = {
    "sitecustomize.py": """
        import os
        with open(os.environ["USER_SITE_MARK"], "w") as f:
            f.write("ran")
    """,
}


def write_tree(root: Path, files: dict[str, str]) -> Path:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(textwrap.dedent(text))
    return root


@pytest.fixture
def fakes(tmp_path: Path) -> Path:
    return write_tree(tmp_path / "fakes", {**FAKE_TORCH, **FAKE_TENSORFLOW})


@pytest.fixture
def framework_log(tmp_path: Path) -> Path:
    return tmp_path / "framework.jsonl"


def recorded(log: Path) -> list[dict[str, Any]]:
    if not log.exists():
        return []
    return [json.loads(line) for line in log.read_text().splitlines()]


def chronos_run(
    env: dict[str, str],
    *command: str,
    memory: str = "0.25",
    device: int = 0,
) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(
        [
            PY,
            "-m",
            "chronos.cli",
            "run",
            "--device",
            str(device),
            "--memory",
            memory,
            "--duration",
            "60",
            "--",
            *command,
        ],
        env=env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode == 0, proc.stderr
    return proc


def parse_env(text: str) -> dict[str, str]:
    return dict(line.split("=", 1) for line in text.splitlines() if "=" in line)


# ---------------------------------------------------------------------- environment


def test_soft_limit_leaves_room_for_the_cuda_context() -> None:
    assert soft_limit_bytes(20 * GIB) == 19 * GIB
    assert soft_limit_bytes(1 * GIB) == 512 * MIB  # half, when 1 GiB would be most of it
    assert soft_limit_bytes(2 * GIB) == 1 * GIB


def test_run_gives_the_command_the_partition_and_framework_caps(
    embedded_env: dict[str, str],
) -> None:
    env = {**embedded_env, "PYTHONPATH": "/opt/mine:/opt/theirs"}
    got = parse_env(chronos_run(env, "env").stdout)
    (record,) = json.loads(
        subprocess.run(
            [PY, "-m", "chronos.cli", "list", "--all", "--json"],
            env=embedded_env,
            capture_output=True,
            text=True,
            check=True,
        ).stdout
    )
    assert got["CUDA_VISIBLE_DEVICES"] == "0"
    assert got["CHRONOS_PARTITION_ID"] == record["id"]
    assert int(got["CHRONOS_PARTITION_BYTES"]) == PARTITION == record["memory_bytes"]
    assert int(got["CHRONOS_SOFT_LIMIT_BYTES"]) == SOFT
    assert int(got["CHRONOS_DEVICE_TOTAL_BYTES"]) == SIM_GPU_BYTES
    assert int(got["CUPY_GPU_MEMORY_LIMIT"]) == SOFT
    fraction = float(got["XLA_PYTHON_CLIENT_MEM_FRACTION"])
    assert 0 < fraction <= PARTITION / SIM_GPU_BYTES
    assert fraction == pytest.approx(SOFT / SIM_GPU_BYTES, abs=1e-4)
    assert got["XLA_PYTHON_CLIENT_PREALLOCATE"] == "false"
    assert got["TF_FORCE_GPU_ALLOW_GROWTH"] == "true"
    assert got["PYTHONPATH"].split(os.pathsep) == [str(STARTUP_DIR), "/opt/mine", "/opt/theirs"]


def test_run_on_another_gpu_and_a_small_partition(embedded_env: dict[str, str]) -> None:
    got = parse_env(chronos_run(embedded_env, "env", memory="1GiB", device=1).stdout)
    assert got["CUDA_VISIBLE_DEVICES"] == "1"
    assert int(got["CHRONOS_PARTITION_BYTES"]) == GIB
    assert int(got["CHRONOS_SOFT_LIMIT_BYTES"]) == 512 * MIB
    assert int(got["CUPY_GPU_MEMORY_LIMIT"]) == 512 * MIB
    assert got["PYTHONPATH"] == str(STARTUP_DIR)  # nothing to keep: no trailing separator


def test_limits_env_fraction_never_exceeds_the_partition() -> None:
    for nbytes in (1, MIB, GIB, 3 * GIB, 40 * GIB + 7, SIM_GPU_BYTES):
        env = limits_env(nbytes, SIM_GPU_BYTES, base={})
        assert float(env["XLA_PYTHON_CLIENT_MEM_FRACTION"]) <= nbytes / SIM_GPU_BYTES
        assert int(env["CUPY_GPU_MEMORY_LIMIT"]) <= nbytes


# ------------------------------------------------------------------------- the hook


def test_torch_is_capped_when_cuda_starts(
    embedded_env: dict[str, str], fakes: Path, framework_log: Path
) -> None:
    env = {**embedded_env, "PYTHONPATH": str(fakes), "FAKE_FRAMEWORK_LOG": str(framework_log)}
    code = (
        "import os, torch\n"
        "assert not os.path.exists(os.environ['FAKE_FRAMEWORK_LOG']), 'applied before CUDA'\n"
        "torch.cuda._run_lazy()\n"
    )
    proc = chronos_run(env, PY, "-c", code)
    assert "chronos:" not in proc.stderr
    assert recorded(framework_log) == [
        {"framework": "torch", "fraction": SOFT / SIM_GPU_BYTES, "device": 0}
    ]


def test_torch_with_cuda_already_started_is_capped_at_import(
    embedded_env: dict[str, str], fakes: Path, framework_log: Path
) -> None:
    env = {
        **embedded_env,
        "PYTHONPATH": str(fakes),
        "FAKE_FRAMEWORK_LOG": str(framework_log),
        "FAKE_TORCH_INITIALIZED": "1",
    }
    chronos_run(env, PY, "-c", "import torch")
    assert recorded(framework_log) == [
        {"framework": "torch", "fraction": SOFT / SIM_GPU_BYTES, "device": 0}
    ]


@pytest.mark.parametrize("framework", ["torch", "tensorflow"])
def test_a_program_that_drops_the_soft_limit_before_importing_is_left_alone(
    embedded_env: dict[str, str], fakes: Path, framework_log: Path, framework: str
) -> None:
    """A program may undo the soft cap (the GPU suite does, to reach the library's cap):
    the hook then caps nothing and says nothing (it used to fail to unpack the limit)."""
    env = {**embedded_env, "PYTHONPATH": str(fakes), "FAKE_FRAMEWORK_LOG": str(framework_log)}
    then = {"torch": "import torch; torch.cuda._run_lazy()", "tensorflow": "import tensorflow"}
    code = f"import os; del os.environ['CHRONOS_SOFT_LIMIT_BYTES']; {then[framework]}"
    proc = chronos_run(env, PY, "-c", code)
    assert proc.stderr == ""
    assert recorded(framework_log) == []


def test_tensorflow_is_capped_at_import(
    embedded_env: dict[str, str], fakes: Path, framework_log: Path
) -> None:
    env = {**embedded_env, "PYTHONPATH": str(fakes), "FAKE_FRAMEWORK_LOG": str(framework_log)}
    chronos_run(env, PY, "-c", "import tensorflow as tf; assert tf.config")
    assert recorded(framework_log) == [
        {
            "framework": "tensorflow",
            "device": "/physical_device:GPU:0",
            "memory_limits": [SOFT // MIB],
        }
    ]


def test_a_missing_framework_still_fails_to_import_normally(embedded_env: dict[str, str]) -> None:
    code = (
        "try:\n    import torch\nexcept ModuleNotFoundError as e:\n    print('missing', e.name)\n"
    )
    proc = chronos_run(embedded_env, PY, "-c", code)
    assert proc.stdout.strip() == "missing torch"
    assert proc.stderr == ""


def test_a_users_own_sitecustomize_still_runs(
    embedded_env: dict[str, str], fakes: Path, framework_log: Path, tmp_path: Path
) -> None:
    user_site = write_tree(tmp_path / "user-site", USER_SITECUSTOMIZE)
    mark = tmp_path / "user-site-ran"
    env = {
        **embedded_env,
        "PYTHONPATH": os.pathsep.join([str(fakes), str(user_site)]),
        "FAKE_FRAMEWORK_LOG": str(framework_log),
        "USER_SITE_MARK": str(mark),
    }
    chronos_run(env, PY, "-c", "import torch; torch.cuda._run_lazy()")
    assert mark.read_text() == "ran"
    assert [r["framework"] for r in recorded(framework_log)] == ["torch"]


# -------------------------------------------------------------------------- the API


def test_apply_framework_limits_in_process(
    embedded_env: dict[str, str], fakes: Path, framework_log: Path
) -> None:
    script = textwrap.dedent(
        f"""
        import json, os, sys
        sys.path.insert(0, {str(fakes)!r})
        import torch  # before the limits: capped directly
        from chronos import Partitioner
        p = Partitioner().create(device=0, memory=0.25, duration=60)
        applied = p.apply_framework_limits()
        torch.cuda._run_lazy()
        import tensorflow  # after: capped at import
        names = ["CUDA_VISIBLE_DEVICES", "XLA_PYTHON_CLIENT_MEM_FRACTION",
                 "XLA_PYTHON_CLIENT_PREALLOCATE", "CUPY_GPU_MEMORY_LIMIT",
                 "TF_FORCE_GPU_ALLOW_GROWTH", "CHRONOS_SOFT_LIMIT_BYTES"]
        print(json.dumps({{"applied": applied, "env": {{n: os.environ.get(n) for n in names}}}}))
        p.release()
        """
    )
    env = {**embedded_env, "FAKE_FRAMEWORK_LOG": str(framework_log)}
    proc = subprocess.run([PY, "-c", script], env=env, capture_output=True, text=True, timeout=30)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["env"] == {
        "CUDA_VISIBLE_DEVICES": "0",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{int(SOFT / SIM_GPU_BYTES * 10**4) / 10**4:.4f}",
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "CUPY_GPU_MEMORY_LIMIT": str(SOFT),
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        "CHRONOS_SOFT_LIMIT_BYTES": str(SOFT),
    }
    assert out["applied"]["torch"] == f"capped at {SOFT} bytes"
    assert out["applied"]["tensorflow"] == "capped at import"
    assert out["applied"]["jax"] == "capped by environment"
    assert recorded(framework_log) == [
        {"framework": "torch", "fraction": SOFT / SIM_GPU_BYTES, "device": 0},
        {
            "framework": "tensorflow",
            "device": "/physical_device:GPU:0",
            "memory_limits": [SOFT // MIB],
        },
    ]


# ------------------------------------------------------------ without chronos at all


def test_the_startup_dir_works_in_an_interpreter_without_chronos(
    tmp_path: Path, fakes: Path, framework_log: Path
) -> None:
    venv = tmp_path / "bare"
    subprocess.run([sys.executable, "-m", "venv", "--without-pip", str(venv)], check=True)
    bare = str(venv / "bin" / "python")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("CHRONOS_", "PYTHON"))}
    env.update(
        limits_env(PARTITION, SIM_GPU_BYTES, base={}),
        CHRONOS_PARTITION_ID="p-bare",
        FAKE_FRAMEWORK_LOG=str(framework_log),
    )
    assert env["PYTHONPATH"] == str(STARTUP_DIR)
    no_chronos = subprocess.run([bare, "-c", "import chronos"], env=env, capture_output=True)
    assert no_chronos.returncode != 0  # the test means something: chronos is not importable

    proc = subprocess.run([bare, "-c", "print(1)"], env=env, capture_output=True, text=True)
    assert (proc.returncode, proc.stdout, proc.stderr) == (0, "1\n", "")

    env["PYTHONPATH"] += os.pathsep + str(fakes)
    proc = subprocess.run(
        [bare, "-c", "import torch; torch.cuda._run_lazy()"],
        env=env,
        capture_output=True,
        text=True,
    )
    assert (proc.returncode, proc.stderr) == (0, "")
    assert recorded(framework_log) == [
        {"framework": "torch", "fraction": SOFT / SIM_GPU_BYTES, "device": 0}
    ]
