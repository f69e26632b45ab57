"""``allow_request`` writes each algorithm's cost-1 step out inline, twice: in the pure-Python
closure (limiter/ratelimiter.py) and in the compiled request path (limiter/_requestpath.c). These
tests hold every copy, on both paths, to the algorithm's own ``consume()``, which ``check()``
calls."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from paths import PATHS, request_path, uses
from test_algorithms_properties import ALGOS, make_limiter

from limiter import RateLimiter, Request, compiled
from limiter.keys import client_key
from limiter.lease import LeaseOptions


def test_the_compiled_path_is_built_and_used_unless_turned_off() -> None:
    assert compiled.built(), "limiter/_requestpath.c did not build (see setup.py)"
    for path in PATHS:
        with request_path(path):
            for algorithm in ALGOS:
                assert uses(RateLimiter(5, 1.0, algorithm=algorithm), path), (path, algorithm)
            assert uses(RateLimiter(5, 1.0, mode="approximate"), path)
    # several policies, or a cold start that waits: the closure, always
    assert uses(RateLimiter.from_rates("5/second; 100/hour"), "python")
    waits = LeaseOptions(cold_start="wait")
    assert uses(RateLimiter(5, 1.0, mode="approximate", lease_options=waits), "python")


@st.composite
def runs(draw: st.DrawFn) -> tuple[str, int, float, int | None, list[tuple[int, float]]]:
    algorithm = draw(st.sampled_from(ALGOS))
    limit = draw(st.integers(1, 8))
    window = draw(st.sampled_from([0.5, 1.0, 3.0, 10.0, 100.0]))
    burst = draw(st.none() | st.integers(1, 10)) if algorithm in ("gcra", "token_bucket") else None
    t0 = draw(st.sampled_from([0.0, 1000.0, 1_700_000_000.0]))
    steps = st.one_of(
        st.just(0.0),
        st.integers(1, 256).map(lambda k: k / 256),
        st.integers(-64, -1).map(lambda k: k / 64),  # late
        st.just(window),
        st.sampled_from([300.0, 900.0, -400.0]),  # moves sliding-log origins, or before them
    )
    reqs = draw(st.lists(st.tuples(st.integers(0, 3), steps), min_size=1, max_size=80))
    times, t = [], t0
    for client, dt in reqs:
        t += dt
        times.append((client, t))
    return algorithm, limit, window, burst, times


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=300, deadline=None)
@given(runs())
def test_allow_request_decides_as_consume(
    path: str, run: tuple[str, int, float, int | None, list[tuple[int, float]]]
) -> None:
    algorithm, limit, window, burst, times = run
    with request_path(path):
        inline = make_limiter(algorithm, limit, window, burst)
    assert uses(inline, path)
    called = make_limiter(algorithm, limit, window, burst)
    for client, t in times:
        cid = f"c{client}"
        got = inline.allow_request(cid, Request(t))
        assert got == called.check(cid, now=t).allowed, (cid, t)
    for client in range(4):
        cid = f"c{client}"
        assert inline.peek(cid, now=t) == called.peek(cid, now=t)


@pytest.mark.parametrize("path", PATHS)
@settings(max_examples=150, deadline=None)
@given(
    leases=st.lists(st.integers(0, 6), min_size=4, max_size=4),
    expiry=st.sampled_from([0.5, 2.0]),
    reqs=st.lists(st.tuples(st.integers(0, 3), st.integers(0, 64)), max_size=60),
)
def test_allow_request_decides_as_consume_on_leases(
    path: str, leases: list[int], expiry: float, reqs: list[tuple[int, int]]
) -> None:
    """Approximate mode: the lease step written out (live lease: take a token or count a
    refusal) against ``LeaseAlgorithm.consume`` (also cold start and expired leases)."""
    now = [1000.0]
    with request_path(path):
        limiters = [
            RateLimiter(100, 10.0, mode="approximate", clock=lambda: now[0], shards=2)
            for _ in range(2)
        ]
    assert uses(limiters[0], path)
    cids = [f"c{i}" for i in range(4)]
    keys = np.array([client_key(c) for c in cids], dtype=np.uint64)
    for lim in limiters:
        for cid in cids:  # cold start; the drained usage makes the keys known
            lim.allow_request(cid, Request(now[0]))
        lim.drain_usage()
        assert lim.apply_grants(keys, np.array(leases, dtype=np.float64), now[0] + expiry) == 4
    inline, called = limiters
    for client, dt in reqs:
        now[0] += dt / 64
        cid = cids[client]
        assert inline.allow_request(cid, Request(now[0])) == called.check(cid).allowed, cid
    assert [inline.lease_info(c) for c in cids] == [called.lease_info(c) for c in cids]
    a, b = inline.drain_usage(), called.drain_usage()
    for field in ("keys", "admitted", "extra", "rejected", "released"):
        x, y = getattr(a, field), getattr(b, field)
        assert np.array_equal(x[np.argsort(a.keys)], y[np.argsort(b.keys)]), field


@pytest.mark.parametrize("algorithm", ALGOS)
def test_compiled_and_python_paths_agree_through_growth_reclaim_and_capacity(
    algorithm: str,
) -> None:
    """Thousands of clients on 2 shards: the index doubles and re-places its keys, the rows grow,
    idle clients are reclaimed and their rows reused, and a full table refuses newcomers
    (``max_clients``). The compiled path must follow every swap of the shards' arrays: both
    paths decide every request alike, and hold the same clients."""
    now = [1_000.0]
    limiters = []
    for path in PATHS:
        with request_path(path):
            lim = RateLimiter(3, 2.0, algorithm=algorithm, clock=lambda: now[0], shards=2)
            limiters.append(lim)
            assert uses(lim, path)
    small = []
    for path in PATHS:
        with request_path(path):
            small.append(
                RateLimiter(
                    3, 2.0, algorithm=algorithm, shards=2, max_clients=64, clock=lambda: now[0]
                )
            )
    rng = np.random.default_rng(7)
    refused_new = 0
    for step in range(6_000):
        if step % 1_500 == 1_499:
            now[0] += 10.0  # every client idle: the next inserts reclaim them
        now[0] += 0.001
        cid = f"client-{int(rng.integers(0, 4_000))}"
        req = Request(now[0])
        a, b = (lim.allow_request(cid, req) for lim in limiters)
        assert a == b, (step, cid)
        c, d = (lim.allow_request(cid, req) for lim in small)
        assert c == d, (step, cid)
        refused_new += not c
    assert len(limiters[0]) == len(limiters[1]) > 1_000
    assert len(small[0]) == len(small[1]) <= 64
    assert refused_new > 0
