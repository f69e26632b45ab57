"""The server side of backend health (``producer.health``): the monitor against a plain count,
the histogram quantile against numpy, the breaker gate's probe share, and how the control
messages of several aggregators combine."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from producer import wire
from producer.health import (
    MAX_BACKENDS,
    BackendMonitor,
    ControlView,
    latency_bucket,
    quantile,
)
from producer.wire import LATENCY_EDGES, BreakerInfo, ControlMessage

FAST = settings(deadline=None, max_examples=80, suppress_health_check=[HealthCheck.too_slow])


class Clock:
    def __init__(self) -> None:
        self.t = 100.0

    def __call__(self) -> float:
        return self.t


def reference_bucket(seconds: float) -> int:
    """Linear scan of the documented rule: bucket i holds EDGES[i-1] <= x < EDGES[i]."""
    for i, edge in enumerate(LATENCY_EDGES):
        if seconds < edge:
            return i
    return len(LATENCY_EDGES)


calls = st.lists(
    st.tuples(
        st.sampled_from(["db", "cache", "search"]),
        st.floats(0.0, 500.0, allow_nan=False),
        st.booleans(),
    ),
    max_size=200,
)


@FAST
@given(calls)
def test_the_monitor_counts_like_a_plain_tally(observed: list[tuple[str, float, bool]]) -> None:
    monitor = BackendMonitor()
    expected: dict[str, tuple[int, int, list[int]]] = {}
    for name, seconds, ok in observed:
        monitor.observe(name, seconds, ok)
        r, e, lat = expected.setdefault(name, (0, 0, [0] * wire.LATENCY_BUCKETS))
        lat[reference_bucket(seconds)] += 1
        expected[name] = (r + 1, e + (not ok), lat)
    drained = {b.name: (b.requests, b.errors, list(b.latency)) for b in monitor.drain()}
    assert drained == expected
    assert all(b.requests == 0 and not any(b.latency) for b in monitor.drain())


def test_saturation_callables_are_read_at_the_drain_and_clipped() -> None:
    readings = iter([0.4, 7.0, math.nan])

    def broken() -> float:
        raise RuntimeError("no reading")

    monitor = BackendMonitor({"db": lambda: next(readings)})
    monitor.watch("queue", broken)
    first = {b.name: b.saturation for b in monitor.drain()}
    assert first["db"] == 0.4 and math.isnan(first["queue"])
    assert {b.name: b.saturation for b in monitor.drain()}["db"] == 1.0  # clipped
    assert math.isnan({b.name: b.saturation for b in monitor.drain()}["db"])
    assert monitor.watch_errors == 4  # the raising callable at each of 3 drains, and one NaN


def test_backends_beyond_the_bound_are_dropped_not_grown() -> None:
    monitor = BackendMonitor()
    for i in range(MAX_BACKENDS + 5):
        monitor.observe(f"b{i}", 0.01)
    assert len(monitor.backends) == MAX_BACKENDS and monitor.dropped == 5


@FAST
@given(st.floats(0.0, 1e3, allow_nan=False))
def test_latency_bucket_is_the_documented_one(seconds: float) -> None:
    assert latency_bucket(seconds) == reference_bucket(seconds)


@FAST
@given(
    st.lists(st.floats(2e-4, 50.0, allow_nan=False), min_size=1, max_size=300),
    st.sampled_from([0.5, 0.9, 0.99]),
)
def test_the_quantile_is_within_one_bucket_of_the_truth(samples: list[float], q: float) -> None:
    counts = [0] * wire.LATENCY_BUCKETS
    for x in samples:
        counts[latency_bucket(x)] += 1
    estimate = quantile(counts, q)
    ordered = sorted(samples)
    truth = ordered[max(0, math.ceil(q * len(samples)) - 1)]  # the sample of rank ceil(q n)
    width = 10**0.1
    assert truth / width <= estimate <= truth * width


def test_quantile_of_nothing_is_nan() -> None:
    assert math.isnan(quantile([0] * wire.LATENCY_BUCKETS, 0.99))


def control(
    agg: str,
    seq: int,
    *,
    factors: tuple[tuple[str, float], ...] = (),
    breakers: tuple[BreakerInfo, ...] = (),
    ttl: float = 1.5,
) -> ControlMessage:
    return ControlMessage(agg, 1, seq, 0.0, ttl, factors, breakers)


def test_the_most_restrictive_fresh_aggregator_wins_and_stale_state_lapses() -> None:
    clock = Clock()
    seen: list[dict[str, float]] = []
    view = ControlView(clock, seen.append)
    gate = view.gate("db")
    assert gate.allow() and gate.current() == "closed"
    view.apply(control("a", 1, factors=(("*", 0.8),), breakers=(BreakerInfo("db", 0, 0.1, 0),)))
    view.apply(
        control(
            "b", 1, factors=(("*", 0.5), ("free", 1.0)), breakers=(BreakerInfo("db", 1, 0.1, 3),)
        )
    )
    assert view.factors() == {"*": 0.5} and seen[-1] == {"*": 0.5}
    assert gate.current() == "open" and not gate.allow() and gate.refused == 1
    assert gate.retry_after() == pytest.approx(3.0)
    assert not view.apply(control("b", 1))  # a duplicate
    clock.t += 1.0
    view.apply(control("a", 2, factors=(("*", 0.9),), breakers=(BreakerInfo("db", 2, 0.25, 0),)))
    assert gate.current() == "open"  # b's message is still fresh
    clock.t += 0.6  # b's lapsed (1.5 s), a's is fresh
    view.refresh()
    assert view.factors() == {"*": 0.9} and gate.current() == "half_open"
    allowed = [gate.allow() for _ in range(8)]
    assert sum(allowed) == 2  # a quarter of the calls, evenly
    clock.t += 2.0  # every message lapsed: factor 1, closed
    view.refresh()
    assert view.factors() == {} and seen[-1] == {} and gate.allow()


@FAST
@given(st.floats(0.01, 1.0), st.integers(1, 400))
def test_half_open_lets_the_probe_share_through(probe: float, n: int) -> None:
    clock = Clock()
    view = ControlView(clock)
    view.apply(control("a", 1, breakers=(BreakerInfo("db", 2, probe, 0),), ttl=10))
    gate = view.gate("db")
    allowed = sum(gate.allow() for _ in range(n))
    p32 = float(np.float32(probe))
    assert math.floor(n * p32 - 1e-6) <= allowed <= math.floor(n * p32 + 1e-6) + 1
