"""Expiry accuracy: when does a partition's process get SIGTERM, relative to ``expires_at``?

Run: .venv/bin/python benchmarks/bench_expiry.py [--partitions 120] [--no-doc]

A real ``chronosd`` runs on a temporary state directory. The script forks one
small helper process per partition before it connects (each helper installs a
SIGTERM handler that writes ``time.time()`` at delivery to a shared pipe, then
exits), creates persist=True partitions that all start at one instant ``base``
a few seconds ahead and end at ``base`` + 1.0–3.0 s (most at distinct instants
25 ms apart, some in groups ending at exactly the same instant), attaches each
helper with ``Partition.attach(pid)``, and waits. Error = delivery time −
``expires_at``, per partition. A partition whose helper got no SIGTERM within
``--timeout`` seconds of its end counts as missed.

The daemon's own log splits the error: ``lateness_ms`` (and time) of its
``expired`` event, written when its timer fired and the ledger ended the
partition, just before it finds the partition's processes and signals them.
"""

from __future__ import annotations

import contextlib
import json
import os
import select
import signal
import sys
import time
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

from chronos import procs  # noqa: E402

TARGET_P99_MS = 50.0
PREVIOUS_MEAN_MS = 913.0


# ------------------------------------------------------------------- helpers


def spawn_helper(write_fd: int, read_fd: int) -> int:
    """Fork a process that reports the moment SIGTERM reaches it on ``write_fd``."""
    pid = os.fork()
    if pid:
        return pid
    # child
    try:
        os.close(read_fd)
        procs.set_parent_death_signal(signal.SIGKILL)  # gone if the benchmark dies first

        def on_term(signum: int, frame: Any) -> None:
            at = time.time()
            os.write(write_fd, f"{os.getpid()} {at:.6f}\n".encode())  # < PIPE_BUF: atomic
            os._exit(0)

        signal.signal(signal.SIGTERM, on_term)
        signal.signal(signal.SIGINT, signal.SIG_IGN)
        while True:
            signal.pause()
    finally:
        os._exit(1)


def offsets_plan(n: int, groups: int, group_size: int) -> list[float]:
    """Seconds after ``base`` at which each partition ends: singles over 1.0–3.0 s, then groups.

    Singles are evenly spaced; each group's members end at one identical instant,
    placed between two singles (and the last group at 3.0 s).
    """
    grouped = min(n, groups * group_size)
    singles = n - grouped
    out = [1.0 + 2.0 * k / max(1, singles) for k in range(singles)]
    step = 2.0 / max(1, singles)
    for g in range(groups):
        at = 3.0 if g == groups - 1 else 1.0 + 2.0 * (g + 1) / groups + step / 2
        out += [at] * min(group_size, grouped - g * group_size)
    return out


def read_deliveries(read_fd: int, want: int, until: float) -> dict[int, float]:
    got: dict[int, float] = {}
    buf = b""
    while len(got) < want:
        left = until - time.time()
        if left <= 0:
            break
        ready, _, _ = select.select([read_fd], [], [], min(left, 0.5))
        if not ready:
            continue
        chunk = os.read(read_fd, 65536)
        if not chunk:
            break
        buf += chunk
        *lines, buf = buf.split(b"\n")
        for line in lines:
            pid, at = line.split()
            got[int(pid)] = float(at)
    return got


def daemon_events(log_path: Path) -> tuple[dict[str, float], dict[str, float]]:
    """``{partition: lateness_ms}`` and ``{partition: ts}`` of the daemon's 'expired' events."""
    lateness: dict[str, float] = {}
    logged: dict[str, float] = {}
    try:
        lines = log_path.read_text().splitlines()
    except OSError:
        return lateness, logged
    for line in lines:
        try:
            event = json.loads(line)
        except json.JSONDecodeError:
            continue
        if not isinstance(event, dict) or "partition" not in event:
            continue
        if event.get("event") == "expired" and event.get("lateness_ms") is not None:
            lateness[event["partition"]] = float(event["lateness_ms"])
            logged[event["partition"]] = float(event["ts"])
    return lateness, logged


# ----------------------------------------------------------------------- run


def run(n: int, groups: int, group_size: int, timeout: float) -> dict[str, Any]:
    from chronos import Partitioner

    offsets = offsets_plan(n, groups, group_size)
    read_fd, write_fd = os.pipe()
    helpers = [spawn_helper(write_fd, read_fd) for _ in offsets]
    os.close(write_fd)
    t_setup = time.time()
    try:
        with Partitioner() as client:
            assert client.mode == "daemon", client.mode
            # Leave time to create and attach everything before the first end.
            base = time.time() + 1.0 + 0.015 * n
            parts = []
            for off, pid in zip(offsets, helpers):
                p = client.create(0, 1e-6, off, start=base, persist=True, grace="5s")
                p.attach(pid)
                parts.append((p.id, p.record.expires_at, pid, off))
            setup_s = time.time() - t_setup
            margin = base + min(offsets) - time.time()
            last_end = max(e for _, e, _, _ in parts)
            got = read_deliveries(read_fd, len(parts), last_end + timeout)
            # Every partition must have ended; a still-open one would be a bug.
            still_open = [p.id for p in client.list()]
    finally:
        os.close(read_fd)
        for pid in helpers:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in helpers:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)
    return {
        "parts": parts,
        "got": got,
        "setup_s": setup_s,
        "margin_s": margin,
        "still_open": still_open,
        "base": base,
    }


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--partitions", type=int, default=120)
    parser.add_argument(
        "--groups",
        type=int,
        default=4,
        help="groups of partitions that end at one identical instant",
    )
    parser.add_argument("--group-size", type=int, default=10)
    parser.add_argument(
        "--timeout",
        type=float,
        default=10.0,
        help="seconds after an end before its SIGTERM counts as missed",
    )
    args = parser.parse_args()
    if args.partitions < 1:
        parser.error("--partitions must be at least 1")

    info: dict[str, str] = {}
    meter: C.LoadMeter | None = None
    results = []
    scenarios = [("mixed", args.groups), ("distinct", 0)]
    if args.groups == 0:
        scenarios = scenarios[1:]
    for name, groups in scenarios:
        with C.fresh_env("daemon") as (home, env):
            if meter is None:
                info = C.machine_info(home)
                meter = C.LoadMeter()
            t0 = time.time()
            profile = home / "daemon.prof" if args.profile and name == "mixed" else None
            with C.DaemonProcess(home, env, profile=profile) as daemon:
                how = daemon.how
                print(f"\n[{name}] chronosd pid {daemon.pid}, started as {how}")
                r = run(args.partitions, groups, args.group_size, args.timeout)
                daemon.report_errors()
            lateness, logged = daemon_events(daemon.log_path)
            if profile is not None and profile.exists():
                import pstats

                stats = pstats.Stats(str(profile)).strip_dirs()
                stats.sort_stats("cumulative").print_stats(25)
        r["runtime"] = time.time() - t0
        res = analyze(name, r, lateness, logged)
        results.append(res)
        C.banner(f"[{name}] expiry error: SIGTERM delivery − expires_at (ms)")
        print(C.text_table(C.STAT_HEADERS, res["rows"]))
        print(res["summary"])
        if r["margin_s"] < 0:
            print("warning: setup ran past the first expiry; raise the lead time")

    assert meter is not None
    info["other processes during the run"] = f"{meter.others():.0%} CPU busy"
    print(f"other processes kept the CPUs {info['other processes during the run']}")
    if not args.no_doc:
        C.update_section("expiry", render(args, info, how, results))
        print(f"\nupdated {C.DOC.relative_to(C.ROOT)} (section expiry)")
    return 0 if all(res["missed"] == 0 for res in results) else 1


def analyze(
    name: str, r: dict[str, Any], lateness: dict[str, float], logged: dict[str, float]
) -> dict[str, Any]:
    errors_all, errors_single, errors_group, errors_daemon, errors_stop = [], [], [], [], []
    by_instant: dict[float, list[str]] = {}
    for pid_id, _, _, off in r["parts"]:
        by_instant.setdefault(off, []).append(pid_id)
    missed = 0
    early = 0
    for pid_id, expires_at, pid, off in r["parts"]:
        if pid not in r["got"]:
            missed += 1
            continue
        err = r["got"][pid] - expires_at
        early += err < 0
        errors_all.append(err)
        (errors_group if len(by_instant[off]) > 1 else errors_single).append(err)
        if pid_id in lateness:
            errors_daemon.append(lateness[pid_id] / 1000.0)
        if pid_id in logged:
            errors_stop.append(r["got"][pid] - logged[pid_id])

    groups = sum(1 for v in by_instant.values() if len(v) > 1)
    # Partitions that end together are stopped one after another: the gaps between
    # their deliveries are the stop path's cost per partition.
    delivered_at = {pid_id: r["got"][pid] for pid_id, _, pid, _ in r["parts"] if pid in r["got"]}
    gaps = []
    for ids in by_instant.values():
        times = sorted(delivered_at[i] for i in ids if i in delivered_at)
        gaps += [b - a for a, b in zip(times, times[1:])]
    tag = "mixed" if groups else "distinct"
    rows = [C.stat_row(f"{tag}: all partitions", errors_all)]
    if groups:
        rows += [
            C.stat_row(f"{tag}: alone at their instant", errors_single),
            C.stat_row(f"{tag}: in groups ending together ({groups} groups)", errors_group),
        ]
    rows += [
        C.stat_row(f"{tag}, part: expires_at → daemon logged `expired`", errors_daemon),
        C.stat_row(f"{tag}, part: `expired` logged → handler ran", errors_stop),
    ]
    if groups:
        rows.append(C.stat_row(f"{tag}: gap between deliveries within a group", gaps))
    s = C.summarize(errors_all)
    n = len(r["parts"])
    verdict = "meets" if s["p99"] < TARGET_P99_MS and missed == 0 else "misses"
    summary = (
        f"{tag}: {n} partitions, {missed} missed, {early} signalled before expires_at, "
        f"{len(r['still_open'])} still open afterwards; setup {r['setup_s']:.1f} s, "
        f"runtime {r['runtime']:.0f} s. p99 {s['p99']:.1f} ms {verdict} the "
        f"{TARGET_P99_MS:.0f} ms target; mean {s['mean']:.1f} ms (vs {PREVIOUS_MEAN_MS:.0f} "
        "ms before)."
    )
    return {
        "name": name,
        "rows": rows,
        "summary": summary,
        "missed": missed,
        "n": n,
        "groups": groups,
    }


def render(args: Any, info: dict[str, str], how: str, results: list[dict[str, Any]]) -> str:
    n = args.partitions
    singles = n - min(n, args.groups * args.group_size)
    rows = [row for res in results for row in res["rows"]]
    return "\n".join(
        [
            "## Expiry accuracy (`bench_expiry.py`)",
            "",
            f"A real `chronosd` (started as {how}), {n} persist=True partitions, one "
            "forked helper process attached to each (`Partition.attach(pid)`) whose SIGTERM "
            "handler records `time.time()`. All partitions start at one instant a few seconds "
            "ahead (`start=`) and end 1.0–3.0 s later. Two runs, each on a fresh daemon: "
            f"**mixed**: {singles} end at distinct instants {2000 / max(1, singles):.0f} ms "
            f"apart, plus {args.groups} groups of {args.group_size} ending at exactly the same "
            f"instant; **distinct**: all {n} at distinct instants {2000 / n:.0f} ms apart. "
            "Error = SIGTERM delivery time − `expires_at`; target p99 < "
            f"{TARGET_P99_MS:.0f} ms (the implementation this replaced: "
            f"{PREVIOUS_MEAN_MS:.0f} ms mean error).",
            "",
            C.machine_markdown(info),
            "",
            C.md_table(C.STAT_HEADERS, rows),
            "",
            *[f"- {res['summary']}" for res in results],
            "",
            "The two `part:` rows split the error at the daemon's `expired` log line "
            "(its `lateness_ms`: written once its timer fired and the ledger ended the "
            "partition, just before it looks up the partition's processes and signals them). "
            "Partitions ending together are ended in one transaction and then signalled one "
            "after another: the gap between successive deliveries within a group is the "
            "daemon's cost per partition on the stop path.",
        ]
    )


if __name__ == "__main__":
    sys.exit(main())
