"""The public API of ``RateLimiter``: the seed API, Decision, peek, costs, time checks, rate
strings and input validation."""

from __future__ import annotations

import contextlib
import dataclasses
import math
import time

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from reference import SlidingLogModel, max_in_any_window

import limiter
from limiter import (
    DEFAULT_ALGORITHM,
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_REQUEST_AGE,
    MAX_CLIENT_ID_LENGTH,
    Decision,
    Policy,
    RateLimiter,
    Reason,
    Request,
    parse_rate,
    parse_rates,
)
from limiter.rate import MAX_SLIDING_LOG_LIMIT

ALGOS = ("sliding_log", "token_bucket", "gcra", "fixed_window", "sliding_window")


class Clock:
    """An injected clock the test moves by hand."""

    def __init__(self, now: float = 1_000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


# -- the seed API ---------------------------------------------------------------------------------


def test_seed_api_with_the_real_clock() -> None:
    lim = RateLimiter(3, 60)
    assert lim.policies == (Policy(3, 60.0),)
    assert lim.policies[0].algorithm == DEFAULT_ALGORITHM == "sliding_log"
    got = [lim.allow_request("alice", Request()) for _ in range(5)]
    assert got == [True, True, True, False, False]
    # clients are independent
    assert lim.allow_request("bob", Request())
    assert len(lim) == 2


def test_request_stamps_with_the_wall_clock() -> None:
    before = time.time()
    r = Request()
    assert before <= r.timestamp <= time.time()
    assert Request(5).timestamp == 5.0 and isinstance(Request(5).timestamp, float)
    assert "5.0" in repr(Request(5))


def test_seed_api_window_slides() -> None:
    clock = Clock(100.0)
    lim = RateLimiter(2, 10, clock=clock)

    def at(t: float) -> bool:
        clock.now = t
        return lim.allow_request("c", Request(t))

    assert at(100.0)
    assert at(105.0)
    assert not at(109.9)
    assert at(110.0)  # the admission at 100.0 is out of (100, 110]
    assert not at(110.0)
    assert at(115.0)  # 105.0 is out of (105, 115]
    assert not at(119.99)


@settings(max_examples=150, deadline=None)
@given(
    max_requests=st.integers(1, 12),
    window=st.sampled_from([0.5, 1.0, 2.0, 3.0, 10.0]),
    ticks=st.lists(st.integers(0, 8 * 64), max_size=80),
    sort=st.booleans(),
)
def test_seed_api_never_admits_more_than_max_requests_in_any_window(
    max_requests: int, window: float, ticks: list[int], sort: bool
) -> None:
    """Default algorithm (sliding log): at most max_requests in any (t - W, t], in-order or not;
    for in-order timestamps the decisions are exactly the sliding log's."""
    clock = Clock(1_000.0 + 8.0)
    lim = RateLimiter(max_requests, window, clock=clock)  # default checks: age 10 s, skew 1 s
    stamps = [1_000.0 + k / 64 for k in (sorted(ticks) if sort else ticks)]
    model = SlidingLogModel(max_requests, window)
    admitted = []
    for ts in stamps:
        ok = lim.allow_request("client", Request(ts))
        if sort:
            assert ok == model.decide(ts, 1)
        if ok:
            admitted.append((ts, 1))
    assert max_in_any_window(admitted, window) <= max_requests


def test_clear_client_restores_a_full_allowance() -> None:
    clock = Clock()
    lim = RateLimiter(2, 60, clock=clock)
    assert lim.allow_request("a", Request(clock.now))
    assert lim.allow_request("a", Request(clock.now))
    assert not lim.allow_request("a", Request(clock.now))
    assert lim.allow_request("b", Request(clock.now))
    assert len(lim) == 2
    lim.clear_client("a")
    assert len(lim) == 1
    assert lim.allow_request("a", Request(clock.now))
    assert lim.allow_request("a", Request(clock.now))
    assert not lim.allow_request("a", Request(clock.now))
    # b untouched
    assert lim.allow_request("b", Request(clock.now))
    assert not lim.allow_request("b", Request(clock.now))
    lim.clear_client("never-seen")  # no error
    assert len(lim) == 2


def test_allow_request_refuses_stale_and_future_requests_without_tracking() -> None:
    clock = Clock()
    lim = RateLimiter(5, 60, clock=clock)
    assert not lim.allow_request("a", Request(clock.now - DEFAULT_MAX_REQUEST_AGE - 0.5))
    assert not lim.allow_request("a", Request(clock.now + DEFAULT_MAX_CLOCK_SKEW + 0.5))
    assert len(lim) == 0
    assert lim.allow_request("a", Request(clock.now - DEFAULT_MAX_REQUEST_AGE))
    assert lim.allow_request("a", Request(clock.now + DEFAULT_MAX_CLOCK_SKEW))


# -- Decision -------------------------------------------------------------------------------------


def test_decision_fields_and_truthiness() -> None:
    clock = Clock(50.0)
    lim = RateLimiter(3, 10, clock=clock)
    d = lim.check("c")
    assert isinstance(d, Decision)
    assert d.allowed is True and bool(d) is True
    assert d.limit == 3
    assert d.remaining == 2
    assert d.retry_after == 0.0
    assert d.reason == Reason.OK == "ok"
    assert d.reset_after == pytest.approx(10.0)  # the admission at 50 counts until 60
    clock.now = 54.0
    lim.check("c")
    d = lim.check("c")
    assert d.allowed and d.remaining == 0
    d = lim.check("c")
    assert d.allowed is False and bool(d) is False and not d
    assert d.reason == Reason.LIMITED == "limited"
    assert d.remaining == 0
    assert d.retry_after == pytest.approx(6.0)  # the admission at 50 leaves (50, 60] at 60
    assert d.reset_after == pytest.approx(10.0)  # the newest admission (54) leaves at 64
    with pytest.raises(dataclasses.FrozenInstanceError):
        d.allowed = True  # type: ignore[misc]
    assert {f.name for f in dataclasses.fields(Decision)} == {
        "allowed",
        "limit",
        "remaining",
        "reset_after",
        "retry_after",
        "reason",
    }


def test_reason_values() -> None:
    assert {r.value for r in Reason} == {
        "ok",
        "limited",
        "stale",
        "future",
        "cost_exceeds_limit",
        "capacity",
        "unavailable",
    }
    assert Reason("stale") is Reason.STALE
    assert f"{Reason.FUTURE}" == "future"


# -- peek -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGOS)
def test_peek_consumes_nothing_and_tracks_no_new_client(algorithm: str) -> None:
    clock = Clock()
    lim = RateLimiter(4, 10, algorithm=algorithm, clock=clock)
    for _ in range(10):
        d = lim.peek("c")
        assert d.allowed and d.remaining == 4 and d.limit == 4
    assert len(lim) == 0
    assert lim.peek("c", cost=4).allowed
    assert len(lim) == 0
    assert lim.check("c", cost=3).allowed
    assert len(lim) == 1
    for _ in range(10):
        assert lim.peek("c").remaining == 1
        assert not lim.peek("c", cost=2).allowed
    assert lim.check("c").allowed
    assert not lim.check("c").allowed
    assert len(lim) == 1
    assert lim.peek("other").allowed
    assert len(lim) == 1


# -- cost -----------------------------------------------------------------------------------------


@pytest.mark.parametrize("algorithm", ALGOS)
def test_cost_above_the_limit_is_never_admitted(algorithm: str) -> None:
    clock = Clock()
    lim = RateLimiter(5, 1, algorithm=algorithm, clock=clock)
    for _ in range(3):
        d = lim.check("c", cost=6)
        assert not d.allowed
        assert d.reason == Reason.COST_EXCEEDS_LIMIT == "cost_exceeds_limit"
        assert d.retry_after == math.inf
        assert d.limit == 5 and d.remaining == 0
        assert lim.peek("c", cost=6).reason == Reason.COST_EXCEEDS_LIMIT
        clock.now += 100.0
    assert len(lim) == 0  # never tracked, nothing consumed
    assert lim.check("c", cost=5).allowed


def test_burst_raises_the_largest_cost() -> None:
    clock = Clock()
    lim = RateLimiter(5, 1, algorithm="token_bucket", burst=8, clock=clock)
    assert lim.check("c", cost=8).allowed
    d = lim.check("c", cost=9)
    assert d.reason == Reason.COST_EXCEEDS_LIMIT


# -- stale and future timestamps ------------------------------------------------------------------


def test_documented_time_check_defaults() -> None:
    assert limiter.DEFAULT_MAX_REQUEST_AGE == DEFAULT_MAX_REQUEST_AGE == 10.0
    assert limiter.DEFAULT_MAX_CLOCK_SKEW == DEFAULT_MAX_CLOCK_SKEW == 1.0
    assert RateLimiter.__init__.__kwdefaults__["max_request_age"] == DEFAULT_MAX_REQUEST_AGE
    assert RateLimiter.__init__.__kwdefaults__["max_clock_skew"] == DEFAULT_MAX_CLOCK_SKEW


@pytest.mark.parametrize("algorithm", ALGOS)
def test_stale_and_future_requests_are_refused_with_their_reason(algorithm: str) -> None:
    clock = Clock(5_000.0)
    lim = RateLimiter(3, 10, algorithm=algorithm, clock=clock)
    now = clock.now
    stale = lim.check("c", now=now - DEFAULT_MAX_REQUEST_AGE - 0.25)
    assert not stale and stale.reason == Reason.STALE == "stale"
    assert stale.retry_after == math.inf
    future = lim.check("c", now=now + DEFAULT_MAX_CLOCK_SKEW + 0.25)
    assert not future and future.reason == Reason.FUTURE == "future"
    assert future.retry_after == pytest.approx(0.25)
    assert lim.peek("c", now=now - DEFAULT_MAX_REQUEST_AGE - 0.25).reason == Reason.STALE
    assert lim.peek("c", now=now + DEFAULT_MAX_CLOCK_SKEW + 0.25).reason == Reason.FUTURE
    assert len(lim) == 0  # nothing tracked, nothing consumed
    # the limits themselves are accepted
    assert lim.check("a", now=now - DEFAULT_MAX_REQUEST_AGE).allowed
    assert lim.check("b", now=now + DEFAULT_MAX_CLOCK_SKEW).allowed
    assert lim.check("c", cost=3, now=now).allowed


def test_time_checks_can_be_tuned_or_turned_off() -> None:
    clock = Clock(5_000.0)
    lim = RateLimiter(3, 10, clock=clock, max_request_age=2.0, max_clock_skew=0.0)
    assert lim.check("c", now=clock.now - 2.5).reason == Reason.STALE
    assert lim.check("c", now=clock.now + 0.001).reason == Reason.FUTURE
    assert lim.check("c", now=clock.now - 2.0).allowed
    off = RateLimiter(3, 10, clock=clock, max_request_age=None, max_clock_skew=None)
    assert off.check("c", now=0.0).allowed
    assert off.check("d", now=1e9).allowed


@pytest.mark.parametrize("algorithm", ALGOS)
def test_nan_timestamp_never_exceeds_the_limit(algorithm: str) -> None:
    clock = Clock()
    lim = RateLimiter(2, 60, algorithm=algorithm, clock=clock)
    admitted = 0
    for ts in [math.nan] * 5 + [clock.now] * 5:
        with contextlib.suppress(ValueError):  # refusing a NaN timestamp loudly is fine
            admitted += lim.allow_request("a", Request(ts))
    assert admitted <= 2


# -- rate strings ---------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "limit", "window"),
    [
        ("10/second", 10, 1.0),
        ("10/s", 10, 1.0),
        ("10/sec", 10, 1.0),
        ("10 / Seconds", 10, 1.0),
        ("100/minute", 100, 60.0),
        ("100/min", 100, 60.0),
        ("100/m", 100, 60.0),
        ("7/hour", 7, 3600.0),
        ("7/h", 7, 3600.0),
        ("2/day", 2, 86400.0),
        ("2/d", 2, 86400.0),
        ("2 per 3 days", 2, 259200.0),
        ("10 per 5 minutes", 10, 300.0),
        ("10 per 5 seconds", 10, 5.0),
        ("10/2.5s", 10, 2.5),
        ("3 per 2 hours", 3, 7200.0),
        ("5 per 250 milliseconds", 5, 0.25),
    ],
)
def test_parse_rate(text: str, limit: int, window: float) -> None:
    p = parse_rate(text)
    assert (p.limit, p.window, p.burst, p.algorithm) == (limit, window, None, DEFAULT_ALGORITHM)


@pytest.mark.parametrize(("text", "window"), [("10/ms", 0.001), ("10 per 5 ms", 0.005)])
def test_parse_rate_milliseconds(text: str, window: float) -> None:
    assert parse_rate(text).window == pytest.approx(window)


def test_parse_large_rate_needs_an_unbounded_algorithm() -> None:
    p = parse_rate("5000/hour", algorithm="gcra")
    assert (p.limit, p.window, p.algorithm) == (5000, 3600.0, "gcra")
    with pytest.raises(ValueError, match=f"above its maximum {MAX_SLIDING_LOG_LIMIT}"):
        parse_rate("5000/hour")
    assert parse_rate(f"{MAX_SLIDING_LOG_LIMIT}/hour").limit == MAX_SLIDING_LOG_LIMIT


def test_parse_rates() -> None:
    ps = parse_rates("10/second; 100/minute;5000/hour", algorithm="gcra")
    assert [(p.limit, p.window, p.algorithm) for p in ps] == [
        (10, 1.0, "gcra"),
        (100, 60.0, "gcra"),
        (5000, 3600.0, "gcra"),
    ]
    assert parse_rates("10/s;") == (Policy(10, 1.0),)
    assert parse_rates(" 1/s ; 2/m ") == (Policy(1, 1.0), Policy(2, 60.0))


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("", "malformed rate ''"),
        ("abc", "malformed rate 'abc': expected '<limit>/<unit>'"),
        ("10", "malformed rate '10'"),
        ("/second", "malformed rate"),
        ("-1/second", "malformed rate"),
        ("1.5/second", "malformed rate"),
        ("10 seconds", "malformed rate"),
        ("10/fortnight", "unknown unit 'fortnight'"),
        ("10/0 seconds", "the window must be > 0"),
        ("0/second", "limit must be > 0"),
    ],
)
def test_parse_rate_rejects_malformed(text: str, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        parse_rate(text)


def test_parse_rates_rejects_malformed() -> None:
    with pytest.raises(ValueError, match="no rate given"):
        parse_rates("")
    with pytest.raises(ValueError, match="no rate given"):
        parse_rates(" ; ;")
    with pytest.raises(ValueError, match="malformed rate 'x'"):
        parse_rates("10/s;x")
    with pytest.raises(ValueError, match="rates must be a string, got int"):
        parse_rates(10)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="rate must be a string, got NoneType"):
        parse_rate(None)  # type: ignore[arg-type]


@pytest.mark.parametrize(
    "policy",
    [Policy(10, 1.0), Policy(100, 60.0), Policy(5, 300.0), Policy(3, 7200.0), Policy(1, 90.0)],
)
def test_policy_str_parses_back(policy: Policy) -> None:
    assert parse_rate(str(policy)) == policy


def test_limiter_from_rate_strings() -> None:
    clock = Clock()
    lim = RateLimiter.from_rates("2/second; 3/minute", clock=clock)
    assert lim.policies == (Policy(2, 1.0), Policy(3, 60.0))
    got = [lim.check("c").allowed for _ in range(3)]
    assert got == [True, True, False]
    clock.now += 1.0
    assert [lim.check("c").allowed for _ in range(2)] == [True, False]
    lim = RateLimiter(policies="10/s", algorithm="token_bucket", burst=20, clock=clock)
    assert lim.policies == (Policy(10, 1.0, 20, "token_bucket"),)


@pytest.mark.parametrize("how", ["from_rates", "policies"])
def test_large_rate_string_with_gcra(how: str) -> None:
    if how == "from_rates":
        lim = RateLimiter.from_rates("10/second; 5000/hour", algorithm="gcra")
    else:
        lim = RateLimiter(policies="10/second; 5000/hour", algorithm="gcra")
    assert lim.policies == (Policy(10, 1.0, None, "gcra"), Policy(5000, 3600.0, None, "gcra"))


# -- bad input ------------------------------------------------------------------------------------


@pytest.fixture
def lim() -> RateLimiter:
    return RateLimiter(5, 1, clock=Clock())


@pytest.mark.parametrize(
    ("client_id", "message"),
    [
        ("", "client_id must not be empty"),
        (123, "client_id must be a str, got int"),
        (None, "client_id must be a str, got NoneType"),
        (b"abc", "client_id must be a str, got bytes"),
        (
            "x" * (MAX_CLIENT_ID_LENGTH + 1),
            f"client_id is {MAX_CLIENT_ID_LENGTH + 1} characters long; "
            f"the maximum is {MAX_CLIENT_ID_LENGTH}",
        ),
    ],
)
def test_bad_client_id(lim: RateLimiter, client_id: object, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        lim.check(client_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        lim.peek(client_id)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        lim.allow_request(client_id, Request())  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=message):
        lim.clear_client(client_id)  # type: ignore[arg-type]
    assert len(lim) == 0


def test_longest_client_id_is_accepted(lim: RateLimiter) -> None:
    assert lim.check("x" * MAX_CLIENT_ID_LENGTH).allowed
    assert lim.check("é" * MAX_CLIENT_ID_LENGTH).allowed  # characters, not bytes


@pytest.mark.parametrize("cost", [0, -1, 1.5, 1.0, True, "1", None])
def test_bad_cost(lim: RateLimiter, cost: object) -> None:
    with pytest.raises(ValueError, match=r"cost must be a whole number >= 1, got "):
        lim.check("c", cost=cost)  # type: ignore[arg-type]
    with pytest.raises(ValueError, match=r"cost must be a whole number >= 1"):
        lim.peek("c", cost=cost)  # type: ignore[arg-type]
    assert len(lim) == 0


@pytest.mark.parametrize(
    ("args", "kwargs", "message"),
    [
        ((0, 1), {}, "max_requests must be a whole number > 0, got 0"),
        ((-3, 1), {}, "max_requests must be a whole number > 0, got -3"),
        ((2.5, 1), {}, "max_requests must be a whole number > 0, got 2.5"),
        ((math.nan, 1), {}, "max_requests must be a whole number > 0, got nan"),
        ((math.inf, 1), {}, "max_requests must be a whole number > 0, got inf"),
        (("5", 1), {}, "max_requests must be a whole number > 0"),
        ((5, 0), {}, "time_window_seconds must be a finite number > 0, got 0"),
        ((5, -1.5), {}, "time_window_seconds must be a finite number > 0, got -1.5"),
        ((5, math.nan), {}, "time_window_seconds must be a finite number > 0, got nan"),
        ((5, math.inf), {}, "time_window_seconds must be a finite number > 0, got inf"),
        ((5, "1"), {}, "time_window_seconds must be a finite number > 0, got '1'"),
        ((5, True), {}, "time_window_seconds must be a finite number > 0, got True"),
        ((5, 1), {"algorithm": "leaky"}, "unknown algorithm 'leaky'; choose one of sliding_log"),
        ((5, 1), {"burst": 10}, "burst applies to token_bucket and gcra only, not 'sliding_log'"),
        (
            (5, 1),
            {"algorithm": "fixed_window", "burst": 10},
            "burst applies to token_bucket and gcra only, not 'fixed_window'",
        ),
        (
            (5, 1),
            {"algorithm": "sliding_window", "burst": 10},
            "burst applies to token_bucket and gcra only",
        ),
        ((5, 1), {"algorithm": "token_bucket", "burst": 0}, "burst must be > 0, got 0"),
        ((MAX_SLIDING_LOG_LIMIT + 1, 1), {}, "choose sliding_window or gcra for large limits"),
        ((None, 1), {}, "max_requests and time_window_seconds are required"),
        ((5, None), {}, "max_requests and time_window_seconds are required"),
        ((5, 1), {"policies": "1/s"}, "give either max_requests and time_window_seconds"),
        ((), {"policies": []}, "policies must be a non-empty sequence of Policy"),
        ((), {"policies": ["1/s"]}, "policies must be a non-empty sequence of Policy"),
        ((), {"policies": "nonsense"}, "malformed rate 'nonsense'"),
        ((5, 1), {"max_request_age": -1}, "max_request_age must be >= 0 seconds"),
        ((5, 1), {"max_clock_skew": math.nan}, "max_clock_skew must be a number of seconds"),
        ((5, 1), {"max_clients": 0}, "max_clients must be a whole number >= 1"),
        ((5, 1), {"shards": 3}, "shards must be a power of two >= 1, got 3"),
        ((5, 1), {"shards": 0}, "shards must be a power of two >= 1, got 0"),
        ((5, 1), {"clock": 5}, "clock and sleep must be callables"),
    ],
)
def test_bad_configuration(args: tuple, kwargs: dict, message: str) -> None:
    with pytest.raises(ValueError, match=message):
        RateLimiter(*args, **kwargs)


def test_large_limits_with_unbounded_algorithms() -> None:
    for algorithm in ("token_bucket", "gcra", "fixed_window", "sliding_window"):
        lim = RateLimiter(5000, 3600, algorithm=algorithm, clock=Clock())
        assert lim.check("c", cost=5000).allowed
        assert not lim.check("c").allowed
