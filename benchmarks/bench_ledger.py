"""Embedded mode (no daemon): latency of the Python API and the CLI, and create throughput.

Run: .venv/bin/python benchmarks/bench_ledger.py [--iterations 1000] [--no-doc]

* API: ``Partitioner().create(0, 0.001, 3600, persist=True)`` then ``.release()``,
  timed one call at a time after a warm-up.
* CLI: ``chronos create 0 0.001 3600 --json`` / ``chronos release ID`` / ``chronos list``
  / ``chronos stats`` as subprocesses (wall time, interpreter start included), plus
  the floor under them: a bare interpreter and ``import chronos.cli``.
* Throughput: 1, 4 and 16 processes, each doing N creates at once (started
  together behind a barrier); total creates/s and per-create latency.
* Scaling: create+release latency with 0, 1000 and 3000 partitions open, and
  with 0, 10,000 and 50,000 ended partitions in the ledger's history.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MEMORY = 0.001  # ~1 GiB of a simulated 1 TiB GPU; released after each use
LONG = 3600


def bench_cli(env: dict[str, str], runs: int, open_partitions: int) -> dict[str, list[float]]:
    from chronos import Partitioner

    out: dict[str, list[float]] = {
        "create": [],
        "release": [],
        "list": [],
        "stats": [],
        "python -c pass": [],
        "python -c 'import chronos.cli'": [],
    }
    # Warm the page cache and the ledger file once.
    C.time_command(C.cli_command("list"), env)
    for _ in range(runs):
        elapsed, stdout = C.time_command(
            C.cli_command("create", "0", str(MEMORY), str(LONG), "--json"), env
        )
        out["create"].append(elapsed)
        pid = json.loads(stdout)["id"]
        elapsed, _ = C.time_command(C.cli_command("release", pid), env)
        out["release"].append(elapsed)
    # list/stats with a few partitions open, as on a machine in use.
    with Partitioner() as client:
        held = [client.create(0, MEMORY, LONG, persist=True) for _ in range(open_partitions)]
        for _ in range(runs):
            out["list"].append(C.time_command(C.cli_command("list"), env)[0])
            out["stats"].append(C.time_command(C.cli_command("stats"), env)[0])
        for p in held:
            p.release()
    for _ in range(runs):
        out["python -c pass"].append(C.time_command([C.PYTHON, "-c", "pass"], env)[0])
        out["python -c 'import chronos.cli'"].append(
            C.time_command([C.PYTHON, "-c", "import chronos.cli"], env)[0]
        )
    return out


Imports = tuple[int, float, list[tuple[str, float]]]


def import_breakdown(env: dict[str, str], top: int = 8) -> Imports:
    """Imports of ``chronos list`` (``-X importtime``): count, total ms, heaviest by self time."""
    import subprocess

    code = "import sys; from chronos.cli import main; sys.exit(main(['list']))"
    proc = subprocess.run(
        [C.PYTHON, "-X", "importtime", "-c", code], env=env, capture_output=True, text=True
    )
    items = []
    for line in proc.stderr.splitlines():
        if not line.startswith("import time:") or "|" not in line:
            continue
        own, _, name = line[len("import time:") :].split("|")
        try:
            items.append((name.strip(), int(own.strip()) / 1000.0))
        except ValueError:
            continue  # the column header
    items.sort(key=lambda x: -x[1])
    return len(items), sum(ms for _, ms in items), items[:top]


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000, help="API create+release pairs")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--cli-runs", type=int, default=50)
    parser.add_argument(
        "--cli-open", type=int, default=10, help="partitions open while timing list/stats"
    )
    parser.add_argument(
        "--per-proc", type=int, default=100, help="creates per process in the throughput runs"
    )
    parser.add_argument("--procs", default="1,4,16")
    parser.add_argument(
        "--open-levels",
        default="0,1000,3000",
        help="open-partition counts for the scaling table ('' to skip)",
    )
    parser.add_argument(
        "--history-levels",
        default="0,10000,50000",
        help="ended-partition counts for the scaling table ('' to skip)",
    )
    args = parser.parse_args()

    with C.fresh_env("embedded") as (home, env):
        info = C.machine_info(home)
        meter = C.LoadMeter()
        C.banner("API (embedded)")
        api = C.api_latency("embedded", args.iterations, args.warmup, MEMORY, LONG)
        api_rows = [C.stat_row(f"API {k}", v) for k, v in api.items()]
        print(C.text_table(C.STAT_HEADERS, api_rows))
        if args.profile:
            print(C.profile_summary(C.api_latency, "embedded", 300, 10, MEMORY, LONG))

        C.banner("CLI (embedded, subprocess wall time)")
        cli = bench_cli(env, args.cli_runs, args.cli_open)
        cli_rows = []
        for k, v in cli.items():
            label = k if k.startswith("python") else f"chronos {k}"
            if k in ("list", "stats"):
                label += f" ({args.cli_open} open)"
            cli_rows.append(C.stat_row(label, v))
        print(C.text_table(C.STAT_HEADERS, cli_rows))
        imports = import_breakdown(env)
        print(describe_imports(imports, "`"))

        C.banner("create throughput (embedded, concurrent processes)")
        tp_rows = []
        for procs in [int(x) for x in args.procs.split(",") if x]:
            r = C.run_throughput(procs, args.per_proc)
            s = C.summarize(r["lat"])
            tp_rows.append([procs, r["ops"], r["rate"], s["p50"], s["p99"], s["max"]])
            print(C.text_table(TP_HEADERS, tp_rows[-1:]), flush=True)

    scaling_rows: list[list[Any]] = []
    for kind, spec in (("open", args.open_levels), ("history", args.history_levels)):
        levels = [int(x) for x in spec.split(",") if x.strip()]
        if levels:
            C.banner(f"create/release latency vs {kind} partitions (fresh ledger, 1 process)")
            with C.fresh_env("embedded") as (home2, _):
                scaling_rows += C.latency_vs_size(kind, levels, 200, home2 / "ledger.db")

    info["other processes during the run"] = f"{meter.others():.0%} CPU busy"
    print(f"other processes kept the CPUs {info['other processes during the run']}")
    if not args.no_doc:
        C.update_section(
            "ledger", render(args, info, api_rows, cli_rows, imports, tp_rows, scaling_rows)
        )
        print(f"\nupdated {C.DOC.relative_to(C.ROOT)} (section ledger)")
    return 0


def describe_imports(imports: Imports, q: str) -> str:
    count, total, heaviest = imports
    return (
        f"`chronos list` imports {count} modules, {total:.0f} ms in all "
        f"(`python -X importtime`, which inflates it); the heaviest by own time: "
        + ", ".join(f"{q}{n}{q} {ms:.1f} ms" for n, ms in heaviest)
        + "."
    )


TP_HEADERS = ["processes", "creates", "creates/s", "p50 ms", "p99 ms", "max ms"]


def render(
    args: Any,
    info: dict[str, str],
    api_rows: list[Any],
    cli_rows: list[Any],
    imports: Imports,
    tp_rows: list[Any],
    scaling_rows: list[Any],
) -> str:
    parts = [
        "## Embedded mode (`bench_ledger.py`)",
        "",
        "`CHRONOS_MODE=embedded`: every client opens the SQLite ledger itself "
        "(WAL, `synchronous=FULL`, one `BEGIN IMMEDIATE` transaction per change).",
        "",
        C.machine_markdown(info),
        "",
        f"### Python API ({args.iterations} create+release pairs after {args.warmup} warm-up)",
        "",
        C.md_table(C.STAT_HEADERS, api_rows),
        "",
        f"### CLI ({args.cli_runs} runs each; wall time of the whole subprocess)",
        "",
        C.md_table(C.STAT_HEADERS, cli_rows),
        "",
        describe_imports(imports, "`"),
        "",
        f"### Create throughput ({args.per_proc} creates per process, all started together)",
        "",
        C.md_table(TP_HEADERS, tp_rows),
        "",
        "Latencies are per create, pooled over all processes; creates/s is all creates "
        "over the span from the first start to the last finish. The partitions stay open "
        "during a run (so the last creates see up to processes × N open) and are released "
        "after it.",
    ]
    if scaling_rows:
        parts += [
            "",
            "### Create/release latency as the ledger grows (1 process, 200 pairs per row)",
            "",
            C.md_table(C.SCALING_HEADERS, scaling_rows),
            "",
            "`N open`: N other partitions open meanwhile. `N ended`: N released "
            "partitions in the ledger's history, as months of use leave behind (copied "
            "into the database directly; the API would take minutes). Each kind starts "
            "from a fresh ledger.",
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
