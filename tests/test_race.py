"""Admission under contention: many real processes asking at the same instant."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

from helpers import SIM_GPU_BYTES, assert_one_line_error, cli_json, readline_within

FRACTIONS = [0.1] * 16 + [0.07] * 16


_WORKER = r"""
import json, os, sys, time
from chronos import AdmissionRefused, Partitioner
fraction, go = float(sys.argv[1]), sys.argv[2]
client = Partitioner()  # opens (maybe first creates) the ledger before the start line
print("ready", flush=True)
while not os.path.exists(go):
    time.sleep(0.0005)
try:
    p = client.create(device=0, memory=fraction, duration=3600, persist=True)
    out = ["granted", fraction, p.memory_bytes, p.id]
except AdmissionRefused as exc:
    out = ["refused", fraction, None, str(exc)]
client.close()
print(json.dumps(out), flush=True)
"""


def start_together(argvs: list[list[str]], env: dict[str, str], go: Path) -> list[Any]:
    """Start one process per argv; release them all at once when every one is ready."""
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", *argv],
            env=env,
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for argv in argvs
    ]
    try:
        for p in procs:
            assert p.stdout is not None
            line = readline_within(p.stdout, 60)
            assert line.strip() == "ready", p.stderr.read()  # type: ignore[union-attr]
        go.touch()  # the barrier: every worker is waiting for this file
        done = []
        for p in procs:
            out, err = p.communicate(timeout=120)
            done.append(subprocess.CompletedProcess(p.args, p.returncode, out, err))
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
    return done


def test_concurrent_api_creates_never_overcommit(chronos_env: dict[str, str]) -> None:
    go = Path(chronos_env["CHRONOS_HOME"]).parent / "go"
    done = start_together([[_WORKER, str(f), str(go)] for f in FRACTIONS], chronos_env, go)
    for c in done:
        assert c.returncode == 0, c.stderr
    outcomes = [json.loads(c.stdout) for c in done]
    for o in outcomes:
        if o[0] == "refused":
            o[2] = int(o[1] * SIM_GPU_BYTES)
    errors = [o for o in outcomes if o[0] == "error"]
    assert not errors, errors
    granted = [o for o in outcomes if o[0] == "granted"]
    refused = [o for o in outcomes if o[0] == "refused"]
    assert len(granted) + len(refused) == len(FRACTIONS)
    assert granted and refused  # the fractions were chosen so that not all fit
    granted_bytes = sum(o[2] for o in granted)
    assert granted_bytes <= SIM_GPU_BYTES
    assert sum(o[1] for o in granted) <= 1.0 + 1e-9
    # Every refusal was necessary: it would not fit even next to the final grants.
    for _, fraction, nbytes, message in refused:
        assert granted_bytes + nbytes > SIM_GPU_BYTES, (fraction, message)
        assert "free" in message
    # The ledger agrees with what the workers were told.
    from chronos import Partitioner

    with Partitioner() as client:
        active = client.list()
        assert sorted(p.id for p in active) == sorted(o[3] for o in granted)
        (dev0, _dev1) = client.stats()
        assert dev0.committed_bytes == granted_bytes
        assert dev0.active_partitions == len(granted)
        events = client.transport.call("events")
    kinds = [e["kind"] for e in events]
    assert kinds.count("created") == len(granted)
    assert kinds.count("refused") == len(refused)


def test_concurrent_cli_creates_never_overcommit(chronos_env: dict[str, str]) -> None:
    # Make the ledger first so the processes race on admission, not on file creation.
    assert cli_json("list", env=chronos_env) == []
    go = Path(chronos_env["CHRONOS_HOME"]).parent / "go"
    gate = (
        "import os, sys, time\n"
        "from chronos.cli import main\n"
        "print('ready', flush=True)\n"
        "while not os.path.exists(sys.argv[1]): time.sleep(0.0005)\n"
        "sys.exit(main(sys.argv[2:]))\n"
    )
    argv = [gate, str(go), "create", "0", "0.1", "1h", "--json"]
    done = start_together([argv] * 16, chronos_env, go)
    granted = [c for c in done if c.returncode == 0]
    refused = [c for c in done if c.returncode != 0]
    # 10 × 0.1 of the GPU is exactly its capacity: exactly 10 fit, 6 must not.
    assert len(granted) == 10, [c.stderr for c in refused]
    for c in refused:
        line = assert_one_line_error(c)
        assert "free" in line, line
        assert c.stdout == ""
    ids = {json.loads(c.stdout)["id"] for c in granted}
    listed = cli_json("list", env=chronos_env)
    assert {p["id"] for p in listed} == ids
    assert sum(p["memory_bytes"] for p in listed) <= SIM_GPU_BYTES
    (dev0, _dev1) = cli_json("stats", env=chronos_env)
    assert dev0["committed_bytes"] == sum(p["memory_bytes"] for p in listed) == SIM_GPU_BYTES
