"""Overhead of the allocation-time cap on a real GPU (issue 11, proof 4).

Two measurements, each run in fresh processes alternating without and with the
library (LD_PRELOAD + an accounting file with room to spare), so drift on the
machine hits both sides alike:

1. driver calls: ns per cuMemAlloc_v2 + cuMemFree_v2 pair (4 KiB and 2 MiB), per
   cuMemAllocAsync + cuMemFreeAsync pair, per dlsym of a cu* name, from a small C
   program that reaches the driver the way XLA does (dlopen + dlsym);
2. a PyTorch training loop: median step time of an MLP, and the overhead in %.

    python3 benchmarks/gpu/bench_alloc_cap.py --out DIR [--rounds 5]
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "src"))
from chronos import alloccap  # noqa: E402

MICRO_C = Path(__file__).with_name("alloc_cap_micro.c")

TRAIN_PY = r"""
import json, sys, time, torch
torch.manual_seed(0)
layers = [m for _ in range(4) for m in (torch.nn.Linear(4096, 4096), torch.nn.GELU())]
model = torch.nn.Sequential(*layers).cuda()
opt = torch.optim.AdamW(model.parameters(), lr=1e-4)
x = torch.randn(512, 4096, device="cuda")
times = []
for step in range(int(sys.argv[1])):
    torch.cuda.synchronize(); t0 = time.perf_counter()
    loss = model(x).square().mean()
    opt.zero_grad(set_to_none=True); loss.backward(); opt.step()
    torch.cuda.synchronize(); times.append(time.perf_counter() - t0)
steady = times[len(times) // 5:]
print(json.dumps({"median_step_s": sorted(steady)[len(steady) // 2], "steps": len(steady)}))
"""


def say(message: str) -> None:
    print(f"[bench-alloc-cap] {message}", flush=True)


def capped_env(work: Path) -> dict[str, str]:
    cap = alloccap.create_file(work / "bench.cap", 1 << 50)  # room to spare: measure cost only
    return {**os.environ, **alloccap.preload_env(cap)}


def run_json(argv: list[str], env: dict[str, str]) -> dict[str, float] | None:
    result = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=900)
    try:
        return json.loads(result.stdout.strip().splitlines()[-1])  # type: ignore[no-any-return]
    except (IndexError, json.JSONDecodeError):
        say(f"{argv[0]} failed (rc {result.returncode}): {result.stderr.strip()[-400:]}")
        return None


def interleaved(argv: list[str], rounds: int, work: Path) -> dict[str, list[dict[str, float]]]:
    plain, capped = dict(os.environ), capped_env(work)
    plain.pop("LD_PRELOAD", None)
    runs: dict[str, list[dict[str, float]]] = {"without": [], "with": []}
    for i in range(rounds):
        for label, env in (("without", plain), ("with", capped))[:: 1 if i % 2 == 0 else -1]:
            got = run_json(argv, env)
            if got is not None:
                runs[label].append(got)
                say(f"round {i + 1} {label}: {got}")
    return runs


def summarize(runs: dict[str, list[dict[str, float]]]) -> dict[str, dict[str, float]]:
    keys = sorted({k for r in runs["without"] + runs["with"] for k in r if k != "steps"})
    out: dict[str, dict[str, float]] = {}
    for key in keys:
        a = [r[key] for r in runs["without"] if key in r]
        b = [r[key] for r in runs["with"] if key in r]
        if not a or not b:
            continue
        out[key] = {
            "without_median": statistics.median(a),
            "with_median": statistics.median(b),
            "overhead_pct": 100.0 * (statistics.median(b) / statistics.median(a) - 1.0),
            "without_min": min(a),
            "without_max": max(a),
            "with_min": min(b),
            "with_max": max(b),
        }
    return out


def main() -> int:
    parser = argparse.ArgumentParser()
    parser.add_argument("--out", type=Path, required=True)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--steps", type=int, default=200)
    args = parser.parse_args()
    args.out.mkdir(parents=True, exist_ok=True)
    if alloccap.library_path() is None:
        say("libchronos_cap.so is not built: nothing to measure")
        return 1
    results: dict[str, object] = {"library": str(alloccap.library_path())}
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        built = subprocess.run(
            ["gcc", "-O2", "-o", str(work / "micro"), str(MICRO_C), "-ldl"],
            capture_output=True,
            text=True,
        )
        if built.returncode == 0:
            micro = interleaved([str(work / "micro")], args.rounds, work)
            results["driver_calls"] = {"runs": micro, "summary": summarize(micro)}
        else:
            say(f"gcc failed: {built.stderr[-400:]}")
        (work / "train.py").write_text(TRAIN_PY)
        train = interleaved(
            [sys.executable, str(work / "train.py"), str(args.steps)], args.rounds, work
        )
        results["training_loop"] = {"runs": train, "summary": summarize(train)}
    for section in ("driver_calls", "training_loop"):
        summary = results.get(section, {}).get("summary", {})  # type: ignore[attr-defined]
        for key, s in summary.items():
            say(
                f"{section}.{key}: without {s['without_median']:.6g} "
                f"[{s['without_min']:.6g}..{s['without_max']:.6g}], with {s['with_median']:.6g} "
                f"[{s['with_min']:.6g}..{s['with_max']:.6g}] -> {s['overhead_pct']:+.2f}%"
            )
    (args.out / "bench_alloc_cap.json").write_text(json.dumps(results, indent=2))
    say(f"wrote {args.out / 'bench_alloc_cap.json'}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
