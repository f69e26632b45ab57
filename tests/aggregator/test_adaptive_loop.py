"""Adaptive limits end to end on the in-process bus: real limiters, agents with backend
monitors, a real aggregator with a controller, one fake clock, and a simulated backend whose
latency rises with load (``aggregator.simbackend``). During an incident that cuts the backend's
capacity, the fleet's admitted rate must come down within a few ticks and climb back after,
the factor staying within ``[floor, 1]``, each client within ``[floor x L, L]`` per window."""

from __future__ import annotations

import math
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest

from aggregator.adaptive import AdaptiveOptions
from aggregator.control import Controller, ControlOptions
from aggregator.service import Aggregator, AggregatorConfig
from aggregator.simbackend import Backend, BackendSpec, Incident
from limiter import Policy, RateLimiter
from limiter.keylimits import FixedKeyLimits, KeyLimits, ScaledKeyLimits
from producer.agent import Agent
from producer.health import BackendMonitor
from producer.transport import USAGE_TOPIC, InProcessBus

T0 = 1000.0
L, W = 30, 1.0  # per client
SERVERS, CLIENTS = 3, 12
FLOOR = 0.3
INCIDENT = (6.0, 14.0)
DURATION = 22.0
TICK = 0.1
DT = 0.005
TARGET = 0.15
POLICY = AdaptiveOptions(
    floor=FLOOR, target_p99=TARGET, increase=0.05, decrease=0.7, cooldown=1.5, min_requests=20
)


@dataclass
class Run:
    admitted: list[tuple[float, int]] = field(default_factory=list)  # (time, client)
    factor: list[tuple[float, float]] = field(default_factory=list)  # aggregator, per tick
    server_factor: list[tuple[float, float]] = field(default_factory=list)  # server 0
    header_limit: list[tuple[float, int]] = field(default_factory=list)  # Decision.limit
    latency: list[tuple[float, float]] = field(default_factory=list)

    def rate(self, start: float, end: float) -> float:
        """Fleet admissions per second in [start, end)."""
        return sum(start <= t < end for t, _ in self.admitted) / (end - start)

    def first(
        self, series: list[tuple[float, float]], after: float, test: Callable[[float], bool]
    ) -> float:
        return next((t for t, v in series if t >= after and test(v)), math.inf)

    def per_window(self, client: int, step: float = 0.1) -> np.ndarray:
        """The client's admissions in (t - W, t] every ``step`` from W."""
        ts = np.array(sorted(t for t, c in self.admitted if c == client))
        grid = np.arange(W, DURATION, step)
        return np.searchsorted(ts, grid, side="right") - np.searchsorted(ts, grid - W, side="right")


def simulate(control: ControlOptions | None, seed: int = 0) -> Run:
    rng = np.random.default_rng(seed)
    clock = [T0]
    bus = InProcessBus()
    agg = Aggregator(
        AggregatorConfig(Policy(L, W), tick=TICK, aggregator_id="agg"),
        bus,
        clock=lambda: clock[0],
        control=None if control is None else Controller(control, "agg"),
    )
    usage = bus.receiver(USAGE_TOPIC, group="test")
    limiters, agents = [], []
    for s in range(SERVERS):
        limiter = RateLimiter(
            L,
            W,
            mode="approximate",
            clock=lambda: clock[0],
            limits=ScaledKeyLimits(FixedKeyLimits(KeyLimits.uniform(L))),
        )
        limiters.append(limiter)
        agents.append(Agent(limiter, bus, f"web-{s}", monitor=BackendMonitor()))
    backend = Backend(
        BackendSpec(capacity=500, base=0.005, incidents=(Incident(*INCIDENT, capacity=0.4),)), seed
    )
    run = Run()
    per_tick = round(TICK / DT)
    offered = 2 * L / W * DT  # each client offers twice its limit
    for step in range(round(DURATION / DT)):
        t = step * DT
        clock[0] = T0 + t
        if step % per_tick == 0:
            for agent in agents:
                agent.report_once()
            for record in usage.poll(0):
                agg.handle(record)
            agg.tick()
            if agg.control is not None:
                run.factor.append((t, agg.control.factors()["*"]))
                run.server_factor.append((t, agents[0].factors().get("*", 1.0)))
        for agent in agents:
            agent.receive_once(0)
        for c in np.flatnonzero(rng.random(CLIENTS) < offered):
            s = int(rng.integers(SERVERS))
            decision = limiters[s].check(f"client-{c}")
            if c == 0 and step % per_tick == 0:
                run.header_limit.append((t, decision.limit))
            if decision.allowed:
                run.admitted.append((t, int(c)))
                latency, ok = backend.call(t)
                run.latency.append((t, latency))
                agents[s].monitor.observe("db", latency, ok)  # type: ignore[union-attr]
    return run


@pytest.fixture(scope="module")
def adaptive() -> Run:
    return simulate(ControlOptions(adaptive=(POLICY,)))


@pytest.fixture(scope="module")
def static() -> Run:
    return simulate(None)


def p99(run: Run, start: float, end: float) -> float:
    return float(np.percentile([x for t, x in run.latency if start <= t < end], 99))


def over_target(run: Run, start: float, end: float) -> float:
    """The share of the backend calls in [start, end) slower than the target p99."""
    return float(np.mean([x > TARGET for t, x in run.latency if start <= t < end]))


def test_the_fleet_backs_off_within_a_few_ticks_and_recovers(
    adaptive: Run, static: Run, measured: Callable[[str], None]
) -> None:
    start, end = INCIDENT
    before = adaptive.rate(2.0, start)
    cut = adaptive.first(adaptive.factor, start, lambda f: f < 1.0) - start
    during = adaptive.rate(start + 1.0, end)
    back = adaptive.first(adaptive.factor, end, lambda f: f >= 1.0) - end
    after = adaptive.rate(DURATION - 3.0, DURATION)
    slow, slow_static = over_target(adaptive, start + 2, end), over_target(static, start + 2, end)
    measured(
        f"adaptive loop: admitted {before:.0f}/s before the incident; first cut {cut:.2f} s "
        f"({cut / TICK:.0f} ticks) into it; {during:.0f}/s during it (static limits: "
        f"{static.rate(start + 1.0, end):.0f}/s); factor back to 1 {back:.2f} s after it; "
        f"{after:.0f}/s in the last 3 s"
    )
    measured(
        f"adaptive loop: calls over the {TARGET} s target during the incident {slow:.1%} "
        f"(static limits {slow_static:.1%}); p99 {p99(adaptive, start + 2, end):.3f} s "
        f"(static {p99(static, start + 2, end):.3f} s)"
    )
    assert cut <= 1.0  # the first control step after the incident's first health reports
    assert during < 0.7 * before
    assert slow < 0.25 * slow_static
    assert back <= 8.0 and after >= 0.85 * before


def test_the_factor_stays_within_floor_and_ceiling_and_servers_see_it(adaptive: Run) -> None:
    factors = [f for _, f in adaptive.factor]
    assert min(factors) >= FLOOR and max(factors) <= 1.0 and min(factors) < 0.7
    # the servers got the same factors (one control message later) ...
    low = min(f for _, f in adaptive.server_factor)
    assert low == pytest.approx(min(factors), abs=1e-6)
    # ... and the header's limit (Decision.limit) follows the effective limit
    limits = {lim for _, lim in adaptive.header_limit}
    assert max(limits) == L and min(limits) == pytest.approx(L * min(factors), abs=1.0)


def test_the_fleet_stays_between_floor_and_ceiling(adaptive: Run) -> None:
    """Per client, never above the healthy bound ``L + N·a`` in a window; fleet-wide, over any
    two windows, never below the floor's share of what the limits let through before (a cut
    stalls a client until its window drains below the new limit: shorter spans dip lower)."""
    bound = L + SERVERS * max(1, math.floor(0.01 * L))
    for c in range(CLIENTS):
        assert adaptive.per_window(c).max() <= bound
    before = adaptive.rate(2.0, INCIDENT[0])
    lowest = min(adaptive.rate(t, t + 2 * W) for t in np.arange(2.0, DURATION - 2 * W, TICK))
    assert lowest >= FLOOR * before
