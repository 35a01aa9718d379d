"""A simulated GPU machine, for tests and for trying Chronos without a GPU.

Devices come from ``CHRONOS_SIMULATED_GPUS`` (comma list of sizes, default
two 80 GiB GPUs). ``CHRONOS_SIMULATED_TOPOLOGY`` says which are linked: islands of
GPUs separated by ``;`` (``0,1,2,3;4,5,6,7``): two GPUs of one island are linked at
level 0, of two islands at 50 (unset: the topology is not available).

Processes are declared in a JSON file that any process can write
(``declare_process``), so that the daemon, the CLI and the tests share one view of
"PID X holds N bytes on device D". Entries of dead processes are ignored.
"""

from __future__ import annotations

import fcntl
import json
import os
from pathlib import Path

from chronos import procs
from chronos.devices.base import Backend, Device, DeviceUsage, ProcessMemory
from chronos.errors import BadRequest, DeviceError
from chronos.units import parse_memory

DEFAULT_GPUS = "80GiB,80GiB"


def simulated_sizes() -> list[int]:
    spec = os.environ.get("CHRONOS_SIMULATED_GPUS", DEFAULT_GPUS)
    sizes = []
    for part in spec.split(","):
        part = part.strip()
        if not part:
            continue
        try:
            sizes.append(parse_memory(part, 1 << 60))
        except BadRequest:
            raise DeviceError(f"CHRONOS_SIMULATED_GPUS: invalid size {part!r}") from None
    if not sizes:
        raise DeviceError("CHRONOS_SIMULATED_GPUS lists no GPU")
    return sizes


def simulated_topology() -> list[set[int]] | None:
    """The islands of ``CHRONOS_SIMULATED_TOPOLOGY``, or ``None`` when it is unset."""
    spec = os.environ.get("CHRONOS_SIMULATED_TOPOLOGY", "").strip()
    if not spec:
        return None
    try:
        return [{int(i) for i in island.split(",") if i.strip()} for island in spec.split(";")]
    except ValueError:
        raise DeviceError(f"CHRONOS_SIMULATED_TOPOLOGY: invalid {spec!r}") from None


def simulated_uuid(index: int) -> str:
    return f"SIM-{index:08x}-0000-4000-8000-chronos{index:05d}"


def processes_file() -> Path:
    explicit = os.environ.get("CHRONOS_SIMULATED_PROCESSES")
    if explicit:
        return Path(explicit)
    from chronos.paths import state_dir

    return state_dir() / "simulated-processes.json"


def _read(path: Path) -> list[dict[str, int]]:
    try:
        data = json.loads(path.read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return []
    return [e for e in data if isinstance(e, dict)]


def declare_process(pid: int, device: int, used_bytes: int) -> None:
    """Declare that ``pid`` holds ``used_bytes`` on simulated device ``device``.

    ``used_bytes`` of 0 removes the declaration. Safe across processes.
    """
    path = processes_file()
    path.parent.mkdir(parents=True, exist_ok=True)
    with open(path.with_suffix(".lock"), "a") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        entries = [e for e in _read(path) if not (e["pid"] == pid and e["device"] == device)]
        if used_bytes > 0:
            entries.append({"pid": pid, "device": device, "used_bytes": used_bytes})
        tmp = path.with_suffix(f".{os.getpid()}.tmp")
        tmp.write_text(json.dumps(entries))
        os.chmod(tmp, 0o666)
        os.replace(tmp, path)


class SimulatedBackend(Backend):
    name = "simulated"

    def __init__(self) -> None:
        self._sizes = simulated_sizes()

    def devices(self) -> list[Device]:
        return [
            Device(
                index=i,
                uuid=simulated_uuid(i),
                name=f"Simulated GPU {i}",
                vendor="simulated",
                total_bytes=size,
                backend=self.name,
                visible_env={"CUDA_VISIBLE_DEVICES": str(i)},
            )
            for i, size in enumerate(self._sizes)
        ]

    def link_level(self, a: Device, b: Device) -> int | None:
        islands = simulated_topology()
        if islands is None:
            return None
        same = any(a.index in island and b.index in island for island in islands)
        return 0 if same else 50

    def processes(self) -> list[ProcessMemory]:
        out = []
        for entry in _read(processes_file()):
            device = entry.get("device", -1)
            if not 0 <= device < len(self._sizes) or not procs.pid_exists(entry["pid"]):
                continue
            out.append(
                ProcessMemory(
                    pid=entry["pid"],
                    device_uuid=simulated_uuid(device),
                    used_bytes=int(entry["used_bytes"]),
                )
            )
        return out

    def usage(self) -> list[DeviceUsage]:
        used = {simulated_uuid(i): 0 for i in range(len(self._sizes))}
        for proc in self.processes():
            used[proc.device_uuid] += proc.used_bytes or 0
        return [
            DeviceUsage(
                uuid=uuid,
                used_bytes=min(nbytes, size),
                free_bytes=max(0, size - nbytes),
                utilization_pct=0.0,
            )
            for (uuid, nbytes), size in zip(used.items(), self._sizes)
        ]
