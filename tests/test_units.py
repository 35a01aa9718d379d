"""Parsing and formatting of user-given memory sizes, durations and times."""

from __future__ import annotations

import math
from datetime import datetime

import pytest
from helpers import GIB, MIB
from hypothesis import given
from hypothesis import strategies as st

from chronos.errors import BadRequest, ChronosError
from chronos.units import (
    MAX_DURATION_S,
    format_bytes,
    format_duration,
    iso,
    local_clock,
    parse_duration,
    parse_memory,
)

TOTAL = 80 * GIB


# ------------------------------------------------------------------ memory


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (0.5, TOTAL // 2),
        ("0.5", TOTAL // 2),
        (1, TOTAL),
        ("1", TOTAL),
        ("50%", TOTAL // 2),
        ("100%", TOTAL),
        ("12.5%", TOTAL // 8),
        ("40GiB", 40 * GIB),
        ("40 GiB", 40 * GIB),
        ("40gib", 40 * GIB),
        ("512MiB", 512 * MIB),
        ("80GiB", TOTAL),
        ("1GB", 10**9),
        # As Slurm's --mem=40G and Docker's -m 40g: G, g, Gi and GiB are all GiB.
        ("40G", 40 * GIB),
        ("40g", 40 * GIB),
        ("40Gi", 40 * GIB),
        ("40 G", 40 * GIB),
        ("512M", 512 * MIB),
        ("512m", 512 * MIB),
        ("4096K", 4 * MIB),
        ("1.5G", 3 * GIB // 2),
        # Powers of ten only where spelled so.
        ("40GB", 40 * 10**9),
        ("40gb", 40 * 10**9),
        ("512MB", 512 * 10**6),
        (".5", TOTAL // 2),
        ("  0.5  ", TOTAL // 2),
    ],
)
def test_parse_memory_accepts(text: object, expected: int) -> None:
    assert parse_memory(text, TOTAL) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "1.5",
        1.5,
        "nan",
        float("nan"),
        "inf",
        float("inf"),
        "-inf",
        "-1",
        -1,
        "0",
        0,
        0.0,
        "0%",
        "150%",
        "-50%",
        "abc",
        "",
        "   ",
        "200GiB",
        "80.5GiB",
        "0GiB",
        "-5GiB",
        "40XB",
        "GiB",
        "nan%",
        True,
        False,
        None,
        [0.5],
        "1_0%",
        "0_5",
        "\u0661\u0660%",  # Arabic-Indic "10%": float() takes it
        "\uff10.5",  # fullwidth zero
        "5e-1",
        "0x10GiB",
        "+0.5",
        "1.2.3",
        "40 G B",
        "40GiBs",
        "1T",  # more than the device
        10**400,
        "1" * 65,
    ],
)
def test_parse_memory_rejects(text: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_memory(text, TOTAL)  # type: ignore[arg-type]
    message = str(info.value)
    assert message and "\n" not in message
    assert isinstance(info.value, ChronosError)


def test_parse_memory_too_big_names_device_size() -> None:
    with pytest.raises(BadRequest, match=r"80\.0 GiB"):
        parse_memory("200GiB", TOTAL)


@given(st.floats(min_value=1e-6, max_value=1.0))
def test_parse_memory_fraction_is_floor_of_share(fraction: float) -> None:
    nbytes = parse_memory(fraction, TOTAL)
    assert 0 < nbytes <= TOTAL
    assert nbytes == int(fraction * TOTAL)


@given(st.floats(allow_nan=True, allow_infinity=True))
def test_parse_memory_never_exceeds_device_or_crashes(value: float) -> None:
    try:
        nbytes = parse_memory(value, TOTAL)
    except BadRequest:
        return
    assert 0 < nbytes <= TOTAL
    assert math.isfinite(value) and 0 < value <= 1


@given(st.text(max_size=12))
def test_parse_memory_any_text_is_bytes_or_bad_request(text: str) -> None:
    try:
        nbytes = parse_memory(text, TOTAL)
    except BadRequest:
        return
    assert isinstance(nbytes, int)
    assert 0 < nbytes <= TOTAL


# ---------------------------------------------------------------- duration


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        (3600, 3600.0),
        ("3600", 3600.0),
        (1, 1.0),
        (1.5, 1.5),
        ("90s", 90.0),
        ("45m", 2700.0),
        ("2h", 7200.0),
        ("1h30m", 5400.0),
        ("1h 30m", 5400.0),
        ("1H30M", 5400.0),
        ("1d", 86400.0),
        ("1d2h3m4s", 86400 + 7200 + 180 + 4.0),
        ("1.5s", 1.5),
        ("1.5h", 5400.0),
        ("30d", MAX_DURATION_S),
        ("1w", 7 * 86400.0),
        ("2w2d", 16 * 86400.0),
        ("1500ms", 1.5),
        ("  2h  ", 7200.0),
        # Slurm's --time forms (a bare number stays seconds, unlike Slurm's minutes).
        ("05:30", 330.0),
        ("90:00", 5400.0),
        ("01:30:00", 5400.0),
        ("36:00:00", 36 * 3600.0),
        ("1-12", 86400 + 12 * 3600.0),
        ("1-12:30", 86400 + 12 * 3600 + 1800.0),
        ("2-00:00:30", 2 * 86400 + 30.0),
    ],
)
def test_parse_duration_accepts(text: object, expected: float) -> None:
    assert parse_duration(text) == pytest.approx(expected)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "text",
    [
        "0",
        0,
        "0s",
        "-5",
        -5,
        "-5m",
        "abc",
        "",
        "1h30",
        "h",
        "5x",
        "nan",
        "inf",
        float("inf"),
        float("nan"),
        "1e400",
        "31d",
        "99999999999",
        MAX_DURATION_S + 1,
        True,
        None,
        10**400,
        # Under one second.
        0.25,
        "0.5",
        "500ms",
        "0:00",
        # Not ASCII digits, or not a form.
        "1_0",
        "1_000s",
        "\u0661\u0660",  # Arabic-Indic "10": float() takes it
        "\u0661\u0660m",
        "1e3",
        "1-25",  # D-HH: hours must be under 24
        "1-",
        "-1-00",
        "1-12:60",
        "10:60",
        "1:2:3:4",
        "1:00:00:00",
        "31-00:00:00",
        "5 x",
        "1hh",
        "1" * 65,
        "1" * 1000 + "x",
    ],
)
def test_parse_duration_rejects(text: object) -> None:
    with pytest.raises(BadRequest) as info:
        parse_duration(text)  # type: ignore[arg-type]
    message = str(info.value)
    assert "\n" not in message and len(message) < 200


def test_a_bad_duration_names_the_accepted_forms() -> None:
    with pytest.raises(BadRequest) as info:
        parse_duration("5x")
    assert "1h30m" in str(info.value) and "D-HH:MM:SS" in str(info.value)


def test_a_bad_memory_names_the_accepted_forms_and_what_g_means() -> None:
    with pytest.raises(BadRequest) as info:
        parse_memory("40XB", TOTAL)
    assert "50%" in str(info.value) and "40G = 40GiB" in str(info.value)


def test_a_sub_second_duration_names_the_minimum() -> None:
    with pytest.raises(BadRequest, match="minimum of 1s"):
        parse_duration("500ms")
    assert parse_duration("100ms", minimum=0.001) == pytest.approx(0.1)


def test_parse_duration_respects_a_lower_maximum() -> None:
    assert parse_duration("1h", maximum=3600) == 3600
    with pytest.raises(BadRequest, match="maximum"):
        parse_duration("61m", maximum=3600)


@given(st.text(max_size=12))
def test_parse_duration_any_text_is_positive_or_bad_request(text: str) -> None:
    try:
        seconds = parse_duration(text)
    except BadRequest:
        return
    assert math.isfinite(seconds)
    assert 1 <= seconds <= MAX_DURATION_S


# -------------------------------------------------------------- formatting


@given(st.integers(min_value=1, max_value=int(MAX_DURATION_S)))
def test_format_duration_round_trips(seconds: int) -> None:
    text = format_duration(seconds)
    assert parse_duration(text) == seconds


@pytest.mark.parametrize(
    ("seconds", "text"), [(5400, "1h30m"), (42.3, "42s"), (0, "0s"), (86400 + 61, "1d1m1s")]
)
def test_format_duration_examples(seconds: float, text: str) -> None:
    assert format_duration(seconds) == text


@given(st.integers(min_value=1, max_value=4 * 1024**4))
def test_format_bytes_round_trips_within_display_precision(nbytes: int) -> None:
    text = format_bytes(nbytes)
    back = parse_memory(text, 1 << 60)
    # One decimal of the unit shown: the error is at most 0.05 unit, i.e. < 5 %.
    assert abs(back - nbytes) <= 0.05 * nbytes + 1


@pytest.mark.parametrize(
    ("nbytes", "text"),
    [(80 * GIB, "80.0 GiB"), (512 * MIB, "512.0 MiB"), (1023, "1023 B"), (1536, "1.5 KiB")],
)
def test_format_bytes_examples(nbytes: int, text: str) -> None:
    assert format_bytes(nbytes) == text
    assert parse_memory(text, 1 << 60) == nbytes


@given(st.floats(min_value=0, max_value=4e9))
def test_iso_is_timezone_aware_and_round_trips(ts: float) -> None:
    text = iso(ts)
    assert text is not None
    parsed = datetime.fromisoformat(text)
    assert parsed.tzinfo is not None
    assert abs(parsed.timestamp() - ts) <= 0.0011


def test_iso_none_and_local_clock() -> None:
    assert iso(None) is None
    ts = 1_800_000_000.0
    assert datetime.strptime(local_clock(ts), "%Y-%m-%d %H:%M:%S") == datetime.fromtimestamp(
        ts
    ).replace(microsecond=0)


def test_a_bad_relative_start_is_named_as_the_start() -> None:
    from chronos.units import parse_start

    with pytest.raises(BadRequest, match=r"^start '\+0s': duration must be more than zero"):
        parse_start("+0s", 1_800_000_000.0)
