"""Soft caps: the knobs that keep each ML framework inside a partition.

A framework told its limit fails an allocation past it with its own clean
out-of-memory error, which a program can catch; the daemon's hard cap only
kills. The soft cap is set below the partition's bytes by ``CONTEXT_RESERVE``
because the hard cap counts what the driver reports for the process, which
includes the CUDA context and library workspaces that no framework limit
covers (about 0.5 GiB on an H200).

A partition of several GPUs (a group) has a share on each; the process sees them as
CUDA ordinals 0..n-1 in share order (``CUDA_VISIBLE_DEVICES``), and
``CHRONOS_SOFT_LIMITS`` (``soft:total`` per ordinal, comma-separated) tells
PyTorch and TensorFlow each GPU's own cap. JAX and CuPy take one number per
process, applied to every GPU: they get the smallest share's.
"""

from __future__ import annotations

import os
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

CONTEXT_RESERVE = 1 << 30
"""Bytes left outside the framework's cap for the CUDA context and libraries."""
STARTUP_DIR = Path(__file__).parent / "_startup"


def soft_limit_bytes(partition_bytes: int) -> int:
    """What a framework may allocate so the whole process stays inside the partition."""
    reserve = min(CONTEXT_RESERVE, partition_bytes // 2)
    return partition_bytes - reserve


def limits_env(
    partition_bytes: int,
    total_bytes: int,
    base: dict[str, str] | None = None,
    capped: bool = False,
    shares: Sequence[tuple[int, int]] | None = None,
) -> dict[str, str]:
    """Environment that caps PyTorch, TensorFlow, JAX and CuPy in a child process.

    ``capped``: the allocation-time cap library is preloaded, so the process sees the
    partition's bytes as its GPU's total (cuDeviceTotalMem_v2, cuMemGetInfo_v2); the
    fractions PyTorch and JAX take are fractions of that reported total. The soft cap
    in bytes stays below the library's own (its per-process reserve is smaller than
    ``CONTEXT_RESERVE``), so the framework's clean OOM comes first.
    ``shares``: a group's ``(bytes, total)`` per GPU in share order (CUDA ordinal order),
    the primary first; without it the partition is the one GPU of the first two arguments.
    """
    per_gpu = list(shares) if shares else [(partition_bytes, total_bytes)]
    softs = [soft_limit_bytes(nbytes) for nbytes, _ in per_gpu]
    totals = [nbytes if capped else total for nbytes, total in per_gpu]
    partition_bytes, soft, total_bytes = per_gpu[0][0], softs[0], totals[0]
    # One number for every GPU (JAX, CuPy): the smallest share's, so none goes over.
    fraction = min(_floor(s / t) for s, t in zip(softs, totals, strict=True))
    pythonpath = (os.environ if base is None else base).get("PYTHONPATH")
    return {
        "CHRONOS_PARTITION_BYTES": str(partition_bytes),
        "CHRONOS_SOFT_LIMIT_BYTES": str(soft),
        "CHRONOS_DEVICE_TOTAL_BYTES": str(total_bytes),
        "CHRONOS_SOFT_LIMITS": ",".join(f"{s}:{t}" for s, t in zip(softs, totals, strict=True)),
        # PyTorch and TensorFlow: applied at import by _startup/sitecustomize.py.
        "PYTHONPATH": str(STARTUP_DIR) + (os.pathsep + pythonpath if pythonpath else ""),
        "TF_FORCE_GPU_ALLOW_GROWTH": "true",
        # JAX: never hold more than the cap, and take memory only as used.
        "XLA_PYTHON_CLIENT_PREALLOCATE": "false",
        "XLA_PYTHON_CLIENT_MEM_FRACTION": f"{fraction:.4f}",
        # CuPy: each device's memory pool refuses past this many bytes.
        "CUPY_GPU_MEMORY_LIMIT": str(min(softs)),
    }


def apply_in_process(
    partition_bytes: int, total_bytes: int, shares: Sequence[tuple[int, int]] | None = None
) -> dict[str, str]:
    """Cap the frameworks of the *current* process; return what was applied.

    Environment knobs only work before the framework is imported (JAX, CuPy)
    or before CUDA starts (``CUDA_VISIBLE_DEVICES``); PyTorch and TensorFlow
    are capped directly if already imported, else at import. ``shares`` as for
    :func:`limits_env`.
    """
    env = limits_env(partition_bytes, total_bytes, shares=shares)
    soft = int(env["CHRONOS_SOFT_LIMIT_BYTES"])
    applied: dict[str, str] = {}
    for name in (
        "XLA_PYTHON_CLIENT_PREALLOCATE",
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "CUPY_GPU_MEMORY_LIMIT",
        "TF_FORCE_GPU_ALLOW_GROWTH",
        "CHRONOS_SOFT_LIMIT_BYTES",
        "CHRONOS_DEVICE_TOTAL_BYTES",
        "CHRONOS_SOFT_LIMITS",
    ):
        os.environ[name] = env[name]
    for module, late in (
        ("jax", "jax was imported before the limit was set"),
        ("cupy", "cupy was imported before the limit was set"),
    ):
        applied[module] = late if module in sys.modules else "capped by environment"
    hooks = _startup_hooks()
    for name in ("torch", "tensorflow"):
        if name in sys.modules:
            hooks.cap_imported(name, sys.modules[name])
            applied[name] = f"capped at {soft} bytes"
        else:
            applied[name] = "capped at import"
    hooks.install()
    return applied


def _startup_hooks() -> Any:
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "_chronos_startup", STARTUP_DIR / "sitecustomize.py"
    )
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)  # not named "sitecustomize": defines, runs nothing
    return module


def _floor(value: float, places: int = 4) -> float:
    scale = 10**places
    return float(int(value * scale) / scale)
