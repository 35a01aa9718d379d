"""The CLI as an attacker uses it: environment variables and ids are the caller's to set.

``chronos run --reuse`` runs a command in the partition named by
``CHRONOS_PARTITION_ID``; that variable is set by whoever starts the process, so it must
name a partition, never grant one. A user who sets it to another user's partition is
refused before anything runs (on the base commit there was no --reuse; a command run with
a forged marker was at best unaccounted).
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

from chronos_testing import DaemonProcess
from daemon.conftest import Users


def test_reuse_refuses_another_users_partition(shared_daemon: DaemonProcess, users: Users) -> None:
    made = users.alice.cli("create", "0", "0.1", "1h", "--json", env=shared_daemon.env)
    assert made.returncode == 0, made.stderr
    victim = json.loads(made.stdout)["id"]
    marker = Path(tempfile.mkdtemp(prefix="chronos-sec-")) / "ran"
    marker.parent.chmod(0o777)
    forged = {**shared_daemon.env, "CHRONOS_PARTITION_ID": victim}
    proc = users.bob.cli("run", "--reuse", "--", "touch", str(marker), env=forged)
    assert proc.returncode == 125, proc.stderr
    assert "belongs to" in proc.stderr and victim in proc.stderr
    assert "Traceback" not in proc.stderr
    assert not marker.exists()  # nothing ran, inside alice's partition or otherwise
    # alice herself may: it is her partition.
    own = users.alice.cli("run", "--reuse", "--", "touch", str(marker), env=forged)
    assert own.returncode == 0, own.stderr
    assert marker.exists()
    users.alice.cli("release", victim, env=shared_daemon.env)
