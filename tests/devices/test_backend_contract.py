"""The same contract over every backend that can run without a GPU."""

from __future__ import annotations

import os
from collections.abc import Callable
from pathlib import Path

import pytest
from devices_contract import check_backend_contract
from drm_fixtures import AMD_SYSFS, RENDER, intel_card, make_proc, write
from fake_pynvml import GIB, FakeGpu, FakeProcess, make_pynvml, mig_gpu

from chronos.devices import apple
from chronos.devices.amd import AmdBackend
from chronos.devices.apple import AppleBackend
from chronos.devices.base import Backend
from chronos.devices.intel import IntelBackend
from chronos.devices.nvidia import NvidiaBackend
from chronos.devices.nvml import Nvml
from chronos.devices.simulated import SimulatedBackend, declare_process


def simulated(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    monkeypatch.setenv("CHRONOS_SIMULATED_GPUS", "80GiB,40GiB")
    monkeypatch.setenv("CHRONOS_SIMULATED_PROCESSES", str(tmp_path / "procs.json"))
    declare_process(os.getpid(), 1, 3 * GIB)
    return SimulatedBackend()


def nvidia(generation: str) -> Callable[[Path, pytest.MonkeyPatch], Backend]:
    def make(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
        gpus = [
            FakeGpu(
                "GPU-aaaa",
                compute=[FakeProcess(10, 5 * GIB), FakeProcess(11, None)],
                graphics=[FakeProcess(10, 5 * GIB)],
            ),
            mig_gpu(),
            FakeGpu("GPU-bbbb", utilization=None, lost=True),
        ]
        return NvidiaBackend(Nvml(make_pynvml(gpus, generation=generation)))

    return make


def amd(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    proc = make_proc(tmp_path / "proc", {4242: {5: (RENDER, "amdgpu"), 6: (RENDER, "amdgpu")}})
    return AmdBackend(AMD_SYSFS, proc, use_amdsmi=False)


def intel(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    sysfs = tmp_path / "sys"
    intel_card(sysfs, "card0", "0000:00:02.0", "i915", "0x46a6")
    xe = intel_card(sysfs, "card1", "0000:03:00.0", "xe", "0xe20b", hwmon=True)
    write(xe / "tile0" / "physical_vram_size_bytes", f"{12 * GIB}\n")
    proc = make_proc(
        tmp_path / "proc",
        {100: {3: ("/dev/dri/card0", "i915")}, 200: {4: ("/dev/dri/renderD129", "xe")}},
    )
    return IntelBackend(sysfs, proc)


def apple_silicon(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> Backend:
    monkeypatch.setattr(apple, "is_apple_silicon", lambda: True)
    monkeypatch.setattr(apple, "sysctl", {"hw.memsize": str(32 * GIB)}.get)
    return AppleBackend()


BACKENDS = {
    "simulated": simulated,
    "nvidia-modern": nvidia("modern"),
    "nvidia-no-v3": nvidia("no_v3_driver"),
    "nvidia-v1-memory": nvidia("v1_memory_driver"),
    "nvidia-old-pynvml": nvidia("old_pynvml"),
    "amd": amd,
    "intel": intel,
    "apple": apple_silicon,
}


@pytest.mark.parametrize("name", sorted(BACKENDS))
def test_contract(name: str, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    backend = BACKENDS[name](tmp_path, monkeypatch)
    try:
        check_backend_contract(backend)
        assert backend.devices(), "the fixture has devices"
        if backend.per_process_memory:
            assert backend.processes(), "the fixture has processes"
    finally:
        backend.close()
