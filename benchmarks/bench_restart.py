"""Restart time against the ledger's age: does chronosd come back as fast with a long history?

Run: .venv/bin/python benchmarks/bench_restart.py [--sizes 0 100000 1000000] [--restarts 5]

For each size, one ledger is made through the daemon (one create and release, so it has
its schema and ``ledger.id``), then ``size`` ended partitions are added straight into
the database with two events each (``created``, ``released``) and, for every hundredth,
the ``warned`` and ``terminated`` events a daemon writes at an end, spread over the
last 60 days (inside the default retention: nothing is compacted away). The first
start after seeding builds the history aggregates once (a migration, reported apart);
then the daemon is stopped and started ``--restarts`` times, each timed from launch to
its first answered ``ping``. The sizes run side by side in one run, so the ratio to the
empty ledger is the figure that matters on a shared, noisy machine.
"""

from __future__ import annotations

import sqlite3
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import _common as C  # noqa: E402

from chronos.api import Partitioner  # noqa: E402

EVENT_COLUMNS = "at, kind, partition_id, uid, user, device_uuid, memory_bytes, detail"


def seed(ledger: Path, count: int) -> None:
    """``count`` ended partitions and their events, copied from the one the daemon made."""
    if not count:
        return
    C.fill_history(ledger, count)
    db = sqlite3.connect(ledger, timeout=30)
    try:
        now = time.time()
        rows = db.execute(
            "SELECT id, uid, user, device_uuid, memory_bytes FROM partitions WHERE id LIKE 'h%'"
        ).fetchall()
        spread = 60 * 86400.0 / max(1, len(rows))
        events = []
        for n, (pid, uid, user, uuid, nbytes) in enumerate(rows):
            at = now - 60 * 86400.0 + n * spread
            base = (pid, uid, user, uuid, nbytes)
            events.append((at, "created", *base, "{}"))
            events.append((at + 600, "released", *base, '{"reason": "released"}'))
            if n % 100 == 0:
                events.append((at + 500, "warned", pid, None, None, None, None, "{}"))
                events.append((at + 600, "terminated", pid, None, None, None, None, "{}"))
        with db:
            db.execute(
                "UPDATE partitions SET created_at = ?, starts_at = ?, expires_at = ?, "
                "ended_at = ? WHERE id LIKE 'h%'",
                (now - 30 * 86400.0, now - 30 * 86400.0, now - 30 * 86400.0 + 900, now - 29e5),
            )
            db.executemany(
                f"INSERT INTO events ({EVENT_COLUMNS}) VALUES (?, ?, ?, ?, ?, ?, ?, ?)", events
            )
    finally:
        db.close()


def timed_start(daemon: C.DaemonProcess) -> float:
    started = time.perf_counter()
    daemon.start(timeout=600)
    return time.perf_counter() - started


def measure(size: int, restarts: int) -> dict[str, object]:
    with C.fresh_env(None) as (home, env):
        daemon = C.DaemonProcess(home, env).start()
        client = Partitioner()
        client.create(device=0, memory=0.01, duration=60, persist=True).release()
        client.close()
        daemon.stop()
        seed(home / "ledger.db", size)
        first = timed_start(daemon)
        daemon.stop()
        times = []
        for _ in range(restarts):
            times.append(timed_start(daemon))
            daemon.stop()
        size_mb = sum(p.stat().st_size for p in home.glob("ledger.db*")) / 1e6
    return {"size": size, "first": first, "times": times, "ledger_mb": size_mb}


def main() -> int:
    parser = C.base_parser(__doc__ or "")
    parser.add_argument("--sizes", type=int, nargs="+", default=[0, 100_000, 1_000_000])
    parser.add_argument("--restarts", type=int, default=5)
    args = parser.parse_args()
    info = C.machine_info()
    results = [measure(size, args.restarts) for size in args.sizes]
    base = C.summarize(results[0]["times"])["p50"]  # type: ignore[arg-type]
    rows = []
    for r in results:
        s = C.summarize(r["times"])  # type: ignore[arg-type]
        rows.append(
            [
                f"{r['size']:,}",
                f"{r['ledger_mb']:.0f}",
                C.fmt(float(r["first"]) * 1000, 0),  # type: ignore[arg-type]
                C.fmt(s["p50"]),
                C.fmt(s["max"]),
                f"{s['p50'] / base:.2f}x",
            ]
        )
    headers = [
        "ended partitions",
        "ledger MB",
        "first start ms (builds aggregates)",
        "restart p50 ms",
        "restart max ms",
        "p50 / empty",
    ]
    print(C.text_table(headers, rows))
    if not args.no_doc:
        body = (
            "## Restart against the ledger's age (`bench_restart.py`)\n\n"
            f"{(__doc__ or '').split(chr(10), 2)[2].strip()}\n\n"
            f"{C.machine_markdown(info)}\n\n"
            f"{C.md_table(headers, rows)}\n"
        )
        C.update_section("restart", body)
    return 0


if __name__ == "__main__":
    sys.exit(main())
