"""``chronos stats --watch``: redraws until interrupted, in place on a terminal."""

from __future__ import annotations

import os
import pty
import signal
import subprocess
import sys
import time


def test_watch_redraws_until_interrupted(chronos_env: dict[str, str]) -> None:
    watch = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "stats", "--watch", "--interval", "0.2"],
        env=chronos_env,
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )
    time.sleep(2.0)
    watch.send_signal(signal.SIGINT)
    out, err = watch.communicate(timeout=20)
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
