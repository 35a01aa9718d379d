"""Apple Silicon: one GPU sharing the machine's unified memory.

macOS has no public per-process GPU memory figure, so this backend sets
``per_process_memory = False`` and lists no processes; partitions here can
only be cooperative. The device's size is the unified memory
(``sysctl hw.memsize``); used/free are not available.
"""

from __future__ import annotations

import platform
import subprocess
import sys

from chronos.devices.base import Backend, Device, DeviceUsage, ProcessMemory
from chronos.errors import DeviceError

SYSCTL = "/usr/sbin/sysctl"
APPLE_UUID = "APPLE-GPU-0"


def is_apple_silicon() -> bool:
    return sys.platform == "darwin" and platform.machine() == "arm64"


def sysctl(name: str) -> str | None:
    """``sysctl -n name``, or None if it cannot be read."""
    try:
        done = subprocess.run(
            [SYSCTL, "-n", name], capture_output=True, text=True, timeout=5, check=False
        )
    except (OSError, subprocess.SubprocessError):
        return None
    value = done.stdout.strip()
    return value if done.returncode == 0 and value else None


def chip_name(brand: str | None) -> str:
    """``machdep.cpu.brand_string`` ("Apple M2 Pro") as a device name."""
    if not brand:
        return "Apple Silicon GPU"
    return brand if brand.startswith("Apple") else f"Apple {brand}"


class AppleBackend(Backend):
    name = "apple"
    per_process_memory = False

    def devices(self) -> list[Device]:
        if not is_apple_silicon():
            raise DeviceError("not an Apple Silicon Mac")
        memsize = sysctl("hw.memsize")
        if memsize is None or not memsize.isdigit() or int(memsize) <= 0:
            raise DeviceError("could not read the unified memory size (sysctl hw.memsize)")
        return [
            Device(
                index=0,
                uuid=APPLE_UUID,
                name=chip_name(sysctl("machdep.cpu.brand_string")),
                vendor="apple",
                total_bytes=int(memsize),
                backend=self.name,
                details={"memory": "unified (shared with the CPU)"},
            )
        ]

    def usage(self) -> list[DeviceUsage]:
        if not is_apple_silicon():
            return []
        return [DeviceUsage(uuid=APPLE_UUID, used_bytes=None, free_bytes=None)]

    def processes(self) -> list[ProcessMemory]:
        return []
