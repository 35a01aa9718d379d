"""Long life: does anything grow with history? A soak of create/release through chronosd.

Run: .venv/bin/python benchmarks/bench_soak.py [--ops 1000000] [--clients 4]
     [--checkpoints 10] [--restart-every 5] [--no-doc]

``--clients`` processes (root: an administrator, so no quota gets in the way)
each create a persistent 1 % partition of GPU 0 and release it, over and over,
through a real ``chronosd``, until ``--ops`` operations (a create or a release
is one) are done. Meanwhile another user (``nobody``, uid 65534) lists the
partitions every 20 ms. At each of ``--checkpoints`` checkpoints the clients
pause and the soak records the daemon's RSS, the ledger's size on disk (with
its WAL) and the latency of one ``usage`` report over the default 7 days; every
``--restart-every`` checkpoints the daemon is stopped (SIGTERM) and started
again, timed until it answers a ping. The other user's ``list`` latencies are
reported per interval (p50/p99/max), so a stall anywhere shows up.

The default is small (40,000 operations) for a quick run; the issue asks for
1,000,000, which takes over half an hour on a small machine.
"""

from __future__ import annotations

import multiprocessing as mp
import os
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

NOBODY = 65534
PROBE_EVERY_S = 0.02


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def ledger_mb(home: Path) -> float:
    files = [home / "ledger.db", home / "ledger.db-wal"]
    return sum(f.stat().st_size for f in files if f.exists()) / 1e6


def worker(done: Any, target: int, go: Any, paused: Any) -> None:
    """Create and release until ``done`` reaches ``target``; stop at ``go`` being cleared."""
    from chronos.api import Partitioner

    client = Partitioner()
    while True:
        if not go.is_set():
            client.close()
            with paused.get_lock():
                paused.value += 1
            go.wait()
            with paused.get_lock():
                paused.value -= 1
            client = Partitioner()
        with done.get_lock():
            if done.value >= target:
                break
            done.value += 2
        p = client.create(0, 0.01, 60, persist=True)
        p.release()
    client.close()


def prober(latencies: Any, stop: Any, go: Any) -> None:
    """Another user's ``list``, every PROBE_EVERY_S, while the daemon is up."""
    os.setgid(NOBODY)
    os.setuid(NOBODY)
    from chronos.api import Partitioner
    from chronos.errors import ChronosError

    client: Any = None
    while not stop.is_set():
        if not go.is_set():
            if client is not None:
                client.close()
                client = None
            go.wait(0.1)
            continue
        try:
            client = client or Partitioner()
            t0 = time.perf_counter()
            client.list()
            latencies.put(time.perf_counter() - t0)
        except ChronosError:
            client = None  # the daemon restarts: connect again
        time.sleep(PROBE_EVERY_S)


def drain(q: Any) -> list[float]:
    out = []
    while True:
        try:
            out.append(q.get_nowait())
        except Exception:  # noqa: BLE001 - queue.Empty from another module
            return out


def timed_usage() -> float:
    from chronos.api import Partitioner

    with Partitioner() as client:
        t0 = time.perf_counter()
        client.usage()
        return time.perf_counter() - t0


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--ops", type=int, default=40_000, help="create+release operations")
    parser.add_argument("--clients", type=int, default=4)
    parser.add_argument("--checkpoints", type=int, default=10)
    parser.add_argument("--restart-every", type=int, default=5)
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_soak needs root (the other user's list runs as nobody)", file=sys.stderr)
        return 2
    ctx = mp.get_context("fork")
    rows: list[list[Any]] = []
    info: dict[str, str] = {}
    with C.fresh_env("daemon", gpus="80GiB") as (home, env):
        os.chmod(home, 0o755)
        info = C.machine_info(home)
        daemon = C.DaemonProcess(home, env).start()
        done, paused = ctx.Value("q", 0), ctx.Value("i", 0)
        go, stop = ctx.Event(), ctx.Event()
        go.set()
        latencies: Any = ctx.Queue()
        probe = ctx.Process(target=prober, args=(latencies, stop, go))
        probe.start()
        workers = [
            ctx.Process(target=worker, args=(done, args.ops, go, paused))
            for _ in range(args.clients)
        ]
        for w in workers:
            w.start()
        started = time.perf_counter()
        step = args.ops / args.checkpoints
        rows.append(["0", 0, f"{rss_mb(daemon.pid):.1f}", f"{ledger_mb(home):.1f}", "", "", ""])
        for n in range(1, args.checkpoints + 1):
            while done.value < n * step and any(w.is_alive() for w in workers):
                time.sleep(0.2)
            go.clear()
            deadline = time.monotonic() + 30
            alive = sum(w.is_alive() for w in workers)
            while paused.value < alive and time.monotonic() < deadline:
                time.sleep(0.01)
                alive = sum(w.is_alive() for w in workers)
            interval = sorted(drain(latencies))
            rss, size = rss_mb(daemon.pid), ledger_mb(home)
            usage_s = timed_usage()
            restart = ""
            if n % args.restart_every == 0 and n < args.checkpoints:
                daemon.stop()
                t0 = time.perf_counter()
                daemon = C.DaemonProcess(home, env).start()
                restart = f"{(time.perf_counter() - t0) * 1000:.0f}"
            stats = C.summarize(interval) if interval else {"p50": 0.0, "p99": 0.0, "max": 0.0}
            row = [
                f"{done.value:,}",
                len(interval),
                f"{rss:.1f}",
                f"{size:.1f}",
                f"{usage_s * 1000:.1f}",
                restart,
                f"{stats['p50']:.1f} / {stats['p99']:.1f} / {stats['max']:.1f}",
            ]
            rows.append(row)
            print(" | ".join(str(c) for c in row), flush=True)
            go.set()
        elapsed = time.perf_counter() - started
        stop.set()
        for w in workers:
            w.join(30)
        probe.join(10)
        daemon.report_errors()
        daemon.stop()
    info["soak"] = f"{done.value:,} operations in {elapsed:.0f} s ({done.value / elapsed:.0f}/s)"
    table = C.md_table(HEADERS, rows)
    print(table)
    if not args.no_doc:
        C.update_section("soak", render(args, info, table))
        print(f"\nupdated {C.DOC.relative_to(C.ROOT)} (section soak)")
    return 0


HEADERS = [
    "operations",
    "lists timed",
    "daemon RSS MB",
    "ledger MB",
    "`usage` ms",
    "restart ms",
    "other user's `list` p50 / p99 / max ms",
]


def render(args: Any, info: dict[str, str], table: str) -> str:
    return "\n".join(
        [
            "## Long life: soak (`bench_soak.py`)",
            "",
            f"{args.clients} clients (root) create a persistent 1 % partition of a simulated "
            "80 GiB GPU and release it, over and over, through one `chronosd`; an operation "
            "is a create or a release. Another user (`nobody`) runs `list` every 20 ms "
            "throughout. At each checkpoint the clients pause, and the row gives the daemon's "
            "RSS, the ledger's size (with its WAL), one `usage` report (default 7 days, as "
            "root: every user), and, every "
            f"{args.restart_every} checkpoints, the time from starting a stopped daemon to "
            "its first answer. The `list` column covers the interval that ends at the row.",
            "",
            C.machine_markdown(info),
            "",
            table,
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
