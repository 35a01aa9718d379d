"""CLI start-up: ``chronos list`` / ``chronos stats`` through chronosd against ``python -c pass``.

Run: .venv/bin/python benchmarks/bench_cli.py [--runs 40] [--baseline SRC] [--no-doc]

What a user waits for is the whole command: interpreter start, imports, one
round trip to the daemon, the table. The floor is the interpreter itself, so
each figure is reported as a ratio to ``python -c pass`` measured side by side:
the commands run interleaved (pass, list, stats, pass, list, …) so that load
from other processes hits them alike. The target is 3x.

``--baseline SRC`` adds the same commands run from another source tree (e.g.
``/work/main/src`` at the base commit), through its own entry point
(``chronos.cli:main``), against the same daemon: a before/after on one machine
in one run.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

OPEN_PARTITIONS = 10


def commands(entry: str) -> dict[str, list[str]]:
    launcher = f"import sys; from {entry} import main; sys.exit(main())"
    return {
        "list": [C.PYTHON, "-c", launcher, "list"],
        "stats": [C.PYTHON, "-c", launcher, "stats"],
    }


def measure(
    runs: int, env: dict[str, str], trees: dict[str, tuple[Path, str]]
) -> dict[str, list[float]]:
    timed: dict[str, list[float]] = {"python -c pass": []}
    plan: list[tuple[str, list[str], dict[str, str]]] = [
        ("python -c pass", [C.PYTHON, "-c", "pass"], env)
    ]
    for label, (src, entry) in trees.items():
        tree_env = {**env, "PYTHONPATH": str(src)}
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
    args = parser.parse_args()
    trees = {"this tree": (C.ROOT / "src", "chronos.cli_fast")}
    if args.baseline is not None:
        trees = {"baseline": (args.baseline.resolve(), "chronos.cli"), **trees}

    with C.fresh_env("daemon") as (home, env):
        info = C.machine_info(home)
        meter = C.LoadMeter()
        with C.DaemonProcess(home, env):
            from chronos import Partitioner

            with Partitioner() as client:
                for _ in range(OPEN_PARTITIONS):
                    client.create(0, 0.01, 3600, persist=True)
                timed = measure(args.runs, env, trees)
                for p in client.list():
                    p.release()
        busy = meter.others()

    floor = C.summarize(timed["python -c pass"])["p50"]
    headers = [*C.STAT_HEADERS, "p50 / pass"]
    rows = [
        [*C.stat_row(key, values), f"{C.summarize(values)['p50'] / floor:.2f}x"]
        for key, values in timed.items()
    ]
    C.banner(f"CLI start-up through chronosd ({OPEN_PARTITIONS} open partitions)")
    print(C.text_table(headers, rows))
    print(f"CPUs busy with other work during the run: {busy:.0%}")
    if not args.no_doc:
        body = "\n\n".join(
            [
                "## CLI start-up (`benchmarks/bench_cli.py`)",
                f"`chronos list` and `chronos stats` through chronosd, {OPEN_PARTITIONS} open "
                f"partitions, {args.runs} interleaved runs each; the last column is the "
                "ratio of p50s to `python -c pass` measured in the same run (target: 3x).",
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
        C.update_section("cli", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
