"""NvidiaBackend and the NVML wrapper against a stub pynvml of several generations."""

from __future__ import annotations

import subprocess
import sys
import threading
from typing import Any

import pytest
from fake_pynvml import GIB, NOT_AVAILABLE_U64, FakeGpu, FakeProcess, make_pynvml, mig_gpu

from chronos.devices import nvml as nvml_module
from chronos.devices.nvidia import NvidiaBackend, cuda_version_text, normalize_bus_id
from chronos.devices.nvml import FUNCTION_NOT_FOUND, NOT_FOUND, Nvml, Unavailable
from chronos.errors import DeviceError

UUID0 = "GPU-0a1b2c3d-0000-1111-2222-333344445555"
UUID1 = "GPU-9f8e7d6c-0000-1111-2222-333344445555"


def gpu(uuid: str = UUID0, **kwargs: Any) -> FakeGpu:
    return FakeGpu(uuid=uuid, **kwargs)


def open_backend(gpus: list[FakeGpu], **kwargs: Any) -> tuple[NvidiaBackend, Any]:
    lib = make_pynvml(gpus, **kwargs)
    return NvidiaBackend(Nvml(lib)), lib


def by_pid(backend: NvidiaBackend) -> dict[int, tuple[str, int | None, str]]:
    return {p.pid: (p.device_uuid, p.used_bytes, p.kind) for p in backend.processes()}


# -- the wrapper -------------------------------------------------------------


def test_wrapper_turns_errors_into_unavailable() -> None:
    lib = make_pynvml([gpu(utilization=None)])
    nvml = Nvml(lib)
    handle = nvml.call("nvmlDeviceGetHandleByIndex", 0)
    result = nvml.call("nvmlDeviceGetUtilizationRates", handle)
    assert isinstance(result, Unavailable)
    assert not result
    assert result.code == lib.NVML_ERROR_NOT_SUPPORTED
    assert "Not Supported" in result.reason
    missing = nvml.call("nvmlDeviceGetNoSuchThing", handle)
    assert isinstance(missing, Unavailable) and missing.code == FUNCTION_NOT_FOUND
    assert nvml.value("nvmlDeviceGetNoSuchThing", handle) is None
    lost = nvml.call("nvmlDeviceGetMigDeviceHandleByIndex", handle, 3)
    assert isinstance(lost, Unavailable) and lost.code == NOT_FOUND


def test_wrapper_maps_library_mismatch() -> None:
    lib = make_pynvml([gpu()], generation="no_v3_driver")
    nvml = Nvml(lib)
    handle = nvml.call("nvmlDeviceGetHandleByIndex", 0)
    result = nvml.call("nvmlDeviceGetComputeRunningProcesses", handle)
    assert isinstance(result, Unavailable) and result.code == FUNCTION_NOT_FOUND


def test_wrapper_does_not_hide_programming_errors() -> None:
    nvml = Nvml(make_pynvml([gpu()]))
    with pytest.raises(TypeError):
        nvml.call("nvmlDeviceGetCount", "unexpected")


def test_init_is_lazy_once_and_thread_safe() -> None:
    lib = make_pynvml([gpu()])
    nvml = Nvml(lib)
    assert lib.state["init"] == 0
    threads = [threading.Thread(target=lambda: nvml.lib) for _ in range(16)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert lib.state["init"] == 1
    nvml.close()
    nvml.close()
    assert lib.state["shutdown"] == 1
    NvidiaBackend(nvml).devices()  # usable again after close: starts anew
    assert lib.state["init"] == 2


@pytest.mark.parametrize("error", ["LIBRARY_NOT_FOUND", "DRIVER_NOT_LOADED"])
def test_missing_driver_is_a_device_error(error: str) -> None:
    backend, _ = open_backend([gpu()], init_error=error)
    with pytest.raises(DeviceError, match="^NVIDIA driver not found: "):
        backend.devices()


def test_other_init_failure_is_a_device_error() -> None:
    backend, _ = open_backend([gpu()], init_error="NO_PERMISSION")
    with pytest.raises(DeviceError, match="NVML could not start: Insufficient Permissions"):
        backend.devices()


def test_missing_pynvml_is_a_device_error(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setitem(sys.modules, "pynvml", None)  # makes "import pynvml" fail
    with pytest.raises(DeviceError, match="^NVIDIA driver not found: .*nvidia-ml-py"):
        NvidiaBackend().devices()


def test_set_library_injects_a_default(monkeypatch: pytest.MonkeyPatch) -> None:
    lib = make_pynvml([gpu()])
    monkeypatch.setattr(nvml_module, "_default_library", None)
    nvml_module.set_library(lib)
    try:
        assert [d.uuid for d in NvidiaBackend().devices()] == [UUID0]
    finally:
        nvml_module.set_library(None)


def test_pynvml_is_not_imported_with_the_module() -> None:
    code = (
        "import sys, chronos.devices.nvidia, chronos.devices.amd, chronos.devices.intel, "
        "chronos.devices.apple; "
        "assert 'pynvml' not in sys.modules and 'amdsmi' not in sys.modules"
    )
    env_path = [p for p in sys.path if p]
    done = subprocess.run(
        [sys.executable, "-c", code],
        env={"PYTHONPATH": ":".join(env_path)},
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0, done.stderr


# -- devices -----------------------------------------------------------------


def test_modern_driver_devices() -> None:
    backend, lib = open_backend([gpu(), gpu(UUID1, bus_id="00000000:BB:00.0")])
    devices = backend.devices()
    assert [d.index for d in devices] == [0, 1]
    first = devices[0]
    assert first.uuid == UUID0
    assert first.name == "NVIDIA H200"
    assert first.vendor == "nvidia" and first.backend == "nvidia"
    assert first.total_bytes == 150 * GIB
    assert first.pci_bus_id == "0000:3b:00.0"
    assert first.visible_env == {"CUDA_VISIBLE_DEVICES": UUID0}
    assert first.details == {
        "driver_version": "580.95.05",
        "cuda_driver_version": "13.0",
        "nvml_index": "0",
        "compute_mode": "Default",
        "mig_mode": "Disabled",
    }
    assert "nvmlDeviceGetMemoryInfo_v2" in lib.state["calls"]
    assert "nvmlDeviceGetMemoryInfo" not in lib.state["calls"]


def test_old_pynvml_bytes_v1_memory_and_no_cuda_v2() -> None:
    backend, lib = open_backend([gpu(mig_mode=None, compute_mode=3)], generation="old_pynvml")
    (device,) = backend.devices()
    assert device.uuid == UUID0  # bytes decoded
    assert device.name == "NVIDIA H200"
    assert device.details["cuda_driver_version"] == "13.0"
    assert device.details["compute_mode"] == "Exclusive_Process"
    assert device.details["mig_mode"] == "N/A"
    (usage,) = backend.usage()
    assert usage.used_bytes == 2 * GIB + GIB // 2  # v1 counts reserved memory as used
    assert lib.state["calls"].count("nvmlDeviceGetMemoryInfo_v2") == 0


def test_v1_only_driver_falls_back_and_stops_asking_for_v2() -> None:
    backend, lib = open_backend([gpu()], generation="v1_memory_driver")
    (device,) = backend.devices()
    assert device.total_bytes == 150 * GIB
    for _ in range(3):
        backend.usage()
    assert lib.state["calls"].count("nvmlDeviceGetMemoryInfo_v2") == 1


def test_usage_v2() -> None:
    backend, _ = open_backend([gpu(used=40 * GIB, reserved=GIB)])
    (usage,) = backend.usage()
    assert usage.uuid == UUID0
    assert usage.used_bytes == 40 * GIB
    assert usage.free_bytes == 150 * GIB - 41 * GIB
    assert usage.utilization_pct == 35.0


def test_utilization_not_supported() -> None:
    backend, _ = open_backend([gpu(utilization=None)])
    (usage,) = backend.usage()
    assert usage.utilization_pct is None
    assert usage.used_bytes == 2 * GIB


def test_cuda_version_and_bus_id_formats() -> None:
    assert cuda_version_text(13000) == "13.0"
    assert cuda_version_text(12040) == "12.4"
    assert cuda_version_text(11080) == "11.8"
    assert normalize_bus_id("00000000:3B:00.0") == "0000:3b:00.0"
    assert normalize_bus_id("0001:3B:00.0") == "0001:3b:00.0"


# -- MIG -----------------------------------------------------------------------


def test_mig_instances_replace_their_parent() -> None:
    backend, _ = open_backend([gpu(), mig_gpu()])
    devices = backend.devices()
    assert [(d.index, d.uuid) for d in devices] == [
        (0, UUID0),
        (1, "MIG-11111111-2222-3333-4444-555555555555"),
        (2, "MIG-66666666-7777-8888-9999-000000000000"),
    ]
    mig = devices[1]
    assert mig.total_bytes == 40 * GIB - 512 * 1024**2
    assert mig.visible_env == {"CUDA_VISIBLE_DEVICES": mig.uuid}
    assert mig.pci_bus_id == "0000:9a:00.0"
    assert mig.details["mig_mode"] == "Enabled"
    assert mig.details["mig_parent_uuid"] == "GPU-mig-parent-0000"
    assert mig.details["gpu_instance_id"] == "2"
    assert "GPU-mig-parent-0000" not in {d.uuid for d in devices}
    assert sum(d.total_bytes for d in devices[1:]) < 80 * GIB
    usage = {u.uuid: u for u in backend.usage()}
    assert usage[mig.uuid].used_bytes == GIB
    assert usage[mig.uuid].utilization_pct is None


def test_mig_processes_belong_to_their_instance() -> None:
    backend, _ = open_backend([mig_gpu()])
    assert by_pid(backend) == {
        7001: ("MIG-11111111-2222-3333-4444-555555555555", 5 * GIB, "compute"),
        7002: ("MIG-66666666-7777-8888-9999-000000000000", 3 * GIB, "compute"),
    }


def test_mig_processes_from_the_parent_when_instances_do_not_answer() -> None:
    parent = mig_gpu()
    parent.processes_on_parent_only = True
    backend, _ = open_backend([parent])
    assert by_pid(backend) == {
        7001: ("MIG-11111111-2222-3333-4444-555555555555", 5 * GIB, "compute"),
        7002: ("MIG-66666666-7777-8888-9999-000000000000", 3 * GIB, "compute"),
    }


def test_unreadable_mig_skips_the_gpu_with_a_note() -> None:
    parent = mig_gpu()
    parent.mig_unreadable = True
    backend, _ = open_backend([parent, gpu()])
    assert [d.uuid for d in backend.devices()] == [UUID0]
    assert "GPU 0 skipped" in backend.notes[0]
    assert "Insufficient Permissions" in backend.notes[0]


def test_mig_enabled_without_instances() -> None:
    parent = mig_gpu()
    parent.mig = []
    backend, _ = open_backend([parent])
    assert backend.devices() == []
    assert "no MIG instance" in backend.notes[0]


# -- processes -----------------------------------------------------------------


def test_compute_and_graphics_are_merged_per_pid() -> None:
    g = gpu(
        compute=[FakeProcess(100, 10 * GIB), FakeProcess(101, GIB)],
        graphics=[FakeProcess(100, 10 * GIB), FakeProcess(300, 64 * 1024**2)],
    )
    backend, _ = open_backend([g])
    assert by_pid(backend) == {
        100: (UUID0, 10 * GIB, "compute"),  # listed in both: counted once
        101: (UUID0, GIB, "compute"),
        300: (UUID0, 64 * 1024**2, "graphics"),
    }


def test_process_memory_not_available_is_none() -> None:
    backend, _ = open_backend([gpu(compute=[FakeProcess(100, None)])])
    assert by_pid(backend) == {100: (UUID0, None, "compute")}


def test_old_pynvml_raw_not_available_value_is_none() -> None:
    g = gpu(compute=[FakeProcess(100, None), FakeProcess(101, GIB)])
    backend, _ = open_backend([g], generation="old_pynvml")
    assert by_pid(backend) == {100: (UUID0, None, "compute"), 101: (UUID0, GIB, "compute")}
    assert NOT_AVAILABLE_U64 == 2**64 - 1


def test_v3_missing_in_driver_falls_back_to_v2_once() -> None:
    backend, lib = open_backend([gpu(compute=[FakeProcess(100, GIB)])], generation="no_v3_driver")
    for _ in range(3):
        assert by_pid(backend) == {100: (UUID0, GIB, "compute")}
    assert lib.state["calls"].count("compute:v2") == 3
    assert lib.state["calls"].count("compute:v3") == 0  # v3 raised before logging


def test_modern_uses_v3() -> None:
    backend, lib = open_backend([gpu(compute=[FakeProcess(100, GIB)])])
    backend.processes()
    assert "compute:v3" in lib.state["calls"]
    assert "compute:v2" not in lib.state["calls"]


def test_processes_on_two_gpus() -> None:
    gpus = [gpu(compute=[FakeProcess(100, GIB)]), gpu(UUID1, compute=[FakeProcess(100, 2 * GIB)])]
    backend, _ = open_backend(gpus)
    found = {(p.pid, p.device_uuid): p.used_bytes for p in backend.processes()}
    assert found == {(100, UUID0): GIB, (100, UUID1): 2 * GIB}


# -- failing GPUs ----------------------------------------------------------------


def test_gpu_lost_at_enumeration_is_skipped() -> None:
    backend, _ = open_backend([gpu(lost=True), gpu(UUID1)])
    assert [(d.index, d.uuid) for d in backend.devices()] == [(0, UUID1)]
    assert backend.notes == ["GPU 0 skipped: nvmlDeviceGetHandleByIndex: GPU is lost"]


def test_gpu_lost_after_enumeration_does_not_crash() -> None:
    lost = gpu(compute=[FakeProcess(100, GIB)])
    backend, _ = open_backend([lost, gpu(UUID1, compute=[FakeProcess(200, GIB)])])
    backend.devices()
    lost.lost = True
    usage = {u.uuid: u for u in backend.usage()}
    assert (usage[UUID0].used_bytes, usage[UUID0].free_bytes) == (None, None)
    assert usage[UUID0].utilization_pct is None
    assert usage[UUID1].used_bytes == 2 * GIB
    assert by_pid(backend) == {200: (UUID1, GIB, "compute")}


def test_no_gpu() -> None:
    backend, _ = open_backend([])
    assert backend.devices() == []
    assert backend.usage() == []
    assert backend.processes() == []


def test_close_shuts_nvml_down() -> None:
    backend, lib = open_backend([gpu()])
    backend.devices()
    backend.close()
    assert lib.state["shutdown"] == 1


# -- link levels (placement of groups) -----------------------------------------


def test_link_level_is_the_common_ancestor_or_not_available() -> None:
    backend, lib = open_backend([gpu(UUID0), gpu(UUID1)])
    first, second = backend.devices()
    assert backend.link_level(first, first) == 0
    assert backend.link_level(first, second) is None  # this NVML cannot tell: not a guess
    calls: list[tuple[Any, Any]] = []

    def common_ancestor(a: Any, b: Any) -> int:
        calls.append((a, b))
        return 20  # NVML_TOPOLOGY_MULTIPLE

    lib.nvmlDeviceGetTopologyCommonAncestor = common_ancestor
    fresh = NvidiaBackend(Nvml(lib))
    first, second = fresh.devices()
    assert [fresh.link_level(first, second) for _ in range(3)] == [20, 20, 20]
    assert len(calls) == 1  # asked once per pair: placement asks inside a transaction
