"""Prometheus metrics of a real chronosd on simulated GPUs: names, types and values."""

from __future__ import annotations

import json
import os
import pwd
import re
import shutil
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest
from prometheus_client.parser import text_string_to_metric_families

from chronos.errors import BadRequest
from chronos.httpserve import is_loopback, parse_address
from chronos.ledger import Ledger
from chronos.metrics import EventCounts, refusal_reason

from .support import GIB, SIM_GPU_BYTES, Daemon, http_get, python_holding, wait_for

ME = pwd.getpwuid(os.getuid()).pw_name
CONFIG = """
metrics_address = "127.0.0.1:0"
sample_interval = "0.1s"
memory_grace = "0.3s"
[limits.default]
max_share = 0.6
"""
#: The tests' own user makes the capacity refusals (root is exempt from quotas anyway; an
#: ordinary user running the suite must be too, or max_share refuses first).
CONFIG += f"[limits.users.{ME}]\nmax_share = 1.0\n" if os.geteuid() else ""

Families = dict[str, Any]


def scrape(d: Daemon, accept: str | None = None) -> tuple[dict[str, str], str]:
    url = f"http://{d.address_of('metrics_serving')}/metrics"
    status, headers, body = http_get(url, {"Accept": accept} if accept else None)
    assert status == 200, body
    return headers, body.decode()


def families(d: Daemon) -> Families:
    return {f.name: f for f in text_string_to_metric_families(scrape(d)[1])}


def value(fams: Families, sample: str, **labels: str) -> float | None:
    """The value of the one sample named ``sample`` whose labels include ``labels``."""
    found = [
        s.value
        for f in fams.values()
        for s in f.samples
        if s.name == sample and all(s.labels.get(k) == v for k, v in labels.items())
    ]
    assert len(found) <= 1, f"{sample} {labels}: {found}"
    return found[0] if found else None


def labelsets(fams: Families, sample: str) -> list[dict[str, str]]:
    return [s.labels for f in fams.values() for s in f.samples if s.name == sample]


def created_id(d: Daemon, *args: str) -> str:
    return str(d.cli_json("create", *args)["id"])


# ---------------------------------------------------------------------------- exposition


EXPECTED_TYPES = {
    "chronos_gpu_info": "gauge",
    "chronos_gpu_memory_total_bytes": "gauge",
    "chronos_gpu_memory_used_bytes": "gauge",
    "chronos_gpu_memory_committed_bytes": "gauge",
    "chronos_gpu_memory_reservable_bytes": "gauge",
    "chronos_gpu_memory_unpartitioned_bytes": "gauge",
    "chronos_gpu_utilization_ratio": "gauge",
    "chronos_gpu_active_partitions": "gauge",
    "chronos_gpu_booked_partitions": "gauge",
    "chronos_gpu_queue_length": "gauge",
    "chronos_partition_reserved_bytes": "gauge",
    "chronos_partition_used_bytes": "gauge",
    "chronos_partition_remaining_seconds": "gauge",
    "chronos_partition_expiry_timestamp_seconds": "gauge",
    "chronos_partitions_created": "counter",
    "chronos_partitions_released": "counter",
    "chronos_partitions_expired": "counter",
    "chronos_partitions_refused": "counter",
    "chronos_partitions_memory_exceeded": "counter",
    "chronos_processes_terminated": "counter",
    "chronos_processes_killed": "counter",
    "chronos_queue_enqueued": "counter",
    "chronos_queue_dropped": "counter",
    "chronos_request_duration_seconds": "histogram",
    "chronos_sample_timestamp_seconds": "gauge",
    "chronos_sample_duration_seconds": "gauge",
    "chronos_daemon_connections": "gauge",
    "chronos_build_info": "gauge",
}


def test_exposition_parses_with_conventional_names_and_types(
    daemon_factory: Callable[..., Daemon],
) -> None:
    d = daemon_factory(CONFIG)
    d.cli("list")  # one request, so the latency histogram has a series
    wait_for(lambda: value(families(d), "chronos_sample_timestamp_seconds"), 5, what="a sample")
    headers, text = scrape(d)
    assert headers["Content-Type"].startswith("text/plain; version=0.0.4")
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    for name, kind in EXPECTED_TYPES.items():
        assert name in fams, f"{name} missing from the exposition"
        assert fams[name].type == kind, (name, fams[name].type)
        assert fams[name].documentation, f"{name} has no HELP"
    for name, fam in fams.items():
        if not name.startswith("chronos_"):
            assert name.startswith(("process_", "python_")), name
            continue
        assert re.fullmatch(r"chronos_[a-z][a-z0-9_]*", name), name
        for s in fam.samples:
            if fam.type == "counter":
                assert s.name == name + "_total", s.name  # counters end in _total
            assert "partition" not in s.labels or fam.type == "gauge", s  # ids only on gauges
    # Units in names; base units (bytes, seconds, ratio 0..1).
    assert value(fams, "chronos_gpu_memory_total_bytes", gpu="0") == SIM_GPU_BYTES
    assert value(fams, "chronos_gpu_utilization_ratio", gpu="0") == 0.0
    info = labelsets(fams, "chronos_gpu_info")
    assert sorted(i["gpu"] for i in info) == ["0", "1"]
    assert {i["vendor"] for i in info} == {"simulated"}
    assert value(fams, "chronos_build_info", version="0.1.0") == 1.0

    # OpenMetrics when asked for; 404 elsewhere; HEAD answers without a body.
    headers, text = scrape(d, "application/openmetrics-text; version=1.0.0")
    assert headers["Content-Type"].startswith("application/openmetrics-text")
    assert text.rstrip().endswith("# EOF")
    base = f"http://{d.address_of('metrics_serving')}"
    assert http_get(base + "/nothing")[0] == 404
    status, _, body = http_get(base + "/metrics", method="HEAD")
    assert (status, body) == (200, b"")


def test_gauges_match_the_known_state(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(CONFIG)
    a = created_id(d, "0", "25%", "1h")
    b = created_id(d, "1", "10GiB", "30m")
    booked = created_id(d, "1", "20%", "2h", "--start", "+2h")
    run_id = created_id(d, "0", "25%", "1h")
    # A process in a partition (as `chronos run` starts it: CHRONOS_PARTITION_ID set),
    # holding 3 GiB of GPU 0 …
    d.spawn(
        python_holding(3 * GIB, 0), env={"CHRONOS_PARTITION_ID": run_id}, stdout=subprocess.DEVNULL
    )
    # … one in no partition, holding 1 GiB of GPU 1, and a request waiting for GPU 0.
    d.spawn(python_holding(GIB, 1), stdout=subprocess.DEVNULL)
    d.spawn(
        [sys.executable, "-m", "chronos.cli", "create", "0", "60%", "1h", "--wait"],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )

    def settled() -> Families | None:
        fams = families(d)
        ready = (
            value(fams, "chronos_gpu_memory_unpartitioned_bytes", gpu="1") == GIB
            and value(fams, "chronos_gpu_queue_length", gpu="0") == 1
            and any(
                value(fams, "chronos_partition_used_bytes", **labels) == 3 * GIB
                for labels in labelsets(fams, "chronos_partition_used_bytes")
            )
        )
        return fams if ready else None

    fams = wait_for(settled, 10, interval=0.1, what="the processes and the queue")
    quarter = SIM_GPU_BYTES // 4

    assert value(fams, "chronos_gpu_memory_total_bytes", gpu="1") == SIM_GPU_BYTES
    assert value(fams, "chronos_gpu_memory_reservable_bytes", gpu="0") == SIM_GPU_BYTES
    assert value(fams, "chronos_gpu_memory_committed_bytes", gpu="0") == 2 * quarter
    assert value(fams, "chronos_gpu_memory_committed_bytes", gpu="1") == 10 * GIB
    assert value(fams, "chronos_gpu_memory_used_bytes", gpu="0") == 3 * GIB
    assert value(fams, "chronos_gpu_memory_used_bytes", gpu="1") == GIB
    assert value(fams, "chronos_gpu_memory_unpartitioned_bytes", gpu="0") == 0
    assert value(fams, "chronos_gpu_active_partitions", gpu="0") == 2
    assert value(fams, "chronos_gpu_active_partitions", gpu="1") == 1
    assert value(fams, "chronos_gpu_booked_partitions", gpu="1") == 1
    assert value(fams, "chronos_gpu_booked_partitions", gpu="0") == 0
    assert value(fams, "chronos_gpu_queue_length", gpu="1") == 0

    reserved = {
        lab["partition"]: lab for lab in labelsets(fams, "chronos_partition_reserved_bytes")
    }
    assert set(reserved) == {a, b, run_id}  # active ones only: not the booking
    assert booked not in reserved
    assert all(lab["user"] == ME for lab in reserved.values())
    assert value(fams, "chronos_partition_reserved_bytes", partition=a, gpu="0") == quarter
    assert value(fams, "chronos_partition_reserved_bytes", partition=b, gpu="1") == 10 * GIB
    assert value(fams, "chronos_partition_used_bytes", partition=run_id, user=ME) == 3 * GIB
    assert value(fams, "chronos_partition_used_bytes", partition=a) == 0
    left = value(fams, "chronos_partition_remaining_seconds", partition=b)
    assert left is not None and 1700 < left <= 1800
    expiry = value(fams, "chronos_partition_expiry_timestamp_seconds", partition=a)
    assert expiry is not None and abs(expiry - (time.time() + 3600)) < 120
    assert value(fams, "chronos_queue_enqueued_total") == 1

    # A partition's series vanish when it ends.
    d.cli("release", a)
    fams = families(d)
    assert value(fams, "chronos_partition_reserved_bytes", partition=a) is None
    assert value(fams, "chronos_partition_remaining_seconds", partition=a) is None
    # … and the room it leaves goes to the waiting request.
    assert value(fams, "chronos_gpu_queue_length", gpu="0") == 0
    assert value(fams, "chronos_gpu_active_partitions", gpu="0") == 2
    on_gpu0 = [p for p in d.cli_json("list") if p["device"] == 0]
    assert {p["memory_fraction"] for p in on_gpu0} == {0.25, 0.6}
    assert value(fams, "chronos_gpu_memory_committed_bytes", gpu="0") == sum(
        p["memory_bytes"] for p in on_gpu0
    )


def test_counters_follow_the_ledger(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(CONFIG)
    fams = families(d)
    for sample, labels in (
        ("chronos_partitions_created_total", {}),
        ("chronos_partitions_refused_total", {"reason": "capacity"}),
        ("chronos_partitions_refused_total", {"reason": "quota"}),
        ("chronos_processes_terminated_total", {"reason": "unpartitioned"}),
    ):
        assert value(fams, sample, **labels) == 0, sample  # every series exists from the start

    # Processes stopped at expiry, and for using more memory than reserved.
    short = created_id(d, "0", "0.1", "2s", "--grace", "0.5s")
    d.spawn(
        python_holding(GIB, 0, 60), env={"CHRONOS_PARTITION_ID": short}, stdout=subprocess.DEVNULL
    )
    small = created_id(d, "1", "1GiB", "1m", "--grace", "0.5s")
    d.spawn(
        python_holding(2 * GIB, 1, 60),
        env={"CHRONOS_PARTITION_ID": small},
        stdout=subprocess.DEVNULL,
    )

    first = created_id(d, "0", "0.3", "1h")
    created_id(d, "0", "0.3", "1h")
    d.cli("release", first)
    refused = d.cli("create", "0", "0.9", "1h", check=False)
    assert refused.returncode != 0 and "free" in refused.stderr
    quota = _as_nobody(d, "create", "0", "0.7", "1h")

    def counted() -> Families | None:
        fams = families(d)
        done = (
            value(fams, "chronos_processes_terminated_total", reason="expired") == 1
            and value(fams, "chronos_processes_terminated_total", reason="memory") == 1
        )
        return fams if done else None

    fams = wait_for(counted, 15, interval=0.2, what="the expiry and the memory stop")
    assert value(fams, "chronos_partitions_created_total") == 4
    assert value(fams, "chronos_partitions_released_total") >= 1  # type: ignore[operator]
    assert value(fams, "chronos_partitions_expired_total") == 1
    assert value(fams, "chronos_partitions_memory_exceeded_total") == 1
    assert value(fams, "chronos_partitions_refused_total", reason="capacity") == 1
    if quota is not None:
        assert "over the max_share limit" in quota.stderr, quota.stderr
        assert value(fams, "chronos_partitions_refused_total", reason="quota") == 1
    assert value(fams, "chronos_processes_terminated_total", reason="unpartitioned") == 0
    # No partition id or user on any counter: their cardinality is fixed.
    for fam in fams.values():
        if fam.type == "counter":
            assert all(set(s.labels) <= {"reason"} for s in fam.samples), fam.name


def _as_nobody(d: Daemon, *args: str) -> subprocess.CompletedProcess[str] | None:
    """``chronos ARGS`` as uid 65534 (quotas do not apply to root); None where impossible."""
    if os.geteuid() != 0 or shutil.which("setpriv") is None:
        return None
    argv = [
        "setpriv",
        "--reuid=65534",
        "--regid=65534",
        "--clear-groups",
        sys.executable,
        "-m",
        "chronos.cli",
        *args,
    ]
    proc = subprocess.run(
        argv,
        env={**d.env, "CHRONOS_MODE": "daemon", "HOME": "/"},
        capture_output=True,
        text=True,
        timeout=30,
        cwd="/",
    )
    if "Permission denied" in proc.stderr or "No module named" in proc.stderr:
        return None  # this Python cannot be run by another user here
    return proc


def test_request_latency_histogram(daemon_factory: Callable[..., Daemon]) -> None:
    d = daemon_factory(CONFIG)
    for _ in range(3):
        d.cli("list")
    created_id(d, "0", "0.1", "10m")
    fams = families(d)
    hist = fams["chronos_request_duration_seconds"]
    assert hist.type == "histogram"
    lists = [s for s in hist.samples if s.labels.get("op") == "list"]
    count = next(s.value for s in lists if s.name.endswith("_count"))
    assert count >= 3
    buckets = [(float(s.labels["le"]), s.value) for s in lists if s.name.endswith("_bucket")]
    values = [v for _, v in sorted(buckets)]
    assert values == sorted(values) and values[-1] == count  # cumulative, +Inf = count
    assert next(s.value for s in lists if s.name.endswith("_sum")) > 0
    assert value(fams, "chronos_request_duration_seconds_count", op="create") == 1
    assert {s.labels["op"] for s in hist.samples} <= {"list", "create", "ping", "stats"}


def test_flag_enables_metrics_which_are_off_by_default(
    daemon_factory: Callable[..., Daemon],
) -> None:
    plain = daemon_factory("")
    assert plain.logged("metrics_serving") is None
    assert plain.logged("dashboard_serving") is None
    flagged = daemon_factory("", ("--metrics", "127.0.0.1:0"))
    host, port = parse_address(flagged.address_of("metrics_serving"))
    assert host == "127.0.0.1" and port > 0
    assert "chronos_gpu_memory_total_bytes" in scrape(flagged)[1]


def test_address_in_use_is_logged_and_the_daemon_runs_on(
    daemon_factory: Callable[..., Daemon],
) -> None:
    first = daemon_factory(CONFIG)
    taken = first.address_of("metrics_serving")
    second = daemon_factory(f'metrics_address = "{taken}"\n')
    failed = wait_for(lambda: second.logged("http_failed"), 5, what="http_failed")
    assert "cannot serve metrics" in failed["error"]
    second.cli("list")  # the daemon itself still serves


def test_the_cli_never_imports_prometheus_client(tmp_path: Path) -> None:
    code = (
        "import sys\n"
        "from chronos.cli import main\n"
        "main(['list'])\n"
        "assert 'prometheus_client' not in sys.modules, 'imported'\n"
        "assert 'chronos.metrics' not in sys.modules\n"
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("CHRONOS_")}
    env.update(CHRONOS_HOME=str(tmp_path), CHRONOS_BACKEND="simulated", CHRONOS_MODE="embedded")
    proc = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=30
    )
    assert proc.returncode == 0, proc.stderr


# ---------------------------------------------------------------------------------- units


def test_refusal_reasons() -> None:
    assert refusal_reason({"reason": "over the max_share limit: 70% asked"}) == "quota"
    assert refusal_reason({"reason": "over the max_gpu_hours_day limit: …"}) == "quota"
    assert refusal_reason({"reason": "GPU 0 has 8.0 GiB free now, 72.0 GiB requested"}) == (
        "capacity"
    )
    assert refusal_reason({}) == "capacity"


def test_event_counts_tail_the_ledger(tmp_path: Path) -> None:
    ledger = Ledger(tmp_path / "ledger.db")
    counts = EventCounts(tmp_path / "ledger.db")
    try:
        events: list[tuple[str, dict[str, Any]]] = [
            ("created", {}),
            ("created", {}),
            ("released", {"reason": "released"}),
            ("expired", {"reason": "expired"}),
            ("refused", {"reason": "over the max_partitions limit: 3 open"}),
            ("refused", {"reason": "GPU 0 has 0 B free now"}),
            ("refused", {"reason": "GPU 1 has 0 B free now"}),
            ("terminated", {"why": "expired", "processes": [11, 12]}),
            ("terminated", {"why": "memory", "processes": [13]}),
            ("killed", {"why": "expired", "processes": 1}),
            ("unpartitioned", {"pid": 14, "action": "warn"}),
            ("unpartitioned", {"pids": [15, 16, 17], "action": "enforce"}),
            ("memory_exceeded", {"used_bytes": 5}),
            ("queued", {}),
            ("queue_timeout", {}),
            ("queue_cancelled", {}),
            ("warned", {}),
            ("usage", {"peak_bytes": 1}),
        ]
        for kind, detail in events:
            ledger.log(kind, detail=detail)
        counts.update()
        assert (counts.created, counts.released, counts.expired) == (2, 1, 1)
        assert counts.refused == {"capacity": 2, "quota": 1}
        assert counts.terminated == {"expired": 2, "memory": 1, "unpartitioned": 3}
        assert counts.killed == {"expired": 1, "memory": 0}
        assert counts.memory_exceeded == 1 and counts.queued == 1
        assert counts.queue_dropped == {"cancelled": 1, "timeout": 1, "refused": 0}

        counts.update()  # nothing new: nothing counted twice
        assert counts.created == 2
        ledger.log("created")
        counts.update()
        assert counts.created == 3

        again = EventCounts(tmp_path / "ledger.db")  # a restarted daemon counts the history
        again.update()
        assert (again.created, again.refused) == (3, {"capacity": 2, "quota": 1})
        again.close()
    finally:
        counts.close()
        ledger.close()


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        ("127.0.0.1:9464", ("127.0.0.1", 9464)),
        ("localhost:0", ("localhost", 0)),
        ("[::1]:8080", ("::1", 8080)),
        ("8080", ("127.0.0.1", 8080)),
        (":8080", ("0.0.0.0", 8080)),
        ("0.0.0.0:80", ("0.0.0.0", 80)),
    ],
)
def test_parse_address(text: str, expected: tuple[str, int]) -> None:
    assert parse_address(text) == expected


@pytest.mark.parametrize("text", ["", "host", "1.2.3.4:99999", "::1:80", "[::1]80", "h:x"])
def test_parse_address_rejects(text: str) -> None:
    with pytest.raises(BadRequest):
        parse_address(text)


def test_is_loopback() -> None:
    assert all(map(is_loopback, ["127.0.0.1", "127.1.2.3", "::1", "localhost"]))
    assert not any(map(is_loopback, ["0.0.0.0", "::", "10.0.0.1", "example.org", ""]))


def test_docs_and_grafana_name_only_real_metrics() -> None:
    docs = Path(__file__).resolve().parents[2] / "docs"
    families_of = {
        name + "_total" if kind == "counter" else name for name, kind in EXPECTED_TYPES.items()
    }
    samples = families_of | {
        "chronos_request_duration_seconds" + s for s in ("_bucket", "_count", "_sum")
    }
    documented = set(
        re.findall(r"^\| `(chronos_[a-z_]+)`", (docs / "METRICS.md").read_text(), re.MULTILINE)
    )
    assert documented == families_of
    grafana = json.loads((docs / "grafana-dashboard.json").read_text())
    used = set(re.findall(r"chronos_[a-z_]+", json.dumps(grafana["panels"])))
    assert used and used <= samples, used - samples


# ------------------------------------------------------------ the endpoint itself


class _Broken:
    """A collector whose scrape fails, as one does when the daemon's loop does not answer."""

    def collect(self) -> Any:
        raise TimeoutError("the daemon's loop did not answer")

    def describe(self) -> list[Any]:
        return []


def test_endpoint_serves_prometheus_exposition_and_says_why_a_scrape_failed() -> None:
    from prometheus_client import Gauge
    from prometheus_client.registry import CollectorRegistry

    from chronos.metrics import MetricsEndpoint

    registry = CollectorRegistry(auto_describe=False)
    Gauge("chronos_test_value", "A value.", registry=registry).set(3)
    endpoint = MetricsEndpoint("127.0.0.1:0", registry)
    try:
        base = f"http://127.0.0.1:{endpoint.port}"
        status, headers, body = http_get(base + "/metrics", {"Accept-Encoding": "gzip"})
        assert status == 200 and headers.get("Content-Encoding") == "gzip"  # the library's
        status, headers, body = http_get(base + "/metrics")
        assert status == 200 and b"chronos_test_value 3.0" in body
        head_status, head_headers, head_body = http_get(base + "/metrics", method="HEAD")
        assert (head_status, head_body) == (200, b"")
        assert head_headers["Content-Length"] == headers["Content-Length"] == str(len(body))
        status, _, body = http_get(base + "/")
        assert status == 200 and b'href="/metrics"' in body
        registry.register(_Broken())  # type: ignore[arg-type]
        status, _, body = http_get(base + "/metrics")
        assert status == 503 and body.startswith(b"scrape failed: TimeoutError(")
    finally:
        endpoint.close()
