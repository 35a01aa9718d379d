"""Who may do what, enforced by the daemon with identities read from the kernel.

Every client here is a real process running as a real Unix account
(``setpriv``), talking to a real ``chronosd`` that runs as root.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from pathlib import Path

import pytest

from .conftest import ALICE, Users
from .support import DaemonProcess, TestUser, assert_one_line_error, json_out, shared_tmpdir

pytestmark = pytest.mark.usefixtures("users")


def create_as(user: TestUser, daemon: DaemonProcess, *extra: str) -> dict:
    return json_out(user.cli("create", "0", "1%", "1h", *extra, "--json", env=daemon.env))


def test_owner_only_release_extend_attach(users: Users, shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    mine = create_as(users.alice, d)
    assert mine["user"] == ALICE and mine["uid"] == users.alice.uid
    before = d.record(mine["id"])
    everything_before = d.call("list", all=True)

    bob_sleep = users.bob.popen(["sleep", "30"], env=d.env)
    try:
        for args in (
            ("release", mine["id"]),
            ("extend", mine["id"], "1h"),
            ("attach", mine["id"], str(bob_sleep.pid)),
        ):
            line = assert_one_line_error(users.bob.cli(*args, env=d.env), code=5)
            assert "belongs to" in line and ALICE in line, line
        line = assert_one_line_error(
            users.bob.cli("create", "0", "1%", "1h", "--user", ALICE, env=d.env), code=5
        )
        assert "administrator" in line, line
        # Nor may alice charge bob's process to her partition.
        line = assert_one_line_error(
            users.alice.cli("attach", mine["id"], str(bob_sleep.pid), env=d.env), code=5
        )
        assert users.bob.name in line, line
    finally:
        bob_sleep.kill()
        bob_sleep.wait()

    after = d.record(mine["id"])
    assert after == before, "a refused request changed the partition"
    assert [e["kind"] for e in d.call("events", id=mine["id"])] == ["created"]
    assert d.call("list", all=True) == everything_before, "a refused request made a partition"

    released = json_out(users.alice.cli("release", mine["id"], "--json", env=d.env))
    assert released["state"] == "released"
    assert d.record(mine["id"])["state"] == "released"


@pytest.mark.parametrize("who", ["root", "group_member"])
def test_admins_act_for_others(users: Users, shared_daemon: DaemonProcess, who: str) -> None:
    d = shared_daemon

    def as_admin(*args: str) -> subprocess.CompletedProcess[str]:
        if who == "root":
            return d.cli(*args)
        return users.admin.cli(*args, env=d.env)

    theirs = create_as(users.alice, d)
    released = json_out(as_admin("release", theirs["id"], "--json"))
    assert released["state"] == "released"
    (release_event,) = [e for e in d.call("events", id=theirs["id"]) if e["kind"] == "released"]
    admin_uid = 0 if who == "root" else users.admin.uid
    assert release_event["uid"] == admin_uid, release_event

    made = json_out(as_admin("create", "1", "1%", "1h", "--user", ALICE, "--json"))
    assert made["user"] == ALICE and made["uid"] == users.alice.uid
    # ... and it is alice's for real: she may release it herself.
    assert users.alice.cli("release", made["id"], env=d.env).returncode == 0


def test_everyone_can_list(users: Users, shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    mine = create_as(users.alice, d)
    for user in (users.alice, users.bob, users.admin):
        listed = json_out(user.cli("list", "--json", env=d.env))
        assert mine["id"] in {p["id"] for p in listed}, user.name
    proc = users.bob.cli("list", env=d.env)
    assert proc.returncode == 0 and mine["id"] in proc.stdout and ALICE in proc.stdout
    assert mine["id"] in {p["id"] for p in json_out(d.cli("list", "--json"))}


FORGE = r"""
import json, os, sqlite3, sys
state = sys.argv[1]
out = {}
try:
    open(os.path.join(state, "ledger.db"), "r+b").close()
    out["open"] = "ok"
except PermissionError:
    out["open"] = "PermissionError"
try:
    db = sqlite3.connect(os.path.join(state, "ledger.db"), timeout=1)
    db.execute("INSERT INTO events (at, kind, detail) VALUES (0, 'forged', '{}')")
    db.execute("UPDATE partitions SET expires_at = expires_at + 1e6")
    db.commit()
    out["sqlite"] = "ok"
except sqlite3.Error as exc:
    out["sqlite"] = type(exc).__name__ + ": " + str(exc)
for name in ("ledger.db", "sock", "chronosd.lock"):
    try:
        os.unlink(os.path.join(state, name))
        out["unlink " + name] = "ok"
    except OSError as exc:
        out["unlink " + name] = type(exc).__name__
print(json.dumps(out))
"""


def test_users_cannot_write_the_ledger(users: Users, shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    mine = create_as(users.alice, d)
    before = d.record(mine["id"])
    proc = users.bob.run_python(FORGE, str(d.state_dir), env=d.env)
    assert proc.returncode == 0, proc.stderr
    out = json.loads(proc.stdout)
    assert out["open"] == "PermissionError", out
    assert out["sqlite"] != "ok" and out["sqlite"].startswith("OperationalError"), out
    for name in ("ledger.db", "sock", "chronosd.lock"):
        assert out["unlink " + name] == "PermissionError", out
    assert "forged" not in {e["kind"] for e in d.call("events")}
    assert d.record(mine["id"]) == before
    d.ping()


RAW_CLIENT = r"""
import json, socket, struct, sys

def call(sock, message):
    body = json.dumps(message).encode()
    sock.sendall(struct.pack(">I", len(body)) + body)
    (n,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
    return json.loads(sock.recv(n, socket.MSG_WAITALL))

sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
sock.connect(sys.argv[1])
good = {"device": 0, "memory": "1%", "duration": 3600, "persist": True}
replies = [
    call(sock, {"v": 1, "op": "ping"}),
    call(sock, {"v": 1, "op": "create", "args": {**good, "uid": 0, "user": "root"}}),
    call(sock, {"v": 1, "op": "create", "args": {**good, "uid": 0}}),
    call(sock, {"v": 1, "op": "create", "args": {**good, "user": "root"}}),
    call(sock, {"v": 1, "op": "create", "uid": 0, "user": "root", "pid": 1, "gid": 0,
                "caller": {"uid": 0}, "args": good}),
]
print(json.dumps(replies))
"""


def test_identity_comes_from_the_kernel(users: Users, shared_daemon: DaemonProcess) -> None:
    d = shared_daemon
    proc = users.bob.run_python(RAW_CLIENT, str(d.sock), env=d.env)
    assert proc.returncode == 0, proc.stderr
    ping, both, uid_only, user_root, top_level = json.loads(proc.stdout)

    assert ping["ok"] and ping["result"]["uid"] == users.bob.uid
    assert ping["result"]["admin"] is False
    for reply in (both, uid_only):
        assert reply["ok"] is False
        assert reply["error"]["code"] == "bad_request"
        assert "unknown argument 'uid'" in reply["error"]["message"]
    assert user_root["ok"] is False and user_root["error"]["code"] == "permission_denied"

    assert top_level["ok"] is True, top_level
    made = d.record(top_level["result"]["id"])
    assert made["user"] == users.bob.name and made["uid"] == users.bob.uid
    assert not [p for p in d.call("list", all=True) if p["uid"] == 0]


def test_stats_names_the_mode(users: Users, shared_daemon: DaemonProcess) -> None:
    proc = users.alice.cli("stats", env=shared_daemon.env)
    assert proc.returncode == 0, proc.stderr
    assert "chronosd" in proc.stdout.splitlines()[0] and "embedded" not in proc.stdout

    home = shared_tmpdir("chronos-emb-")
    env = {
        **shared_daemon.env,
        "CHRONOS_MODE": "embedded",
        "CHRONOS_HOME": str(home),
        "CHRONOS_SOCKET": str(home / "no-daemon.sock"),
    }
    try:
        proc = shared_daemon.cli("stats", env=env)
        assert proc.returncode == 0, proc.stderr
        first = proc.stdout.splitlines()[0]
        assert "embedded" in first and "chronosd" not in first
    finally:
        shutil.rmtree(home, ignore_errors=True)


def test_daemon_mode_refuses_without_a_daemon(tmp_path: Path, shared_daemon: DaemonProcess) -> None:
    env = {**shared_daemon.env, "CHRONOS_SOCKET": str(tmp_path / "nobody.sock")}
    line = assert_one_line_error(shared_daemon.cli("list", env=env), code=7)
    assert "nobody.sock" in line
