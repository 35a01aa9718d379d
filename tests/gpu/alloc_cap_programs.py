"""Programs the allocation-cap GPU suite runs in partitions: ``python3 THIS NAME OUT [ARG]``.

Each writes JSON lines of what it saw (wall-clock times, bytes, error names) to
OUT. ``*_fill`` programs allocate 256 MiB at a time until their framework reports
out-of-memory, then do what a user's program that caught its OOM does: let go of
what they filled, run a small real computation (a checked matmul) and report
``alive``. At each step they record a ``footprint``: what NVML shows for the process
next to what the library counts for it (so the per-process reserve can be checked
against the real context). With ARG ``raw`` they first undo Chronos' framework soft
caps, so what stops them is the allocation-time cap library, not the framework's
own limit.
"""

from __future__ import annotations

import ctypes
import gc
import glob
import json
import os
import signal
import sys
import time
from pathlib import Path

GIB = 1 << 30
CHUNK = 256 << 20


def emit(out: str, **fields: object) -> None:
    with open(out, "a") as f:
        record = {"t": time.time(), "pid": os.getpid(), **fields}
        f.write(json.dumps(record) + "\n")


def footprint(out: str, stage: str) -> None:
    """NVML's bytes for this process next to the library's count for it (MiB)."""
    record: dict[str, object] = {"stage": stage}
    try:
        import pynvml

        pynvml.nvmlInit()
        handle = pynvml.nvmlDeviceGetHandleByIndex(0)
        record["nvml_mib"] = next(
            (
                (p.usedGpuMemory or 0) >> 20
                for p in pynvml.nvmlDeviceGetComputeRunningProcesses(handle)
                if p.pid == os.getpid()
            ),
            None,
        )
    except Exception as exc:  # noqa: BLE001 - a diagnostic, never the program's end
        record["nvml_error"] = repr(exc)[:80]
    try:
        from chronos import alloccap

        state = alloccap.read_file(Path(os.environ[alloccap.ENV_FILE]))
        if state is not None:
            mine = next((s for s in state.slots if s.pid == os.getpid()), None)
            record["lib_mib"] = None if mine is None else mine.bytes >> 20
            record["overhead_mib"] = None if mine is None else mine.overhead >> 20
            record["partition_used_mib"] = state.used_bytes >> 20
            record["limit_mib"] = state.limit_bytes >> 20
    except Exception as exc:  # noqa: BLE001
        record["lib_error"] = repr(exc)[:80]
    emit(out, event="footprint", **record)


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


def reported(out: str, _unused: str = "") -> None:
    """What the process is told about its GPU (cudaMemGetInfo)."""
    rt = cudart()
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    rc = rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    emit(out, event="meminfo", rc=rc, free=free.value, total=total.value)


def _wait_for(barrier: str) -> None:
    while not os.path.exists(barrier):
        time.sleep(0.001)


def _cudart_fill(out: str, hold_s: float) -> None:
    rt = cudart()
    rt.cudaFree(ctypes.c_void_p(0))  # create the context (charges the per-process reserve)
    free, total = ctypes.c_size_t(), ctypes.c_size_t()
    rt.cudaMemGetInfo(ctypes.byref(free), ctypes.byref(total))
    emit(out, event="meminfo", free=free.value, total=total.value)
    barrier = os.environ.get("ALLOC_CAP_BARRIER")
    if barrier:  # several processes: all hold their context before anyone fills
        emit(out, event="ready")
        _wait_for(barrier)
    pace = float(os.environ.get("ALLOC_CAP_PACE_S", "0"))  # several processes interleave
    held, rc = [], 0
    while True:
        p = ctypes.c_void_p()
        rc = rt.cudaMalloc(ctypes.byref(p), ctypes.c_size_t(CHUNK))
        if rc != 0:
            break
        held.append(p)
        if pace:
            time.sleep(pace)
    emit(out, event="filled", bytes=len(held) * CHUNK, error=rc)
    footprint(out, "filled")
    time.sleep(hold_s)
    for p in held:
        rt.cudaFree(p)
    footprint(out, "released")
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


def _fill(out: str, alloc, oom_types, work, give_back) -> None:  # type: ignore[no-untyped-def]
    """Fill to the framework's OOM, let go of it all, then compute: a program that goes on."""
    held = []
    error = None
    while True:
        try:
            held.append(alloc(CHUNK))
        except oom_types as exc:
            error = type(exc).__name__
            break
    emit(out, event="filled", bytes=len(held) * CHUNK, error=error)
    footprint(out, "filled")
    held.clear()  # what a program that caught its OOM does: drop the batch
    gc.collect()
    give_back()  # and hand the framework's cached blocks back to the driver
    footprint(out, "released")
    result = work()  # a small real computation: kernels, cuBLAS and its workspace
    footprint(out, "computed")
    emit(out, event="alive", result=result)


def _matmul_check(value: float) -> float:
    """A 256x256 all-ones matmul, squared once more and scaled: every entry is 1.0."""
    if abs(value - 1.0) > 1e-3:
        raise RuntimeError(f"wrong result after the OOM: {value}")
    return value


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

    def work() -> float:
        a = torch.ones(256, 256, device="cuda")
        b = (a @ a) / 256
        value = float(((b @ b) / 256).mean())
        torch.cuda.synchronize()
        return _matmul_check(value)

    def give_back() -> None:
        torch.cuda.synchronize()
        torch.cuda.empty_cache()  # the async backend: also trims its pool to what is live
        try:
            emit(out, event="torch_reserved", bytes=torch.cuda.memory_reserved(0))
        except RuntimeError as exc:  # a backend without the statistic
            emit(out, event="torch_reserved", error=str(exc)[:80])

    _fill(
        out,
        lambda n: torch.empty(n, dtype=torch.uint8, device="cuda"),
        (torch.OutOfMemoryError,),
        work,
        give_back,
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

    def work() -> float:
        a = jnp.ones((256, 256), dtype=jnp.float32)
        b = (a @ a) / 256
        return _matmul_check(float(((b @ b) / 256).mean()))

    def give_back() -> None:
        for array in getattr(jax, "live_arrays", list)():  # nothing of the fill stays alive
            array.delete()

    emit(out, event="devices", devices=str(jax.devices()))
    if jax.devices()[0].platform != "gpu":  # never fill the host's memory instead
        emit(out, event="no_gpu")
        return
    _fill(out, alloc, (Exception,), work, give_back)


def cupy_fill(out: str, arg: str = "") -> None:
    """CuPy; arg: default | async (MemoryAsyncPool), + ',raw'."""
    mode, _, raw = arg.partition(",")
    if raw == "raw":
        _undo_soft_caps()
    watch_sigterm(out)
    import cupy

    pool = cupy.cuda.MemoryAsyncPool() if mode == "async" else cupy.get_default_memory_pool()
    if mode == "async":
        cupy.cuda.set_allocator(pool.malloc)
    elif raw == "raw":
        pool.set_limit(size=0)

    def alloc(n: int):  # type: ignore[no-untyped-def]
        x = cupy.empty((n,), dtype=cupy.uint8)
        cupy.cuda.runtime.deviceSynchronize()
        return x

    def work() -> float:
        a = cupy.ones((256, 256), dtype=cupy.float32)
        b = (a @ a) / 256
        value = float(((b @ b) / 256).mean())
        cupy.cuda.runtime.deviceSynchronize()
        return _matmul_check(value)

    def give_back() -> None:
        cupy.cuda.runtime.deviceSynchronize()
        pool.free_all_blocks()  # the async pool: trims it

    _fill(out, alloc, (cupy.cuda.memory.OutOfMemoryError,), work, give_back)


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
