"""The fair-sharing measurements, written against Chronos's public API only, so they run on
any tree: this one (``bench_fairness.py`` imports them) and an older one (``bench_fairness.py
--baseline <src>`` runs this file in a fresh interpreter whose ``PYTHONPATH`` puts that
tree's ``chronos`` first, and compares).

Nothing here imports the benchmarks' or the tests' helpers (they import this tree's
Chronos); the bookings are written with plain SQL, in the columns every ledger schema
since 3 has, so the same rows land in an old ledger and a new one.

Run on its own (what ``--baseline`` does, once per tree and round):
``PYTHONPATH=<src> python benchmarks/fairness_measure.py --bookings 10000`` prints JSON:
each row's samples in seconds, and which ``chronos`` was measured.
"""

from __future__ import annotations

import argparse
import json
import multiprocessing as mp
import os
import shutil
import signal
import sqlite3
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

GPUS = "80GiB,80GiB"
USERS = 20
SPAN_S = 300 * 86400.0
"""Bookings start over the next 300 days (a year is the most one may book ahead)."""
BOOKED_FRACTION = 0.25
POLICY = """\
[limits.default]
max_share = 0.5
max_total_share = 1.0
max_duration = "8h"
max_gpu_hours_day = 24
max_gpu_hours_week = 100
"""

# ------------------------------------------------------------------------ bookings

_BOOKING = (
    "INSERT INTO partitions (id, device, device_uuid, device_total_bytes, memory_bytes, uid, "
    "user, created_at, starts_at, expires_at, state, kind) "
    "VALUES (?, ?, ?, ?, ?, ?, ?, ?, ?, ?, 'booked', 'api')"
)


def add_bookings(ledger_path: Path, count: int, now: float) -> None:
    """``count`` one-hour bookings of a quarter GPU, alternating GPUs, none overlapping,
    in one transaction (the API would fsync each): rows admission would have accepted."""
    from chronos.devices import open_machine

    devices = open_machine("simulated").devices
    per_device = (count + len(devices) - 1) // len(devices)
    step = SPAN_S / per_device
    rows = []
    for i in range(count):
        dev = devices[i % len(devices)]
        start = now + 2 * 3600.0 + (i // len(devices)) * step
        user = i % USERS
        nbytes = int(dev.total_bytes * BOOKED_FRACTION)
        rows.append(
            (f"b{i:07x}", dev.index, dev.uuid, dev.total_bytes, nbytes, 60000 + user,
             f"bench{user:02d}", now, start, start + 3600.0)
        )  # fmt: skip
    db = sqlite3.connect(ledger_path, isolation_level=None)
    try:
        db.execute("BEGIN IMMEDIATE")
        db.executemany(_BOOKING, rows)
        db.execute("COMMIT")
    finally:
        db.close()


# ----------------------------------------------------------------------- admission


def time_admissions(client: Any, samples: int, warmup: int) -> list[float]:
    out = []
    for i in range(warmup + samples):
        t0 = time.perf_counter()
        p = client.create(0, 0.25, 3600, persist=True)
        t1 = time.perf_counter()
        p.release()
        if i >= warmup:
            out.append(t1 - t0)
    return out


def as_ordinary_user(client: Any) -> Any:
    """Make an embedded client act as bench00, an ordinary user (quotas apply)."""
    from chronos.identity import Caller

    client.transport.caller = Caller(60000, 60000, None, "bench00", False)
    return client


# --------------------------------------------------------------------- grant latency


def _waiter(conn: Any) -> None:
    from chronos import Partitioner

    with Partitioner() as client:
        while conn.recv() == "go":
            p = client.create(0, 0.6, 60, persist=True, wait=True)
            conn.send((time.perf_counter(), p.id))


def grant_latency(trials: int) -> tuple[list[float], list[float]]:
    """(from release returned, from release called) to the waiter's create returning."""
    from chronos import Partitioner

    ctx = mp.get_context("fork")
    here, there = ctx.Pipe()
    worker = ctx.Process(target=_waiter, args=(there,))
    worker.start()
    after_return, after_call = [], []
    try:
        with Partitioner() as client:
            for i in range(trials + 3):
                blocker = client.create(0, 1.0, 600, persist=True)
                here.send("go")
                deadline = time.monotonic() + 10
                while not client.queue():
                    if time.monotonic() > deadline:
                        raise RuntimeError("the waiter never joined the queue")
                    time.sleep(0.002)
                time.sleep(0.02)  # let it settle into its long poll
                t0 = time.perf_counter()
                client.release(blocker.id)
                t1 = time.perf_counter()
                granted_at, pid = here.recv()
                client.release(pid)
                if i >= 3:  # warm-up
                    after_return.append(granted_at - t1)
                    after_call.append(granted_at - t0)
    finally:
        here.send("stop")
        worker.join(10)
    return after_return, after_call


# -------------------------------------------------------------- one tree, on its own


def tree_env(home: Path, src: Path | None = None, gpus: str = GPUS) -> dict[str, str]:
    """A fresh simulated environment in ``home`` (``src``: whose ``chronos`` to run), its
    chronosd socket there too (bench_compare.py and bench_work.py start from this)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONOS_")}
    env.pop("PYTHONDONTWRITEBYTECODE", None)  # as installed: compiled modules cached
    env.update(
        CHRONOS_BACKEND="simulated",
        CHRONOS_SIMULATED_GPUS=gpus,
        CHRONOS_HOME=str(home),
        CHRONOS_SOCKET=str(home / "chronosd.sock"),
        CHRONOS_CONFIG=str(home / "config.toml"),
    )
    if src is not None:
        env["PYTHONPATH"] = str(src)
    return env


def start_daemon(state_dir: Path, sock: Path, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """A chronosd of whichever tree ``env``'s PYTHONPATH names, once its socket is there
    (bench_compare.py starts its daemons through this too)."""
    daemon = subprocess.Popen(
        [sys.executable, "-m", "chronos.daemon.main", "--state-dir", str(state_dir),
         "--socket", str(sock)],
        env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL,
    )  # fmt: skip
    deadline = time.monotonic() + 30
    while not sock.exists():
        if daemon.poll() is not None or time.monotonic() > deadline:
            raise SystemExit(f"chronosd ({env.get('PYTHONPATH', 'this tree')}) did not start")
        time.sleep(0.05)
    return daemon


def measure(home: Path, bookings: int, samples: int, warmup: int, trials: int) -> dict[str, Any]:
    """Every row for ``bookings`` bookings, in this interpreter's ``chronos`` (the
    environment of :func:`tree_env` already in ``os.environ``): samples in seconds."""
    from chronos import Partitioner

    label = f"{bookings:,} bookings"
    rows: dict[str, list[float]] = {}
    (home / "config.toml").write_text(POLICY)
    os.environ["CHRONOS_MODE"] = "embedded"
    with Partitioner() as client:
        client.create(0, 0.1, 60, persist=True).release()  # creates the ledger
    if bookings:
        add_bookings(home / "ledger.db", bookings, time.time())
    with Partitioner() as client:
        rows[f"embedded, admin (no quotas), {label}"] = time_admissions(client, samples, warmup)
    with Partitioner() as client:
        as_ordinary_user(client)
        rows[f"embedded, user under quotas, {label}"] = time_admissions(client, samples, warmup)
    env = {k: v for k, v in os.environ.items() if k != "CHRONOS_MODE"}
    daemon = start_daemon(home, home / "chronosd.sock", env)
    try:
        os.environ["CHRONOS_MODE"] = "daemon"
        with Partitioner() as client:
            assert client.mode == "daemon"
            rows[f"chronosd, admin (no quotas), {label}"] = time_admissions(client, samples, warmup)
        after_return, after_call = grant_latency(trials)
        rows[f"grant from `release` returned, {label}"] = after_return
        rows[f"grant from `release` called, {label}"] = after_call
    finally:
        daemon.send_signal(signal.SIGTERM)
        daemon.wait(30)
    import chronos

    return {"rows": rows, "module": chronos.__file__}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--bookings", type=int, default=10_000)
    parser.add_argument("--samples", type=int, default=300)
    parser.add_argument("--warmup", type=int, default=20)
    parser.add_argument("--trials", type=int, default=40)
    args = parser.parse_args()
    home = Path(tempfile.mkdtemp(prefix="chronos-fair-"))
    try:
        env = tree_env(home)  # PYTHONPATH, as given, names the tree
        os.environ.clear()
        os.environ.update(env)
        result = measure(home, args.bookings, args.samples, args.warmup, args.trials)
    finally:
        shutil.rmtree(home, ignore_errors=True)
    print(json.dumps(result))


if __name__ == "__main__":
    main()
