"""The fair-sharing features end to end: the ``chronos`` CLI against a real chronosd.

Each test starts its own daemon (simulated GPUs: two of 80 GiB) with its own
policy file. Commands run as root (an administrator: quotas do not apply) or,
where quotas or fair share matter, as two ordinary accounts created for the
session (``accounts``; needs root, skipped otherwise).
"""

from __future__ import annotations

import contextlib
import json
import re
import signal
import sys
import time
import tomllib
from datetime import date, datetime, timedelta
from typing import Any

import pytest

from chronos.config import load_config, parse_config
from chronos.errors import AdmissionRefused, BadRequest, Timeout

from .support import FairDaemon, Popen, one_line_error, toml_policy, wait_for

REFUSED = AdmissionRefused.exit_code
CREATED_RE = re.compile(r"^(?:created|booked) partition ([0-9a-f]{8}):", re.M)


def made_id(stdout: str) -> str:
    match = CREATED_RE.search(stdout)
    assert match, f"no partition id in {stdout!r}"
    return match.group(1)


def ok(proc: Any) -> str:
    assert proc.returncode == 0, f"exit {proc.returncode}: {proc.stderr}"
    return str(proc.stdout)


def create(d: FairDaemon, *args: str) -> str:
    """``chronos create ARGS`` as root; the new partition's id."""
    return made_id(ok(d.cli("create", *args)))


def waiting_users(d: FairDaemon) -> list[str]:
    return [q["user"] for q in d.queue()]


def wait_queued(d: FairDaemon, n: int, proc: Popen | None = None) -> list[dict[str, Any]]:
    def ready() -> list[dict[str, Any]] | None:
        if proc is not None and proc.proc.poll() is not None:
            raise AssertionError(f"waiter exited {proc.proc.returncode}: {proc.err()}")
        q = d.queue()
        return q if len(q) >= n else None

    result: list[dict[str, Any]] = wait_for(ready, 10, f"{n} waiting request(s)")
    return result


# ------------------------------------------------------------------------------ queue


def test_wait_is_granted_right_after_a_release(daemon_factory: Any) -> None:
    d = daemon_factory()
    blocker = create(d, "0", "1.0", "1h")
    waiter = d.popen("create", "0", "0.6", "1h", "--wait")
    try:
        (entry,) = wait_queued(d, 1, waiter)
        assert entry["position"] == 1 and entry["waiting_for"] == [blocker]
        wait_for(lambda: "estimated start" in waiter.err(), 5, "a progress line")
        released = d.cli("release", blocker)
        returned = time.monotonic()
        ok(released)
        assert waiter.wait(10) == 0, waiter.err()
    finally:
        waiter.kill()
    granted_at = next(t for t, line in waiter.stdout if line.startswith("created partition"))
    new = d.call("get", id=made_id(waiter.out()))
    old = d.call("get", id=blocker)
    in_daemon_ms = (new["created_at"] - old["ended_at"]) * 1000
    after_cli_ms = (granted_at - returned) * 1000
    print(
        f"\ngrant latency: {in_daemon_ms:.1f} ms from the release to the grant in the daemon; "
        f"the waiting CLI printed its partition {after_cli_ms:.1f} ms after `chronos "
        f"release` returned (negative: before it had even exited)"
    )
    assert 0 <= in_daemon_ms < 100
    assert after_cli_ms < 1000
    # Not a terminal: progress is plain lines on stderr, nothing else there.
    lines = waiter.err().splitlines()
    assert lines and all(line.startswith("waiting: position 1 in the queue") for line in lines)
    assert f"for {blocker}" in lines[0] and "estimated start" in lines[0]
    assert "\r" not in waiter.err() and "\x1b" not in waiter.err()
    assert d.queue() == []


def _grant_delay_ms(d: FairDaemon, waiter: Popen, ended: str) -> float:
    assert waiter.wait(10) == 0, waiter.err()
    new = d.call("get", id=made_id(waiter.out()))
    old = d.call("get", id=ended)
    return float(new["created_at"] - old["ended_at"]) * 1000


def test_wait_is_granted_right_after_an_expiry_or_the_owner_dying(daemon_factory: Any) -> None:
    d = daemon_factory()
    # Expiry: the blocker ends by itself one second from now.
    expiring = create(d, "0", "1.0", "1s")
    waiter = d.popen("create", "0", "0.6", "1h", "--wait")
    try:
        wait_queued(d, 1, waiter)
        after_expiry = _grant_delay_ms(d, waiter, expiring)
    finally:
        waiter.kill()
    assert d.call("get", id=expiring)["state"] == "expired"
    # Owner death: the blocker belongs to a process (not --persist) that is killed.
    owner = Popen(
        [
            sys.executable,
            "-c",
            "import sys, time; from chronos import Partitioner; "
            "p = Partitioner().create(1, 1.0, 3600); print(p.id, flush=True); time.sleep(60)",
        ],
        d.env,
    )
    # The blocker must hold GPU 1 before the waiter asks, or the waiter may take it first.
    wait_for(lambda: owner.out().strip(), 10, "the owner's partition")
    waiter = d.popen("create", "1", "0.6", "1h", "--wait")
    try:
        wait_queued(d, 1, waiter)
        owner.proc.kill()
        after_death = _grant_delay_ms(d, waiter, owner.out().strip())
    finally:
        owner.kill()
        waiter.kill()
    print(
        f"\ngrant after an expiry: {after_expiry:.1f} ms; after the owner died: "
        f"{after_death:.1f} ms (daemon timestamps)"
    )
    assert 0 <= after_expiry < 100 and 0 <= after_death < 100


def test_progress_is_rewritten_in_place_on_a_terminal(daemon_factory: Any) -> None:
    import os
    import pty
    import subprocess

    d = daemon_factory()
    blocker = create(d, "0", "1.0", "1h")
    master, slave = pty.openpty()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "create", "0", "0.6", "1h", "--wait"],
        env=d.env,
        stdin=subprocess.DEVNULL,
        stdout=subprocess.PIPE,
        stderr=slave,
    )
    os.close(slave)
    seen = b""
    try:
        wait_queued(d, 1)
        deadline = time.monotonic() + 10
        while b"estimated start" not in seen and time.monotonic() < deadline:
            seen += os.read(master, 4096)
        ok(d.cli("release", blocker))
        out, _ = proc.communicate(timeout=10)
        with contextlib.suppress(OSError):  # EIO once the other end closed
            while chunk := os.read(master, 4096):
                seen += chunk
    finally:
        if proc.poll() is None:
            proc.kill()
        os.close(master)
    text = seen.decode()
    assert text.startswith("\r\x1b[Kwaiting: position 1 in the queue"), text
    assert "estimated start" in text and "\n" not in text  # no line feeds, only \r
    assert text.endswith("\r\x1b[K"), text  # the line is cleared once granted
    assert out.decode().startswith("created partition")


def test_wait_with_timeout_gives_up_and_leaves_the_queue(daemon_factory: Any) -> None:
    d = daemon_factory()
    create(d, "0", "1.0", "1h")
    started = time.monotonic()
    proc = d.cli("create", "0", "0.5", "1h", "--wait", "--timeout", "1s")
    elapsed = time.monotonic() - started
    line = one_line_error(proc, Timeout.exit_code)
    assert "gave up waiting for GPU capacity" in line
    assert 1.0 <= elapsed < 5.0, elapsed
    assert d.queue() == []
    assert "no waiting requests" in ok(d.cli("queue"))
    assert [e["kind"] for e in d.call("events")].count("queue_timeout") == 1


def test_ctrl_c_leaves_the_queue(daemon_factory: Any) -> None:
    d = daemon_factory()
    blocker = create(d, "0", "1.0", "1h")
    waiter = d.popen("create", "0", "0.5", "1h", "--wait")
    try:
        wait_queued(d, 1, waiter)
        waiter.proc.send_signal(signal.SIGINT)
        assert waiter.wait(10) == 130
    finally:
        waiter.kill()
    assert "chronos: interrupted" in waiter.err()
    assert "Traceback" not in waiter.err()
    assert d.queue() == []
    assert "queue_cancelled" in [e["kind"] for e in d.call("events")]
    ok(d.cli("release", blocker))
    assert d.call("list") == []  # nothing was granted to the request that left


def test_an_interrupted_api_wait_leaves_the_queue_and_the_client_in_step(
    daemon_factory: Any,
) -> None:
    """Ctrl-C during ``create(wait=True)``: out of the queue at once, next calls answered right.

    (It used to take up to a second, the long poll's length, and left the
    connection one reply behind: the next call got the cancel's reply.)
    """
    from chronos.api import Partitioner

    d = daemon_factory()
    create(d, "0", "1.0", "1h")

    def interrupt(signum: int, frame: Any) -> None:
        raise KeyboardInterrupt

    previous = signal.signal(signal.SIGALRM, interrupt)
    client = Partitioner(d_transport(d))
    try:
        signal.setitimer(signal.ITIMER_REAL, 0.3)
        started = time.monotonic()
        with pytest.raises(KeyboardInterrupt):
            client.create(0, 0.5, 60, persist=True, wait=True)
        left_after = time.monotonic() - started
    finally:
        signal.setitimer(signal.ITIMER_REAL, 0)
        signal.signal(signal.SIGALRM, previous)
    try:
        assert d.queue() == []
        assert left_after < 0.8, left_after
        assert [p.record.memory_bytes for p in client.list()] == [80 * 1024**3]
        assert client.transport.call("ping")["mode"] == "daemon"
    finally:
        client.close()


def d_transport(d: FairDaemon) -> Any:
    from chronos.transport import SocketTransport

    return SocketTransport(d.sock)


def test_the_user_with_less_recent_usage_goes_first(daemon_factory: Any, accounts: Any) -> None:
    d = daemon_factory(
        toml_policy("""
        [fairshare]
        half_life = "7d"
        age_weight = 0.000001   # waiting barely counts: usage decides
    """)
    )
    ann, ben = accounts.ann, accounts.ben
    blocker = create(d, "0", "1.0", "1h")
    used = made_id(ok(ann.cli(d, "create", "1", "0.5", "1h")))  # ann has used a GPU lately
    time.sleep(0.3)
    ok(ann.cli(d, "release", used))
    first = ann.popen(d, "create", "0", "0.6", "1h", "--wait")  # ann asks first ...
    second = None
    try:
        wait_queued(d, 1, first)
        second = ben.popen(d, "create", "0", "0.6", "1h", "--wait")  # ... ben after her
        queue = wait_queued(d, 2, second)
        assert [(q["user"], q["position"]) for q in queue] == [(ben.name, 1), (ann.name, 2)]
        table = ok(d.cli("queue"))
        assert table.index(ben.name) < table.index(ann.name)
        ok(d.cli("release", blocker))
        assert second.wait(10) == 0, second.err()  # ben is granted ...
        assert waiting_users(d) == [ann.name]  # ... ann still waits (0.6 + 0.6 > 1)
        ok(d.cli("release", made_id(second.out())))
        assert first.wait(10) == 0, first.err()
    finally:
        for proc in (first, second):
            if proc is not None:
                proc.kill()
    mine = {r["user"]: r for r in d.call("list")}
    assert set(mine) == {ann.name}


# --------------------------------------------------------------------------- bookings


def test_a_booking_shows_as_booked_and_blocks_only_what_overlaps(daemon_factory: Any) -> None:
    d = daemon_factory()
    out = ok(d.cli("create", "0", "0.6", "2h", "--start", "+1h"))
    assert out.startswith("booked partition") and "booked from" in out
    booking = made_id(out)
    (listed,) = json.loads(ok(d.cli("list", "--json")))
    assert listed["id"] == booking and listed["state"] == "booked"
    # Overlaps the booking's second hour with 0.6 + 0.6: refused, saying when it would fit.
    line = one_line_error(d.cli("create", "0", "0.6", "2h", "--start", "+2h"), REFUSED)
    assert "GPU 0 has" in line and "free at" in line and "it fits from" in line
    # Starts as the booking ends: admitted.
    create(d, "0", "0.6", "1h", "--start", "+3h")
    # Now, for two hours, it would meet the booking: refused; for 30 minutes it ends in time.
    line = one_line_error(d.cli("create", "0", "0.5", "2h"), REFUSED)
    assert "free now" in line
    create(d, "0", "0.5", "30m")
    # On the other GPU the booking is no obstacle.
    create(d, "1", "0.9", "2h", "--start", "+1h")


def _weekdays(first: date, last: date) -> list[date]:
    days, day = [], first
    while day <= last:
        if day.weekday() < 5:
            days.append(day)
        day += timedelta(days=1)
    return days


def test_repeat_weekdays_books_each_day_and_reports_the_ones_that_did_not_fit(
    daemon_factory: Any,
) -> None:
    d = daemon_factory()
    tomorrow = date.today() + timedelta(days=1)
    until = tomorrow + timedelta(days=13)
    days = _weekdays(tomorrow, until)
    blocked = days[2]
    create(d, "0", "0.8", "2h", "--start", f"{blocked.isoformat()}T08:30")
    proc = d.cli(
        "create",
        "0",
        "0.5",
        "1h",
        "--start",
        "tomorrow 09:00",
        "--repeat",
        "weekdays",
        "--until",
        until.isoformat(),
    )
    assert proc.returncode == REFUSED, proc.stderr
    assert re.search(
        rf"^series s[0-9a-f]{{7}}: {len(days) - 1} booked, 1 did not fit", proc.stdout, re.M
    )
    (failed,) = proc.stderr.splitlines()
    assert failed.startswith(f"chronos: error: not booked {blocked.isoformat()}T09:00")
    assert "GPU 0 has" in failed
    # Each day as a single booking shows it: the series output is the same lines.
    assert proc.stdout.count("booked partition ") == len(days) - 1
    booked = [r for r in d.call("list") if r["memory_bytes"] == 40 * 1024**3]
    starts = sorted(datetime.fromtimestamp(r["starts_at"]) for r in booked)
    assert [s.date() for s in starts] == [day for day in days if day != blocked]
    assert all((s.hour, s.minute) == (9, 0) for s in starts)
    assert all(r["expires_at"] - r["starts_at"] == 3600 for r in booked)
    # Daily over the same two weeks: only the weekends are still free for 60%.
    proc = d.cli(
        "create",
        "0",
        "0.6",
        "1h",
        "--start",
        "tomorrow 09:00",
        "--repeat",
        "daily",
        "--until",
        until.isoformat(),
        "--json",
    )
    booked = json.loads(proc.stdout)  # a list of bookings, each as create --json shows one
    assert proc.returncode == REFUSED
    weekend = [datetime.fromisoformat(b["starts_at"]).date() for b in booked]
    assert weekend == [
        tomorrow + timedelta(days=i)
        for i in range(14)
        if (tomorrow + timedelta(days=i)).weekday() >= 5
    ]
    assert len({b["series"] for b in booked}) == 1
    assert set(booked[0]) == set(json.loads(ok(d.cli("get", booked[0]["id"], "--json"))))
    errors = [json.loads(line)["error"] for line in proc.stderr.splitlines()]  # JSON on stderr
    assert [e["message"][11:21] for e in errors] == [day.isoformat() for day in days]
    assert {(e["code"], e["exit_code"]) for e in errors} == {("refused", REFUSED)}


def _series(stdout: str) -> str:
    match = re.search(r"^series (s[0-9a-f]{7}):", stdout, re.M)
    assert match, f"no series id in {stdout!r}"
    return match.group(1)


def test_a_series_id_releases_or_cancels_every_booking_of_it_not_yet_ended(
    daemon_factory: Any, accounts: Any
) -> None:
    d = daemon_factory()
    ann, ben = accounts.ann, accounts.ben
    until = (date.today() + timedelta(days=3)).isoformat()
    repeat = ("--start", "tomorrow 09:00", "--repeat", "daily", "--until", until)
    series = _series(ok(ann.cli(d, "create", "0", "0.2", "1h", *repeat)))
    other = _series(ok(ann.cli(d, "create", "1", "0.2", "1h", *repeat)))
    single = made_id(ok(ann.cli(d, "create", "0", "0.1", "1h")))
    mine = [r for r in d.call("list") if r.get("series") == series]
    assert len(mine) == 3 and all(r["state"] == "booked" for r in mine)
    shown = ok(ann.cli(d, "list", "--format", "id,series", "--no-header")).splitlines()
    assert sorted(line.split()[1] for line in shown) == sorted([series] * 3 + [other] * 3 + ["-"])
    # Someone else's series: refused, nothing released.
    line = one_line_error(ben.cli(d, "release", series))
    assert f"belongs to {ann.name}" in line
    # A unique prefix of the series id releases all its bookings, and nothing else.
    out = ok(ann.cli(d, "release", series[:5] if series[:5] != other[:5] else series))
    assert out.count("released partition ") == 3
    states = {r["id"]: (r.get("series"), r["state"]) for r in d.call("list", all=True)}
    assert sorted(s for (ser, s) in states.values() if ser == series) == ["released"] * 3
    assert [s for (ser, s) in states.values() if ser == other] == ["booked"] * 3
    assert states[single][1] == "active"
    # "s" names two series: ambiguous, one line, both named.
    line = one_line_error(ann.cli(d, "release", "s"), BadRequest.exit_code)
    assert series in line and other in line
    # cancel takes a series id too (as it takes a queued request's ticket).
    assert f"released series {other} (3)" in ok(ann.cli(d, "cancel", other))
    assert {r["state"] for r in d.call("list", all=True) if r.get("series") == other} == {
        "released"
    }
    # A made-up series id for a create is checked by the service.
    with pytest.raises(BadRequest, match="series id 'x1' is not s and seven hex digits"):
        d.call("create", device=0, memory=0.1, duration=60, series="x1")


def _next_dst_change(zone: Any) -> date:
    day = date.today() + timedelta(days=2)
    noon = datetime(day.year, day.month, day.day, 12, tzinfo=zone)
    for _ in range(366):
        later = noon + timedelta(days=1)
        if later.utcoffset() != noon.utcoffset():
            return later.date()
        noon = later
    pytest.skip("no daylight-saving change within a year in this time zone")


def test_repeat_keeps_the_local_time_across_a_daylight_saving_change(
    daemon_factory: Any,
) -> None:
    """Every day's booking starts at 09:00 local time, also after clocks change."""
    zoneinfo = pytest.importorskip("zoneinfo")
    try:
        zone = zoneinfo.ZoneInfo("Europe/Berlin")
    except zoneinfo.ZoneInfoNotFoundError:
        pytest.skip("no time zone database")
    d = daemon_factory()
    change = _next_dst_change(zone)
    first, last = change - timedelta(days=2), change + timedelta(days=2)
    env = {**d.env, "TZ": "Europe/Berlin"}
    proc = d.cli(
        "create",
        "0",
        "0.1",
        "1h",
        "--start",
        f"{first.isoformat()}T09:00",
        "--repeat",
        "daily",
        "--until",
        last.isoformat(),
        env=env,
    )
    assert "5 booked, 0 did not fit" in ok(proc)
    starts = sorted(datetime.fromtimestamp(r["starts_at"], zone) for r in d.call("list"))
    assert [(s.date(), s.hour, s.minute) for s in starts] == [
        (first + timedelta(days=i), 9, 0) for i in range(5)
    ]


def test_extend_succeeds_or_names_the_booking_in_the_way(daemon_factory: Any) -> None:
    d = daemon_factory()
    p = create(d, "0", "0.6", "1h")
    booking = create(d, "0", "0.6", "1h", "--start", "+2h")
    before = d.call("get", id=p)["expires_at"]
    out = ok(d.cli("extend", p, "30m"))
    assert out.startswith(f"extended partition {p}")
    assert d.call("get", id=p)["expires_at"] == pytest.approx(before + 1800)
    line = one_line_error(d.cli("extend", p, "1h"), REFUSED)
    assert f"cannot extend {p}" in line and f"booking {booking}" in line
    assert d.call("get", id=p)["expires_at"] == pytest.approx(before + 1800)  # unchanged


def test_extend_names_a_quota_in_the_way(daemon_factory: Any, accounts: Any) -> None:
    d = daemon_factory(
        toml_policy("""
        [limits.default]
        max_duration = "2h"
    """)
    )
    ann = accounts.ann
    p = made_id(ok(ann.cli(d, "create", "1", "0.2", "90m")))
    line = one_line_error(ann.cli(d, "extend", p, "1h"), REFUSED)
    assert "over the max_duration limit" in line and "2h30m asked, at most 2h" in line
    ok(ann.cli(d, "extend", p, "30m"))


def test_calendar_shows_partitions_bookings_and_the_queue(daemon_factory: Any) -> None:
    d = daemon_factory()
    active = create(d, "0", "0.3", "2h")
    full = create(d, "0", "0.7", "1h")
    booking = create(d, "1", "0.5", "1h", "--start", "+3h")
    waiter = d.popen("create", "0", "0.5", "30m", "--wait")
    try:
        (ticket,) = wait_queued(d, 1, waiter)
        out = ok(d.cli("calendar", "--days", "1"))
        only_1 = ok(d.cli("calendar", "--device", "1"))
        as_json = json.loads(ok(d.cli("calendar", "--json")))
    finally:
        waiter.proc.send_signal(signal.SIGINT)
        waiter.wait(10)
    assert "GPU 0" in out and "GPU 1" in out
    rows = {line.split()[0]: line for line in out.splitlines() if line.startswith("  ")}
    assert "█" in rows[active] and "█" in rows[full]
    assert "▒" in rows[booking] and "█" not in rows[booking]
    assert "░" in rows[ticket["ticket"]] and "waiting" in rows[ticket["ticket"]]
    assert booking in only_1 and active not in only_1 and "GPU 0" not in only_1
    assert {p["id"] for p in as_json["partitions"]} == {active, full, booking}
    assert [q["ticket"] for q in as_json["queue"]] == [ticket["ticket"]]


# ------------------------------------------------------------------------------- usage


def test_usage_json_counts_a_scripted_history(daemon_factory: Any, accounts: Any) -> None:
    d = daemon_factory(
        toml_policy("""
        [limits.default]
        max_share = 0.9
    """)
    )
    ann = accounts.ann
    early = made_id(ok(ann.cli(d, "create", "0", "0.2", "1h")))
    ok(ann.cli(d, "release", early))  # released early
    short = made_id(ok(ann.cli(d, "create", "0", "0.2", "1s")))  # expires
    one_line_error(ann.cli(d, "create", "0", "0.95", "1h"), REFUSED)  # refused: quota
    blocker = create(d, "1", "1.0", "1h")
    one_line_error(ann.cli(d, "create", "1", "0.5", "1h"), REFUSED)  # refused: no room
    waiter = ann.popen(d, "create", "1", "0.5", "1h", "--wait")  # queued, then granted
    try:
        wait_queued(d, 1, waiter)
        ok(d.cli("release", blocker))
        assert waiter.wait(10) == 0, waiter.err()
    finally:
        waiter.kill()
    wait_for(lambda: d.call("get", id=short)["state"] == "expired", 5, "the 1 s partition")
    rows = json.loads(ok(d.cli("usage", "--json")))
    by_user = {r["user"]: r for r in rows}
    mine = by_user[ann.name]
    assert {
        k: mine[k]
        for k in ("created", "released_early", "expired", "refused", "queued", "killed_for_memory")
    } == {
        "created": 3,
        "released_early": 1,
        "expired": 1,
        "refused": 2,
        "queued": 1,
        "killed_for_memory": 0,
    }
    assert mine["gpu_hours_reserved"] > 0
    assert by_user["root"]["created"] == 1 and by_user["root"]["released_early"] == 1
    only = json.loads(ok(d.cli("usage", "--json", "--user", ann.name, "--since", "1h")))
    assert [r["user"] for r in only] == [ann.name]
    table = ok(d.cli("usage"))
    assert table.splitlines()[0].split()[:3] == ["USER", "GPU-H", "RESERVED"]
    assert ann.name in table


# ------------------------------------------------------------------------------ policy


VALID = toml_policy("""
    grace = "10s"
    [devices.1]
    reservable_share = 0.75
    [fairshare]
    half_life = "3d"
    [limits.default]
    max_share = 0.5
    max_gpu_hours_day = 8
    [limits.users.chronos_f_ben]
    max_share = 1.0
""")


def test_config_check_prints_the_effective_policy_or_names_the_bad_key(
    tmp_path: Any, daemon_factory: Any
) -> None:
    d = daemon_factory()
    good = tmp_path / "good.toml"
    good.write_text(VALID)
    out = ok(d.cli("config", "check", str(good)))
    assert out.splitlines()[0] == f"{good}: ok"
    lines = out.splitlines()
    assert 'grace = "10s"' in lines
    assert lines[lines.index("[devices.1]") + 1] == "reservable_share = 0.75"
    assert "max_share = 0.5" in lines and "max_gpu_hours_day = 8.0" in lines
    assert 'half_life = "3d"' in lines
    # The built-in defaults the file does not mention are printed too...
    assert 'max_grace = "5m"' in lines and 'max_duration = "7d"' in lines
    assert "max_waiting = 8" in lines and "max_bookings = 50" in lines
    # ... in the file's own syntax: pasted back, it is the same policy.
    assert parse_config(tomllib.loads("\n".join(lines[1:]))) == load_config(good)
    missing = tmp_path / "no-such-policy.toml"
    line = one_line_error(d.cli("config", "check", str(missing)), BadRequest.exit_code)
    assert str(missing) in line and "no such file" in line
    data = json.loads(ok(d.cli("config", "check", str(good), "--json")))
    assert data["policy"]["user_limits"]["chronos_f_ben"]["max_share"] == 1.0
    bad = tmp_path / "bad.toml"
    bad.write_text(VALID.replace("max_gpu_hours_day", "max_gpu_hours_dya"))
    line = one_line_error(d.cli("config", "check", str(bad)), BadRequest.exit_code)
    assert "'max_gpu_hours_dya'" in line and str(bad) in line
    bad.write_text(VALID.replace('half_life = "3d"', 'half_life = "three days"'))
    line = one_line_error(d.cli("config", "check", str(bad)), BadRequest.exit_code)
    assert "half_life" in line
    # Without a path: $CHRONOS_CONFIG (the daemon's file, empty: the defaults).
    out = ok(d.cli("config", "check"))
    assert out.startswith(f"{d.config_path}: ok")


def test_a_quota_refusal_names_the_limit_and_the_standing(
    daemon_factory: Any, accounts: Any
) -> None:
    d = daemon_factory(
        toml_policy("""
        [limits.default]
        max_share = 0.5
        max_partitions = 1
    """)
    )
    ann = accounts.ann
    line = one_line_error(ann.cli(d, "create", "0", "0.6", "1h"), REFUSED)
    assert line == (
        "chronos: error: over the max_share limit: 60.0% of a GPU asked, "
        "at most 50.0% per partition"
    )
    ok(ann.cli(d, "create", "0", "0.2", "1h"))
    line = one_line_error(ann.cli(d, "create", "1", "0.2", "1h"), REFUSED)
    assert "over the max_partitions limit" in line
    assert f"{ann.name} already holds 1 partition(s) at once then, at most 1" in line
    # A quota refusal does not wait, even with --wait.
    line = one_line_error(ann.cli(d, "create", "1", "0.2", "1h", "--wait"), REFUSED)
    assert "max_partitions" in line and d.queue() == []
    create(d, "1", "0.9", "1h")  # root is an administrator: no quotas


def test_sighup_changes_admission_but_not_granted_partitions(
    daemon_factory: Any, accounts: Any
) -> None:
    d = daemon_factory(
        toml_policy("""
        [limits.default]
        max_share = 0.5
        max_duration = "2h"
    """)
    )
    ann = accounts.ann
    kept = made_id(ok(ann.cli(d, "create", "0", "0.4", "90m")))
    before = d.call("get", id=kept)
    assert before["grace_s"] == 30.0  # the default grace, fixed at creation
    d.write_policy(
        toml_policy("""
        grace = "7s"
        [limits.default]
        max_share = 0.3
        max_duration = "1h"
    """)
    )
    d.reload()
    line = one_line_error(ann.cli(d, "create", "1", "0.4", "30m"), REFUSED)
    assert "max_share" in line and "at most 30.0%" in line
    line = one_line_error(ann.cli(d, "create", "1", "0.2", "90m"), REFUSED)
    assert "max_duration" in line
    new = made_id(ok(ann.cli(d, "create", "1", "0.2", "30m")))
    assert d.call("get", id=new)["grace_s"] == 7.0
    after = d.call("get", id=kept)
    assert after == before  # same share, end and grace: granted partitions keep their terms
    assert after["state"] == "active"
    # A broken file is rejected on reload and the last good policy stays.
    d.write_policy("[limits.default]\nmax_share = 2\n")
    d.proc.send_signal(signal.SIGHUP)  # type: ignore[union-attr]
    wait_for(lambda: d.log_events("config_rejected"), 5, "config_rejected")
    line = one_line_error(ann.cli(d, "create", "1", "0.4", "30m"), REFUSED)
    assert "at most 30.0%" in line
