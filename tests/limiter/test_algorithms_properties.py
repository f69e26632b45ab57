"""Property tests of the five algorithms against the naive models of ``reference.py``.

Times are multiples of 1/1024 s on top of a start time, and windows are dyadic, so every time the
implementation handles is an exact float; the models compute in exact rationals. Where an
algorithm involves a rate or a fraction of a window (token_bucket, gcra, sliding_window) the
implementation's float result may fall either way when the exact answer sits on the boundary: a
decision is then accepted either way if the model's margin is within 1e-9 token, and the model
follows the implementation's decision so both stay in the same state.
"""

from __future__ import annotations

import itertools
import math
from fractions import Fraction

import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from reference import (
    Model,
    effective_times,
    make_model,
    max_in_any_window,
    max_in_any_window_naive,
    max_per_aligned_window,
    q,
)

from limiter import Policy, RateLimiter, Reason
from limiter.algorithms import TIME_EPSILON

ALGOS = ("sliding_log", "token_bucket", "gcra", "fixed_window", "sliding_window")
BUCKETS = ("token_bucket", "gcra")
WINDOWS = (0.5, 0.75, 1.0, 1.5, 2.0, 2.5, 3.0, 4.0, 5.0, 7.0, 10.0)
STARTS = (0.0, 1000.0, 1_700_000_000.0)
TOL = Fraction(1, 10**9)

SETTINGS = settings(
    max_examples=120,
    deadline=None,
    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large],
)


def make_limiter(algorithm: str, limit: int, window: float, burst: int | None) -> RateLimiter:
    return RateLimiter(
        limit,
        window,
        algorithm=algorithm,
        burst=burst,
        clock=lambda: 0.0,
        max_request_age=None,
        max_clock_skew=None,
    )


# -- the models themselves, on sequences worked out by hand from the documented rules ----------


def run_model(model: Model, requests: list[tuple[float, int]]) -> list[bool]:
    return [model.decide(t, c) for t, c in requests]


def test_sliding_log_model_by_hand() -> None:
    m = make_model("sliding_log", 2, 1.0)
    # (0, 1] no longer holds the admission at 0; (0.5, 1.5] holds the one at 1.0 only.
    got = run_model(m, [(0, 1), (0.5, 1), (0.9, 1), (1.0, 1), (1.4, 1), (1.5, 1), (1.5, 1)])
    assert got == [True, True, False, True, False, True, False]


@pytest.mark.parametrize("algorithm", BUCKETS)
def test_bucket_models_by_hand(algorithm: str) -> None:
    m = make_model(algorithm, 2, 1.0, burst=4)  # 2 tokens/s, capacity 4
    got = run_model(m, [(0, 4), (0, 1), (0.5, 1), (0.5, 1), (1.0, 2), (10.0, 4), (10.0, 1)])
    assert got == [True, False, True, False, False, True, False]
    # at 1.0 one token had come back (0.5 s since the last admission): a cost of 1 passes
    m = make_model(algorithm, 2, 1.0, burst=4)
    assert run_model(m, [(0, 4), (0.5, 1), (1.0, 1), (1.0, 1)]) == [True, True, True, False]


def test_fixed_window_model_by_hand() -> None:
    m = make_model("fixed_window", 2, 1.0)
    got = run_model(m, [(0.9, 1), (0.95, 1), (0.99, 1), (1.0, 2), (1.5, 1), (2.0, 1)])
    assert got == [True, True, False, True, False, True]


def test_sliding_window_model_by_hand() -> None:
    m = make_model("sliding_window", 4, 1.0)
    # window [1, 2) after 4 in [0, 1): at 1.25 the estimate is 4 * 0.75 = 3
    got = run_model(m, [(0.5, 4), (1.25, 1), (1.25, 1), (1.5, 1), (3.0, 4)])
    assert got == [True, True, False, True, True]


def test_late_request_decided_at_latest_in_models() -> None:
    m = make_model("token_bucket", 1, 1.0)
    assert m.decide(10.0, 1)
    assert not m.decide(5.0, 1)  # decided at 10.0: no token back
    assert m.decide(11.0, 1)


@given(
    st.lists(st.tuples(st.integers(0, 200), st.integers(1, 4)), max_size=40),
    st.sampled_from(WINDOWS),
)
@settings(max_examples=200, deadline=None)
def test_window_scan_matches_quadratic_scan(ticks: list[tuple[int, int]], window: float) -> None:
    adm = [(k / 64, c) for k, c in ticks]
    assert max_in_any_window(adm, window) == max_in_any_window_naive(adm, window)


# -- strategies ---------------------------------------------------------------------------------


@st.composite
def policy_params(draw: st.DrawFn, algorithm: str) -> tuple[str, int, float, int | None]:
    limit = draw(st.integers(1, 20))
    window = draw(st.sampled_from(WINDOWS))
    burst = draw(st.none() | st.integers(1, 25)) if algorithm in BUCKETS else None
    return algorithm, limit, window, burst


#: Time steps are multiples of 1/TICK s: coarse ones (multiples of 1/64 s) land exactly on
#: window boundaries and refill points, fine ones fall just before or after them.
TICK = 1024


def dt_ticks(window: float) -> st.SearchStrategy[int]:
    coarse = int(window * 64)
    return st.one_of(
        st.just(0),
        st.integers(1, 16),
        st.integers(0, 2 * coarse).map(lambda k: 16 * k),
        st.sampled_from([coarse // 4, coarse // 2, coarse, 2 * coarse]).map(lambda k: 16 * k),
        st.integers(0, 2 * coarse * 16),
    )


def costs(cap: int) -> st.SearchStrategy[int]:
    return st.one_of(st.just(1), st.integers(1, cap))


@st.composite
def in_order_run(
    draw: st.DrawFn, algorithm: str, max_size: int = 60
) -> tuple[tuple[str, int, float, int | None], float, list[tuple[float, int]]]:
    params = draw(policy_params(algorithm))
    _, limit, window, burst = params
    cap = burst or limit
    t0 = draw(st.sampled_from(STARTS))
    steps = draw(st.lists(st.tuples(dt_ticks(window), costs(cap)), max_size=max_size))
    return params, t0, [(k / TICK, c) for k, c in steps]


# -- checking one run against its models --------------------------------------------------------


def expected(models: list[Model], t: float, cost: int) -> bool | None:
    """The models' decision, or None when a float-based model sits on its boundary."""
    clear_refusal = False
    boundary = False
    for m in models:
        mg = m.margin(t, cost)
        tol = 0 if m.exact else TOL
        if mg < -tol:
            clear_refusal = True
        elif mg <= tol and not (m.exact and mg >= 0):
            boundary = True
    if clear_refusal:
        return False
    return None if boundary else True


def expected_remaining(models: list[Model], t: float) -> set[int]:
    """Whole tokens left: the most restrictive model speaks; near an integer, either side."""
    options = []
    for m in models:
        r = m.remaining(t)
        if m.exact:
            options.append({max(0, math.floor(r))})
        else:
            options.append({max(0, math.floor(r - TOL)), max(0, math.floor(r + TOL))})
    return {min(c) for c in itertools.product(*options)}


def replay(
    lim: RateLimiter,
    models: list[Model],
    t0: float,
    steps: list[tuple[float, int]],
    cid: str = "client",
) -> list[tuple[float, int]]:
    """Feed non-decreasing requests to ``lim`` and its models; check every decision.

    Checks (a) decisions equal the models', (c) a refusal consumes nothing, (d) ``remaining``,
    ``retry_after`` and ``reset_after`` say what happens next. Returns the admissions.

    The retry_after property, as asserted for all five algorithms alone or combined: with
    non-decreasing time and nothing admitted in between, the refused request is refused at
    ``t + retry_after - delta`` and admitted at ``t + retry_after + eps`` (eps, delta: 1 us, or
    16/64 float ulps of t if larger), except where the models put that request within 1e-9 token
    of its boundary (e.g. a full burst on a full bucket; see the GCRA bug below).
    """
    cap = min(m.capacity for m in models)
    limits = {m.limit for m in models}
    admitted: list[tuple[float, int]] = []
    t = t0
    for dt, cost in steps:
        t += dt
        want = expected(models, t, cost)
        before = lim.peek(cid, cost=cost, now=t)
        assert before.remaining in expected_remaining(models, t), (t, cost, before)
        d = lim.check(cid, cost=cost, now=t)
        if want is not None:
            # peek predicts check (on a float boundary the two may round differently)
            assert d.allowed == before.allowed == want, (t, cost, before, d)
        assert d.limit in limits
        if d.allowed:
            for m in models:
                m.record(t, cost)
            admitted.append((t, cost))
            assert d.reason == Reason.OK
            assert d.retry_after == 0.0
            assert bool(d)
        else:
            assert d.reason == Reason.LIMITED
            assert not bool(d)
            # (c) nothing consumed: the same question gets the same answer as before the check
            # (a fresh client's peek is computed without state: compared off the boundary only)
            assert lim.peek(cid, cost=cost, now=t) == d
            if want is not None:
                assert d == before
            # (d) retry_after: finite (cost <= capacity), > 0 unless on a float boundary, and
            # exactly when the same request passes: the models agree it passes at
            # t + retry_after + eps and not at t + retry_after - delta, and so does the limiter
            # (only asserted where the models are clear of the boundary by more than 1e-9 token;
            # eps and delta are microseconds, well above float noise at these magnitudes)
            r = d.retry_after
            assert 0.0 <= r < math.inf, d
            if want is False:
                assert r > 0.0, d
            later = t + r + max(1e-6, 16 * math.ulp(t + r))
            want_later = expected(models, later, cost)
            assert want_later is not False, ("retry_after too short", t, cost, d)
            if want_later:
                assert lim.peek(cid, cost=cost, now=later).allowed, (t, cost, d)
            sooner = t + r - max(1e-6, 64 * math.ulp(t + r))
            if sooner > t:
                want_sooner = expected(models, sooner, cost)
                assert want_sooner is not True, ("retry_after too long", t, cost, d)
                if want_sooner is False:
                    assert not lim.peek(cid, cost=cost, now=sooner).allowed, (t, cost, d)
        assert 0 <= d.remaining <= cap, d
        assert d.remaining in expected_remaining(models, t), (t, cost, d)
        assert d.reset_after >= 0.0
        if len(models) == 1:
            # back to a full allowance once reset_after has passed, with nothing admitted
            later = t + d.reset_after + max(1e-6, 16 * math.ulp(t + d.reset_after))
            assert lim.peek(cid, now=later).remaining == cap, (t, d)
    return admitted


def check_bounds(
    algorithm: str, limit: int, window: float, cap: int, admissions: list[tuple[float, int]]
) -> None:
    """(b) the documented "any interval of length W" guarantee of each algorithm."""
    most = max_in_any_window(admissions, window)
    if algorithm == "sliding_log":
        assert most <= limit
    elif algorithm in BUCKETS:
        assert most <= cap + limit
    elif algorithm == "fixed_window":
        assert max_per_aligned_window(admissions, window) <= limit
        assert most <= 2 * limit
    else:
        assert algorithm == "sliding_window"
        assert max_per_aligned_window(admissions, window) <= limit
        assert most < 2 * limit


# -- (a), (c), (d): one policy, non-decreasing times --------------------------------------------


@pytest.mark.parametrize("algorithm", ALGOS)
@SETTINGS
@given(data=st.data())
def test_single_policy_matches_model(algorithm: str, data: st.DataObject) -> None:
    (alg, limit, window, burst), t0, steps = data.draw(in_order_run(algorithm))
    lim = make_limiter(alg, limit, window, burst)
    model = make_model(alg, limit, window, burst)
    admitted = replay(lim, [model], t0, steps)
    check_bounds(alg, limit, window, model.capacity, admitted)


FRESH_CASES = [(5, 1.0, None), (7, 3.0, None), (5, 0.5, 1), (10, 1.0, None), (3, 1.0, 7)]
FRESH_TIMES = [0.0, 3.0, 1000.0, 1_700_000_000.0, 1_700_000_000.123]


@pytest.mark.parametrize("algorithm", ALGOS)
def test_fresh_client_gets_exactly_its_capacity_at_any_time(algorithm: str) -> None:
    """A client never seen can take exactly its capacity at once, whatever the clock reads:
    one request of cost = capacity, or capacity requests of cost 1 (and no more)."""
    failures = []
    for limit, window, burst in FRESH_CASES:
        b = burst if algorithm in BUCKETS else None
        cap = b or limit
        for now in FRESH_TIMES:
            lim = make_limiter(algorithm, limit, window, b)
            assert lim.peek("new", now=now).remaining == cap
            assert lim.peek("new", cost=cap, now=now).allowed
            assert len(lim) == 0  # peek tracks nobody
            one = lim.check("new", cost=cap, now=now)
            if not (one.allowed and one.remaining == 0):
                failures.append((limit, window, b, now, "one request of cost capacity", one))
            if lim.check("new", now=now).allowed:
                failures.append((limit, window, b, now, "admitted beyond capacity"))
            lim = make_limiter(algorithm, limit, window, b)
            got = sum(lim.check("new", now=now).allowed for _ in range(cap + 3))
            if got != cap:
                failures.append((limit, window, b, now, f"{got} of {cap} unit requests"))
    assert not failures


@pytest.mark.parametrize("algorithm", BUCKETS)
@pytest.mark.parametrize(("limit", "window", "burst"), [(4, 1.0, None), (8, 4.0, 3), (2, 0.5, 8)])
@pytest.mark.parametrize("offset", [1 / 1024, 1 / 256, 1 / 16])
def test_bucket_carries_no_credit_past_full(
    algorithm: str, limit: int, window: float, burst: int | None, offset: float
) -> None:
    """A bucket that has been full for a moment holds exactly its capacity: draining it then
    leaves nothing until a whole emission interval has passed (dyadic rates: float-exact)."""
    cap = burst or limit
    interval = window / limit
    t_full = 100.0 + cap * interval  # drained at 100, full again here
    prelude = [(100.0, cap), (t_full + offset, cap)]
    probes = [(t_full + offset + k * interval - 1 / 2048, k) for k in range(1, cap + 1)]
    probes += [(t_full + offset + k * interval, k) for k in range(1, cap + 1)]
    for t, c in probes:
        lim = make_limiter(algorithm, limit, window, burst)
        model = make_model(algorithm, limit, window, burst)
        for pt, pc in prelude:
            assert lim.check("c", cost=pc, now=pt).allowed
            assert model.decide(pt, pc)
        assert lim.check("c", cost=c, now=t).allowed == (model.margin(t, c) >= 0), (t, c)


# -- (b): the any-interval bound, with longer runs ----------------------------------------------


@pytest.mark.parametrize("algorithm", ALGOS)
@settings(max_examples=80, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(data=st.data())
def test_any_interval_bound_in_order(algorithm: str, data: st.DataObject) -> None:
    (alg, limit, window, burst), t0, steps = data.draw(in_order_run(algorithm, max_size=200))
    lim = make_limiter(alg, limit, window, burst)
    t = t0
    admitted = []
    for dt, c in steps:
        t += dt
        if lim.check("c", cost=c, now=t):
            admitted.append((t, c))
    check_bounds(alg, limit, window, burst or limit, admitted)


@st.composite
def shuffled_run(
    draw: st.DrawFn, algorithm: str
) -> tuple[tuple[str, int, float, int | None], list[tuple[float, int]]]:
    params = draw(policy_params(algorithm))
    _, limit, window, burst = params
    cap = burst or limit
    t0 = draw(st.sampled_from(STARTS))
    span = int(window * 64) * 4
    ticks = draw(st.lists(st.tuples(st.integers(0, span), costs(cap)), max_size=120))
    return params, [(t0 + k / 64, c) for k, c in ticks]


@SETTINGS
@given(shuffled_run("sliding_log"))
def test_sliding_log_exact_bound_with_late_timestamps(
    run: tuple[tuple[str, int, float, int | None], list[tuple[float, int]]],
) -> None:
    (alg, limit, window, _), requests = run
    lim = make_limiter(alg, limit, window, None)
    admitted = [(t, c) for t, c in requests if lim.check("c", cost=c, now=t)]
    # on the request timestamps themselves, whatever their order
    assert max_in_any_window(admitted, window) <= limit


@pytest.mark.parametrize("algorithm", ALGOS)
@SETTINGS
@given(data=st.data())
def test_late_timestamps_never_earn_tokens_back(algorithm: str, data: st.DataObject) -> None:
    """A late request passes only if it would pass at the latest admitted time, and the
    admissions, re-stamped at that effective time, keep the algorithm's bound."""
    (alg, limit, window, burst), requests = data.draw(shuffled_run(algorithm))
    lim = make_limiter(alg, limit, window, burst)
    latest: float | None = None
    admitted = []
    for t, c in requests:
        if latest is not None and t < latest:
            late = lim.peek("c", cost=c, now=t)
            at_latest = lim.peek("c", cost=c, now=latest)
            assert late.remaining <= at_latest.remaining
            if late.allowed:
                assert at_latest.allowed
        if lim.check("c", cost=c, now=t):
            admitted.append((t, c))
            latest = t if latest is None else max(latest, t)
    check_bounds(alg, limit, window, burst or limit, effective_times(admitted))


@pytest.mark.parametrize("algorithm", ["token_bucket", "fixed_window"])
@SETTINGS
@given(data=st.data())
def test_late_timestamps_decided_exactly_at_latest(algorithm: str, data: st.DataObject) -> None:
    """token_bucket and fixed_window keep the latest admitted time (or its window) in their
    state, so a late request is decided exactly as at that time, as the model does."""
    (alg, limit, window, burst), requests = data.draw(shuffled_run(algorithm))
    lim = make_limiter(alg, limit, window, burst)
    model = make_model(alg, limit, window, burst)
    for t, c in requests:
        want = expected([model], t, c)
        got = lim.check("c", cost=c, now=t).allowed
        if want is not None:
            assert got == want, (t, c)
        if got:
            model.record(t, c)


# -- (e): several policies on one limiter -------------------------------------------------------


@st.composite
def multi_run(
    draw: st.DrawFn,
) -> tuple[list[tuple[str, int, float, int | None]], float, list[tuple[float, int]]]:
    n = draw(st.integers(2, 3))
    params = [draw(policy_params(draw(st.sampled_from(ALGOS)))) for _ in range(n)]
    cap = min(b or lim for _, lim, _, b in params)
    window = min(w for _, _, w, _ in params)
    t0 = draw(st.sampled_from(STARTS))
    steps = draw(st.lists(st.tuples(dt_ticks(window), costs(cap)), max_size=60))
    return params, t0, [(k / TICK, c) for k, c in steps]


@settings(max_examples=250, deadline=None, suppress_health_check=[HealthCheck.too_slow])
@given(multi_run())
def test_several_policies_match_independent_models(
    run: tuple[list[tuple[str, int, float, int | None]], float, list[tuple[float, int]]],
) -> None:
    params, t0, steps = run
    lim = RateLimiter(
        policies=[Policy(limit, window, burst, alg) for alg, limit, window, burst in params],
        clock=lambda: 0.0,
        max_request_age=None,
        max_clock_skew=None,
    )
    models = [make_model(alg, limit, window, burst) for alg, limit, window, burst in params]
    admitted = replay(lim, models, t0, steps)
    for (alg, limit, window, _), m in zip(params, models, strict=True):
        check_bounds(alg, limit, window, m.capacity, admitted)


def test_refusal_by_one_policy_consumes_nothing_from_the_other() -> None:
    lim = RateLimiter(
        policies=[Policy(2, 1.0), Policy(5, 10.0)],
        clock=lambda: 0.0,
        max_request_age=None,
        max_clock_skew=None,
    )
    got = [lim.check("c", now=t).allowed for t in (0.0, 0.0, 0.0, 0.0, 1.0, 1.0, 2.0, 2.0)]
    # 2 per second; 5 per 10 s: the refusals at 0.0 must not count against the 10 s policy,
    # so the 5th admission still happens at 2.0 and the 6th is refused by the 10 s policy
    assert got == [True, True, False, False, True, True, True, False]
    d = lim.check("c", now=3.0)
    assert not d.allowed and d.retry_after == pytest.approx(7.0)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_cost_above_one_policy_capacity_is_never_admitted(algorithm: str) -> None:
    burst = 3 if algorithm in BUCKETS else None
    lim = RateLimiter(
        policies=[Policy(3, 1.0, burst, algorithm), Policy(50, 10.0, None, "sliding_window")],
        clock=lambda: 0.0,
        max_request_age=None,
        max_clock_skew=None,
    )
    d = lim.check("c", cost=4, now=0.0)
    assert not d.allowed and d.reason == Reason.COST_EXCEEDS_LIMIT
    assert d.retry_after == math.inf
    assert lim.peek("c", cost=3, now=0.0).allowed
    assert len(lim) == 0


# -- remaining is what a request can take ---------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGOS)
@SETTINGS
@given(data=st.data())
def test_remaining_is_the_largest_cost_that_passes(algorithm: str, data: st.DataObject) -> None:
    """``remaining`` r: a request of cost r passes and one of cost r + 1 does not (except where
    the exact remaining allowance is within 1e-9 of a whole number: float rounding decides)."""
    (alg, limit, window, burst), t0, steps = data.draw(in_order_run(algorithm))
    assume(steps)
    lim = make_limiter(alg, limit, window, burst)
    model = make_model(alg, limit, window, burst)
    cap = model.capacity
    t = t0
    for dt, c in steps:
        t += dt
        got = lim.check("c", cost=c, now=t).allowed
        if got:
            model.record(t, c)
        probe = t + data.draw(st.integers(0, int(window * 64)), label="probe") / 64
        r = lim.peek("c", now=probe).remaining
        assert 0 <= r <= cap
        exact = model.remaining(probe)
        if not model.exact and abs(exact - round(exact)) <= TOL:
            continue
        assert r == max(0, math.floor(exact)), (probe, r, exact)
        if r >= 1:
            assert lim.peek("c", cost=r, now=probe).allowed, (probe, r)
        if r < cap:
            assert not lim.peek("c", cost=r + 1, now=probe).allowed, (probe, r)


def test_q_is_exact() -> None:
    assert q(0.1) != Fraction(1, 10)
    assert q(0.75) == Fraction(3, 4)


def test_gcra_remaining_never_promises_a_refused_token() -> None:
    """GCRA compares times with TIME_EPSILON (1 us) of slack; remaining agrees with allowed
    inside that slack, and a token is never promised earlier than that."""
    lim = make_limiter("gcra", 1, 1.0, None)
    assert lim.check("c", now=0.0).allowed
    for dt in (1e-7, 5e-7, 9e-7, 2e-6, 1e-5, 1e-3):
        d = lim.peek("c", now=1.0 - dt)
        assert d.allowed == (d.remaining >= 1), d
        if dt > TIME_EPSILON:
            assert not d.allowed and d.remaining == 0, d
