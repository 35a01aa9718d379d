"""A stand-in for the ``pynvml`` module (nvidia-ml-py), for tests without a GPU.

It keeps pynvml's names: functions (``nvmlDeviceGetMemoryInfo(handle,
version=None)``, ``nvmlDeviceGetComputeRunningProcesses_v3`` …), constants
(``NVML_ERROR_*``, ``nvmlMemory_v2``, ``NVML_DEVICE_MIG_ENABLE``), error
classes generated per code like pynvml's (``NVMLError_NotSupported`` …),
``NVMLLibraryMismatchError``, and struct attribute names (``total``/``free``/
``used``/``reserved``, ``gpu``/``memory``, ``busId``, ``pid``/``usedGpuMemory``/
``gpuInstanceId``/``computeInstanceId``).

``generation`` picks which pynvml and driver are modelled:

* ``modern``: nvidia-ml-py 12+ on a recent driver: ``_v3`` process functions,
  memory info v2, ``str`` results.
* ``no_v3_driver``: the same pynvml on a driver without the ``_v3`` symbols
  (R470 era): ``_v3`` raises ``NVMLError_FunctionNotFound``; the unversioned
  wrapper raises ``NVMLLibraryMismatchError``, as pynvml's does.
* ``v1_memory_driver``: modern pynvml, driver without ``nvmlDeviceGetMemoryInfo_v2``.
* ``old_pynvml``: pynvml 11.0 era: no ``_v2``/``_v3`` functions, no
  ``nvmlMemory_v2``, no version parameter, ``bytes`` strings, v1 process
  structs whose ``usedGpuMemory`` is the raw not-available value.
"""

from __future__ import annotations

import ctypes
import string
import types
from dataclasses import dataclass, field
from typing import Any

ERRORS = {
    "UNINITIALIZED": 1,
    "INVALID_ARGUMENT": 2,
    "NOT_SUPPORTED": 3,
    "NO_PERMISSION": 4,
    "ALREADY_INITIALIZED": 5,
    "NOT_FOUND": 6,
    "INSUFFICIENT_SIZE": 7,
    "DRIVER_NOT_LOADED": 9,
    "TIMEOUT": 10,
    "LIBRARY_NOT_FOUND": 12,
    "FUNCTION_NOT_FOUND": 13,
    "GPU_IS_LOST": 15,
    "ARGUMENT_VERSION_MISMATCH": 25,
    "UNKNOWN": 999,
}
STRINGS = {
    3: "Not Supported",
    4: "Insufficient Permissions",
    6: "Not Found",
    9: "Driver Not Loaded",
    12: "NVML Shared Library Not Found",
    13: "Function Not Found",
    15: "GPU is lost",
}
NOT_AVAILABLE_U64 = ctypes.c_ulonglong(-1).value
GIB = 1 << 30


@dataclass
class FakeProcess:
    pid: int
    used: int | None
    gpu_instance_id: int = 0xFFFFFFFF
    compute_instance_id: int = 0xFFFFFFFF


@dataclass
class FakeGpu:
    uuid: str
    name: str = "NVIDIA H200"
    total: int = 150 * GIB
    used: int = 2 * GIB
    reserved: int = GIB // 2
    bus_id: str = "00000000:3B:00.0"
    utilization: int | None = 35
    compute_mode: int = 0
    mig_mode: int | None = 0
    """None: the GPU has no MIG (NotSupported)."""
    mig: list[FakeGpu] = field(default_factory=list)
    mig_unreadable: bool = False
    gpu_instance_id: int | None = None
    compute_instance_id: int | None = None
    compute: list[FakeProcess] = field(default_factory=list)
    graphics: list[FakeProcess] = field(default_factory=list)
    lost: bool = False
    """Every query raises NVMLError_GpuIsLost."""
    processes_on_parent_only: bool = False


class Handle:
    def __init__(self, gpu: FakeGpu, parent: FakeGpu | None = None) -> None:
        self.gpu = gpu
        self.parent = parent


def make_pynvml(
    gpus: list[FakeGpu],
    generation: str = "modern",
    init_error: str | None = None,
    driver: str = "580.95.05",
    cuda: int = 13000,
) -> Any:
    """A module object that behaves like pynvml over ``gpus``."""
    lib = types.ModuleType("pynvml")
    state = {"init": 0, "shutdown": 0, "calls": []}
    lib.state = state  # type: ignore[attr-defined]
    _add_errors(lib)
    _add_constants(lib, generation)
    old = generation == "old_pynvml"

    def err(name: str) -> Exception:
        error: Exception = lib.NVMLError(ERRORS[name])
        return error

    def text(value: str) -> str | bytes:
        return value.encode() if old else value

    def log(name: str) -> None:
        state["calls"].append(name)  # type: ignore[attr-defined]

    def check(handle: Handle) -> FakeGpu:
        if handle.gpu.lost:
            raise err("GPU_IS_LOST")
        return handle.gpu

    def nvmlInit() -> None:
        if init_error:
            raise err(init_error)
        state["init"] += 1  # type: ignore[operator]

    def nvmlShutdown() -> None:
        state["shutdown"] += 1  # type: ignore[operator]

    def nvmlDeviceGetCount() -> int:
        return len(gpus)

    def nvmlDeviceGetHandleByIndex(index: int) -> Handle:
        if index >= len(gpus):
            raise err("INVALID_ARGUMENT")
        if gpus[index].lost:
            raise err("GPU_IS_LOST")
        return Handle(gpus[index])

    def nvmlDeviceGetUUID(handle: Handle) -> str | bytes:
        return text(check(handle).uuid)

    def nvmlDeviceGetName(handle: Handle) -> str | bytes:
        return text(check(handle).name)

    def nvmlDeviceGetPciInfo(handle: Handle) -> Any:
        gpu = check(handle)
        bus = gpu.bus_id.encode()
        return types.SimpleNamespace(busIdLegacy=bus, busId=bus, domain=0, bus=0x3B, device=0)

    def memory(handle: Handle, version: int | None = None) -> Any:
        gpu = check(handle)
        if version:
            log("nvmlDeviceGetMemoryInfo_v2")
            if generation == "v1_memory_driver":
                raise err("FUNCTION_NOT_FOUND")
            free = gpu.total - gpu.reserved - gpu.used
            return types.SimpleNamespace(
                version=version, total=gpu.total, reserved=gpu.reserved, free=free, used=gpu.used
            )
        log("nvmlDeviceGetMemoryInfo")
        used = gpu.used + gpu.reserved  # v1 counts the reserved memory as used
        return types.SimpleNamespace(total=gpu.total, free=gpu.total - used, used=used)

    if old:

        def nvmlDeviceGetMemoryInfo(handle: Handle) -> Any:
            return memory(handle)
    else:

        def nvmlDeviceGetMemoryInfo(handle: Handle, version: int | None = None) -> Any:
            return memory(handle, version)

    def nvmlDeviceGetUtilizationRates(handle: Handle) -> Any:
        gpu = check(handle)
        if gpu.utilization is None or handle.parent is not None:
            raise err("NOT_SUPPORTED")
        return types.SimpleNamespace(gpu=gpu.utilization, memory=gpu.utilization // 2)

    def nvmlDeviceGetComputeMode(handle: Handle) -> int:
        return check(handle).compute_mode

    def nvmlDeviceGetMigMode(handle: Handle) -> list[int]:
        gpu = check(handle)
        if gpu.mig_mode is None:
            raise err("NOT_SUPPORTED")
        return [gpu.mig_mode, gpu.mig_mode]

    def nvmlDeviceGetMaxMigDeviceCount(handle: Handle) -> int:
        gpu = check(handle)
        if gpu.mig_mode is None:
            raise err("NOT_SUPPORTED")
        return 7

    def nvmlDeviceGetMigDeviceHandleByIndex(handle: Handle, index: int) -> Handle:
        gpu = check(handle)
        if gpu.mig_unreadable:
            raise err("NO_PERMISSION")
        if index >= len(gpu.mig):
            raise err("NOT_FOUND")
        return Handle(gpu.mig[index], gpu)

    def nvmlDeviceGetGpuInstanceId(handle: Handle) -> int:
        if handle.gpu.gpu_instance_id is None:
            raise err("INVALID_ARGUMENT")
        return handle.gpu.gpu_instance_id

    def nvmlDeviceGetComputeInstanceId(handle: Handle) -> int:
        if handle.gpu.compute_instance_id is None:
            raise err("INVALID_ARGUMENT")
        return handle.gpu.compute_instance_id

    def processes(handle: Handle, kind: str, version: str) -> list[Any]:
        log(f"{kind}:{version}")
        gpu = check(handle)
        if handle.parent is not None and handle.parent.processes_on_parent_only:
            raise err("NOT_SUPPORTED")
        entries = []
        for inst in [gpu, *gpu.mig]:
            for p in getattr(inst, kind):
                entries.append(_process_struct(p, inst, version))
        return entries

    def versioned(kind: str, version: str) -> Any:
        def function(handle: Handle) -> list[Any]:
            if version == "v3" and generation == "no_v3_driver":
                raise err("FUNCTION_NOT_FOUND")
            return processes(handle, kind, version)

        return function

    def unversioned(kind: str) -> Any:
        def function(handle: Handle) -> list[Any]:
            if old:
                return processes(handle, kind, "v1")
            try:
                return versioned(kind, "v3")(handle)
            except lib.NVMLError_FunctionNotFound:
                raise lib.NVMLLibraryMismatchError("Unversioned function called") from None

        return function

    def nvmlSystemGetDriverVersion() -> str | bytes:
        return text(driver)

    def nvmlSystemGetCudaDriverVersion() -> int:
        return cuda

    functions = dict(locals())
    for name, value in functions.items():
        if name.startswith("nvml"):
            setattr(lib, name, value)
    for kind, label in (("compute", "Compute"), ("graphics", "Graphics")):
        setattr(lib, f"nvmlDeviceGet{label}RunningProcesses", unversioned(kind))
        if not old:
            setattr(lib, f"nvmlDeviceGet{label}RunningProcesses_v2", versioned(kind, "v2"))
            setattr(lib, f"nvmlDeviceGet{label}RunningProcesses_v3", versioned(kind, "v3"))
    if not old:
        lib.nvmlSystemGetCudaDriverVersion_v2 = nvmlSystemGetCudaDriverVersion  # type: ignore[attr-defined]
    return lib


def _process_struct(p: FakeProcess, inst: FakeGpu, version: str) -> Any:
    used = p.used
    if version == "v1":
        # pynvml 11 returned the raw struct value; later versions map it to None.
        used = NOT_AVAILABLE_U64 if used is None else used
        return types.SimpleNamespace(pid=p.pid, usedGpuMemory=used)
    gi = inst.gpu_instance_id if inst.gpu_instance_id is not None else p.gpu_instance_id
    ci = inst.compute_instance_id if inst.compute_instance_id is not None else p.compute_instance_id
    return types.SimpleNamespace(
        pid=p.pid, usedGpuMemory=used, gpuInstanceId=gi, computeInstanceId=ci
    )


def _add_errors(lib: Any) -> None:
    class NVMLError(Exception):
        _by_value: dict[int, type] = {}
        value: int

        def __new__(cls, value: int) -> NVMLError:
            if cls is NVMLError:
                cls = NVMLError._by_value.get(value, cls)
            obj = Exception.__new__(cls)
            obj.value = value
            return obj

        def __init__(self, value: int) -> None:
            super().__init__(value)

        def __str__(self) -> str:
            return STRINGS.get(self.value, f"NVML Error with code {self.value}")

    lib.NVMLError = NVMLError
    for name, value in ERRORS.items():
        setattr(lib, f"NVML_ERROR_{name}", value)
        class_name = "NVMLError_" + string.capwords(name, "_").replace("_", "")

        def new(cls: type, *args: Any, _value: int = value) -> Any:
            return NVMLError.__new__(cls, _value)

        def init(self: Any, *args: Any, _value: int = value) -> None:
            Exception.__init__(self, _value)

        cls = type(class_name, (NVMLError,), {"__new__": new, "__init__": init})
        setattr(lib, class_name, cls)
        NVMLError._by_value[value] = cls

    class NVMLLibraryMismatchError(Exception):
        pass

    lib.NVMLLibraryMismatchError = NVMLLibraryMismatchError


def _add_constants(lib: Any, generation: str) -> None:
    lib.NVML_SUCCESS = 0
    lib.NVML_DEVICE_MIG_DISABLE = 0
    lib.NVML_DEVICE_MIG_ENABLE = 1
    lib.NVML_COMPUTEMODE_DEFAULT = 0
    lib.NVML_COMPUTEMODE_EXCLUSIVE_PROCESS = 3
    lib.NVML_VALUE_NOT_AVAILABLE_ulonglong = ctypes.c_ulonglong(-1)
    if generation != "old_pynvml":
        lib.nvmlMemory_v2 = 0x02000028


def mig_gpu(uuid: str = "GPU-mig-parent-0000") -> FakeGpu:
    """An H100-like GPU in MIG mode with two instances (3g.40gb and 2g.20gb)."""
    return FakeGpu(
        uuid=uuid,
        name="NVIDIA H100 80GB HBM3",
        total=80 * GIB,
        bus_id="00000000:9A:00.0",
        mig_mode=1,
        utilization=None,
        mig=[
            FakeGpu(
                uuid="MIG-11111111-2222-3333-4444-555555555555",
                name="NVIDIA H100 80GB HBM3 MIG 3g.40gb",
                total=40 * GIB - 512 * 1024**2,
                used=GIB,
                reserved=0,
                gpu_instance_id=2,
                compute_instance_id=0,
                compute=[FakeProcess(7001, 5 * GIB)],
            ),
            FakeGpu(
                uuid="MIG-66666666-7777-8888-9999-000000000000",
                name="NVIDIA H100 80GB HBM3 MIG 2g.20gb",
                total=20 * GIB - 256 * 1024**2,
                used=GIB // 2,
                reserved=0,
                gpu_instance_id=3,
                compute_instance_id=0,
                compute=[FakeProcess(7002, 3 * GIB)],
            ),
        ],
    )
