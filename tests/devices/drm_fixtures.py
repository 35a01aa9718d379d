"""Fake ``/proc`` and ``/sys`` trees built from the fixture files."""

from __future__ import annotations

import os
from pathlib import Path

FIXTURES = Path(__file__).parent / "fixtures"
AMD_SYSFS = FIXTURES / "sysfs_amdgpu"
RENDER = "/dev/dri/renderD128"
EVENTFD = "anon_inode:[eventfd]"


def fdinfo(name: str) -> str:
    return (FIXTURES / "fdinfo" / f"{name}.txt").read_text()


def make_proc(root: Path, processes: dict[int, dict[int, tuple[str, str]]]) -> Path:
    """A /proc with ``{pid: {fd: (link target, fdinfo fixture)}}`` and a meminfo."""
    root.mkdir(parents=True, exist_ok=True)
    (root / "meminfo").write_text("MemTotal:       65536000 kB\nMemFree:        1000 kB\n")
    (root / "self").mkdir(exist_ok=True)
    for pid, fds in processes.items():
        (root / str(pid) / "fd").mkdir(parents=True)
        (root / str(pid) / "fdinfo").mkdir()
        for fd, (target, fixture) in fds.items():
            os.symlink(target, root / str(pid) / "fd" / str(fd))
            (root / str(pid) / "fdinfo" / str(fd)).write_text(fdinfo(fixture))
    return root


def write(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(text)


def intel_card(
    sysfs: Path, card: str, slot: str, driver: str, device_id: str, hwmon: bool = False
) -> Path:
    """An Intel card under ``sysfs/class/drm``; returns its ``device`` directory."""
    device = sysfs / "class" / "drm" / card / "device"
    write(device / "vendor", "0x8086\n")
    write(device / "device", f"{device_id}\n")
    pci_id = device_id.removeprefix("0x").upper()
    write(
        device / "uevent",
        f"DRIVER={driver}\nPCI_CLASS=30000\nPCI_ID=8086:{pci_id}\n"
        f"PCI_SUBSYS_ID=8086:1020\nPCI_SLOT_NAME={slot}\n",
    )
    if hwmon:
        write(device / "hwmon" / "hwmon3" / "name", f"{driver}\n")
    return device
