"""Attacks on batch jobs: running as someone else, touching another's job, planted links.

chronosd starts a job's command as the user whose connection submitted it
(``SO_PEERCRED``), so nothing in the request can name another user or root, and it
opens the output files only after dropping to that user, with ``O_NOFOLLOW``.
"""

from __future__ import annotations

import json
import os
import textwrap
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import DaemonProcess, TestUser, wait_for
from daemon.test_jobs import as_user, ended, home_of, job, submit

from .conftest import Users

pytestmark = pytest.mark.usefixtures("users")

RAW_SUBMIT = """
import json, sys
from chronos.api import Partitioner
from chronos.errors import ChronosError
try:
    print(json.dumps(Partitioner().submit(json.loads(sys.argv[1]), **json.loads(sys.argv[2]))))
except ChronosError as exc:
    print(json.dumps({"error": str(exc)}))
"""
RAW_MESSAGE = """
import json, os, socket, sys
from chronos import protocol
args = json.loads(sys.argv[1])
with socket.socket(socket.AF_UNIX) as sock:
    sock.connect(os.environ["CHRONOS_SOCKET"])
    sock.sendall(protocol.encode(protocol.request("submit", **args)))
    size = int.from_bytes(sock.recv(4), "big")
    body = b""
    while len(body) < size:
        body += sock.recv(size - len(body))
print(body.decode())
"""


def raw_submit(user: TestUser, d: DaemonProcess, argv: list[str], **fields: Any) -> Any:
    """A submit sent by ``user``'s own program, past the CLI's checks."""
    proc = user.run_python(
        textwrap.dedent(RAW_SUBMIT), json.dumps(argv), json.dumps(fields), env=d.env
    )
    assert proc.returncode == 0, proc.stderr
    return json.loads(proc.stdout)


def test_a_job_runs_as_its_submitter_whatever_the_request_says(
    users: Users, daemon: DaemonProcess
) -> None:
    d, bob = daemon, users.bob
    cwd = home_of(bob)
    asked = raw_submit(bob, d, ["/usr/bin/id", "-u"], cwd=str(cwd), output=str(cwd / "o"),
                       partition={"device": 0, "memory": 0.1, "duration": 60,
                                  "user": users.alice.name})  # fmt: skip
    assert "leave out user" in asked["error"]
    # Only fields the schema knows pass: no uid, gid or groups can be sent.
    for field in ("uid", "gid", "groups", "user"):
        args = {"argv": ["/usr/bin/id"], "env": {}, "cwd": str(cwd), "umask": 18,
                "output": str(cwd / "o"), field: 0,
                "partition": {"device": 0, "memory": 0.1, "duration": 60}}  # fmt: skip
        proc = bob.run_python(textwrap.dedent(RAW_MESSAGE), json.dumps(args), env=d.env)
        reply = json.loads(proc.stdout)
        assert not reply["ok"] and f"unknown argument '{field}'" in reply["error"]["message"]
    assert d.call("jobs", all=True) == []
    # With USER=root and HOME=/root in its environment, bob's job is still bob's.
    job_id = submit(bob, d, cwd, "id -u; id -G", "--output", str(cwd / "id.out"),
                    USER="root", LOGNAME="root")  # fmt: skip
    assert ended(d, job_id)["state"] == "done"
    uid, *groups = (cwd / "id.out").read_text().split()
    assert int(uid) == bob.uid and "0" not in groups


def test_another_users_job_cannot_be_cancelled_or_read(users: Users, daemon: DaemonProcess) -> None:
    d, alice, bob = daemon, users.alice, users.bob
    cwd = home_of(alice)
    job_id = submit(alice, d, cwd, "echo secret; exec sleep 600", "--output", str(cwd / "o"))
    wait_for(lambda: job(d, job_id)["state"] == "running", 10, "alice's job to run")
    bob_home = home_of(bob)
    for args in (("cancel", job_id), ("log", job_id), ("cancel", job_id[:4])):
        proc = as_user(bob, d, *args, cwd=bob_home)
        assert proc.returncode != 0 and "belongs to" in proc.stderr, proc
        assert "secret" not in proc.stdout
    listed = json.loads(as_user(bob, d, "jobs", "--all", "--json", cwd=bob_home).stdout)
    [theirs] = listed
    assert theirs["id"] == job_id and "argv" not in theirs and "output" not in theirs
    assert job(d, job_id)["state"] == "running"
    assert "secret" in as_user(alice, d, "log", job_id, cwd=cwd).stdout
    assert as_user(alice, d, "cancel", job_id, cwd=cwd).returncode == 0


def test_planted_symlink_output_is_not_followed_by_root(
    users: Users, daemon: DaemonProcess, tmp_path: Path
) -> None:
    d, alice = daemon, users.alice
    cwd = home_of(alice)
    target = tmp_path / "root-owned"
    target.write_text("root's\n")
    os.chmod(target, 0o644)
    link = cwd / "out.txt"
    os.symlink(target, link)
    os.lchown(link, alice.uid, alice.gid)
    # The CLI refuses it at submit (opened as alice, O_NOFOLLOW) …
    proc = as_user(alice, d, "submit", "--memory", "0.1", "--duration", "60",
                   "--output", str(link), "--", "/bin/echo", "pwned", cwd=cwd)  # fmt: skip
    assert proc.returncode != 0 and "cannot write output" in proc.stderr
    # … and a job sent past the CLI fails to start: the stub, as alice, does not follow it.
    sent = raw_submit(alice, d, ["/bin/echo", "pwned"], cwd=str(cwd), output=str(link),
                      partition={"device": 0, "memory": 0.1, "duration": 60})  # fmt: skip
    failed = ended(d, sent["id"])
    assert failed["state"] == "failed" and "cannot open" in failed["reason"], failed
    assert target.read_text() == "root's\n"
    assert d.record(failed["partition_id"])["state"] == "released"  # released at once
