"""Slurm job start with and without Chronos's node hooks: sbatch → the job's first line.

Run (root, with Debian's slurm-wlm and munge installed):
    .venv/bin/python benchmarks/bench_slurm.py [--jobs 20] [--no-doc]

One real Slurm on this machine (munge, slurmctld, two slurmd nodes with fake GPUs
and a simulated-backend chronosd each: the test suite's cluster, tests/slurm/support.py).
Each job asks for ``--gres=shard:2`` on node ci0 and its script writes
``time.time()`` as its first act; latency = that − the instant before ``sbatch``.
The two configurations alternate in blocks (slurm.conf rewritten, ``scontrol
reconfigure``), so both see the same load: **without** hooks, and **with**
Chronos's Prolog (creates the partition through chronosd), TaskProlog (exports
the caps) and Epilog (releases it), each run as ``python3 -I -S …/hook.py``.
Also timed: the hooks alone, run by hand outside Slurm (interpreter start included).
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from pathlib import Path

import _common as C

sys.path.insert(0, str(C.ROOT / "tests"))

from chronos_testing import PY, wait_for  # noqa: E402
from slurm.support import HOOK, SlurmCluster, missing_binaries  # noqa: E402

BLOCK = 5
ALONE = {
    "prolog": "policy + scontrol show job, for a job Slurm does not know",
    "epilog": "list, nothing to release",
    "taskprolog": "list, no partition",
}


def one_job(cluster: SlurmCluster, tag: str) -> float:
    mark = cluster.out / f"{tag}.t"
    script = cluster.base / "jobs" / f"{tag}.sh"
    script.write_text(
        f"#!{cluster.user_python}\nimport time\nopen('{mark}', 'w').write(repr(time.time()))\n"
    )
    os.chmod(script, 0o755)
    t0 = time.time()
    proc = cluster.slurm(
        "sbatch", "--parsable", "-w", "ci0", "--gres=shard:2", "-t", "1", "-o", "/dev/null",
        str(script),
    )  # fmt: skip
    assert proc.returncode == 0, proc.stderr
    job = proc.stdout.strip()
    wait_for(lambda: mark.exists() and mark.read_text(), 60, what=f"job {job}", interval=0.005)
    started = float(mark.read_text())
    wait_for(lambda: cluster.state(job) == "COMPLETED", 60, what=f"job {job} done", interval=0.05)
    return started - t0


def hook_alone(cluster: SlurmCluster, name: str, runs: int) -> list[float]:
    """The hook run by hand as slurmd would, against a job id with no partition."""
    daemon = cluster.daemons["ci0"]
    env = {
        **cluster.env,
        "SLURM_JOB_ID": "999999",
        "SLURMD_NODENAME": "ci0",
        "SLURM_JOB_GPUS": "0",
        "CHRONOS_SOCKET": str(daemon.sock),
        "CHRONOS_CONFIG": str(daemon.config_path),
    }
    out = []
    for _ in range(runs):
        t0 = time.perf_counter()
        subprocess.run([PY, "-I", "-S", str(HOOK), name], env=env, capture_output=True, check=True)
        out.append(time.perf_counter() - t0)
    return out


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=20, help="jobs per configuration")
    args = parser.parse_args()
    if os.geteuid() != 0 or missing_binaries():
        print("needs root and slurm-wlm + munge installed", file=sys.stderr)
        return 2
    C.wait_for_quiet()
    meter = C.LoadMeter()
    info = C.machine_info()
    cluster = SlurmCluster().start()
    times: dict[str, list[float]] = {"without hooks": [], "with hooks": []}
    try:
        n = 0
        while min(len(v) for v in times.values()) < args.jobs:
            for label, hooks in (("without hooks", False), ("with hooks", True)):
                cluster.set_hooks(hooks)
                for _ in range(min(BLOCK, args.jobs - len(times[label]))):
                    n += 1
                    times[label].append(one_job(cluster, f"b{n}"))
        cluster.set_hooks(True)
        alone = {
            name: hook_alone(cluster, name, args.jobs)
            for name in ("prolog", "epilog", "taskprolog")
        }
    finally:
        cluster.stop()
    rows = [C.stat_row(label, sorted(v)) for label, v in times.items()]
    rows += [C.stat_row(f"{name} alone ({ALONE[name]})", sorted(v)) for name, v in alone.items()]
    C.banner("sbatch → job's first line (ms)")
    print(C.text_table(C.STAT_HEADERS, rows))
    info["other processes during the run"] = f"{meter.others():.0%} CPU busy"
    if not args.no_doc:
        body = (
            "## Slurm: job start with and without the Chronos hooks\n\n"
            f"`benchmarks/bench_slurm.py`, {args.jobs} jobs per configuration, alternating in "
            f"blocks of {BLOCK} (`--gres=shard:2`, one node, a real Slurm 22.05 on this machine). "
            "Latency = the job's first line − the instant before `sbatch`; with hooks, the "
            "Prolog creates the job's partition through the node's chronosd and the TaskProlog "
            "exports its caps. The last rows time a hook alone, started by hand as slurmd "
            "does (`python3 -I -S hook.py`, interpreter start included). Slurm's own launch "
            "dominates the first two rows; on a loaded machine they can be within noise of "
            "each other (see the load below).\n\n"
            + C.md_table(C.STAT_HEADERS, rows)
            + "\n\n"
            + C.machine_markdown(info)
        )
        C.update_section("slurm", body)
        print(f"updated {Path(C.DOC).relative_to(C.ROOT)} (section slurm)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
