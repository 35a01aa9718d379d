"""Batch jobs: grant → the job's first instruction, beside ``chronos run``'s, through chronosd.

Run: .venv/bin/python benchmarks/bench_submit.py [--runs 30] [--no-doc]

What a job's user waits for once their share is free is the start: the daemon forks
the stub as the user, places it in the partition, opens the gate, and the stub opens
the output and execs the command. Each job's command is ``/bin/date +%s.%N``: its
output is the wall time of its first instruction, and the partition's ``created_at``
is the grant (a job granted at submit). ``chronos run`` does the same steps in the
client (create, fork the gated child, attach, exec); its figure is measured the same
way, from its partition's ``created_at`` to the command's first instruction, in the
same run, interleaved, so load hits both alike.
"""

from __future__ import annotations

import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

import _common as C  # noqa: E402

COMMAND = ["/bin/date", "+%s.%N"]


def one_job(client: object, out_dir: Path, n: int) -> float:
    from chronos.api import Partitioner

    assert isinstance(client, Partitioner)
    output = out_dir / f"job{n}.out"
    job = client.submit(
        COMMAND,
        partition={"device": 0, "memory": 0.1, "duration": 60},
        output=str(output),
        cwd=str(out_dir),
    )
    deadline = time.monotonic() + 30
    while (state := client.jobs(id=job["id"])[0])["state"] not in ("done", "failed"):
        if time.monotonic() > deadline:
            raise RuntimeError(f"job {job['id']} did not end: {state}")
        time.sleep(0.01)
    if state["state"] != "done":
        raise RuntimeError(f"job {job['id']} failed: {state['reason']}")
    started = float(output.read_text())
    granted = client.get(state["partition_id"]).created_at.timestamp()
    return started - granted


def one_run(client: object, env: dict[str, str]) -> float:
    from chronos.api import Partitioner

    assert isinstance(client, Partitioner)
    cmd = C.cli_command("run", "--memory", "0.1", "--duration", "60", "--", *COMMAND)
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True, check=True)
    started = float(proc.stdout)
    newest = max(client.records(all=True), key=lambda r: float(r["created_at"]))
    return started - float(newest["created_at"])


def main() -> int:
    parser = C.base_parser(__doc__.splitlines()[0])
    parser.add_argument("--runs", type=int, default=30)
    args = parser.parse_args()
    timed: dict[str, list[float]] = {"chronos submit: grant → first instruction": [],
                                     "chronos run: create → first instruction": []}  # fmt: skip
    with C.fresh_env("daemon") as (home, env), tempfile.TemporaryDirectory() as out:
        info = C.machine_info(home)
        meter = C.LoadMeter()
        with C.DaemonProcess(home, env):
            from chronos import Partitioner

            with Partitioner() as client:
                for n in range(args.runs + 3):  # three warm-up rounds
                    job_s = one_job(client, Path(out), n)
                    run_s = one_run(client, env)
                    if n >= 3:
                        timed["chronos submit: grant → first instruction"].append(job_s)
                        timed["chronos run: create → first instruction"].append(run_s)
        busy = meter.others()
    rows = [C.stat_row(key, values) for key, values in timed.items()]
    C.banner(f"Batch job start through chronosd ({args.runs} jobs and runs, interleaved)")
    print(C.text_table(C.STAT_HEADERS, rows))
    print(f"CPUs busy with other work during the run: {busy:.0%}")
    if not args.no_doc:
        body = "\n\n".join(
            [
                "## Batch job start (`benchmarks/bench_submit.py`)",
                f"{args.runs} jobs (`/bin/date +%s.%N`, granted at submit) and as many "
                "`chronos run` of the same command, interleaved: from the partition's "
                "`created_at` (the grant) to the command's first instruction.",
                C.md_table(C.STAT_HEADERS, rows),
                C.machine_markdown(info, {"other load": f"{busy:.0%} of the CPUs"}),
            ]
        )
        C.update_section("submit", body)
    return 0


if __name__ == "__main__":
    os.umask(0o022)
    sys.exit(main())
