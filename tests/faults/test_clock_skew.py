"""Clock skew: the cluster test of tests/cluster/test_cluster.py with one server's clock 5 s
ahead and another's 5 s behind. The bound does not depend on server clocks (docs/consistency.md:
the aggregator charges usage at ``min(received, end - offset)``), and the aggregator's per-server
clock offset estimate on /metrics shows the skew."""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from tests.cluster.harness import Cluster, create_topics, delete_topics, make_schedule, multipliers

from .common import (
    admissions,
    cold_allowance,
    group_name,
    healthy_bound,
    sleep_until,
    worst_per_client,
)

pytestmark = [pytest.mark.integration, pytest.mark.slow]

# test_cluster.py's run
LIMIT = 400
WINDOW = 10.0
SERVERS = 4
CLIENTS = 200
DURATION = 30.0
COLD = 0.005
#: true clock error of each server, seconds
SKEW = {"srv-0": 5.0, "srv-1": -5.0, "srv-2": 0.0, "srv-3": 0.0}
#: the estimate is the offset less the fastest delivery seen (an upper bound of the offset):
#: within this much below the true offset, and never more than a clock read above it
TOLERANCE = 0.5
OFFSET_METRIC = "drl_aggregator_server_clock_offset_seconds"


@dataclass
class SkewRun:
    worst: np.ndarray
    hot: np.ndarray
    per_server: dict[str, int]
    estimates: dict[str, float]
    bound: int
    a: int


@pytest.fixture(scope="module")
def skew_run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[SkewRun]:
    """The run, once for the module's tests: usage and grants topics of its own, one aggregator,
    four nodes with the clocks of SKEW."""
    tag = uuid.uuid4().hex[:10]
    usage, grants = f"t-skew-usage-{tag}", f"t-skew-grants-{tag}"
    create_topics(kafka_bootstrap, {usage: 4, grants: 4})
    cluster = Cluster(
        kafka_bootstrap, usage, grants, LIMIT, WINDOW, tmp_path_factory.mktemp("skew")
    )
    try:
        yield _run(cluster)
    finally:
        cluster.close()
        delete_topics(kafka_bootstrap, [usage, grants])


def _run(cluster: Cluster) -> SkewRun:
    agg = cluster.start_aggregator(group=group_name())
    cluster.wait_for_log("aggregator", "assigned", timeout=90)
    mult = multipliers(CLIENTS)
    schedules = make_schedule(7, mult, LIMIT / WINDOW, DURATION, len(SKEW))
    start_at = time.time() + 5.0
    nodes = {
        name: cluster.start_node(
            name,
            schedules[s],
            start_at,
            cold_start_allowance=COLD,
            expected_servers=SERVERS,
            clock_offset=offset,
        )
        for s, (name, offset) in enumerate(SKEW.items())
    }
    # the estimate spans the last minute: read it two thirds into the run, all servers active
    sleep_until(start_at + 2 * DURATION / 3)
    metrics = cluster.scrape("aggregator")
    for name, node in nodes.items():
        assert node.wait(DURATION + 60) == 0, cluster.tail(name)
    assert cluster.stop(agg) == 0, cluster.tail("aggregator")
    agg_stats = json.loads((cluster.workdir / "aggregator.json").read_text())
    assert agg_stats["errors"] == 0 and agg_stats["malformed"] == 0, agg_stats

    stamps, clients = admissions(cluster, list(SKEW))
    a = cold_allowance(LIMIT, COLD)
    hot = np.flatnonzero(mult >= 2.0)
    return SkewRun(
        worst=worst_per_client(stamps, clients, CLIENTS, WINDOW),
        hot=hot,
        per_server={
            name: int(np.count_nonzero(cluster.admitted(name)[1] < hot.size)) for name in SKEW
        },
        estimates={
            dict(labels).get("server", "?"): value
            for (metric, labels), value in metrics.items()
            if metric == OFFSET_METRIC
        },
        bound=healthy_bound(LIMIT, SERVERS, a),
        a=a,
    )


@pytest.mark.timeout(DURATION + 150)
def test_clock_skew_bound_holds(skew_run: SkewRun, measured: Callable[[str], None]) -> None:
    r = skew_run
    measured(
        f"clock skew {SKEW} (s): limit {LIMIT}/{WINDOW:g}s, {SERVERS} servers, {CLIENTS} "
        f"clients, {DURATION:g} s; hot clients admitted per server {r.per_server}"
    )
    measured(
        f"bound L + N*a = {LIMIT} + {SERVERS}*{r.a} = {r.bound}; worst window over all clients "
        f"{r.worst.max()} (hot: {r.worst[r.hot].tolist()})"
    )
    assert r.worst.max() <= r.bound, r.worst
    # the skewed servers still get their share of the hot clients (about a quarter each)
    total = sum(r.per_server.values())
    assert all(v >= 0.15 * total for v in r.per_server.values()), r.per_server


def _relative(estimates: dict[str, float]) -> dict[str, float]:
    """Each estimate minus the mean of the unskewed servers': what the skew looks like from the
    aggregator whatever its own clock's origin."""
    ref = np.mean([estimates[n] for n, skew in SKEW.items() if skew == 0.0])
    return {n: estimates[n] - ref for n in SKEW}


@pytest.mark.timeout(DURATION + 150)
def test_clock_skew_estimates_differ_by_the_skew(
    skew_run: SkewRun, measured: Callable[[str], None]
) -> None:
    assert set(skew_run.estimates) >= set(SKEW), skew_run.estimates
    rel = _relative(skew_run.estimates)
    errors = {n: rel[n] - SKEW[n] for n in SKEW}
    measured(
        f"{OFFSET_METRIC} relative to the unskewed servers: "
        + ", ".join(f"{n} {v:+.3f}" for n, v in rel.items())
        + f" s (error {', '.join(f'{n} {e:+.3f}' for n, e in errors.items())}; "
        f"tolerance +-{TOLERANCE:g} s)"
    )
    assert all(abs(e) <= TOLERANCE for e in errors.values()), errors


@pytest.mark.timeout(DURATION + 150)
def test_clock_skew_offset_metric_is_the_clock_offset(
    skew_run: SkewRun, measured: Callable[[str], None]
) -> None:
    est = skew_run.estimates
    assert set(est) >= set(SKEW), est
    errors = {n: est[n] - SKEW[n] for n in SKEW}
    measured(
        f"{OFFSET_METRIC}: "
        + ", ".join(f"{n} {est[n]:+.3f}" for n in SKEW)
        + " s (estimate - true: "
        + ", ".join(f"{n} {e:+.3f}" for n, e in errors.items())
        + f"; tolerance -{TOLERANCE:g}..+0.05 s)"
    )
    # an upper bound of the offset: at most the offset (+ a clock read), at least the offset less
    # the fastest delivery seen
    assert all(-TOLERANCE <= e <= 0.05 for e in errors.values()), errors
