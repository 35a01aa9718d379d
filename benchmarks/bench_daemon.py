"""Daemon mode: latency and throughput through a real ``chronosd`` on its Unix socket.

Run: .venv/bin/python benchmarks/bench_daemon.py [--iterations 1000] [--no-doc] [--profile]

* API: ``create(0, 0.001, 3600, persist=True)`` then ``.release()`` over one
  connection, timed one call at a time after a warm-up.
* Throughput: 16 and 64 client processes, each with its own connection, all
  started together: creates only (partitions pile up during the run), and
  create+release cycles (steady state).
* CLI: ``chronos list`` / ``chronos stats`` wall time in daemon mode.
* Scaling: create/release latency with 0, 500 and 1000 partitions open and with
  50,000 ended ones in the history, and the daemon's idle CPU (it samples GPU
  processes 10 times a second).

``--profile`` runs the daemon under cProfile during the scaling phase and prints
its heaviest functions.
"""

from __future__ import annotations

import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

MEMORY = 0.001  # ~1 GiB of a simulated 1 TiB GPU; released after each use
LONG = 3600


def bench_cli(env: dict[str, str], runs: int, open_partitions: int) -> dict[str, list[float]]:
    from chronos import Partitioner

    out: dict[str, list[float]] = {"list": [], "stats": []}
    with Partitioner() as client:
        held = [client.create(0, MEMORY, LONG, persist=True) for _ in range(open_partitions)]
        C.time_command(C.cli_command("list"), env)  # warm the page cache
        for _ in range(runs):
            out["list"].append(C.time_command(C.cli_command("list"), env)[0])
            out["stats"].append(C.time_command(C.cli_command("stats"), env)[0])
        for p in held:
            p.release()
    return out


def idle_cpu(daemon: C.DaemonProcess, seconds: float) -> float:
    """The daemon's CPU use (% of one core) while nobody calls it."""
    c0, t0 = daemon.cpu_seconds(), time.monotonic()
    time.sleep(seconds)
    c1, t1 = daemon.cpu_seconds(), time.monotonic()
    if c0 is None or c1 is None:
        return float("nan")
    return 100.0 * (c1 - c0) / (t1 - t0)


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--iterations", type=int, default=1000, help="API create+release pairs")
    parser.add_argument("--warmup", type=int, default=100)
    parser.add_argument("--procs", default="16,64", help="client process counts")
    parser.add_argument(
        "--total",
        type=int,
        default=640,
        help="operations per throughput run, split evenly over the processes",
    )
    parser.add_argument("--cli-runs", type=int, default=50)
    parser.add_argument("--cli-open", type=int, default=10)
    parser.add_argument(
        "--open-levels",
        default="0,500,1000",
        help="open-partition counts for the scaling table ('' to skip)",
    )
    parser.add_argument(
        "--history-levels",
        default="0,50000",
        help="ended-partition counts for the scaling table ('' to skip)",
    )
    parser.add_argument("--idle-seconds", type=float, default=3.0)
    args = parser.parse_args()

    with C.fresh_env("daemon") as (home, env):
        info = C.machine_info(home)
        meter = C.LoadMeter()
        with C.DaemonProcess(home, env) as daemon:
            print(f"chronosd pid {daemon.pid}, started as {daemon.how}")
            C.banner("API through chronosd")
            cpu0 = daemon.cpu_seconds()
            api = C.api_latency("daemon", args.iterations, args.warmup, MEMORY, LONG)
            cpu1 = daemon.cpu_seconds()
            api_rows = [C.stat_row(f"API {k}", v) for k, v in api.items()]
            print(C.text_table(C.STAT_HEADERS, api_rows))
            per_pair = None
            if cpu0 is not None and cpu1 is not None:
                per_pair = 1000.0 * (cpu1 - cpu0) / (args.iterations + args.warmup)
                print(f"daemon CPU per create+release pair: {per_pair:.2f} ms")

            C.banner("throughput (one connection per client process)")
            tp_rows = []
            for cycle in (False, True):
                for procs in [int(x) for x in args.procs.split(",") if x]:
                    per_proc = max(1, args.total // procs)
                    r = C.run_throughput(procs, per_proc, cycle=cycle)
                    s = C.summarize(r["lat"])
                    what = "create+release" if cycle else "create"
                    tp_rows.append([what, procs, r["ops"], r["rate"], s["p50"], s["p99"], s["max"]])
                    print(C.text_table(TP_HEADERS, tp_rows[-1:]), flush=True)

            C.banner("CLI in daemon mode (subprocess wall time)")
            cli = bench_cli(env, args.cli_runs, args.cli_open)
            cli_rows = [
                C.stat_row(f"chronos {k} ({args.cli_open} open)", v) for k, v in cli.items()
            ]
            print(C.text_table(C.STAT_HEADERS, cli_rows))
            daemon.report_errors()

    scaling_rows: list[list[Any]] = []
    for kind, spec in (("open", args.open_levels), ("history", args.history_levels)):
        levels = [int(x) for x in spec.split(",") if x.strip()]
        if not levels:
            continue
        C.banner(f"create/release latency vs {kind} partitions (fresh daemon and ledger)")
        with C.fresh_env("daemon") as (home2, env2):
            profile = home2 / "daemon.prof" if args.profile and kind == "open" else None
            with C.DaemonProcess(home2, env2, profile=profile) as daemon2:
                scaling_rows += C.latency_vs_size(
                    kind,
                    levels,
                    200,
                    home2 / "ledger.db",
                    extra=lambda d=daemon2: idle_cpu(d, args.idle_seconds),
                    extra_header=SCALING_HEADERS[-1],
                )
                daemon2.report_errors()
            if profile is not None and profile.exists():
                import pstats

                stats = pstats.Stats(str(profile)).strip_dirs()
                stats.sort_stats("cumulative").print_stats(25)
                stats.sort_stats("tottime").print_stats(12)

    info["other processes during the run"] = f"{meter.others():.0%} CPU busy"
    print(f"other processes kept the CPUs {info['other processes during the run']}")
    if not args.no_doc:
        C.update_section(
            "daemon",
            render(args, info, daemon.how, api_rows, per_pair, tp_rows, cli_rows, scaling_rows),
        )
        print(f"\nupdated {C.DOC.relative_to(C.ROOT)} (section daemon)")
    return 0


TP_HEADERS = ["operation", "clients", "ops", "ops/s", "p50 ms", "p99 ms", "max ms"]
SCALING_HEADERS = [*C.SCALING_HEADERS, "idle daemon CPU %"]


def render(
    args: Any,
    info: dict[str, str],
    how: str,
    api_rows: list[Any],
    per_pair: float | None,
    tp_rows: list[Any],
    cli_rows: list[Any],
    scaling_rows: list[Any],
) -> str:
    parts = [
        "## Daemon mode (`bench_daemon.py`)",
        "",
        f"A real `chronosd` (started as {how}) on a temporary state directory and "
        "socket, default policy; clients connect over the Unix socket "
        "(`CHRONOS_MODE=daemon`).",
        "",
        C.machine_markdown(info),
        "",
        f"### Python API ({args.iterations} create+release pairs after {args.warmup} warm-up, "
        "one connection)",
        "",
        C.md_table(C.STAT_HEADERS, api_rows),
    ]
    if per_pair is not None:
        parts += ["", f"Daemon CPU time per create+release pair: {per_pair:.2f} ms."]
    parts += [
        "",
        f"### Throughput ({args.total} operations per run, split evenly over the clients; "
        "each client its own process and connection)",
        "",
        C.md_table(TP_HEADERS, tp_rows),
        "",
        "`create`: partitions pile up during the run (up to "
        f"{args.total} open at its end) and are released after it; `create+release`: "
        "each op is one create and one release of the same partition, so at most one "
        "per client is open. Latency is per op, pooled over the clients.",
        "",
        f"### CLI in daemon mode ({args.cli_runs} runs each, subprocess wall time)",
        "",
        C.md_table(C.STAT_HEADERS, cli_rows),
    ]
    if scaling_rows:
        parts += [
            "",
            "### Latency as the ledger grows (1 client, 200 pairs per row)",
            "",
            C.md_table(SCALING_HEADERS, scaling_rows),
            "",
            "`N open`: N other partitions open meanwhile; `N ended`: N released "
            "partitions in the ledger's history (copied into the database directly). Each "
            "kind runs on a fresh daemon and ledger. Idle CPU: the daemon's user+system "
            f"time over {args.idle_seconds:.0f} s with no client calling (it samples GPU "
            "processes 10 times a second).",
        ]
    return "\n".join(parts)


if __name__ == "__main__":
    sys.exit(main())
