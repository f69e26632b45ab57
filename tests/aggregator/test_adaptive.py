"""Adaptive factors (``aggregator.adaptive``): the rules against a plain reference, the bounds
(never below the floor, never above 1), the pressure signal, and the option parser."""

from __future__ import annotations

import math

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.adaptive import Adaptive, AdaptiveOptions, Signal, pressure
from aggregator.control import parse_adaptive, parse_breakers

FAST = settings(deadline=None, max_examples=300, suppress_health_check=[HealthCheck.too_slow])

policies = st.builds(
    AdaptiveOptions,
    rule=st.sampled_from(["aimd", "gradient"]),
    floor=st.sampled_from([0.05, 0.2, 0.5, 1.0]),
    target_p99=st.sampled_from([0.1, 0.25]),
    increase=st.sampled_from([0.0, 0.05, 0.3]),
    decrease=st.sampled_from([0.3, 0.7, 0.95]),
    cooldown=st.sampled_from([0.0, 0.5, 2.0]),
)
loads = st.lists(
    st.tuples(st.sampled_from([0.1, 0.5, 1.0]), st.one_of(st.just(math.nan), st.floats(0.0, 20.0))),
    max_size=60,
)


@FAST
@given(policies, loads)
def test_the_factor_follows_the_reference_and_stays_within_floor_and_one(
    o: AdaptiveOptions, steps: list[tuple[float, float]]
) -> None:
    state, now = Adaptive(), 0.0
    factor, last_cut = 1.0, -math.inf  # the reference
    for dt, load in steps:
        now += dt
        state = state.step(o, now, load)
        if load > 1.0:
            if now - last_cut >= o.cooldown:
                cut = o.decrease if o.rule == "aimd" else max(o.decrease, 1.0 / load)
                factor, last_cut = max(o.floor, factor * cut), now
        else:
            factor = min(1.0, factor + o.increase)
        assert state.factor == pytest.approx(factor)
        assert o.floor - 1e-12 <= state.factor <= 1.0


def test_aimd_cuts_once_per_cooldown_and_climbs_back() -> None:
    o = AdaptiveOptions(floor=0.2, target_p99=0.25, increase=0.1, decrease=0.5, cooldown=1.0)
    a = Adaptive()
    a = a.step(o, 0.5, 2.0)
    assert a.factor == 0.5
    a = a.step(o, 1.0, 2.0)  # within the cool-down: the last cut has not shown yet
    assert a.factor == 0.5
    a = a.step(o, 1.5, 2.0).step(o, 2.5, 2.0).step(o, 3.5, 2.0)
    assert a.factor == 0.2  # the floor
    for t in range(10):
        a = a.step(o, 4.0 + t, 0.5)
    assert a.factor == 1.0


def test_gradient_cuts_in_proportion_to_the_overshoot() -> None:
    o = AdaptiveOptions(rule="gradient", target_p99=0.1, decrease=0.3, floor=0.1)
    assert Adaptive().step(o, 1.0, 1.25).factor == pytest.approx(0.8)
    assert Adaptive().step(o, 1.0, 10.0).factor == pytest.approx(0.3)  # at most `decrease`


def test_pressure_uses_only_the_configured_signals_with_enough_calls() -> None:
    o = AdaptiveOptions(target_p99=0.2, max_errors=0.1, min_requests=10)
    assert pressure(o, Signal(100, 5, 0.3)) == pytest.approx(1.5)
    assert pressure(o, Signal(100, 20, 0.1)) == pytest.approx(2.0)
    assert math.isnan(pressure(o, Signal(5, 5, 9.0)))  # too few calls
    assert pressure(o, Signal(100, 0, 0.1, saturation=1.0)) == pytest.approx(0.5)  # not configured
    s = AdaptiveOptions(max_saturation=0.8)
    assert pressure(s, Signal(saturation=0.4)) == pytest.approx(0.5)


@pytest.mark.parametrize(
    "kwargs",
    [
        {},  # no signal
        {"target_p99": 0.1, "rule": "pid"},
        {"target_p99": 0.1, "floor": 0.0},
        {"target_p99": 0.1, "floor": 1.5},
        {"target_p99": -1.0},
        {"target_p99": 0.1, "decrease": 1.0},
        {"target_p99": 0.1, "increase": 2.0},
        {"target_p99": 0.1, "cooldown": -1.0},
        {"target_p99": 0.1, "min_requests": 0},
    ],
)
def test_bad_policies_are_refused(kwargs: dict[str, object]) -> None:
    with pytest.raises(ValueError):
        AdaptiveOptions(**kwargs)  # type: ignore[arg-type]


def test_parse_the_command_line_syntax() -> None:
    parsed = parse_adaptive(
        "scope=free, floor=0.2, target_p99=0.25, max_errors=0.05; "
        "scope=*, rule=gradient, max-saturation=0.9, min_requests=5;"
    )
    assert parsed == (
        AdaptiveOptions(scope="free", floor=0.2, target_p99=0.25, max_errors=0.05),
        AdaptiveOptions(scope="*", rule="gradient", max_saturation=0.9, min_requests=5),
    )
    assert (
        parse_breakers("backend=db,error_rate=0.3,saturation=none,cooldown=2")[0].saturation is None
    )
    assert parse_adaptive("") == ()


@pytest.mark.parametrize(
    ("text", "match"),
    [
        ("scope=free", "at least one signal"),
        ("scope=free,target=0.2", "KEY=VALUE"),
        ("target_p99", "KEY=VALUE"),
        ("target_p99=fast", "bad value for target_p99"),
        ("target_p99=0.2,min_requests=2.5", "bad value for min_requests"),
    ],
)
def test_parse_errors_say_what_is_wrong(text: str, match: str) -> None:
    with pytest.raises(ValueError, match=match):
        parse_adaptive(text)
