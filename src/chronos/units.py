"""Parsing and formatting of memory sizes, durations and times given by users."""

from __future__ import annotations

import math
import re
from datetime import UTC, datetime, timedelta

from chronos.errors import BadRequest

#: Longest partition anyone may ask for (policy may lower it): 30 days.
MAX_DURATION_S = 30 * 24 * 3600.0

_UNITS = {
    "b": 1,
    "k": 1000,
    "kb": 1000,
    "m": 1000**2,
    "mb": 1000**2,
    "g": 1000**3,
    "gb": 1000**3,
    "t": 1000**4,
    "tb": 1000**4,
    "kib": 1024,
    "mib": 1024**2,
    "gib": 1024**3,
    "tib": 1024**4,
}
_SIZE_RE = re.compile(r"^\s*([0-9]*\.?[0-9]+)\s*([a-zA-Z]+)\s*$")
_DURATION_PART_RE = re.compile(r"([0-9]*\.?[0-9]+)\s*(ms|d|h|m|s)")
_DURATION_UNITS = {"d": 86400.0, "h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_memory(text: str | float, total_bytes: int) -> int:
    """Turn ``0.5``, ``50%``, ``40GiB`` or ``512MiB`` into bytes of a device of ``total_bytes``.

    A bare number is a fraction of the device (0 < f <= 1).
    """
    raw = str(text).strip()
    if isinstance(text, bool):
        raise BadRequest(f"invalid memory {text!r}")
    try:
        if raw.endswith("%"):
            value = _finite(float(raw[:-1]), raw)
            fraction = value / 100.0
            return _fraction_to_bytes(fraction, total_bytes, raw)
        if isinstance(text, (int, float)) or _is_number(raw):
            return _fraction_to_bytes(_finite(float(raw), raw), total_bytes, raw)
    except ValueError:
        raise BadRequest(
            f"invalid memory {raw!r}: use a fraction (0.5), a percent (50%) "
            "or a size (40GiB, 512MiB)"
        ) from None
    match = _SIZE_RE.match(raw)
    if not match or match.group(2).lower() not in _UNITS:
        raise BadRequest(
            f"invalid memory {raw!r}: use a fraction (0.5), a percent (50%) "
            "or a size (40GiB, 512MiB)"
        )
    size = float(match.group(1)) * _UNITS[match.group(2).lower()]
    nbytes = int(size)
    if nbytes <= 0:
        raise BadRequest(f"memory must be more than zero, got {raw!r}")
    if nbytes > total_bytes:
        raise BadRequest(f"memory {raw} is more than the device has ({format_bytes(total_bytes)})")
    return nbytes


def _is_number(raw: str) -> bool:
    try:
        float(raw)
    except ValueError:
        return False
    return True


def _finite(value: float, raw: str) -> float:
    if not math.isfinite(value):
        raise BadRequest(f"invalid memory {raw!r}: not a finite number")
    return value


def _fraction_to_bytes(fraction: float, total_bytes: int, raw: str) -> int:
    if not 0.0 < fraction <= 1.0:
        raise BadRequest(f"memory fraction must be in (0, 1], got {raw!r}")
    nbytes = int(fraction * total_bytes)
    if nbytes <= 0:
        raise BadRequest(f"memory {raw!r} is less than one byte of this device")
    return nbytes


def parse_duration(text: str | float, maximum: float = MAX_DURATION_S) -> float:
    """Turn ``3600``, ``90s``, ``45m``, ``2h`` or ``1h30m`` into seconds."""
    if isinstance(text, bool):
        raise BadRequest(f"invalid duration {text!r}")
    raw = str(text).strip().lower()
    seconds: float
    seconds = float(raw) if _is_number(raw) else _parse_duration_parts(raw)
    if not math.isfinite(seconds):
        raise BadRequest(f"invalid duration {raw!r}: not a finite number")
    if seconds <= 0:
        raise BadRequest(f"duration must be more than zero, got {raw!r}")
    if seconds > maximum:
        raise BadRequest(f"duration {raw} is longer than the maximum of {format_duration(maximum)}")
    return seconds


def _parse_duration_parts(raw: str) -> float:
    compact = raw.replace(" ", "")
    parts = _DURATION_PART_RE.findall(compact)
    if not parts or "".join(n + u for n, u in parts) != compact:
        raise BadRequest(f"invalid duration {raw!r}: use seconds (3600) or 90s, 45m, 2h, 1h30m")
    return sum(float(n) * _DURATION_UNITS[u] for n, u in parts)


def format_bytes(nbytes: float) -> str:
    """``85899345920`` -> ``80.0 GiB``."""
    value = float(nbytes)
    for unit in ("B", "KiB", "MiB", "GiB", "TiB"):
        if abs(value) < 1024 or unit == "TiB":
            return f"{value:.0f} {unit}" if unit == "B" else f"{value:.1f} {unit}"
        value /= 1024
    raise AssertionError("unreachable")


def format_duration(seconds: float) -> str:
    """``5400`` -> ``1h30m``; ``42.3`` -> ``42s``."""
    total = max(0, int(round(seconds)))
    days, rest = divmod(total, 86400)
    hours, rest = divmod(rest, 3600)
    minutes, secs = divmod(rest, 60)
    out = ""
    if days:
        out += f"{days}d"
    if hours:
        out += f"{hours}h"
    if minutes:
        out += f"{minutes}m"
    if secs or not out:
        out += f"{secs}s"
    return out


def iso(ts: float | None) -> str | None:
    """Epoch seconds -> ISO-8601 in local time with its offset."""
    if ts is None:
        return None
    return datetime.fromtimestamp(ts, tz=UTC).astimezone().isoformat(timespec="milliseconds")


def local_clock(ts: float) -> str:
    """Epoch seconds -> ``2026-11-28 14:05:00`` in local time, for tables."""
    return datetime.fromtimestamp(ts).strftime("%Y-%m-%d %H:%M:%S")


_CLOCK_RE = re.compile(r"^(\d{1,2}):(\d{2})(?::(\d{2}))?$")


def parse_start(text: str, now: float) -> float:
    """When a booking starts: ``+2h``, ``09:00`` (next one), ``tomorrow 09:00``, or ISO.

    Times without a zone are local time.
    """
    raw = text.strip().lower()
    base = datetime.fromtimestamp(now).astimezone()
    if raw.startswith("+"):
        return now + parse_duration(raw[1:])
    if raw == "now":
        return now
    day_offset = None
    for word, offset in (("today", 0), ("tomorrow", 1)):
        if raw.startswith(word):
            day_offset, raw = offset, raw[len(word) :].strip()
    match = _CLOCK_RE.match(raw)
    if match:
        hour, minute, second = (int(g or 0) for g in match.groups())
        if hour > 23 or minute > 59 or second > 59:
            raise BadRequest(f"invalid time {text!r}")
        at = base.replace(hour=hour, minute=minute, second=second, microsecond=0)
        if day_offset is not None:
            at += timedelta(days=day_offset)
        elif at.timestamp() <= now:
            at += timedelta(days=1)  # 09:00 after nine means tomorrow's
        return at.timestamp()
    if day_offset is not None:
        raise BadRequest(f"invalid start {text!r}: use e.g. 'tomorrow 09:00'")
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadRequest(
            f"invalid start {text!r}: use +2h, 09:00, 'tomorrow 09:00' or 2026-12-01T09:00"
        ) from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def parse_date(text: str) -> datetime:
    """``2026-12-24`` (local) for ``--until``; the whole day is included."""
    try:
        day = datetime.fromisoformat(text.strip())
    except ValueError:
        raise BadRequest(f"invalid date {text!r}: use YYYY-MM-DD") from None
    return day.replace(hour=23, minute=59, second=59).astimezone()
