"""Machine policy: the settings an administrator controls.

Read from a TOML file (``$CHRONOS_CONFIG``, default ``/etc/chronos/config.toml``);
a missing file means the defaults below, which suit a shared machine (a week at most,
a few minutes of grace, a few waiting requests and bookings per user); one line,
``profile = "workstation"``, raises them for a single user's machine. Unknown keys are
errors, so a typo never silently leaves a limit unset. ``docs/POLICY.md`` lists the
defaults (a test keeps it exact) and shows an example.
"""

from __future__ import annotations

import json
import os
from dataclasses import dataclass, field, fields, replace
from pathlib import Path
from typing import Any

from chronos.errors import BadRequest
from chronos.slurm.settings import SlurmSettings, parse_slurm
from chronos.units import MAX_DURATION_S, format_duration, parse_duration, parse_signal_name

DEFAULT_CONFIG = Path("/etc/chronos/config.toml")
DEFAULT_MAX_DURATION_S = 7 * 86400.0
DEFAULT_MAX_GRACE_S = 300.0
DEFAULT_HISTORY_RETENTION_S = 90 * 86400.0
MIN_HISTORY_RETENTION_S = 2 * 86400.0
"""Never less: a restarted daemon re-sends scheduled SIGKILLs from recent events."""
MAX_HISTORY_RETENTION_S = 10 * 366 * 86400.0


@dataclass(frozen=True)
class Limits:
    """Per-user quotas; None means no limit."""

    max_share: float | None = None
    """Largest memory fraction of one partition."""
    max_total_share: float | None = None
    """Largest sum of fractions a user holds at once (over all GPUs)."""
    max_duration_s: float | None = None
    max_partitions: int | None = None
    """Most open partitions (active or booked) at once."""
    max_gpu_hours_day: float | None = None
    """GPU-hours (fraction × hours) in any rolling 24 h."""
    max_gpu_hours_week: float | None = None
    max_waiting: int | None = None
    """Most requests a user may have waiting in the fair queue at once."""
    max_bookings: int | None = None
    """Most bookings (partitions whose start is still to come) a user may hold at once."""

    def merged(self, override: Limits) -> Limits:
        changes = {
            f.name: getattr(override, f.name)
            for f in fields(Limits)
            if getattr(override, f.name) is not None
        }
        return replace(self, **changes)


DEFAULT_LIMITS = Limits(max_waiting=8, max_bookings=50)
"""Built-in limits for everyone: one user cannot flood the queue or the calendar."""


@dataclass(frozen=True)
class Config:
    profile: str = "shared"
    """Which built-in defaults the file starts from: ``shared`` or ``workstation`` (PROFILES)."""
    admin_group: str = "chronos-admin"
    """Members of this Unix group (and root) are administrators."""
    grace_s: float = 30.0
    """SIGTERM → SIGKILL delay at expiry, unless a partition sets its own."""
    warn_s: float | None = None
    """Default warning before the end (off unless set; see ``warn_signal``)."""
    warn_signal: str = "SIGUSR1"
    max_duration_s: float = DEFAULT_MAX_DURATION_S
    """Longest partition anyone may ask for (a shared machine's default: 7 days)."""
    max_grace_s: float = DEFAULT_MAX_GRACE_S
    """Longest SIGTERM → SIGKILL grace a partition may ask for (administrators too)."""
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
    fairshare_half_life_s: float = 7 * 86400.0
    """Past usage counts half as much after this long (Slurm's PriorityDecayHalfLife)."""
    fairshare_age_weight: float = 1.0
    """GPU-hours of priority a waiting request gains per hour waited (no starvation)."""
    default_limits: Limits = field(default_factory=lambda: DEFAULT_LIMITS)
    user_limits: dict[str, Limits] = field(default_factory=dict)
    metrics_address: str | None = None
    """``host:port`` for Prometheus metrics; off when unset."""
    dashboard_address: str | None = None
    """``host:port`` for the web dashboard served by the daemon; off when unset."""
    history_retention_s: float = DEFAULT_HISTORY_RETENTION_S
    """Ended partitions and their events older than this are deleted (usage keeps them)."""
    slurm: SlurmSettings = field(default_factory=SlurmSettings)
    """The ``[slurm]`` table: this node's GPUs under Slurm (docs/SLURM.md)."""

    def reservable(self, device: int) -> float:
        return self.device_reservable_share.get(device, self.reservable_share)

    def reservable_bytes(self, device: int, total_bytes: int) -> int:
        """What partitions may hold of a device of ``total_bytes`` (its capacity for admission)."""
        return int(total_bytes * self.reservable(device))

    def limits_for(self, user: str) -> Limits:
        override = self.user_limits.get(user)
        return self.default_limits if override is None else self.default_limits.merged(override)


PROFILES = {
    "shared": Config(),
    # One person's machine: only the hard maxima, no per-user queue or booking limits.
    "workstation": Config(
        profile="workstation",
        max_duration_s=MAX_DURATION_S,
        max_grace_s=MAX_DURATION_S,
        default_limits=Limits(),
    ),
}
"""Built-in defaults a policy file starts from (``profile = "workstation"``: one line)."""


def config_path() -> Path:
    return Path(os.environ.get("CHRONOS_CONFIG") or DEFAULT_CONFIG)


def load_config(path: Path | None = None, missing_ok: bool = True) -> Config:
    """The policy in ``path``; a missing file means the defaults unless ``missing_ok`` is off
    (a file named on the command line that is not there is a mistake, not "no policy")."""
    path = path or config_path()
    try:
        text = path.read_text()
    except FileNotFoundError:
        if not missing_ok:
            raise BadRequest(f"config {path}: no such file") from None
        return Config()
    except OSError as exc:
        raise BadRequest(f"cannot read config {path}: {exc.strerror}") from None
    import tomllib  # only with a policy file to read: a list without one needs none

    try:
        data = tomllib.loads(text)
    except tomllib.TOMLDecodeError as exc:
        raise BadRequest(f"config {path}: {exc}") from None
    return parse_config(data, str(path))


_ALIASES = {
    "grace": "grace_s",
    "warn": "warn_s",
    "max_duration": "max_duration_s",
    "max_grace": "max_grace_s",
    "sample_interval": "sample_interval_s",
    "memory_grace": "memory_grace_s",
    "history_retention": "history_retention_s",
}
_TABLES = {"devices", "limits", "fairshare", "slurm"}
_NOT_TOP_LEVEL = {
    "device_reservable_share",
    "default_limits",
    "user_limits",
    "fairshare_half_life_s",
    "fairshare_age_weight",
    "slurm",
}


def parse_config(data: dict[str, Any], origin: str = "config") -> Config:
    base = _profile(data.get("profile", "shared"), origin)
    known = {f.name for f in fields(Config)} - _NOT_TOP_LEVEL
    changes: dict[str, Any] = {}
    for key, value in data.items():
        if key in _TABLES or key == "profile":
            continue
        name = _ALIASES.get(key, key)
        if name not in known:
            raise BadRequest(f"{origin}: unknown setting {key!r}")
        changes[name] = _coerce(name, value, f"{origin}: {key}")
    changes.update(_fairshare(_table(data, "fairshare", origin), origin))
    changes["slurm"] = parse_slurm(_table(data, "slurm", origin), origin)
    changes["device_reservable_share"] = _devices(_table(data, "devices", origin), origin)
    limits = _table(data, "limits", origin)
    for key in limits:
        if key not in ("default", "users"):
            raise BadRequest(f"{origin}: unknown table [limits.{key}] (use default or users)")
    # A [limits.default] table raises or lowers the built-in limits; it never drops them.
    changes["default_limits"] = base.default_limits.merged(
        _limits(_table(limits, "default", origin), f"{origin} [limits.default]")
    )
    users = _table(limits, "users", origin)
    changes["user_limits"] = {
        name: _limits(_table(users, name, origin), f"{origin} [limits.users.{name}]")
        for name in users
    }
    config = replace(base, **changes)
    if config.grace_s > config.max_grace_s:
        raise BadRequest(
            f"{origin}: grace ({config.grace_s:g} s) is more than max_grace "
            f"({config.max_grace_s:g} s)"
        )
    return config


def _profile(name: Any, origin: str) -> Config:
    if name not in PROFILES:
        raise BadRequest(f"{origin}: profile must be {' or '.join(PROFILES)}, not {name!r}")
    return PROFILES[name]


def _table(data: dict[str, Any], key: str, origin: str) -> dict[str, Any]:
    value = data.get(key, {})
    if not isinstance(value, dict):
        raise BadRequest(f"{origin}: {key} must be a table")
    return value


def _fairshare(table: dict[str, Any], origin: str) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for key, value in table.items():
        if key == "half_life":
            out["fairshare_half_life_s"] = _duration(value, f"{origin}: fairshare.half_life")
        elif key == "age_weight":
            out["fairshare_age_weight"] = _number(value, f"{origin}: fairshare.age_weight", 0)
        else:
            raise BadRequest(f"{origin}: unknown setting fairshare.{key}")
    return out


def _devices(table: dict[str, Any], origin: str) -> dict[int, float]:
    shares = {}
    for index, settings in table.items():
        if not str(index).isdigit() or not isinstance(settings, dict):
            raise BadRequest(f"{origin}: [devices.{index}] must be a table keyed by GPU index")
        for key in settings:
            if key != "reservable_share":
                raise BadRequest(f"{origin}: unknown setting devices.{index}.{key}")
        if "reservable_share" in settings:
            shares[int(index)] = _share(
                settings["reservable_share"], f"{origin}: devices.{index}.reservable_share"
            )
    return shares


def _limits(table: dict[str, Any], origin: str) -> Limits:
    changes: dict[str, Any] = {}
    for key, value in table.items():
        where = f"{origin}: {key}"
        if key in ("max_share", "max_total_share"):
            changes[key] = _number(value, where, 0, None if key == "max_total_share" else 1.0)
        elif key == "max_duration":
            changes["max_duration_s"] = _duration(value, where)
        elif key in ("max_partitions", "max_waiting", "max_bookings"):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise BadRequest(f"{where} must be a whole number of at least 1")
            changes[key] = value
        elif key in ("max_gpu_hours_day", "max_gpu_hours_week"):
            changes[key] = _number(value, where, 0)
        else:
            raise BadRequest(f"{origin}: unknown limit {key!r}")
    return Limits(**changes)


def _number(value: Any, where: str, low: float, high: float | None = None) -> float:
    if (
        isinstance(value, bool)
        or not isinstance(value, (int, float))
        or value <= low
        or (high is not None and value > high)
    ):
        bound = f"in ({low:g}, {high:g}]" if high is not None else f"more than {low:g}"
        raise BadRequest(f"{where} must be a number {bound}")
    return float(value)


_SUBSECOND_SETTINGS = {"sample_interval_s", "memory_grace_s", "grace_s", "max_grace_s"}
"""Delays of the daemon's own actions, which may rightly be shorter than the one second
that a partition (or a warning) must last."""


def _duration(
    value: Any, where: str, minimum: float = 1.0, maximum: float = MAX_DURATION_S
) -> float:
    """A duration setting; a bad one is named in the error (the message alone says not which)."""
    try:
        return parse_duration(value, maximum, minimum=minimum)
    except BadRequest as exc:
        raise BadRequest(f"{where}: {exc}") from None


def _share(value: Any, where: str) -> float:
    return _number(value, where, 0, 1.0)


def _coerce(name: str, value: Any, where: str) -> Any:
    if name == "history_retention_s":  # years, not a partition's length; at least 2 days
        return _duration(value, where, MIN_HISTORY_RETENTION_S, MAX_HISTORY_RETENTION_S)
    if name.endswith("_s"):
        return _duration(value, where, 0.001 if name in _SUBSECOND_SETTINGS else 1.0)
    if name == "warn_signal":
        try:
            return parse_signal_name(value)
        except BadRequest as exc:
            raise BadRequest(f"{where}: {exc}") from None
    if name == "reservable_share":
        return _share(value, where)
    if name == "unpartitioned":
        if value not in ("off", "warn", "enforce"):
            raise BadRequest(f"{where} must be off, warn or enforce")
        return value
    if name in ("exempt_users", "exempt_commands"):
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise BadRequest(f"{where} must be a list of strings")
        return tuple(value)
    if not isinstance(value, str):
        raise BadRequest(f"{where} must be a string")
    return value


# ------------------------------------------------------ the effective policy, as TOML

_FILE_KEYS = {name: key for key, name in _ALIASES.items()}
_LIMIT_KEYS = {"max_duration_s": "max_duration"}
_BARE_KEY = frozenset("ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789_-")


def to_toml(config: Config) -> str:
    """The whole effective policy in the policy file's own syntax, defaults included.

    ``parse_config(tomllib.loads(to_toml(c))) == c``: what ``chronos config check``
    prints can be pasted back into the file. Unset settings are shown commented out.
    """
    lines = [
        _toml_line(_FILE_KEYS.get(f.name, f.name), getattr(config, f.name), f.name)
        for f in fields(Config)
        if f.name not in _NOT_TOP_LEVEL
    ]
    for index, share in sorted(config.device_reservable_share.items()):
        lines += ["", f"[devices.{index}]", _toml_line("reservable_share", share)]
    lines += [
        "",
        "[fairshare]",
        _toml_line("half_life", config.fairshare_half_life_s, "half_life_s"),
        _toml_line("age_weight", config.fairshare_age_weight),
        "",
        "[limits.default]  # everyone; unset = no limit",
        *_limit_lines(config.default_limits, show_unset=True),
    ]
    for user, limits in sorted(config.user_limits.items()):
        lines += ["", f"[limits.users.{_toml_key(user)}]", *_limit_lines(limits, False)]
    return "\n".join(lines) + "\n"


def _limit_lines(limits: Limits, show_unset: bool) -> list[str]:
    return [
        _toml_line(_LIMIT_KEYS.get(f.name, f.name), getattr(limits, f.name), f.name)
        for f in fields(Limits)
        if show_unset or getattr(limits, f.name) is not None
    ]


def _toml_line(key: str, value: Any, name: str = "") -> str:
    if value is None:
        return f"# {key} = (unset)"
    return f"{key} = {_toml_value(value, is_duration=name.endswith('_s'))}"


def _toml_value(value: Any, is_duration: bool) -> str:
    if is_duration:
        return json.dumps(_duration_text(float(value)))
    if isinstance(value, str):
        return json.dumps(value)  # a JSON string is a TOML basic string
    if isinstance(value, tuple):
        return "[" + ", ".join(json.dumps(v) for v in value) + "]"
    return repr(value)  # int, or a float that repr writes as TOML does (0.5, 8.0)


def _duration_text(seconds: float) -> str:
    """A duration the parser reads back exactly: ``7d``, ``1h30m``, ``300ms``, ``2.5s``."""
    if seconds == int(seconds):
        return format_duration(seconds)
    if seconds < 1 and seconds * 1000 == int(seconds * 1000):
        return f"{int(seconds * 1000)}ms"
    return f"{seconds!r}s"


def _toml_key(name: str) -> str:
    return name if name and set(name) <= _BARE_KEY else json.dumps(name)
