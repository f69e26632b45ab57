"""The broker goes away for 15 s and comes back while four servers take traffic (a private
broker of this test: the session's is never stopped). Requests never block, the degraded share
bounds what the servers admit meanwhile, and the agents leave degraded mode by themselves once
the broker is back: nothing is restarted but the broker."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable

import numpy as np
import pytest

import drl_services
from tests.cluster.harness import Cluster, create_topics, multipliers, ramped_schedule

from .common import (
    DEGRADED_AFTER,
    admissions,
    cold_allowance,
    group_name,
    healthy_bound,
    sleep_until,
    windows_within,
    worst_per_client,
)
from .conftest import start_private

pytestmark = [pytest.mark.integration, pytest.mark.slow]

LIMIT = 200
WINDOW = 5.0
SERVERS = 4
CLIENTS = 30
HOT = 5
COLD = 0.005
STOP_AT = 10.0  # seconds into the run
OUTAGE = 15.0  # seconds between the broker's stop and its restart
DURATION = 50.0
#: what "never blocks" means on this (shared, 2-core) machine
MAX_LATENCY_MS = 50.0
#: the agents must be out of degraded mode this long after the broker answers again
RECOVERY = 30.0


def _for_good(timeline: np.ndarray, after: float) -> float:
    """The time after ``after`` from which the degraded flag stays 0 to the end (inf if it
    ends degraded)."""
    on = np.flatnonzero((timeline[:, 0] > after) & (timeline[:, 1] == 1.0))
    if not on.size:
        return _transitions(timeline, after, 0.0)
    if on[-1] + 1 >= len(timeline):
        return float("inf")
    return float(timeline[on[-1] + 1, 0])


def _flaps(timeline: np.ndarray, after: float) -> int:
    """Times the flag went from 0 back to 1 after ``after``."""
    flag = timeline[timeline[:, 0] > after, 1]
    return int(np.count_nonzero((flag[1:] == 1.0) & (flag[:-1] == 0.0)))


def _transitions(timeline: np.ndarray, after: float, value: float) -> float:
    """The first sample time after ``after`` whose degraded flag is ``value`` (inf if none)."""
    hit = np.flatnonzero((timeline[:, 0] > after) & (timeline[:, 1] == value))
    return float(timeline[hit[0], 0]) if hit.size else float("inf")


@pytest.mark.timeout(DURATION + 240)
def test_broker_outage_degrades_within_bound_and_recovers(
    private_services: drl_services.Config,
    make_cluster: Callable[..., Cluster],
    measured: Callable[[str], None],
) -> None:
    cfg = private_services
    start_private(cfg, "kafka")
    bootstrap = cfg.kafka_bootstrap
    usage, grants = f"fault-usage-{uuid.uuid4().hex[:8]}", f"fault-grants-{uuid.uuid4().hex[:8]}"
    create_topics(bootstrap, {usage: 4, grants: 4})
    cluster = make_cluster(bootstrap, usage, grants, LIMIT, WINDOW)
    agg = cluster.start_aggregator(group=group_name())
    cluster.wait_for_log("aggregator", "assigned", timeout=90)
    mult = multipliers(CLIENTS)
    schedules = ramped_schedule(5, mult, LIMIT / WINDOW, DURATION, SERVERS, WINDOW)
    start_at = time.time() + 5.0
    names = [f"srv-{s}" for s in range(SERVERS)]
    nodes = [
        cluster.start_node(
            name, schedules[s], start_at, cold_start_allowance=COLD, expected_servers=SERVERS
        )
        for s, name in enumerate(names)
    ]
    sleep_until(start_at + STOP_AT)
    stopping = time.time()
    assert drl_services.down(cfg, "kafka"), "the private broker was not running"
    stopped = time.time()
    sleep_until(stopping + OUTAGE)
    assert all(n.poll() is None for n in (agg, *nodes)), "a process died during the outage"
    restarting = time.time()
    start_private(cfg, "kafka")
    back = time.time()  # the broker answers a metadata request again
    for name, node in zip(names, nodes, strict=True):
        assert node.wait(DURATION + 90) == 0, cluster.tail(name)
    assert agg.poll() is None, "the aggregator did not survive the outage:\n" + cluster.tail(
        "aggregator"
    )
    assert cluster.stop(agg) == 0, cluster.tail("aggregator")
    agg_stats = json.loads((cluster.workdir / "aggregator.json").read_text())

    # -- requests never block -------------------------------------------------------------------
    outs = {name: cluster.outputs(name) for name in names}
    lat = np.concatenate([o["latency_us"] for o in outs.values()]) / 1000.0
    at = np.concatenate([o["decided_at"] for o in outs.values()])
    outage = (at >= stopping) & (at <= back)
    max_ms, max_outage_ms = float(lat.max()), float(lat[outage].max())
    p99_outage_ms = float(np.percentile(lat[outage], 99))

    # -- degraded mode: entered after degraded_after, left by itself once the broker is back ---
    timelines = {name: o["timeline"] for name, o in outs.items()}
    entered = {n: _transitions(tl, stopping, 1.0) - stopping for n, tl in timelines.items()}
    first_out = {n: _transitions(tl, back, 0.0) - back for n, tl in timelines.items()}
    left = {n: _for_good(tl, back) - back for n, tl in timelines.items()}
    # grant batches queued by the aggregator's producer during the outage arrive late on
    # reconnection; the agent takes them as a sign of health (and their fleet size) for a moment
    flaps = {n: _flaps(tl, back) for n, tl in timelines.items()}
    d0 = stopping + max(entered.values())  # every server degraded from here...
    d1 = back + min(first_out.values())  # ...until the first one gets a grant batch again
    n_seen = {
        n: int(tl[np.searchsorted(tl[:, 0], d0), 4]) for n, tl in timelines.items()
    }  # the fleet size each degraded share divides by
    n_late = {
        n: int(tl[(tl[:, 0] > d1) & (tl[:, 0] < back + left[n]), 4].min(initial=SERVERS))
        for n, tl in timelines.items()
    }  # ... and after the late batches
    batches_end = {n: int(tl[-1, 2]) for n, tl in timelines.items()}
    batches_back = {n: int(tl[np.searchsorted(tl[:, 0], back), 2]) for n, tl in timelines.items()}

    # -- what was admitted ------------------------------------------------------------------------
    stamps, clients = admissions(cluster, names)
    a = cold_allowance(LIMIT, COLD)
    c_max = 1
    steady = sum(LIMIT / n_seen[n] + c_max for n in names)  # N_real * (L / N_seen + c_max)
    switch = 2 * LIMIT + SERVERS * c_max + SERVERS * a  # across a switch (consumer rebuilt)
    inside = [windows_within(stamps[clients == c], WINDOW, d0, d1) for c in range(HOT)]
    worst = worst_per_client(stamps, clients, CLIENTS, WINDOW)
    before = worst_per_client(stamps[stamps < stopping], clients[stamps < stopping], HOT, WINDOW)
    last = stamps >= start_at + DURATION - WINDOW
    final = np.bincount(clients[last], minlength=CLIENTS)[:HOT]

    measured(
        f"broker down: stopped {STOP_AT:g} s into the run (took {stopped - stopping:.1f} s), "
        f"restarted {restarting - stopping:.1f} s later, answering {back - stopping:.1f} s after "
        f"the stop; limit {LIMIT}/{WINDOW:g}s, {SERVERS} servers, hot clients 5x..2x"
    )
    measured(
        f"allow_request latency: max {max_ms:.2f} ms over the run, {max_outage_ms:.2f} ms "
        f"during the outage (p99 {p99_outage_ms * 1000:.0f} us; limit {MAX_LATENCY_MS:g} ms)"
    )
    measured(
        "degraded after the stop (s): "
        + ", ".join(f"{n} {v:.2f}" for n, v in entered.items())
        + "; normal for good after the broker answered (s): "
        + ", ".join(f"{n} {v:.2f}" for n, v in left.items())
    )
    measured(
        f"late grant batches on reconnection: out of degraded mode for a moment {flaps} times "
        f"per server, first {min(first_out.values()):.2f} s after the broker answered; fleet "
        f"size N_seen then {n_late} (the degraded share divides by it)"
    )
    measured(
        f"steady degraded bound N*(L/N_seen + c_max) = {steady:g} (N_seen {set(n_seen.values())})"
        f"; worst window inside [{d0 - stopping:.1f}, {d1 - stopping:.1f}] s after the stop, "
        f"hot clients: {inside}"
    )
    measured(
        f"across the switches 2L + N*c_max + N*a = {switch}; worst window over the run, all "
        f"clients {worst.max()} (hot: {worst[:HOT].tolist()}; before the stop: "
        f"{before.tolist()}); healthy bound {healthy_bound(LIMIT, SERVERS, a)}"
    )
    measured(
        f"after recovery: hot clients admitted {final.tolist()} in the last {WINDOW:g} s; "
        f"grant batches per server {batches_back} when the broker answered, {batches_end} at "
        f"the end; aggregator produce errors {agg_stats['produce_errors']}, errors "
        f"{agg_stats['errors']}"
    )
    assert max_ms < MAX_LATENCY_MS, max_ms
    # degraded within degraded_after (+ the 0.1 s sampling, a report and scheduling slack)
    assert all(v <= DEGRADED_AFTER + 1.0 for v in entered.values()), entered
    assert d1 - d0 >= 2 * WINDOW, "the outage is too short to hold a steady degraded window"
    assert max(inside) <= steady, inside
    assert worst.max() <= switch, worst
    assert all(v <= RECOVERY for v in left.values()), left
    assert all(batches_end[n] > batches_back[n] for n in names), (batches_back, batches_end)
    # grants flow again: the hot clients get most of their limit in the last window
    assert (final >= 0.5 * LIMIT).all(), final
    assert agg_stats["errors"] == 0 and agg_stats["malformed"] == 0, agg_stats
