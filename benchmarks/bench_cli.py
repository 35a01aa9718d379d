"""CLI start-up: ``chronos list`` / ``chronos stats`` (through chronosd, or embedded) against
``python -c pass``.

Run: .venv/bin/python benchmarks/bench_cli.py [--runs 40] [--baseline SRC] [--embedded] [--no-doc]

What a user waits for is the whole command: interpreter start, imports, one
round trip to the daemon, the table. The floor is the interpreter itself, so
each figure is reported as a ratio to ``python -c pass`` measured side by side:
the commands run interleaved (pass, list, stats, pass, list, …) so that load
from other processes hits them alike. The target is 3x.

``--baseline SRC`` adds the same commands run from another source tree (e.g.
``/work/main/src`` at the base commit), through its own entry point
(``chronos.cli:main``), against the same daemon: a before/after on one machine
in one run.

``--embedded`` measures the same commands with no daemon (``CHRONOS_MODE=embedded``):
each opens the embedded ledger in its own process, as on a machine without chronosd.
Its own section of docs/BENCHMARKS.md; the goal there is well under 100 ms.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable
from pathlib import Path
from typing import TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

OPEN_PARTITIONS = 10
T = TypeVar("T")


def commands(entry: str) -> dict[str, list[str]]:
    launcher = f"import sys; from {entry} import main; sys.exit(main())"
    return {
        "list": [C.PYTHON, "-c", launcher, "list"],
        "stats": [C.PYTHON, "-c", launcher, "stats"],
    }


def measure(
    runs: int,
    env: dict[str, str],
    trees: dict[str, tuple[Path, str]],
    extra_env: dict[str, dict[str, str]],
) -> dict[str, list[float]]:
    timed: dict[str, list[float]] = {"python -c pass": []}
    plan: list[tuple[str, list[str], dict[str, str]]] = [
        ("python -c pass", [C.PYTHON, "-c", "pass"], env)
    ]
    for label, (src, entry) in trees.items():
        tree_env = {**env, "PYTHONPATH": str(src), **extra_env.get(label, {})}
        for name, cmd in commands(entry).items():
            key = f"chronos {name} ({label})"
            timed[key] = []
            plan.append((key, cmd, tree_env))
    for _ in range(3):  # warm the page cache and the .pyc files
        for _key, cmd, cmd_env in plan:
            C.time_command(cmd, cmd_env)
    for _ in range(runs):
        for key, cmd, cmd_env in plan:
            elapsed, _out = C.time_command(cmd, cmd_env)
            timed[key].append(elapsed)
    return timed


def with_partitions(run: Callable[[], T]) -> T:
    """``run()`` with OPEN_PARTITIONS partitions open (released afterwards)."""
    from chronos import Partitioner

    with Partitioner() as client:
        for _ in range(OPEN_PARTITIONS):
            client.create(0, 0.01, 3600, persist=True)
        try:
            return run()
        finally:
            for p in client.list():
                p.release()


def seed_embedded(home: Path, env: dict[str, str], src: Path, entry: str) -> dict[str, str]:
    """An embedded ledger in ``home`` with OPEN_PARTITIONS partitions made by tree ``src``."""
    home.mkdir(mode=0o700)
    seeded = {"CHRONOS_HOME": str(home), "CHRONOS_SOCKET": str(home / "chronosd.sock")}
    cmd = commands(entry)["list"][:-1]
    for _ in range(OPEN_PARTITIONS):
        C.time_command(
            [*cmd, "create", "0", "0.01", "1h"], {**env, **seeded, "PYTHONPATH": str(src)}
        )
    return seeded


def _revision(src: Path) -> str:
    import subprocess

    proc = subprocess.run(
        ["git", "-C", str(src), "rev-parse", "--short", "HEAD"], capture_output=True, text=True
    )
    return proc.stdout.strip() or "unknown"


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=40)
    parser.add_argument("--baseline", type=Path, help="another source tree to compare")
    parser.add_argument("--embedded", action="store_true", help="no daemon: the embedded ledger")
    args = parser.parse_args()
    trees = {"this tree": (C.ROOT / "src", "chronos.cli_fast")}
    if args.baseline is not None:
        trees = {"baseline": (args.baseline.resolve(), "chronos.cli"), **trees}

    mode = "embedded" if args.embedded else "daemon"
    with C.fresh_env(mode) as (home, env):
        info = C.machine_info(home)
        meter = C.LoadMeter()
        with contextlib.nullcontext() if args.embedded else C.DaemonProcess(home, env):
            extra = {}
            if args.embedded and args.baseline is not None:
                # An older tree may not open this tree's ledger (a newer schema): its own.
                extra["baseline"] = seed_embedded(home / "baseline", env, *trees["baseline"])
            timed = with_partitions(lambda: measure(args.runs, env, trees, extra))
        busy = meter.others()

    floor = C.summarize(timed["python -c pass"])["p50"]
    headers = [*C.STAT_HEADERS, "p50 / pass"]
    rows = [
        [*C.stat_row(key, values), f"{C.summarize(values)['p50'] / floor:.2f}x"]
        for key, values in timed.items()
    ]
    where = "embedded (no daemon)" if args.embedded else "through chronosd"
    C.banner(f"CLI start-up {where} ({OPEN_PARTITIONS} open partitions)")
    print(C.text_table(headers, rows))
    print(f"CPUs busy with other work during the run: {busy:.0%}")
    if not args.no_doc:
        body = "\n\n".join(
            [
                f"## CLI start-up{', embedded' if args.embedded else ''} "
                f"(`benchmarks/bench_cli.py{' --embedded' if args.embedded else ''}`)",
                f"`chronos list` and `chronos stats` {where}, {OPEN_PARTITIONS} open "
                f"partitions, {args.runs} interleaved runs each; the last column is the "
                "ratio of p50s to `python -c pass` measured in the same run (target: "
                + ("well under 100 ms)." if args.embedded else "3x)."),
                C.md_table(headers, rows),
                *(
                    [
                        f"baseline: the tree at `{args.baseline}` "
                        f"(commit {_revision(args.baseline)}), run through its own entry point "
                        "`chronos.cli:main`; this tree through "
                        "`chronos.cli_fast:main`, the console script's."
                    ]
                    if args.baseline is not None
                    else []
                ),
                C.machine_markdown(info, {"other load": f"{busy:.0%} of the CPUs"}),
            ]
        )
        C.update_section("cli-embedded" if args.embedded else "cli", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
