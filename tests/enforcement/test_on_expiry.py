"""``on_expiry``: a partition's end in a real Jupyter kernel, and chronosd's gentle end.

Each kernel test starts a real ipykernel with jupyter_client's KernelManager, runs a
cell that creates a short embedded partition (simulated backend) and checks what the
cell printed, that its ``finally:`` ran, and whether the kernel is still alive.
"""

from __future__ import annotations

import importlib.util
import os
import signal
import subprocess
import textwrap
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from .support import PY, Daemon, wait_for

# Only looked up, not imported: this test process must stay a script (chronos.expiry).
needs_kernel = pytest.mark.skipif(
    importlib.util.find_spec("ipykernel") is None
    or importlib.util.find_spec("jupyter_client") is None,
    reason="needs ipykernel and jupyter_client (the test extra)",
)

GRACE_S = 3.0


class Kernel:
    """A real ipykernel and a client that runs cells and collects their output."""

    def __init__(self, env: dict[str, str], tmp: Path) -> None:
        from jupyter_client.manager import KernelManager

        env = {
            **env,
            "JUPYTER_RUNTIME_DIR": str(tmp / "runtime"),
            "IPYTHONDIR": str(tmp / "ipython"),
            "JUPYTER_PLATFORM_DIRS": "1",
        }
        self.manager = KernelManager(kernel_name="python3")
        self.manager.kernel_spec.argv[0] = PY  # this venv's interpreter, with chronos
        self.manager.start_kernel(env=env)
        self.client = self.manager.client()
        self.client.start_channels()
        self.client.wait_for_ready(timeout=60)

    def run(self, code: str, timeout: float = 60) -> tuple[str, dict[str, Any]]:
        """Run one cell; its stdout+stderr text and its execute_reply content."""
        msg_id = self.client.execute(code)
        text: list[str] = []
        deadline = time.monotonic() + timeout
        while True:
            msg = self.client.get_iopub_msg(timeout=max(0.1, deadline - time.monotonic()))
            if msg["parent_header"].get("msg_id") != msg_id:
                continue
            kind, content = msg["msg_type"], msg["content"]
            if kind == "stream":
                text.append(content["text"])
            elif kind == "error":
                text.append(f"{content['ename']}: {content['evalue']}\n")
            elif kind == "status" and content["execution_state"] == "idle":
                break
        reply = self.client.get_shell_msg(timeout=10)
        return "".join(text), reply["content"]

    def alive(self) -> bool:
        return bool(self.manager.is_alive())

    def close(self) -> None:
        self.client.stop_channels()
        self.manager.shutdown_kernel(now=True)


@pytest.fixture
def kernel(embedded_env: dict[str, str], tmp_path: Path) -> Iterator[Kernel]:
    k = Kernel(embedded_env, tmp_path)
    try:
        yield k
    finally:
        k.close()


CREATE = f"""
import os, time
from chronos import Partitioner, PartitionEnded
from chronos.devices.simulated import declare_process
p = Partitioner().create(device=0, memory="1GiB", duration=2, grace={GRACE_S})
print("on_expiry", p.on_expiry)
"""


def cell(body: str) -> str:
    """A cell that creates the partition ``p``, then runs ``body``."""
    return CREATE + textwrap.dedent(body)


@needs_kernel
def test_a_kernel_holding_memory_gets_the_exception_in_its_cell_and_lives(
    kernel: Kernel,
) -> None:
    out, reply = kernel.run(
        cell(
            """
        declare_process(os.getpid(), 0, 1 << 30)  # a tensor on the GPU
        p.on_expiring(1, lambda q: print("expiring soon:", q.id))
        try:
            time.sleep(30)
            print("slept through")
        except PartitionEnded as exc:
            print("caught:", exc)
            declare_process(os.getpid(), 0, 0)  # del the tensor: the GPU is free
        finally:
            print("finally ran")
        """
        )
    )
    assert reply["status"] == "ok", out
    assert "on_expiry raise" in out
    assert "expiring soon:" in out  # on_expiring printed into the cell (main thread)
    assert "ends at" in out and "save your work" in out  # the warning before the end
    assert "caught: partition" in out and "still holds 1.0 GiB on GPU 0" in out
    assert "chronos: partition" in out  # the warning, on the cell's stderr
    assert "finally ran" in out
    assert "slept through" not in out
    time.sleep(GRACE_S + 1.5)  # past the grace: memory freed, so no SIGTERM came
    assert kernel.alive()
    assert kernel.run("print(6 * 7)")[0].strip() == "42"


@needs_kernel
def test_a_kernel_holding_no_memory_is_neither_interrupted_nor_signalled(
    kernel: Kernel,
) -> None:
    started = time.monotonic()
    out, reply = kernel.run(
        cell(
            f"""
        try:
            time.sleep(2 + {GRACE_S} + 1.5)  # through the end and the grace
            print("slept through")
        finally:
            print("finally ran")
        """
        )
    )
    assert reply["status"] == "ok", out
    assert time.monotonic() - started >= 2 + GRACE_S
    assert "holds no memory on GPU 0 and goes on" in out
    assert "slept through" in out and "finally ran" in out
    assert kernel.alive()
    assert kernel.run("print(p.state)")[0].strip() == "expired"


@needs_kernel
def test_a_kernel_that_keeps_the_memory_gets_sigterm_after_the_grace(kernel: Kernel) -> None:
    out, reply = kernel.run(
        cell(
            """
        declare_process(os.getpid(), 0, 1 << 30)
        ended_at = None
        try:
            time.sleep(30)
        except PartitionEnded:
            ended_at = time.time()
            print("caught")
        """
        )
    )
    assert "caught" in out, out
    assert kernel.alive()  # not at the end: only after the grace
    wait_for(lambda: not kernel.alive(), GRACE_S + 10, "the SIGTERM after the grace")


def test_on_expiry_is_checked(embedded_env: dict[str, str]) -> None:
    proc = subprocess.run(
        [
            PY,
            "-c",
            "from chronos import Partitioner\n"
            "Partitioner().create(device=0, memory=0.1, duration=2, on_expiry='explode')",
        ],
        env=embedded_env,
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert proc.returncode != 0
    assert "on_expiry must be one of terminate, raise, notify, not 'explode'" in proc.stderr


# ------------------------------------------------------------------ chronosd


GENTLE_SCRIPT = """
import os, sys, time
from chronos import Partitioner, PartitionEnded
from chronos.devices.simulated import declare_process
hold = sys.argv[1] != "free"
p = Partitioner().create(device=0, memory="70GiB", duration=2, grace={grace}, on_expiry="raise")
if hold:
    declare_process(os.getpid(), 0, 60 << 30)
print("created", p.id, flush=True)
try:
    time.sleep(2 + {grace} + 2)
    print("slept through", flush=True)
except PartitionEnded as exc:
    print("caught", exc, flush=True)
    if sys.argv[1] in ("hold-then-free", "hold-a-while"):
        time.sleep(1.0 if sys.argv[1] == "hold-a-while" else 0.0)  # saves a checkpoint first
        declare_process(os.getpid(), 0, 0)
        print("freed", flush=True)
    time.sleep(30)  # keeps the memory, or lives on without it
"""


@pytest.fixture
def daemon(daemon_factory: Any) -> Daemon:
    d: Daemon = daemon_factory()
    return d


def gentle_client(daemon: Daemon, how: str) -> subprocess.Popen[str]:
    code = textwrap.dedent(GENTLE_SCRIPT).format(grace=GRACE_S)
    return subprocess.Popen(
        [PY, "-c", code, how],
        env={**daemon.env, "CHRONOS_HOME": str(daemon.home)},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def test_chronosd_does_not_signal_an_api_process_that_holds_no_memory(daemon: Daemon) -> None:
    client = gentle_client(daemon, "free")
    out, err = client.communicate(timeout=60)
    assert client.returncode == 0, (out, err)
    assert "slept through" in out
    assert "holds no memory on GPU 0 and goes on" in err


def test_chronosd_signals_an_api_process_only_after_it_kept_the_memory_past_the_grace(
    daemon: Daemon,
) -> None:
    client = gentle_client(daemon, "hold")
    try:
        assert client.stdout is not None
        partition_id = client.stdout.readline().split()[1]
        expires_at = daemon.call("get", id=partition_id)["expires_at"]
        assert "caught partition" in client.stdout.readline()
        assert time.time() >= expires_at
        assert client.poll() is None  # warned, not signalled, at the end
        client.wait(timeout=GRACE_S + 10)
        assert client.returncode == -signal.SIGTERM
        assert time.time() >= expires_at + GRACE_S
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGKILL)
        client.communicate(timeout=10)


def test_an_api_process_that_frees_the_memory_lives_on_and_the_memory_is_granted_again(
    daemon: Daemon,
) -> None:
    client = gentle_client(daemon, "hold-then-free")
    try:
        assert client.stdout is not None
        partition_id = client.stdout.readline().split()[1]
        expires_at = daemon.call("get", id=partition_id)["expires_at"]
        assert "caught partition" in client.stdout.readline()
        assert client.stdout.readline().strip() == "freed"
        granted = wait_for(
            lambda: _create(daemon, "40GiB"), GRACE_S + 10, "the freed memory to be granted"
        )
        assert client.poll() is None  # never signalled: it let go of the GPU
        assert time.time() >= expires_at
        daemon.call("release", id=granted)
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGKILL)
        client.communicate(timeout=10)


def _create(daemon: Daemon, memory: str) -> str | None:
    from chronos.errors import ChronosError

    try:
        return str(daemon.call("create", device=0, memory=memory, duration=5, persist=True)["id"])
    except ChronosError:
        return None


def test_the_sigterm_after_a_gentle_end_survives_a_daemon_restart(daemon: Daemon) -> None:
    client = gentle_client(daemon, "hold")
    try:
        assert client.stdout is not None
        partition_id = client.stdout.readline().split()[1]
        expires_at = daemon.call("get", id=partition_id)["expires_at"]
        assert "caught partition" in client.stdout.readline()  # the end came: warned
        wait_for(lambda: daemon.events("expiry_warned"), 5, "the warning to be logged")
        daemon.kill(signal.SIGKILL)  # in the grace, before the SIGTERM
        daemon.start()
        client.wait(timeout=GRACE_S + 15)
        assert client.returncode == -signal.SIGTERM  # sent by the restarted daemon
        assert time.time() >= expires_at + GRACE_S
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGKILL)
        client.communicate(timeout=10)


WARNED_SCRIPT = """
import signal, sys, time
from chronos import Partitioner
if sys.argv[1] == "catch":
    signal.signal(signal.SIGUSR1, lambda *_: print("SIGUSR1 caught", flush=True))
p = Partitioner().create(device=0, memory="1GiB", duration=2, warn=1, on_expiry="raise")
time.sleep(3.5)
print("slept through", flush=True)
"""


@pytest.mark.parametrize("how", ["catch", "ignore"])
def test_the_warning_signal_reaches_only_gentle_processes_that_catch_it(
    daemon: Daemon, how: str
) -> None:
    proc = subprocess.run(
        [PY, "-c", textwrap.dedent(WARNED_SCRIPT), how],
        env={**daemon.env, "CHRONOS_HOME": str(daemon.home)},
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.returncode == 0, proc.stderr  # a SIGUSR1 it does not catch would kill it
    assert "slept through" in proc.stdout
    assert ("SIGUSR1 caught" in proc.stdout) == (how == "catch")


@needs_kernel
def test_a_script_that_imports_ipykernel_is_still_a_script() -> None:
    proc = subprocess.run(
        [
            PY,
            "-c",
            "import ipykernel.kernelapp\nfrom chronos import expiry\nprint(expiry.choose(None))",
        ],
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert proc.stdout.strip() == "terminate", proc.stderr
    interactive = subprocess.run(
        [PY, "-i", "-c", "from chronos import expiry\nprint(expiry.choose(None))"],
        capture_output=True,
        text=True,
        timeout=60,
        input="",
    )
    assert interactive.stdout.strip() == "raise", interactive.stderr


def test_unpartitioned_enforce_leaves_a_gentle_end_its_grace(daemon_factory: Any) -> None:
    from .conftest import CAP_CONFIG

    daemon: Daemon = daemon_factory(CAP_CONFIG.replace('"warn"', '"enforce"'))
    client = gentle_client(daemon, "hold-a-while")  # 1 s with the memory after the end
    try:
        assert client.stdout is not None
        partition_id = client.stdout.readline().split()[1]
        expires_at = daemon.call("get", id=partition_id)["expires_at"]
        assert "caught partition" in client.stdout.readline()
        assert client.stdout.readline().strip() == "freed"  # not stopped after 0.3 s
        wait_for(lambda: time.time() > expires_at + GRACE_S + 1, GRACE_S + 5, "the grace")
        assert client.poll() is None
        assert not daemon.events("unpartitioned_stopped")
    finally:
        if client.poll() is None:
            os.kill(client.pid, signal.SIGKILL)
        client.communicate(timeout=10)
