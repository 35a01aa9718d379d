"""Programs the GPU suites run inside partitions, as ``python3 gpu_programs.py NAME OUT``.

Each writes JSON lines of what happened (with wall-clock times) to OUT, so the
test can measure from outside what the program saw from inside.
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

GIB = 1 << 30


def emit(out: str, **fields: object) -> None:
    with open(out, "a") as f:
        record = {
            "t": time.time(),
            "pid": os.getpid(),
            "partition": os.environ.get("CHRONOS_PARTITION_ID"),
            **fields,
        }
        f.write(json.dumps(record) + "\n")


def record_sigterm(out: str, exit_after: bool = True) -> None:
    def on_term(signum: int, frame: object) -> None:
        emit(out, event="sigterm")
        if exit_after:
            os._exit(143)

    signal.signal(signal.SIGTERM, on_term)


def torch_fill_to_soft_cap(out: str) -> None:
    """Obey the soft cap: allocate until PyTorch says out of memory, then keep working."""
    import torch

    record_sigterm(out)
    total = torch.cuda.get_device_properties(0).total_memory
    try:
        torch.empty(int(0.5 * total), dtype=torch.uint8, device="cuda")
        emit(out, event="big_allocation_succeeded")
    except torch.OutOfMemoryError:
        emit(out, event="oom_on_big_allocation")
    held = []
    chunk = 256 << 20
    while True:
        try:
            held.append(torch.empty(chunk, dtype=torch.uint8, device="cuda"))
        except torch.OutOfMemoryError:
            break
    torch.cuda.synchronize()
    emit(out, event="filled", bytes=len(held) * chunk)
    a = torch.randn(2048, 2048, device="cuda")
    for _ in range(50):
        a = (a @ a).clamp(-1, 1)
    torch.cuda.synchronize()
    time.sleep(1.5)  # several daemon samples at the cap
    emit(out, event="alive")


def cupy_exceed(out: str) -> None:
    """Ignore the soft cap: raw cudaMalloc past the partition, then wait to be stopped."""
    import cupy
    import pynvml

    record_sigterm(out)
    cap = int(os.environ["CHRONOS_PARTITION_BYTES"])
    cupy.cuda.runtime.malloc(1 << 20)  # create the context first
    pynvml.nvmlInit()
    handle = pynvml.nvmlDeviceGetHandleByIndex(0)
    context = next(
        (
            p.usedGpuMemory or 0
            for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
            if p.pid == os.getpid()
        ),
        0,
    )
    allocated = 0
    step = GIB
    while context + allocated <= cap:
        cupy.cuda.runtime.malloc(step)
        allocated += step
    emit(out, event="crossed", bytes=context + allocated, cap=cap)
    time.sleep(30)
    emit(out, event="not_stopped")


def torch_hold_until_end(out: str) -> None:
    """Stay within the cap and keep computing until the partition ends."""
    import torch

    record_sigterm(out)
    x = torch.empty(GIB, dtype=torch.uint8, device="cuda")
    a = torch.randn(1024, 1024, device="cuda")
    torch.cuda.synchronize()
    emit(out, event="holding", bytes=x.numel())
    while True:
        a = (a @ a).clamp(-1, 1)
        torch.cuda.synchronize()
        time.sleep(0.01)


def torch_within_for(out: str, seconds: float = 4.0) -> None:
    import torch

    record_sigterm(out)
    x = torch.empty(2 * GIB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    emit(out, event="holding", bytes=x.numel())
    time.sleep(seconds)
    emit(out, event="done")


def torch_hold_10gib(out: str) -> None:
    import torch

    x = torch.empty(10 * GIB, dtype=torch.uint8, device="cuda")
    torch.cuda.synchronize()
    emit(out, event="holding", bytes=x.numel())
    time.sleep(120)


def _over_then_within(out: str, allocate_half, allocate_small, oom_types) -> None:  # type: ignore[no-untyped-def]
    """Ask for half the GPU (over the soft cap), then for a little, then keep it a while."""
    record_sigterm(out)
    total = int(os.environ["CHRONOS_DEVICE_TOTAL_BYTES"])
    try:
        allocate_half(total // 2)
        emit(out, event="big_allocation_succeeded")
    except oom_types as exc:
        emit(out, event="oom_on_big_allocation", error=type(exc).__name__)
    held = allocate_small(GIB)
    time.sleep(1.5)
    emit(out, event="alive", held=bool(held is not None))


def jax_soft_cap(out: str) -> None:
    import jax.numpy as jnp

    def alloc(n: int):  # type: ignore[no-untyped-def]
        return jnp.ones((n // 4,), dtype=jnp.float32).block_until_ready()

    _over_then_within(out, alloc, alloc, (Exception,))


def cupy_soft_cap(out: str) -> None:
    import cupy

    def alloc(n: int):  # type: ignore[no-untyped-def]
        x = cupy.ones((n,), dtype=cupy.uint8)
        cupy.cuda.runtime.deviceSynchronize()
        return x

    _over_then_within(out, alloc, alloc, (cupy.cuda.memory.OutOfMemoryError,))


PROGRAMS = {
    "jax_soft_cap": jax_soft_cap,
    "cupy_soft_cap": cupy_soft_cap,
    "torch_fill_to_soft_cap": torch_fill_to_soft_cap,
    "cupy_exceed": cupy_exceed,
    "torch_hold_until_end": torch_hold_until_end,
    "torch_within_for": torch_within_for,
    "torch_hold_10gib": torch_hold_10gib,
}

if __name__ == "__main__":
    PROGRAMS[sys.argv[1]](sys.argv[2])
