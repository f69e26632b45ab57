"""``allow_request`` writes each algorithm's cost-1 step out inline (limiter/ratelimiter.py);
these tests hold every copy to the algorithm's own ``consume()``, which ``check()`` calls."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from limiter import RateLimiter, Request

ALGOS = ("sliding_log", "token_bucket", "gcra", "fixed_window", "sliding_window")


def make(algorithm: str, limit: int, window: float, burst: int | None) -> RateLimiter:
    return RateLimiter(
        limit,
        window,
        algorithm=algorithm,
        burst=burst,
        clock=lambda: 0.0,
        max_request_age=None,
        max_clock_skew=None,
        shards=2,
    )


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


@settings(max_examples=300, deadline=None)
@given(runs())
def test_allow_request_decides_as_consume(
    run: tuple[str, int, float, int | None, list[tuple[int, float]]],
) -> None:
    algorithm, limit, window, burst, times = run
    inline, called = make(algorithm, limit, window, burst), make(algorithm, limit, window, burst)
    for client, t in times:
        cid = f"c{client}"
        got = inline.allow_request(cid, Request(t))
        assert got == called.check(cid, now=t).allowed, (cid, t)
    for client in range(4):
        cid = f"c{client}"
        assert inline.peek(cid, now=t) == called.peek(cid, now=t)
