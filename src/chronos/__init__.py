"""Chronos: time-based, enforced GPU memory partitions for shared GPU machines.

>>> from chronos import Partitioner
>>> with Partitioner().create(device=0, memory=0.5, duration=3600) as p:
...     print(p.time_remaining)
"""

from chronos.api import Partition, Partitioner
from chronos.errors import (
    AdmissionRefused,
    BadRequest,
    ChronosError,
    DaemonUnavailable,
    DeviceError,
    NotFound,
    PartitionEnded,
    PermissionDenied,
)
from chronos.models import DeviceStats

__version__ = "0.1.0"

__all__ = [
    "AdmissionRefused",
    "BadRequest",
    "ChronosError",
    "DaemonUnavailable",
    "DeviceError",
    "DeviceStats",
    "NotFound",
    "Partition",
    "PartitionEnded",
    "Partitioner",
    "PermissionDenied",
    "__version__",
]
