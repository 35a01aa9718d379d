"""Programs the allocation-cap GPU suite runs in partitions: ``python3 THIS NAME OUT [ARG]``.

Each writes JSON lines of what it saw (wall-clock times, bytes, error names) to
OUT. ``fill_*`` programs allocate 256 MiB at a time until their framework reports
out-of-memory, then prove they still work (a matmul) and exit 0. With ARG ``raw``
they first undo Chronos' framework soft caps, so what stops them is the
allocation-time cap library, not the framework's own limit.
"""

from __future__ import annotations

import ctypes
import glob
import json
import os
import signal
import sys
import time

GIB = 1 << 30
CHUNK = 256 << 20


def emit(out: str, **fields: object) -> None:
    with open(out, "a") as f:
        record = {"t": time.time(), "pid": os.getpid(), **fields}
        f.write(json.dumps(record) + "\n")


def watch_sigterm(out: str) -> None:
    def on_term(signum: int, frame: object) -> None:
        emit(out, event="sigterm")
        os._exit(143)

    signal.signal(signal.SIGTERM, on_term)


def cudart() -> ctypes.CDLL:
    """libcudart from the system or from the CUDA wheels next to torch/cupy."""
    names = ["libcudart.so.13", "libcudart.so.12", "libcudart.so"]
    for name in names:
        try:
            return ctypes.CDLL(name)
        except OSError:
            pass
    for entry in sys.path:
        for path in sorted(
            glob.glob(os.path.join(entry, "nvidia", "**", "libcudart.so*"), recursive=True)
        ):
            try:
                return ctypes.CDLL(path)
            except OSError:
                pass
    raise OSError("no libcudart found")


def reported(out: str) -> None:
    """What the process is told about its GPU (cudaMemGetInfo)."""
    rt = cudart()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    rc = rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    emit(out, event="meminfo", rc=rc, free=free.value, total=total.value)


def _cudart_fill(out: str, hold_s: float) -> None:
    rt = cudart()
    rt.cudaFree(ctypes.c_void_p(0))  # create the context (charges the per-process reserve)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    emit(out, event="meminfo", free=free.value, total=total.value)
    barrier = os.environ.get("ALLOC_CAP_BARRIER")
    if barrier:  # several processes: all hold their context before anyone fills
        emit(out, event="ready")
        while not os.path.exists(barrier):
            time.sleep(0.01)
    held, rc = [], 0
    while True:
        p = ctypes.c_void_p()
        rc = rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(CHUNK))
        if rc != 0:
            break
        held.append(p)
    emit(out, event="filled", bytes=len(held) * CHUNK, error=rc)
    time.sleep(hold_s)
    emit(out, event="alive")


def cudart_fill(out: str, arg: str = "") -> None:
    """Raw cudaMalloc through ctypes (dlopen + dlsym), nothing else."""
    watch_sigterm(out)
    _cudart_fill(out, float(arg or 0.5))


def cudart_exceed(out: str, arg: str = "") -> None:
    """Run with LD_PRELOAD cleared: allocates past the cap, the sampler must stop it."""
    watch_sigterm(out)
    rt = cudart()
    cap = int(os.environ["CHRONOS_PARTITION_BYTES"])
    held, total = [], 0
    while total <= cap + GIB:
        p = ctypes.c_void_p()
        if rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(CHUNK)) != 0:
            break
        held.append(p)
        total += CHUNK
    emit(out, event="crossed", bytes=total, cap=cap)
    time.sleep(10)
    emit(out, event="not_stopped")


def _undo_soft_caps() -> None:
    for name in (
        "XLA_PYTHON_CLIENT_MEM_FRACTION",
        "CUPY_GPU_MEMORY_LIMIT",
        "CHRONOS_SOFT_LIMIT_BYTES",
        "XLA_PYTHON_CLIENT_PREALLOCATE",
    ):
        os.environ.pop(name, None)


def _fill(out: str, alloc, oom_types, work, give_back=None) -> None:  # type: ignore[no-untyped-def]
    """Fill, then free 1 GiB (a program that caught its OOM goes on) and compute."""
    held = []
    error = None
    while True:
        try:
            held.append(alloc(CHUNK))
        except oom_types as exc:
            error = type(exc).__name__
            break
    emit(out, event="filled", bytes=len(held) * CHUNK, error=error)
    del held[-4:]
    if give_back is not None:
        give_back()
    work()  # cuBLAS and friends still get their workspace
    emit(out, event="alive", holding=len(held) * CHUNK)


def torch_fill(out: str, arg: str = "") -> None:
    """PyTorch with whatever PYTORCH_CUDA_ALLOC_CONF the test set."""
    if arg == "raw":
        _undo_soft_caps()
    watch_sigterm(out)
    import torch

    if arg == "raw":
        torch.cuda.set_per_process_memory_fraction(1.0, 0)
    props = torch.cuda.get_device_properties(0)
    free, total = torch.cuda.mem_get_info(0)
    emit(out, event="meminfo", free=free, total=total, props_total=props.total_memory)

    def work() -> None:
        a = torch.randn(1024, 1024, device="cuda")
        for _ in range(20):
            a = (a @ a).clamp(-1, 1)
        torch.cuda.synchronize()

    _fill(
        out,
        lambda n: torch.empty(n, dtype=torch.uint8, device="cuda"),
        (torch.OutOfMemoryError,),
        work,
        torch.cuda.empty_cache,
    )


def jax_fill(out: str, arg: str = "") -> None:
    """JAX; arg: default | noprealloc | platform (its three allocator modes), + ',raw'."""
    mode, _, raw = arg.partition(",")
    if raw == "raw" or mode:
        _undo_soft_caps()
    if mode == "noprealloc":
        os.environ["XLA_PYTHON_CLIENT_PREALLOCATE"] = "false"
    elif mode == "platform":
        os.environ["XLA_PYTHON_CLIENT_ALLOCATOR"] = "platform"
    watch_sigterm(out)
    import jax
    import jax.numpy as jnp

    def alloc(n: int):  # type: ignore[no-untyped-def]
        return jnp.ones((n // 4,), dtype=jnp.float32).block_until_ready()

    def work() -> None:
        a = jnp.ones((1024, 1024))
        for _ in range(20):
            a = jnp.clip(a @ a, -1, 1)
        a.block_until_ready()

    emit(out, event="devices", devices=str(jax.devices()))
    if jax.devices()[0].platform != "gpu":  # never fill the host's memory instead
        emit(out, event="no_gpu")
        return
    _fill(out, alloc, (Exception,), work)


def cupy_fill(out: str, arg: str = "") -> None:
    """CuPy; arg: default | async (MemoryAsyncPool), + ',raw'."""
    mode, _, raw = arg.partition(",")
    if raw == "raw":
        _undo_soft_caps()
    watch_sigterm(out)
    import cupy

    if mode == "async":
        cupy.cuda.set_allocator(cupy.cuda.MemoryAsyncPool().malloc)
    elif raw == "raw":
        cupy.get_default_memory_pool().set_limit(size=0)

    def alloc(n: int):  # type: ignore[no-untyped-def]
        x = cupy.empty((n,), dtype=cupy.uint8)
        cupy.cuda.runtime.deviceSynchronize()
        return x

    def work() -> None:
        a = cupy.ones((1024, 1024), dtype=cupy.float32)
        for _ in range(20):
            a = cupy.clip(a @ a, -1, 1)
        cupy.cuda.runtime.deviceSynchronize()

    _fill(
        out,
        alloc,
        (cupy.cuda.memory.OutOfMemoryError,),
        work,
        cupy.get_default_memory_pool().free_all_blocks,
    )


def torch_big(out: str, arg: str = "") -> None:
    """Another user's job: allocate 50 GiB at once, several times, while a neighbour hogs."""
    watch_sigterm(out)
    import torch

    torch.cuda.init()
    emit(out, event="ready")
    size = int(float(arg or 50) * GIB)
    failures, tries = [], 0
    until = time.time() + float(os.environ.get("ALLOC_CAP_BIG_FOR", "6"))
    while time.time() < until:
        tries += 1
        try:
            x = torch.empty(size, dtype=torch.uint8, device="cuda")
            x.fill_(1)
            torch.cuda.synchronize()
            del x
            torch.cuda.empty_cache()
        except torch.OutOfMemoryError as exc:
            failures.append(str(exc)[:200])
        time.sleep(0.05)
    emit(out, event="big_done", tries=tries, failures=failures)


PROGRAMS = {
    "reported": reported,
    "cudart_fill": cudart_fill,
    "cudart_exceed": cudart_exceed,
    "torch_fill": torch_fill,
    "jax_fill": jax_fill,
    "cupy_fill": cupy_fill,
    "torch_big": torch_big,
}

if __name__ == "__main__":
    PROGRAMS[sys.argv[1]](sys.argv[2], *(sys.argv[3:4] or [""]))
