"""The one stop plan (chronos.stopping) and the one /proc reader (chronos.procs)."""

from __future__ import annotations

import errno
import os
import signal
from pathlib import Path
from unittest import mock

import pytest

from chronos import cgroups, procs
from chronos.devices import drm
from chronos.stopping import Escalation, Stage


def test_sigterm_then_sigkill_after_the_grace_then_nothing_more() -> None:
    plan = Escalation(grace_s=5.0)
    assert plan.begin(100.0) == Stage.TERMINATED
    assert plan.signal == signal.SIGTERM and plan.due_at == 105.0
    assert plan.advance(104.9) is None  # not yet
    assert plan.advance(105.0) == Stage.KILLED
    assert plan.signal == signal.SIGKILL
    assert plan.due_at is None  # no far-future stand-in: nothing more is planned
    assert plan.advance(1e12) is None
    plan.finish()
    assert plan.stage == Stage.DONE and plan.signal is None


def test_a_warning_first_then_sigterm_and_a_plan_that_ends_at_sigterm() -> None:
    plan = Escalation(grace_s=2.0, warn_first=True, last=Stage.TERMINATED)
    assert plan.begin(10.0) == Stage.WARNED
    assert plan.signal is None and not plan.signalled and plan.due_at == 12.0
    assert plan.advance(12.5) == Stage.TERMINATED
    assert plan.signalled and plan.due_at is None  # the API sends no SIGKILL
    assert plan.advance(100.0) is None


def test_stages_are_the_stored_strings() -> None:
    assert [str(s) for s in Stage] == ["running", "warned", "terminated", "killed", "done"]
    assert Stage.TERMINATED == "terminated"


def fake_stat(root: Path, pid: int, comm: str, state: str, ppid: int, start: int) -> None:
    d = root / str(pid)
    d.mkdir()
    rest = " ".join([state, str(ppid), *["0"] * 17, str(start), "0", "0"])
    (d / "stat").write_text(f"{pid} ({comm}) {rest}\n")
    (d / "cgroup").write_text("0::/chronos/p42\n")
    (d / "meminfo").write_text("")


def test_one_parser_reads_a_fixture_root_even_with_parentheses_in_the_name(
    tmp_path: Path,
) -> None:
    fake_stat(tmp_path, 7, "evil) S 1 (x", "S", 3, 12345)
    fake_stat(tmp_path, 8, "zombie", "Z", 7, 999)
    (tmp_path / "meminfo").write_text("MemTotal:       1024 kB\n")
    with mock.patch.object(procs, "PROC", str(tmp_path)):
        assert procs.read_stat(7) == procs.ProcStat("S", 3, 12345)
        assert procs.start_ticks(7) == 12345 and procs.parent_pid(7) == 3
        assert procs.is_same_process(7, 12345) and not procs.is_same_process(7, 12346)
        assert not procs.is_same_process(8, 999)  # a zombie is no longer the process
        assert procs.children_map() == {3: [7], 7: [8]}
        assert procs.descendants([7]) == {7, 8}
        assert cgroups.partition_of(7) == "p42"  # the same root for cgroups
        assert drm.system_memory_bytes() == 1024 * 1024  # and for the DRM readers
        assert procs.read_stat(9) is None  # gone


def test_running_out_of_descriptors_never_reads_as_a_death() -> None:
    def emfile(*args: object, **kwargs: object) -> None:
        raise OSError(errno.EMFILE, "Too many open files")

    me, ticks = os.getpid(), procs.start_ticks(os.getpid())
    with mock.patch("builtins.open", emfile):
        with pytest.raises(OSError):  # the daemon's guarded callers retry; None would skip
            procs.is_same_process(me, ticks)
        with pytest.raises(OSError):
            procs.start_ticks(me)
        assert procs.parent_pid(me) is None  # ancestry only stops, as for a gone parent
    assert procs.is_same_process(me, ticks)
