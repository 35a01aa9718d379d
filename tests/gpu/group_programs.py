"""Programs the group GPU suite runs inside partitions (``python group_programs.py NAME OUT ...``).

Each appends JSON lines (events) to OUT. Kept apart from the tests so that the test
process never imports torch or touches a GPU itself.

- ``fill_each OUT``: on every visible GPU in turn, report cudaMemGetInfo, then take
  256 MiB at a time until refused; the soft caps are undone first, so what stops
  it is the allocation-time cap.
- ``ddp OUT STEPS [OVER_RANK OVER_GIB]``: a torchrun worker: DDP training for STEPS
  steps (NCCL when every rank has its own GPU, gloo when ranks share one), reports its
  GPU's UUID and its mean step time; rank OVER_RANK then takes OVER_GIB GiB more
  (soft caps undone) and holds it, for the hard cap to stop.
- ``ddp_fill OUT``: a torchrun worker that trains a few steps, then fills its GPU
  256 MiB at a time until refused (the ranks of a one-GPU partition share its cap).
"""

from __future__ import annotations

import json
import os
import signal
import sys
import time

CHUNK = 256 << 20
GIB = 1 << 30


def emit(out: str, **fields: object) -> None:
    with open(out, "a") as f:
        f.write(json.dumps({**fields, "pid": os.getpid(), "at": time.time()}) + "\n")


def undo_soft_caps() -> None:
    """Leave only the allocation-time cap (or none) in the way (sitecustomize reads this)."""
    os.environ.pop("CHRONOS_SOFT_LIMIT_BYTES", None)


def watch_sigterm(out: str) -> None:
    def on_term(signum: int, frame: object) -> None:
        emit(out, event="sigterm", rank=int(os.environ.get("RANK", "0")))
        sys.exit(143)

    signal.signal(signal.SIGTERM, on_term)


def fill(torch, ordinal: int) -> tuple[int, str]:  # type: ignore[no-untyped-def]
    held, error = [], ""
    while True:
        try:
            held.append(torch.empty(CHUNK, dtype=torch.uint8, device=f"cuda:{ordinal}"))
        except torch.cuda.OutOfMemoryError as exc:
            error = type(exc).__name__
            break
    torch.cuda.synchronize(ordinal)
    total = len(held) * CHUNK
    fill.keep.append(held)  # type: ignore[attr-defined]
    return total, error


fill.keep = []  # type: ignore[attr-defined]


def fill_each(out: str, _arg: str = "") -> None:
    undo_soft_caps()
    import torch

    for ordinal in range(torch.cuda.device_count()):
        free, total = torch.cuda.mem_get_info(ordinal)
        uuid = str(torch.cuda.get_device_properties(ordinal).uuid)
        emit(out, event="meminfo", ordinal=ordinal, uuid=uuid, free=free, total=total)
        got, error = fill(torch, ordinal)
        emit(out, event="filled", ordinal=ordinal, uuid=uuid, bytes=got, error=error)


def _init_ddp(torch):  # type: ignore[no-untyped-def]
    import torch.distributed as dist

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    local = int(os.environ.get("LOCAL_RANK", "0"))
    count = torch.cuda.device_count()
    ordinal = local % count
    torch.cuda.set_device(ordinal)
    backend = "nccl" if count >= world else "gloo"  # NCCL refuses two ranks on one GPU
    dist.init_process_group(backend)
    return dist, rank, world, ordinal, backend


def _train(torch, steps: int, ordinal: int) -> float:  # type: ignore[no-untyped-def]
    from torch.nn.parallel import DistributedDataParallel

    model = torch.nn.Sequential(
        torch.nn.Linear(4096, 4096), torch.nn.ReLU(), torch.nn.Linear(4096, 4096)
    ).cuda(ordinal)
    ddp = DistributedDataParallel(model, device_ids=[ordinal])
    optimizer = torch.optim.SGD(ddp.parameters(), lr=1e-3)
    batch = torch.randn(256, 4096, device=f"cuda:{ordinal}")
    times = []
    for _ in range(steps):
        torch.cuda.synchronize(ordinal)
        t0 = time.perf_counter()
        optimizer.zero_grad()
        ddp(batch).square().mean().backward()
        optimizer.step()
        torch.cuda.synchronize(ordinal)
        times.append(time.perf_counter() - t0)
    kept = times[len(times) // 5 :]  # the first steps warm up
    return sum(kept) / len(kept)


def ddp(out: str, steps: str = "50", over_rank: str = "-1", over_gib: str = "0") -> None:
    if int(over_rank) >= 0:
        undo_soft_caps()
    watch_sigterm(out)
    import torch

    dist, rank, world, ordinal, backend = _init_ddp(torch)
    uuid = str(torch.cuda.get_device_properties(ordinal).uuid)
    emit(
        out,
        event="rank",
        rank=rank,
        world=world,
        ordinal=ordinal,
        uuid=uuid,
        backend=backend,
        visible=os.environ.get("CUDA_VISIBLE_DEVICES"),
    )
    step_s = _train(torch, int(steps), ordinal)
    emit(out, event="trained", rank=rank, step_s=step_s)
    if int(over_rank) >= 0:
        if rank == int(over_rank):
            extra = torch.empty(
                int(float(over_gib) * GIB), dtype=torch.uint8, device=f"cuda:{ordinal}"
            )
            torch.cuda.synchronize(ordinal)
            emit(out, event="over", rank=rank, bytes=extra.numel())
        # Every rank waits in Python (not in a collective, which would hold off the
        # SIGTERM handler): the hard cap's stop of the group must come first.
        time.sleep(120)
        emit(out, event="not_stopped", rank=rank)
    dist.barrier()
    dist.destroy_process_group()


def ddp_fill(out: str, _arg: str = "") -> None:
    undo_soft_caps()
    watch_sigterm(out)
    import torch

    dist, rank, world, ordinal, backend = _init_ddp(torch)
    _train(torch, 5, ordinal)
    dist.barrier()
    got, error = fill(torch, ordinal)
    emit(out, event="filled", rank=rank, ordinal=ordinal, bytes=got, error=error, backend=backend)
    dist.barrier()  # both hold what they got while the test looks
    time.sleep(float(os.environ.get("GROUP_HOLD_S", "3")))
    dist.barrier()
    dist.destroy_process_group()


PROGRAMS = {"fill_each": fill_each, "ddp": ddp, "ddp_fill": ddp_fill}

if __name__ == "__main__":
    PROGRAMS[sys.argv[1]](sys.argv[2], *sys.argv[3:])
