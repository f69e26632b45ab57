"""Adaptive limits: a factor in ``[floor, 1]`` per scope, moved by the backends' health.

The aggregators run one :class:`Adaptive` per configured scope once per control interval, on the
fleet's view of the backends (every server's health reports of the interval, merged:
:class:`Signal`), and multiply the configured limits of the scope's clients by the factor
(:class:`limiter.keylimits.ScaledKeyLimits`): the ceiling is the configured limit, the floor
``floor`` times it. The servers get the same factors in the control messages.

**Pressure** of one backend: the largest of ``p99 / target_p99``, ``error rate / max_errors``
(both only with at least ``min_requests`` calls in the interval) and
``saturation / max_saturation``, over the signals configured; with ``backend="*"`` the largest
over every backend. Above 1 the backend is overloaded. Rules:

- ``aimd`` (additive increase, multiplicative decrease): overloaded → ``factor * decrease``,
  then no further decrease for ``cooldown`` seconds (the effect of a cut shows up one lease and
  one report later; cutting again before that overshoots); otherwise ``factor + increase``.
- ``gradient``: overloaded → ``factor * max(decrease, 1 / pressure)``: the cut is proportional
  to the overshoot (a p99 twice the target halves the factor, at most down to ``decrease``),
  with the same cooldown; otherwise ``factor + increase``.

No pressure known (no calls, no saturation) counts as not overloaded: nobody uses the backend,
so the limits climb back at ``increase`` per interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

RULES = ("aimd", "gradient")


@dataclass(frozen=True)
class AdaptiveOptions:
    """One scope's policy (fractions of the configured limit; times in seconds)."""

    #: ``"*"``: every client; ``"default"``: clients without their own limit; else a tier name
    scope: str = "*"
    #: the backend whose health drives it; ``"*"``: the worst of all backends
    backend: str = "*"
    rule: str = "aimd"
    #: the lowest factor
    floor: float = 0.1
    #: overloaded when the fleet's p99 latency of the interval exceeds this (seconds); None: off
    target_p99: float | None = None
    #: overloaded when the share of failed calls exceeds this; None: off
    max_errors: float | None = None
    #: overloaded when the mean saturation exceeds this (0..1); None: off
    max_saturation: float | None = None
    #: added to the factor per interval while not overloaded
    increase: float = 0.05
    #: the factor's multiplier on overload (``aimd``), its smallest multiplier (``gradient``)
    decrease: float = 0.7
    #: seconds after a decrease before the next one
    cooldown: float = 1.0
    #: calls (fleet-wide, per interval) the latency and error signals need
    min_requests: int = 20

    def __post_init__(self) -> None:
        if self.rule not in RULES:
            raise ValueError(f"unknown rule {self.rule!r}; choose one of {', '.join(RULES)}")
        if not 0.0 < self.floor <= 1.0:
            raise ValueError(f"floor must be in (0, 1], got {self.floor!r}")
        if self.target_p99 is None and self.max_errors is None and self.max_saturation is None:
            raise ValueError("give at least one signal: target_p99, max_errors, max_saturation")
        for name in ("target_p99", "max_errors", "max_saturation"):
            v = getattr(self, name)
            if v is not None and not (math.isfinite(v) and v > 0):
                raise ValueError(f"{name} must be > 0, got {v!r}")
        if not (math.isfinite(self.increase) and 0.0 <= self.increase <= 1.0):
            raise ValueError(f"increase must be in [0, 1], got {self.increase!r}")
        if not 0.0 < self.decrease < 1.0:
            raise ValueError(f"decrease must be in (0, 1), got {self.decrease!r}")
        if not (math.isfinite(self.cooldown) and self.cooldown >= 0):
            raise ValueError(f"cooldown must be >= 0 seconds, got {self.cooldown!r}")
        if isinstance(self.min_requests, bool) or not isinstance(self.min_requests, int):
            raise ValueError(f"min_requests must be a whole number, got {self.min_requests!r}")
        if self.min_requests < 1:
            raise ValueError(f"min_requests must be >= 1, got {self.min_requests!r}")


@dataclass(frozen=True, slots=True)
class Signal:
    """One backend over one control interval, fleet-wide: calls, failed calls, the p99 latency
    of the merged histogram (seconds; NaN: no calls) and the mean saturation (NaN: none)."""

    requests: int = 0
    errors: int = 0
    p99: float = math.nan
    saturation: float = math.nan


def pressure(options: AdaptiveOptions, signal: Signal) -> float:
    """How far over its targets the backend is (> 1: overloaded); NaN: nothing known."""
    values = []
    if signal.requests >= options.min_requests:
        if options.target_p99 is not None and not math.isnan(signal.p99):
            values.append(signal.p99 / options.target_p99)
        if options.max_errors is not None:
            values.append(signal.errors / signal.requests / options.max_errors)
    if options.max_saturation is not None and not math.isnan(signal.saturation):
        values.append(signal.saturation / options.max_saturation)
    return max(values) if values else math.nan


@dataclass(frozen=True, slots=True)
class Adaptive:
    """One scope's factor, and when it was last cut (the aggregator's clock, seconds)."""

    factor: float = 1.0
    cut_at: float = -math.inf

    def step(self, options: AdaptiveOptions, now: float, load: float) -> Adaptive:
        """The factor after one interval ending at ``now`` with pressure ``load``
        (:func:`pressure`; for ``backend="*"`` the largest over the backends)."""
        if load > 1.0:
            if now - self.cut_at < options.cooldown:
                return self
            cut = options.decrease
            if options.rule == "gradient":
                cut = max(options.decrease, 1.0 / load)
            return Adaptive(max(options.floor, self.factor * cut), now)
        if self.factor >= 1.0:
            return self
        return Adaptive(min(1.0, self.factor + options.increase), self.cut_at)
