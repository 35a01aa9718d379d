"""Counted work per create+release, this tree against another: figures that repeat.

Run: .venv/bin/python benchmarks/bench_work.py --baseline /path/to/old/src
[--pairs 2000] [--no-doc]

bench_compare.py times both trees side by side, but on a shared 2-core VM its ratios
move by 15-20 % from run to run (the same two trees read 0.85x and 1.19x for the
embedded p50 in two 9-round runs). What a create+release *does* does not move, so this
script counts it, for each tree in fresh interpreters whose ``PYTHONPATH`` puts that
tree's ``chronos`` first:

* write and read syscalls and the bytes they move (``/proc/<pid>/io``: ``syscw``,
  ``wchar``, ``syscr``, ``rchar``), per pair: embedded in the client, and through
  chronosd in the daemon (whose sampler neither reads nor writes files);
* CPU instructions per embedded pair, where valgrind is installed: two runs under
  ``valgrind --tool=lackey`` with ``--pairs-small`` and ``--pairs-large`` pairs, and the
  difference divided by the extra pairs, so interpreter start-up and imports cancel out.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import tempfile
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
import fairness_measure  # noqa: E402
from bench_compare import side_by_side, tree_env, write_section  # noqa: E402

IO_KEYS = ("syscw", "wchar", "syscr", "rchar")

PAIRS = r"""
import json, sys
from chronos import Partitioner

def io(pid="self"):
    with open(f"/proc/{pid}/io") as f:
        return {k: int(v) for k, v in (line.split(":") for line in f)}

pairs, daemon_pid = int(sys.argv[1]), sys.argv[2]
with Partitioner() as client:
    for _ in range(20):
        client.create(0, 0.001, 3600, persist=True).release()
    before = io(daemon_pid)
    for _ in range(pairs):
        client.create(0, 0.001, 3600, persist=True).release()
    after = io(daemon_pid)
print(json.dumps({k: (after[k] - before[k]) / pairs for k in before}))
"""


def _run(argv: list[str], env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"a measured client failed:\n{proc.stderr[-2000:]}")
    return proc


def embedded_io(src: Path, pairs: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="chronos-work-"))
    try:
        env = tree_env(src, home, CHRONOS_MODE="embedded")
        out = _run([sys.executable, "-c", PAIRS, str(pairs), "self"], env).stdout
        result: dict[str, float] = json.loads(out)
        return result
    finally:
        shutil.rmtree(home, ignore_errors=True)


def daemon_io(src: Path, pairs: int) -> dict[str, float]:
    home = Path(tempfile.mkdtemp(prefix="chronos-work-"))
    sock = home / "chronosd.sock"
    daemon = fairness_measure.start_daemon(home / "state", sock, tree_env(src, home))
    try:
        env = tree_env(src, home)  # its CHRONOS_SOCKET is this daemon's
        out = _run([sys.executable, "-c", PAIRS, str(pairs), str(daemon.pid)], env).stdout
        result: dict[str, float] = json.loads(out)
        return result
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
        shutil.rmtree(home, ignore_errors=True)


def instructions(src: Path, pairs: int) -> int:
    """Guest instructions of one embedded run of ``pairs`` pairs under valgrind."""
    home = Path(tempfile.mkdtemp(prefix="chronos-work-"))
    try:
        env = tree_env(src, home, CHRONOS_MODE="embedded")
        argv = [sys.executable, "-c", PAIRS, str(pairs), "self"]
        _run(argv, env)  # compiles the tree's modules first, as an installed tree has them
        valgrind = ["valgrind", "--tool=lackey", "--basic-counts=yes"]
        report = _run(valgrind + argv, env).stderr
        line = next(x for x in report.splitlines() if "guest instrs:" in x)
        return int(line.rsplit(":", 1)[1].replace(",", ""))
    finally:
        shutil.rmtree(home, ignore_errors=True)


def per_pair_instructions(src: Path, small: int, large: int) -> float:
    return (instructions(src, large) - instructions(src, small)) / (large - small)


def measure(trees: dict[str, Path], args: Any) -> list[list[str]]:
    figures: dict[str, dict[str, float]] = {name: {} for name in trees}
    for name, src in trees.items():
        for where, io in (("embedded", embedded_io), ("chronosd", daemon_io)):
            counted = io(src, args.pairs)
            for key in IO_KEYS:
                figures[name][f"{where}: {key} per pair"] = counted[key]
        if shutil.which("valgrind"):
            figures[name]["embedded: instructions per pair"] = per_pair_instructions(
                src, args.pairs_small, args.pairs_large
            )
        print(f"{name} measured", flush=True)
    base, this = figures.values()
    return [
        [key, f"{base[key]:,.1f}", f"{this[key]:,.1f}", f"{this[key] / base[key]:.2f}"]
        for key in base
    ]


def main() -> None:
    args, trees = side_by_side(__doc__, pairs=2000, pairs_small=50, pairs_large=250)
    rows = measure(trees, args)
    table = C.md_table(["figure", "baseline", "this tree", "ratio"], rows)
    print(table)
    if args.no_doc:
        return
    valgrind = (
        f"instructions: valgrind lackey, ({args.pairs_large} − {args.pairs_small} pairs) difference"
        if shutil.which("valgrind")
        else "instructions not counted (no valgrind on this machine)"
    )
    method = (
        f"Baseline: {args.label or args.baseline}. I/O from `/proc/<pid>/io` over "
        f"{args.pairs} pairs after 20 warm-up pairs (embedded: the client; chronosd: the "
        f"daemon); {valgrind}. These counts repeat to within a few per mille from run "
        "to run, where bench_compare's timings move by 15-20 %."
    )
    write_section("work", "Counted work per create+release (bench_work.py)", method, table)


if __name__ == "__main__":
    os.environ.setdefault("CHRONOS_BACKEND", "simulated")
    main()
