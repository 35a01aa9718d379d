"""Escaping enforcement, and making the daemon act against others (issue "Trust", 2, 7-11, 15,
17, 20).

Real chronosd, real accounts, real signals; GPU memory is declared through the simulated
backend. Faults the daemon must survive (pidfds that fail, writes that fail, a wall clock
that steps) are injected into the daemon's process only, through a ``sitecustomize`` on
its PYTHONPATH: the code under test is the shipped code.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import os
import shutil
import signal
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import PY, DaemonProcess, TestUser, shared_tmpdir, wait_for
from helpers import GIB, assert_one_line_error

from chronos import cgroups, procs
from chronos.config import Config, parse_config
from chronos.daemon.clock import SteadyClock
from chronos.daemon.deadlines import Deadlines
from chronos.errors import BadRequest
from chronos.identity import Caller
from chronos.ledger import Ledger, NewPartition
from chronos.messages import AttachRequest
from chronos.service import Service

from .conftest import Users

# A client of the Python API: argv = out-dir duration memory-GiB-to-declare kind on-term grace.
# It writes 'created' (the partition id) and, on SIGTERM, 'term'; 'exit' ends it then.
CLIENT = """
import os, sys, signal, time
from chronos.api import Partitioner
from chronos.devices.simulated import declare_process
out, duration, held, kind, on_term, grace = sys.argv[1:7]
def mark(name, text=''):
    with open(os.path.join(out, name + '.tmp'), 'w') as f:
        f.write(text or repr(time.time()))
    os.rename(os.path.join(out, name + '.tmp'), os.path.join(out, name))
def term(signum, frame):
    mark('term')
    if on_term == 'exit':
        os._exit(0)
signal.signal(signal.SIGTERM, term)
p = Partitioner().create(device=0, memory='1GiB', duration=duration, kind=kind,
                         grace=grace if grace != '-' else None)
if float(held):
    declare_process(os.getpid(), 0, int(float(held) * (1 << 30)))
mark('created', p.id)
while True:
    time.sleep(0.05)
"""

# A job that ignores SIGTERM (and so does the sleep it runs: ignored signals survive exec).
IGNORES_TERM = "trap '' TERM; echo started > \"$0\"; sleep 120"


@pytest.fixture
def sim_file() -> Iterator[Path]:
    """A simulated-process declarations file every account may write (in a 0777 directory)."""
    base = shared_tmpdir("chronos-sec-sim-")
    os.chmod(base, 0o777)
    yield base / "processes.json"
    shutil.rmtree(base, ignore_errors=True)


def out_dir(prefix: str) -> Path:
    path = shared_tmpdir(prefix)
    os.chmod(path, 0o1777)
    return path


def sitecustomize(code: str) -> Path:
    """A directory whose sitecustomize.py runs ``code`` (in a daemon given it as PYTHONPATH)."""
    path = shared_tmpdir("chronos-sec-site-")
    (path / "sitecustomize.py").write_text(code)
    return path


def daemon_with_switch(
    factory: Callable[..., DaemonProcess], code: str, env_name: str, initial: str | None = None
) -> tuple[DaemonProcess, Path]:
    """A daemon whose ``sitecustomize`` runs ``code``, and the switch file ``code`` reads.

    The switch's path reaches ``code`` as ``$env_name``; a test turns a fault on by
    writing the file (``initial``: written before the daemon starts).
    """
    site = sitecustomize(code)
    switch = site / "switch"
    if initial is not None:
        switch.write_text(initial)
    daemon = factory(config=CAP, extra_env={"PYTHONPATH": str(site), env_name: str(switch)})
    return daemon, switch


def start_client(
    daemon: DaemonProcess,
    out: Path,
    duration: str = "60",
    held_gib: float = 0.0,
    kind: str = "api",
    on_term: str = "exit",
    grace: str = "-",
    user: TestUser | None = None,
    env: dict[str, str] | None = None,
) -> subprocess.Popen[bytes]:
    args = [str(out), duration, str(held_gib), kind, on_term, grace]
    client_env = {**daemon.env, **(env or {})}
    if user is None:
        proc = subprocess.Popen(
            [PY, "-c", CLIENT, *args],
            env=client_env,
            cwd="/",
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    else:
        proc = user.popen(
            user.python + ["-c", CLIENT, *args],
            client_env,
            stdin=subprocess.DEVNULL,
            start_new_session=True,
        )
    daemon.children.append(proc)
    wait_for(lambda: (out / "created").exists() or proc.poll() is not None, 20, "the client")
    assert proc.poll() is None, "the client could not create its partition"
    return proc


def created_id(out: Path) -> str:
    return (out / "created").read_text()


def gone(proc: subprocess.Popen[Any]) -> bool:
    return proc.poll() is not None


def kill(proc: subprocess.Popen[Any]) -> None:
    if proc.poll() is None:
        with contextlib.suppress(ProcessLookupError):
            proc.kill()
        proc.wait(10)


def one_line_error(proc: subprocess.CompletedProcess[str]) -> str:
    return assert_one_line_error(proc, prefix="")  # whichever command's prefix


CAP = 'memory_grace = "0.3s"\nsample_interval = "0.1s"\ngrace = "1s"\n'


# ----------------------------------------------------- 7: kind="run" from a client


def test_kind_run_from_an_api_client_does_not_spare_it_over_its_cap(
    daemon_factory: Callable[..., DaemonProcess], users: Users, sim_file: Path
) -> None:
    sim = {"CHRONOS_SIMULATED_PROCESSES": str(sim_file)}
    daemon = daemon_factory(config=CAP, extra_env=sim)
    out = out_dir("chronos-sec-run-")
    client = start_client(daemon, out, held_gib=4, kind="run", user=users.alice, env=sim)
    wait_for(lambda: (out / "term").exists() or gone(client), 10, "SIGTERM for memory over cap")
    assert (out / "term").exists(), "a client that said kind=run was never signalled"
    kill(client)


def test_kind_run_from_an_api_client_does_not_spare_it_at_expiry(
    daemon_factory: Callable[..., DaemonProcess], users: Users
) -> None:
    daemon = daemon_factory(config=CAP)
    out = out_dir("chronos-sec-run-")
    client = start_client(daemon, out, duration="2", kind="run", user=users.alice)
    wait_for(lambda: (out / "term").exists() or gone(client), 10, "SIGTERM at expiry")
    assert (out / "term").exists(), "a client that said kind=run ran on after its partition"
    kill(client)


# A client that imitates `chronos run`'s gate: kind="run", then forks a child and attaches it.
IMITATOR = """
import os, sys, signal, time
from chronos.api import Partitioner
out = sys.argv[1]
def term(signum, frame):
    open(os.path.join(out, 'term'), 'w').write(repr(time.time()))
    os._exit(0)
p = Partitioner().create(device=0, memory='1GiB', duration='2', kind='run')
child = os.fork()
if child == 0:
    time.sleep(120)
    os._exit(0)
p.attach(child)
signal.signal(signal.SIGTERM, term)
open(os.path.join(out, 'created.tmp'), 'w').write(p.id)
os.rename(os.path.join(out, 'created.tmp'), os.path.join(out, 'created'))
while True:
    time.sleep(0.05)
"""


def test_a_client_imitating_the_run_gate_is_stopped_once_its_partition_is_over(
    daemon_factory: Callable[..., DaemonProcess], users: Users
) -> None:
    daemon = daemon_factory(config=CAP)
    out = out_dir("chronos-sec-imitate-")
    client = users.alice.popen(
        [*users.alice.python, "-c", IMITATOR, str(out)],
        daemon.env,
        stdin=subprocess.DEVNULL,
        start_new_session=True,
    )
    daemon.children.append(client)
    wait_for(lambda: (out / "created").exists() or gone(client), 20, "the client")
    # Spared at expiry like a supervisor, but a real one leaves with its command (10 s).
    wait_for(lambda: (out / "term").exists() or gone(client), 25, "SIGTERM for the imitator")
    assert (out / "term").exists(), "an imitated supervisor stayed after its partition"
    assert daemon.events("supervisor_stayed")


def test_a_real_chronos_run_supervisor_is_still_spared(
    daemon_factory: Callable[..., DaemonProcess], users: Users
) -> None:
    daemon = daemon_factory(config=CAP)
    proc = users.alice.run(
        users.alice.python_argv(
            "-m", "chronos.cli", "run", "--memory", "1GiB", "--duration", "2", "--", "sleep", "30"
        ),
        daemon.env,
        timeout=30,
    )
    assert proc.returncode == 124, proc.stderr  # expired, and the supervisor said so
    assert "expired" in proc.stderr


# ----------------------------------------------------------------- 8: grace


def test_a_grace_over_max_grace_is_refused_in_one_line(
    daemon_factory: Callable[..., DaemonProcess], users: Users
) -> None:
    daemon = daemon_factory(config='max_grace = "2m"\n')
    proc = users.alice.cli("create", "0", "1GiB", "1h", "--grace", "30d", env=daemon.env)
    line = one_line_error(proc)
    assert "maximum" in line and "2m" in line, line
    assert daemon.call("list") == []


def test_a_default_grace_over_max_grace_is_a_policy_error() -> None:
    with pytest.raises(BadRequest, match="max_grace"):
        parse_config({"grace": "10m", "max_grace": "5m"})
    assert parse_config({"grace": "1m"}).grace_s == 60.0


def test_memory_held_after_the_end_stays_committed_until_the_processes_are_gone(
    daemon_factory: Callable[..., DaemonProcess], users: Users
) -> None:
    daemon = daemon_factory(config='sample_interval = "0.1s"\n')
    out = out_dir("chronos-sec-linger-")
    started = out / "started"
    job = users.alice.popen(
        [
            *users.alice.python,
            "-m",
            "chronos.cli",
            "run",
            "--memory",
            "60GiB",
            "--duration",
            "2",
            "--grace",
            "4s",
            "--",
            "sh",
            "-c",
            IGNORES_TERM,
            str(started),
        ],
        daemon.env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    daemon.children.append(job)
    wait_for(started.exists, 20, "the job to start")
    runs = daemon.call("list")
    assert len(runs) == 1
    wait_for(lambda: daemon.call("get", id=runs[0]["id"])["state"] == "expired", 10, "expiry")
    job_pids = procs.descendants([job.pid]) - {job.pid}
    assert job_pids, "the job ignores SIGTERM and must still run in its grace"

    refused = users.bob.cli("create", "0", "60GiB", "10m", env=daemon.env)
    still_running = any(procs.start_ticks(p) is not None for p in job_pids)
    assert still_running
    assert refused.returncode != 0, "admission handed out memory the ended job still holds"

    wait_for(lambda: gone(job), 15, "the job's SIGKILL")
    granted = wait_for(
        lambda: (
            (p := users.bob.cli("create", "0", "60GiB", "10m", env=daemon.env)).returncode == 0
            and p
        ),
        5,
        "bob's create once the job is gone",
    )
    assert granted


# ------------------------------------------------------- 9: duty cycling


DUTY_CYCLE = (
    "import os, sys, time\n"
    "from chronos.devices.simulated import declare_process\n"
    "open(sys.argv[1], 'w').write(repr(time.time()))\n"
    "end = time.time() + 20\n"
    "while time.time() < end:\n"
    "    declare_process(os.getpid(), 0, 8 << 30)\n"
    "    time.sleep(0.3)\n"
    "    declare_process(os.getpid(), 0, 2 << 30)\n"
    "    time.sleep(0.15)\n"
)


def test_duty_cycling_over_the_hard_cap_is_stopped(
    daemon_factory: Callable[..., DaemonProcess], tmp_path: Path
) -> None:
    # Over for 0.3 s, under for 0.15 s: never over for the whole 0.5 s grace at a stretch.
    daemon = daemon_factory(config='memory_grace = "0.5s"\nsample_interval = "0.1s"\ngrace="1s"\n')
    started = tmp_path / "started"
    began = time.monotonic()
    proc = daemon.cli(
        "run",
        "--memory",
        "4GiB",
        "--duration",
        "60",
        "--",
        PY,
        "-c",
        DUTY_CYCLE,
        str(started),
        timeout=60,
    )
    took = time.monotonic() - began
    assert started.exists(), proc.stderr
    assert proc.returncode != 0
    assert took < 10.0, f"2x the cap 68% of the time ran {took:.1f}s unstopped"
    assert daemon.events("memory_exceeded")


# ----------------------------------------- 10: other users' processes in a partition


def _cgroups_usable() -> str | None:
    if os.geteuid() != 0:
        return "placing processes in cgroups needs root"
    if not cgroups.PartitionCgroups.detect().available:
        return "no writable cgroup2 hierarchy here"
    return None


@pytest.mark.skipif(_cgroups_usable() is not None, reason=str(_cgroups_usable()))
def test_a_root_process_in_alices_cgroup_is_never_signalled_at_her_expiry(
    daemon_factory: Callable[..., DaemonProcess], users: Users
) -> None:
    daemon = daemon_factory(config='grace = "1s"\n')
    out = out_dir("chronos-sec-cg-")
    job = users.alice.popen(
        [
            *users.alice.python,
            "-m",
            "chronos.cli",
            "run",
            "--memory",
            "1GiB",
            "--duration",
            "3",
            "--",
            "sh",
            "-c",
            f"echo started > {out}/started; sleep 60",
        ],
        daemon.env,
        stdin=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
        start_new_session=True,
    )
    daemon.children.append(job)
    wait_for((out / "started").exists, 20, "alice's command")
    (partition,) = daemon.call("list")
    base = cgroups.PartitionCgroups.detect().base
    assert base is not None
    rootproc = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        (base / partition["id"] / "cgroup.procs").write_text(f"{rootproc.pid}\n")
        assert cgroups.partition_of(rootproc.pid) == partition["id"]
        job.wait(20)  # alice's command was stopped at her expiry
        # Past the SIGTERM and the SIGKILL after the 1 s grace:
        wait_for(lambda: daemon.events("sigterm", partition=partition["id"]), 5, "the SIGTERM")
        end = time.monotonic() + 2.0
        wait_for(lambda: time.monotonic() > end or rootproc.poll() is not None, 5, "the grace")
        assert rootproc.poll() is None, "chronosd signalled a root process for alice's expiry"
        for record in daemon.events("sigterm") + daemon.events("sigkill"):
            assert rootproc.pid not in record.get("processes", [])
    finally:
        rootproc.kill()
        rootproc.wait(10)


class _Cgroups:
    """Stands in for PartitionCgroups: ``place`` lets the test change the process meanwhile."""

    available = True

    def __init__(self, during_place: Callable[[int], None]) -> None:
        self.during_place = during_place
        self.placed: list[int] = []
        self.unplaced: list[int] = []

    def place(self, partition_id: str, pid: int) -> bool:
        self.placed.append(pid)
        self.during_place(pid)
        return True

    def unplace(self, pid: int, origin: str | None) -> bool:
        self.unplaced.append(pid)
        return True


def _one_gib(duration_s: float, uid: int = 0, warn_s: float | None = None) -> NewPartition:
    """1 GiB of an 80 GiB GPU-0 for root (the user these tests run as)."""
    return NewPartition(
        device=0,
        device_uuid="GPU-0",
        device_total_bytes=80 * GIB,
        capacity_bytes=80 * GIB,
        memory_bytes=GIB,
        uid=uid,
        user="root",
        duration_s=duration_s,
        warn_s=warn_s,
    )


def _service(tmp_path: Path) -> tuple[Service, str]:
    ledger = Ledger(tmp_path / "ledger.db")
    record = ledger.create(_one_gib(600.0, uid=os.getuid()))
    return Service(ledger, Config(), "daemon"), record.id


def test_attach_is_undone_when_the_process_is_not_the_one_checked_after_placing(
    tmp_path: Path,
) -> None:
    service, partition_id = _service(tmp_path)
    victim = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)

    def recycle(pid: int) -> None:  # the checked process exits while it is being placed
        victim.kill()
        victim.wait(10)

    fake = _Cgroups(recycle)
    service.cgroups = fake  # type: ignore[assignment]
    caller = Caller(uid=os.getuid(), gid=os.getgid(), pid=None, user="root", is_admin=True)
    with pytest.raises(BadRequest, match="exited while it was being attached"):
        service.op_attach(caller, AttachRequest(id=partition_id, pid=victim.pid))
    assert fake.unplaced == [victim.pid], "the placement was not undone"
    assert service.ledger.attached(partition_id) == []
    service.close()


# --------------------------------------------------- 11: pidfds that fail


NO_PIDFD = (
    "import errno, os\n"
    "def _refuse(pid, flags=0):\n"
    "    raise OSError(errno.ENOSYS, 'pidfd_open blocked (test)')\n"
    "os.pidfd_open = _refuse\n"
)


def _cpu_seconds(pid: int) -> float:
    with open(f"/proc/{pid}/stat", "rb") as f:
        raw = f.read()
    fields = raw[raw.rfind(b")") + 2 :].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def test_without_pidfds_expiry_signals_and_owner_death_is_noticed_without_spinning(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    site = sitecustomize(NO_PIDFD)
    daemon = daemon_factory(config=CAP, extra_env={"PYTHONPATH": str(site)})
    assert daemon.proc is not None
    expiring, owner = out_dir("chronos-sec-pidfd-"), out_dir("chronos-sec-pidfd-")
    client = start_client(daemon, expiring, duration="3")
    watched = start_client(daemon, owner, duration="600")
    cpu_before, wall_before = _cpu_seconds(daemon.proc.pid), time.monotonic()
    wait_for(lambda: (expiring / "term").exists() or gone(client), 10, "SIGTERM at expiry")
    assert (expiring / "term").exists(), "expiry signalled nothing where pidfd_open fails"
    cpu = _cpu_seconds(daemon.proc.pid) - cpu_before
    wall = time.monotonic() - wall_before
    assert cpu < 0.5 * wall, f"the daemon spun: {cpu:.2f}s of CPU in {wall:.2f}s"

    partition_id = created_id(owner)
    watched.kill()
    watched.wait(10)
    wait_for(lambda: daemon.call("get", id=partition_id)["state"] == "released", 5, "owner death")
    kill(client)


def test_a_pidfd_open_out_of_descriptors_still_signals_the_process(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    def exhausted(pid: int, flags: int = 0) -> int:
        raise OSError(errno.EMFILE, "Too many open files")

    sleeper = subprocess.Popen(["sleep", "60"], stdin=subprocess.DEVNULL)
    try:
        ticks = procs.start_ticks(sleeper.pid)
        monkeypatch.setattr(os, "pidfd_open", exhausted)
        assert procs.signal_process(sleeper.pid, ticks, signal.SIGTERM)
        assert sleeper.wait(10) == -signal.SIGTERM
        assert not procs.signal_process(sleeper.pid, ticks, signal.SIGTERM)  # reaped: gone
    finally:
        kill(sleeper)


# ------------------------------------------- 2 + 15: signals never wait on a write


FAILING_WRITES = """
import os, sqlite3
_connect = sqlite3.connect
_flag = os.environ['CHRONOS_TEST_WRITES_FAIL']
class _Failing(sqlite3.Connection):
    def execute(self, sql, *args):
        if sql.startswith('BEGIN') and os.path.exists(_flag):
            raise sqlite3.OperationalError('database or disk is full')
        return super().execute(sql, *args)
def _connect_failing(*args, **kwargs):
    kwargs.setdefault('factory', _Failing)
    return _connect(*args, **kwargs)
sqlite3.connect = _connect_failing
"""


def test_expiry_signals_and_kills_when_the_ledger_cannot_be_written(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon, flag = daemon_with_switch(daemon_factory, FAILING_WRITES, "CHRONOS_TEST_WRITES_FAIL")
    out = out_dir("chronos-sec-full-")
    client = start_client(daemon, out, duration="2", on_term="ignore")
    flag.write_text("")  # from now on every write transaction fails, as on a full disk
    wait_for(lambda: (out / "term").exists(), 10, "SIGTERM at expiry with failing writes")
    wait_for(lambda: gone(client), 10, "SIGKILL after the grace with failing writes")
    assert client.returncode == -signal.SIGKILL
    assert daemon.events("deadline_failed"), "the failure was not logged"
    flag.unlink()


NO_DESCRIPTORS_FOR_PROC = """
import builtins, errno, os
_open = builtins.open
_flag = os.environ['CHRONOS_TEST_PROC_EMFILE']
def _open_or_emfile(file, *args, **kwargs):
    if isinstance(file, str) and file.startswith('/proc/') and os.path.exists(_flag):
        raise OSError(errno.EMFILE, 'Too many open files')
    return _open(file, *args, **kwargs)
builtins.open = _open_or_emfile
"""


def test_an_expiry_recorded_while_descriptors_ran_out_is_still_signalled_later(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    daemon, flag = daemon_with_switch(
        daemon_factory, NO_DESCRIPTORS_FOR_PROC, "CHRONOS_TEST_PROC_EMFILE"
    )
    out = out_dir("chronos-sec-emfile-")
    client = start_client(daemon, out, duration="2")
    partition_id = created_id(out)
    flag.write_text("")  # the daemon cannot open /proc any more (as under EMFILE)
    wait_for(lambda: daemon.call("get", id=partition_id)["state"] == "expired", 10, "expiry")
    wait_for(lambda: "Too many open files" in daemon.log_text(), 5, "the daemon to hit EMFILE")
    assert not (out / "term").exists()
    flag.unlink()  # descriptors are back: the timer chain must still be alive
    wait_for(lambda: (out / "term").exists() or gone(client), 10, "the SIGTERM, retried")
    assert (out / "term").exists()
    kill(client)


# ------------------------------------------------------ 17: wall-clock steps


STEPPED_CLOCK = """
import os, time
_time = time.time
_offset = os.environ['CHRONOS_TEST_CLOCK_OFFSET']
def _stepped():
    try:
        with open(_offset) as f:
            return _time() + float(f.read() or 0)
    except (OSError, ValueError):
        return _time()
time.time = _stepped
"""


@pytest.fixture
def stepped_daemon(daemon_factory: Callable[..., DaemonProcess]) -> tuple[DaemonProcess, Path]:
    daemon, offset = daemon_with_switch(
        daemon_factory, STEPPED_CLOCK, "CHRONOS_TEST_CLOCK_OFFSET", initial="0"
    )
    return daemon, offset


def test_a_wall_clock_step_forward_does_not_expire_partitions(
    stepped_daemon: tuple[DaemonProcess, Path],
) -> None:
    daemon, offset = stepped_daemon
    out = out_dir("chronos-sec-clock-")
    created = time.monotonic()
    client = start_client(daemon, out, duration="4")
    offset.write_text(str(86400.0))  # date -s tomorrow
    partition_id = created_id(out)
    assert daemon.call("get", id=partition_id)["state"] == "active"
    assert [r["id"] for r in daemon.call("list")] == [partition_id]
    wait_for(lambda: (out / "term").exists() or gone(client), 10, "SIGTERM at the real end")
    lived = time.monotonic() - created
    assert lived >= 3.5, f"a +1 day step ended a 4 s partition after {lived:.1f}s"
    wait_for(lambda: daemon.events("clock_stepped"), 5, "the step to be logged")
    kill(client)


def test_a_wall_clock_step_back_does_not_extend_partitions(
    stepped_daemon: tuple[DaemonProcess, Path],
) -> None:
    daemon, offset = stepped_daemon
    out = out_dir("chronos-sec-clock-")
    created = time.monotonic()
    client = start_client(daemon, out, duration="3")
    offset.write_text(str(-3600.0))
    wait_for(lambda: (out / "term").exists() or gone(client), 10, "SIGTERM after a -1 h step")
    assert (out / "term").exists()
    assert time.monotonic() - created < 8.0
    kill(client)


# -------------------------------------------- 20: start-up reads bounded history


def test_start_up_reads_only_the_history_of_open_partitions(tmp_path: Path) -> None:
    clock = SteadyClock()
    ledger = Ledger(tmp_path / "ledger.db", clock=clock.now)
    now = time.time()
    for _ in range(3):
        old = ledger.create(_one_gib(1.0, warn_s=0.5))
        ledger.log("warned", old.id)
    ledger.create(_one_gib(600.0, warn_s=60.0))
    asked: list[float | None] = []
    events = ledger.events

    def recording(since: float | None = None, partition_id: str | None = None, **kw: Any) -> Any:
        asked.append(since)
        return events(since, partition_id, **kw)

    ledger.events = recording  # type: ignore[method-assign]

    async def start() -> None:
        deadlines = Deadlines(ledger, lambda: 30.0, clock=clock)
        deadlines.resume_kills()
        deadlines.close()

    asyncio.run(start())
    assert asked, "start-up read no events at all"
    oldest_allowed = now - 2 * 86400.0
    assert all(s is not None and s >= oldest_allowed for s in asked), asked
    ledger.close()
