"""Decision metrics (``metrics=True``): counts by outcome, sampled latency, the collector."""

from __future__ import annotations

import threading

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from limiter import RateLimiter, Request
from limiter.metrics import LATENCY_BUCKETS, DecisionMetrics, LimiterCollector


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def scrape(*limiters: object) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    registry = CollectorRegistry()
    registry.register(LimiterCollector(list(limiters)))  # type: ignore[arg-type]
    out = {}
    for family in text_string_to_metric_families(generate_latest(registry).decode()):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


@settings(deadline=None, max_examples=30)
@given(
    limit=st.integers(1, 20),
    calls=st.lists(st.sampled_from(["allow", "check"]), max_size=60),
    every=st.sampled_from([1, 2, 8, 64]),
)
def test_counts_match_the_decisions_and_the_sample_rate(
    limit: int, calls: list[str], every: int
) -> None:
    clock = Clock()
    limiter = RateLimiter(limit, 60, clock=clock, metrics=DecisionMetrics(every))
    want = {True: 0, False: 0}
    for kind in calls:
        ok = (
            limiter.allow_request("c", Request(clock.t))
            if kind == "allow"
            else limiter.check("c").allowed
        )
        want[ok] += 1
    m = limiter.metrics
    assert m is not None
    assert (m.allowed, m.denied) == (want[True], want[False])
    assert want[True] == min(limit, len(calls))
    samples = scrape(limiter)
    assert (
        samples[("drl_decisions_total", (("mode", "local"), ("outcome", "allowed")))] == want[True]
    )
    assert (
        samples[("drl_decisions_total", (("mode", "local"), ("outcome", "denied")))] == want[False]
    )
    timed = samples[("drl_decision_latency_seconds_count", (("mode", "local"),))]
    assert timed == -(-len(calls) // every)  # calls number 0, every, 2*every, ... are timed
    inf = samples[("drl_decision_latency_seconds_bucket", (("le", "+Inf"), ("mode", "local")))]
    assert inf == timed
    assert samples[("drl_limiter_clients", (("mode", "local"),))] == (1 if calls else 0)


def test_histogram_buckets_are_cumulative_and_sum_is_seconds() -> None:
    m = DecisionMetrics(1)
    for ns in (100, 700, 3_000, 40_000_000, 10**9):
        m.observe_ns(ns)
    buckets, total = m.histogram()
    assert len(buckets) == len(LATENCY_BUCKETS) + 1 and sum(buckets) == 5
    assert buckets[0] == 1 and buckets[1] == 1 and buckets[-1] == 1  # 0.1 µs, 0.7 µs, 1 s
    assert total == pytest.approx((100 + 700 + 3_000 + 40_000_000 + 10**9) / 1e9)
    limiter = RateLimiter(1, 1, metrics=m)
    samples = scrape(limiter)
    le = {
        dict(k[1])["le"]: v
        for k, v in samples.items()
        if k[0] == "drl_decision_latency_seconds_bucket"
    }
    assert le["5e-07"] == 1 and le["1e-06"] == 2 and le["5e-06"] == 3 and le["+Inf"] == 5


def test_no_lost_counts_under_threads() -> None:
    limiter = RateLimiter(1000, 60, metrics=True, max_request_age=None, max_clock_skew=None)
    per_thread = 4000

    def hammer(i: int) -> None:
        for n in range(per_thread):
            limiter.allow_request(f"c{(i * 7 + n) % 50}", Request(1000.0))

    threads = [threading.Thread(target=hammer, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    m = limiter.metrics
    assert m is not None
    # 640 requests per client, all under its limit of 1000: every one allowed, none lost
    assert (m.allowed, m.denied) == (8 * per_thread, 0)


def test_off_by_default_and_bad_options() -> None:
    limiter = RateLimiter(5, 1)
    assert limiter.metrics is None and limiter.mode == "local"
    with pytest.raises(ValueError, match="metrics=True"):
        LimiterCollector(limiter)
    with pytest.raises(ValueError, match="power of two"):
        DecisionMetrics(3)
    with pytest.raises(ValueError, match="power of two"):
        DecisionMetrics(0)
    with pytest.raises(ValueError, match="metrics must be"):
        RateLimiter(5, 1, metrics="yes")  # type: ignore[arg-type]


def test_limiters_of_one_mode_are_summed() -> None:
    clock = Clock()
    a = RateLimiter(2, 60, clock=clock, metrics=True)
    b = RateLimiter(2, 60, clock=clock, metrics=True)
    for _ in range(3):
        a.allow_request("x", Request(clock.t))
        b.allow_request("y", Request(clock.t))
    samples = scrape(a, b)
    assert samples[("drl_decisions_total", (("mode", "local"), ("outcome", "allowed")))] == 4
    assert samples[("drl_decisions_total", (("mode", "local"), ("outcome", "denied")))] == 2
    assert samples[("drl_limiter_clients", (("mode", "local"),))] == 2
