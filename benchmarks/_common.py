"""Shared helpers for the Chronos benchmarks.

Percentiles, a description of the machine, a fresh simulated environment per
run, starting/stopping a real ``chronosd``, and rewriting one section of
``docs/BENCHMARKS.md`` (between ``<!-- bench:NAME -->`` and
``<!-- /bench:NAME -->``) so that each script only ever touches its own part.
"""

from __future__ import annotations

import argparse
import contextlib
import fcntl
import math
import os
import platform
import shutil
import sqlite3
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator, Sequence
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
sys.path.insert(0, str(ROOT / "tests"))  # one chronosd runner for tests and benchmarks

from chronos_testing import DaemonProcess as TestDaemonProcess  # noqa: E402

DOC = ROOT / "docs" / "BENCHMARKS.md"
BIN = Path(sys.executable).parent
PYTHON = sys.executable

# Sections in the order they appear in docs/BENCHMARKS.md.
SECTION_ORDER = (
    "ledger", "daemon", "expiry", "fairness", "fairness-flood", "fairness-compare", "soak",
    "restart",
)  # fmt: skip

HEADER = """\
# Chronos benchmarks

Latency, throughput and expiry accuracy of Chronos, measured with the
simulated GPU backend (`CHRONOS_BACKEND=simulated`, two simulated 1 TiB GPUs so
admission never refuses) and a fresh temporary state directory
(`CHRONOS_HOME`) per run. Every partition a benchmark creates is released or
expires before it ends. Times are wall-clock: `time.perf_counter()` around one
API call, or around a whole `chronos …` subprocess for the CLI rows.
Percentiles are linear-interpolated (numpy's default); with 50 samples p99 is
close to the maximum.

Reproduce (from the repository root, with the project's virtualenv):

```sh
.venv/bin/python benchmarks/bench_ledger.py   # embedded mode: API, CLI, concurrent creates
.venv/bin/python benchmarks/bench_daemon.py   # through a real chronosd
.venv/bin/python benchmarks/bench_expiry.py   # SIGTERM delivery vs expires_at
```

Each script prints its figures and rewrites only its own section below
(`--no-doc` prints without touching this file; `--help` lists the knobs,
`--profile` prints a cProfile summary of the hot path). The numbers below come
from one run of each script on the machine named in each section.
"""


def process_cpu_seconds(pid: int) -> float:
    """User + system CPU time process ``pid`` has used (``/proc/<pid>/stat``)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def machine_note() -> str:
    """How the doc names the machine: ``$CHRONOS_BENCH_MACHINE``, else a guess."""
    explicit = os.environ.get("CHRONOS_BENCH_MACHINE")
    if explicit:
        return explicit
    if os.cpu_count() == 2 and not Path("/dev/nvidiactl").exists():
        return "the 2-core CI-class development VM (no GPU)"
    return "the machine described here"


# --------------------------------------------------------------------- statistics


def percentile(sorted_values: Sequence[float], q: float) -> float:
    """The ``q``-th percentile (0–100) of already sorted values, linear interpolation."""
    if not sorted_values:
        return math.nan
    if len(sorted_values) == 1:
        return float(sorted_values[0])
    pos = (len(sorted_values) - 1) * q / 100.0
    lo = math.floor(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    frac = pos - lo
    return float(sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * frac)


def summarize(values: Sequence[float], scale: float = 1000.0) -> dict[str, float]:
    """n, mean, p50, p90, p99, min, max of ``values`` multiplied by ``scale`` (s -> ms)."""
    data = sorted(v * scale for v in values)
    if not data:
        return {
            "n": 0,
            "mean": math.nan,
            "p50": math.nan,
            "p90": math.nan,
            "p99": math.nan,
            "min": math.nan,
            "max": math.nan,
        }
    return {
        "n": len(data),
        "mean": sum(data) / len(data),
        "p50": percentile(data, 50),
        "p90": percentile(data, 90),
        "p99": percentile(data, 99),
        "min": data[0],
        "max": data[-1],
    }


def fmt(value: float, digits: int = 2) -> str:
    if value is None or (isinstance(value, float) and math.isnan(value)):
        return "–"
    if abs(value) >= 100:
        return f"{value:.0f}"
    if abs(value) >= 10:
        return f"{value:.1f}"
    return f"{value:.{digits}f}"


def md_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """A GitHub-flavoured Markdown table (numbers right-aligned)."""

    def cell(v: Any) -> str:
        return fmt(v) if isinstance(v, float) else str(v)

    body = [[cell(v) for v in row] for row in rows]
    align = [
        "---:" if rows and isinstance(rows[0][i], (int, float)) else "---"
        for i in range(len(headers))
    ]
    lines = ["| " + " | ".join(headers) + " |", "| " + " | ".join(align) + " |"]
    lines += ["| " + " | ".join(r) + " |" for r in body]
    return "\n".join(lines)


def text_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    """The same table for the terminal."""
    body = [[fmt(v) if isinstance(v, float) else str(v) for v in row] for row in rows]
    widths = [
        max(len(h), *(len(r[i]) for r in body)) if body else len(h) for i, h in enumerate(headers)
    ]
    out = ["  ".join(h.rjust(w) for h, w in zip(headers, widths))]
    out += ["  ".join(c.rjust(w) for c, w in zip(r, widths)) for r in body]
    return "\n".join(out)


def stat_row(label: str, values: Sequence[float], scale: float = 1000.0) -> list[Any]:
    """``[label, n, p50, p99, mean, max]`` in ms."""
    s = summarize(values, scale)
    return [label, s["n"], s["p50"], s["p99"], s["mean"], s["max"]]


STAT_HEADERS = ["operation", "n", "p50 ms", "p99 ms", "mean ms", "max ms"]


# ---------------------------------------------------------------------- machine


def _cpu_model() -> str:
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.lower().startswith("model name"):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _mem_total() -> str:
    try:
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal:"):
                kib = int(line.split()[1])
                return f"{kib / 1024 / 1024:.1f} GiB"
    except (OSError, ValueError, IndexError):
        pass
    return "?"


def filesystem_of(path: Path) -> str:
    """``fstype (device on mountpoint)`` of the mount holding ``path``."""
    target = os.path.realpath(path)
    best = ("", "?", "?")
    try:
        for line in Path("/proc/mounts").read_text().splitlines():
            dev, mnt, fstype, *_ = line.split()
            mnt = mnt.replace("\\040", " ")
            inside = target == mnt or target.startswith(mnt.rstrip("/") + "/")
            if inside and len(mnt) >= len(best[0]):
                best = (mnt, fstype, dev)
    except OSError:
        return "?"
    return f"{best[1]} ({best[2]} on {best[0]})"


def _git_revision() -> str:
    try:
        rev = subprocess.run(
            ["git", "--no-optional-locks", "rev-parse", "--short", "HEAD"],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=10,
        ).stdout.strip()
        dirty = subprocess.run(
            ["git", "--no-optional-locks", "diff", "--quiet", "HEAD", "--", "src"],
            cwd=ROOT,
            capture_output=True,
            timeout=10,
        ).returncode
        return f"{rev}{' + uncommitted changes in src/' if dirty else ''}" if rev else "?"
    except (OSError, subprocess.SubprocessError):
        return "?"


def _cpu_times() -> tuple[int, int]:
    """(busy, total) jiffies of all CPUs since boot."""
    fields = [int(x) for x in Path("/proc/stat").read_text().split("\n", 1)[0].split()[1:]]
    idle = fields[3] + (fields[4] if len(fields) > 4 else 0)
    return sum(fields) - idle, sum(fields)


def cpu_busy(seconds: float = 1.0) -> float:
    """Share (0–1) of all CPUs busy over the next ``seconds``: how loaded the machine is."""
    b0, t0 = _cpu_times()
    time.sleep(seconds)
    b1, t1 = _cpu_times()
    return (b1 - b0) / max(1, t1 - t0)


def wait_for_quiet(threshold: float = 0.15, max_wait: float | None = None) -> float:
    """Wait (up to ``max_wait`` s) until other work uses under ``threshold`` of the CPUs.

    Other people's test suites on a shared 2-core machine skew every figure. Returns
    the busy share last seen (recorded with the results).
    """
    if max_wait is None:
        max_wait = float(os.environ.get("CHRONOS_BENCH_QUIET_WAIT", "300"))
    deadline = time.monotonic() + max_wait
    busy = cpu_busy()
    said = 0.0
    while busy >= threshold and time.monotonic() < deadline:
        if time.monotonic() - said > 30:
            print(
                f"machine {busy:.0%} busy with other work; waiting up to "
                f"{deadline - time.monotonic():.0f} s for it to quiet down",
                flush=True,
            )
            said = time.monotonic()
        time.sleep(2.0)
        busy = cpu_busy()
    return busy


class LoadMeter:
    """How busy *other* processes kept the CPUs between ``__init__`` and :meth:`others`.

    Machine-wide busy time from /proc/stat minus this process's and its reaped
    children's CPU time (call it once every child, daemon included, has exited).
    """

    def __init__(self) -> None:
        self.busy0, self.total0 = _cpu_times()
        self.own0 = self._own()

    @staticmethod
    def _own() -> float:
        import resource

        me = resource.getrusage(resource.RUSAGE_SELF)
        kids = resource.getrusage(resource.RUSAGE_CHILDREN)
        return me.ru_utime + me.ru_stime + kids.ru_utime + kids.ru_stime

    def others(self) -> float:
        busy1, total1 = _cpu_times()
        tick = os.sysconf("SC_CLK_TCK")
        busy = (busy1 - self.busy0) / tick
        total = (total1 - self.total0) / tick
        own = self._own() - self.own0
        return max(0.0, busy - own) / max(total, 1e-9)


def machine_info(state_dir: Path | None = None) -> dict[str, str]:
    try:
        usable = len(os.sched_getaffinity(0))
    except AttributeError:
        usable = os.cpu_count() or 0
    info = {
        "date": time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime()),
        "cpu": _cpu_model(),
        "cores": f"{os.cpu_count()} logical ({usable} usable)",
        "memory": _mem_total(),
        "kernel": f"{platform.system()} {platform.release()}",
        "python": f"{platform.python_implementation()} {platform.python_version()}",
        "sqlite": sqlite3.sqlite_version,
        "state dir fs": filesystem_of(state_dir or Path(tempfile.gettempdir())),
        "chronos": _git_revision(),
    }
    info["machine"] = machine_note()
    info["other load at start"] = f"{wait_for_quiet():.0%} CPU busy"
    return info


def machine_markdown(info: dict[str, str], extra: dict[str, str] | None = None) -> str:
    items = {**info, **(extra or {})}
    label = items.pop("machine", None) or machine_note()
    parts = [f"{k}: {v}" for k, v in items.items()]
    return f"Machine: {label}. " + "; ".join(parts) + "."


# -------------------------------------------------------------------- environment


@contextlib.contextmanager
def fresh_env(mode: str | None, gpus: str = "1TiB,1TiB") -> Iterator[tuple[Path, dict[str, str]]]:
    """A temporary ``CHRONOS_HOME`` and the environment for it; also applied to os.environ.

    ``mode`` is ``embedded``, ``daemon`` or None (leave CHRONOS_MODE unset).
    The directory is removed afterwards.
    """
    home = Path(tempfile.mkdtemp(prefix="chronos-bench-"))
    saved = dict(os.environ)
    env = dict(os.environ)
    for key in [k for k in env if k.startswith("CHRONOS_") and not k.startswith("CHRONOS_BENCH")]:
        del env[key]
    # Measure what an installed Chronos does: Python caches compiled modules (.pyc).
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    env.update(
        {
            "CHRONOS_BACKEND": "simulated",
            "CHRONOS_SIMULATED_GPUS": gpus,
            "CHRONOS_HOME": str(home),
            "CHRONOS_SOCKET": str(home / "chronosd.sock"),
            "CHRONOS_CONFIG": str(home / "config.toml"),  # absent: built-in defaults, not /etc
        }
    )
    if mode:
        env["CHRONOS_MODE"] = mode
    os.environ.clear()
    os.environ.update(env)
    try:
        yield home, env
    finally:
        os.environ.clear()
        os.environ.update(saved)
        shutil.rmtree(home, ignore_errors=True)


def cli_command(*args: str) -> list[str]:
    """The ``chronos`` console script of this interpreter's environment."""
    exe = BIN / "chronos"
    if exe.exists():
        return [str(exe), *args]
    return [PYTHON, "-c", "import sys; from chronos.cli import main; sys.exit(main())", *args]


def time_command(cmd: Sequence[str], env: dict[str, str]) -> tuple[float, str]:
    """Wall time of one subprocess (seconds) and its stdout; raises if it fails."""
    t0 = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - t0
    if proc.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)} exited {proc.returncode}: {proc.stderr.strip()}")
    return elapsed, proc.stdout


# ------------------------------------------------------------------------- daemon


class DaemonProcess(TestDaemonProcess):
    """The tests' ``chronosd`` runner (``chronos_testing.DaemonProcess``), on a benchmark's
    environment: ``env`` exactly as given (``.pyc`` files allowed, as an installed Chronos
    runs), optionally under cProfile, each start logging to a file of its own; and a
    context manager that shows the log of a daemon that died.
    """

    def __init__(self, home: Path, env: dict[str, str], profile: Path | None = None) -> None:
        super().__init__(base=home)
        self.sock = Path(env.get("CHRONOS_SOCKET") or home / "chronosd.sock")
        self.env = dict(env)
        self.daemon_env = {k: v for k, v in env.items() if k != "CHRONOS_MODE"}
        self.profile = profile
        self.how = (
            "`python -m chronos.daemon.main`"
            if profile is None
            else "`python -c 'main()'` under cProfile"
        )

    @property
    def socket(self) -> Path:
        return self.sock

    def argv(self, sock: Path | None = None) -> list[str]:
        argv = super().argv(sock)
        if self.profile is None:
            return argv
        code = (
            "import cProfile, sys; from chronos.daemon.main import main; "
            f"cProfile.run('main()', {str(self.profile)!r})"
        )
        return [PYTHON, "-c", code, *argv[3:]]  # argv[:3]: python -m chronos.daemon.main

    def new_log_path(self) -> Path:
        """A log file no earlier daemon on this state directory wrote (restarts keep theirs)."""
        path = super().new_log_path()
        while path.exists():
            self.logs.append(path)
            path = super().new_log_path()
        return path

    def start(self, timeout: float = 30.0) -> DaemonProcess:  # type: ignore[override]
        super().start(wait=False)
        try:
            self.wait_ready(timeout)
        except AssertionError as exc:
            self.stop()
            raise RuntimeError(str(exc)) from None
        return self

    @property
    def pid(self) -> int:
        assert self.proc is not None
        return self.proc.pid

    def log_tail(self, lines: int = 20) -> str:
        return "\n".join(self.log_text().splitlines()[-lines:]) or "(no log)"

    def errors(self) -> list[str]:
        """Lines of the daemon's log at level error (there should be none)."""
        return [line for line in self.log_text().splitlines() if '"level": "error"' in line]

    def report_errors(self) -> None:
        errors = self.errors()
        if errors:
            print(f"chronosd logged {len(errors)} error(s), e.g.:\n  " + "\n  ".join(errors[:3]))

    def cpu_seconds(self) -> float | None:
        """User+system CPU time the daemon has used so far (from /proc)."""
        try:
            return process_cpu_seconds(self.pid)
        except (OSError, IndexError, ValueError):
            return None

    def __enter__(self) -> DaemonProcess:
        return self.start()

    def __exit__(self, exc_type: object, *exc: object) -> None:
        died = self.proc is not None and self.proc.poll() is not None
        if exc_type is not None or died:
            code = self.proc.returncode if self.proc is not None else None
            print(
                f"chronosd {'exited with ' + str(code) if died else 'still running'}; "
                f"last lines of its log:\n{self.log_tail()}",
                file=sys.stderr,
            )
        self.stop()


def api_latency(
    mode: str, iterations: int, warmup: int, memory: float, duration: float
) -> dict[str, list[float]]:
    """Seconds of each ``create(0, memory, duration, persist=True)`` and ``.release()``
    through the Python API (which must be in ``mode``), one call at a time after a warm-up."""
    from chronos import Partitioner

    creates: list[float] = []
    releases: list[float] = []
    with Partitioner() as client:
        assert client.mode == mode, client.mode
        for i in range(warmup + iterations):
            t0 = time.perf_counter()
            p = client.create(0, memory, duration, persist=True)
            t1 = time.perf_counter()
            p.release()
            t2 = time.perf_counter()
            if i >= warmup:
                creates.append(t1 - t0)
                releases.append(t2 - t1)
    return {"create": creates, "release": releases}


def fill_history(ledger: Path, count: int) -> None:
    """Add ``count`` ended partitions to ``ledger``, as months of use would leave.

    Copies of one released partition already there (so the ledger must hold
    one), written straight into the database in one transaction: the API would
    take minutes. Column names come from the table, so schema changes carry over.
    """
    db = sqlite3.connect(ledger, timeout=30)
    try:
        cols = [row[1] for row in db.execute("PRAGMA table_info(partitions)")]
        row = db.execute("SELECT id FROM partitions WHERE state = 'released' LIMIT 1").fetchone()
        if row is None:
            raise RuntimeError("fill_history needs one released partition to copy")
        others = ", ".join(c for c in cols if c != "id")
        sql = (
            f"INSERT INTO partitions (id, {others}) SELECT ?, {others} FROM partitions WHERE id = ?"
        )
        start = db.execute("SELECT COUNT(*) FROM partitions").fetchone()[0]
        with db:
            db.executemany(sql, ((f"h{start + i:07x}", row[0]) for i in range(count)))
    finally:
        db.close()


SCALING_HEADERS = [
    "in the ledger",
    "create p50 ms",
    "create p99 ms",
    "release p50 ms",
    "release p99 ms",
]


def latency_vs_size(
    kind: str,
    levels: Sequence[int],
    samples: int,
    ledger: Path,
    extra: Any = None,
    extra_header: str = "extra",
) -> list[list[Any]]:
    """Create+release latency (one client) as the ledger grows; one row per level.

    ``kind`` ``open``: that many partitions stay open (created through the API,
    released at the end). ``history``: that many ended partitions sit in the
    ledger (see :func:`fill_history`). ``extra()``, if given, adds a column per row.
    Call it on a fresh ledger: rows of the other kind would skew it.
    """
    from chronos import Partitioner

    rows = []
    with Partitioner() as client:
        held: list[Any] = []
        client.create(0, 1e-6, 3600, persist=True).release()
        ended = 0
        for level in levels:
            if kind == "open":
                while len(held) < level:
                    held.append(client.create(0, 1e-6, 3600, persist=True))
            else:
                fill_history(ledger, max(0, level - ended))
                ended = max(ended, level)
            creates, releases = [], []
            for _ in range(samples):
                t0 = time.perf_counter()
                p = client.create(0, 0.001, 3600, persist=True)
                t1 = time.perf_counter()
                p.release()
                creates.append(t1 - t0)
                releases.append(time.perf_counter() - t1)
            ended += samples
            a, b = summarize(creates), summarize(releases)
            label = f"{level} open" if kind == "open" else f"{level} ended"
            row = [label, a["p50"], a["p99"], b["p50"], b["p99"]]
            if extra is not None:
                row.append(extra())
            rows.append(row)
            headers = SCALING_HEADERS + ([extra_header] if extra is not None else [])
            print(text_table(headers, [row]), flush=True)
        for p in held:
            p.release()
    return rows


# --------------------------------------------------------------------- throughput

THROUGHPUT_MEMORY = 1e-5
"""Of a simulated 1 TiB GPU: about 10 MiB, so 100,000 fit and admission never refuses."""


def _throughput_worker(n: int, cycle: bool, barrier: Any, results: Any) -> None:
    try:
        results.put(_throughput_ops(n, cycle, barrier))
    except BaseException as exc:  # report it: the parent waits for one result per worker
        barrier.abort()
        results.put(repr(exc))


def _throughput_ops(
    n: int, cycle: bool, barrier: Any
) -> tuple[float, float, list[float], list[str]]:
    from chronos import Partitioner

    client = Partitioner()  # its own ledger connection, or its own daemon socket
    warm = client.create(0, THROUGHPUT_MEMORY, 3600, persist=True)
    warm.release()
    lat: list[float] = []
    ids: list[str] = []
    barrier.wait()
    start = time.perf_counter()  # CLOCK_MONOTONIC: comparable across processes
    for _ in range(n):
        t0 = time.perf_counter()
        p = client.create(0, THROUGHPUT_MEMORY, 3600, persist=True)
        if cycle:
            p.release()
        else:
            ids.append(p.id)
        lat.append(time.perf_counter() - t0)
    end = time.perf_counter()
    client.close()
    return start, end, lat, ids


def run_throughput(procs: int, per_proc: int, cycle: bool = False) -> dict[str, Any]:
    """``procs`` forked clients, each doing ``per_proc`` creates (``cycle``: create+release).

    They start together behind a barrier. Returns the total rate over the span
    from the first start to the last finish and every per-op latency. What was
    created is released afterwards (not timed).
    """
    import multiprocessing as mp

    from chronos import Partitioner

    ctx = mp.get_context("fork")
    barrier = ctx.Barrier(procs)
    results = ctx.Queue()
    workers = [
        ctx.Process(target=_throughput_worker, args=(per_proc, cycle, barrier, results))
        for _ in range(procs)
    ]
    for w in workers:
        w.start()
    got = [results.get(timeout=900) for _ in workers]
    for w in workers:
        w.join()
    errors = [g for g in got if isinstance(g, str)]
    if errors:
        raise RuntimeError(f"{len(errors)} of {procs} clients failed: {errors[0]}")
    start = min(g[0] for g in got)
    end = max(g[1] for g in got)
    lat = [x for g in got for x in g[2]]
    ids = [x for g in got for x in g[3]]
    with Partitioner() as client:
        for pid in ids:
            client.release(pid)
    return {
        "procs": procs,
        "ops": len(lat),
        "seconds": end - start,
        "rate": len(lat) / (end - start),
        "lat": lat,
    }


# -------------------------------------------------------------------- the document


def update_section(name: str, body: str, doc: Path = DOC) -> None:
    """Replace (or add) the ``<!-- bench:NAME -->`` section of ``doc`` with ``body``."""
    start, end = f"<!-- bench:{name} -->", f"<!-- /bench:{name} -->"
    block = f"{start}\n{body.strip()}\n{end}"
    doc.parent.mkdir(parents=True, exist_ok=True)
    lock_path = Path(tempfile.gettempdir()) / "chronos-benchmarks-doc.lock"
    with open(lock_path, "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        text = doc.read_text() if doc.exists() else HEADER
        if start in text and end in text:
            head, rest = text.split(start, 1)
            tail = rest.split(end, 1)[1]
            text = head + block + tail
        else:
            text = _insert_in_order(text, name, block)
        tmp = doc.with_suffix(f".md.{os.getpid()}.tmp")
        tmp.write_text(text if text.endswith("\n") else text + "\n")
        os.replace(tmp, doc)


def _insert_in_order(text: str, name: str, block: str) -> str:
    later = SECTION_ORDER[SECTION_ORDER.index(name) + 1 :] if name in SECTION_ORDER else ()
    for other in later:
        marker = f"<!-- bench:{other} -->"
        if marker in text:
            head, tail = text.split(marker, 1)
            return f"{head.rstrip()}\n\n{block}\n\n{marker}{tail}"
    return f"{text.rstrip()}\n\n{block}\n"


# --------------------------------------------------------------------------- misc


def base_parser(description: str) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument(
        "--no-doc",
        action="store_true",
        help="print the results only; leave docs/BENCHMARKS.md alone",
    )
    parser.add_argument(
        "--profile", action="store_true", help="also print a cProfile summary of the hot path"
    )
    return parser


def profile_summary(func: Any, *args: Any, top: int = 18, **kwargs: Any) -> str:
    """Run ``func`` under cProfile; the top functions by cumulative time, as text."""
    import cProfile
    import io
    import pstats

    prof = cProfile.Profile()
    prof.runcall(func, *args, **kwargs)
    out = io.StringIO()
    pstats.Stats(prof, stream=out).strip_dirs().sort_stats("cumulative").print_stats(top)
    return out.getvalue()


def banner(title: str) -> None:
    print(f"\n== {title} ==", flush=True)
