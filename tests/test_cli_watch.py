"""``chronos stats --watch``, the `--wait` progress line and the tables they are drawn with."""

from __future__ import annotations

import io
import os
import pty
import re
import signal
import subprocess
import sys
import time

import pytest
from helpers import readline_within


def test_watch_redraws_until_interrupted(chronos_env: dict[str, str]) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "stats", "--watch", "--interval", "0.2"],
        env=chronos_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    seen = ""  # three whole frames drawn (polled, not slept for), then Ctrl-C
    while seen.count("Simulated GPU 1") < 3:  # a frame's last row
        seen += readline_within(watch.stdout, 15)  # type: ignore[arg-type]
    watch.send_signal(signal.SIGINT)
    rest, err = watch.communicate(timeout=20)
    out = seen + rest
    assert watch.returncode == 0, err
    assert out.count("chronos stats — every 0.2s") >= 3
    assert out.count("Simulated GPU 0") >= 3
    assert "\x1b[2J" not in out  # not a terminal: plain frames, no screen control
    assert "Traceback" not in err


def test_watch_clears_the_screen_on_a_terminal(chronos_env: dict[str, str]) -> None:
    leader, follower = pty.openpty()
    watch = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "stats", "--watch", "--interval", "0.2"],
        env=chronos_env,
        stdin=follower,
        stdout=follower,
        stderr=follower,
    )
    os.close(follower)
    seen = b""
    deadline = time.monotonic() + 15
    while seen.count(b"\x1b[H\x1b[2J") < 2 and time.monotonic() < deadline:
        try:
            seen += os.read(leader, 65536)
        except OSError:
            break
    watch.send_signal(signal.SIGINT)
    watch.wait(timeout=20)
    os.close(leader)
    assert seen.count(b"\x1b[H\x1b[2J") >= 2  # redrawn in place, like watch(1)
    assert b"Simulated GPU 1" in seen
    assert watch.returncode == 0


# --------------------------------------------------- the --wait progress line


class FakeStderr(io.StringIO):
    def __init__(self, tty: bool) -> None:
        super().__init__()
        self.tty = tty

    def isatty(self) -> bool:
        return self.tty


def _status(position: int, est: float | None, blockers: list[str]) -> dict[str, object]:
    return {"position": position, "estimated_start": est, "waiting_for": blockers}


def test_wait_line_off_a_terminal_prints_only_changes(monkeypatch: pytest.MonkeyPatch) -> None:
    from chronos.cli import WaitDisplay

    err = FakeStderr(tty=False)
    monkeypatch.setattr(sys, "stderr", err)
    display = WaitDisplay(quiet=False)
    est = time.time() + 7200
    for _ in range(50):  # fifty polls of an unchanged queue: one line, not fifty
        display(_status(2, est, ["aaaa0001"]))
    display(_status(1, est, ["aaaa0001"]))  # moved up
    display(_status(1, est, ["aaaa0001"]))
    display(_status(1, est + 600, ["aaaa0001"]))  # the estimate moved
    display(_status(1, est + 600, ["aaaa0001", "bbbb0002"]))  # another blocker
    lines = err.getvalue().splitlines()
    assert len(lines) == 4, lines
    assert lines[0].startswith("waiting: position 2 in the queue, for aaaa0001")
    assert "\r" not in err.getvalue() and "\x1b" not in err.getvalue()


def test_wait_line_on_a_terminal_fits_its_width(monkeypatch: pytest.MonkeyPatch) -> None:
    from chronos.cli import WaitDisplay

    err = FakeStderr(tty=True)
    monkeypatch.setattr(sys, "stderr", err)
    monkeypatch.setenv("COLUMNS", "60")
    display = WaitDisplay(quiet=False)
    for n in range(3):
        display(_status(1, time.time() + 3600 + n, ["aaaa0001", "bbbb0002", "cccc0003"]))
    display.done()
    frames = err.getvalue().split("\r\x1b[K")
    assert frames[0] == "" and frames[-1] == ""  # redrawn in place, cleared at the end
    assert all(len(f) <= 59 for f in frames)  # never wraps: at most width - 1
    assert "\n" not in err.getvalue()


# ------------------------------------------------------------- table rendering


def test_spans_use_their_two_largest_units() -> None:
    from chronos.cli_render import span

    cases = {
        0: "0s",
        0.4: "0s",
        42: "42s",
        60: "1m",
        61: "1m1s",
        3599: "59m59s",
        3600: "1h",
        5400: "1h30m",
        5401: "1h30m",
        86400: "1d",
        90061: "1d1h",
        7 * 86400: "7d",
        -5: "0s",
    }
    assert {k: span(k) for k in cases} == cases


def test_tables_cut_free_text_and_keep_alignment() -> None:
    from chronos.cli_render import Column, table

    columns = [Column("ID"), Column("USER", squeeze=True), Column("MEMORY", right=True)]
    rows = [["a1", "a-very-long-user-name-indeed", "40.0 GiB"], ["b2", "bo", "512.0 MiB"]]
    text = table(columns, rows, width=30)
    lines = text.splitlines()
    assert all(len(line) <= 30 for line in lines)
    assert "…" in lines[1]  # the user name was cut, not the size
    assert lines[1].endswith(" 40.0 GiB") and lines[2].endswith("512.0 MiB")
    assert table(columns, rows, width=None).splitlines()[1].split()[1] == rows[0][1]
    assert table(columns, rows, header=False).splitlines()[0].startswith("a1")


def test_columns_read_as_written_across() -> None:
    from chronos.cli_render import Column, columns

    wide = Column("DETAIL", squeeze=True, min_width=10)
    made = columns("ID|~USER|>MEMORY|GPU-H USED", wide)
    assert [c.header for c in made] == ["ID", "USER", "MEMORY", "GPU-H USED", "DETAIL"]
    assert [(c.right, c.squeeze) for c in made] == [
        (False, False),
        (False, True),
        (True, False),
        (False, False),
        (False, True),
    ]
    assert made[-1] is wide


def test_colour_codes_do_not_shift_columns() -> None:
    from chronos.cli_render import Column, table

    columns = [Column("STATE"), Column("N", right=True)]
    rows = [["active", "1"], ["booked", "22"]]
    plain = table(columns, rows)
    painted = table(columns, rows, colours=[["green", None], ["cyan", None]])
    assert plain != painted
    assert re.sub(r"\x1b\[[0-9;]*m", "", painted) == plain
