"""Adversarial load: is chronosd still there for everyone while one user attacks it?

Run (as root: it creates two test accounts): .venv/bin/python benchmarks/bench_adversarial.py
[--phase-s 8] [--history 100000] [--no-doc]

One real ``chronosd`` (simulated GPUs, built-in policy defaults) on a ledger
seeded, before the daemon starts, with ``--history`` ended partitions written
through ``chronos.ledger.Ledger`` (3,000 of them the attacker's, the rest spread
over 49 other uids). Then, phase by phase, the attacker (an ordinary account,
``chronos_t_alice``, through ``setpriv``) runs one attack for ``--phase-s``
seconds, and meanwhile, side by side with a quiet baseline phase of the same run:

* the victim (another ordinary account, ``chronos_t_bob``) connects and calls
  ``list`` every 50 ms, as ``chronos list`` does; the latency is measured in the
  victim's process (client-side), a failed call counts as failed;
* four partitions (root's, each with a helper process attached that writes
  ``time.time()`` when SIGTERM reaches it) fall due during the attack; lateness
  is delivery time minus ``expires_at``;
* the daemon's RSS (``VmRSS``) is sampled every 0.2 s.

Attacks: parser bait (1,080-byte ``create`` with duration ``"1"*1000+"x"``, and a
20 KB memory string), 2,000 idle connections (held; the daemon refuses all but
the per-user limit), connect churn (the same, but every refused connection is
reopened at once: the attacker keeps the listen backlog that all users share full),
half-sent frames (900 connections announcing 1 MiB and sending 1 MiB − 1, plus 60
announcing 64 KiB and sending 64 KiB − 1), a queue flood within quota (the
policy's ``max_waiting``: cancel one, enqueue one, as fast as it can, on a full
GPU), a booking flood within quota (``max_bookings`` 1 s bookings of a 1e-9
share, release one, book one), fuzzing (random frames on one connection), and
``usage`` over the long history, in a loop.

Targets (issue "Trust"): under every attack the victim's ``list`` p99 < 50 ms,
expiry lateness < 20 ms, the daemon's RSS < 200 MB.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import subprocess
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import _common as C  # noqa: E402
from bench_expiry import read_deliveries, spawn_helper  # noqa: E402

ATTACKER, VICTIM = "chronos_t_alice", "chronos_t_bob"
TARGET_LIST_P99_MS, TARGET_LATENESS_MS, TARGET_RSS_MB = 50.0, 20.0, 200.0
EXPIRIES_PER_PHASE = 4
PROBE_PERIOD_S = 0.05

# --------------------------------------------------------------- attack scripts
# Each runs as the attacker: argv = socket, seconds, then its own; it prints "ready"
# once the attack is under way, runs until its time is up, then prints a JSON summary.

PRELUDE = r"""
import json, os, random, selectors, socket, struct, sys, time
path, seconds = sys.argv[1], float(sys.argv[2])
end = time.monotonic() + 3600
def connect():
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(30)
    s.connect(path)
    return s
def call(s, message, raw=None):
    body = raw if raw is not None else json.dumps(message).encode()
    s.sendall(struct.pack(">I", len(body)) + body)
    (n,) = struct.unpack(">I", s.recv(4, socket.MSG_WAITALL))
    return json.loads(s.recv(n, socket.MSG_WAITALL))
def req(op, **args):
    return {"v": 1, "op": op, "args": args}
def done(**summary):
    print(json.dumps(summary), flush=True)
def ready_then_go():
    # Set up, say so, then wait for "go": the benchmark creates its expiries meanwhile.
    global end
    print("ready", flush=True)
    sys.stdin.readline()
    end = time.monotonic() + seconds
"""

PARSE = r"""
s, sent = connect(), 0
bait = [req("create", device=0, memory="1%", duration="1" * 1000 + "x", persist=True),
        req("create", device=0, memory="9" * 20000, duration=60, persist=True),
        req("create", device=0, memory="1%", duration=60, grace="1" * 1000 + "x", persist=True),
        req("extend", id="x", duration="1" * 1000 + "x")]
ready_then_go()
while time.monotonic() < end:
    call(s, bait[sent % len(bait)])
    sent += 1
done(requests=sent)
"""

IDLE = r"""
count, churn, opened = int(sys.argv[3]), sys.argv[4] == "churn", 0
poller, live = selectors.DefaultSelector(), 0
def open_one():
    global opened, live
    try:
        s = connect()
    except OSError:
        return
    s.setblocking(False)
    poller.register(s, selectors.EVENT_READ)
    opened += 1
    live += 1
for _ in range(count):
    open_one()
ready_then_go()
while time.monotonic() < end:
    for key, _ in poller.select(0.2):
        poller.unregister(key.fileobj)
        key.fileobj.close()
        live -= 1
        if churn:
            open_one()  # refused or cut off: straight back in
done(connections_opened=opened, held_at_end=live)
"""

HALF = r"""
socks, refused = [], 0
for announce, count in ((1 << 20, 900), (64 << 10, 60)):
    for _ in range(count):
        try:
            s = connect()
            s.settimeout(2)
            s.sendall(struct.pack(">I", announce) + b"x" * (announce - 1))
        except OSError:
            refused += 1
        socks.append(s)
ready_then_go()
time.sleep(max(0.0, end - time.monotonic()))
done(connections=len(socks), refused_while_sending=refused)
"""

QUEUE = r"""
limit, s, waiting, made, refused = int(sys.argv[3]), connect(), [], 0, 0
def enqueue():
    global made, refused
    r = call(s, req("create", device=0, memory=0.5, duration=60, wait=True, timeout=600))
    if r.get("ok") and r["result"].get("state") == "waiting":
        waiting.append(r["result"]["ticket"]); made += 1
    else:
        refused += 1
while len(waiting) < limit and refused < 3:
    enqueue()
ready_then_go()
while time.monotonic() < end:
    if waiting:
        call(s, req("cancel", id=waiting.pop(0)))
    enqueue()
for t in waiting:
    call(s, req("cancel", id=t))
done(enqueued=made, refused=refused)
"""

BOOK = r"""
limit, s, booked, made, refused = int(sys.argv[3]), connect(), [], 0, 0
def book():
    global made, refused
    start = time.time() + 3600 + random.random() * 86400
    r = call(s, req("create", device=made % 2, memory=1e-9, duration=1, start=start,
                    persist=True))
    if r.get("ok"):
        booked.append(r["result"]["id"]); made += 1
    else:
        refused += 1
while len(booked) < limit and refused < 3:
    book()
ready_then_go()
while time.monotonic() < end:
    if booked:
        call(s, req("release", id=booked.pop(0)))
    book()
for b in booked:
    call(s, req("release", id=b))
done(booked=made, refused=refused)
"""

FUZZ = r"""
rng, s, sent, codes = random.Random(7), connect(), 0, {}
ops = ["ping", "create", "wait", "cancel", "queue", "usage", "release", "get", "list",
       "stats", "attach", "attached_pids", "extend", "events"]
def value(depth=0):
    r = rng.random()
    if r < 0.15: return None
    if r < 0.3: return rng.choice([0, -1, 2**63, 10**30, 4194305, 1.5e308, True])
    if r < 0.7 or depth > 1: return rng.choice(["", "1%", "60", "x" * rng.randint(0, 300)])
    if r < 0.85: return [value(depth + 1)]
    return {"k": value(depth + 1)}
ready_then_go()
while time.monotonic() < end:
    op = rng.choice(ops)
    args = value() if rng.random() < 0.2 else {k: value() for k in ("id", "device", "memory",
        "duration", "start", "pid", "since") if rng.random() < 0.4}
    if op == "create" and isinstance(args, dict):
        args["persist"] = True
    raw = json.dumps({"v": 1, "op": op, "args": args}).replace("1.5e+308", "1e400").encode()
    r = call(s, None, raw=raw[:60000])
    code = "ok" if r.get("ok") else r["error"]["code"]
    codes[code] = codes.get(code, 0) + 1
    sent += 1
done(frames=sent, codes=codes)
"""

USAGE = r"""
s, calls, slowest = connect(), 0, 0.0
ready_then_go()
while time.monotonic() < end:
    t0 = time.perf_counter()
    call(s, req("usage", since=0))
    slowest = max(slowest, time.perf_counter() - t0)
    calls += 1
done(calls=calls, slowest_ms=round(slowest * 1e3, 1))
"""

PROBE = r"""
import json, sys, time
from pathlib import Path
from chronos.transport import SocketTransport
path, seconds, period = Path(sys.argv[1]), float(sys.argv[2]), float(sys.argv[3])
lat, failed, errors = [], 0, []
end = time.monotonic() + seconds
while time.monotonic() < end:
    t0 = time.perf_counter()
    try:
        t = SocketTransport(path, timeout=10.0)
        try:
            t.call("list")
        finally:
            t.close()
    except Exception as exc:
        failed += 1
        errors.append(str(exc)[:120])
    took = time.perf_counter() - t0
    lat.append(took)
    time.sleep(max(0.0, period - took))
print(json.dumps({"lat": lat, "failed": failed, "errors": errors[:3]}))
"""


@dataclass
class Attack:
    name: str
    script: str | None
    args: tuple[str, ...] = ()
    setup: Callable[[Any], Callable[[], None]] | None = None
    """Run (as root, with a Partitioner) before the attack; returns its undo."""


def fill_gpu0(client: Any) -> Callable[[], None]:
    """Fill GPU 0 so that the attacker's requests wait in the fair queue."""
    blocker = client.create(0, 0.99, 3600, persist=True)
    return blocker.release


# ------------------------------------------------------------------ the ledger


def seed_history(ledger_path: Path, count: int, attacker_uid: int) -> float:
    """``count`` ended partitions (3,000 the attacker's) straight into the ledger; seconds."""
    from chronos.devices import open_machine
    from chronos.ledger import Ledger
    from chronos.models import RELEASED, PartitionRecord

    t0 = time.perf_counter()
    devices = open_machine("simulated").devices
    ledger = Ledger(ledger_path)
    now = time.time()
    with ledger.transaction():
        for i in range(count):
            dev = devices[i % len(devices)]
            mine = i < 3000
            uid = attacker_uid if mine else 60000 + i % 49
            created = now - 6 * 86400 + i * (5 * 86400 / max(1, count))
            ledger.parts.partitions.insert(
                PartitionRecord(
                    id=f"h{i:07x}",
                    device=dev.index,
                    device_uuid=dev.uuid,
                    device_total_bytes=dev.total_bytes,
                    memory_bytes=dev.total_bytes // 100,
                    uid=uid,
                    user=ATTACKER if mine else f"bench{uid % 100:02d}",
                    created_at=created,
                    starts_at=created,
                    expires_at=created + 600,
                    state=RELEASED,
                    ended_at=created + 300,
                    end_reason="released",
                )
            )
    ledger.close()
    return time.perf_counter() - t0


# -------------------------------------------------------------------- a phase


def rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return float("nan")


@contextlib.contextmanager
def expiry_helpers(n: int) -> Iterator[tuple[list[int], int]]:
    read_fd, write_fd = os.pipe()
    pids = [spawn_helper(write_fd, read_fd) for _ in range(n)]
    os.close(write_fd)
    try:
        yield pids, read_fd
    finally:
        os.close(read_fd)
        for pid in pids:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGKILL)
        for pid in pids:
            with contextlib.suppress(ChildProcessError):
                os.waitpid(pid, 0)


def run_phase(
    attack: Attack, daemon: C.DaemonProcess, env: dict[str, str], users: Any, seconds: float
) -> dict[str, Any]:
    from chronos import Partitioner

    attacker, victim = users
    with expiry_helpers(EXPIRIES_PER_PHASE) as (helpers, read_fd), Partitioner() as client:
        undo = attack.setup(client) if attack.setup else None
        proc = None
        if attack.script is not None:
            argv = [*attacker.python, "-c", PRELUDE + attack.script, str(daemon.socket)]
            proc = attacker.popen(
                [*argv, str(seconds + 0.5), *attack.args],
                env,
                stdout=subprocess.PIPE,
                stderr=subprocess.PIPE,
                stdin=subprocess.PIPE,
            )
            assert proc.stdout is not None and proc.stdin is not None
            if proc.stdout.readline().strip() != b"ready":
                assert proc.stderr is not None
                proc.kill()
                why = proc.stderr.read().decode()[-600:]
                raise RuntimeError(f"{attack.name}: the attack did not start:\n{why}")
        # Expiries before the attack's loop starts (a slow daemon would delay their creation),
        # each falling due at its share of the attack's span.
        go = time.time() + 0.2 * EXPIRIES_PER_PHASE + 0.3
        expiries = {}
        for k, pid in enumerate(helpers):
            due = go + seconds * (k + 1) / (EXPIRIES_PER_PHASE + 1)
            p = client.create(1, 1e-6, due - time.time(), persist=True, grace="5s")
            p.attach(pid)
            expiries[pid] = p.record.expires_at
        time.sleep(max(0.0, go - time.time()))
        started = time.time()
        if proc is not None:
            assert proc.stdin is not None
            proc.stdin.write(b"go\n")
            proc.stdin.flush()
        probe = victim.popen(
            [*victim.python, "-c", PROBE, str(daemon.socket), str(seconds), "0.05"],
            env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            stdin=subprocess.DEVNULL,
        )
        rss = [rss_mb(daemon.pid)]
        while probe.poll() is None:
            rss.append(rss_mb(daemon.pid))
            time.sleep(0.2)
        out, err = probe.communicate()
        probe_report = json.loads(out) if out.strip() else {"lat": [], "failed": -1}
        got = read_deliveries(read_fd, len(expiries), max(expiries.values()) + 10.0)
        summary: dict[str, Any] = {}
        if proc is not None:
            tail, attack_err = proc.communicate(timeout=300)
            with contextlib.suppress(ValueError, IndexError):
                summary = json.loads(tail.decode().strip().splitlines()[-1])
            if proc.returncode:
                summary["exit"] = proc.returncode
                summary["stderr"] = attack_err.decode()[-300:]
        if undo is not None:
            undo()
    lateness = [got[pid] - at for pid, at in expiries.items() if pid in got]
    summary["slow_ops"] = slow_ops(daemon.log_path, started)
    stats = C.summarize(probe_report["lat"])
    return {
        "attack": attack.name,
        "list_n": stats["n"],
        "list_p50": stats["p50"],
        "list_p99": stats["p99"],
        "list_max": stats["max"],
        "list_failed": probe_report["failed"],
        "expiries": f"{len(lateness)}/{EXPIRIES_PER_PHASE}",
        "lateness_max": max(lateness) * 1000 if lateness else float("nan"),
        "rss_max": max(rss),
        "attacker": summary,
    }


def slow_ops(log_path: Path, since: float) -> dict[str, float]:
    """``{op: slowest ms}`` of the daemon's ``slow_request`` lines since ``since``."""
    out: dict[str, float] = {}
    for line in log_path.read_text().splitlines():
        with contextlib.suppress(ValueError):
            record = json.loads(line)
            if record.get("event") == "slow_request" and record.get("ts", 0) >= since:
                out[record["op"]] = max(out.get(record["op"], 0.0), float(record["ms"]))
    return out


def unit_nice() -> int:
    """The ``Nice=`` of packaging/chronosd.service (0 if it sets none)."""
    unit = Path(__file__).resolve().parent.parent / "packaging" / "chronosd.service"
    for line in unit.read_text().splitlines():
        if line.startswith("Nice="):
            return int(line.split("=", 1)[1])
    return 0


# ---------------------------------------------------------------------- output

HEADERS = [
    "attack",
    "list n",
    "list p50 ms",
    "list p99 ms",
    "list max ms",
    "list failed",
    "expiries signalled",
    "expiry lateness max ms",
    "daemon RSS max MB",
]


def table_rows(results: list[dict[str, Any]]) -> list[list[Any]]:
    return [
        [
            r["attack"],
            r["list_n"],
            r["list_p50"],
            r["list_p99"],
            r["list_max"],
            r["list_failed"],
            r["expiries"],
            r["lateness_max"],
            r["rss_max"],
        ]
        for r in results
    ]


def verdict(r: dict[str, Any]) -> str:
    misses = []
    if not r["list_p99"] < TARGET_LIST_P99_MS or r["list_failed"]:
        misses.append("list p99")
    if not r["lateness_max"] < TARGET_LATENESS_MS:
        misses.append("expiry lateness")
    if r["expiries"] != f"{EXPIRIES_PER_PHASE}/{EXPIRIES_PER_PHASE}":
        misses.append("expiries signalled")
    if not r["rss_max"] < TARGET_RSS_MB:
        misses.append("RSS")
    return "meets all targets" if not misses else "misses: " + ", ".join(misses)


def markdown(results: list[dict[str, Any]], info: dict[str, str], extra: dict[str, str]) -> str:
    lines = [
        "## Adversarial load (`bench_adversarial.py`)",
        "",
        "One user attacks chronosd while another user's `list` (a fresh connection per call, "
        "every 50 ms, timed in the victim's process) and four expiries that fall due "
        "during the attack are measured, side by side with a quiet phase of the same run. "
        f"Targets: `list` p99 < {TARGET_LIST_P99_MS:g} ms, expiry lateness < "
        f"{TARGET_LATENESS_MS:g} ms, daemon RSS < {TARGET_RSS_MB:g} MB. The ledger holds "
        "the seeded history throughout (see the script's docstring for every attack).",
        "",
        C.md_table(
            HEADERS + ["verdict"],
            [row + [verdict(r)] for row, r in zip(table_rows(results), results)],
        ),
        "",
        "What the attacker's process reported (requests made, refusals):",
        "",
    ]
    for r in results:
        if r["attacker"]:
            lines.append(f"- {r['attack']}: `{json.dumps(r['attacker'])}`")
    lines += [
        "",
        "The daemon runs at the niceness its unit sets (`Nice=` in "
        "`packaging/chronosd.service`), applied by the script as systemd would. "
        "Connect churn is the one attack no per-user limit can reach: the attacker "
        "reconnects as fast as refusals come back and so keeps the listen backlog, which "
        "all users share, full; other users' connects queue behind it (see Security, out "
        "of scope, in docs/DAEMON.md).",
        "",
        C.machine_markdown(info, extra),
    ]
    return "\n".join(lines)


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--phase-s", type=float, default=8.0, help="seconds of each attack")
    parser.add_argument("--history", type=int, default=100_000, help="ended partitions seeded")
    parser.add_argument("--only", nargs="*", help="run only these attacks (and the quiet phase)")
    args = parser.parse_args()
    if os.geteuid() != 0:
        print("bench_adversarial: run it as root (it creates two test accounts)", file=sys.stderr)
        return 2
    from chronos_testing import unix_accounts

    from chronos.config import DEFAULT_LIMITS
    from chronos.paths import LEDGER_FILE

    attacks = [
        Attack("quiet (baseline)", None),
        Attack("parser bait", PARSE),
        Attack("2,000 idle connections", IDLE, ("2000", "hold")),
        Attack("connect churn (2,000, refused ones reopened)", IDLE, ("2000", "churn")),
        Attack("half-sent frames", HALF),
        Attack(
            f"queue flood ({DEFAULT_LIMITS.max_waiting} waiting)",
            QUEUE,
            (str(DEFAULT_LIMITS.max_waiting or 8),),
            setup=fill_gpu0,
        ),
        Attack(
            f"booking flood ({DEFAULT_LIMITS.max_bookings} bookings)",
            BOOK,
            (str(DEFAULT_LIMITS.max_bookings or 50),),
        ),
        Attack("fuzzing", FUZZ),
        Attack("usage over the history", USAGE),
    ]
    if args.only:
        attacks = [a for a in attacks if a.script is None or a.name in args.only]
    with (
        unix_accounts(ATTACKER, VICTIM, why="bench_adversarial needs root") as users,
        C.fresh_env("daemon") as (home, env),
    ):
        os.chmod(home, 0o755)  # the accounts reach the socket inside
        seeded_s = seed_history(home / LEDGER_FILE, args.history, users[0].uid)
        print(f"seeded {args.history} ended partitions in {seeded_s:.1f} s", flush=True)
        info = C.machine_info(home)
        results = []
        with C.DaemonProcess(home, env) as daemon:
            nice = unit_nice()
            os.setpriority(os.PRIO_PROCESS, daemon.pid, nice)  # as the unit starts it
            for attack in attacks:
                C.banner(attack.name)
                result = run_phase(attack, daemon, env, users, args.phase_s)
                print(C.text_table(HEADERS, table_rows([result])), flush=True)
                if result["attacker"]:
                    print(f"attacker: {json.dumps(result['attacker'])[:300]}", flush=True)
                results.append(result)
            daemon.report_errors()
    C.banner("summary")
    print(
        C.text_table(
            HEADERS + ["verdict"],
            [row + [verdict(r)] for row, r in zip(table_rows(results), results)],
        )
    )
    extra = {
        "history": f"{args.history} ended partitions",
        "phase": f"{args.phase_s:g} s",
        "daemon niceness": f"{unit_nice()} (the unit's Nice=)",
    }
    if not args.no_doc:
        C.update_section("adversarial", markdown(results, info, extra))
        print(f"\nwrote the adversarial section of {C.DOC}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
