"""Partition membership through cgroup v2, where the machine lets the daemon use it.

A process moved into ``<cgroup2>/chronos/<partition id>`` stays there with
every child it ever forks: an ordinary user cannot move a process out (that
needs write access to another cgroup's ``cgroup.procs``), rewrite it away like
an environment variable, or escape it by double-forking. So when the daemon
runs as root on a kernel with a writable cgroup2 hierarchy, it places every
process attached to a partition there and reads membership back from
``cgroup.procs``. Elsewhere (no root, no cgroup2, read-only hierarchy)
``available`` is False and attribution falls back to ancestry and the
``CHRONOS_PARTITION_ID`` marker (see attribution.py).

Only membership is used: no controllers are enabled and no limits are set,
so Chronos never changes how the kernel schedules or reclaims.
"""

from __future__ import annotations

import contextlib
import functools
import os
from pathlib import Path

from chronos import procs

GROUP = "chronos"


def find_cgroup2_root(mountinfo: str = "/proc/self/mountinfo") -> Path | None:
    """Where the unified (v2) hierarchy is mounted: /sys/fs/cgroup, or …/unified on hybrids."""
    try:
        with open(mountinfo) as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        fields = line.split(" - ", 1)
        if len(fields) == 2 and fields[1].split(" ", 1)[0] == "cgroup2":
            return Path(fields[0].split()[4])
    return None


class PartitionCgroups:
    """One cgroup per partition under ``<root>/chronos``."""

    def __init__(self, root: Path | None) -> None:
        self.base = None if root is None else root / GROUP
        self.available = self.base is not None and self._prepare()

    @classmethod
    def detect(cls) -> PartitionCgroups:
        return cls(find_cgroup2_root() if os.geteuid() == 0 else None)

    def _prepare(self) -> bool:
        assert self.base is not None
        try:
            self.base.mkdir(exist_ok=True)
        except OSError:
            return False
        return os.access(self.base / "cgroup.procs", os.W_OK)

    def place(self, partition_id: str, pid: int) -> bool:
        """Move ``pid`` (and so its future children) into the partition's cgroup."""
        if not self.available or self.base is None:
            return False
        group = self.base / partition_id
        try:
            group.mkdir(exist_ok=True)
            (group / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            return False
        return True

    def unplace(self, pid: int, origin: str | None) -> bool:
        """Move ``pid`` back out: to ``origin`` (its cgroup before ``place``) or its parent's.

        For an attach that turned out to have placed the wrong process (its PID
        was reused, or it changed owner meanwhile).
        """
        if not self.available or self.base is None:
            return False
        root = self.base.parent
        target = origin
        if target is None:
            parent = procs.parent_pid(pid)
            target = cgroup_of(parent) if parent else None
        if target is None or _under(target, GROUP):
            target = "/"  # never into another partition: the root is the safe place
        try:
            (root / target.lstrip("/") / "cgroup.procs").write_text(f"{pid}\n")
        except OSError:
            return False
        return True

    def remove(self, partition_id: str) -> bool:
        """Delete an ended partition's cgroup once it is empty (the kernel refuses before)."""
        if not self.available or self.base is None:
            return False
        try:
            (self.base / partition_id).rmdir()
        except FileNotFoundError:
            return True
        except OSError:
            return False
        return True

    def leftovers(self) -> list[str]:
        """Partition ids that still have a cgroup (for cleanup after they end)."""
        if not self.available or self.base is None:
            return []
        with contextlib.suppress(OSError):
            return [p.name for p in self.base.iterdir() if p.is_dir()]
        return []


@functools.cache
def _base() -> Path | None:
    root = find_cgroup2_root()
    return None if root is None else root / GROUP


def members(partition_id: str) -> set[int]:
    """Processes in the partition's cgroup (empty where there is none); any user may read."""
    base = _base()
    if base is None:
        return set()
    try:
        text = (base / partition_id / "cgroup.procs").read_text()
    except OSError:
        return set()
    return {int(line) for line in text.split()}


def _v2_path(pid: int) -> str | None:
    """The raw cgroup v2 entry (after ``0::``) of /proc/<pid>/cgroup; None if unreadable."""
    try:
        with open(f"{procs.PROC}/{pid}/cgroup") as f:
            lines = f.read().splitlines()
    except OSError:
        return None
    for line in lines:
        if line.startswith("0::"):
            return line[3:]
    return None


def cgroup_of(pid: int) -> str | None:
    """``pid``'s cgroup v2 path (``/user.slice/…``), from /proc/<pid>/cgroup."""
    path = _v2_path(pid)
    return None if path is None else path.strip() or "/"


def _under(path: str, group: str) -> bool:
    return path.strip("/").split("/", 1)[0] == group


def partition_of(pid: int) -> str | None:
    """The partition id whose cgroup ``pid`` is in, from /proc/<pid>/cgroup."""
    path = _v2_path(pid)
    if path is None:
        return None
    parts = path.strip("/").split("/")
    if len(parts) >= 2 and parts[-2] == GROUP:
        return parts[-1]
    return None
