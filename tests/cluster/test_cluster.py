"""The distributed mode end to end: real broker, one aggregator process, four app-server
processes, a Zipf workload with hot clients at 2x-5x their limit."""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest

from .harness import Cluster, make_schedule, multipliers, worst_window

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 400
WINDOW = 10.0
SERVERS = 4
CLIENTS = 200
DURATION = 30.0
#: optimistic cold start: a = max(1, floor(0.005 * 200)) = 1 token per window per server
COLD = 0.005


def mean_window(stamps: np.ndarray, window: float, start: float, end: float) -> float:
    """Mean admissions in [t, t + window) over t in [start, end - window] (steady state)."""
    s = np.sort(stamps)
    t = np.arange(start, end - window, 0.05)
    return float((np.searchsorted(s, t + window) - np.searchsorted(s, t)).mean())


def cold_allowance(limit: int, fraction: float) -> int:
    return max(1, math.floor(fraction * limit))


def bound(limit: int, servers: int, allowance: int) -> int:
    """docs/consistency.md: lease admissions never exceed L in any window; cold starts add at
    most a per server per window."""
    return limit + servers * allowance


@pytest.fixture
def cluster(
    kafka_bootstrap: str, unique_topic: Callable[..., str], tmp_path: Path
) -> Iterator[Cluster]:
    c = Cluster(kafka_bootstrap, unique_topic(4), unique_topic(4), LIMIT, WINDOW, tmp_path)
    try:
        yield c
    finally:
        c.close()


def test_cluster_bound_and_utilisation(cluster: Cluster, measured: Callable[[str], None]) -> None:
    agg = cluster.start_aggregator(group=f"drl-test-{uuid.uuid4().hex[:8]}")
    cluster.wait_for_log("aggregator", "assigned")
    mult = multipliers(CLIENTS)
    schedules = make_schedule(7, mult, LIMIT / WINDOW, DURATION, SERVERS)
    start_at = time.time() + 4.0
    nodes = [
        cluster.start_node(
            f"srv-{s}",
            schedules[s],
            start_at,
            cold_start_allowance=COLD,
            expected_servers=SERVERS,
        )
        for s in range(SERVERS)
    ]
    for s, node in enumerate(nodes):
        assert node.wait(DURATION + 60) == 0, cluster.tail(f"srv-{s}")
    assert cluster.stop(agg) == 0, cluster.tail("aggregator")
    agg_stats = json.loads((cluster.workdir / "aggregator.json").read_text())
    assert agg_stats["errors"] == 0 and agg_stats["malformed"] == 0, agg_stats
    assert agg_stats["batches"] > 0 and agg_stats["grants"] > 0, agg_stats

    stamps, clients, offered, latencies = [], [], [], []
    for s in range(SERVERS):
        st, cl, off, stats = cluster.result(f"srv-{s}")
        stamps.append(st)
        clients.append(cl)
        offered.append(off)
        latencies.append((round(stats["latency_us_p50"], 1), round(stats["latency_us_p99"], 1)))
        assert stats["errors"] == 0, stats
    stamps_all = np.concatenate(stamps) - start_at
    clients_all = np.concatenate(clients)
    offered_all = np.bincount(np.concatenate(offered), minlength=CLIENTS)

    a = cold_allowance(LIMIT, COLD)
    b = bound(LIMIT, SERVERS, a)
    worst = np.array([worst_window(stamps_all[clients_all == c], WINDOW) for c in range(CLIENTS)])
    per_window = np.array(
        [
            mean_window(stamps_all[clients_all == c], WINDOW, WINDOW, DURATION)
            for c in range(CLIENTS)
        ]
    )
    saturated = np.flatnonzero(mult >= 2.0)
    measured(
        f"cluster: limit {LIMIT}/{WINDOW:g}s, {SERVERS} servers, {CLIENTS} clients, "
        f"{offered_all.sum()} requests offered, {clients_all.size} admitted"
    )
    measured(f"bound L + N*a = {LIMIT} + {SERVERS}*{a} = {b} ({b / LIMIT - 1:.1%} over L)")
    measured(f"worst window over all clients: {worst.max()} ({worst.max() / LIMIT - 1:+.1%} vs L)")
    for c in saturated:
        measured(
            f"  hot client-{c}: offered {mult[c]:.1f}x, worst window {worst[c]}, "
            f"admitted {per_window[c]:.1f}/window ({per_window[c] / LIMIT:.1%} of L)"
        )
    measured(f"decision latency p50/p99 per server (us): {latencies}")
    assert b <= 1.02 * LIMIT
    assert worst.max() <= b, worst
    assert (per_window[saturated] >= 0.9 * LIMIT).all(), per_window[saturated]
    # unsaturated clients are not starved: the tail admits nearly all it offers (98.9% measured;
    # the margin is for a loaded 2-core machine, where reports and grants come later)
    light = np.flatnonzero(mult <= 0.5)
    admitted_light = np.bincount(clients_all, minlength=CLIENTS)[light].sum()
    measured(
        f"clients under half their limit: {admitted_light}/{offered_all[light].sum()} admitted "
        f"({admitted_light / offered_all[light].sum():.1%})"
    )
    assert admitted_light >= 0.95 * offered_all[light].sum()
