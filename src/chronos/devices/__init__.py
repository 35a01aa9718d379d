"""Finding the machine's GPUs.

Backends are tried in a fixed order (``AUTO_ORDER``); every one that finds
devices contributes, so a machine with two vendors lists both. The simulated
backend is used only when asked for with ``CHRONOS_BACKEND=simulated``.
``CHRONOS_BACKEND`` may also name one real backend to use it alone.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable
from dataclasses import replace
from typing import TypeVar

from chronos.devices.base import Backend, Device, DeviceUsage, ProcessMemory
from chronos.errors import DeviceError

__all__ = [
    "AUTO_ORDER",
    "Backend",
    "Device",
    "DeviceUsage",
    "Machine",
    "ProcessMemory",
    "open_machine",
]

AUTO_ORDER = ("nvidia", "amd", "intel", "apple")
_MODULES = {
    "nvidia": ("chronos.devices.nvidia", "NvidiaBackend"),
    "amd": ("chronos.devices.amd", "AmdBackend"),
    "intel": ("chronos.devices.intel", "IntelBackend"),
    "apple": ("chronos.devices.apple", "AppleBackend"),
    "simulated": ("chronos.devices.simulated", "SimulatedBackend"),
}

NO_GPU_HINT = (
    "no GPU found (tried: {tried}). To try Chronos without a GPU, use the simulated "
    "backend: export CHRONOS_BACKEND=simulated"
)


def load_backend(name: str) -> Backend:
    try:
        module_name, class_name = _MODULES[name]
    except KeyError:
        known = ", ".join(sorted(_MODULES))
        raise DeviceError(f"unknown CHRONOS_BACKEND {name!r} (known: {known}, auto)") from None
    module = importlib.import_module(module_name)
    backend: Backend = getattr(module, class_name)()
    return backend


class Machine:
    """The devices of this machine across every backend that found some."""

    def __init__(self, backends: list[tuple[Backend, list[Device]]], notes: list[str]) -> None:
        self._backends = backends
        self.notes = notes
        self.devices: list[Device] = []
        for _backend, devices in backends:
            for device in devices:
                self.devices.append(replace(device, index=len(self.devices)))
        self.backend_names = [b.name for b, _ in backends]

    def device(self, index: int) -> Device:
        if not 0 <= index < len(self.devices):
            from chronos.errors import BadRequest

            count = len(self.devices)
            raise BadRequest(
                f"no GPU {index}: this machine has {count} "
                f"(valid: {'0-' + str(count - 1) if count else 'none'})"
            )
        return self.devices[index]

    def by_uuid(self, uuid: str) -> Device | None:
        return next((d for d in self.devices if d.uuid == uuid), None)

    def link_level(self, a: int, b: int) -> int | None:
        """How closely GPUs ``a`` and ``b`` are linked (``base.LINK_LEVELS``: lower is
        closer), or ``None`` where nothing can tell (different backends, or one that
        cannot say)."""
        first, second = self.device(a), self.device(b)
        if a == b:
            return 0
        for backend, devices in self._backends:
            uuids = {d.uuid for d in devices}
            if first.uuid in uuids and second.uuid in uuids:
                return backend.link_level(_own(devices, first), _own(devices, second))
        return None

    def usage(self) -> dict[str, DeviceUsage]:
        out: dict[str, DeviceUsage] = {}
        for backend, _ in self._backends:
            empty: list[DeviceUsage] = []
            for item in _safely(backend.usage, empty):
                out[item.uuid] = item
        return out

    def processes(self) -> list[ProcessMemory]:
        out: list[ProcessMemory] = []
        for backend, _ in self._backends:
            none: list[ProcessMemory] = []
            out.extend(_safely(backend.processes, none))
        return out

    @property
    def per_process_memory(self) -> bool:
        return all(b.per_process_memory for b, _ in self._backends)

    def close(self) -> None:
        for backend, _ in self._backends:
            backend.close()


T = TypeVar("T")


def _own(devices: list[Device], device: Device) -> Device:
    """``device`` as its backend listed it (the backend's own index)."""
    return next(d for d in devices if d.uuid == device.uuid)


def _safely(call: Callable[[], T], default: T) -> T:
    try:
        return call()
    except DeviceError:
        return default


def open_machine(choice: str | None = None) -> Machine:
    """Open the backends named by ``choice`` / ``CHRONOS_BACKEND`` (default ``auto``)."""
    choice = (choice or os.environ.get("CHRONOS_BACKEND") or "auto").strip().lower()
    names = list(AUTO_ORDER) if choice == "auto" else [choice]
    found: list[tuple[Backend, list[Device]]] = []
    notes: list[str] = []
    for name in names:
        backend = load_backend(name)
        try:
            devices = backend.devices()
        except DeviceError as exc:
            notes.append(f"{name}: {exc}")
            continue
        notes.extend(f"{name}: {note}" for note in getattr(backend, "notes", []))
        if devices:
            found.append((backend, devices))
        else:
            backend.close()
    if not found:
        if choice != "auto" and notes:
            raise DeviceError(notes[0])
        raise DeviceError(NO_GPU_HINT.format(tried=", ".join(names)))
    return Machine(found, notes)
