"""The API's ExpiryMonitor with no daemon: on_expiring callbacks and SIGTERM at expiry."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import textwrap
import threading
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from chronos.api import Partition, Partitioner

from .support import PY, wait_for


@pytest.fixture
def embedded(
    embedded_env: dict[str, str], monkeypatch: pytest.MonkeyPatch
) -> Iterator[Partitioner]:
    """An embedded-mode client in this process (its partitions must persist: see below)."""
    for name in list(os.environ):
        if name.startswith("CHRONOS_"):
            monkeypatch.delenv(name)
    for name, value in embedded_env.items():
        if name.startswith("CHRONOS_"):
            monkeypatch.setenv(name, value)
    client = Partitioner()
    assert client.mode == "embedded"
    yield client
    client.close()


# Partitions made in the pytest process itself are persist=True: an owner-bound one
# would SIGTERM pytest at its expiry, which is exactly what the child tests check.


def test_on_expiring_calls_back_before_the_end(embedded: Partitioner) -> None:
    p = embedded.create(device=0, memory=0.1, duration=2, persist=True)
    end = p.record.expires_at
    calls: list[tuple[str, float, Partition, bool]] = []
    done = threading.Event()

    def callback(name: str):  # type: ignore[no-untyped-def]
        def cb(partition: Partition) -> None:
            main = threading.current_thread() is threading.main_thread()
            calls.append((name, time.time(), partition, main))
            if len(calls) == 2:
                done.set()

        return cb

    p.on_expiring(1, callback("one"))
    p.on_expiring(0.5, callback("half"))
    assert done.wait(5), calls
    (n1, t1, p1, main1), (n2, t2, _, _) = calls
    assert (n1, n2) == ("one", "half")
    assert end - 1.0 - 0.01 <= t1 <= end - 1.0 + 0.4
    assert end - 0.5 - 0.01 <= t2 <= end - 0.5 + 0.4
    assert p1 is p
    assert not main1  # a background thread, not the caller's


def test_a_released_partition_calls_back_no_more(embedded: Partitioner) -> None:
    p = embedded.create(device=0, memory=0.1, duration=1.0, persist=True)
    called = threading.Event()
    p.on_expiring(0.6, lambda _: called.set())
    p.release()
    assert not called.wait(0.8)


def child(env: dict[str, str], code: str, timeout: float = 20) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [PY, "-c", textwrap.dedent(code)],
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def ledger(env: dict[str, str]) -> dict[str, dict[str, object]]:
    proc = subprocess.run(
        [PY, "-m", "chronos.cli", "list", "--all", "--json"],
        env=env,
        capture_output=True,
        text=True,
        check=True,
    )
    return {r["id"]: r for r in json.loads(proc.stdout)}


def test_an_owner_bound_partition_terminates_its_process_at_expiry(
    embedded_env: dict[str, str], tmp_path: Path
) -> None:
    pids = tmp_path / "pids.json"
    started = time.time()
    proc = child(
        embedded_env,
        f"""
        import json, subprocess, time
        from chronos import Partitioner
        p = Partitioner().create(device=0, memory=0.1, duration=1.5)
        helper = subprocess.Popen(["sleep", "30"])
        p.attach(helper.pid)
        with open({str(pids)!r}, "w") as f:
            json.dump({{"id": p.id, "helper": helper.pid}}, f)
        print("created", flush=True)
        time.sleep(30)
        print("still running", flush=True)
        """,
    )
    elapsed = time.time() - started
    assert proc.returncode == -signal.SIGTERM, (proc.returncode, proc.stderr)
    assert proc.stdout.strip() == "created"
    assert elapsed < 10
    info = json.loads(pids.read_text())
    record = ledger(embedded_env)[info["id"]]
    assert record["state"] == "expired"
    assert record["end_reason"] != "released"

    def helper_gone() -> bool:
        try:
            stat = Path(f"/proc/{info['helper']}/stat").read_text()
        except FileNotFoundError:
            return True
        return stat[stat.rfind(")") + 2] in "ZX"

    assert wait_for(helper_gone, 5.0, what="the attached process to be terminated")


def test_on_expiring_then_sigterm_in_the_owner(embedded_env: dict[str, str]) -> None:
    proc = child(
        embedded_env,
        """
        import time
        from chronos import Partitioner
        p = Partitioner().create(device=0, memory=0.1, duration=1.5)
        p.on_expiring(0.7, lambda q: print("expiring", q.id, round(q.time_remaining, 1),
                                           flush=True))
        time.sleep(30)
        """,
    )
    assert proc.returncode == -signal.SIGTERM, proc.stderr
    word, pid_id, remaining = proc.stdout.split()
    assert word == "expiring"
    assert 0.2 <= float(remaining) <= 0.8
    assert ledger(embedded_env)[pid_id]["state"] == "expired"


def test_a_persistent_partition_does_not_signal_its_creator(
    embedded_env: dict[str, str],
) -> None:
    proc = child(
        embedded_env,
        """
        import time
        from chronos import Partitioner
        p = Partitioner().create(device=0, memory=0.1, duration=1.0, persist=True)
        p.on_expiring(0.5, lambda q: print("expiring", flush=True))
        time.sleep(1.8)
        print(p.id, p.state, flush=True)
        """,
    )
    assert proc.returncode == 0, proc.stderr
    lines = proc.stdout.split("\n")
    assert lines[0] == "expiring"
    pid_id, state = lines[1].split()
    assert state == "expired"
    assert ledger(embedded_env)[pid_id]["state"] == "expired"


def test_a_failing_callback_does_not_stop_the_expiry(embedded_env: dict[str, str]) -> None:
    proc = child(
        embedded_env,
        """
        import time
        from chronos import Partitioner
        p = Partitioner().create(device=0, memory=0.1, duration=1.0)
        p.on_expiring(0.5, lambda q: 1 / 0)
        time.sleep(10)
        print("still running", flush=True)
        """,
    )
    assert proc.returncode == -signal.SIGTERM, (proc.stdout, proc.stderr)
    assert "ZeroDivisionError" in proc.stderr  # reported, not swallowed
    assert "still running" not in proc.stdout


def test_an_extension_by_another_process_moves_the_sigterm(embedded_env: dict[str, str]) -> None:
    started = time.time()
    proc = child(
        embedded_env,
        """
        import subprocess, sys, time
        from chronos import Partitioner
        p = Partitioner().create(device=0, memory=0.1, duration=1.0)
        subprocess.run([sys.executable, "-m", "chronos.cli", "extend", p.id, "1.5"], check=True,
                       stdout=subprocess.DEVNULL)
        print(p.id, flush=True)
        time.sleep(10)
        print("still running", flush=True)
        """,
    )
    elapsed = time.time() - started
    assert proc.returncode == -signal.SIGTERM, (proc.stdout, proc.stderr)
    assert elapsed >= 2.4  # not at the first end (1 s), at the extended one (2.5 s)
    pid_id = proc.stdout.split()[0]
    record = ledger(embedded_env)[pid_id]
    assert record["state"] == "expired"
