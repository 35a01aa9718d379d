"""Parsing and formatting of memory sizes, durations and times given by users.

Every parser here reads text that any local user can send to the root daemon, so each
one is a hand-written scanner that refuses input longer than ``MAX_INPUT_CHARS`` or not
ASCII *before* looking at it, and then reads it once, left to right: no regular
expression (a backtracking one froze chronosd for seconds on a 1 KB string) and no
``float()`` on raw input (it takes ``"١٠"`` and ``"1_0"``). Sizes follow Slurm's
``--mem`` and Docker's ``-m``: ``40G`` is 40 GiB; only ``GB``/``MB``/``TB`` spelled so
are powers of ten. Durations follow Slurm's ``--time`` forms besides ``1h30m``.
"""

from __future__ import annotations

import math
import signal
from datetime import UTC, datetime, timedelta

from chronos.errors import BadRequest
from chronos.lean import format_bytes as format_bytes  # re-exported: one implementation

#: Longest partition anyone may ask for (policy may lower it): 30 days.
MAX_DURATION_S = 30 * 24 * 3600.0
#: Longest text any parser here looks at; every valid input is far shorter.
MAX_INPUT_CHARS = 64
#: Shortest duration a partition (or warning, or extension) may have.
MIN_DURATION_S = 1.0

_DIGITS = frozenset("0123456789")
_KIB, _MIB, _GIB, _TIB = 1024, 1024**2, 1024**3, 1024**4
_SIZE_UNITS = {
    "b": 1,
    **dict.fromkeys(("k", "ki", "kib"), _KIB),
    **dict.fromkeys(("m", "mi", "mib"), _MIB),
    **dict.fromkeys(("g", "gi", "gib"), _GIB),
    **dict.fromkeys(("t", "ti", "tib"), _TIB),
    "kb": 1000,
    "mb": 1000**2,
    "gb": 1000**3,
    "tb": 1000**4,
}
_DURATION_UNITS = {
    "w": 7 * 86400.0,
    "d": 86400.0,
    "h": 3600.0,
    "m": 60.0,
    "s": 1.0,
    "ms": 0.001,
}
_MEMORY_FORMS = (
    "use a fraction (0.5), a percent (50%) or a size (40G = 40GiB, 512M = 512MiB, 40GB = 40e9 B)"
)
_DURATION_FORMS = (
    "use seconds (3600), units (90s, 45m, 2h, 1h30m, 1d, 1w) "
    "or Slurm's MM:SS, HH:MM:SS, D-HH, D-HH:MM, D-HH:MM:SS"
)

_START_FORMS = "use +2h, 09:00, 'tomorrow 09:00' or 2026-12-01T09:00"
_DATE_FORMS = "use YYYY-MM-DD"

# ------------------------------------------------------------------ scanning


def _shown(text: str) -> str:
    """The input as quoted in an error: never more than a short prefix of it."""
    return repr(text) if len(text) <= MAX_INPUT_CHARS else repr(text[:20] + "...")


def _bounded_text(text: str, what: str, forms: str) -> str:
    """``text`` stripped, once it is known to be short ASCII (checked before anything else)."""
    if len(text) > MAX_INPUT_CHARS:
        raise BadRequest(
            f"invalid {what} {_shown(text)}: longer than {MAX_INPUT_CHARS} characters; {forms}"
        )
    if not text.isascii():
        raise BadRequest(f"invalid {what} {_shown(text)}: not ASCII (digits are 0-9); {forms}")
    return text.strip()


def _scan_decimal(text: str, at: int) -> tuple[float, int] | None:
    """Read ``12``, ``1.5``, ``.5`` or ``5.`` of ASCII digits at ``at``: (value, end) or None."""
    end = at
    while end < len(text) and text[end] in _DIGITS:
        end += 1
    digits = end - at
    if end < len(text) and text[end] == ".":
        end += 1
        fraction_start = end
        while end < len(text) and text[end] in _DIGITS:
            end += 1
        digits += end - fraction_start
    if digits == 0:
        return None
    return float(text[at:end]), end  # only digits and one dot, at most 64 of them


def _scan_letters(text: str, at: int) -> int:
    end = at
    while end < len(text) and text[end].isalpha():
        end += 1
    return end


def _skip_spaces(text: str, at: int) -> int:
    while at < len(text) and text[at] == " ":
        at += 1
    return at


def _decimal_only(text: str) -> float | None:
    """The value of ``text`` if it is one plain decimal number, else None."""
    scanned = _scan_decimal(text, 0)
    if scanned is None or scanned[1] != len(text):
        return None
    return scanned[0]


def _number(value: int | float) -> float:
    """A JSON number as a float; an integer too large for one reads as infinity."""
    if isinstance(value, int) and not -(10**300) < value < 10**300:
        return math.inf
    return float(value)


def _shown_number(value: int | float) -> str:
    """A number as quoted in an error (``repr`` of a huge integer is slow, then refused)."""
    if isinstance(value, int) and math.isinf(_number(value)):
        return "(a number too large)"
    return repr(value)


# -------------------------------------------------------------------- memory


def parse_memory(text: str | float, total_bytes: int) -> int:
    """Turn ``0.5``, ``50%``, ``40G``, ``40GiB`` or ``512M`` into bytes of a ``total_bytes`` device.

    A bare number is a fraction of the device (0 < f <= 1); ``G``, ``Gi`` and ``GiB`` are
    powers of 1024 (as Slurm and Docker read ``40G``), ``GB`` a power of 1000.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise BadRequest(f"invalid memory: {_MEMORY_FORMS}")
    if not isinstance(text, str):
        return _fraction_to_bytes(_number(text), total_bytes, _shown_number(text))
    raw = _bounded_text(text, "memory", _MEMORY_FORMS)
    if raw.endswith("%"):
        percent = _decimal_only(raw[:-1].rstrip(" "))
        if percent is None:
            raise BadRequest(f"invalid memory {raw!r}: {_MEMORY_FORMS}")
        return _fraction_to_bytes(percent / 100.0, total_bytes, repr(raw))
    fraction = _decimal_only(raw)
    if fraction is not None:
        return _fraction_to_bytes(fraction, total_bytes, repr(raw))
    return _size_to_bytes(raw, total_bytes)


def _size_to_bytes(raw: str, total_bytes: int) -> int:
    scanned = _scan_decimal(raw, 0)
    if scanned is None:
        raise BadRequest(f"invalid memory {raw!r}: {_MEMORY_FORMS}")
    value, at = scanned
    at = _skip_spaces(raw, at)
    end = _scan_letters(raw, at)
    unit = _SIZE_UNITS.get(raw[at:end].lower())
    if unit is None or end != len(raw):
        raise BadRequest(f"invalid memory {raw!r}: {_MEMORY_FORMS}")
    nbytes = int(value * unit)
    if nbytes <= 0:
        raise BadRequest(f"memory must be more than zero, got {raw!r}")
    if nbytes > total_bytes:
        raise BadRequest(f"memory {raw} is more than the device has ({format_bytes(total_bytes)})")
    return nbytes


def _fraction_to_bytes(fraction: float, total_bytes: int, shown: str) -> int:
    if not math.isfinite(fraction):
        raise BadRequest(f"invalid memory {shown}: not a finite number")
    if not 0.0 < fraction <= 1.0:
        raise BadRequest(f"memory fraction must be in (0, 1], got {shown}")
    nbytes = int(fraction * total_bytes)
    if nbytes <= 0:
        raise BadRequest(f"memory {shown} is less than one byte of this device")
    return nbytes


# ------------------------------------------------------------------ duration


def parse_duration(
    text: str | float, maximum: float = MAX_DURATION_S, minimum: float = MIN_DURATION_S
) -> float:
    """Turn ``3600``, ``90s``, ``2h``, ``1h30m``, ``1d``, ``1w`` or ``1-12:00:00`` into seconds.

    A bare number is seconds. Slurm's ``MM:SS``, ``HH:MM:SS``, ``D-HH``, ``D-HH:MM`` and
    ``D-HH:MM:SS`` are read as Slurm reads them. Durations under ``minimum`` (one second
    unless a policy setting such as ``sample_interval`` asks for less) are refused.
    """
    if isinstance(text, bool) or not isinstance(text, (str, int, float)):
        raise BadRequest(f"invalid duration: {_DURATION_FORMS}")
    if isinstance(text, str):
        raw = _bounded_text(text, "duration", _DURATION_FORMS).lower()
        seconds = _duration_seconds(raw)
        shown = repr(raw)
    else:
        seconds, shown = _number(text), _shown_number(text)
    if not math.isfinite(seconds):
        raise BadRequest(f"invalid duration {shown}: not a finite number")
    if seconds <= 0:
        raise BadRequest(f"duration must be more than zero, got {shown}")
    if seconds < minimum:
        raise BadRequest(
            f"duration {shown} is shorter than the minimum of {_format_minimum(minimum)}"
        )
    if seconds > maximum:
        raise BadRequest(
            f"duration {shown} is longer than the maximum of {format_duration(maximum)}"
        )
    return seconds


def _format_minimum(seconds: float) -> str:
    return format_duration(seconds) if seconds >= 1 else f"{seconds * 1000:g}ms"


def _duration_seconds(raw: str) -> float:
    plain = _decimal_only(raw)
    if plain is not None:
        return plain
    if ":" in raw or "-" in raw:
        clock = _slurm_seconds(raw)
        if clock is None:
            raise BadRequest(f"invalid duration {raw!r}: {_DURATION_FORMS}")
        return clock
    return _unit_seconds(raw)


def _unit_seconds(raw: str) -> float:
    """``1h30m``, ``1h 30m``, ``1.5h``, ``2d``, ``1w``: one pass over number-unit pairs."""
    total, at, seen = 0.0, 0, 0
    while at < len(raw):
        scanned = _scan_decimal(raw, at)
        if scanned is None:
            raise BadRequest(f"invalid duration {raw!r}: {_DURATION_FORMS}")
        value, at = scanned
        at = _skip_spaces(raw, at)
        end = _scan_letters(raw, at)
        unit = _DURATION_UNITS.get(raw[at:end])
        if unit is None:
            raise BadRequest(f"invalid duration {raw!r}: {_DURATION_FORMS}")
        total += value * unit
        seen += 1
        at = _skip_spaces(raw, end)
    if seen == 0:
        raise BadRequest(f"invalid duration {raw!r}: {_DURATION_FORMS}")
    return total


def _slurm_seconds(raw: str) -> float | None:
    """Slurm's ``--time`` forms other than bare minutes; None if ``raw`` is none of them."""
    days_text, dash, clock = raw.rpartition("-") if "-" in raw else ("", "", raw)
    fields = clock.split(":")
    if not all(f and len(f) <= 10 and set(f) <= _DIGITS for f in fields):
        return None
    values = [int(f) for f in fields]
    if dash:
        if not (days_text and len(days_text) <= 10 and set(days_text) <= _DIGITS):
            return None
        if len(values) > 3 or values[0] > 23 or any(v > 59 for v in values[1:]):
            return None
        hours, minutes, secs = (values + [0, 0])[:3]
        return int(days_text) * 86400.0 + hours * 3600.0 + minutes * 60.0 + secs
    if len(values) == 2 and values[1] <= 59:  # MM:SS
        return values[0] * 60.0 + values[1]
    if len(values) == 3 and values[1] <= 59 and values[2] <= 59:  # HH:MM:SS
        return values[0] * 3600.0 + values[1] * 60.0 + values[2]
    return None


# ------------------------------------------------------------------- signals

_UNCATCHABLE_SIGNALS = frozenset({"SIGKILL", "SIGSTOP"})
"""A warning must let the program react; these two cannot be caught."""


def parse_signal_name(name: object) -> str:
    """``USR1``, ``sigusr1`` or ``SIGUSR1`` -> ``SIGUSR1``: members of ``signal.Signals`` only.

    Checking ``hasattr(signal, name)`` let through ``SIG_IGN`` and ``SIG_DFL`` (handler
    constants, delivered as signals 1 and 0) and any other name in the module.
    """
    if not isinstance(name, str) or not 0 < len(name) <= 16 or not name.isascii():
        raise BadRequest("the warning signal must be a signal name such as SIGUSR1")
    text = name.strip().upper()
    text = text if text.startswith("SIG") else "SIG" + text
    if text not in signal.Signals.__members__ or text in _UNCATCHABLE_SIGNALS:
        raise BadRequest(
            f"unknown or unusable warning signal {name!r}: use a signal name such as "
            "SIGUSR1, SIGUSR2, SIGTERM or SIGINT (not SIGKILL or SIGSTOP)"
        )
    return text


# ---------------------------------------------------------------- formatting


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


# ---------------------------------------------------------------------- times


def _clock(text: str) -> tuple[int, int, int] | None:
    """``9:00``, ``09:00`` or ``09:00:30`` as (hour, minute, second); None if not a clock time."""
    fields = text.split(":")
    if not 2 <= len(fields) <= 3 or not all(set(f) <= _DIGITS for f in fields):
        return None
    if not 1 <= len(fields[0]) <= 2 or not all(len(f) == 2 for f in fields[1:]):
        return None
    hour, minute, second = (int(f) for f in fields + ["0"] * (3 - len(fields)))
    return hour, minute, second


def parse_start(text: str, now: float) -> float:
    """When a booking starts: ``+2h``, ``09:00`` (next one), ``tomorrow 09:00``, or ISO.

    Times without a zone are local time.
    """
    original = _bounded_text(text, "start", _START_FORMS)
    raw = original.lower()
    base = datetime.fromtimestamp(now).astimezone()
    if raw.startswith("+"):
        try:
            return now + parse_duration(raw[1:])
        except BadRequest as exc:
            raise BadRequest(f"start {original!r}: {exc}") from None
    if raw == "now":
        return now
    day_offset = None
    for word, offset in (("today", 0), ("tomorrow", 1)):
        if raw.startswith(word):
            day_offset, raw = offset, raw[len(word) :].strip()
    clock = _clock(raw)
    if clock is not None:
        hour, minute, second = clock
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
        when = datetime.fromisoformat(original)
    except ValueError:
        raise BadRequest(f"invalid start {text!r}: {_START_FORMS}") from None
    if when.tzinfo is None:
        when = when.astimezone()
    return when.timestamp()


def parse_date(text: str) -> datetime:
    """``2026-12-24`` (local) for ``--until``; the whole day is included."""
    raw = _bounded_text(text, "date", _DATE_FORMS)
    try:
        day = datetime.fromisoformat(raw)
    except ValueError:
        raise BadRequest(f"invalid date {text!r}: {_DATE_FORMS}") from None
    return day.replace(hour=23, minute=59, second=59).astimezone()
