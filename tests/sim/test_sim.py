"""The simulator's invariants as property tests (small sizes), and its agreement with the
cluster measurement of docs/consistency.md.

Every run drives the real limiters, agents and aggregator (aggregator/sim.py), so these are also
properties of that code under random delays, orderings, clock skews and failures.
"""

from __future__ import annotations

import math
from dataclasses import replace

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator import sim
from limiter.lease import COLD_START_POLICIES

FAST = settings(
    max_examples=30,
    deadline=None,
    derandomize=True,
    suppress_health_check=[HealthCheck.too_slow],
)


@st.composite
def scenarios(draw: st.DrawFn, *, failures: bool = False) -> tuple[sim.SimConfig, sim.Workload]:
    """A small deployment whose stream is healthy: first grants well within ``degraded_after``
    (report + tick + two capped deliveries + a grant poll < 1 s)."""
    limit = draw(st.integers(5, 40))
    window = draw(st.sampled_from([0.5, 1.0, 2.0]))
    servers = draw(st.integers(1, 4))
    duration = 3 * window + draw(st.floats(0.0, 1.0))
    median = draw(st.sampled_from([0.0, 0.002, 0.01, 0.04]))
    delay = sim.Delay(median, median * draw(st.floats(1.0, 8.0)), cap=0.2)
    skews = tuple(draw(st.lists(st.floats(-0.5, 0.5), min_size=servers, max_size=servers)))
    outages: tuple[sim.AggregatorOutage, ...] = ()
    crashes: tuple[sim.ServerFailure, ...] = ()
    if failures:
        if draw(st.booleans()):
            start = draw(st.floats(0.0, duration))
            outages = (
                sim.AggregatorOutage(
                    start, start + draw(st.floats(0.1, 2.5)), restart=draw(st.booleans())
                ),
            )
        if draw(st.booleans()):
            start = draw(st.floats(0.0, duration))
            end = draw(st.one_of(st.none(), st.floats(start, duration + 1.0)))
            crashes = (sim.ServerFailure(draw(st.integers(0, servers - 1)), start, end),)
    config = sim.SimConfig(
        limit=limit,
        window=window,
        servers=servers,
        duration=duration,
        report_interval=draw(st.sampled_from([0.02, 0.05, 0.1, 0.2])),
        tick=draw(st.sampled_from([0.02, 0.05, 0.1, 0.2])),
        delay=delay,
        skews=skews,
        aggregator_skew=draw(st.sampled_from([0.0, -3.0, 50.0])),
        usage_partitions=draw(st.integers(1, 3)),
        usage_at_tick=draw(st.booleans()),
        grant_poll=draw(st.sampled_from([0.0, 0.05])),
        aggregator_outages=outages,
        server_failures=crashes,
        seed=draw(st.integers(0, 2**16)),
    )
    seed = draw(st.integers(0, 2**16))
    loads = draw(st.lists(st.floats(0.1, 4.0), min_size=1, max_size=4))
    routing = draw(st.sampled_from(["random", "sticky", "spray"]))
    work = sim.poisson(
        np.array(loads) * limit / window, duration, servers, seed=seed, routing=routing
    )
    if draw(st.booleans()):
        work = work + sim.bursty(1, 3.0, limit, window, duration, servers, seed=seed + 1)
    if servers > 1 and draw(st.booleans()):
        work = work + sim.shift(
            2.0, limit, window, duration, servers, at=duration / 2, seed=seed + 2
        )
    return config, work


def lease_and_extra_admissions(r: sim.SimResult) -> tuple[np.ndarray, np.ndarray]:
    k = r.offered.size
    lease = np.bincount(r.clients[r.admitted & (r.source == sim.LEASE)], minlength=k)
    extra = np.bincount(r.clients[r.admitted & (r.source != sim.LEASE)], minlength=k)
    return lease, extra


@FAST
@given(scenarios(failures=True), st.sampled_from(COLD_START_POLICIES))
def test_grants_are_conserved(
    scenario: tuple[sim.SimConfig, sim.Workload], cold_start: str
) -> None:
    """Per client, at the end: tokens granted = delivered to an agent + dropped on the way
    (crashed server) + still in flight; tokens installed in leases (at most those delivered) =
    admitted from leases + released + still held; and what the limiters reported matches what
    the simulator saw them decide."""
    config, work = scenario
    r = sim.simulate(replace(config, cold_start=cold_start), work)
    a = r.accounts
    assert r.conservation_error() == 0.0
    np.testing.assert_array_equal(a.granted, a.delivered + a.dropped + a.in_flight)
    np.testing.assert_array_equal(a.installed, a.admitted + a.released + a.held)
    assert (a.installed <= a.delivered).all()
    if not config.server_failures:
        assert a.dropped.sum() == 0
    lease, extra = lease_and_extra_admissions(r)
    np.testing.assert_array_equal(lease, a.admitted)
    np.testing.assert_array_equal(extra, a.extra)
    assert (a.held >= 0).all()
    assert a.granted.sum() == r.stats["aggregator_tokens_granted"]
    for name in ("agent_malformed", "agent_errors", "aggregator_malformed", "aggregator_errors"):
        assert r.stats[name] == 0, name


@FAST
@given(scenarios(), st.sampled_from(["reject", "wait"]))
def test_strict_lease_mode_never_over_admits(
    scenario: tuple[sim.SimConfig, sim.Workload], cold_start: str
) -> None:
    """No admission outside a lease (cold start ``reject`` or ``wait``, no failures): no window
    of W seconds ever holds more than L, whatever the delays, skews and workload."""
    config, work = scenario
    r = sim.simulate(replace(config, cold_start=cold_start), work)
    assert not (r.admitted & (r.source != sim.LEASE)).any()
    assert r.config.bound() == r.limit
    assert r.worst.max(initial=0) <= r.limit, (r.worst, r.limit)


@FAST
@given(scenarios())
def test_optimistic_cold_start_stays_within_l_plus_n_a(
    scenario: tuple[sim.SimConfig, sim.Workload],
) -> None:
    """The default cold start: at most ``L + N·a`` in any window (docs/consistency.md), and at
    most ``a`` cold-start admissions per window by each server."""
    config, work = scenario
    r = sim.simulate(config, work)
    a = config.allowance
    assert a == max(1, math.floor(0.01 * config.limit))
    assert r.worst.max(initial=0) <= config.limit + config.servers * a
    assert r.worst_by_server(sim.COLD).max(initial=0) <= a
    assert not (r.admitted & (r.source == sim.DEGRADED)).any()


@FAST
@given(scenarios(), st.floats(0.0, 1.0), st.floats(1.5, 3.0))
def test_degraded_share_is_l_over_n_per_server(
    scenario: tuple[sim.SimConfig, sim.Workload], start: float, length: float
) -> None:
    """The aggregator is away: each server admits a client at most ``L/N + c_max`` per window
    outside its leases (c_max = 1), and across the switch any window holds at most
    ``2L + N·c_max + N·a``."""
    config, work = scenario
    start *= config.duration / 2
    outage = sim.AggregatorOutage(start, start + length * config.window)
    r = sim.simulate(replace(config, aggregator_outages=(outage,)), work)
    share = config.limit / config.servers
    assert r.worst_by_server(sim.DEGRADED).max(initial=0) <= share + 1
    assert r.worst.max(initial=0) <= 2 * config.limit + config.servers * (1 + config.allowance)


def test_degraded_mode_happens_and_ends() -> None:
    """The outage really degrades the servers, and the share is used (not vacuous)."""
    config = sim.SimConfig(
        limit=40,
        window=1.0,
        servers=2,
        duration=6.0,
        aggregator_outages=(sim.AggregatorOutage(2, 4),),
    )
    work = sim.uniform(2, 3.0, 40, 1.0, 6.0, 2, seed=1)
    r = sim.simulate(config, work)
    degraded = r.admitted & (r.source == sim.DEGRADED)
    assert degraded.any()
    when = r.decided[degraded]
    # the last grant batch left before the outage (the tick before 2 s)
    assert when.min() >= 2.0 - config.tick + config.degraded - 1e-9
    assert when.max() <= 4.0 + 0.5
    per_server = r.worst_by_server(sim.DEGRADED)
    assert per_server.max() >= 0.7 * 40 / 2  # close to the share L/N = 20
    assert per_server.max() <= 40 / 2 + 1


def test_server_failure_reroutes_and_accounts() -> None:
    config = sim.SimConfig(
        limit=50,
        window=1.0,
        servers=3,
        duration=8.0,
        server_failures=(sim.ServerFailure(0, 2.0, 5.0),),
    )
    work = sim.uniform(3, 2.0, 50, 1.0, 8.0, 3, seed=2)
    r = sim.simulate(config, work)
    down = (r.decided >= 2.0) & (r.decided < 5.0)
    assert not (r.servers[down] == 0).any()
    assert r.stats["rerouted"] > 0
    assert r.conservation_error() == 0.0
    assert r.worst.max() <= config.bound() + config.allowance  # the restart is a new server


def test_wait_cold_start_waits_for_the_lease() -> None:
    config = sim.SimConfig(limit=50, window=1.0, servers=2, duration=3.0, cold_start="wait")
    work = sim.uniform(4, 1.0, 50, 1.0, 3.0, 2, seed=3)
    r = sim.simulate(config, work)
    assert r.stats["parked"] > 0
    waited = r.decided - r.times
    assert waited.max() <= config.wait_timeout + 1e-9
    assert (r.admitted & (waited > 0)).any()  # some waited and got their lease


def test_workloads() -> None:
    w = sim.spray(2.0, 100, 1.0, 5.0, 4, seed=0)
    assert np.bincount(w.servers, minlength=4).min() >= len(w) // 4
    s = sim.shift(2.0, 100, 1.0, 5.0, 4, at=2.0, src=1, dst=3)
    assert set(s.servers[s.times < 2.0].tolist()) == {1}
    assert set(s.servers[s.times >= 2.0].tolist()) == {3}
    b = sim.bursty(3, 2.0, 100, 1.0, 20.0, 2, on=1.0, off=3.0, seed=1)
    assert 0.1 < len(b) / (3 * 200 * 20.0) < 0.5  # on about a quarter of the time
    both = w + s
    assert both.n_clients == 2 and (np.diff(both.times) >= 0).all()
    assert sim.hot_and_tail(200)[:5].tolist() == [5.0, 4.0, 3.0, 2.5, 2.0]
    with pytest.raises(ValueError):
        sim.Simulation(sim.SimConfig(servers=2), sim.spray(1.0, 10, 1.0, 1.0, 3))


def test_metrics_on_a_known_log() -> None:
    times = np.array([0.0, 0.5, 0.99, 1.0, 1.5, 0.2])
    groups = np.array([0, 0, 0, 0, 0, 1])
    assert sim.worst_windows(times, groups, 3, 1.0).tolist() == [3, 1, 0]


# -- agreement with the real cluster ------------------------------------------------------------


def cluster_run(limit: int, window: float) -> sim.SimResult:
    """tests/cluster/test_cluster.py's setup: 4 servers, 200 clients (five hot at 5x..2x, a
    Zipf tail), 30 s, cold-start allowance 0.005, 4 usage partitions, the same schedule."""
    from tests.cluster.harness import make_schedule, multipliers

    schedule = make_schedule(7, multipliers(200), limit / window, 30.0, 4)
    config = sim.SimConfig(
        limit=limit,
        window=window,
        servers=4,
        duration=30.0,
        cold_start_allowance=0.005,
        usage_partitions=4,
        delay=sim.Delay(0.008, 0.05),
    )
    return sim.simulate(config, sim.Workload.from_schedule(schedule))


def test_agrees_with_the_cluster_measurement() -> None:
    """docs/consistency.md measured, on a real broker: worst window 400 (= L); hot clients
    96.0-97.0% of L. The simulator on the same schedule: the same worst window, hot clients
    within 1.5 points, and tests/cluster's own thresholds (docs/simulation.md has the
    comparison in full)."""
    r = cluster_run(400, 10.0)
    assert len(r.times) == 54070  # the very same requests
    assert r.worst.max() <= r.config.bound() == 408
    assert r.worst.max() >= 395
    hot = r.per_window[:5] / 400
    assert (np.abs(hot - np.array([0.970, 0.968, 0.967, 0.961, 0.960])) <= 0.015).all(), hot
    assert (hot >= 0.9).all()
    light = sim.hot_and_tail(200)[r.clients] <= 0.5
    assert r.admitted[light].mean() >= 0.95
    # the real run's agents drained 815 tokens admitted outside leases (cold starts)
    assert abs(r.accounts.extra.sum() - 815) <= 0.1 * 815
    assert r.conservation_error() == 0.0


# -- the local modes: disconnected servers and a static split -----------------------------------


def replay_alone(r: sim.SimResult) -> np.ndarray:
    """Each server's requests, in order, through a standalone local-mode limiter enforcing what
    that server enforces, on that server's clock: the decisions the simulator must reproduce."""
    from limiter import RateLimiter, Request

    c = r.config
    out = np.zeros(r.times.size, dtype=bool)
    now = [0.0]
    for s in range(c.servers):
        skew = c.skews[s] if s < len(c.skews) else 0.0
        lim = RateLimiter(
            c.server_limit, c.window, algorithm=c.local_algorithm, clock=lambda: now[0]
        )
        for i in np.flatnonzero(r.servers == s):
            now[0] = float(r.times[i] + sim.T0) + skew
            out[i] = lim.allow_request(f"client-{r.clients[i]}", Request(now[0]))
    return out


@FAST
@given(
    scenarios(),
    st.sampled_from(["local", "static"]),
    st.sampled_from(["sliding_log", "token_bucket", "gcra", "fixed_window", "sliding_window"]),
)
def test_local_modes_are_independent_local_limiters(
    scenario: tuple[sim.SimConfig, sim.Workload], mode: str, algorithm: str
) -> None:
    """``mode="local"`` / ``"static"``: every server decides alone with the real local-mode
    limiter (``L``, or ``max(1, ⌊L/N⌋)``), exactly as a standalone one fed that server's
    requests would; nothing is granted; no window holds more than ``N`` times what one server
    may admit (``config.bound()``), and with the sliding log no server admits more than its
    limit in any window."""
    config, work = scenario
    config = replace(config, mode=mode, local_algorithm=algorithm)
    r = sim.simulate(config, work)
    assert (r.source == sim.LOCAL).all()
    np.testing.assert_array_equal(r.servers, work.servers)
    np.testing.assert_array_equal(r.admitted, replay_alone(r))
    share = config.limit if mode == "local" else max(1, config.limit // config.servers)
    assert config.server_limit == share
    assert r.worst.max(initial=0) <= config.bound()
    if algorithm == "sliding_log":
        assert r.worst_by_server().max(initial=0) <= share
        assert config.bound() == config.servers * share
    assert r.accounts.granted.sum() == r.accounts.admitted.sum() == 0
    assert r.conservation_error() == 0.0
    assert r.stats["usage_batches"] == r.stats["grant_batches"] == 0
    assert math.isnan(config.predicted_utilisation())


@settings(max_examples=15, deadline=None, derandomize=True)
@given(st.integers(1, 8), st.integers(20, 200), st.data())
def test_disconnected_gives_n_l_and_a_static_split_k_over_n(
    servers: int, limit: int, data: st.DataObject
) -> None:
    """A client offering ``4·N·L`` over every server: disconnected servers admit close
    to ``N·L`` per window, a static split at most ``N·⌊L/N⌋``. A client whose traffic lands on
    ``k`` servers gets at most ``k·⌊L/N⌋`` per window from the static split."""
    window, duration = 1.0, 4.0
    k = data.draw(st.integers(1, servers))
    flood = sim.spray(4.0 * servers, limit, window, duration, servers, seed=limit)
    few = sim.poisson(
        [2.0 * limit / window], duration, servers, seed=limit + 1, routing=tuple(range(k))
    )
    work = flood + few
    assert set(few.servers.tolist()) <= set(range(k))
    base = sim.SimConfig(limit=limit, window=window, servers=servers, duration=duration)
    local = sim.simulate(replace(base, mode="local"), work)
    assert local.worst[0] <= servers * limit
    assert local.per_window[0] >= 0.85 * servers * limit
    static = sim.simulate(replace(base, mode="static"), work)
    share = max(1, limit // servers)
    assert static.worst[0] <= servers * share
    assert static.worst[1] <= k * share
    assert static.per_window[1] >= 0.8 * k * share


def test_local_mode_config() -> None:
    with pytest.raises(ValueError):
        sim.SimConfig(mode="strict")
    with pytest.raises(ValueError):
        sim.SimConfig(mode="local", local_algorithm="leaky")
    assert sim.SimConfig(limit=100, servers=3, mode="static").server_limit == 33
    assert sim.SimConfig(limit=2, servers=3, mode="static").server_limit == 1
    assert sim.SimConfig(limit=100, servers=3, mode="local").bound() == 300
    assert sim.SimConfig(limit=100, servers=3, mode="local", local_algorithm="gcra").bound() == 600
    assert sim.SimConfig(limit=100, servers=3).bound() == 103  # approximate: L + N·a


def test_routing_to_a_set_of_servers() -> None:
    w = sim.poisson([500.0], 2.0, 6, seed=3, routing=(1, 4))
    assert set(w.servers.tolist()) == {1, 4}
    with pytest.raises(ValueError):
        sim.poisson([5.0], 1.0, 4, routing=(1, 4))
    with pytest.raises(ValueError):
        sim.poisson([5.0], 1.0, 4, routing=())


# -- misjudged decisions against the exact sliding log ------------------------------------------


def naive_misjudged(
    times: np.ndarray, clients: np.ndarray, admitted: np.ndarray, limit: int, window: float, n: int
) -> tuple[list[int], list[int]]:
    allowed, limited = [0] * n, [0] * n
    order = sorted(range(times.size), key=lambda i: (times[i], i))
    for pos, i in enumerate(order):
        inside = sum(
            1
            for j in order[:pos]
            if clients[j] == clients[i] and admitted[j] and times[i] - window < times[j]
        )
        if admitted[i] and inside >= limit:
            allowed[clients[i]] += 1
        if not admitted[i] and inside < limit:
            limited[clients[i]] += 1
    return allowed, limited


@settings(max_examples=60, deadline=None, derandomize=True)
@given(
    st.lists(
        st.tuples(st.integers(0, 16), st.integers(0, 2), st.booleans()), min_size=0, max_size=40
    ),
    st.integers(1, 4),
)
def test_misjudged_matches_a_naive_model(log: list[tuple[int, int, bool]], limit: int) -> None:
    """On random logs (times on a grid of quarter seconds, exact in binary, so that ties and
    gaps of exactly one window happen)."""
    times = np.array([t / 4 for t, _, _ in log], dtype=np.float64)
    clients = np.array([c for _, c, _ in log], dtype=np.int64)
    admitted = np.array([a for _, _, a in log], dtype=bool)
    got = sim.misjudged(times, clients, admitted, limit, 1.0, 3)
    want = naive_misjudged(times, clients, admitted, limit, 1.0, 3)
    assert [x.tolist() for x in got] == [want[0], want[1]]


def test_misjudged_on_a_known_log() -> None:
    """L = 2 per 1 s. A fixed window admits 0.9, 0.95, then 1.0 and 1.05 (a new aligned window):
    the last two are wrongly allowed. A refusal at 2.5 with nothing in (1.5, 2.5] is wrongly
    limited; one at 1.06 (two in the window) is not."""
    times = np.array([0.9, 0.95, 1.0, 1.05, 1.06, 2.5])
    admitted = np.array([True, True, True, True, False, False])
    allowed, limited = sim.misjudged(times, np.zeros(6, dtype=np.int64), admitted, 2, 1.0, 1)
    assert allowed.tolist() == [2] and limited.tolist() == [1]


@settings(max_examples=10, deadline=None, derandomize=True)
@given(scenarios())
def test_a_sliding_log_is_never_misjudged(scenario: tuple[sim.SimConfig, sim.Workload]) -> None:
    """One server running the exact sliding log: every decision is the exact rule's, so
    ``misjudged`` finds nothing; the fixed window on boundary bursts is caught over-admitting."""
    config, work = scenario
    one = replace(config, servers=1, skews=(), mode="local", local_algorithm="sliding_log")
    r = sim.simulate(one, replace(work, servers=np.zeros(len(work), dtype=np.int64)))
    allowed, limited = r.misjudged()
    assert allowed.sum() == limited.sum() == 0
    np.testing.assert_array_equal(limited, r.false_rejections)
    w = config.window
    times = np.concatenate(
        (
            np.linspace(w - 0.05 * w, w - 0.01 * w, config.limit),
            np.linspace(w, w + 0.04 * w, config.limit),
        )
    )
    burst = sim.Workload(
        times, np.zeros(times.size, dtype=np.int64), np.zeros(times.size, dtype=np.int64), ("b",)
    )
    fixed = sim.simulate(replace(one, local_algorithm="fixed_window", duration=3 * w), burst)
    assert fixed.worst[0] == 2 * config.limit
    assert fixed.misjudged()[0][0] == config.limit
