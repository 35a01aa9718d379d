"""Intel GPUs (i915 and xe drivers) through sysfs and DRM fdinfo.

Device memory comes from sysfs where the driver publishes it: xe's
``device/tileN/physical_vram_size_bytes`` (summed over tiles) or
``lmem_total_bytes`` (out-of-tree i915 builds). An integrated GPU (PCI bus 0,
no device-local memory, no hwmon, which i915 and xe register only for
discrete cards) uses system memory; its total is ``MemTotal`` and every DRM
region of its clients counts. A discrete card whose driver does not publish
its memory size (mainline i915) is skipped with a note, never guessed.

Device-wide used/free is not published by mainline drivers: it is reported
as not available, except where ``lmem_avail_bytes`` exists.

A child is restricted with Level Zero's ``ZE_AFFINITY_MASK=<n>``, where n is
the card's position among Intel GPUs in PCI order, which
``ZE_ENABLE_PCI_ID_DEVICE_ORDER=1`` makes Level Zero use too. Cards the
compute runtime does not support shift that order (best effort).
"""

from __future__ import annotations

import os
from dataclasses import dataclass, replace
from pathlib import Path

from chronos import procs
from chronos.devices.base import Backend, Device, DeviceUsage, ProcessMemory
from chronos.devices.drm import (
    DrmCard,
    DrmClient,
    list_cards,
    memory_by_process,
    pci_bus_number,
    read_int,
    system_memory_bytes,
)

INTEL_VENDOR = 0x8086
DRIVERS = ("i915", "xe")


@dataclass(frozen=True)
class _Card:
    device: Device
    card: DrmCard
    discrete: bool


def local_memory_bytes(card: DrmCard) -> int | None:
    """Device-local memory published in sysfs, or None."""
    tiles = _xe_tile_sizes(card.device_path)
    if tiles:
        return sum(tiles)
    for path in (card.path / "lmem_total_bytes", card.device_path / "lmem_total_bytes"):
        size = read_int(path)
        if size:
            return size
    return None


def _xe_tile_sizes(device_path: Path) -> list[int]:
    try:
        tiles = sorted(n for n in os.listdir(device_path) if n.startswith("tile"))
    except OSError:
        return []
    sizes = [read_int(device_path / t / "physical_vram_size_bytes") for t in tiles]
    return [s for s in sizes if s]


def is_integrated(card: DrmCard) -> bool:
    """On the root bus and without the hwmon that i915/xe give discrete cards."""
    return pci_bus_number(card.pci_slot) == 0 and not (card.device_path / "hwmon").exists()


def is_local_region(driver: str, region: str) -> bool:
    """Whether a DRM memory region is on a discrete card's own memory."""
    if driver == "xe":
        return region.startswith("vram") or region == "stolen"
    return region.startswith("local") or region.startswith("stolen-local")


class IntelBackend(Backend):
    name = "intel"

    def __init__(
        self, sysfs_root: Path | str = "/sys", proc_root: Path | str | None = None
    ) -> None:
        self._sysfs = Path(sysfs_root)
        self._proc = Path(procs.PROC if proc_root is None else proc_root)
        self._cards: list[_Card] | None = None
        self.notes: list[str] = []

    def devices(self) -> list[Device]:
        self._cards = self._enumerate()
        return [c.device for c in self._cards]

    def usage(self) -> list[DeviceUsage]:
        return [_usage(c) for c in self._ensure()]

    def processes(self) -> list[ProcessMemory]:
        cards = {c.card.pci_slot: c for c in self._ensure()}

        def counts(client: DrmClient, region: str) -> bool:
            card = cards.get((client.pdev or "").lower())
            return card is not None and (
                not card.discrete or is_local_region(client.driver, region)
            )

        found = memory_by_process(DRIVERS, counts, self._proc)
        return [
            ProcessMemory(pid, cards[slot].device.uuid, size, "drm")
            for (pid, slot), size in found.items()
            if slot in cards
        ]

    def _ensure(self) -> list[_Card]:
        if self._cards is None:
            self._cards = self._enumerate()
        return self._cards

    def _enumerate(self) -> list[_Card]:
        self.notes = []
        cards = [c for c in list_cards(self._sysfs, INTEL_VENDOR) if c.driver in DRIVERS]
        out: list[_Card] = []
        # The position counts every Intel GPU, also skipped ones: Level Zero sees them all.
        for position, card in enumerate(cards):
            found = self._card(card, position)
            if found is not None:
                out.append(replace(found, device=replace(found.device, index=len(out))))
        return out

    def _card(self, card: DrmCard, position: int) -> _Card | None:
        local = local_memory_bytes(card)
        discrete = local is not None or not is_integrated(card)
        total = local if discrete else system_memory_bytes(self._proc)
        if not total:
            why = "its memory size is not published by the driver" if discrete else "no MemTotal"
            self.notes.append(f"Intel GPU {card.pci_slot} ({card.driver}) skipped: {why}")
            return None
        details = {"driver": card.driver or "", "card": card.name}
        details["memory"] = "device-local" if discrete else "shared system memory"
        if card.device_id is not None:
            details["pci_device_id"] = f"0x{card.device_id:04x}"
        device = Device(
            index=0,
            uuid=f"INTEL-PCI-{card.pci_slot}",
            name=_name(card, discrete),
            vendor="intel",
            total_bytes=total,
            backend=self.name,
            pci_bus_id=card.pci_slot,
            visible_env={
                "ZE_AFFINITY_MASK": str(position),
                "ZE_ENABLE_PCI_ID_DEVICE_ORDER": "1",
            },
            details=details,
        )
        return _Card(device, card, discrete)


def _name(card: DrmCard, discrete: bool) -> str:
    kind = "GPU" if discrete else "integrated GPU"
    device_id = f" [{card.device_id:04x}]" if card.device_id is not None else ""
    return f"Intel {kind}{device_id}"


def _lmem_available(card: DrmCard) -> int | None:
    for path in (card.path, card.device_path):
        available = read_int(path / "lmem_avail_bytes")
        if available is not None:
            return available
    return None


def _usage(card: _Card) -> DeviceUsage:
    total = card.device.total_bytes
    available = _lmem_available(card.card) if card.discrete else None
    used = None if available is None else max(0, total - available)
    return DeviceUsage(
        uuid=card.device.uuid,
        used_bytes=used,
        free_bytes=None if used is None else total - used,
    )
