"""Cost of one look at the process table: Chronos's own /proc reader vs psutil.

Run: .venv/bin/python benchmarks/bench_procs.py [--processes 500] [--rounds 50]

The daemon's sampler attributes GPU processes every 100 ms and its stopper
looks at the process table when a partition ends; both need, per process, the
parent, the owner's uid, the state and the identity ``(pid, start_ticks)``.
This script forks ``--processes`` sleeping children (fewer if the machine
already has that many), then times one full snapshot of every process:

* ``chronos``: :class:`chronos.procs.ProcessTable` (one read of
  ``/proc/<pid>/stat`` per process, a ``stat()`` for the uid);
* ``psutil``: ``psutil.process_iter(["ppid", "uids", "status", "create_time"])``
  (what psutil offers for the same facts; it reads ``stat`` and ``status``),
  and once more without ``uids`` (``stat`` only); skipped if psutil is not installed.

It prints p50/p99 per snapshot and the ratio; nothing is written to the docs
(the figures are quoted in docs/ARCHITECTURE.md, "One process layer").
"""

from __future__ import annotations

import argparse
import os
import signal
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "src"))

from chronos import procs  # noqa: E402


def spawn_sleepers(count: int) -> list[int]:
    """Fork ``count`` children that wait for a signal (and die with this script)."""
    pids = []
    for _ in range(count):
        pid = os.fork()
        if pid == 0:
            procs.set_parent_death_signal(signal.SIGKILL)
            signal.pause()
            os._exit(0)
        pids.append(pid)
    return pids


def chronos_snapshot() -> int:
    table = procs.ProcessTable()
    n = 0
    for pid in table.pids():
        stat = table.stat(pid)
        if stat is not None and table.uid(pid) is not None:
            n += 1
    table.children()
    return n


def psutil_snapshot(attrs: tuple[str, ...] = ("ppid", "uids", "status", "create_time")) -> int:
    import psutil

    n = 0
    tree: dict[int, list[int]] = {}
    for p in psutil.process_iter(list(attrs)):
        info = p.info
        if info["ppid"] is not None:
            tree.setdefault(info["ppid"], []).append(p.pid)
            n += 1
    return n


def measure(snapshot: Callable[[], int], rounds: int) -> tuple[list[float], int]:
    snapshot()  # warm: imports, caches
    times = []
    seen = 0
    for _ in range(rounds):
        t0 = time.perf_counter()
        seen = snapshot()
        times.append((time.perf_counter() - t0) * 1000)
    return times, seen


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--processes", type=int, default=500, help="processes on the machine")
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    existing = sum(1 for _ in procs.all_pids())
    children = spawn_sleepers(max(0, args.processes - existing))
    try:
        rows = [("chronos", chronos_snapshot)]
        try:
            import psutil

            rows.append((f"psutil {psutil.__version__}", psutil_snapshot))
            rows.append(
                ("psutil -uids", lambda: psutil_snapshot(("ppid", "status", "create_time")))
            )
        except ImportError:
            print("psutil not installed: only Chronos's reader is measured")
        results: dict[str, float] = {}
        for name, fn in rows:
            times, seen = measure(fn, args.rounds)
            results[name] = statistics.median(times)
            print(
                f"{name:14s} {seen:5d} processes  p50 {statistics.median(times):7.2f} ms"
                f"  p99 {p99(times):7.2f} ms"
            )
        ours = results.pop("chronos")
        for name, theirs in results.items():
            print(f"{name} / chronos (p50): {theirs / ours:.2f}x")
    finally:
        for pid in children:
            os.kill(pid, signal.SIGKILL)
        for pid in children:
            os.waitpid(pid, 0)


if __name__ == "__main__":
    main()
