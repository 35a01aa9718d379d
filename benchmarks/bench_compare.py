"""Before/after on one machine in one run: this tree against another source tree.

Run: .venv/bin/python benchmarks/bench_compare.py --baseline /path/to/old/src
[--rounds 5] [--pairs 300] [--clients 16] [--no-doc]

A refactoring must not cost speed. Each round runs, for the baseline tree and for
this one in turn (so load from other processes hits both alike; the baseline first
in odd rounds, this tree first in even ones), in fresh interpreters whose
``PYTHONPATH`` puts that tree's ``chronos`` first:

* embedded: ``Partitioner().create(0, 0.001, 3600, persist=True)`` then
  ``.release()``, ``--pairs`` times after a warm-up, on a fresh ledger: p50/p99;
* daemon: a ``chronosd`` of that tree (simulated GPUs, its own state dir and socket),
  the same pairs from a client of that tree: p50/p99; then ``--clients`` client
  processes started together, each doing 100 create+release pairs: pairs/s.

The report gives each figure's median over the rounds, per tree, and the ratio
(this tree / baseline; under 1 is faster for latencies, over 1 for throughput). CPU
time per pair (the client's own, and the daemon's from ``/proc``, sampler included) is
reported beside the latencies: on a shared machine with a shared disk, where fsync
latency and other load move a p50 by 10–30 % from run to run, it is the steadier figure.
CLI start-up has its own side-by-side run: ``bench_cli.py --baseline``.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import fairness_measure  # noqa: E402

HERE_SRC = Path(__file__).resolve().parent.parent / "src"

PAIRS = r"""
import json, os, statistics, sys, time
import chronos
from chronos import Partitioner
pairs = int(sys.argv[1])
with Partitioner() as client:
    for _ in range(20):
        client.create(0, 0.001, 3600, persist=True).release()
    took = []
    cpu0 = sum(os.times()[:2])
    for _ in range(pairs):
        t0 = time.perf_counter()
        client.create(0, 0.001, 3600, persist=True).release()
        took.append((time.perf_counter() - t0) * 1000)
    cpu = (sum(os.times()[:2]) - cpu0) * 1000 / pairs
took.sort()
p99 = took[int(len(took) * 0.99) - 1]
print(json.dumps({"p50": statistics.median(took), "p99": p99, "cpu": cpu,
                  "module": chronos.__file__}))
"""

CLIENT = r"""
import sys, time
from chronos import Partitioner
go, n = float(sys.argv[1]), int(sys.argv[2])
with Partitioner() as client:
    while time.time() < go:
        time.sleep(0.001)
    for _ in range(n):
        client.create(0, 0.0001, 3600, persist=True).release()
"""


def tree_env(src: Path, home: Path, **extra: str) -> dict[str, str]:
    """fairness_measure's fresh environment for ``src``, with 1 TiB GPUs (the pairs never
    run out of room) and the built-in policy (``home``'s config.toml is never written)."""
    return {**fairness_measure.tree_env(home, src, gpus="1TiB,1TiB"), **extra}


def python(code: str, env: dict[str, str], *args: str) -> dict[str, Any]:
    proc = subprocess.run(
        [sys.executable, "-c", code, *args], env=env, capture_output=True, text=True, timeout=600
    )
    if proc.returncode != 0:
        raise SystemExit(f"a benchmark client failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout)
    if "module" in result and not result["module"].startswith(env["PYTHONPATH"]):
        raise SystemExit(f"measured {result['module']}, not the tree {env['PYTHONPATH']}")
    return result


def embedded(src: Path, pairs: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="chronos-cmp-"))
    try:
        return python(PAIRS, tree_env(src, home, CHRONOS_MODE="embedded"), str(pairs))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def start_daemon(src: Path, home: Path) -> subprocess.Popen[bytes]:
    daemon = fairness_measure.start_daemon(
        home / "state", home / "chronosd.sock", tree_env(src, home)
    )
    time.sleep(0.3)
    return daemon


def through_daemon(src: Path, pairs: int, clients: int) -> dict[str, Any]:
    home = Path(tempfile.mkdtemp(prefix="chronos-cmp-"))
    daemon = start_daemon(src, home)
    try:
        env = tree_env(src, home)
        before = C.process_cpu_seconds(daemon.pid)
        result = python(PAIRS, env, str(pairs))
        result["daemon_cpu"] = (C.process_cpu_seconds(daemon.pid) - before) * 1000 / pairs
        go = time.time() + 1.5
        procs = [
            subprocess.Popen([sys.executable, "-c", CLIENT, str(go), "100"], env=env)
            for _ in range(clients)
        ]
        codes = [p.wait(600) for p in procs]
        if any(codes):
            raise SystemExit(f"a throughput client failed: {codes}")
        result["pairs_per_s"] = clients * 100 / (time.time() - go)
        return result
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(home, ignore_errors=True)


def side_by_side(doc: str, **counts: int) -> tuple[argparse.Namespace, dict[str, Path]]:
    """The arguments of a script that measures this tree beside ``--baseline`` (this one
    and bench_work.py): ``--baseline``, ``--label``, ``--no-doc`` and a whole-number
    option per ``counts`` item (``pairs_small=50``: ``--pairs-small``, default 50); and
    the two trees, the baseline first."""
    parser = argparse.ArgumentParser(description=doc.split("\n\n")[0])
    parser.add_argument("--baseline", type=Path, required=True, help="the other tree's src/")
    parser.add_argument("--label", default="", help="what the baseline is (for the doc)")
    parser.add_argument("--no-doc", action="store_true")
    for name, default in counts.items():
        parser.add_argument(f"--{name.replace('_', '-')}", type=int, default=default)
    args = parser.parse_args()
    return args, {"baseline": args.baseline.resolve(), "this tree": HERE_SRC}


def main() -> None:
    args, trees = side_by_side(__doc__, rounds=5, pairs=300, clients=16)
    seen: dict[str, dict[str, list[float]]] = {name: {} for name in trees}
    for round_no in range(args.rounds):
        # Which tree goes first alternates too: run after run, the second one measured
        # was slower even with the same tree on both sides (1.13x embedded p50).
        order = list(trees.items())
        for name, src in order if round_no % 2 == 0 else reversed(order):
            e = embedded(src, args.pairs)
            d = through_daemon(src, args.pairs, args.clients)
            figures = {
                "embedded create+release p50 ms": e["p50"],
                "embedded create+release p99 ms": e["p99"],
                "embedded CPU ms per pair": e["cpu"],
                "chronosd create+release p50 ms": d["p50"],
                "chronosd create+release p99 ms": d["p99"],
                "chronosd CPU ms per pair (daemon + client)": d["daemon_cpu"] + d["cpu"],
                f"chronosd pairs/s, {args.clients} clients": d["pairs_per_s"],
            }
            for key, value in figures.items():
                seen[name].setdefault(key, []).append(value)
        print(f"round {round_no + 1}/{args.rounds} done", flush=True)
    rows = []
    for key in seen["baseline"]:
        before = statistics.median(seen["baseline"][key])
        after = statistics.median(seen["this tree"][key])
        rows.append([key, f"{before:.2f}", f"{after:.2f}", f"{after / before:.2f}"])
    header = ["figure (median of rounds)", "baseline", "this tree", "ratio"]
    table = C.md_table(header, rows)
    print(table)
    if not args.no_doc:
        method = (
            f"{args.rounds} rounds, baseline and this tree alternated in each (which goes "
            "first alternates by round); "
            f"{args.pairs} pairs per latency run; baseline: {args.label or args.baseline}."
        )
        write_section("compare", "Before and after (bench_compare.py)", method, table)


def write_section(name: str, title: str, method: str, table: str) -> None:
    """Rewrite section ``name`` of docs/BENCHMARKS.md: title, method, table, machine."""
    machine = f"Machine: {C.machine_note()}."
    C.update_section(name, f"## {title}\n\n{method}\n\n{table}\n\n{machine}")


if __name__ == "__main__":
    os.environ.setdefault("CHRONOS_BACKEND", "simulated")
    main()
