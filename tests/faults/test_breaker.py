"""A protected backend fails, real processes on the real broker: two ``drl aggregator run`` with
``--breaker`` (each owning one usage partition) and three app servers (tests/faults/breaker_node.py)
that call the backend through ``agent.breaker("db")``. The breaker must open on every server
within a couple of control intervals of each other, stop their calls while open, half-open
after the cool-down and close on all of them once the backend answers again."""

from __future__ import annotations

import json
import sys
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from tests.cluster.harness import Cluster

from .common import group_name

pytestmark = [pytest.mark.integration, pytest.mark.slow]

NODE = Path(__file__).with_name("breaker_node.py")
SERVERS = 3
DURATION = 18.0
FAIL = (4.0, 10.0)  # seconds into the run
COOLDOWN = 2.0
CONTROL_INTERVAL = 0.25
BREAKER = (
    f"backend=db,error_rate=0.5,min_requests=20,trip_after=2,cooldown={COOLDOWN},close_after=2"
)


def start_node(cluster: Cluster, name: str, start_at: float) -> None:
    cluster._spawn(
        name,
        [
            sys.executable,
            str(NODE),
            "--bootstrap",
            cluster.bootstrap,
            "--server-id",
            name,
            "--usage-topic",
            cluster.usage_topic,
            "--grants-topic",
            cluster.grants_topic,
            "--start-at",
            str(start_at),
            "--duration",
            str(DURATION),
            "--fail-from",
            str(FAIL[0]),
            "--fail-until",
            str(FAIL[1]),
            "--out",
            str(cluster.workdir / f"{name}.json"),
        ],
    )


def first(transitions: list[tuple[float, str]], state: str, after: float) -> float:
    return next((t for t, s in transitions if s == state and t >= after), float("inf"))


@pytest.mark.timeout(DURATION + 150)
def test_a_failing_backend_opens_the_breaker_on_every_server(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    make_cluster: Callable[..., Cluster],
    measured: Callable[[str], None],
) -> None:
    cluster = make_cluster(kafka_bootstrap, unique_topic(2), unique_topic(2), 1000, 1.0)
    group = group_name()
    extra = ["--breaker", BREAKER, "--control-interval", str(CONTROL_INTERVAL)]
    aggs = [cluster.start_aggregator(f"agg-{i}", group=group, extra=extra) for i in range(2)]
    deadline = time.monotonic() + 90
    while not all(cluster.assigned(f"agg-{i}") for i in range(2)):
        assert time.monotonic() < deadline, cluster.tail("agg-0") + cluster.tail("agg-1")
        time.sleep(0.2)
    start_at = time.time() + 4.0
    names = [f"web-{s}" for s in range(SERVERS)]
    for name in names:
        start_node(cluster, name, start_at)
    for name in names:
        assert cluster.by_name[name].wait(DURATION + 60) == 0, cluster.tail(name)
    for i, agg in enumerate(aggs):
        assert cluster.stop(agg) == 0, cluster.tail(f"agg-{i}")
    fail_from, fail_until = start_at + FAIL[0], start_at + FAIL[1]
    out = {n: json.loads((cluster.workdir / f"{n}.json").read_text()) for n in names}
    opened = {n: first(o["transitions"], "open", fail_from) for n, o in out.items()}
    half = {n: first(o["transitions"], "half_open", opened[n]) for n, o in out.items()}
    closed = {n: first(o["transitions"], "closed", fail_until) for n, o in out.items()}
    spread = max(opened.values()) - min(opened.values())
    measured(
        f"breaker: opened {min(opened.values()) - fail_from:.2f}–"
        f"{max(opened.values()) - fail_from:.2f} s after the backend began failing "
        f"(spread over {SERVERS} servers {spread:.3f} s), half-open "
        f"{min(half.values()) - min(opened.values()):.2f} s after opening, closed on all "
        f"{max(closed.values()) - fail_until:.2f} s after it recovered; calls refused "
        + ", ".join(f"{n}: {o['calls']['refused']}" for n, o in out.items())
    )
    for name, o in out.items():
        # no state before the failure but closed (nothing opened early)
        assert all(s == "closed" for t, s in o["transitions"] if t < fail_from), (name, o)
        assert o["stats"]["control_messages"] > 0 and o["stats"]["errors"] == 0
        assert o["calls"]["refused"] > 0
    # trip_after=2 samples of 0.25 s (+ a health interval, + delivery): open on all within 2 s
    assert max(opened.values()) - fail_from < 2.0
    assert spread < 2 * CONTROL_INTERVAL + 0.3  # all servers open together
    for name in names:
        assert half[name] - opened[name] >= COOLDOWN - CONTROL_INTERVAL - 0.3
        assert closed[name] < start_at + DURATION
