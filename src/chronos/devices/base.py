"""The device-backend interface every GPU vendor module implements.

A backend answers three questions, each cheap enough to ask many times a
second: which devices exist, how much of each one's memory is in use, and
which processes hold that memory. Anything a vendor cannot tell is ``None``
("not available"), never a guess.
"""

from __future__ import annotations

from abc import ABC, abstractmethod
from collections.abc import Sequence
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


LISTED_VISIBILITY = ("CUDA_VISIBLE_DEVICES", "ROCR_VISIBLE_DEVICES", "ZE_AFFINITY_MASK")
"""Variables whose value is a comma-separated list of devices, in the order given."""
RELATIVE_VISIBILITY = ("HIP_VISIBLE_DEVICES",)
"""Variables that count within the devices the listed ones left visible (HIP within ROCr)."""


def visible_env_for(devices: Sequence[Device]) -> dict[str, str]:
    """Environment that restricts a child process to exactly ``devices``, in that order.

    One device: its own ``visible_env``, unchanged. Several (a group's GPUs, primary
    first): listed variables join each device's value (``CUDA_VISIBLE_DEVICES=GPU-a,GPU-b``,
    so ordinal k is the group's k-th GPU), relative ones count 0..n-1, and any other
    (``ZE_ENABLE_PCI_ID_DEVICE_ORDER``) keeps the primary's value.
    """
    if len(devices) == 1:
        return dict(devices[0].visible_env)
    out: dict[str, str] = {}
    for device in devices:
        for name, value in device.visible_env.items():
            if name in LISTED_VISIBILITY:
                out[name] = f"{out[name]},{value}" if name in out else value
            elif name in RELATIVE_VISIBILITY:
                out[name] = ",".join(str(i) for i in range(len(devices)))
            else:
                out.setdefault(name, value)
    return out


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
