"""The device-backend interface every GPU vendor module implements.

A backend answers three questions, each cheap enough to ask many times a
second: which devices exist, how much of each one's memory is in use, and
which processes hold that memory. Anything a vendor cannot tell is ``None``
("not available"), never a guess.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from dataclasses import dataclass, field

LINK_LEVELS = {
    0: "same board",
    10: "one PCIe switch",
    20: "several PCIe switches",
    30: "one host bridge",
    40: "one NUMA node",
    50: "across NUMA nodes",
}
"""NVML's topology levels (``nvmlGpuTopologyLevel_t``), the scale of
:meth:`Backend.link_level`: two GPUs of one board (or joined by NVLink, see the NVIDIA
backend) are ``0``; GPUs that talk only across the system interconnect are ``50``."""


@dataclass(frozen=True)
class Device:
    """One allocatable GPU (or MIG instance) as Chronos sees it."""

    index: int
    """Position in Chronos' device list (the ``DEVICE`` users type)."""
    uuid: str
    """Stable identity; partitions are recorded against it."""
    name: str
    vendor: str
    """``nvidia``, ``amd``, ``intel``, ``apple`` or ``simulated``."""
    total_bytes: int
    backend: str
    pci_bus_id: str | None = None
    visible_env: dict[str, str] = field(default_factory=dict)
    """Environment that restricts a child process to this device alone."""
    details: dict[str, str] = field(default_factory=dict)
    """Vendor facts worth showing (driver version, compute mode, MIG mode …)."""


@dataclass(frozen=True)
class DeviceUsage:
    """Memory and load of one device at one instant."""

    uuid: str
    used_bytes: int | None
    free_bytes: int | None
    utilization_pct: float | None = None


@dataclass(frozen=True)
class ProcessMemory:
    """GPU memory one process holds on one device."""

    pid: int
    device_uuid: str
    used_bytes: int | None
    kind: str = "compute"
    """``compute`` or ``graphics`` (NVIDIA); ``drm`` for DRM client stats."""


class Backend(ABC):
    """One vendor's view of its devices. Construct, then ``devices()``.

    Constructors must be cheap and must not fail; ``devices()`` raises
    :class:`chronos.errors.DeviceError` with a user-readable reason when the
    vendor's driver or library is missing.
    """

    name: str = "base"
    per_process_memory: bool = True
    """False where the vendor has no per-process figure (Apple)."""

    @abstractmethod
    def devices(self) -> list[Device]:
        """Devices in a stable order; ``index`` is set by the caller."""

    @abstractmethod
    def usage(self) -> list[DeviceUsage]:
        """Current memory use of every device."""

    @abstractmethod
    def processes(self) -> list[ProcessMemory]:
        """Every process holding memory on any device (empty if not available)."""

    def link_level(self, a: Device, b: Device) -> int | None:
        """How closely two of this backend's devices are linked, on NVML's topology scale
        (:data:`LINK_LEVELS`: lower is closer), or ``None`` where the backend cannot tell."""
        return None

    def close(self) -> None:  # noqa: B027 - optional hook
        """Release vendor handles (e.g. nvmlShutdown)."""
