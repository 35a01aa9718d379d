"""Attacks on chronosd's socket by an ordinary local user (issue "Trust", items 1, 2, 3, 6).

Each test reproduces one finding against a real daemon, with the attack run as a
real account (``users.alice``) through ``setpriv``, and checks the defence:

* a flood of idle connections is refused past the per-user limit with a clear
  error frame, and another user's ``chronos list`` still answers;
* the daemon raises its soft descriptor limit to the hard one at start;
* half-sent frames from many connections do not grow the daemon's memory;
* a client that pipelines requests and never reads the replies is cut off;
* 20,000 fuzz frames each get a well-formed reply, none an internal error;
* a connection storm on a daemon short of descriptors logs a few lines, not megabytes;
* a request built to make a parser backtrack is refused before it is parsed;
* a handler slower than a few milliseconds is logged with its op and caller.
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import os
import resource
import signal
import socket
import struct
import subprocess
import time
from collections.abc import Callable, Iterator, Sequence
from pathlib import Path
from typing import Any

import pytest
from chronos_testing import DaemonProcess, TestUser, wait_for

from chronos import protocol
from chronos.daemon import server as server_module
from chronos.daemon.server import MAX_CONNECTIONS_PER_USER, USER_RECEIVE_BUDGET, Server
from chronos.identity import Caller

from .conftest import Users

# A client run as an ordinary user: opens COUNT connections; on each, sends a header
# announcing ANNOUNCE bytes and SEND bytes of body (0 0: stays idle); reports what it
# got back; then holds every connection open until its stdin closes.
FLOOD = r"""
import json, selectors, socket, struct, sys, time
path, count, announce, send, wait_s = sys.argv[1], *map(int, sys.argv[2:5]), float(sys.argv[5])
socks, failed = [], 0
for _ in range(count):
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.settimeout(5.0)
    try:
        s.connect(path)
        if announce:
            s.sendall(struct.pack(">I", announce) + b"x" * send)
    except OSError:
        failed += 1
    socks.append(s)
replies = []
poller = selectors.DefaultSelector()  # epoll: select() stops at descriptor 1024
for s in socks:
    poller.register(s, selectors.EVENT_READ)
pending = len(socks)
deadline = time.monotonic() + wait_s
while pending and time.monotonic() < deadline:
    for key, _ in poller.select(max(0.0, deadline - time.monotonic())):
        s = key.fileobj
        poller.unregister(s)
        pending -= 1
        try:
            head = s.recv(4, socket.MSG_WAITALL)
            if len(head) == 4:
                (n,) = struct.unpack(">I", head)
                replies.append(json.loads(s.recv(n, socket.MSG_WAITALL)))
        except (OSError, ValueError):
            pass
print(json.dumps({"failed": failed, "replies": replies}), flush=True)
sys.stdin.read()
"""


class Flood:
    """A running FLOOD client: its report, and its connections held until :meth:`end`."""

    def __init__(self, proc: subprocess.Popen[bytes]) -> None:
        self.proc = proc
        assert proc.stdout is not None
        line = proc.stdout.readline()
        assert line, "the flood client died before reporting"
        self.report: dict[str, Any] = json.loads(line)

    @property
    def refusals(self) -> list[str]:
        return [r["error"]["message"] for r in self.report["replies"] if not r.get("ok")]

    def end(self) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.close()
        self.proc.wait(30)


@pytest.fixture
def flood(users: Users) -> Iterator[Callable[..., Flood]]:
    started: list[Flood] = []

    def start(
        d: DaemonProcess,
        count: int,
        announce: int = 0,
        send: int = 0,
        wait_s: float = 3.0,
        user: TestUser | None = None,
    ) -> Flood:
        who = user or users.alice
        argv = [*who.python, "-c", FLOOD, str(d.sock), str(count), str(announce), str(send)]
        proc = who.popen([*argv, str(wait_s)], d.env, stdin=subprocess.PIPE, stdout=subprocess.PIPE)
        started.append(Flood(proc))
        return started[-1]

    yield start
    for f in started:
        if f.proc.poll() is None:
            f.proc.kill()
            f.proc.wait(10)


def nofile_daemon(limits: str) -> type[DaemonProcess]:
    """A DaemonProcess started under ``prlimit --nofile=SOFT:HARD`` (the pid stays the daemon's)."""

    class Limited(DaemonProcess):
        def argv(self, sock: Path | None = None) -> list[str]:
            return ["prlimit", f"--nofile={limits}", "--", *super().argv(sock)]

    return Limited


def rss_kib(pid: int) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1])
    raise AssertionError(f"no VmRSS for {pid}")


def daemon_pid(d: DaemonProcess) -> int:
    assert d.proc is not None
    return d.proc.pid


def timed_list(user: TestUser, d: DaemonProcess) -> float:
    started = time.monotonic()
    proc = user.cli("list", "--json", env=d.env, timeout=60)
    assert proc.returncode == 0, proc.stderr
    assert isinstance(json.loads(proc.stdout), list)
    return time.monotonic() - started


# ------------------------------------------------------------- connection flood


def test_idle_flood_over_the_user_limit_is_refused_and_others_are_served(
    users: Users, daemon_factory: Callable[..., DaemonProcess], flood: Callable[..., Flood]
) -> None:
    """1,100 idle connections from one user once took all 1,024 descriptors (finding 2)."""
    d = daemon_factory(factory=nofile_daemon("1024:1024"))
    attack = flood(d, 1100)
    try:
        refusals = attack.refusals
        over = 1100 - MAX_CONNECTIONS_PER_USER
        assert len(refusals) >= over - 5, attack.report["failed"]
        assert f"too many connections from uid {users.alice.uid}" in refusals[0]
        assert f"(limit {MAX_CONNECTIONS_PER_USER})" in refusals[0]
        assert timed_list(users.bob, d) < 10.0  # it hung for 35 s and more
        assert d.ping()["mode"] == "daemon"
        assert d.events("connection_refused")  # logged, rate-limited
    finally:
        attack.end()
    assert d.alive()


def test_descriptor_limit_is_raised_at_start(
    daemon_factory: Callable[..., DaemonProcess],
) -> None:
    _, hard = resource.getrlimit(resource.RLIMIT_NOFILE)  # raising it needs CAP_SYS_RESOURCE
    if hard == resource.RLIM_INFINITY or hard <= 1024:
        pytest.skip(f"the hard descriptor limit here ({hard}) leaves nothing to raise")
    d = daemon_factory(factory=nofile_daemon(f"1024:{hard}"))
    limits = Path(f"/proc/{daemon_pid(d)}/limits").read_text()
    line = next(x for x in limits.splitlines() if x.startswith("Max open files"))
    soft, got_hard = line.split()[3:5]
    assert (soft, got_hard) == (str(hard), str(hard)), line


def test_unit_file_sets_a_descriptor_limit() -> None:
    unit = Path(__file__).resolve().parents[2] / "packaging" / "chronosd.service"
    assert "LimitNOFILE=65536" in unit.read_text().splitlines()


def test_accept_storm_short_of_descriptors_logs_little(
    users: Users, daemon_factory: Callable[..., DaemonProcess], flood: Callable[..., Flood]
) -> None:
    """Out of descriptors, asyncio's accept loop wrote 64-112 MB of log in a minute."""
    d = daemon_factory(factory=nofile_daemon("128:128"))
    before = d.log_path.stat().st_size
    # Each flood holds its connections 2 s for replies before it reports: the storm's span.
    attacks = [flood(d, 400, user=u, wait_s=2.0) for u in (users.alice, users.bob)]
    try:
        logged = d.log_path.stat().st_size - before
        assert logged < 64 * 1024, f"{logged} bytes of log during the storm"
    finally:
        for attack in attacks:
            attack.end()
    wait_for(lambda: _pings(d), 10.0, what="the daemon to answer after the storm")
    tracebacks = [r for r in d.log_lines() if r.get("event") == "_raw"]
    assert not tracebacks, tracebacks[:3]


def _pings(d: DaemonProcess) -> bool:
    try:
        return d.ping(timeout=1.0)["mode"] == "daemon"
    except Exception:  # noqa: BLE001 - not yet
        return False


# ---------------------------------------------------------------- half-sent frames


def test_half_sent_frames_do_not_grow_the_daemon(
    users: Users, daemon_factory: Callable[..., DaemonProcess], flood: Callable[..., Flood]
) -> None:
    """900 connections each announcing 1 MiB and sending 1 MiB - 1 took RSS from 38 to 964 MB."""
    d = daemon_factory()
    pid = daemon_pid(d)
    d.call("list", all=True)
    before = rss_kib(pid)
    big = flood(d, 900, announce=1 << 20, send=(1 << 20) - 1, wait_s=1.0)
    # ... and, within the request size limit, more than the per-user budget at once.
    size = protocol.MAX_REQUEST
    within = flood(d, 60, announce=size, send=size - 1, wait_s=1.0, user=users.bob)
    try:
        grown_mib = (rss_kib(pid) - before) / 1024
        assert grown_mib < 40, f"daemon RSS grew by {grown_mib:.0f} MiB"
        assert any("over the" in m and "limit" in m for m in big.refusals), big.refusals[:3]
        held = USER_RECEIVE_BUDGET // size
        assert any("too much request data in flight" in m for m in within.refusals)
        assert len(within.refusals) >= 60 - held
        assert timed_list(users.admin, d) < 10.0
    finally:
        big.end()
        within.end()


# ----------------------------------------------------------------------- pipelining


def test_client_that_pipelines_without_reading_is_cut_off(daemon: DaemonProcess) -> None:
    ping = protocol.encode(protocol.request("ping"))
    sock = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    sock.connect(str(daemon.sock))
    sock.setblocking(False)
    try:
        sent = 0
        stuck_since: float | None = None
        # Send until the daemon stops reading (its replies fill both buffers) ...
        while stuck_since is None or time.monotonic() - stuck_since < 0.5:
            try:
                sent += sock.send(ping)
                stuck_since = None
            except BlockingIOError:
                stuck_since = stuck_since or time.monotonic()
                time.sleep(0.01)
        # ... then it hangs up within its write timeout, and says why.
        cut = daemon.wait_event("client_cut_off", timeout=server_module.WRITE_TIMEOUT_S + 10)
        assert "not read" in cut["reason"], cut
        sock.setblocking(True)
        sock.settimeout(10.0)
        with contextlib.suppress(ConnectionResetError):  # it hung up with our bytes unread
            while sock.recv(1 << 16):  # what it had sent, then end of file
                pass
    finally:
        sock.close()
    assert sent > 100_000
    assert daemon.ping()["mode"] == "daemon"


# -------------------------------------------------------------------------- fuzzing

# 20,000 frames from an ordinary user, each with a valid length (so every one must be
# answered on the same connection): mutated valid requests, args that are not objects,
# numbers beyond float and SQLite range, raw 1e400, wrong types, random JSON, bad UTF-8.
FUZZ = r"""
import json, random, socket, struct, sys
path, count, seed = sys.argv[1], int(sys.argv[2]), int(sys.argv[3])
rng = random.Random(seed)
OPS = json.loads(sys.argv[4])
BIG = ["1e400", "-1e400", "9" * 400, "-" + "9" * 30, "9223372036854775808", "1e308"]
def text():
    pool = ["", "x", "1%", "50%", "1GiB", "60", "1h", "SIGTERM", "SIG_IGN", "\u0661\u0660%",
            "1_0", "1" * 1000 + "x", "9" * 20000, "\x00", "../../etc", "root", "run", "api"]
    return rng.choice(pool) if rng.random() < 0.7 else "".join(
        chr(rng.randint(1, 0x2FFF)) for _ in range(rng.randint(0, 30)))
def value(depth=0):
    r = rng.random()
    if r < 0.1: return None
    if r < 0.2: return rng.random() < 0.5
    if r < 0.4: return rng.choice([0, 1, -1, 2**31, 2**63, -(2**63) - 1, 4194305, 10**30])
    if r < 0.5: return rng.uniform(-1e12, 1e12)
    if r < 0.6: return "@BIG@"
    if r < 0.85 or depth > 2: return text()
    if r < 0.93: return [value(depth + 1) for _ in range(rng.randint(0, 3))]
    return {text()[:8]: value(depth + 1) for _ in range(rng.randint(0, 3))}
def message():
    r = rng.random()
    op = rng.choice(list(OPS))
    if r < 0.5:
        args = {name: value() for name in OPS[op] if rng.random() < 0.8}
        if rng.random() < 0.1: args[text()[:8]] = value()
        if op == "create": args["persist"] = True  # no owner to signal: this client
        return {"v": 1, "op": op, "args": args}
    if r < 0.65: return {"v": 1, "op": rng.choice(["wait", op]), "args": value()}
    if r < 0.75: return {"v": value(), "op": value(), "args": value()}
    if r < 0.85: return value()
    return {"v": 1, "op": op, "args": {text()[:8]: value() for _ in range(3)}}
def body():
    if rng.random() < 0.05:
        return bytes(rng.randint(0, 255) for _ in range(rng.randint(0, 40)))
    data = json.dumps(message())
    while '"@BIG@"' in data:
        data = data.replace('"@BIG@"', rng.choice(BIG), 1)
    return data.encode()[:60000]
s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
s.settimeout(30)
s.connect(path)
answered, unanswered, codes, internal = 0, [], {}, []
for _ in range(count):
    b = body()
    try:
        s.sendall(struct.pack(">I", len(b)) + b)
        head = s.recv(4, socket.MSG_WAITALL)
        (n,) = struct.unpack(">I", head)
        reply = json.loads(s.recv(n, socket.MSG_WAITALL))
    except (OSError, ValueError, struct.error) as exc:
        unanswered.append(repr(b[:200]) + " " + repr(exc))
        s.close()
        s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
        s.settimeout(30)
        s.connect(path)
        continue
    answered += 1
    code = "ok" if reply.get("ok") is True else reply.get("error", {}).get("code", "?")
    codes[code] = codes.get(code, 0) + 1
    if code in ("error", "?"):
        internal.append([b[:200].decode(errors="replace"), reply])
print(json.dumps({"answered": answered, "unanswered": unanswered[:5],
                  "n_unanswered": len(unanswered), "codes": codes, "internal": internal[:5]}))
"""


def test_fuzz_frames_all_answered(users: Users, daemon: DaemonProcess) -> None:
    """36 of 20,000 fuzz frames once closed the connection without a reply (finding 6)."""
    count = 20_000
    ops = {op: sorted(spec) for op, spec in protocol.OPS.items()}
    proc = users.alice.run_python(
        FUZZ, str(daemon.sock), str(count), "10", json.dumps(ops), env=daemon.env, timeout=600
    )
    assert proc.returncode == 0, proc.stderr
    report = json.loads(proc.stdout)
    assert report["n_unanswered"] == 0, report["unanswered"]
    assert report["answered"] == count
    assert not report["internal"], report["internal"]
    assert report["codes"].get("bad_request", 0) > count // 4, report["codes"]
    assert daemon.alive() and daemon.ping()["mode"] == "daemon"
    failures = [r for r in daemon.log_lines() if r.get("event") in ("client_error", "_raw")]
    assert not failures, failures[:3]


# ----------------------------------------------------- the event loop is never held


def test_parser_bait_is_refused_before_parsing(users: Users, daemon: DaemonProcess) -> None:
    """A 1,080-byte create (duration "1"*1000 + "x") froze chronosd for 8 s (finding 1)."""
    with daemon.partitioner() as client:
        started = time.monotonic()
        for field in ("duration", "memory", "grace", "warn"):
            args: dict[str, Any] = {"device": 0, "memory": "1%", "duration": 60, "persist": True}
            args[field] = "1" * 1000 + "x"
            reply = _raw_call(daemon, {"v": 1, "op": "create", "args": args})
            assert reply["error"]["code"] == "bad_request", reply
            assert "longer than" in reply["error"]["message"], reply
        assert time.monotonic() - started < 2.0
        assert not client.list()


def _raw_call(d: DaemonProcess, message: Any) -> Any:
    with socket.socket(socket.AF_UNIX, socket.SOCK_STREAM) as sock:
        sock.settimeout(30)
        sock.connect(str(d.sock))
        sock.sendall(protocol.encode(message))
        (n,) = struct.unpack(">I", sock.recv(4, socket.MSG_WAITALL))
        return json.loads(sock.recv(n, socket.MSG_WAITALL))


def test_slow_handler_is_logged_with_op_and_caller(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    """A handler over SLOW_REQUEST_S is logged (rate-limited) with op, uid, pid and ms.

    No real request is slow enough on purpose once the parsers are fixed, so this one
    runs the daemon's Server over a real socket with a handler that takes 30 ms.
    """

    def slow_handle(caller: Caller, message: Any) -> dict[str, Any]:
        time.sleep(0.03)
        return protocol.ok({"op": message["op"]})

    async def scenario() -> Sequence[Any]:
        server = Server(slow_handle, lambda: "nobody-group")
        path = tmp_path / "sock"
        listening = await asyncio.start_unix_server(server.serve_client, path=str(path))
        try:
            reader, writer = await asyncio.open_unix_connection(str(path))
            replies = []
            for _ in range(20):
                writer.write(protocol.encode(protocol.request("list")))
                (n,) = struct.unpack(">I", await reader.readexactly(4))
                replies.append(json.loads(await reader.readexactly(n)))
            writer.close()
            return replies
        finally:
            listening.close()

    replies = asyncio.run(scenario())
    assert all(r == {"ok": True, "result": {"op": "list"}} for r in replies)
    records = [json.loads(line) for line in capsys.readouterr().err.splitlines()]
    slow = [r for r in records if r["event"] == "slow_request"]
    assert slow and slow[0]["op"] == "list" and slow[0]["ms"] >= 25, records
    assert slow[0]["uid"] == os.getuid() and slow[0]["pid"]
    assert len(slow) <= server_module.RateLimitedLog().burst  # 20 slow calls, a few lines


def test_idle_connection_is_closed_and_the_client_goes_on(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Idle connections are closed (IDLE_TIMEOUT_S); a client's next call, any op, still works.

    Runs the daemon's Server on a real socket in a thread, with the timeout cut to 0.2 s.
    """
    import threading

    from chronos.transport import SocketTransport

    monkeypatch.setattr(server_module, "IDLE_TIMEOUT_S", 0.2)
    path = tmp_path / "sock"
    calls: list[str] = []
    ready, stop = threading.Event(), threading.Event()

    def handle(caller: Caller, message: Any) -> dict[str, Any]:
        calls.append(message["op"])
        return protocol.ok({"state": "released"})

    async def serve() -> None:
        server = Server(handle, lambda: "nobody-group")
        listening = await asyncio.start_unix_server(server.serve_client, path=str(path))
        ready.set()
        while not stop.is_set():
            await asyncio.sleep(0.02)
        listening.close()

    thread = threading.Thread(target=asyncio.run, args=(serve(),))
    thread.start()
    try:
        assert ready.wait(10)
        transport = SocketTransport(path, timeout=5.0)
        try:
            assert transport.call("release", id="x")["state"] == "released"
            first = transport._sock
            wait_for(lambda: first.recv(1, socket.MSG_PEEK) == b"", 5.0, what="the idle close")
            assert transport.call("release", id="x")["state"] == "released"  # not idempotent
        finally:
            transport.close()
    finally:
        stop.set()
        thread.join(10)
    assert calls == ["release", "release"]


# ------------------------------------------------------------ connect churn

# Run as the attacker while chronosd is stopped: connect without blocking to the shared
# socket until the kernel says its listen backlog is full; report how many; hold them.
FILL_BACKLOG = r"""
import errno, json, resource, socket, sys
soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
resource.setrlimit(resource.RLIMIT_NOFILE, (hard, hard))
held = []
while len(held) < 100000:
    s = socket.socket(socket.AF_UNIX, socket.SOCK_STREAM)
    s.setblocking(False)
    try:
        s.connect(sys.argv[1])
    except OSError as exc:
        s.close()
        print(json.dumps({"held": len(held), "errno": exc.errno}), flush=True)
        break
    held.append(s)
sys.stdin.read()
"""

# Run as the victim: connect (with a timeout) to the socket chronos.lean picks, then to
# the shared one, and say which worked.
TRY_CONNECT = r"""
import json, socket, sys
from chronos.lean import connect_daemon, user_socket_path
shared = sys.argv[1]
import os
result = {"own": user_socket_path(shared, os.getuid())}
for name, path in (("picked", None), ("shared", shared)):
    try:
        s = connect_daemon(shared, 1.0) if path is None else socket.socket(socket.AF_UNIX)
        if path is not None:
            s.settimeout(1.0)
            s.connect(path)
        result[name] = "connected"
        s.close()
    except OSError as exc:
        result[name] = type(exc).__name__
print(json.dumps(result))
"""


def user_socket(d: DaemonProcess, user: TestUser) -> Path:
    return Path(f"{d.sock}.d") / str(user.uid)


def test_connect_churn_on_the_shared_socket_cannot_hold_back_another_users_connect(
    users: Users, daemon: DaemonProcess
) -> None:
    """A user who keeps the shared listen backlog full once made every other user wait.

    Reproduced deterministically: with chronosd stopped (SIGSTOP), alice fills the shared
    socket's backlog until the kernel refuses (what reconnecting as fast as refusals come
    back keeps it near). bob's connect to the shared socket then fails; his connect to
    the socket chronosd opened for him alone goes through at once, and his list is answered
    as soon as the daemon runs again.
    """
    assert timed_list(users.bob, daemon) < 10.0  # bob's first contact opens his own socket
    own = user_socket(daemon, users.bob)
    info = os.lstat(own)
    assert (info.st_uid, info.st_mode & 0o777) == (users.bob.uid, 0o600)
    pid = daemon_pid(daemon)
    os.kill(pid, signal.SIGSTOP)
    attack = users.alice.popen(
        [*users.alice.python, "-c", FILL_BACKLOG, str(daemon.sock)],
        daemon.env,
        stdin=subprocess.PIPE,
        stdout=subprocess.PIPE,
    )
    try:
        assert attack.stdout is not None
        filled = json.loads(attack.stdout.readline())
        assert filled["errno"] == errno.EAGAIN and filled["held"] > 100, filled
        probe = users.bob.run_python(TRY_CONNECT, str(daemon.sock), env=daemon.env)
        assert probe.returncode == 0, probe.stderr
        tried = json.loads(probe.stdout)
        # A client with a timeout is refused at once (EAGAIN) by a full backlog: the attack
        # made other users' commands fail "cannot reach chronosd", not only wait.
        assert tried["shared"] in ("BlockingIOError", "TimeoutError"), tried
        assert (tried["own"], tried["picked"]) == (str(own), "connected")
    finally:
        os.kill(pid, signal.SIGCONT)
        assert attack.stdin is not None
        attack.stdin.close()
        attack.wait(30)
    assert timed_list(users.bob, daemon) < 10.0
    assert daemon.alive()


def test_another_user_cannot_use_or_plant_a_users_own_socket(
    users: Users, daemon: DaemonProcess
) -> None:
    """alice cannot connect to bob's socket, and a socket she plants for bob is never used."""
    assert timed_list(users.bob, daemon) < 10.0
    own = user_socket(daemon, users.bob)
    probe = users.alice.run_python(
        "import socket, sys\ns = socket.socket(socket.AF_UNIX)\n"
        "try:\n    s.connect(sys.argv[1])\nexcept OSError as e:\n    print(type(e).__name__)",
        str(own),
        env=daemon.env,
    )
    assert probe.stdout.strip() == "PermissionError"

    from chronos.lean import user_socket_path

    assert user_socket_path(str(daemon.sock), users.bob.uid) == str(own)
    folder = own.parent
    os.chmod(folder, 0o777)  # a folder others could write: nothing in it is trusted
    try:
        assert user_socket_path(str(daemon.sock), users.bob.uid) is None
    finally:
        os.chmod(folder, 0o755)
    planted = folder / str(users.alice.uid + 100000)
    with socket.socket(socket.AF_UNIX) as fake:
        fake.bind(str(planted))
        os.chown(planted, users.alice.uid, -1)  # another user's socket under bob's... uid
        assert user_socket_path(str(daemon.sock), users.alice.uid + 100000) is None


def test_user_sockets_are_gone_after_a_restart_and_come_back(
    users: Users, daemon: DaemonProcess
) -> None:
    """A restarted daemon starts with no user sockets; a user's next call reopens theirs."""
    assert timed_list(users.bob, daemon) < 10.0
    own = user_socket(daemon, users.bob)
    before = os.lstat(own).st_ino
    daemon.restart()
    assert timed_list(users.bob, daemon) < 10.0  # via the shared socket, then his own
    wait_for(lambda: own.exists() and os.lstat(own).st_ino != before, 5.0, what="a new socket")
