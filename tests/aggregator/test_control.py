"""The aggregator's control plane (``aggregator.control``): health reports folded in once, the
step every interval, factors applied to the limits granted by, breakers shipped."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator.adaptive import AdaptiveOptions
from aggregator.breaker import BreakerOptions
from aggregator.control import Controller, ControlOptions
from aggregator.service import Aggregator, AggregatorConfig
from limiter import Policy
from producer import wire
from producer.health import latency_bucket
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC, InProcessBus, Record

WALL = 1_700_000_000.0


def report(
    server: str,
    seq: int,
    *,
    calls: int = 100,
    errors: int = 0,
    latency: float = 0.01,
    saturation: float = math.nan,
    backend: str = "db",
    incarnation: int = 1,
) -> wire.HealthReport:
    hist = [0] * wire.LATENCY_BUCKETS
    hist[latency_bucket(latency)] = calls
    b = wire.BackendHealth(backend, calls, errors, saturation, tuple(hist))
    return wire.HealthReport(server, incarnation, seq, 0.0, 0.25, (b,))


def test_each_report_counts_once_whatever_the_partitions_and_old_ones_not_at_all() -> None:
    c = Controller(ControlOptions(breakers=(BreakerOptions(),)), "agg")
    assert c.observe(report("s1", 1), WALL, WALL)
    assert not c.observe(report("s1", 1), WALL, WALL)  # the copy on another partition
    assert c.observe(report("s1", 1, incarnation=2), WALL, WALL)  # a restarted server
    assert not c.observe(report("s2", 1), WALL - 60, WALL)  # a rebuild's replay
    assert (c.stats.health_reports, c.stats.health_duplicates, c.stats.health_stale) == (2, 1, 1)
    message = c.step(0.0)
    assert message is not None
    assert c.signals()["db"].requests == 200


def test_the_step_runs_every_interval_and_merges_the_fleet() -> None:
    o = ControlOptions(
        adaptive=(AdaptiveOptions(target_p99=0.1, decrease=0.5, floor=0.2, cooldown=0.0),),
        interval=0.5,
    )
    c = Controller(o, "agg")
    scaled = c.wrap(None, 100)
    for i in range(10):  # 10 servers: 9 fast, one slow: the fleet's p99 is the slow one's
        c.observe(report(f"s{i}", 1, latency=0.5 if i == 0 else 0.005, calls=100), WALL, WALL)
    m = c.step(10.0)
    assert m is not None and m.factors == (("*", 0.5),) and m.ttl == pytest.approx(1.5)
    assert c.signals()["db"].p99 > 0.1
    assert scaled.current().default == 50  # the limits granted by moved at once
    assert c.step(10.2) is None  # not yet
    m = c.step(10.5)  # no reports: nobody uses the backend, the factor climbs
    assert m is not None and m.factors == (("*", 0.55),) and m.seq == 2


def test_no_controller_no_messages_and_nothing_configured_nothing_sent() -> None:
    assert Controller(ControlOptions(), "agg").step(0.0) is None


def test_a_star_breaker_covers_every_backend_seen_and_named_ones_win() -> None:
    o = ControlOptions(
        breakers=(
            BreakerOptions(backend="*", trip_after=1, min_requests=10),
            BreakerOptions(backend="search", trip_after=5),
        )
    )
    c = Controller(o, "agg")
    c.observe(report("s1", 1, errors=90, backend="db"), WALL, WALL)
    c.observe(report("s1", 2, errors=90, backend="search"), WALL, WALL)
    m = c.step(0.0)
    assert m is not None
    states = {b.name: wire.BREAKER_STATES[b.state] for b in m.breakers}
    assert states == {"db": "open", "search": "closed"}
    assert {b.name: b.retry_after for b in m.breakers}["db"] == pytest.approx(5.0)
    assert c.breakers() == {"db": "open", "search": "closed"}


def test_bad_control_options_are_refused() -> None:
    with pytest.raises(ValueError):
        ControlOptions(interval=0.0)
    with pytest.raises(ValueError, match="two breakers"):
        ControlOptions(breakers=(BreakerOptions(), BreakerOptions()))


def _record(value: bytes, partition: int = 0) -> Record:
    return Record(USAGE_TOPIC, partition, 0, WALL, value)


def test_the_aggregator_feeds_its_controller_and_sends_control_everywhere() -> None:
    bus = InProcessBus({USAGE_TOPIC: 2, GRANTS_TOPIC: 3})
    grants = bus.receiver(GRANTS_TOPIC, partitions=[0, 1, 2])
    clock = [100.0]
    o = ControlOptions(adaptive=(AdaptiveOptions(target_p99=0.1, cooldown=0.0),), interval=0.1)
    agg = Aggregator(
        AggregatorConfig(Policy(100, 1.0), aggregator_id="agg"),
        bus,
        clock=lambda: clock[0],
        wall=lambda: WALL,
        control=Controller(o, "agg"),
    )
    data = wire.encode_health(report("s1", 1, latency=1.0))
    assert agg.handle(_record(data, 0)) and not agg.handle(_record(data, 1))
    assert agg.stats.malformed == 0
    agg.tick()
    records = grants.poll(0)
    assert sorted(r.partition for r in records) == [0, 1, 2]
    controls = [wire.decode_control(r.value) for r in records]
    assert all(c.factors[0][0] == "*" and c.factors[0][1] == pytest.approx(0.7) for c in controls)
    key = np.array([12345], dtype=np.uint64)
    assert agg.limits is not None and agg.limits.current().lookup(key)[0] == pytest.approx(70)


def test_without_a_controller_health_reports_are_skipped_quietly() -> None:
    agg = Aggregator(AggregatorConfig(Policy(100, 1.0), aggregator_id="agg"), InProcessBus())
    assert not agg.handle(_record(wire.encode_health(report("s1", 1))))
    assert agg.stats.malformed == 0


def test_the_control_plane_shows_in_both_collectors() -> None:
    from prometheus_client import CollectorRegistry, generate_latest

    from aggregator.metrics import AggregatorCollector, parse_exposition
    from limiter import RateLimiter
    from limiter.keylimits import FixedKeyLimits, KeyLimits, ScaledKeyLimits
    from producer.agent import Agent
    from producer.metrics import AgentCollector

    bus = InProcessBus()
    o = ControlOptions(
        adaptive=(AdaptiveOptions(target_p99=0.1, cooldown=0.0),),
        breakers=(BreakerOptions(trip_after=1, min_requests=10),),
    )
    agg = Aggregator(
        AggregatorConfig(Policy(30, 1.0), aggregator_id="agg"),
        bus,
        wall=lambda: WALL,
        control=Controller(o, "agg"),
    )
    clock = [1000.0]
    limiter = RateLimiter(
        30,
        1.0,
        mode="approximate",
        clock=lambda: clock[0],
        limits=ScaledKeyLimits(FixedKeyLimits(KeyLimits.uniform(30))),
    )
    agent = Agent(limiter, bus, "web-1")
    agg.handle(_record(wire.encode_health(report("web-1", 1, errors=80, latency=0.3))))
    agg.tick()
    agent.receive_once(0)
    registry = CollectorRegistry()
    registry.register(AggregatorCollector(agg))
    registry.register(AgentCollector(agent))
    m = parse_exposition(generate_latest(registry).decode())
    assert m[("drl_aggregator_adaptive_factor", (("scope", "*"),))] == pytest.approx(0.7)
    assert m[("drl_aggregator_breaker_state", (("backend", "db"),))] == 1.0
    assert m[("drl_aggregator_backend_error_ratio", (("backend", "db"),))] == pytest.approx(0.8)
    assert m[("drl_aggregator_backend_p99_seconds", (("backend", "db"),))] > 0.1
    assert m[("drl_aggregator_health_reports_total", ())] == 1
    sid = ("server_id", "web-1")
    assert m[("drl_agent_adaptive_factor", (("scope", "*"), sid))] == pytest.approx(0.7)
    assert m[("drl_agent_breaker_state", (("backend", "db"), sid))] == 1.0
    assert m[("drl_agent_control_messages_total", (sid,))] == 1
    # the limiter follows: its next drain looks the limits up again, Decision.limit shows it
    agent.report_once()
    assert limiter.check("alice").limit == 21
    assert not agent.breaker("db").allow()
