"""Chronos: time-based, enforced GPU memory partitions for shared GPU machines.

>>> from chronos import Partitioner
>>> with Partitioner().create(device=0, memory=0.5, duration=3600) as p:
...     print(p.time_remaining)

The names below load on first use (PEP 562), so that ``chronos list`` and the
other commands, which import ``chronos.cli`` through this package, do not pay
for the API, the transport and the models before they need them.

They are the public surface, with the members of ``Partitioner`` and ``Partition``
that docs/API.md lists; every submodule is internal and may change in any release
(docs/ARCHITECTURE.md, "Public surface").
"""

from __future__ import annotations

TYPE_CHECKING = False  # not typing's: importing typing alone costs the CLI milliseconds
if TYPE_CHECKING:
    from typing import Any

    from chronos.api import Partition, Partitioner
    from chronos.errors import (
        AdmissionRefused,
        BadRequest,
        CapacityRefused,
        ChronosError,
        DaemonUnavailable,
        DeviceError,
        NotFound,
        PartitionEnded,
        PermissionDenied,
        ProtocolError,
        Timeout,
    )
    from chronos.models import DeviceStats

__version__ = "0.1.0"

#: Where each public name lives; the README's "Use it from Python" names the same set.
_SOURCES = {
    "Partitioner": "chronos.api",
    "Partition": "chronos.api",
    "DeviceStats": "chronos.models",
    "ChronosError": "chronos.errors",
    "BadRequest": "chronos.errors",
    "AdmissionRefused": "chronos.errors",
    "CapacityRefused": "chronos.errors",
    "NotFound": "chronos.errors",
    "PermissionDenied": "chronos.errors",
    "PartitionEnded": "chronos.errors",
    "DaemonUnavailable": "chronos.errors",
    "ProtocolError": "chronos.errors",
    "DeviceError": "chronos.errors",
    "Timeout": "chronos.errors",
}

__all__ = [
    "AdmissionRefused",
    "BadRequest",
    "CapacityRefused",
    "ChronosError",
    "DaemonUnavailable",
    "DeviceError",
    "DeviceStats",
    "NotFound",
    "Partition",
    "PartitionEnded",
    "Partitioner",
    "PermissionDenied",
    "ProtocolError",
    "Timeout",
    "__version__",
]


def __getattr__(name: str) -> Any:
    source = _SOURCES.get(name)
    if source is None:
        raise AttributeError(f"module 'chronos' has no attribute {name!r}")
    value = getattr(__import__(source, fromlist=[name]), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
