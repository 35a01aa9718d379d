"""The policy file's built-in defaults, profiles and round trip through ``to_toml``.

The defaults a shared machine relies on (issue "Trust", item 18) must be exactly what
``docs/POLICY.md`` lists, so the document is parsed here and compared with ``Config()``.
"""

from __future__ import annotations

import tomllib
from pathlib import Path

import pytest

from chronos.config import (
    DEFAULT_LIMITS,
    PROFILES,
    Config,
    Limits,
    load_config,
    parse_config,
    to_toml,
)
from chronos.errors import BadRequest
from chronos.units import MAX_DURATION_S

DAY = 86400.0
POLICY_MD = Path(__file__).resolve().parents[1] / "docs" / "POLICY.md"


def toml_block_after(heading: str) -> str:
    """The first ```toml block after ``heading`` in docs/POLICY.md."""
    doc = POLICY_MD.read_text()
    assert heading in doc, f"docs/POLICY.md has no {heading!r}"
    section = doc.split(heading, 1)[1]
    return section.split("```toml\n", 1)[1].split("```", 1)[0]


def test_the_built_in_defaults_suit_a_shared_machine() -> None:
    config = Config()
    assert config.max_duration_s <= 7 * DAY
    assert 0 < config.max_grace_s <= 10 * 60
    assert config.default_limits == DEFAULT_LIMITS
    assert config.default_limits.max_waiting == 8 and config.default_limits.max_bookings == 50
    assert config.limits_for("anyone").max_waiting == 8


def test_policy_md_lists_exactly_the_built_in_defaults() -> None:
    block = toml_block_after("## Built-in defaults")
    assert parse_config(tomllib.loads(block), "POLICY.md") == Config()
    # Line for line what `chronos config check` prints (the doc may add "  # why" comments),
    # so a default that changes, appears or goes unlisted fails here.
    documented = block.rstrip("\n").splitlines()
    printed = to_toml(Config()).rstrip("\n").splitlines()
    assert len(documented) == len(printed), (documented, printed)
    for doc_line, line in zip(documented, printed):
        comment = doc_line[len(line) :]
        assert doc_line.startswith(line), (doc_line, line)
        assert comment == "" or comment.startswith("  ") and comment.lstrip().startswith("#")


def test_policy_md_shows_a_workstation_raising_the_defaults_in_one_line() -> None:
    block = toml_block_after("### A single-user workstation")
    assert len([line for line in block.splitlines() if line.strip()]) == 1
    config = parse_config(tomllib.loads(block), "POLICY.md")
    assert config == PROFILES["workstation"]
    assert config.max_duration_s == MAX_DURATION_S and config.max_grace_s == MAX_DURATION_S
    assert config.limits_for("me") == Limits()  # no queue or booking limit left


def test_a_profile_is_a_base_that_settings_still_change() -> None:
    config = parse_config({"profile": "workstation", "limits": {"default": {"max_waiting": 3}}})
    assert config.limits_for("me") == Limits(max_waiting=3)
    assert parse_config({"max_duration": "1d", "profile": "workstation"}).max_duration_s == DAY
    with pytest.raises(BadRequest, match="profile must be shared or workstation"):
        parse_config({"profile": "laptop"})


def test_limits_default_raises_the_built_in_limits_but_never_drops_them() -> None:
    config = parse_config({"limits": {"default": {"max_bookings": 500}}})
    assert config.limits_for("bob") == Limits(max_waiting=8, max_bookings=500)


@pytest.mark.parametrize(
    ("data", "field", "value"),
    [
        ({"max_grace": "10m"}, "max_grace_s", 600.0),
        ({"max_grace": "0:30"}, "max_grace_s", 30.0),
        ({"max_grace": "500ms", "grace": "0.2s"}, "max_grace_s", 0.5),
        ({"grace": "500ms"}, "grace_s", 0.5),
        ({"sample_interval": "100ms"}, "sample_interval_s", 0.1),
        ({"memory_grace": "0.3s"}, "memory_grace_s", 0.3),
        ({"max_duration": "1-00:00:00"}, "max_duration_s", DAY),
        ({"max_duration": "2w"}, "max_duration_s", 14 * DAY),
        ({"warn": "10m"}, "warn_s", 600.0),
        ({"warn_signal": "usr2"}, "warn_signal", "SIGUSR2"),
    ],
)
def test_policy_settings_parse(data: dict[str, object], field: str, value: object) -> None:
    assert getattr(parse_config(data), field) == value


def test_a_default_grace_over_max_grace_is_refused() -> None:
    with pytest.raises(BadRequest, match="max_grace"):
        parse_config({"max_grace": "500ms"})  # the default grace (30 s) is longer


@pytest.mark.parametrize(
    ("data", "named"),
    [
        ({"max_grace": "forever"}, "max_grace"),
        ({"max_grace": "31d"}, "max_grace"),
        ({"max_duration": "500ms"}, "max_duration"),  # a partition lasts a second at least
        ({"warn": "0.5s"}, "warn"),
        ({"warn_signal": "SIG_IGN"}, "warn_signal"),
        ({"warn_signal": "SIG_DFL"}, "warn_signal"),
        ({"warn_signal": "KILL"}, "warn_signal"),
        ({"grace": "1" * 1000 + "x"}, "grace"),
        ({"max_duration": "\u0661\u0660d"}, "max_duration"),
        ({"profile": 1}, "profile"),
    ],
)
def test_bad_policy_settings_are_refused_naming_the_key(
    data: dict[str, object], named: str
) -> None:
    with pytest.raises(BadRequest) as info:
        parse_config(data, "policy.toml")
    message = str(info.value)
    assert message.startswith("policy.toml") and named in message, message
    assert "\n" not in message and len(message) < 300


def test_the_effective_policy_pastes_back_to_the_same_policy() -> None:
    toml = toml_block_after("# The policy file")  # the documented example
    for config in (
        Config(),
        PROFILES["workstation"],
        parse_config(tomllib.loads(toml)),
        parse_config({"sample_interval": "0.25s", "grace": "2.5s", "max_duration": "1h30m"}),
        parse_config({"limits": {"users": {"first.last": {"max_share": 0.25}}}}),
    ):
        assert parse_config(tomllib.loads(to_toml(config))) == config


def test_a_missing_file_is_the_defaults_unless_it_was_named(tmp_path: Path) -> None:
    absent = tmp_path / "absent.toml"
    assert load_config(absent) == Config()
    with pytest.raises(BadRequest, match="no such file") as info:
        load_config(absent, missing_ok=False)
    assert str(absent) in str(info.value)
