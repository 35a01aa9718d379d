"""A real Slurm on this machine for the Slurm tests: munge, slurmctld, two slurmd nodes.

Everything lives under one directory in /tmp: its own munge key and socket,
non-default ports, two nodes ``ci0``/``ci1`` on 127.0.0.1 (Debian's build has
``MULTIPLE_SLURMD``), each with two fake GPUs (character devices ``c 195 N``, so
``ConstrainDevices`` treats them as GPUs) and its own simulated-backend chronosd
(own socket, state directory and policy). slurm.conf's Prolog, Epilog and
TaskProlog are wrappers that point Chronos's hook at the node's own daemon.
"""

from __future__ import annotations

import contextlib
import os
import pwd
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import Any

from chronos_testing import (
    PY,
    SRC,
    DaemonProcess,
    TestUser,
    shared_tmpdir,
    user_python_candidates,
    wait_for,
)

from chronos import procs
from chronos.slurm.settings import job_of

NODES = ("ci0", "ci1")
SHARDS_PER_GPU = 80


def free_ports(count: int) -> list[int]:
    """Ports nothing listens on now (chosen by the kernel), so that two clusters (two
    developers' runs on one machine) do not take each other's."""
    socks = [socket.socket() for _ in range(count)]
    try:
        for s in socks:
            s.bind(("127.0.0.1", 0))
        return [s.getsockname()[1] for s in socks]
    finally:
        for s in socks:
            s.close()


HOOK = SRC / "chronos" / "slurm" / "hook.py"
BINARIES = ("munged", "mungekey", "slurmctld", "slurmd", "sbatch", "squeue", "scontrol")
LUA_PLUGIN = Path("/usr/lib/x86_64-linux-gnu/slurm-wlm/job_submit_lua.so")


def missing_binaries() -> list[str]:
    return [b for b in BINARIES if shutil.which(b) is None and not Path(f"/usr/sbin/{b}").exists()]


def world_runnable(path: str) -> bool:
    """Whether any user can run ``path`` (every folder on the way o+x), whatever root sees."""
    real = Path(os.path.realpath(path))
    return all(p.stat().st_mode & 0o001 for p in [real, *real.parents])


def job_python() -> tuple[str, dict[str, str]]:
    """An interpreter Slurm's tasks (plain user processes) can run, with its PYTHONPATH."""
    for python, extra in user_python_candidates():
        if world_runnable(python[0]):
            return python[0], extra
    raise RuntimeError("no Python interpreter that every user can run")


def cgroup_v1_available() -> bool:
    return Path("/sys/fs/cgroup/freezer").is_dir() and Path("/sys/fs/cgroup/devices").is_dir()


def node_policy(node: str, base: Path, extra: str = "") -> str:
    return (
        'metrics_address = "127.0.0.1:0"\n'
        "[slurm]\n"
        "enabled = true\n"
        f'node_name = "{node}"\n'
        f'gres_conf = "{base}/gres.conf"\n'
        'reconcile_interval = "1s"\n'
        'end_margin = "30s"\n' + extra
    )


class SlurmCluster:
    def __init__(self, proctrack: str | None = None) -> None:
        self.base = shared_tmpdir("chronos-slurm-")
        self.user_python, self.user_env = job_python()
        self.cgroups = (
            proctrack or ("cgroup" if cgroup_v1_available() else "linuxproc")
        ) == "cgroup"
        self.conf = self.base / "slurm.conf"
        ctld, ci0, ci1 = free_ports(3)
        self.ctld_port, self.node_ports = ctld, {"ci0": ci0, "ci1": ci1}
        self.out = self.base / "out"
        self.daemons: dict[str, DaemonProcess] = {}
        self.procs: list[subprocess.Popen[bytes]] = []
        self.env = {
            "PATH": os.environ.get("PATH", "/usr/bin:/bin:/usr/sbin:/sbin"),
            "SLURM_CONF": str(self.conf),
        }

    # ------------------------------------------------------------------ set-up

    def start(self) -> SlurmCluster:
        for sub in ("state", "spool", "log", "munge", "jobs"):
            (self.base / sub).mkdir()
        self.out.mkdir(mode=0o1777)
        for node in NODES:  # the hooks' stderr (the TaskProlog's too, written as the user)
            (self.base / "log" / f"hooks-{node}.log").touch()
            os.chmod(self.base / "log" / f"hooks-{node}.log", 0o666)
        os.chmod(self.out, 0o1777)
        os.chmod(self.base / "jobs", 0o755)
        self._start_munge()
        self.lua = LUA_PLUGIN.exists()
        if self.lua:  # Chronos's job_submit.lua for the whole cluster: no surprises either
            lua = (SRC / "chronos" / "slurm" / "job_submit.lua").read_text()
            lua = lua.replace("PARTITION_CAPS = {}", "PARTITION_CAPS = { debug = 60 }")
            (self.base / "job_submit.lua").write_text(lua)
            os.chmod(self.base / "job_submit.lua", 0o644)
        for node in NODES:
            self._make_node(node)
        self._write_conf()
        for node in NODES:
            self.daemons[node].start()
        self._spawn(["slurmctld", "-D", "-f", str(self.conf)], "slurmctld")
        for node in NODES:
            self._spawn(["slurmd", "-D", "-N", node, "-f", str(self.conf)], f"slurmd-{node}")
        wait_for(self._all_idle, 30, what="both Slurm nodes idle", interval=0.2)
        return self

    def _start_munge(self) -> None:
        munge = pwd.getpwnam("munge")
        key = self.base / "munge" / "munge.key"
        subprocess.run(["mungekey", "--create", f"--keyfile={key}"], check=True)
        for path in (self.base / "munge", key):
            os.chown(path, munge.pw_uid, munge.pw_gid)
        os.chmod(key, 0o400)
        os.chmod(self.base / "munge", 0o711)
        self.munge_socket = self.base / "munge" / "munge.socket.2"
        self._spawn(
            [
                "runuser", "-u", "munge", "--", "/usr/sbin/munged", "--foreground",
                f"--socket={self.munge_socket}", f"--key-file={key}",
                f"--pid-file={self.base}/munge/munged.pid",
                f"--log-file={self.base}/munge/munged.log",
                f"--seed-file={self.base}/munge/munged.seed",
            ],
            "munged",
        )  # fmt: skip
        wait_for(self.munge_socket.exists, 10, what="munged's socket")

    def _make_node(self, node: str) -> None:
        home = self.base / node
        home.mkdir(mode=0o755)
        for gpu in range(2):
            os.mknod(home / f"nvidia{gpu}", 0o666 | 0o020000, os.makedev(195, gpu))
        sim = home / "sim"
        sim.mkdir()
        os.chmod(sim, 0o1777)
        daemon = DaemonProcess(
            home / "chronos",
            extra_env={
                "SLURM_CONF": str(self.conf),
                "CHRONOS_SIMULATED_PROCESSES": str(sim / "processes.json"),
            },
            config=None,
        )
        (home / "chronos").mkdir(mode=0o755)
        daemon.write_config(node_policy(node, self.base))
        daemon.env["CHRONOS_CONFIG"] = str(daemon.config_path)
        daemon.daemon_env["CHRONOS_CONFIG"] = str(daemon.config_path)
        self.daemons[node] = daemon
        env_file = home / "chronos.env"
        env_file.write_text(
            f"export CHRONOS_SOCKET={daemon.sock}\n"
            f"export CHRONOS_CONFIG={daemon.config_path}\n"
            f"export CHRONOS_HOME={daemon.state_dir}\n"
        )
        os.chmod(env_file, 0o644)

    def _hook_wrapper(self, name: str, python: str) -> Path:
        path = self.base / name
        path.write_text(
            "#!/bin/sh\n"
            f'. "{self.base}/$SLURMD_NODENAME/chronos.env"\n'
            f'exec {python} -I -S "{HOOK}" {name} 2>>"{self.base}/log/hooks-$SLURMD_NODENAME.log"\n'
        )
        os.chmod(path, 0o755)
        return path

    def set_hooks(self, enabled: bool) -> None:
        """Rewrite slurm.conf with or without Chronos's hooks and have Slurm reread it."""
        self._write_conf(hooks=enabled)
        proc = self.slurm("scontrol", "reconfigure")
        assert proc.returncode == 0, proc.stderr
        wait_for(self._all_idle, 30, what="both Slurm nodes idle again", interval=0.2)

    def _write_conf(self, hooks: bool = True) -> None:
        nodes = "".join(
            f"NodeName={n} NodeAddr=127.0.0.1 Port={self.node_ports[n]} CPUs=8 RealMemory=1000 "
            f"Gres=gpu:g0:1,gpu:g1:1,shard:g0:{SHARDS_PER_GPU},shard:g1:{SHARDS_PER_GPU} "
            "State=UNKNOWN\n"
            for n in NODES
        )
        gres = "".join(
            f"NodeName={n} Name=gpu Type=g{g} File={self.base}/{n}/nvidia{g}\n"
            f"NodeName={n} Name=shard Type=g{g} Count={SHARDS_PER_GPU} "
            f"File={self.base}/{n}/nvidia{g}\n"
            for n in NODES
            for g in range(2)
        )
        (self.base / "gres.conf").write_text(gres)
        tracking = (
            "ProctrackType=proctrack/cgroup\nTaskPlugin=task/cgroup\n"
            if self.cgroups
            else "ProctrackType=proctrack/linuxproc\nTaskPlugin=task/none\n"
        )
        (self.base / "cgroup.conf").write_text(
            "CgroupPlugin=cgroup/v1\nCgroupMountpoint=/sys/fs/cgroup\nCgroupAutomount=no\n"
            "ConstrainDevices=yes\n"
        )
        self.conf.write_text(
            f"ClusterName=chronosci\nSlurmctldHost=localhost(127.0.0.1)\nSlurmctldPort={self.ctld_port}\n"
            f"SlurmUser=root\nAuthType=auth/munge\nAuthInfo=socket={self.munge_socket}\n"
            f"StateSaveLocation={self.base}/state\nSlurmdSpoolDir={self.base}/spool/%n\n"
            f"SlurmctldPidFile={self.base}/slurmctld.pid\nSlurmdPidFile={self.base}/slurmd-%n.pid\n"
            f"SlurmctldLogFile={self.base}/log/slurmctld.log\n"
            f"SlurmdLogFile={self.base}/log/slurmd-%n.log\n"
            "MailProg=/bin/true\nMpiDefault=none\nSelectType=select/cons_tres\n"
            "SelectTypeParameters=CR_Core\n" + tracking + "JobAcctGatherType=jobacct_gather/none\n"
            "SlurmdParameters=config_overrides\nReturnToService=2\nKillWait=2\n"
            # sched_interval: the main scheduler every 2 s, not 60 (a requeued job waits for it)
            "SchedulerParameters=bf_interval=1,sched_interval=2\nPrologFlags=Alloc\n"
            "GresTypes=gpu,shard\n"
            + (
                f"Prolog={self._hook_wrapper('prolog', PY)}\n"
                f"Epilog={self._hook_wrapper('epilog', PY)}\n"
                f"TaskProlog={self._hook_wrapper('taskprolog', self.user_python)}\n"
                if hooks
                else ""
            )
            + ("JobSubmitPlugins=lua\n" if (self.base / "job_submit.lua").exists() else "")
            + nodes
            + "PartitionName=debug Nodes=ALL Default=YES MaxTime=60 State=UP\n"
        )
        for path in (self.conf, self.base / "gres.conf", self.base / "cgroup.conf"):
            os.chmod(path, 0o644)

    def _spawn(self, argv: list[str], name: str) -> None:
        log = open(self.base / "log" / f"{name}.stderr", "wb")  # noqa: SIM115 - child holds it
        self.procs.append(
            subprocess.Popen(
                argv,
                env={**self.env, "SLURM_CONF": str(self.conf)},
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,
            )
        )
        log.close()

    def _all_idle(self) -> bool:
        proc = self.slurm("sinfo", "-h", "-N", "-o", "%N %T")
        states = dict(line.split() for line in proc.stdout.splitlines() if line.strip())
        return proc.returncode == 0 and all(states.get(n) == "idle" for n in NODES)

    def stop(self) -> None:
        self._cancel_all_jobs()
        for proc in reversed(self.procs):
            if proc.poll() is None:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(proc.pid, signal.SIGTERM)
        for proc in self.procs:
            try:
                proc.wait(10)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)
                proc.wait(10)
        pidfile = self.base / "munge" / "munged.pid"  # runuser does not pass SIGTERM on
        with contextlib.suppress(OSError, ValueError):
            os.kill(int(pidfile.read_text().split()[0]), signal.SIGTERM)
        self._kill_leftover_stepds()
        for daemon in self.daemons.values():
            daemon.cleanup()
        if self.cgroups:
            self._remove_job_cgroups()
        shutil.rmtree(self.base, ignore_errors=True)

    def _cancel_all_jobs(self) -> None:
        """End every job first: a job step's slurmstepd outlives slurmd otherwise."""
        with contextlib.suppress(OSError, subprocess.SubprocessError):
            self.slurm("scancel", "--full", "--partition=debug", timeout=10)
            with contextlib.suppress(AssertionError):
                wait_for(
                    lambda: self.slurm("squeue", "-h", timeout=10).stdout.strip() == "",
                    20,
                    what="every job gone",
                    interval=0.2,
                )

    def _kill_leftover_stepds(self) -> None:
        """slurmstepd processes of this cluster (they carry its SLURM_CONF) still alive."""
        mine = f"SLURM_CONF={self.conf}".encode()
        for pid in procs.all_pids():
            try:
                if Path(f"/proc/{pid}/comm").read_text().strip() != "slurmstepd":
                    continue
                if mine in Path(f"/proc/{pid}/environ").read_bytes().split(b"\0"):
                    os.kill(pid, signal.SIGKILL)
            except OSError:
                continue

    def _remove_job_cgroups(self) -> None:
        for controller in Path("/sys/fs/cgroup").iterdir():
            for node in NODES:
                top = controller / f"slurm_{node}"
                if top.is_dir():
                    for path in sorted(top.rglob("*"), key=lambda p: -len(p.parts)):
                        if path.is_dir():
                            with contextlib.suppress(OSError):
                                path.rmdir()
                    with contextlib.suppress(OSError):
                        top.rmdir()

    # ------------------------------------------------------------------ using it

    def slurm(self, *argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
        return subprocess.run(
            list(argv), env=self.env, capture_output=True, text=True, timeout=timeout
        )

    def submit(self, user: TestUser, *args: str, script: str) -> str:
        """``sbatch ARGS SCRIPT`` as ``user``; the job id."""
        path = self.base / "jobs" / f"job-{time.monotonic_ns()}.sh"
        path.write_text(script)
        os.chmod(path, 0o755)
        proc = user.run(
            user.argv("sbatch", "--parsable", "-o", f"{self.out}/%j.out", *args, str(path)),
            {**self.env, **self.user_env},
        )
        assert proc.returncode == 0, proc.stderr
        return proc.stdout.strip().split(";")[0]

    def holds_memory(
        self, user: TestUser, gib: dict[str, float], hold: float, *args: str, nodes: int = 1
    ) -> str:
        """A job whose task on each node declares ``gib[node]`` GiB on its GPU for ``hold`` s."""
        program = self.base / "jobs" / "holds_memory.py"
        if not program.exists():
            program.write_text(HOLDS_MEMORY)
            os.chmod(program, 0o644)
        per_node = ",".join(f"{n}={g}" for n, g in gib.items())
        launch = "srun " if nodes > 1 else "exec "
        script = f"#!/bin/sh\n{launch}{self.user_python} {program} {per_node} {hold} {self.out}\n"
        return self.submit(user, f"--nodes={nodes}", *args, script=script)

    def mark(self, job_id: str, node: str, what: str) -> Path:
        return self.out / f"{job_id}-{node}.{what}"

    def job(self, job_id: str) -> dict[str, str]:
        proc = self.slurm("scontrol", "show", "job", "-o", job_id)
        fields: dict[str, str] = {}
        for token in proc.stdout.split():
            key, _, value = token.partition("=")
            fields.setdefault(key, value)
        return fields

    def state(self, job_id: str) -> str:
        return self.job(job_id).get("JobState", "?")

    def wait_state(self, job_id: str, states: set[str], timeout: float = 30) -> str:
        return str(
            wait_for(
                lambda: (s := self.state(job_id)) in states and s,
                timeout,
                what=f"job {job_id} in {states} (now {self.state(job_id)})",
                interval=0.1,
            )
        )

    def partitions(self, node: str, job_id: str, all: bool = False) -> list[dict[str, Any]]:
        records = self.daemons[node].call("list", all=all)
        return [r for r in records if job_of(r["kind"]) == job_id]

    def output(self, job_id: str) -> str:
        path = self.out / f"{job_id}.out"
        return path.read_text() if path.exists() else ""

    def node_state(self, node: str) -> str:
        return self.slurm("sinfo", "-h", "-n", node, "-o", "%T").stdout.strip()

    def hook_log(self, node: str) -> str:
        path = self.base / "log" / f"hooks-{node}.log"
        return path.read_text() if path.exists() else ""

    def logs(self) -> str:
        return "\n".join(
            f"== {p.name}\n{p.read_text(errors='replace')[-3000:]}"
            for p in sorted((self.base / "log").iterdir())
        )


HOLDS_MEMORY = """
import json, os, sys, time
from chronos.devices.simulated import declare_process
node = os.environ["SLURMD_NODENAME"]
gib = float(dict(a.split("=") for a in sys.argv[1].split(","))[node])
hold, marks = float(sys.argv[2]), sys.argv[3]
os.environ["CHRONOS_SIMULATED_PROCESSES"] = f"{marks}/../{node}/sim/processes.json"
job = os.environ["SLURM_JOB_ID"]
keep = ("CHRONOS_", "CUDA_", "SLURM_JOB_GPUS")
seen = {k: v for k, v in os.environ.items() if k.startswith(keep)}
seen["t0"] = time.time()
with open(f"{marks}/{job}-{node}.start", "w") as f:
    json.dump(seen, f)
declare_process(os.getpid(), int(os.environ["SLURM_JOB_GPUS"]), int(gib * (1 << 30)))
time.sleep(hold)
open(f"{marks}/{job}-{node}.done", "w").close()
"""
