"""``drl demo`` end to end, as a user runs it: a subprocess, then its report, its plot and its
processes checked.

- ``--embedded --duration 8``: one process, no Kafka (fast, no services needed);
- ``--duration 12`` against the real broker: an aggregator process, four uvicorn app servers
  and the HTTP load generator.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import pytest

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
#: The demo's defaults (aggregator/demo.py): L = 200, N = 4 servers, a = max(1, 0.01 * L) = 2.
LIMIT, SERVERS, ALLOWANCE = 200, 4, 2


def drl() -> list[str]:
    exe = Path(sys.executable).with_name("drl")
    return [str(exe)] if exe.exists() else [sys.executable, "-m", "aggregator.cli"]


def run_demo(args: list[str], out_dir: Path, timeout: float = 90.0) -> dict[str, Any]:
    proc = subprocess.run(
        [*drl(), "demo", *args, "--out-dir", str(out_dir)],
        capture_output=True,
        text=True,
        timeout=timeout,
        env={**os.environ, "PYTHONUNBUFFERED": "1"},
    )
    assert proc.returncode == 0, f"exit {proc.returncode}\n{proc.stdout}\n{proc.stderr}"
    assert "drl demo report" in proc.stdout, proc.stdout
    report_path = out_dir / "demo-report.json"
    assert report_path.exists(), proc.stderr
    report: dict[str, Any] = json.loads(report_path.read_text())
    png = out_dir / "demo-report.png"
    assert png.exists() and png.read_bytes()[:8] == PNG_MAGIC, report.get("notes")
    assert report["png"] == str(png)
    report["_stdout"] = proc.stdout
    return report


def pid_alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    # a reused pid is someone else's process: ours ran aggregator.demo_server or drl
    try:
        cmdline = Path(f"/proc/{pid}/cmdline").read_bytes()
    except OSError:
        return True
    return b"demo_server" in cmdline or b"drl-demo-" in cmdline


def check_report(report: dict[str, Any], mode: str) -> None:
    assert report["mode"] == mode
    q = report["requests"]
    assert q["failed"] == 0 and q["not_sent"] == 0, q
    assert q["completed"] == q["offered"] > 0, q
    assert q["achieved_per_second"] > 0

    b = report["bound"]
    assert b["bound"] == LIMIT + SERVERS * ALLOWANCE
    assert 0 < b["worst_window"] <= b["bound"], b
    assert b["within_bound"] is True
    clients = report["clients"]
    assert max(c["worst_window"] for c in clients) == b["worst_window"]
    assert all(c["worst_window"] <= b["bound"] for c in clients)

    sat = report["saturated"]
    assert len(sat["clients"]) == 5, sat
    assert sat["utilisation_min"] >= 0.8, sat

    d = report["latency"]["decision_us"]
    assert 0 < d["p50"] <= d["p99"], d
    assert d["count"] == q["completed"]

    hot = [c for c in clients if c["multiplier"] >= 2.0]
    assert hot and all(c["limited"] > 0 for c in hot), hot
    light = report["light"]
    # clients far below their limit are (nearly) never refused
    assert light["limited"] <= 0.1 * light["offered"], light

    agg = report["aggregator"]
    assert agg["grants"] > 0 and agg["grant_batches"] > 0 and agg["errors"] == 0, agg
    assert agg["malformed"] == 0, agg
    kafka = report["kafka"]
    assert kafka["usage"]["messages"] > 0 and kafka["usage"]["bytes"] > 0, kafka
    assert kafka["grants"]["messages"] > 0 and kafka["grants"]["bytes"] > 0, kafka
    assert kafka["agent_errors"] == 0, kafka
    assert report["checks"]["within_bound"] and report["checks"]["no_failed_requests"]


def lightest_not_refused(report: dict[str, Any]) -> None:
    """The lightest client (about 0.08x its limit) never sees a 429: its leases are kept
    alive between its sparse requests (keepalive grants reach clients drained long ago)."""
    light = report["light"]
    assert light["lightest_limited"] == 0, light


@pytest.fixture(scope="module")
def embedded_report(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_demo(["--embedded", "--duration", "8"], tmp_path_factory.mktemp("embedded"))


@pytest.fixture(scope="module")
def kafka_report(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    return run_demo(
        ["--duration", "12", "--kafka-bootstrap", kafka_bootstrap],
        tmp_path_factory.mktemp("kafka"),
        timeout=120,
    )


def test_demo_embedded(embedded_report: dict[str, Any], measured: Callable[[str], None]) -> None:
    report = embedded_report
    check_report(report, "embedded")
    assert report["processes"] == {}
    assert report["latency"]["http_round_trip_ms"] is None
    b, sat, d = report["bound"], report["saturated"], report["latency"]["decision_us"]
    measured(
        f"embedded 8 s: {report['requests']['offered']} requests, worst window "
        f"{b['worst_window']} (bound {b['bound']}), saturated >= {sat['utilisation_min']:.0%} "
        f"of L, check p50/p99 {d['p50']:.1f}/{d['p99']:.1f} us"
    )


def test_demo_embedded_lightest_client(embedded_report: dict[str, Any]) -> None:
    lightest_not_refused(embedded_report)


@pytest.mark.integration
def test_demo_kafka(
    kafka_report: dict[str, Any], kafka_bootstrap: str, measured: Callable[[str], None]
) -> None:
    report = kafka_report
    check_report(report, "kafka")
    assert report["config"]["kafka_bootstrap"] == kafka_bootstrap
    procs = report["processes"]
    assert set(procs) == {"aggregator", *(f"demo-srv-{s}" for s in range(SERVERS))}, procs
    left = {name: pid for name, pid in procs.items() if pid_alive(pid)}
    assert not left, f"still running after the demo exited: {left}"
    rtt = report["latency"]["http_round_trip_ms"]
    assert rtt is not None and 0 < rtt["p50"] <= rtt["p99"], rtt
    per_server = report["latency"]["per_server_decision_us"]
    assert len(per_server) == SERVERS and all(v["p99"] > 0 for v in per_server.values())
    # the report's requests are the servers' own counts
    assert (
        sum(s["middleware"]["requests"] for s in report["servers"])
        == (report["requests"]["completed"])
    )
    assert (
        sum(s["middleware"]["limited"] for s in report["servers"])
        == (report["requests"]["limited"])
    )
    # the demo deleted its topics
    from confluent_kafka.admin import AdminClient

    topics = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10).topics
    ours = {report["config"]["usage_topic"], report["config"]["grants_topic"]}
    assert all(t.startswith("drl-demo-") for t in ours), ours
    assert not ours & set(topics), ours
    b, sat, q = report["bound"], report["saturated"], report["requests"]
    d = report["latency"]["decision_us"]
    measured(
        f"kafka 12 s: {q['offered']} HTTP requests at {q['achieved_per_second']:.0f}/s, worst "
        f"window {b['worst_window']} (bound {b['bound']}), saturated >= "
        f"{sat['utilisation_min']:.0%} of L, check p50/p99 {d['p50']:.1f}/{d['p99']:.1f} us, "
        f"HTTP p50/p99 {rtt['p50']:.2f}/{rtt['p99']:.2f} ms"
    )


@pytest.mark.integration
def test_demo_kafka_lightest_client(kafka_report: dict[str, Any]) -> None:
    lightest_not_refused(kafka_report)
