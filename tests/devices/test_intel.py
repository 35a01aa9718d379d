"""IntelBackend over fake sysfs trees (i915 and xe, integrated and discrete)."""

from __future__ import annotations

from pathlib import Path

import pytest
from drm_fixtures import intel_card, make_proc, write
from helpers import GIB, MIB

from chronos.devices.intel import IntelBackend, is_local_region

KIB = 1024
MEMTOTAL = 65536000 * 1024  # from make_proc's meminfo


@pytest.fixture
def sysfs(tmp_path: Path) -> Path:
    root = tmp_path / "sys"
    intel_card(root, "card0", "0000:00:02.0", "i915", "0x46a6")  # integrated (Alder Lake)
    xe = intel_card(root, "card1", "0000:03:00.0", "xe", "0xe20b", hwmon=True)  # Arc B580
    write(xe / "tile0" / "physical_vram_size_bytes", f"{12 * GIB}\n")
    lmem = intel_card(root, "card2", "0000:04:00.0", "i915", "0x56a0", hwmon=True)  # Arc A770
    write(lmem.parent / "lmem_total_bytes", f"{16 * GIB}\n")  # out-of-tree i915 only
    write(lmem.parent / "lmem_avail_bytes", f"{10 * GIB}\n")
    intel_card(root, "card3", "0000:05:00.0", "i915", "0x56a1", hwmon=True)  # mainline i915
    other = root / "class" / "drm" / "card4" / "device"
    write(other / "vendor", "0x1002\n")
    write(other / "uevent", "DRIVER=amdgpu\nPCI_SLOT_NAME=0000:06:00.0\n")
    return root


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return make_proc(
        tmp_path / "proc",
        {
            100: {3: ("/dev/dri/card0", "i915")},
            200: {4: ("/dev/dri/renderD129", "xe"), 5: ("/dev/dri/renderD129", "xe")},
            300: {6: ("/dev/dri/renderD130", "i915_dgpu")},
        },
    )


def test_devices(sysfs: Path, proc: Path) -> None:
    backend = IntelBackend(sysfs, proc)
    devices = backend.devices()
    summary = [(d.index, d.uuid, d.total_bytes, d.details["memory"]) for d in devices]
    assert summary == [
        (0, "INTEL-PCI-0000:00:02.0", MEMTOTAL, "shared system memory"),
        (1, "INTEL-PCI-0000:03:00.0", 12 * GIB, "device-local"),
        (2, "INTEL-PCI-0000:04:00.0", 16 * GIB, "device-local"),
    ]
    assert [d.visible_env["ZE_AFFINITY_MASK"] for d in devices] == ["0", "1", "2"]
    assert all(d.visible_env["ZE_ENABLE_PCI_ID_DEVICE_ORDER"] == "1" for d in devices)
    assert devices[0].name == "Intel integrated GPU [46a6]"
    assert devices[1].details["driver"] == "xe"
    assert backend.notes == [
        "Intel GPU 0000:05:00.0 (i915) skipped: its memory size is not published by the driver"
    ]


def test_multi_tile_xe_sums_tiles(sysfs: Path, proc: Path) -> None:
    xe = sysfs / "class" / "drm" / "card1" / "device"
    write(xe / "tile1" / "physical_vram_size_bytes", f"{12 * GIB}\n")
    devices = IntelBackend(sysfs, proc).devices()
    assert devices[1].total_bytes == 24 * GIB


def test_usage_is_not_available_unless_published(sysfs: Path, proc: Path) -> None:
    usage = {u.uuid: u for u in IntelBackend(sysfs, proc).usage()}
    assert usage["INTEL-PCI-0000:00:02.0"].used_bytes is None
    assert usage["INTEL-PCI-0000:03:00.0"].free_bytes is None
    assert usage["INTEL-PCI-0000:04:00.0"].used_bytes == 6 * GIB
    assert usage["INTEL-PCI-0000:04:00.0"].free_bytes == 10 * GIB


def test_processes_count_device_memory(sysfs: Path, proc: Path) -> None:
    found = {(p.pid, p.device_uuid): p.used_bytes for p in IntelBackend(sysfs, proc).processes()}
    assert found == {
        (100, "INTEL-PCI-0000:00:02.0"): 6044 * KIB,  # integrated: every region
        (200, "INTEL-PCI-0000:03:00.0"): 23992 * KIB,  # xe discrete: vram0 only, once
        (300, "INTEL-PCI-0000:04:00.0"): 1536 * MIB,  # i915 discrete: local0 only
    }


def test_xe_integrated_counts_system_and_gtt(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    intel_card(sysfs, "card0", "0000:00:02.0", "xe", "0x64a0")  # Lunar Lake
    proc = make_proc(tmp_path / "proc", {42: {3: ("/dev/dri/renderD128", "xe_igpu")}})
    backend = IntelBackend(sysfs, proc)
    (device,) = backend.devices()
    assert device.total_bytes == MEMTOTAL
    (process,) = backend.processes()
    assert (process.pid, process.used_bytes) == (42, 4 * MIB + 300 * MIB)


def test_integrated_without_meminfo_is_skipped(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"
    intel_card(sysfs, "card0", "0000:00:02.0", "i915", "0x46a6")
    backend = IntelBackend(sysfs, tmp_path / "no-proc")
    assert backend.devices() == []
    assert "skipped" in backend.notes[0]


def test_discrete_card_on_bus_zero_is_not_taken_for_integrated(tmp_path: Path) -> None:
    sysfs = tmp_path / "sys"  # e.g. a passed-through Arc in a VM
    intel_card(sysfs, "card0", "0000:00:05.0", "i915", "0x56a0", hwmon=True)
    backend = IntelBackend(sysfs, tmp_path / "proc")
    assert backend.devices() == []


@pytest.mark.parametrize(
    ("driver", "region", "local"),
    [
        ("xe", "vram0", True),
        ("xe", "vram1", True),
        ("xe", "gtt", False),
        ("xe", "system", False),
        ("i915", "local0", True),
        ("i915", "stolen-local0", True),
        ("i915", "system0", False),
        ("i915", "stolen-system0", False),
    ],
)
def test_local_regions(driver: str, region: str, local: bool) -> None:
    assert is_local_region(driver, region) is local
