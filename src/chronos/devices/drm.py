"""Linux DRM: per-client memory from ``/proc/<pid>/fdinfo`` and card facts from sysfs.

The fdinfo format is the kernel's "DRM client usage stats"
(Documentation/gpu/drm-usage-stats.rst): one ``key: value`` pair per line,
``drm-driver`` mandatory, ``drm-pdev`` the PCI slot, ``drm-client-id`` the
identity of the open DRM file. Memory keys are ``drm-<stat>-<region>`` with
stat ``total``, ``shared``, ``resident``, ``purgeable`` or ``active``, plus the
older ``drm-memory-<region>`` (amdgpu's alias of ``resident``); values are
bytes, optionally followed by ``KiB`` or ``MiB``.

The same DRM client can be reachable through several file descriptors (dup,
fork, fd passing); each client is counted once, for the lowest PID holding it.
Reading another user's fdinfo needs the same rights as ptrace, so only root
sees every process.
"""

from __future__ import annotations

import os
import re
from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass, field
from functools import partial
from pathlib import Path

from chronos import procs

_UNITS = {"": 1, "KiB": 1024, "MiB": 1024**2}
_MEMORY_STATS = ("resident", "memory", "total")
"""Stats that measure a client's memory, most precise first (``memory`` aliases ``resident``)."""
_CARD_RE = re.compile(r"^card\d+$")


def parse_size(value: str) -> int | None:
    """``"23992 KiB"`` → 24567808; None for anything that is not a documented size."""
    parts = value.split()
    if not 1 <= len(parts) <= 2 or not parts[0].isdigit():
        return None
    unit = parts[1] if len(parts) == 2 else ""
    factor = _UNITS.get(unit)
    return None if factor is None else int(parts[0]) * factor


def parse_fdinfo(text: str) -> dict[str, str]:
    """Every ``key: value`` line of an fdinfo file, values stripped."""
    fields: dict[str, str] = {}
    for line in text.splitlines():
        key, sep, value = line.partition(":")
        key = key.strip()
        if sep and key and " " not in key and "\t" not in key:
            fields[key] = value.strip()
    return fields


@dataclass(frozen=True)
class DrmClient:
    """One open DRM file as its fdinfo describes it."""

    pid: int
    driver: str
    pdev: str | None
    client_id: str | None
    memory: dict[str, dict[str, int]] = field(default_factory=dict)
    """``{stat: {region: bytes}}``, e.g. ``{"resident": {"vram0": 24567808}}``."""

    @property
    def key(self) -> tuple[str, str, str] | None:
        """What identifies the client across file descriptors and processes."""
        if self.client_id is None:
            return None
        return (self.driver, self.pdev or "", self.client_id)

    def regions(self) -> set[str]:
        return {region for per_region in self.memory.values() for region in per_region}

    def region_bytes(self, region: str) -> int | None:
        """Memory held in ``region``: resident if reported, else the total."""
        for stat in _MEMORY_STATS:
            size = self.memory.get(stat, {}).get(region)
            if size is not None:
                return size
        return None

    def bytes_in(self, counts: Callable[[str], bool]) -> int | None:
        """Memory over the regions for which ``counts(region)`` holds; None if none is reported."""
        sizes = [self.region_bytes(r) for r in self.regions() if counts(r)]
        known = [s for s in sizes if s is not None]
        return sum(known) if known else None


def client_from_fdinfo(pid: int, text: str) -> DrmClient | None:
    """The DRM client an fdinfo describes, or None if it is not a DRM file."""
    fields = parse_fdinfo(text)
    driver = fields.get("drm-driver")
    if not driver:
        return None
    memory: dict[str, dict[str, int]] = {}
    for key, value in fields.items():
        stat_region = _memory_key(key)
        size = parse_size(value) if stat_region else None
        if stat_region and size is not None:
            stat, region = stat_region
            memory.setdefault(stat, {})[region] = size
    return DrmClient(
        pid=pid,
        driver=driver,
        pdev=fields.get("drm-pdev") or None,
        client_id=fields.get("drm-client-id") or None,
        memory=memory,
    )


def _memory_key(key: str) -> tuple[str, str] | None:
    if not key.startswith("drm-"):
        return None
    stat, sep, region = key[4:].partition("-")
    if not sep or not region or stat not in _MEMORY_STATS:
        return None
    if stat == "total" and region.startswith("cycles-"):
        return None  # drm-total-cycles-<engine> is a clock count, not memory
    return stat, region


def _proc(proc_root: Path | str | None) -> Path:
    """The /proc to read: the one given (a fixture), else the process layer's root."""
    return Path(procs.PROC if proc_root is None else proc_root)


def _pids(proc_root: Path) -> list[int]:
    try:
        return sorted(procs.all_pids(str(proc_root)))
    except OSError:
        return []


def _drm_fds(proc_root: Path, pid: int) -> Iterator[str]:
    fd_dir = proc_root / str(pid) / "fd"
    try:
        fds = os.listdir(fd_dir)
    except OSError:
        return
    for fd in fds:
        try:
            target = os.readlink(fd_dir / fd)
        except OSError:
            continue
        if target.startswith("/dev/dri/"):
            yield fd


def process_clients(pid: int, proc_root: Path | str | None = None) -> list[DrmClient]:
    """DRM clients open in one process (may repeat a client seen through several fds)."""
    root = _proc(proc_root)
    clients = []
    for fd in _drm_fds(root, pid):
        try:
            text = (root / str(pid) / "fdinfo" / fd).read_text(errors="replace")
        except OSError:
            continue
        client = client_from_fdinfo(pid, text)
        if client is not None:
            clients.append(client)
    return clients


def scan_clients(drivers: Collection[str], proc_root: Path | str | None = None) -> list[DrmClient]:
    """Every DRM client of ``drivers`` on the machine, each client once."""
    seen: set[tuple[str, str, str]] = set()
    out: list[DrmClient] = []
    root = _proc(proc_root)
    for pid in _pids(root):
        for client in process_clients(pid, root):
            if client.driver not in drivers:
                continue
            key = client.key
            if key is not None:
                if key in seen:
                    continue
                seen.add(key)
            out.append(client)
    return out


def memory_by_process(
    drivers: Collection[str],
    counts: Callable[[DrmClient, str], bool],
    proc_root: Path | str | None = None,
) -> dict[tuple[int, str], int | None]:
    """Bytes per ``(pid, pdev)`` over the regions where ``counts(client, region)``.

    A value is None when a process has the device open but reports no
    matching region (not available, as opposed to 0 bytes).
    """
    out: dict[tuple[int, str], int | None] = {}
    for client in scan_clients(drivers, proc_root):
        if client.pdev is None:
            continue
        size = client.bytes_in(partial(counts, client))
        key = (client.pid, client.pdev.lower())
        if key not in out or out[key] is None:
            out[key] = size
        elif size is not None:
            out[key] = (out[key] or 0) + size
    return out


# -- sysfs ---------------------------------------------------------------------


def read_text(path: Path) -> str | None:
    try:
        return path.read_text(errors="replace").strip()
    except OSError:
        return None


def read_int(path: Path) -> int | None:
    """A sysfs number, decimal or ``0x`` hexadecimal; None if absent or unreadable."""
    raw = read_text(path)
    if not raw:
        return None
    try:
        return int(raw, 0)
    except ValueError:
        return None


def parse_uevent(text: str) -> dict[str, str]:
    pairs = (line.partition("=") for line in text.splitlines())
    return {key.strip(): value.strip() for key, sep, value in pairs if sep}


@dataclass(frozen=True)
class DrmCard:
    """A ``/sys/class/drm/cardN`` whose parent is a PCI device."""

    name: str
    path: Path
    """The card's sysfs directory (``…/class/drm/cardN``)."""
    vendor: int | None
    device_id: int | None
    pci_slot: str
    driver: str | None

    @property
    def device_path(self) -> Path:
        return self.path / "device"

    def read_int(self, relative: str) -> int | None:
        return read_int(self.device_path / relative)


def list_cards(sysfs_root: Path | str = "/sys", vendor: int | None = None) -> list[DrmCard]:
    """DRM cards backed by PCI devices, one per device, ordered by PCI slot."""
    drm = Path(sysfs_root) / "class" / "drm"
    try:
        names = sorted(n for n in os.listdir(drm) if _CARD_RE.match(n))
    except OSError:
        return []
    cards: dict[str, DrmCard] = {}
    for name in names:
        card = _read_card(drm / name)
        if card is None or (vendor is not None and card.vendor != vendor):
            continue
        cards.setdefault(card.pci_slot, card)
    return [cards[slot] for slot in sorted(cards)]


def _read_card(path: Path) -> DrmCard | None:
    device = path / "device"
    uevent = parse_uevent(read_text(device / "uevent") or "")
    slot = uevent.get("PCI_SLOT_NAME")
    if not slot:
        return None
    return DrmCard(
        name=path.name,
        path=path,
        vendor=read_int(device / "vendor"),
        device_id=read_int(device / "device"),
        pci_slot=slot.lower(),
        driver=uevent.get("DRIVER"),
    )


def pci_bus_number(slot: str) -> int | None:
    """The bus of a ``dddd:bb:dd.f`` PCI slot."""
    parts = slot.split(":")
    if len(parts) != 3:
        return None
    try:
        return int(parts[1], 16)
    except ValueError:
        return None


def system_memory_bytes(proc_root: Path | str | None = None) -> int | None:
    """``MemTotal`` of ``/proc/meminfo`` in bytes."""
    text = read_text(_proc(proc_root) / "meminfo") or ""
    for line in text.splitlines():
        if line.startswith("MemTotal:"):
            parts = line.split()
            if len(parts) >= 2 and parts[1].isdigit():
                return int(parts[1]) * 1024
    return None
