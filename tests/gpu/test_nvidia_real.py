"""NvidiaBackend on a real NVIDIA GPU (skipped where NVML or a GPU is missing).

Each test prints one ``[nvidia-real]`` summary line with what it measured.
"""

from __future__ import annotations

import importlib.util
import os
import select
import shutil
import signal
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path
from types import ModuleType
from typing import Any

import pytest
from helpers import GIB, MIB

from chronos.devices.base import Device
from chronos.devices.nvidia import NvidiaBackend
from chronos.errors import DeviceError

pytestmark = pytest.mark.gpu

ALLOC_BYTES = 10 * GIB
CHILD = (
    "import sys, time, torch\n"
    "x = torch.empty(10 * 2**30, dtype=torch.uint8, device='cuda')\n"
    "torch.cuda.synchronize()\n"
    "print('ready', flush=True)\n"
    "time.sleep(600)\n"
)


def _load_contract() -> ModuleType:
    path = Path(__file__).parents[1] / "devices" / "devices_contract.py"
    spec = importlib.util.spec_from_file_location("devices_contract_for_gpu", path)
    assert spec is not None and spec.loader is not None
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def report(capsys: pytest.CaptureFixture[str], line: str) -> None:
    with capsys.disabled():
        print(f"\n[nvidia-real] {line}", flush=True)


@pytest.fixture(scope="module")
def backend() -> Iterator[NvidiaBackend]:
    pytest.importorskip("pynvml")
    nvidia = NvidiaBackend()
    try:
        devices = nvidia.devices()
    except DeviceError as exc:
        pytest.skip(f"NVML not usable here: {exc}")
    if not devices:
        pytest.skip("NVML found no allocatable NVIDIA GPU")
    yield nvidia
    nvidia.close()


def nvidia_smi_rows() -> list[tuple[int, str, str, int]]:
    if shutil.which("nvidia-smi") is None:
        pytest.skip("nvidia-smi not found")
    query = "--query-gpu=index,uuid,name,memory.total"
    out = subprocess.run(
        ["nvidia-smi", query, "--format=csv,noheader,nounits"],
        capture_output=True,
        text=True,
        check=True,
        timeout=60,
    ).stdout
    rows = []
    for line in out.strip().splitlines():
        index, uuid, name, total = (part.strip() for part in line.split(","))
        rows.append((int(index), uuid, name, int(total)))
    return rows


def test_devices_match_nvidia_smi(backend: NvidiaBackend, capsys: Any) -> None:
    devices = backend.devices()
    whole = {d.uuid: d for d in devices if d.details.get("mig_mode") != "Enabled"}
    compared = []
    for index, uuid, name, total_mib in nvidia_smi_rows():
        if uuid not in whole:
            assert any(d.details.get("mig_parent_uuid") == uuid for d in devices), uuid
            continue
        device = whole[uuid]
        assert device.details["nvml_index"] == str(index)
        assert device.name == name
        assert abs(device.total_bytes // MIB - total_mib) <= 1
        compared.append(f"GPU {index} {name} {total_mib} MiB")
    assert compared or devices
    report(capsys, f"devices match nvidia-smi: {'; '.join(compared)}")


def test_contract_on_real_backend(backend: NvidiaBackend, capsys: Any) -> None:
    _load_contract().check_backend_contract(backend)
    usage = backend.usage()
    used = [u.used_bytes for u in usage if u.used_bytes is not None]
    summary = ", ".join(f"{n / GIB:.2f} GiB used" for n in used) or "usage not available"
    report(capsys, f"contract holds on {len(usage)} device(s) ({summary})")


def _torch_python() -> str:
    for candidate in (sys.executable, shutil.which("python3")):
        if candidate and _imports_torch(candidate):
            return candidate
    pytest.skip("no Python with PyTorch here")


def _imports_torch(python: str) -> bool:
    probe = subprocess.run(
        [python, "-c", "import torch; assert torch.cuda.is_available()"],
        capture_output=True,
        timeout=120,
        check=False,
    )
    return probe.returncode == 0


def _wait_ready(child: subprocess.Popen[str], timeout: float) -> None:
    assert child.stdout is not None
    ready, _, _ = select.select([child.stdout], [], [], timeout)
    line = child.stdout.readline() if ready else ""
    if line.strip() != "ready":
        child.kill()
        _, err = child.communicate(timeout=30)
        pytest.fail(f"the PyTorch child did not start: {line!r} {err[-2000:]}")


def _nvml_own_figure(uuid: str, pid: int) -> int | None:
    import pynvml

    handle = pynvml.nvmlDeviceGetHandleByUUID(uuid)
    for proc in pynvml.nvmlDeviceGetComputeRunningProcesses(handle):
        if proc.pid == pid:
            used: int | None = proc.usedGpuMemory
            return used
    return None


def _poll(backend: NvidiaBackend, pid: int, present: bool, timeout: float) -> tuple[float, Any]:
    start = time.monotonic()
    while True:
        found = next((p for p in backend.processes() if p.pid == pid), None)
        elapsed = time.monotonic() - start
        if (found is not None) == present or elapsed > timeout:
            return elapsed, found
        time.sleep(0.05)


def _first_device(backend: NvidiaBackend) -> Device:
    return backend.devices()[0]


def test_process_memory_and_release(backend: NvidiaBackend, capsys: Any) -> None:
    python = _torch_python()
    device = _first_device(backend)
    env = {**os.environ, "CUDA_VISIBLE_DEVICES": device.uuid}
    child = subprocess.Popen(
        [python, "-c", CHILD],
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    try:
        _wait_ready(child, timeout=180)
        seen_after, found = _poll(backend, child.pid, present=True, timeout=5)
        assert found is not None, f"PID {child.pid} not listed within 5 s"
        own = _nvml_own_figure(device.uuid, child.pid)
        assert found.device_uuid == device.uuid
        assert found.used_bytes is not None and found.used_bytes >= ALLOC_BYTES
        assert own is not None and abs(found.used_bytes - own) <= 0.05 * own
        report(
            capsys,
            f"PID {child.pid} listed {seen_after * 1000:.0f} ms after it was ready: "
            f"{found.used_bytes / GIB:.2f} GiB (NVML's own figure {own / GIB:.2f} GiB, "
            f"difference {abs(found.used_bytes - own) / own:.2%}) for a 10 GiB tensor",
        )
        child.send_signal(signal.SIGKILL)
        gone_after, still = _poll(backend, child.pid, present=False, timeout=10)
        child.wait(timeout=30)
        report(capsys, f"PID {child.pid} gone from processes() {gone_after:.2f} s after SIGKILL")
        assert still is None
        assert gone_after <= 1.0
    finally:
        if child.poll() is None:
            child.kill()
            child.wait(timeout=30)
