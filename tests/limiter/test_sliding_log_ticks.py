"""The sliding log's uint32 tick encoding (limiter/algorithms.py, ``SlidingLog``).

Exact on its tick grid, including across a row's origin moving forward (long runs, long idle
gaps) and for long windows (coarser ticks); off the grid never more permissive than the exact
log, and at most two ticks stricter.
"""

from __future__ import annotations

import math

from hypothesis import example, given, settings
from hypothesis import strategies as st
from reference import make_model, max_in_any_window

from limiter import RateLimiter
from limiter.algorithms import LOG_MAX_TICK, LOG_PAST, LOG_TICKS_LOG2, SlidingLog
from limiter.rate import Policy

SETTINGS = settings(max_examples=150, deadline=None)


def limiter(limit: int, window: float) -> RateLimiter:
    return RateLimiter(limit, window, clock=lambda: 0.0, max_request_age=None, max_clock_skew=None)


def test_tick_scale_follows_the_window() -> None:
    assert SlidingLog(Policy(10, 10.0)).scale == 2.0**LOG_TICKS_LOG2
    assert SlidingLog(Policy(10, 32.0)).scale == 2.0**LOG_TICKS_LOG2
    assert SlidingLog(Policy(10, 60.0)).scale == 2.0**21
    hour = SlidingLog(Policy(10, 3600.0))
    assert hour.scale == 2.0**15  # 31 us ticks; a window is at most LOG_PAST / 2 ticks
    assert hour.ticks <= LOG_PAST >> 1 < 2 * hour.ticks


@st.composite
def long_run(draw: st.DrawFn) -> tuple[int, float, float, list[tuple[float, int]]]:
    """Non-decreasing times on a 1/64 s grid with jumps long enough to move row origins
    (256 s of ticks at 2**22 per second), bursts that land exactly on window ends."""
    limit = draw(st.integers(1, 6))
    window = draw(st.sampled_from([0.5, 3.0, 10.0, 100.0, 3600.0, 86400.0]))
    t0 = draw(st.sampled_from([0.0, 1000.0, 1_700_000_000.0]))
    gaps = st.one_of(
        st.just(0.0),
        st.integers(1, 64).map(lambda k: k / 64),
        st.just(window),
        st.integers(200, 2000).map(float),
        st.integers(1, 4).map(lambda k: k * 1.0e6),
    )
    steps = draw(st.lists(st.tuples(gaps, st.integers(1, limit)), min_size=1, max_size=60))
    return limit, window, t0, steps


@SETTINGS
@given(long_run())
def test_exact_on_the_grid_across_origin_moves(
    run: tuple[int, float, float, list[tuple[float, int]]],
) -> None:
    limit, window, t0, steps = run
    lim = limiter(limit, window)
    model = make_model("sliding_log", limit, window)
    t = t0
    for dt, cost in steps:
        t += dt
        assert lim.peek("c", cost=cost, now=t).allowed == (model.margin(t, cost) >= 0), t
        assert lim.check("c", cost=cost, now=t).allowed == model.decide(t, cost), (t, cost)


@SETTINGS
@given(
    limit=st.integers(1, 5),
    window=st.floats(0.01, 50.0),
    times=st.lists(st.floats(0.0, 2000.0), min_size=1, max_size=80),
)
# a tiny time against an origin before 1970: ``now - origin`` rounds onto a whole tick
@example(limit=1, window=1.0, times=[1.0, 1.0386814600272079e-123])
def test_off_the_grid_never_more_permissive_and_at_most_two_ticks_stricter(
    limit: int, window: float, times: list[float]
) -> None:
    """Arbitrary float times and windows (sorted: in order): every admission is one the exact
    log admits; every refusal is one the exact log also refuses two ticks earlier."""
    tick = 1.0 / SlidingLog(Policy(limit, window)).scale
    lim = limiter(limit, window)
    model = make_model("sliding_log", limit, window)
    admitted = []
    for t in sorted(times):
        if lim.check("c", now=t).allowed:
            assert model.margin(t, 1) >= 0, t
            model.record(t, 1)
            admitted.append((t, 1))
        else:
            assert model.margin(t - 2 * tick, 1) < 0 or t - 2 * tick < 0, t
    assert max_in_any_window(admitted, window) <= limit


def test_origin_moves_keep_live_times() -> None:
    """A row whose times no longer fit moves its origin; times still in the window keep
    blocking exactly until they leave it."""
    lim = limiter(2, 100.0)
    t = 1_700_000_000.0
    assert lim.check("c", now=t)
    # the first origin lies 64-80 s before t and spans 2**30 ticks (256 s): 170 s fits
    a, b = t + 170.0, t + 200.0
    assert (b - t + 64.0) * 2**LOG_TICKS_LOG2 > LOG_MAX_TICK > (a - t + 80.0) * 2**22
    assert lim.check("c", now=a)
    assert lim.check("c", now=b)  # moves the origin: a must still count
    assert not lim.check("c", now=b + 49.0)
    assert not lim.check("c", now=a + 100.0 - math.ulp(a))
    assert lim.check("c", now=a + 100.0)
