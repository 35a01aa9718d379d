"""Machine policy: the settings an administrator controls.

Read from a TOML file (``$CHRONOS_CONFIG``, default ``/etc/chronos/config.toml``);
a missing file means the defaults below. Unknown keys are errors, so a typo
never silently leaves a limit unset.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

import tomllib

from chronos.errors import BadRequest
from chronos.units import MAX_DURATION_S, parse_duration

DEFAULT_CONFIG = Path("/etc/chronos/config.toml")


@dataclass(frozen=True)
class Config:
    admin_group: str = "chronos-admin"
    """Members of this Unix group (and root) are administrators."""
    grace_s: float = 30.0
    """SIGTERM → SIGKILL delay at expiry, unless a partition sets its own."""
    max_duration_s: float = MAX_DURATION_S
    reservable_share: float = 1.0
    """Share of each device that partitions may reserve (the rest stays ad hoc)."""
    device_reservable_share: dict[int, float] = field(default_factory=dict)
    sample_interval_s: float = 0.1
    """How often the daemon samples per-process GPU memory."""
    memory_grace_s: float = 0.3
    """How long a partition may stay over its memory before its processes are stopped."""
    unpartitioned: str = "warn"
    """What to do about GPU memory held outside any partition: off, warn or enforce."""
    exempt_users: tuple[str, ...] = ()
    exempt_commands: tuple[str, ...] = ()

    def reservable(self, device: int) -> float:
        return self.device_reservable_share.get(device, self.reservable_share)


def config_path() -> Path:
    return Path(os.environ.get("CHRONOS_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path | None = None) -> Config:
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        return Config()
    except OSError as exc:
        raise BadRequest(f"cannot read config {path}: {exc.strerror}") from None
    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadRequest(f"config {path}: {exc}") from None
    return parse_config(data, str(path))


def parse_config(data: dict[str, Any], origin: str = "config") -> Config:
    config = Config()
    known = {f.name for f in fields(Config)}
    aliases = {
        "grace": "grace_s",
        "max_duration": "max_duration_s",
        "sample_interval": "sample_interval_s",
        "memory_grace": "memory_grace_s",
    }
    devices = data.pop("devices", {}) if isinstance(data.get("devices"), dict) else {}
    changes: dict[str, Any] = {}
    for key, value in data.items():
        name = aliases.get(key, key)
        if name not in known or name == "device_reservable_share":
            raise BadRequest(f"{origin}: unknown setting {key!r}")
        changes[name] = _coerce(name, value, origin)
    shares = {}
    for index, table in devices.items():
        if not str(index).isdigit() or not isinstance(table, dict):
            raise BadRequest(f"{origin}: [devices.{index}] must be a table keyed by GPU index")
        share = table.get("reservable_share", config.reservable_share)
        shares[int(index)] = _coerce("reservable_share", share, origin)
    return replace(config, **changes, device_reservable_share=shares)


def _coerce(name: str, value: Any, origin: str) -> Any:
    if name.endswith("_s"):
        return parse_duration(value)
    if name == "reservable_share":
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not 0 < value <= 1:
            raise BadRequest(f"{origin}: reservable_share must be in (0, 1]")
        return float(value)
    if name == "unpartitioned":
        if value not in ("off", "warn", "enforce"):
            raise BadRequest(f"{origin}: unpartitioned must be off, warn or enforce")
        return value
    if name in ("exempt_users", "exempt_commands"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"{origin}: {name} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise BadRequest(f"{origin}: {name} must be a string")
    return value
