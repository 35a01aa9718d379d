"""DRM fdinfo parsing (kernel drm-usage-stats format) and sysfs reading."""

from __future__ import annotations

from pathlib import Path

import pytest
from drm_fixtures import AMD_SYSFS, EVENTFD, RENDER, fdinfo, make_proc
from helpers import MIB

from chronos.devices import drm

KIB = 1024


@pytest.mark.parametrize(
    ("value", "expected"),
    [
        ("0", 0),
        ("4096", 4096),
        ("23992 KiB", 23992 * KIB),
        ("16 MiB", 16 * MIB),
        ("12 QiB", None),
        ("lots", None),
        ("", None),
        ("-1", None),
        ("1 KiB extra", None),
    ],
)
def test_parse_size_follows_documented_units(value: str, expected: int | None) -> None:
    assert drm.parse_size(value) == expected


def test_amdgpu_current_format() -> None:
    client = drm.client_from_fdinfo(4242, fdinfo("amdgpu"))
    assert client is not None
    assert (client.driver, client.pdev, client.client_id) == ("amdgpu", "0000:03:00.0", "37")
    assert client.memory["resident"]["vram"] == 10276 * MIB
    assert client.memory["total"]["gtt"] == 18 * MIB
    # "drm-memory-gtt: \t…" (a space before the tab) is still read.
    assert client.memory["memory"]["gtt"] == 18432 * KIB
    # resident wins over the legacy alias and the total
    assert client.region_bytes("vram") == 10276 * MIB
    assert "engine-gfx" not in client.regions()


def test_amdgpu_legacy_format_uses_drm_memory() -> None:
    client = drm.client_from_fdinfo(6000, fdinfo("amdgpu_legacy"))
    assert client is not None
    assert client.client_id == "12"
    assert "resident" not in client.memory
    assert client.region_bytes("vram") == 65536 * KIB
    assert client.region_bytes("gtt") == 2048 * KIB


def test_i915_integrated() -> None:
    client = drm.client_from_fdinfo(1, fdinfo("i915"))
    assert client is not None
    assert client.pdev == "0000:00:02.0"
    assert client.regions() == {"system0", "stolen-system0"}
    assert client.region_bytes("system0") == 6044 * KIB
    assert client.bytes_in(lambda region: True) == 6044 * KIB


def test_i915_discrete_local_memory() -> None:
    client = drm.client_from_fdinfo(1, fdinfo("i915_dgpu"))
    assert client is not None
    assert client.region_bytes("local0") == 1536 * MIB
    assert client.bytes_in(lambda r: r.startswith("local")) == 1536 * MIB


def test_xe_cycles_are_not_memory() -> None:
    client = drm.client_from_fdinfo(1, fdinfo("xe"))
    assert client is not None
    assert client.regions() == {"system", "gtt", "vram0", "stolen"}
    assert client.region_bytes("vram0") == 23992 * KIB
    assert client.region_bytes("gtt") == 192 * KIB


def test_non_drm_fdinfo_is_ignored() -> None:
    assert drm.client_from_fdinfo(1, fdinfo("not_drm")) is None
    assert drm.client_from_fdinfo(1, "") is None


def test_bytes_in_is_none_when_no_region_matches() -> None:
    client = drm.client_from_fdinfo(1, fdinfo("i915"))
    assert client is not None
    assert client.bytes_in(lambda r: r.startswith("local")) is None


@pytest.fixture
def proc(tmp_path: Path) -> Path:
    return make_proc(
        tmp_path / "proc",
        {
            # one client open through two fds, plus an unrelated fd
            4242: {3: (EVENTFD, "not_drm"), 5: (RENDER, "amdgpu"), 6: (RENDER, "amdgpu")},
            # a forked child holding the same client
            4300: {5: (RENDER, "amdgpu")},
            6000: {4: (RENDER, "amdgpu_legacy")},
            7000: {9: ("/dev/dri/renderD129", "xe")},
            # a file that is not a DRM device, whatever its fdinfo says
            7100: {3: ("/home/user/notes.txt", "amdgpu")},
        },
    )


def test_scan_counts_each_client_once(proc: Path) -> None:
    clients = drm.scan_clients({"amdgpu"}, proc)
    assert sorted((c.pid, c.client_id) for c in clients) == [(4242, "37"), (6000, "12")]


def test_scan_filters_by_driver(proc: Path) -> None:
    assert [c.pid for c in drm.scan_clients({"xe"}, proc)] == [7000]
    assert drm.scan_clients({"i915"}, proc) == []


def test_memory_by_process(proc: Path) -> None:
    found = drm.memory_by_process({"amdgpu", "xe"}, lambda c, r: r in ("vram", "vram0"), proc)
    assert found == {
        (4242, "0000:03:00.0"): 10276 * MIB,
        (6000, "0000:03:00.0"): 65536 * KIB,
        (7000, "0000:03:00.0"): 23992 * KIB,
    }


def test_memory_by_process_marks_unreported_regions(proc: Path) -> None:
    found = drm.memory_by_process({"xe"}, lambda c, r: r == "vram1", proc)
    assert found == {(7000, "0000:03:00.0"): None}


def test_scan_of_missing_proc_is_empty(tmp_path: Path) -> None:
    assert drm.scan_clients({"amdgpu"}, tmp_path / "nope") == []


def test_list_cards_reads_uevent_and_filters_vendor() -> None:
    cards = drm.list_cards(AMD_SYSFS)
    assert [(c.name, c.pci_slot, c.driver) for c in cards] == [
        ("card0", "0000:01:00.0", "nvidia"),
        ("card1", "0000:03:00.0", "amdgpu"),
    ]
    amd = drm.list_cards(AMD_SYSFS, vendor=0x1002)
    assert len(amd) == 1
    card = amd[0]
    assert (card.vendor, card.device_id) == (0x1002, 0x744C)
    assert card.read_int("mem_info_vram_total") == 25753026560
    assert card.read_int("mem_info_vram_used") == 11354857472
    assert card.read_int("no_such_file") is None


def test_list_cards_without_sysfs(tmp_path: Path) -> None:
    assert drm.list_cards(tmp_path) == []


def test_helpers() -> None:
    assert drm.pci_bus_number("0000:03:00.0") == 3
    assert drm.pci_bus_number("0000:00:02.0") == 0
    assert drm.pci_bus_number("garbage") is None
    assert drm.parse_uevent("A=1\nB=x=y\nnoise\n") == {"A": "1", "B": "x=y"}


def test_system_memory(proc: Path) -> None:
    assert drm.system_memory_bytes(proc) == 65536000 * 1024
    assert drm.system_memory_bytes(proc / "missing") is None
