"""The simulator with a protected backend (``SimConfig.backend``) and the aggregator's control
plane (``SimConfig.control``): the real controller's factors and breakers reach the simulated
servers, the token account still closes, and the backend model behaves as documented."""

from __future__ import annotations

import math

import numpy as np
import pytest

from aggregator import sim
from aggregator.control import ControlOptions, parse_adaptive, parse_breakers
from aggregator.simbackend import Backend, BackendSpec, Incident

L, W, N, K, D = 50, 1.0, 4, 12, 20.0


def run(backend: BackendSpec, control: ControlOptions | None) -> sim.SimResult:
    config = sim.SimConfig(
        limit=L, window=W, servers=N, duration=D, backend=backend, control=control
    )
    return sim.simulate(config, sim.poisson(np.full(K, 2 * L / W), D, N))


def test_a_failing_backend_trips_the_breaker_on_every_simulated_server() -> None:
    spec = BackendSpec(capacity=2000, incidents=(Incident(6.0, 12.0, errors=1.0),))
    control = ControlOptions(breakers=parse_breakers("backend=backend,trip_after=2,cooldown=2"))
    r = run(spec, control)
    t, state = r.control_t, r.breakers["backend"]
    opened = t[np.argmax(state == 1)]
    assert 6.0 < opened < 8.0 and not (state[t < 6.0]).any()
    assert state[-1] == 0  # closed again after the incident
    broken = r.source == sim.BROKEN
    assert broken.any() and not r.admitted[broken].any()
    assert {int(s) for s in np.unique(r.servers[broken])} == set(range(N))  # every server
    # while open, no server calls the failing backend (a few in-flight decisions aside)
    t_open = t[state == 1]
    calls = ~np.isnan(r.latency)
    during = calls & (r.times > t_open.min() + 0.5) & (r.times < t_open.min() + 1.5)
    assert during.sum() <= 0.02 * calls[(r.times > 2.0) & (r.times < 3.0)].sum()
    assert r.conservation_error() == 0.0
    assert r.stats["agent_errors"] == 0 and r.stats["aggregator_errors"] == 0


def test_adaptive_factors_follow_the_backend_and_stay_within_bounds() -> None:
    spec = BackendSpec(capacity=800, base=0.005, incidents=(Incident(6.0, 11.0, capacity=0.4),))
    policy = "floor=0.25,target_p99=0.15,increase=0.1,decrease=0.7,cooldown=1.5"
    r = run(spec, ControlOptions(adaptive=parse_adaptive(policy)))
    f, t = r.factors["*"], r.control_t
    assert f.min() >= 0.25 and f.max() <= 1.0
    assert (f[t < 6.0] == 1.0).all() and f[(t > 6.0) & (t < 11.0)].min() <= 0.7
    assert f[-1] == 1.0
    assert r.conservation_error() == 0.0


def test_without_a_controller_nothing_changes() -> None:
    spec = BackendSpec(capacity=800)
    r = run(spec, None)
    assert r.factors == {} and r.breakers == {}
    assert np.isnan(r.latency[~r.admitted]).all() and not np.isnan(r.latency[r.admitted]).any()


def test_the_backend_model_slows_down_and_fails_past_capacity() -> None:
    spec = BackendSpec(capacity=100, base=0.01, horizon=1.0)
    b = Backend(spec, seed=1)
    light = [b.call(i / 50)[0] for i in range(200)]  # 50 calls/s: rho 0.5
    assert np.mean(light) == pytest.approx(0.02, rel=0.25)
    heavy = Backend(spec, seed=2)
    outcomes = [heavy.call(i / 400) for i in range(2000)]  # 400 calls/s: rho 4
    failed = 1 - np.mean([ok for _, ok in outcomes[800:]])
    assert failed == pytest.approx(0.75, abs=0.05)  # 1 - 1/rho
    assert Backend.p99_at(spec, 50) == pytest.approx(0.02 * math.log(100))
