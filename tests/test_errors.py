"""The error tree: each class's exit code is the one docs/CLI.md documents, each wire code
comes back as its own class, and a subclass states both in its class line."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from chronos import errors

CLI_MD = Path(__file__).resolve().parent.parent / "docs" / "CLI.md"
WIRE = [
    errors.BadRequest,
    errors.AdmissionRefused,
    errors.NotFound,
    errors.PermissionDenied,
    errors.PartitionEnded,
    errors.DaemonUnavailable,
    errors.ProtocolError,
    errors.DeviceError,
    errors.Timeout,
]


def documented_exit_codes() -> set[int]:
    table = CLI_MD.read_text().split("## Exit codes", 1)[1].split("\n\n", 2)[1]
    return {int(m) for m in re.findall(r"^\| (\d+) \|", table, re.MULTILINE)}


def test_every_exit_code_of_the_tree_is_documented_and_none_is_shared() -> None:
    codes = [cls.exit_code for cls in WIRE]
    assert codes == list(range(2, 11)), codes  # 2 bad input .. 10 timed out, as documented
    assert set(codes) | {0, 1} <= documented_exit_codes()


@pytest.mark.parametrize("cls", WIRE, ids=lambda c: c.__name__)
def test_a_wire_code_comes_back_as_its_own_class(cls: type[errors.ChronosError]) -> None:
    rebuilt = errors.error_from_code(cls.code, "said the daemon")
    assert type(rebuilt) is cls and str(rebuilt) == "said the daemon"
    assert rebuilt.exit_code == cls.exit_code


def test_an_unknown_code_is_a_plain_chronos_error() -> None:
    rebuilt = errors.error_from_code("from-a-newer-daemon", "x")
    assert type(rebuilt) is errors.ChronosError and rebuilt.exit_code == 1


def test_a_subclass_states_its_codes_in_its_class_line() -> None:
    class Sample(errors.BadRequest, code="sample", exit_code=42):
        pass

    class Inherits(Sample):
        pass

    assert (Sample.code, Sample.exit_code) == ("sample", 42)
    assert (Inherits.code, Inherits.exit_code) == ("sample", 42)
    assert errors.BadRequest.code == "bad_request"  # the parent is untouched
    assert errors.CapacityRefused.exit_code == errors.AdmissionRefused.exit_code == 3
