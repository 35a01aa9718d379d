"""AmdBackend over a fixture sysfs (an RX 7900 XTX on amdgpu) and a fake /proc."""

from __future__ import annotations

import shutil
import types
from pathlib import Path
from typing import Any

import pytest
from drm_fixtures import AMD_SYSFS, RENDER, make_proc

from chronos.devices.amd import AmdBackend, kfd_nodes, kfd_process_vram

UNIQUE_ID = 4382910258131968034


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return make_proc(
        tmp_path / "proc",
        {
            4242: {5: (RENDER, "amdgpu"), 6: (RENDER, "amdgpu")},
            6000: {4: (RENDER, "amdgpu_legacy")},
            7000: {9: ("/dev/dri/renderD129", "xe")},
        },
    )


def backend(proc: Path, sysfs: Path = AMD_SYSFS, **kwargs: Any) -> AmdBackend:
    return AmdBackend(sysfs_root=sysfs, proc_root=proc, use_amdsmi=False, **kwargs)


def test_kfd_topology() -> None:
    (node,) = kfd_nodes(AMD_SYSFS)
    assert (node.gpu_id, node.pci_slot, node.ordinal) == (51052, "0000:03:00.0", 0)
    assert node.rocr_uuid == f"GPU-{UNIQUE_ID:016X}"
    assert kfd_process_vram(AMD_SYSFS) == {(4242, 51052): 10779361280, (5151, 51052): 2 << 30}


def test_devices_from_sysfs(proc: Path) -> None:
    (device,) = backend(proc).devices()
    assert device.uuid == "AMD-PCI-0000:03:00.0"
    assert device.vendor == "amd"
    assert device.backend == "amd"
    assert device.total_bytes == 25753026560
    assert device.pci_bus_id == "0000:03:00.0"
    assert device.name == "AMD GPU [744c]"  # empty product_name is not a name
    assert device.visible_env == {
        "ROCR_VISIBLE_DEVICES": f"GPU-{UNIQUE_ID:016X}",
        "HIP_VISIBLE_DEVICES": "0",
    }
    assert device.details["kfd_gpu_id"] == "51052"


def test_usage_from_sysfs(proc: Path) -> None:
    (usage,) = backend(proc).usage()
    assert usage.used_bytes == 11354857472
    assert usage.free_bytes == 25753026560 - 11354857472
    assert usage.utilization_pct == 87.0


def test_processes_merge_fdinfo_and_kfd(proc: Path) -> None:
    found = {(p.pid, p.device_uuid): p.used_bytes for p in backend(proc).processes()}
    uuid = "AMD-PCI-0000:03:00.0"
    assert found == {
        (4242, uuid): 10779361280,  # KFD's figure is larger than fdinfo's 10276 MiB
        (6000, uuid): 65536 * 1024,  # legacy drm-memory-vram
        (5151, uuid): 2 << 30,  # KFD only
    }
    assert {p.kind for p in backend(proc).processes()} == {"drm"}


def test_without_kfd_the_ordinal_is_used(proc: Path, tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    shutil.copytree(AMD_SYSFS, sysfs)
    shutil.rmtree(sysfs / "class" / "kfd")
    b = backend(proc, sysfs)
    (device,) = b.devices()
    assert device.visible_env["ROCR_VISIBLE_DEVICES"] == "0"
    assert {p.pid for p in b.processes()} == {4242, 6000}


def test_missing_vram_total_skips_with_note(proc: Path, tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    shutil.copytree(AMD_SYSFS, sysfs)
    (sysfs / "class/drm/card1/device/mem_info_vram_total").unlink()
    b = backend(proc, sysfs)
    assert b.devices() == []
    assert "mem_info_vram_total" in b.notes[0]


def test_no_amd_gpu(tmp_path: Path) -> None:
    b = backend(tmp_path / "proc", tmp_path / "sys")
    assert b.devices() == []
    assert b.usage() == []
    assert b.processes() == []


def fake_amdsmi(fail_init: bool = False) -> Any:
    calls: list[str] = []

    def init(*args: Any) -> None:
        calls.append("init")
        if fail_init:
            raise RuntimeError("AMDSMI_STATUS_DRIVER_NOT_LOADED")

    module = types.SimpleNamespace(
        calls=calls,
        amdsmi_init=init,
        amdsmi_shut_down=lambda: calls.append("shut_down"),
        amdsmi_get_processor_handles=lambda: ["h0", "h1"],
        amdsmi_get_gpu_device_bdf=lambda h: {"h0": "0000:03:00.0", "h1": None}[h],
        amdsmi_get_gpu_device_uuid=lambda h: "a1ff744c-0000-1000-803c-d0e2f0a1b2c3",
        amdsmi_get_gpu_asic_info=lambda h: {"market_name": "Radeon RX 7900 XTX"},
    )
    return module


def test_amdsmi_supplies_uuid_and_name(proc: Path) -> None:
    module = fake_amdsmi()
    (device,) = AmdBackend(AMD_SYSFS, proc, amdsmi=module).devices()
    assert device.uuid == "a1ff744c-0000-1000-803c-d0e2f0a1b2c3"
    assert device.name == "Radeon RX 7900 XTX"
    assert device.total_bytes == 25753026560
    assert module.calls == ["init", "shut_down"]


def test_amdsmi_failure_falls_back_to_sysfs(proc: Path) -> None:
    b = AmdBackend(AMD_SYSFS, proc, amdsmi=fake_amdsmi(fail_init=True))
    (device,) = b.devices()
    assert device.uuid == "AMD-PCI-0000:03:00.0"
    assert "amdsmi could not start" in b.notes[0]


def test_amdsmi_missing_functions_are_tolerated(proc: Path) -> None:
    module = types.SimpleNamespace(
        amdsmi_init=lambda: None,
        amdsmi_shut_down=lambda: None,
        amdsmi_get_processor_handles=lambda: ["h0"],
        amdsmi_get_gpu_device_bdf=lambda h: "0000:03:00.0",
    )
    (device,) = AmdBackend(AMD_SYSFS, proc, amdsmi=module).devices()
    assert device.uuid == "AMD-PCI-0000:03:00.0"
