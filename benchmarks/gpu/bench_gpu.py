"""GPU-facing figures on a real NVIDIA GPU: sampling cost, hard-cap and expiry latency,
and the overhead of enforcement on a matmul.

Run on the GPU machine: ``python3 benchmarks/gpu/bench_gpu.py --out DIR``. It writes
``DIR/bench_gpu.md`` (the section for docs/BENCHMARKS.md) and ``DIR/bench_gpu.json``.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from datetime import datetime
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path[:0] = [str(ROOT / "benchmarks"), str(ROOT / "tests" / "gpu")]

from _common import machine_info, md_table, summarize  # noqa: E402
from gpu_support import chronos, read_events, real_daemon, shared_tmpdir, wait_pid_freed  # noqa: E402

PROGRAMS = str(ROOT / "tests" / "gpu" / "gpu_programs.py")
MATMUL = """
import json, sys, time, torch
n, iters = 8192, int(sys.argv[1])
a = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
b = torch.randn(n, n, device="cuda", dtype=torch.bfloat16)
for _ in range(20):
    a @ b
torch.cuda.synchronize()
start = time.perf_counter()
for _ in range(iters):
    a @ b
torch.cuda.synchronize()
elapsed = time.perf_counter() - start
print(json.dumps({"tflops": 2 * n**3 * iters / elapsed / 1e12}))
"""


def sample_cost(iterations: int = 1000) -> dict[str, dict[str, float]]:
    """One full sample: usage of all devices + every process, attributed."""
    from chronos.attribution import attribute_processes
    from chronos.devices import open_machine

    holder = subprocess.Popen(
        [sys.executable, PROGRAMS, "torch_hold_10gib", str(shared_tmpdir() / "h.jsonl")]
    )
    time.sleep(8)
    machine = open_machine("nvidia")
    usage, procs, full = [], [], []
    for _ in range(iterations):
        t0 = time.perf_counter()
        machine.usage()
        t1 = time.perf_counter()
        found = attribute_processes(machine, [], [])
        t2 = time.perf_counter()
        usage.append(t1 - t0)
        procs.append(t2 - t1)
        full.append(t2 - t0)
    holder.kill()
    holder.wait()
    assert any(p.used_bytes for p in found), "the holder process was not seen"
    return {
        "usage (all devices)": summarize(usage),
        "processes + attribution": summarize(procs),
        "full sample": summarize(full),
    }


def hard_cap(env: dict[str, str], runs: int) -> dict[str, list[float]]:
    to_term, to_free = [], []
    for _ in range(runs):
        out = shared_tmpdir() / "e.jsonl"
        chronos(
            env,
            "run",
            "--memory",
            "0.05",
            "--duration",
            "600",
            "--grace",
            "2",
            "--",
            sys.executable,
            PROGRAMS,
            "cupy_exceed",
            str(out),
        )
        events = read_events(out)
        crossed = next(e for e in events if e["event"] == "crossed")
        term = next((e for e in events if e["event"] == "sigterm"), None)
        if term is None:
            continue
        to_term.append(term["t"] - crossed["t"])
        freed = wait_pid_freed(int(term["pid"]))
        if freed is not None:
            to_free.append(freed - term["t"])
    return {
        "hard cap: cap crossed -> SIGTERM": to_term,
        "hard cap: SIGTERM -> memory free (NVML)": to_free,
    }


def expiry(env: dict[str, str], runs: int) -> dict[str, list[float]]:
    """``runs`` GPU processes in partitions expiring 4-6 s later, all at once."""
    outs, children = [], []
    for i in range(runs):
        out = shared_tmpdir() / "x.jsonl"
        outs.append(out)
        children.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "chronos.cli",
                    "run",
                    "--memory",
                    "0.05",
                    "--duration",
                    f"{12 + (i % 3)}",
                    "--grace",
                    "5",
                    "--",
                    sys.executable,
                    PROGRAMS,
                    "torch_hold_until_end",
                    str(out),
                ],
                env=env,
                stdout=subprocess.DEVNULL,
                stderr=subprocess.DEVNULL,
            )
        )
    for child in children:
        child.wait(timeout=120)
    ends = {}
    for p in json.loads(chronos(env, "list", "--all", "--json").stdout):
        ends[p["id"]] = datetime.fromisoformat(p["expires_at"]).timestamp()
    late, free = [], []
    for out in outs:
        events = read_events(out)
        term = next((e for e in events if e["event"] == "sigterm"), None)
        if term is None or term.get("partition") not in ends:
            continue
        late.append(term["t"] - ends[term["partition"]])
        freed = wait_pid_freed(int(term["pid"]))
        if freed is not None:
            free.append(freed - term["t"])
    return {
        "expiry: expires_at -> SIGTERM": late,
        f"expiry: SIGTERM -> memory free (NVML), {runs} processes exiting together": free,
    }


def matmul_round(env: dict[str, str] | None, iters: int) -> float:
    base = [sys.executable, "-c", MATMUL, str(iters)]
    if env is None:
        cmd, run_env = base, {k: v for k, v in os.environ.items() if not k.startswith("CHRONOS")}
    else:
        cmd = [
            sys.executable,
            "-m",
            "chronos.cli",
            "run",
            "--memory",
            "0.5",
            "--duration",
            "600",
            "--",
            *base,
        ]
        run_env = env
    out = subprocess.run(cmd, env=run_env, capture_output=True, text=True, timeout=600)
    return float(json.loads(out.stdout.strip().splitlines()[-1])["tflops"])


def overhead(rounds: int, iters: int) -> dict[str, object]:
    bare, enforced = [], []
    for _ in range(rounds):
        bare.append(matmul_round(None, iters))
        with real_daemon() as env:
            enforced.append(matmul_round(env, iters))
    diffs = [(b - e) / b * 100 for b, e in zip(bare, enforced)]
    return {
        "bare_tflops": bare,
        "enforced_tflops": enforced,
        "overhead_pct": diffs,
        "mean_pct": statistics.mean(diffs),
        "stdev_pct": statistics.stdev(diffs),
    }


def rows_ms(results: dict[str, list[float]]) -> list[list[object]]:
    out = []
    for label, values in results.items():
        s = summarize(values)
        out.append(
            [
                label,
                s["n"],
                f"{s['p50']:.1f}",
                f"{s['p99']:.1f}",
                f"{s['max']:.1f}",
                f"{s['mean']:.1f}",
            ]
        )
    return out


def gpu_name() -> str:
    smi = subprocess.run(
        ["nvidia-smi", "--query-gpu=name,driver_version,memory.total", "--format=csv,noheader"],
        capture_output=True,
        text=True,
    )
    return "; ".join(smi.stdout.strip().splitlines())


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, default=Path("."))
    parser.add_argument("--runs", type=int, default=15)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--iters", type=int, default=400)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    results: dict[str, object] = {"gpu": gpu_name(), "machine": machine_info()}
    print("sampling cost ...", flush=True)
    results["sample"] = sample_cost()
    # The sampling hard cap's figures: programs must get past the allocation-time cap
    # (benchmarks/gpu/bench_alloc_cap.py measures that one).
    with real_daemon({"CHRONOS_ALLOC_CAP": "off"}) as env:
        print("hard cap ...", flush=True)
        results["hard_cap"] = hard_cap(env, args.runs)
        print("expiry ...", flush=True)
        results["expiry"] = expiry(env, args.runs)
    print("overhead ...", flush=True)
    results["overhead"] = overhead(args.rounds, args.iters)
    (args.out / "bench_gpu.json").write_text(json.dumps(results, indent=2))
    (args.out / "bench_gpu.md").write_text(render(results))
    print(render(results))


def render(r: dict[str, object]) -> str:
    sample = r["sample"]
    assert isinstance(sample, dict)
    over = r["overhead"]
    assert isinstance(over, dict)
    lines = [
        "## GPU: sampling, hard cap, expiry and overhead (real NVIDIA GPU)",
        "",
        f"GPU: {r['gpu']}. Host: {json.dumps(r['machine'])}.",
        "Method: `python3 benchmarks/gpu/bench_gpu.py` on the GPU machine, a real chronosd "
        "on the NVML backend with the default policy (sampling every 100 ms, memory grace "
        "300 ms). Programs are in `tests/gpu/gpu_programs.py`.",
        "",
        "One full sample (what the daemon does every interval), 1000 samples with one "
        "PyTorch process holding 10 GiB:",
        "",
        md_table(
            ["what", "n", "p50 ms", "p99 ms", "max ms", "mean ms"],
            [
                [
                    k,
                    v["n"],
                    f"{v['p50']:.3f}",
                    f"{v['p99']:.3f}",
                    f"{v['max']:.3f}",
                    f"{v['mean']:.3f}",
                ]
                for k, v in sample.items()
            ],
        ),
        "",
        "Hard cap (a CuPy process allocating past a 5% partition with raw cudaMalloc) and "
        "expiry (PyTorch processes computing until their partition ends; all started "
        "together):",
        "",
        md_table(
            ["interval", "n", "p50 ms", "p99 ms", "max ms", "mean ms"],
            rows_ms({**r["hard_cap"], **r["expiry"]}),
        ),  # type: ignore[dict-item]
        "",
        f"Overhead: bf16 8192³ matmul TFLOP/s, no Chronos vs inside `chronos run` with the "
        f"daemon sampling, {len(over['overhead_pct'])} interleaved rounds: "
        f"mean {over['mean_pct']:+.2f}% (stdev {over['stdev_pct']:.2f} points; positive = "
        f"slower with Chronos). Bare: "
        f"{', '.join(f'{x:.0f}' for x in over['bare_tflops'])}; enforced: "
        f"{', '.join(f'{x:.0f}' for x in over['enforced_tflops'])}.",
    ]
    return "\n".join(lines) + "\n"


if __name__ == "__main__":
    main()
