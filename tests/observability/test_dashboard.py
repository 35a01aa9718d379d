"""The web dashboard: its JSON, its HTTP manners, and the page in a real headless Chromium."""

from __future__ import annotations

import json
import os
import pwd
import re
import signal
import subprocess
import sys
import time
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from chronos.dashboard.server import DashboardServer, Snapshot

from .support import (
    ARTIFACTS,
    GIB,
    SIM_GPU_BYTES,
    Daemon,
    dashboard_process,
    http_get,
    python_holding,
    wait_for,
)

ME = pwd.getpwuid(os.getuid()).pw_name
STATIC = Path(__file__).resolve().parents[2] / "src" / "chronos" / "dashboard" / "static"


def state(url: str) -> dict[str, Any]:
    status, headers, body = http_get(url + "api/state")
    assert status == 200, body
    assert headers["Content-Type"] == "application/json"
    result: dict[str, Any] = json.loads(body)
    return result


def test_state_is_what_list_stats_and_queue_show(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    a = d.cli_json("create", "0", "25%", "1h")["id"]
    booked = d.cli_json("create", "1", "50%", "2h", "--start", "+3h")["id"]
    holder = d.spawn(
        python_holding(2 * GIB, 0), env={"CHRONOS_PARTITION_ID": a}, stdout=subprocess.DEVNULL
    )
    stray = d.spawn(python_holding(GIB, 1), stdout=subprocess.DEVNULL)
    d.cli_json("create", "0", "50%", "1h")
    d.spawn(
        [sys.executable, "-m", "chronos.cli", "create", "0", "40%", "30m", "--wait"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: d.cli_json("queue"), 10, what="the queued request")
    with dashboard_process(d) as url:
        s = wait_for(
            lambda: (lambda s: s if len(s["processes"]) == 2 else None)(state(url)),
            10,
            what="both processes",
        )
        listed = d.cli_json("list")
        assert [p["id"] for p in s["partitions"]] == [p["id"] for p in listed]
        assert {p["id"]: p["state"] for p in s["partitions"]}[booked] == "booked"
        assert {p["id"]: p["used_bytes"] for p in s["partitions"]}[a] == 2 * GIB
        assert {p["user"] for p in s["partitions"]} == {ME}
        stats = d.cli_json("stats")
        assert [(g["index"], g["name"], g["total_bytes"]) for g in s["devices"]] == [
            (g["index"], g["name"], g["total_bytes"]) for g in stats
        ]
        assert s["devices"][0]["total_bytes"] == SIM_GPU_BYTES
        queue = d.cli_json("queue")
        assert [q["ticket"] for q in s["queue"]] == [q["ticket"] for q in queue]
        by_pid = {p["pid"]: p for p in s["processes"]}
        assert by_pid[holder.pid]["partition_id"] == a
        assert by_pid[stray.pid]["partition_id"] is None
        assert s["mode"] == "daemon" and s["host"]
        # Times are ISO-8601, exactly as `chronos list --json` and `queue --json` write them.
        assert datetime.fromisoformat(s["now"]).tzinfo is not None
        for key in ("created_at", "starts_at", "expires_at"):
            assert [p[key] for p in s["partitions"]] == [p[key] for p in listed], key
        assert [q["enqueued_at"] for q in s["queue"]] == [q["enqueued_at"] for q in queue]


def test_read_only_local_and_self_contained(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    with dashboard_process(d) as url:
        for method in ("POST", "PUT", "DELETE", "PATCH", "OPTIONS"):
            status, headers, _ = http_get(url + "api/state", method=method)
            assert status == 405, method
            assert headers["Allow"] == "GET, HEAD"
        status, headers, _ = http_get(url + "api/state", {"Origin": "http://evil.example"})
        assert status == 200
        assert not any(k.lower().startswith("access-control-") for k in headers)  # no CORS
        assert "default-src 'none'" in headers["Content-Security-Policy"]
        assert headers["X-Content-Type-Options"] == "nosniff"
        # DNS rebinding: a page of another site that resolves to 127.0.0.1 gets nothing.
        assert http_get(url + "api/state", {"Host": "evil.example:80"})[0] == 421
        assert http_get(url, {"Host": f"localhost:{url.rsplit(':', 1)[1].rstrip('/')}"})[0] == 200
        for name, kind in (
            ("app.js", "text/javascript"),
            ("app.css", "text/css"),
            ("favicon.svg", "image/svg+xml"),
        ):
            status, headers, body = http_get(url + "static/" + name)
            assert status == 200 and headers["Content-Type"].startswith(kind) and body
        assert http_get(url + "static/../server.py")[0] == 404
        assert http_get(url + "nothing")[0] == 404

        status, headers, page = http_get(url)
        assert status == 200 and headers["Content-Type"].startswith("text/html")
        html = page.decode()
        assert 'id="initial-state"' in html and "GPU 0" in html  # the no-JS text view too
    # Offline: every asset is served from here, none fetched from elsewhere.
    for path in [*STATIC.iterdir()]:
        text = path.read_text()
        assert not re.search(r"""(src|href)=["']?(https?:)?//""", text), path
        assert "@import" not in text and 'fetch("http' not in text, path


def test_chronosd_serves_the_dashboard_when_configured(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory('dashboard_address = "127.0.0.1:0"\n')
    url = f"http://{d.address_of('dashboard_serving')}/"
    pid = d.cli_json("create", "1", "10%", "5m")["id"]
    assert [p["id"] for p in state(url)["partitions"]] == [pid]
    assert http_get(url, method="POST")[0] == 405


def test_a_non_loopback_bind_warns(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory()
    proc = subprocess.Popen(
        [sys.executable, "-m", "chronos.cli", "dashboard", "--bind", "0.0.0.0:0"],
        env={**d.env, "CHRONOS_MODE": "daemon"},
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
        cwd="/",
    )
    try:
        assert proc.stdout is not None and proc.stderr is not None
        serving = proc.stdout.readline()
        warning = proc.stderr.readline()
        assert "serving http://" in serving
        assert "not loopback" in warning and "no authentication" in warning
    finally:
        proc.send_signal(signal.SIGINT)
        proc.wait(10)


def test_the_page_reports_a_missing_daemon() -> None:
    def broken() -> Snapshot:
        from chronos.errors import DaemonUnavailable

        raise DaemonUnavailable("cannot reach chronosd at /nowhere")

    server = DashboardServer("127.0.0.1:0", broken).start()
    try:
        status, _, body = http_get(server.url + "api/state")
        assert status == 503 and "cannot reach chronosd" in json.loads(body)["error"]
        status, _, page = http_get(server.url)
        assert status == 200 and b"cannot reach chronosd" in page
    finally:
        server.close()


# ------------------------------------------------------------------------------ browser


def test_live_page_in_a_real_browser(daemon_factory: Callable[..., Daemon], browser: Any) -> None:
    d = daemon_factory()
    first = d.cli_json("create", "0", "30%", "2h")["id"]
    d.cli_json("create", "1", "40%", "3h", "--start", "+4h")
    holder = d.spawn(
        python_holding(5 * GIB, 0), env={"CHRONOS_PARTITION_ID": first}, stdout=subprocess.DEVNULL
    )
    stray = d.spawn(python_holding(GIB, 1), stdout=subprocess.DEVNULL)
    d.cli_json("create", "0", "60%", "1h")
    d.spawn(
        [sys.executable, "-m", "chronos.cli", "create", "0", "30%", "1h", "--wait"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    wait_for(lambda: d.cli_json("queue"), 10, what="the queued request")
    wait_for(
        lambda: len([p for g in d.cli_json("stats") for p in g["processes"]]) == 2,
        10,
        what="both processes",
    )
    ARTIFACTS.mkdir(exist_ok=True)

    with dashboard_process(d) as url:
        page = browser.new_page(viewport={"width": 1280, "height": 900})
        problems: list[str] = []
        page.on("pageerror", lambda exc: problems.append(f"page error: {exc}"))
        page.on("console", lambda m: problems.append(m.text) if m.type == "error" else None)
        page.goto(url)

        # The right GPUs, partitions, owners, queue and processes.
        assert page.locator("article.gpu").count() == 2
        assert page.locator("article.gpu h2").all_inner_texts() == ["GPU 0", "GPU 1"]
        assert "Simulated GPU 1" in page.locator("article.gpu[data-gpu='1']").inner_text()
        row = page.locator(f"#partitions tr[data-partition-id='{first}']")
        assert ME in row.inner_text() and "active" in row.inner_text()
        assert "booked" in page.locator("#partitions").inner_text()
        assert page.locator(f".seg.part[data-partition-id='{first}']").count() == 1
        assert page.locator("#queue tbody tr[data-ticket]").count() == 1
        assert page.locator(".tl .bar.queued").count() == 1
        assert page.locator(".tl .bar.booked").count() == 1
        assert first in page.locator(f"#processes tr[data-pid='{holder.pid}']").inner_text()
        assert (
            "unpartitioned" in page.locator(f"#processes tr[data-pid='{stray.pid}']").inner_text()
        )
        assert page.locator("#status.live").count() == 1

        # A partition made from the CLI appears within 3 s, without a reload …
        page.evaluate("window.__sameDocument = 42")
        created = d.cli_json("create", "1", "20%", "45m")["id"]
        new_row = f"#partitions tr[data-partition-id='{created}']"
        started = time.monotonic()
        page.wait_for_selector(new_row, timeout=3000)
        appeared = time.monotonic() - started
        assert page.evaluate("window.__sameDocument") == 42, "the page reloaded"
        assert ME in page.locator(new_row).inner_text()
        assert re.search(r"ends in (44|45)m", page.locator(new_row).inner_text())
        page.wait_for_timeout(300)
        page.screenshot(path=str(ARTIFACTS / "dashboard.png"), full_page=True)

        # … and it is gone within 3 s of its release.
        d.cli("release", created)
        page.wait_for_selector(new_row, state="detached", timeout=3000)
        assert page.evaluate("window.__sameDocument") == 42

        # Phone width: nothing wider than the screen.
        page.set_viewport_size({"width": 390, "height": 844})
        page.wait_for_timeout(300)
        assert page.evaluate("document.documentElement.scrollWidth") <= 390
        page.screenshot(path=str(ARTIFACTS / "dashboard-phone.png"), full_page=True)

        # The daemon going away shows as such, and the page keeps trying.
        d.proc.send_signal(signal.SIGTERM)  # type: ignore[union-attr]
        page.wait_for_selector("#status.down", timeout=5000)
        assert "Cannot read the state" in page.locator("#banner").inner_text()
        page.close()
    assert not [p for p in problems if "503" not in p], problems  # 503: the daemon stopped
    print(f"partition appeared {appeared:.2f}s after `chronos create` returned")
