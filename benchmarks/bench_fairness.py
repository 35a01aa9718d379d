"""Fair sharing at scale: admission with 10,000 bookings, and grant latency after a release.

Run: .venv/bin/python benchmarks/bench_fairness.py [--bookings 10000] [--samples 300]
     [--trials 40] [--no-doc] [--profile]
     [--baseline /path/to/old/src [--rounds 3]]

* Admission: ``create(0, 0.25, 1h)`` (then a release, not timed) through the
  Python API while the ledger holds ``--bookings`` bookings, spread over both
  GPUs and the next 300 days (none overlaps the request, as most would not on
  a real machine), 20 users owning them. Embedded mode as an administrator (no
  quotas) and as an ordinary user under quotas (the user owns 1/20 of the
  bookings, so the quota check has their history to go through), then
  through a real ``chronosd``; and, for reference, the same with no bookings.
* Grant latency: a blocker holds all of GPU 0; a second process's
  ``create(0, 0.6, 60, wait=True)`` waits in the queue; the blocker is
  released. Timed from the moment the ``release`` call returned to the moment
  the waiting ``create`` returned (``time.perf_counter``, CLOCK_MONOTONIC, so
  comparable across the two processes), ``--trials`` times, through the
  daemon, with and without the bookings.

The bookings are written straight into the ledger in one transaction (the API
would fsync 10,000 times); each is a valid partition that admission would have
accepted. ``--profile`` prints a cProfile summary of the embedded admissions.

``--baseline <src>``: side by side with another tree (as ``bench_compare.py``): each
round runs the rows with ``--bookings`` bookings (``fairness_measure.py``, the public API
only) in a fresh interpreter per tree, whose ``PYTHONPATH`` puts that tree's ``chronos``
first, the baseline first in odd rounds and this tree first in even ones; the report
gives each row's p50 and p99 (median over the rounds) per tree and the ratio (this tree /
baseline; under 1 is faster), into its own section of the doc.
"""

from __future__ import annotations

import json
import multiprocessing as mp
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402
from fairness_measure import (  # noqa: E402
    GPUS,
    POLICY,
    USERS,
    add_bookings,
    as_ordinary_user,
    grant_latency,
    time_admissions,
)

HERE = Path(__file__).resolve().parent
HERE_SRC = HERE.parent / "src"


# ----------------------------------------------------------- side by side with a baseline


def one_tree(src: Path, args: Any) -> dict[str, list[float]]:
    """Every row of ``fairness_measure.py`` on tree ``src``, in a fresh interpreter."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONOS_")}
    env["PYTHONPATH"] = str(src)
    knobs = ("bookings", "samples", "warmup", "trials")
    argv = [sys.executable, str(HERE / "fairness_measure.py")]
    argv += [a for k in knobs for a in (f"--{k}", str(getattr(args, k)))]
    proc = subprocess.run(argv, env=env, capture_output=True, text=True, timeout=1800)
    if proc.returncode != 0:
        raise SystemExit(f"the measurement of {src} failed:\n{proc.stderr[-2000:]}")
    result: dict[str, Any] = json.loads(proc.stdout.splitlines()[-1])
    if not result["module"].startswith(str(src)):
        raise SystemExit(f"measured {result['module']}, not the tree {src}")
    rows: dict[str, list[float]] = result["rows"]
    return rows


def run_baseline(args: Any) -> int:
    trees = {"baseline": args.baseline.resolve(), "this tree": HERE_SRC}
    seen: dict[str, dict[str, list[tuple[float, float]]]] = {name: {} for name in trees}
    for round_no in range(args.rounds):
        order = list(trees.items())
        for name, src in order if round_no % 2 == 0 else reversed(order):
            for label, samples in one_tree(src, args).items():
                ordered = sorted(samples)
                p50, p99 = C.percentile(ordered, 50), C.percentile(ordered, 99)
                seen[name].setdefault(label, []).append((p50, p99))
        print(f"round {round_no + 1}/{args.rounds} done", flush=True)
    rows = []
    for label, before_rounds in seen["baseline"].items():
        for q, name in ((0, "p50"), (1, "p99")):
            before = statistics.median(r[q] for r in before_rounds) * 1000
            after = statistics.median(r[q] for r in seen["this tree"][label]) * 1000
            rows.append([f"{label}, {name} ms", f"{before:.2f}", f"{after:.2f}",
                         f"{after / before:.2f}"])  # fmt: skip
    table = C.md_table(["figure (median of rounds)", "baseline", "this tree", "ratio"], rows)
    print(table)
    if not args.no_doc:
        C.update_section("fairness-compare", render_compare(args, table))
        print(f"\nupdated {C.DOC.relative_to(C.ROOT)} (section fairness-compare)")
    return 0


def render_compare(args: Any, table: str) -> str:
    return "\n".join(
        [
            "### Fair sharing before and after (`bench_fairness.py --baseline`)",
            "",
            f"{args.rounds} rounds, baseline and this tree alternated in each (which goes "
            f"first alternates by round); {args.bookings:,} bookings as above; "
            f"{args.samples} admissions after {args.warmup} warm-up per row, {args.trials} "
            f"grants; baseline: {args.label or args.baseline}. Each tree runs "
            "`benchmarks/fairness_measure.py` (the public API only) in its own interpreter.",
            "",
            table,
            "",
            f"Machine: {C.machine_note()}.",
        ]
    )


# ------------------------------------------------------------- queue flood, long history

FLOOD_USERS = 50
FLOOD_POLICY = """\
[limits.default]
max_waiting = 1000
"""


def seed_flood(ledger_path: Path, waiters: int, history: int, now: float) -> None:
    """``history`` ended partitions of FLOOD_USERS users over the last 30 days (with their
    events and usage aggregates), GPU 0 held for a day, and ``waiters`` requests waiting
    for it, written through the Ledger in one transaction (the API would fsync each)."""
    from chronos.devices import open_machine
    from chronos.ledger import Ledger, NewPartition
    from chronos.models import ACTIVE, RELEASED, PartitionRecord

    gpu0 = open_machine("simulated").devices[0]
    ledger = Ledger(ledger_path)
    parts = ledger.parts
    with ledger.transaction():
        for i in range(history):
            user = i % FLOOD_USERS
            start = now - 30 * 86400.0 + i * (30 * 86400.0 - 3600.0) / history
            record = PartitionRecord(
                id=f"h{i:07x}",
                device=gpu0.index,
                device_uuid=gpu0.uuid,
                device_total_bytes=gpu0.total_bytes,
                memory_bytes=gpu0.total_bytes // 4,
                uid=61000 + user,
                user=f"flood{user:02d}",
                created_at=start,
                starts_at=start,
                expires_at=start + 3600.0,
                state=RELEASED,
                ended_at=start + 1800.0,
                end_reason="released",
                kind="api",
            )
            parts.partitions.insert(record)
            parts.events.record(
                "created", at=start, partition=record.id, uid=record.uid, user=record.user
            )
            parts.events.record(
                "released", at=start + 1800.0, partition=record.id, uid=record.uid, user=record.user
            )
            parts.history.bump(start, record.user, created=1)
            parts.history.account_end(record)
        ledger.parts.partitions.insert(
            PartitionRecord(
                id="blocker0",
                device=gpu0.index,
                device_uuid=gpu0.uuid,
                device_total_bytes=gpu0.total_bytes,
                memory_bytes=gpu0.total_bytes,
                uid=0,
                user="root",
                created_at=now,
                starts_at=now,
                expires_at=now + 86400.0,
                state=ACTIVE,
                kind="api",
            )
        )
    for i in range(waiters):
        user = i % FLOOD_USERS
        request = NewPartition(
            device=gpu0.index,
            device_uuid=gpu0.uuid,
            device_total_bytes=gpu0.total_bytes,
            capacity_bytes=gpu0.total_bytes,
            memory_bytes=int(gpu0.total_bytes * (0.1, 0.25, 0.5)[i % 3]),
            uid=61000 + user,
            user=f"flood{user:02d}",
            duration_s=(600.0, 3600.0, 7200.0)[i % 3],
        )
        ledger.enqueue(request, None, None)
    ledger.close()


def _flood_waiter(conn: Any) -> None:
    from chronos import Partitioner

    with Partitioner() as client:
        while conn.recv() == "go":
            told: list[bool] = []

            def queued(status: dict[str, Any], told: list[bool] = told) -> None:
                if not told:
                    told.append(True)
                    conn.send("queued")

            p = client.create(1, 0.6, 60, persist=True, wait=True, on_wait=queued)
            conn.send((time.perf_counter(), p.id))


def flood_latency(samples: int, trials: int) -> tuple[list[float], list[float]]:
    """(enqueue latencies, grant-after-release latencies) with the flood in the queue."""
    from chronos import Partitioner

    enqueues = []
    with Partitioner() as client:
        for i in range(samples + 10):
            t0 = time.perf_counter()
            status = client.transport.call(
                "create", device=0, memory=0.3, duration=600, persist=True, wait=True
            )
            t1 = time.perf_counter()
            assert status["state"] == "waiting", status
            client.transport.call("cancel", id=status["ticket"])
            if i >= 10:
                enqueues.append(t1 - t0)
    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    worker = ctx.Process(target=_flood_waiter, args=(there,))
    worker.start()
    grants = []
    try:
        with Partitioner() as client:
            for i in range(trials + 3):
                blocker = client.create(1, 1.0, 600, persist=True)
                here.send("go")
                if here.recv() != "queued":
                    raise RuntimeError("the waiter did not queue")
                time.sleep(0.05)  # let it settle into its long poll
                client.release(blocker.id)
                t1 = time.perf_counter()
                granted_at, pid = here.recv()
                client.release(pid)
                if i >= 3:
                    grants.append(granted_at - t1)
    finally:
        here.send("stop")
        worker.join(10)
    return enqueues, grants


def run_flood(args: Any) -> int:
    rows: list[list[Any]] = []
    with C.fresh_env(None, GPUS) as (home, env):
        info = C.machine_info(home)
        (home / "config.toml").write_text(FLOOD_POLICY)
        env = {k: v for k, v in env.items() if k != "CHRONOS_MODE"}
        os.environ.pop("CHRONOS_MODE", None)
        t0 = time.perf_counter()
        seed_flood(home / "ledger.db", args.flood_waiters, args.flood_history, time.time())
        print(f"seeded in {time.perf_counter() - t0:.1f} s", flush=True)
        with C.DaemonProcess(home, env) as daemon:
            os.environ["CHRONOS_MODE"] = "daemon"
            C.banner(
                f"{args.flood_waiters:,} waiting, {args.flood_history:,} past partitions, "
                "through chronosd"
            )
            enqueues, grants = flood_latency(args.samples, args.trials)
            rows.append(C.stat_row("enqueue (`create --wait` that queues)", enqueues))
            rows.append(C.stat_row("grant, from `release` returned", grants))
            print(C.text_table(C.STAT_HEADERS, rows), flush=True)
            daemon.report_errors()
    if not args.no_doc:
        C.update_section("fairness-flood", render_flood(args, info, rows))
        print(f"\nupdated {C.DOC.relative_to(C.ROOT)} (section fairness-flood)")
    return 0


def render_flood(args: Any, info: dict[str, str], rows: list[list[Any]]) -> str:
    return "\n".join(
        [
            "### Queue flood with long history (`bench_fairness.py --flood-only`)",
            "",
            f"The ledger holds {args.flood_history:,} ended partitions of {FLOOD_USERS} users "
            f"(the last 30 days) and {args.flood_waiters:,} requests of those users waiting "
            "for GPU 0, which a partition holds for a day (policy: `max_waiting = 1000`). "
            f"Through chronosd: {args.samples} enqueues of another request on GPU 0 (each "
            "cancelled, untimed), and "
            f"{args.trials} grants on GPU 1: a waiting `create(1, 0.6, wait=True)` in another "
            "process, timed from the blocker's `release` returning to that `create` "
            "returning. Every change plans the whole queue (the first 100 waiters in "
            "priority order get reservations). The target is 20 ms p99.",
            "",
            C.machine_markdown(info),
            "",
            C.md_table(C.STAT_HEADERS, rows),
        ]
    )


# --------------------------------------------------------------------------- main


def main() -> int:
    parser = C.base_parser(__doc__.split("\n", 1)[0])
    parser.add_argument("--bookings", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=300, help="admissions per row")
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--trials", type=int, default=40, help="grant-latency trials")
    parser.add_argument("--flood-waiters", type=int, default=1000)
    parser.add_argument("--flood-history", type=int, default=100_000)
    parser.add_argument(
        "--flood-only", action="store_true", help="run only the queue-flood measurement"
    )
    parser.add_argument(
        "--baseline", type=Path, help="another tree's src/: both side by side, with ratios"
    )
    parser.add_argument("--rounds", type=int, default=3, help="rounds of --baseline")
    parser.add_argument("--label", default="", help="what the baseline is (for the doc)")
    args = parser.parse_args()
    if args.flood_only:
        return run_flood(args)
    if args.baseline is not None:
        return run_baseline(args)
    from chronos import Partitioner

    admission: list[list[Any]] = []
    grants: list[list[Any]] = []
    profile = ""
    info: dict[str, str] = {}
    meter = None
    for count in (0, args.bookings):
        label = f"{count:,} bookings"
        with C.fresh_env("embedded", GPUS) as (home, env):
            if not info:
                info = C.machine_info(home)
                meter = C.LoadMeter()
            (home / "config.toml").write_text(POLICY)
            with Partitioner() as client:
                client.create(0, 0.1, 60, persist=True).release()  # creates the ledger
            if count:
                add_bookings(home / "ledger.db", count, time.time())
            C.banner(f"admission, embedded, {label}")
            with Partitioner() as client:
                admission.append(
                    C.stat_row(
                        f"embedded, admin (no quotas), {label}",
                        time_admissions(client, args.samples, args.warmup),
                    )
                )
                print(C.text_table(C.STAT_HEADERS, admission[-1:]), flush=True)
            with Partitioner() as client:
                as_ordinary_user(client)
                admission.append(
                    C.stat_row(
                        f"embedded, user under quotas, {label}",
                        time_admissions(client, args.samples, args.warmup),
                    )
                )
                print(C.text_table(C.STAT_HEADERS, admission[-1:]), flush=True)
                if args.profile and count:
                    profile = C.profile_summary(time_admissions, client, 100, 0, top=25)
                    print(profile)
            env = {k: v for k, v in env.items() if k != "CHRONOS_MODE"}
            os.environ.pop("CHRONOS_MODE", None)
            with C.DaemonProcess(home, env) as daemon:
                os.environ["CHRONOS_MODE"] = "daemon"
                C.banner(f"admission and grant latency through chronosd, {label}")
                with Partitioner() as client:
                    assert client.mode == "daemon"
                    admission.append(
                        C.stat_row(
                            f"chronosd, admin (no quotas), {label}",
                            time_admissions(client, args.samples, args.warmup),
                        )
                    )
                    print(C.text_table(C.STAT_HEADERS, admission[-1:]), flush=True)
                after_return, after_call = grant_latency(args.trials)
                grants.append(C.stat_row(f"from `release` returned, {label}", after_return))
                grants.append(C.stat_row(f"from `release` called, {label}", after_call))
                print(C.text_table(C.STAT_HEADERS, grants[-2:]), flush=True)
                daemon.report_errors()
    assert meter is not None
    info["other processes during the run"] = f"{meter.others():.0%} CPU busy"
    print(f"other processes kept the CPUs {info['other processes during the run']}")
    if not args.no_doc:
        C.update_section("fairness", render(args, info, admission, grants))
        print(f"\nupdated {C.DOC.relative_to(C.ROOT)} (section fairness)")
    return 0


def render(
    args: Any, info: dict[str, str], admission: list[list[Any]], grants: list[list[Any]]
) -> str:
    return "\n".join(
        [
            "## Fair sharing (`bench_fairness.py`)",
            "",
            f"Two simulated 80 GiB GPUs. The ledger holds {args.bookings:,} one-hour bookings "
            f"of a quarter GPU ({USERS} users, alternating GPUs, spread over the next 300 "
            "days, none overlapping the timed requests), or none. Policy: per-user limits "
            "(max_share, max_total_share, max_duration, GPU-hours per day and week); "
            "administrators (root runs the benchmark) are exempt, so the quota rows act as "
            "an ordinary user who owns 1/20 of the bookings.",
            "",
            C.machine_markdown(info),
            "",
            f"### Admission: `create(0, 0.25, 1h)` ({args.samples} after {args.warmup} warm-up; "
            "each released, untimed)",
            "",
            C.md_table(C.STAT_HEADERS, admission),
            "",
            f"### Grant latency after a release ({args.trials} trials, through chronosd)",
            "",
            "A blocker holds all of GPU 0; another process waits in `create(0, 0.6, 60, "
            "wait=True)` (a long poll on the daemon); the blocker is released. Time from the "
            "`release` call returning (or being called) to the waiting `create` returning in "
            "the other process. The target is 100 ms.",
            "",
            C.md_table(C.STAT_HEADERS, grants),
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
