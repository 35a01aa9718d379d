"""AMD GPUs (amdgpu driver) through sysfs, DRM fdinfo and the KFD topology.

Devices are the ``/sys/class/drm/card*`` of vendor 0x1002 bound to amdgpu,
sized by ``mem_info_vram_total``; usage is ``mem_info_vram_used`` and
``gpu_busy_percent``. Per-process VRAM is the larger of the DRM fdinfo figure
(``drm-resident-vram``, or the older ``drm-memory-vram``) and the ROCm (KFD)
figure in ``/sys/class/kfd/kfd/proc/<pid>/vram_<gpu_id>``.

When the optional ``amdsmi`` package imports, it only supplies each device's
UUID and marketing name; everything else comes from sysfs. Without it the
UUID is derived from the PCI slot (``AMD-PCI-0000:03:00.0``), so installing
amdsmi later changes the UUIDs partitions are recorded against.

A child is restricted with ``ROCR_VISIBLE_DEVICES`` (the ROCr ``GPU-<unique
id>`` UUID where KFD reports one, else the KFD ordinal) and
``HIP_VISIBLE_DEVICES=0`` (HIP indexes the devices ROCr left visible).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

from chronos import procs
from chronos.devices.base import Backend, Device, DeviceUsage, ProcessMemory
from chronos.devices.drm import (
    DrmCard,
    DrmClient,
    list_cards,
    memory_by_process,
    read_int,
    read_text,
)

AMD_VENDOR = 0x1002
DRIVER = "amdgpu"


@dataclass(frozen=True)
class KfdNode:
    """A GPU node of the KFD topology (what ROCm enumerates)."""

    gpu_id: int
    pci_slot: str
    unique_id: int | None
    ordinal: int
    """Position among KFD GPU nodes: ROCr's device index."""

    @property
    def rocr_uuid(self) -> str | None:
        return None if not self.unique_id else f"GPU-{self.unique_id:016X}"


def _properties(text: str) -> dict[str, int]:
    out: dict[str, int] = {}
    for line in text.splitlines():
        parts = line.split()
        if len(parts) == 2 and parts[1].isdigit():
            out[parts[0]] = int(parts[1])
    return out


def kfd_nodes(sysfs_root: Path | str = "/sys") -> list[KfdNode]:
    """GPU nodes of ``/sys/class/kfd/kfd/topology/nodes``, in node order."""
    nodes_dir = Path(sysfs_root) / "class" / "kfd" / "kfd" / "topology" / "nodes"
    try:
        names = sorted((n for n in os.listdir(nodes_dir) if n.isdigit()), key=int)
    except OSError:
        return []
    nodes: list[KfdNode] = []
    for name in names:
        gpu_id = read_int(nodes_dir / name / "gpu_id")
        props = _properties(read_text(nodes_dir / name / "properties") or "")
        if not gpu_id or "location_id" not in props:
            continue  # a CPU node
        location, domain = props["location_id"], props.get("domain", 0)
        slot = f"{domain:04x}:{location >> 8 & 0xFF:02x}:{location >> 3 & 0x1F:02x}.{location & 7}"
        nodes.append(KfdNode(gpu_id, slot, props.get("unique_id") or None, len(nodes)))
    return nodes


def kfd_process_vram(sysfs_root: Path | str = "/sys") -> dict[tuple[int, int], int]:
    """ROCm VRAM per ``(pid, gpu_id)`` from ``/sys/class/kfd/kfd/proc``."""
    proc_dir = Path(sysfs_root) / "class" / "kfd" / "kfd" / "proc"
    out: dict[tuple[int, int], int] = {}
    try:
        pids = [p for p in os.listdir(proc_dir) if p.isdigit()]
    except OSError:
        return out
    for pid in pids:
        try:
            names = os.listdir(proc_dir / pid)
        except OSError:
            continue
        for name in names:
            gpu_id = name.removeprefix("vram_")
            size = read_int(proc_dir / pid / name) if name.startswith("vram_") else None
            if size is not None and gpu_id.isdigit():
                out[(int(pid), int(gpu_id))] = size
    return out


@dataclass(frozen=True)
class _Identity:
    uuid: str | None
    name: str | None


class AmdBackend(Backend):
    name = "amd"

    def __init__(
        self,
        sysfs_root: Path | str = "/sys",
        proc_root: Path | str | None = None,
        amdsmi: Any = None,
        use_amdsmi: bool = True,
    ) -> None:
        self._sysfs = Path(sysfs_root)
        self._proc = Path(procs.PROC if proc_root is None else proc_root)
        self._amdsmi = amdsmi
        self._use_amdsmi = use_amdsmi
        self._cards: list[tuple[Device, DrmCard]] | None = None
        self.notes: list[str] = []

    def devices(self) -> list[Device]:
        self._cards = self._enumerate()
        return [device for device, _ in self._cards]

    def usage(self) -> list[DeviceUsage]:
        return [_usage(device, card) for device, card in self._ensure()]

    def processes(self) -> list[ProcessMemory]:
        by_slot = {card.pci_slot: device.uuid for device, card in self._ensure()}
        merged: dict[tuple[int, str], int | None] = {}
        drm = memory_by_process({DRIVER}, _counts_vram, self._proc)
        for (pid, slot), size in drm.items():
            if slot in by_slot:
                merged[(pid, by_slot[slot])] = size
        slot_of_gpu = {n.gpu_id: n.pci_slot for n in kfd_nodes(self._sysfs)}
        for (pid, gpu_id), size in kfd_process_vram(self._sysfs).items():
            uuid = by_slot.get(slot_of_gpu.get(gpu_id, ""))
            if uuid is not None:
                merged[(pid, uuid)] = max(size, merged.get((pid, uuid)) or 0)
        return [ProcessMemory(pid, uuid, size, "drm") for (pid, uuid), size in merged.items()]

    def _ensure(self) -> list[tuple[Device, DrmCard]]:
        if self._cards is None:
            self._cards = self._enumerate()
        return self._cards

    def _enumerate(self) -> list[tuple[Device, DrmCard]]:
        self.notes = []
        cards = [c for c in list_cards(self._sysfs, AMD_VENDOR) if c.driver == DRIVER]
        if not cards:
            return []
        identities = self._identities()
        nodes = {node.pci_slot: node for node in kfd_nodes(self._sysfs)}
        out: list[tuple[Device, DrmCard]] = []
        for position, card in enumerate(cards):
            identity = identities.get(card.pci_slot, _Identity(None, None))
            device = self._device(card, identity, nodes.get(card.pci_slot), position)
            if device is not None:
                out.append((replace(device, index=len(out)), card))
        return out

    def _device(
        self, card: DrmCard, identity: _Identity, node: KfdNode | None, position: int
    ) -> Device | None:
        total = card.read_int("mem_info_vram_total")
        if not total:
            self.notes.append(f"AMD GPU {card.pci_slot} skipped: mem_info_vram_total unreadable")
            return None
        details = {"driver": DRIVER, "card": card.name}
        if card.device_id is not None:
            details["pci_device_id"] = f"0x{card.device_id:04x}"
        if node is not None:
            details["kfd_gpu_id"] = str(node.gpu_id)
        return Device(
            index=0,
            uuid=identity.uuid or f"AMD-PCI-{card.pci_slot}",
            name=identity.name or _sysfs_name(card),
            vendor="amd",
            total_bytes=total,
            backend=self.name,
            pci_bus_id=card.pci_slot,
            visible_env=_visible_env(node, position),
            details=details,
        )

    def _identities(self) -> dict[str, _Identity]:
        """UUID and name per PCI slot from amdsmi; empty when it is absent or fails."""
        module = self._amdsmi_module()
        if module is None:
            return {}
        try:
            module.amdsmi_init()
        except Exception as exc:
            self.notes.append(f"amdsmi could not start ({exc}); using sysfs names")
            return {}
        try:
            return _read_identities(module)
        except Exception:
            return {}
        finally:
            with contextlib.suppress(Exception):
                module.amdsmi_shut_down()

    def _amdsmi_module(self) -> Any:
        if self._amdsmi is not None or not self._use_amdsmi:
            return self._amdsmi
        try:
            import amdsmi
        except Exception:  # ImportError, or a library mismatch raised at import
            return None
        return amdsmi


def _read_identities(module: Any) -> dict[str, _Identity]:
    out: dict[str, _Identity] = {}
    for handle in module.amdsmi_get_processor_handles():
        bdf = _optional(module, "amdsmi_get_gpu_device_bdf", handle)
        if not isinstance(bdf, str) or not bdf:
            continue
        uuid = _optional(module, "amdsmi_get_gpu_device_uuid", handle)
        asic = _optional(module, "amdsmi_get_gpu_asic_info", handle)
        name = asic.get("market_name") if isinstance(asic, dict) else None
        out[bdf.lower()] = _Identity(
            uuid if isinstance(uuid, str) and uuid else None,
            name if isinstance(name, str) and name.strip() else None,
        )
    return out


def _optional(module: Any, function: str, *args: Any) -> Any:
    try:
        return getattr(module, function)(*args)
    except Exception:
        return None


def _sysfs_name(card: DrmCard) -> str:
    product = read_text(card.device_path / "product_name")
    if product:
        return product
    device_id = f" [{card.device_id:04x}]" if card.device_id is not None else ""
    return f"AMD GPU{device_id}"


def _visible_env(node: KfdNode | None, position: int) -> dict[str, str]:
    # Without a KFD node, the card's position is the best guess at ROCr's order.
    rocr = str(position) if node is None else node.rocr_uuid or str(node.ordinal)
    return {"ROCR_VISIBLE_DEVICES": rocr, "HIP_VISIBLE_DEVICES": "0"}


def _usage(device: Device, card: DrmCard) -> DeviceUsage:
    used = card.read_int("mem_info_vram_used")
    busy = card.read_int("gpu_busy_percent")
    return DeviceUsage(
        uuid=device.uuid,
        used_bytes=used,
        free_bytes=None if used is None else max(0, device.total_bytes - used),
        utilization_pct=float(busy) if busy is not None and 0 <= busy <= 100 else None,
    )


def _counts_vram(client: DrmClient, region: str) -> bool:
    return region == "vram"
