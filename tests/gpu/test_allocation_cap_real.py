"""The allocation-time cap on a real NVIDIA GPU (issue 11's proofs 1, 2, 3 and 5).

Run on the GPU machine with ``pytest -m gpu tests/gpu/test_allocation_cap_real.py -s``
(``benchmarks/gpu/run_alloc_cap.sh`` does it, with proof 4, the overhead benchmark).
Each test prints an ``[alloc-cap]`` line with what it measured.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
from gpu_support import (
    events_out,  # noqa: F401 - the `out` fixture, found by name
    nvml_ready,
    read_events,
    real_daemon,
    shared_tmpdir,
)
from helpers import GIB

from chronos import alloccap

pytestmark = [
    pytest.mark.gpu,
    pytest.mark.skipif(nvml_ready() is not None, reason=str(nvml_ready())),
]
PROGRAMS = str(Path(__file__).with_name("alloc_cap_programs.py"))
USERS = ("chronos_cap_alice", "chronos_cap_bob")
CHUNK = 256 << 20

STATIC_FILL_CU = r"""
// Built by nvcc with its default, a statically linked cudart: no libcudart.so,
// it finds the driver with dlopen + dlsym + cuGetProcAddress itself.
#include <cstdio>
#include <cuda_runtime.h>
int main() {
    cudaFree(0);
    size_t total = 0, chunk = 256u << 20;
    void *p;
    cudaError_t rc;
    while ((rc = cudaMalloc(&p, chunk)) == cudaSuccess) total += chunk;
    printf("{\"event\": \"filled\", \"bytes\": %zu, \"error\": %d}\n", total, (int)rc);
    fflush(stdout);
    return 0;
}
"""

BYPASS_C = r"""
/* Escapes the dlsym hook on purpose: finds glibc's own dlsym with dlvsym and looks
 * the driver up with it, then allocates past the cap. Only the sampler can stop it. */
#define _GNU_SOURCE
#include <dlfcn.h>
#include <stdio.h>
#include <stdlib.h>
#include <unistd.h>
typedef int (*fn)();
int main(int argc, char **argv) {
    void *(*real_dlsym)(void *, const char *) = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.34");
    if (!real_dlsym) real_dlsym = dlvsym(RTLD_NEXT, "dlsym", "GLIBC_2.2.5");
    void *cuda = dlopen("libcuda.so.1", RTLD_NOW);
    fn init = (fn)real_dlsym(cuda, "cuInit"), get = (fn)real_dlsym(cuda, "cuDeviceGet");
    fn retain = (fn)real_dlsym(cuda, "cuDevicePrimaryCtxRetain");
    fn set = (fn)real_dlsym(cuda, "cuCtxSetCurrent"), alloc = (fn)real_dlsym(cuda, "cuMemAlloc_v2");
    int dev; void *ctx; unsigned long long p, total = 0, want = strtoull(argv[1], 0, 10);
    init(0); get(&dev, 0); retain(&ctx, dev); set(ctx);
    while (total < want && alloc(&p, (size_t)256 << 20) == 0) total += 256ull << 20;
    printf("{\"event\": \"crossed\", \"bytes\": %llu}\n", total);
    fflush(stdout);
    sleep(10);
    printf("{\"event\": \"not_stopped\"}\n");
    return 0;
}
"""


def report(line: str) -> None:
    print(f"\n[alloc-cap] {line}", flush=True)


def footprints(events: list[dict[str, object]]) -> str:
    """One compact line per footprint: stage, NVML vs the library's count (MiB)."""
    return "; ".join(
        f"{e['stage']}: nvml {e.get('nvml_mib')} lib {e.get('lib_mib')}+{e.get('overhead_mib')}"
        f" partition {e.get('partition_used_mib')}/{e.get('limit_mib')}"
        for e in events
        if e["event"] == "footprint"
    )


def daemon_events(daemon: dict[str, str], since: float) -> str:
    """What the sampler did since ``since``: stops (with NVML's bytes) and overhead raises."""
    lines = []
    log_path = Path(daemon["CHRONOS_TEST_DAEMON_LOG"])
    for line in log_path.read_text().splitlines() if log_path.exists() else []:
        try:
            record = json.loads(line)
        except ValueError:
            continue
        if record.get("ts", 0) < since:
            continue
        if record.get("event") == "memory_exceeded":
            lines.append(
                f"stopped: NVML {int(record['used_bytes']) >> 20} MiB > "
                f"{int(record['allowed_bytes']) >> 20} MiB, pids {record.get('pids')}"
            )
        elif record.get("event") == "alloc_cap_overhead_raised":
            lines.append(f"overhead of {record['pid']} +{int(record['added']) >> 20} MiB")
    return "; ".join(lines) or "sampler: nothing"


@pytest.fixture(scope="module")
def daemon() -> Iterator[dict[str, str]]:
    if alloccap.library_path() is None:
        pytest.fail("libchronos_cap.so was not built (pip install -e . with a C compiler)")
    with real_daemon({"CHRONOS_ALLOC_CAP": "on"}) as env:
        # The socket exists before the daemon may answer: wait for a real answer, so the
        # first test does not race the daemon's start (the first run's first test saw no
        # output at all).
        deadline = time.time() + 60
        while True:
            answer = subprocess.run(
                [sys.executable, "-m", "chronos.cli", "list", "--all"],
                env=env,
                capture_output=True,
                text=True,
                timeout=60,
            )
            if answer.returncode == 0 or time.time() > deadline:
                break
            time.sleep(0.2)
        assert answer.returncode == 0, answer.stderr
        yield env


@pytest.fixture(scope="module")
def users() -> Iterator[tuple[str, str]]:
    if os.geteuid() != 0:
        pytest.skip("creating Unix accounts needs root")
    for name in USERS:
        subprocess.run(
            ["useradd", "--create-home", "--shell", "/bin/sh", name], capture_output=True
        )
    yield USERS
    for name in USERS:
        subprocess.run(["userdel", "--remove", name], capture_output=True)


@pytest.fixture(scope="module")
def binaries() -> dict[str, Path | None]:
    """The nvcc static-cudart program and the dlsym-bypass program (None if unbuildable)."""
    where = shared_tmpdir()
    built: dict[str, Path | None] = {"static": None, "bypass": None}
    nvcc = shutil.which("nvcc") or (
        "/usr/local/cuda/bin/nvcc" if os.path.exists("/usr/local/cuda/bin/nvcc") else None
    )
    if nvcc:
        (where / "static_fill.cu").write_text(STATIC_FILL_CU)
        r = subprocess.run(
            [nvcc, "-o", str(where / "static_fill"), str(where / "static_fill.cu")],
            capture_output=True,
            text=True,
        )
        built["static"] = where / "static_fill" if r.returncode == 0 else None
        report(f"nvcc static_fill: rc {r.returncode} {r.stderr.strip()[-300:]}")
    (where / "bypass.c").write_text(BYPASS_C)
    r = subprocess.run(
        ["gcc", "-o", str(where / "bypass"), str(where / "bypass.c"), "-ldl"],
        capture_output=True,
        text=True,
    )
    built["bypass"] = where / "bypass" if r.returncode == 0 else None
    for path in built.values():
        if path is not None:
            path.chmod(0o755)
    return built


def _user_prefix(env: dict[str, str], user: str | None) -> list[str]:
    if user is None:
        return []
    keep = [
        f"{k}={v}"
        for k, v in env.items()
        if k.startswith(("CHRONOS", "PYTHON", "PATH", "ALLOC_CAP", "LD_LIBRARY_PATH"))
    ]
    return ["runuser", "-u", user, "--", "env", *keep]


def chronos_run_argv(
    env: dict[str, str], memory: str, command: list[str], user: str | None = None, grace: str = "3"
) -> list[str]:
    return [
        *_user_prefix(env, user),
        sys.executable,
        "-m",
        "chronos.cli",
        "run",
        "--memory",
        memory,
        "--duration",
        "600",
        "--grace",
        grace,
        "--",
        *command,
    ]


def program(name: str, out: Path, arg: str = "") -> list[str]:
    return [sys.executable, PROGRAMS, name, str(out), *([arg] if arg else [])]


def share_bytes(env: dict[str, str], fraction: float) -> int:
    import pynvml

    pynvml.nvmlInit()
    total = pynvml.nvmlDeviceGetMemoryInfo(pynvml.nvmlDeviceGetHandleByIndex(0)).total
    return int(fraction * total)


def kinds(events: list[dict[str, object]]) -> list[object]:
    return [e["event"] for e in events]


def first(events: list[dict[str, object]], kind: str) -> dict[str, object]:
    return next(e for e in events if e["event"] == kind)


# ------------------------------------------------------------------ what it reports
def test_the_process_sees_its_share_as_the_gpu(daemon: dict[str, str], out: Path) -> None:
    result = subprocess.run(
        chronos_run_argv(daemon, "0.1", program("reported", out)),
        env=daemon,
        capture_output=True,
        text=True,
        timeout=90,
    )
    info = next((e for e in read_events(out) if e["event"] == "meminfo"), None)
    share = share_bytes(daemon, 0.1)
    report(
        f"10% partition: cudaMemGetInfo total {info['total']} (share {share}), "
        f"free {info['free']}; exit {result.returncode}; {result.stderr.strip()[-200:]!r}"
        if info
        else f"reported: no meminfo; exit {result.returncode}; stderr {result.stderr[-600:]!r}"
    )
    assert info is not None, result.stderr
    assert info["rc"] == 0
    assert abs(int(info["total"]) - share) <= 1 << 20  # the ledger floors the fraction
    assert int(info["free"]) <= int(info["total"])


# ------------------------------------------- proof 1: a hog next to a 50 GiB job
@pytest.mark.parametrize("hog", ["cudart", "cupy", "static"])
def test_a_hog_is_refused_at_its_share_and_the_neighbour_never_fails(
    daemon: dict[str, str],
    out: Path,
    users: tuple[str, str],
    binaries: dict[str, Path | None],
    hog: str,
) -> None:
    alice, bob = users
    if hog == "static" and binaries["static"] is None:
        pytest.skip("nvcc could not build the static-cudart program")
    out_bob = out.with_name("bob.jsonl")
    bob_env = {**daemon, "ALLOC_CAP_BIG_FOR": "12"}
    big = subprocess.Popen(
        chronos_run_argv(bob_env, "0.5", program("torch_big", out_bob, "50"), user=bob),
        env=bob_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while "ready" not in kinds(read_events(out_bob)) and time.time() < deadline:
        time.sleep(0.05)
    command = {
        "cudart": program("cudart_fill", out, "5"),
        "cupy": program("cupy_fill", out, "default,raw"),
        "static": [str(binaries["static"])],
    }[hog]
    hog_run = subprocess.run(
        chronos_run_argv(daemon, "0.05", command, user=alice),
        env=daemon,
        capture_output=True,
        text=True,
        timeout=90,
    )
    bob_out, bob_err = big.communicate(timeout=90)
    if hog == "static":  # the binary prints its event to stdout
        with open(out, "a") as f:
            f.write(hog_run.stdout)
    hog_events = read_events(out)
    done = first(read_events(out_bob), "big_done")
    filled = first(hog_events, "filled")
    share = share_bytes(daemon, 0.05)
    report(
        f"{hog} hog in a 5% partition ({share / GIB:.2f} GiB): filled "
        f"{int(filled['bytes']) / GIB:.2f} GiB, error {filled['error']}; its exit "
        f"{hog_run.returncode}; neighbour's 50 GiB allocations: {done['tries']} tries, "
        f"{len(done['failures'])} failures {done['failures'][:1]}; exit {big.returncode}"
    )
    assert done["failures"] == [], bob_err
    assert big.returncode == 0, bob_err
    assert int(filled["bytes"]) <= share
    assert int(filled["bytes"]) >= share // 2
    assert filled["error"] in (2, "OutOfMemoryError"), hog_run.stderr
    assert "sigterm" not in kinds(hog_events)


# -------------------------------------- proof 2: every allocator fills to the share
EXPANDABLE = {"PYTORCH_CUDA_ALLOC_CONF": "expandable_segments:True"}
FRAMEWORKS = {
    "torch-default": ("torch_fill", "raw", {}),
    "torch-expandable": ("torch_fill", "raw", EXPANDABLE),
    "torch-async": ("torch_fill", "raw", {"PYTORCH_CUDA_ALLOC_CONF": "backend:cudaMallocAsync"}),
    "jax-default": ("jax_fill", "default,raw", {}),
    "jax-noprealloc": ("jax_fill", "noprealloc,raw", {}),
    "jax-platform": ("jax_fill", "platform,raw", {}),
    "cupy-default": ("cupy_fill", "default,raw", {}),
    "cupy-async": ("cupy_fill", "async,raw", {}),
}


@pytest.mark.parametrize("name", list(FRAMEWORKS))
def test_each_allocator_fills_to_the_share_gets_its_oom_and_keeps_running(
    daemon: dict[str, str], out: Path, name: str
) -> None:
    prog, arg, extra = FRAMEWORKS[name]
    started = time.time()
    result = subprocess.run(
        chronos_run_argv(daemon, "0.1", program(prog, out, arg)),
        env={**daemon, **extra},
        capture_output=True,
        text=True,
        timeout=90,
    )
    events = read_events(out)
    share = share_bytes(daemon, 0.1)
    filled = next((e for e in events if e["event"] == "filled"), None)
    report(
        f"{name} in a 10% partition ({share / GIB:.2f} GiB): "
        f"filled {int(filled['bytes']) / GIB:.2f} GiB, then {filled['error']}; "
        f"events {kinds(events)}; exit {result.returncode}"
        if filled
        else f"{name}: no fill recorded; events {kinds(events)}; exit {result.returncode}"
    )
    report(f"{name}: {footprints(events)}; {daemon_events(daemon, started)}")
    if result.returncode != 0 or "alive" not in kinds(events):
        report(f"{name}: stderr tail {result.stderr.strip()[-400:]!r}")
    assert filled is not None, result.stderr
    assert filled["error"] is not None
    assert "alive" in kinds(events), result.stderr
    assert "sigterm" not in kinds(events)
    assert result.returncode == 0, result.stderr
    assert "chronos: could not cap" not in result.stderr  # the soft cap's hook stayed quiet
    assert int(filled["bytes"]) <= alloccap.allocatable(share)
    assert int(filled["bytes"]) >= share // 2


# ----------------------------------- proof 3: three processes share one partition
def test_three_processes_together_get_exactly_the_share(daemon: dict[str, str], out: Path) -> None:
    barrier = out.with_name("go")
    script = " & ".join([" ".join(program("cudart_fill", out, "1"))] * 3) + " & wait"
    started = time.time()
    run = subprocess.Popen(
        chronos_run_argv(daemon, "0.1", ["sh", "-c", script]),
        # paced, so the three interleave and each takes part of the share
        env={**daemon, "ALLOC_CAP_BARRIER": str(barrier), "ALLOC_CAP_PACE_S": "0.005"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    deadline = time.time() + 120
    while kinds(read_events(out)).count("ready") < 3 and time.time() < deadline:
        time.sleep(0.05)
    barrier.touch()
    _, err = run.communicate(timeout=90)
    events = read_events(out)
    fills = [e for e in events if e["event"] == "filled"]
    share = share_bytes(daemon, 0.1)
    reserve = alloccap.process_reserve(share)
    total = sum(int(e["bytes"]) for e in fills)
    expected = alloccap.allocatable(share, 3) // CHUNK * CHUNK
    report(
        f"3 processes in a 10% partition ({share / GIB:.2f} GiB, reserve "
        f"{reserve >> 20} MiB each, margin {alloccap.partition_margin(share) >> 20} MiB): "
        f"{[int(e['bytes']) >> 20 for e in fills]} MiB, together "
        f"{total / GIB:.3f} GiB; expected {expected / GIB:.3f} GiB; exit {run.returncode}"
    )
    report(f"3 processes: {footprints(events)}; {daemon_events(daemon, started)}")
    assert len(fills) == 3, err
    assert all(e["error"] == 2 for e in fills)
    assert expected - 3 * CHUNK <= total <= alloccap.allocatable(share, 3)
    assert all(int(e["bytes"]) > 0 for e in fills)  # interleaved: each got a part
    assert "sigterm" not in kinds(events)
    assert run.returncode == 0, err


# --------------------------------------- proof 5: what escapes, the sampler stops
@pytest.mark.parametrize("escape", ["cleared-ld-preload", "dlsym-bypass"])
def test_what_escapes_the_library_is_stopped_by_the_sampler(
    daemon: dict[str, str], out: Path, binaries: dict[str, Path | None], escape: str
) -> None:
    share = share_bytes(daemon, 0.05)
    if escape == "cleared-ld-preload":
        command = ["env", "-u", "LD_PRELOAD", *program("cudart_exceed", out)]
    else:
        if binaries["bypass"] is None:
            pytest.skip("gcc could not build the bypass program")
        command = [str(binaries["bypass"]), str(share + 2 * GIB)]
    result = subprocess.run(
        chronos_run_argv(daemon, "0.05", command, grace="2"),
        env=daemon,
        capture_output=True,
        text=True,
        timeout=90,
    )
    if escape == "dlsym-bypass":
        with open(out, "a") as f:
            f.write(result.stdout)
    events = read_events(out)
    crossed = next((e for e in events if e["event"] == "crossed"), None)
    report(
        f"{escape}: took {int(crossed['bytes']) / GIB:.2f} GiB of a {share / GIB:.2f} GiB "
        f"share; exit {result.returncode}; {result.stderr.strip().splitlines()[-1:]}"
        if crossed
        else f"{escape}: events {kinds(events)} stderr {result.stderr[-300:]}"
    )
    assert crossed is not None and int(crossed["bytes"]) > share  # the library did not see it
    assert "not_stopped" not in kinds(events)
    assert result.returncode != 0
    assert "over" in result.stderr


# ------------------------------------------------ chronos stats: library vs NVML
def test_stats_show_the_library_count_next_to_nvml(daemon: dict[str, str], out: Path) -> None:
    run = subprocess.Popen(
        chronos_run_argv(daemon, "0.1", program("cudart_fill", out, "8")),
        env=daemon,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        deadline = time.time() + 120
        while "filled" not in kinds(read_events(out)) and time.time() < deadline:
            time.sleep(0.05)
        time.sleep(0.5)  # one more sample, so NVML's figure is current
        stats = subprocess.run(
            [sys.executable, "-m", "chronos.cli", "stats"],
            env=daemon,
            capture_output=True,
            text=True,
            timeout=60,
        ).stdout
    finally:
        run.communicate(timeout=120)
    filled = int(first(read_events(out), "filled")["bytes"])
    section = stats[stats.find("COUNTED (library)") - 60 :]
    report(f"chronos stats while holding {filled / GIB:.2f} GiB:\n{section}")
    assert "COUNTED (library)" in stats and "SEEN (NVML)" in stats
