"""NVIDIA GPUs through NVML (see :mod:`chronos.devices.nvml`).

A GPU with MIG enabled is represented by its MIG instances, each with its own
``MIG-`` UUID and memory; the parent GPU is then not allocatable, so memory is
never counted twice. ``CUDA_VISIBLE_DEVICES`` accepts both ``GPU-`` and
``MIG-`` UUIDs, so every device is selected by UUID.
"""

from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any

from chronos.devices.base import Backend, Device, DeviceUsage, ProcessMemory
from chronos.devices.nvml import (
    FUNCTION_NOT_FOUND,
    NOT_FOUND,
    Nvml,
    Unavailable,
    is_not_available_value,
    text,
)
from chronos.errors import DeviceError

MIG_ENABLED = 1  # NVML_DEVICE_MIG_ENABLE
ARGUMENT_VERSION_MISMATCH = 25  # NVML_ERROR_ARGUMENT_VERSION_MISMATCH
COMPUTE_MODES = {0: "Default", 1: "Exclusive_Thread", 2: "Prohibited", 3: "Exclusive_Process"}
_PROCESS_FUNCTIONS = {
    "compute": "nvmlDeviceGetComputeRunningProcesses",
    "graphics": "nvmlDeviceGetGraphicsRunningProcesses",
}
# Errors after which an older version of the same NVML function may still work.
_TRY_OLDER = (FUNCTION_NOT_FOUND, ARGUMENT_VERSION_MISMATCH)


@dataclass(frozen=True)
class _Memory:
    total: int
    used: int | None
    free: int | None


@dataclass(frozen=True)
class _Slot:
    """One allocatable device and the NVML handles needed to query it."""

    device: Device
    handle: Any
    parent: Any = None
    """The physical GPU's handle when ``handle`` is a MIG instance."""
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None


class NvidiaBackend(Backend):
    name = "nvidia"

    def __init__(self, nvml: Nvml | None = None) -> None:
        self._nvml = nvml if nvml is not None else Nvml()
        self._slots: list[_Slot] | None = None
        self._memory_v2 = True
        self._process_function: dict[str, str] = {}
        self._links: dict[tuple[str, str], int | None] = {}
        self.notes: list[str] = []
        """Why a GPU was skipped during the last enumeration."""

    # -- Backend interface -------------------------------------------------

    def devices(self) -> list[Device]:
        self._slots = self._enumerate()
        return [slot.device for slot in self._slots]

    def usage(self) -> list[DeviceUsage]:
        return [self._usage(slot) for slot in self._ensure_slots()]

    def processes(self) -> list[ProcessMemory]:
        merged: dict[tuple[int, str], ProcessMemory] = {}
        for slot in self._ensure_slots():
            for kind in ("compute", "graphics"):
                for entry in self._slot_processes(slot, kind):
                    key = (entry.pid, entry.device_uuid)
                    merged[key] = _merge(merged.get(key), entry)
        return list(merged.values())

    def link_level(self, a: Device, b: Device) -> int | None:
        """NVML's common-ancestor level of the two GPUs (MIG instances: of their GPUs);
        ``0`` also where an NVLink joins them. ``None`` where NVML cannot say. Asked once
        per pair (the topology does not change while the driver runs): placement asks
        inside the admission transaction."""
        key = (a.uuid, b.uuid)
        if key not in self._links:
            self._links[key] = self._link_level(a, b)
        return self._links[key]

    def _link_level(self, a: Device, b: Device) -> int | None:
        handles = {s.device.uuid: s.parent or s.handle for s in self._ensure_slots()}
        first, second = handles.get(a.uuid), handles.get(b.uuid)
        if first is None or second is None:
            return None
        if first is second:
            return 0
        if self._nvlinked(first, second):
            return 0
        level = self._nvml.value("nvmlDeviceGetTopologyCommonAncestor", first, second)
        return int(level) if isinstance(level, int) else None

    def _nvlinked(self, first: Any, second: Any) -> bool:
        """Whether an active NVLink of ``first`` ends at ``second`` (by PCI bus id)."""
        target = self._pci_bus_id(second)
        links = self._nvml.constant("NVML_NVLINK_MAX_LINKS") or 0
        for link in range(int(links)):
            if self._nvml.value("nvmlDeviceGetNvLinkState", first, link) != 1:
                continue
            remote = self._nvml.value("nvmlDeviceGetNvLinkRemotePciInfo_v2", first, link)
            bus = text(getattr(remote, "busId", None)) if remote is not None else None
            if bus and target and normalize_bus_id(bus) == normalize_bus_id(target):
                return True
        return False

    def close(self) -> None:
        self._slots = None
        self._nvml.close()

    # -- enumeration -------------------------------------------------------

    def _ensure_slots(self) -> list[_Slot]:
        if self._slots is None:
            self._slots = self._enumerate()
        return self._slots

    def _enumerate(self) -> list[_Slot]:
        count = self._nvml.call("nvmlDeviceGetCount")
        if isinstance(count, Unavailable):
            raise DeviceError(f"NVML could not count the GPUs: {count.reason}")
        self.notes = []
        system = self._system_details()
        slots: list[_Slot] = []
        for index in range(int(count)):
            slots.extend(self._gpu_slots(index, system))
        return [replace(s, device=replace(s.device, index=i)) for i, s in enumerate(slots)]

    def _system_details(self) -> dict[str, str]:
        details: dict[str, str] = {}
        driver = text(self._nvml.value("nvmlSystemGetDriverVersion"))
        if driver:
            details["driver_version"] = driver
        cuda = self._nvml.value("nvmlSystemGetCudaDriverVersion_v2")
        if cuda is None:
            cuda = self._nvml.value("nvmlSystemGetCudaDriverVersion")
        if isinstance(cuda, int) and cuda > 0:
            details["cuda_driver_version"] = cuda_version_text(cuda)
        return details

    def _gpu_slots(self, index: int, system: dict[str, str]) -> list[_Slot]:
        nvml = self._nvml
        handle = nvml.call("nvmlDeviceGetHandleByIndex", index)
        if isinstance(handle, Unavailable):
            self.notes.append(f"GPU {index} skipped: {handle.reason}")
            return []
        details = {**system, "nvml_index": str(index)}
        mode = nvml.value("nvmlDeviceGetComputeMode", handle)
        if isinstance(mode, int):
            details["compute_mode"] = COMPUTE_MODES.get(mode, str(mode))
        mig = nvml.value("nvmlDeviceGetMigMode", handle)
        mig_on = isinstance(mig, (list, tuple)) and len(mig) > 0 and mig[0] == MIG_ENABLED
        details["mig_mode"] = "N/A" if mig is None else ("Enabled" if mig_on else "Disabled")
        pci = self._pci_bus_id(handle)
        if mig_on:
            return self._mig_slots(index, handle, pci, details)
        device = self._describe(handle, pci, details, f"GPU {index}")
        return [] if device is None else [_Slot(device, handle)]

    def _mig_slots(
        self, index: int, parent: Any, pci: str | None, details: dict[str, str]
    ) -> list[_Slot]:
        nvml = self._nvml
        count = nvml.call("nvmlDeviceGetMaxMigDeviceCount", parent)
        if isinstance(count, Unavailable):
            self.notes.append(f"GPU {index} skipped: MIG is enabled but {count.reason}")
            return []
        parent_uuid = text(nvml.value("nvmlDeviceGetUUID", parent))
        slots: list[_Slot] = []
        for mig_index in range(int(count)):
            handle = nvml.call("nvmlDeviceGetMigDeviceHandleByIndex", parent, mig_index)
            if isinstance(handle, Unavailable) and handle.code == NOT_FOUND:
                continue  # an empty MIG slot
            label = f"GPU {index} MIG instance {mig_index}"
            slot = None
            if not isinstance(handle, Unavailable):
                slot = self._mig_slot(handle, parent, pci, details, parent_uuid, label)
            if slot is None:
                reason = handle.reason if isinstance(handle, Unavailable) else "unreadable"
                self.notes.append(f"GPU {index} skipped: {label} could not be read ({reason})")
                return []
            slots.append(slot)
        if not slots:
            self.notes.append(f"GPU {index}: MIG is enabled but has no MIG instance")
        return slots

    def _mig_slot(
        self,
        handle: Any,
        parent: Any,
        pci: str | None,
        details: dict[str, str],
        parent_uuid: str | None,
        label: str,
    ) -> _Slot | None:
        gi = self._nvml.value("nvmlDeviceGetGpuInstanceId", handle)
        ci = self._nvml.value("nvmlDeviceGetComputeInstanceId", handle)
        mig_details = {**details, "mig_parent_uuid": parent_uuid or "unknown"}
        if isinstance(gi, int):
            mig_details["gpu_instance_id"] = str(gi)
        if isinstance(ci, int):
            mig_details["compute_instance_id"] = str(ci)
        device = self._describe(handle, pci, mig_details, label, quiet=True)
        if device is None:
            return None
        gi_id = gi if isinstance(gi, int) else None
        ci_id = ci if isinstance(ci, int) else None
        return _Slot(device, handle, parent, gi_id, ci_id)

    def _describe(
        self,
        handle: Any,
        pci: str | None,
        details: dict[str, str],
        label: str,
        quiet: bool = False,
    ) -> Device | None:
        uuid = text(self._nvml.value("nvmlDeviceGetUUID", handle))
        memory = self._memory(handle)
        if not uuid or memory is None or memory.total <= 0:
            if not quiet:
                missing = "UUID" if not uuid else "memory size"
                self.notes.append(f"{label} skipped: its {missing} could not be read")
            return None
        name = text(self._nvml.value("nvmlDeviceGetName", handle)) or "NVIDIA GPU"
        return Device(
            index=0,
            uuid=uuid,
            name=name,
            vendor="nvidia",
            total_bytes=memory.total,
            backend=self.name,
            pci_bus_id=pci,
            visible_env={"CUDA_VISIBLE_DEVICES": uuid},
            details=details,
        )

    def _pci_bus_id(self, handle: Any) -> str | None:
        info = self._nvml.value("nvmlDeviceGetPciInfo", handle)
        bus_id = text(getattr(info, "busId", None))
        return normalize_bus_id(bus_id) if bus_id else None

    # -- measurements ------------------------------------------------------

    def _memory(self, handle: Any) -> _Memory | None:
        version = self._nvml.constant("nvmlMemory_v2")
        if self._memory_v2 and version is not None:
            try:
                info = self._nvml.call("nvmlDeviceGetMemoryInfo", handle, version=version)
            except TypeError:  # a pynvml without the version parameter
                info = Unavailable("no version parameter", FUNCTION_NOT_FOUND)
            if not isinstance(info, Unavailable):
                return _as_memory(info)
            if info.code == FUNCTION_NOT_FOUND:
                self._memory_v2 = False  # this driver has only v1: stop asking
        return _as_memory(self._nvml.value("nvmlDeviceGetMemoryInfo", handle))

    def _usage(self, slot: _Slot) -> DeviceUsage:
        memory = self._memory(slot.handle)
        rates = self._nvml.value("nvmlDeviceGetUtilizationRates", slot.handle)
        gpu = getattr(rates, "gpu", None)
        percent = float(gpu) if isinstance(gpu, int) and 0 <= gpu <= 100 else None
        return DeviceUsage(
            uuid=slot.device.uuid,
            used_bytes=memory.used if memory else None,
            free_bytes=memory.free if memory else None,
            utilization_pct=percent,
        )

    def _slot_processes(self, slot: _Slot, kind: str) -> list[ProcessMemory]:
        found = self._running(slot.handle, kind)
        if found is None and slot.parent is not None:
            # Some drivers answer only for the physical GPU: pick this instance's share.
            on_parent = self._running(slot.parent, kind) or []
            found = [p for p in on_parent if _in_instance(p, slot)]
        out = []
        for proc in found or []:
            pid = getattr(proc, "pid", None)
            if isinstance(pid, int):
                out.append(ProcessMemory(pid, slot.device.uuid, _bytes(proc), kind))
        return out

    def _running(self, handle: Any, kind: str) -> list[Any] | None:
        """Processes of ``kind`` on ``handle``, newest NVML function first; None if unknown."""
        base = _PROCESS_FUNCTIONS[kind]
        known = self._process_function.get(kind)
        names = [known] if known else [f"{base}_v3", f"{base}_v2", base]
        for name in names:
            result = self._nvml.call(name, handle)
            if not isinstance(result, Unavailable):
                self._process_function[kind] = name
                return list(result)
            if result.code not in _TRY_OLDER:
                return None
        return None


def _as_memory(info: Any) -> _Memory | None:
    total = getattr(info, "total", None)
    if not isinstance(total, int) or is_not_available_value(total):
        return None
    used = getattr(info, "used", None)
    free = getattr(info, "free", None)
    return _Memory(
        total=total,
        used=None if not isinstance(used, int) or is_not_available_value(used) else used,
        free=None if not isinstance(free, int) or is_not_available_value(free) else free,
    )


def _bytes(proc: Any) -> int | None:
    used = getattr(proc, "usedGpuMemory", None)
    if not isinstance(used, int) or is_not_available_value(used):
        return None
    return used


def _in_instance(proc: Any, slot: _Slot) -> bool:
    if getattr(proc, "gpuInstanceId", None) != slot.gpu_instance_id:
        return False
    ci = slot.compute_instance_id
    return ci is None or getattr(proc, "computeInstanceId", None) == ci


def _merge(old: ProcessMemory | None, new: ProcessMemory) -> ProcessMemory:
    """One entry per (pid, device) when a process is listed more than once.

    NVML reports a process's memory on a device as one figure, repeated in the
    compute and the graphics list for a process that is both; summing would
    count it twice, so the larger figure is kept.
    """
    if old is None:
        return new
    sizes = [n for n in (old.used_bytes, new.used_bytes) if n is not None]
    kind = "compute" if "compute" in (old.kind, new.kind) else old.kind
    return replace(old, used_bytes=max(sizes) if sizes else None, kind=kind)


def cuda_version_text(version: int) -> str:
    """NVML's CUDA driver version integer (13000) as ``13.0``."""
    return f"{version // 1000}.{version % 1000 // 10}"


def normalize_bus_id(bus_id: str) -> str:
    """NVML's ``00000000:3B:00.0`` in the kernel's ``0000:3b:00.0`` form."""
    domain, sep, rest = bus_id.strip().partition(":")
    if not sep:
        return bus_id.strip().lower()
    try:
        return f"{int(domain, 16):04x}:{rest.lower()}"
    except ValueError:
        return bus_id.strip().lower()
