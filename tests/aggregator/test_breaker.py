"""The circuit breaker's state machine (``aggregator.breaker``) against a plain reference model,
and the invariants it must keep, over random sequences of fleet samples."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.breaker import CLOSED, HALF_OPEN, OPEN, Breaker, BreakerOptions, Sample, verdict

FAST = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])


class Reference:
    """The module docstring, written out as mutable state and if-statements."""

    def __init__(self, o: BreakerOptions) -> None:
        self.o = o
        self.state = "closed"
        self.opened_at = 0.0
        self.bad_in_a_row = 0
        self.good_in_a_row = 0

    def feed(self, now: float, requests: int, errors: int, saturation: float) -> None:
        o = self.o
        if self.state == "open":
            if now - self.opened_at >= o.cooldown:
                self.state = "half_open"
                self.good_in_a_row = 0
            return
        need = o.min_requests if self.state == "closed" else 1
        has_saturation = not math.isnan(saturation)
        saturated = o.saturation is not None and has_saturation and saturation >= o.saturation
        failing = requests >= need and errors / requests >= o.error_rate
        if saturated or failing:
            kind = "bad"
        elif requests >= need or has_saturation:
            kind = "good"
        else:
            return
        if self.state == "closed":
            if kind == "good":
                self.bad_in_a_row = 0
            else:
                self.bad_in_a_row += 1
                if self.bad_in_a_row >= o.trip_after:
                    self.state, self.opened_at, self.bad_in_a_row = "open", now, 0
        elif kind == "bad":
            self.state, self.opened_at = "open", now
        else:
            self.good_in_a_row += 1
            if self.good_in_a_row >= o.close_after:
                self.state, self.good_in_a_row, self.bad_in_a_row = "closed", 0, 0


options = st.builds(
    BreakerOptions,
    error_rate=st.sampled_from([0.1, 0.25, 0.5, 1.0]),
    saturation=st.sampled_from([None, 0.5, 0.9]),
    min_requests=st.integers(1, 30),
    trip_after=st.integers(1, 4),
    cooldown=st.sampled_from([0.0, 0.5, 1.0, 3.0]),
    probe=st.sampled_from([0.05, 0.5, 1.0]),
    close_after=st.integers(1, 4),
)
samples = st.lists(
    st.tuples(
        st.sampled_from([0.1, 0.5, 1.0]),  # seconds since the previous step
        st.integers(0, 60),
        st.floats(0.0, 1.0),  # share of the calls that failed
        st.one_of(st.just(math.nan), st.floats(0.0, 1.0)),
    ),
    max_size=80,
)


@FAST
@given(options, samples)
def test_the_breaker_follows_the_reference_model(
    o: BreakerOptions, steps: list[tuple[float, int, float, float]]
) -> None:
    breaker, reference, now = Breaker(), Reference(o), 0.0
    for dt, requests, share, saturation in steps:
        now += dt
        errors = math.floor(share * requests)
        breaker = breaker.step(o, now, Sample(requests, errors, saturation))
        reference.feed(now, requests, errors, saturation)
        assert breaker.name == reference.state


@FAST
@given(options, samples)
def test_invariants(o: BreakerOptions, steps: list[tuple[float, int, float, float]]) -> None:
    breaker, now = Breaker(), 0.0
    bad_run = 0
    for dt, requests, share, saturation in steps:
        now += dt
        sample = Sample(requests, math.floor(share * requests), saturation)
        before = breaker
        breaker = breaker.step(o, now, sample)
        # never closed -> half-open, never half-open -> open without a bad sample
        assert (before.state, breaker.state) != (CLOSED, HALF_OPEN)
        assert (before.state, breaker.state) != (OPEN, CLOSED)
        if before.state == OPEN and breaker.state == HALF_OPEN:
            assert now - before.since >= o.cooldown  # open for at least the cool-down
        if before.state == OPEN and breaker.state == OPEN:
            assert breaker.retry_after(o, now) <= o.cooldown
        # a closed breaker opens only after trip_after bad samples in a row (silent ones skipped)
        if before.state == CLOSED:
            v = verdict(o, sample, closed=True)
            bad_run = bad_run + 1 if v else (bad_run if v is None else 0)
            if breaker.state == OPEN:
                assert bad_run >= o.trip_after
        if breaker.state != CLOSED:
            bad_run = 0
        assert breaker.retry_after(o, now) == 0.0 or breaker.state == OPEN


def test_a_failing_backend_opens_half_opens_and_closes() -> None:
    o = BreakerOptions(error_rate=0.5, min_requests=10, trip_after=2, cooldown=2.0, close_after=2)
    b = Breaker()
    b = b.step(o, 1.0, Sample(100, 80))
    assert b.state == CLOSED  # one bad sample is not "keeps answering errors"
    b = b.step(o, 1.5, Sample(5, 5))
    assert b.state == CLOSED  # too few calls to say anything
    b = b.step(o, 2.0, Sample(100, 90))
    assert b.state == OPEN and b.retry_after(o, 2.5) == pytest.approx(1.5)
    b = b.step(o, 3.9, Sample())
    assert b.state == OPEN
    b = b.step(o, 4.0, Sample())
    assert b.state == HALF_OPEN
    b = b.step(o, 4.5, Sample(3, 3))  # the probes fail: open again, a fresh cool-down
    assert b.state == OPEN and b.since == 4.5
    b = b.step(o, 6.5, Sample()).step(o, 7.0, Sample(4, 0)).step(o, 7.5, Sample(4, 1))
    assert b.state == CLOSED


def test_saturation_alone_trips_it() -> None:
    o = BreakerOptions(saturation=0.9, trip_after=3)
    b = Breaker()
    for t in (1.0, 2.0, 3.0):
        b = b.step(o, t, Sample(saturation=0.95))
    assert b.state == OPEN
    assert (
        Breaker()
        .step(BreakerOptions(saturation=None, trip_after=1), 1, Sample(saturation=1.0))
        .state
        == CLOSED
    )


@pytest.mark.parametrize(
    "kwargs",
    [
        {"error_rate": 0.0},
        {"error_rate": 1.5},
        {"saturation": 0.0},
        {"min_requests": 0},
        {"trip_after": 0},
        {"close_after": 1.5},
        {"cooldown": -1.0},
        {"cooldown": math.inf},
        {"probe": 0.0},
        {"probe": 2.0},
    ],
)
def test_bad_options_are_refused(kwargs: dict[str, float]) -> None:
    with pytest.raises(ValueError):
        BreakerOptions(**kwargs)  # type: ignore[arg-type]
