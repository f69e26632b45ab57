"""The circuit breaker of one protected backend: a pure state machine, closed → open → half-open.

The aggregators run it once per control interval on the fleet's view of the backend (every
server's health reports of that interval, summed: :class:`Sample`) and ship the state to every
server in their control messages; the servers obey it (:class:`producer.health.BreakerGate`).

A sample is **bad** when the backend was saturated (``saturation >= saturation``) or erred
(at least ``min_requests`` calls while closed, at least one while half-open, and
``errors >= error_rate * requests``); **good** when it is not bad and says something (enough
calls, or a saturation reading); else it says nothing and changes nothing.

- **closed**: ``trip_after`` bad samples in a row (good ones reset the count) → open;
- **open**: after ``cooldown`` seconds → half-open (samples are ignored while open: servers send
  no traffic, so they say nothing about the backend);
- **half-open**: servers let ``probe`` of their calls through; one bad sample → open again (a
  fresh cooldown), ``close_after`` good samples in a row → closed.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, replace

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
STATE_NAMES = ("closed", "open", "half_open")


@dataclass(frozen=True)
class BreakerOptions:
    """Thresholds of one backend's breaker (``backend="*"``: every backend without its own)."""

    backend: str = "*"
    #: a sample with at least this share of calls failed is bad
    error_rate: float = 0.5
    #: a sample with at least this saturation (0..1, from the servers' callables) is bad; None:
    #: saturation never trips the breaker
    saturation: float | None = 0.95
    #: calls a sample needs (fleet-wide, per control interval) to count while closed
    min_requests: int = 20
    #: bad samples in a row that open a closed breaker
    trip_after: int = 2
    #: seconds an open breaker stays open before it half-opens
    cooldown: float = 5.0
    #: share of calls the servers let through while half-open (0 < probe <= 1)
    probe: float = 0.1
    #: good samples in a row that close a half-open breaker
    close_after: int = 2

    def __post_init__(self) -> None:
        if not 0.0 < self.error_rate <= 1.0:
            raise ValueError(f"error_rate must be in (0, 1], got {self.error_rate!r}")
        if self.saturation is not None and not 0.0 < self.saturation <= 1.0:
            raise ValueError(f"saturation must be in (0, 1] or None, got {self.saturation!r}")
        for name in ("min_requests", "trip_after", "close_after"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise ValueError(f"{name} must be a whole number >= 1, got {v!r}")
        if not (math.isfinite(self.cooldown) and self.cooldown >= 0):
            raise ValueError(
                f"cooldown must be a finite number of seconds >= 0, got {self.cooldown!r}"
            )
        if not 0.0 < self.probe <= 1.0:
            raise ValueError(f"probe must be in (0, 1], got {self.probe!r}")


@dataclass(frozen=True, slots=True)
class Sample:
    """A backend over one control interval, fleet-wide: calls, failed calls, and the mean
    saturation the servers reported (NaN: none did)."""

    requests: int = 0
    errors: int = 0
    saturation: float = math.nan


def verdict(options: BreakerOptions, sample: Sample, *, closed: bool) -> bool | None:
    """True: bad; False: good; None: the sample says nothing (see the module docstring)."""
    saturated = options.saturation is not None and sample.saturation >= options.saturation
    enough = sample.requests >= (options.min_requests if closed else 1)
    erring = enough and sample.errors >= options.error_rate * sample.requests
    if saturated or erring:
        return True
    if enough or not math.isnan(sample.saturation):
        return False
    return None


@dataclass(frozen=True, slots=True)
class Breaker:
    """One breaker's state: ``state`` since ``since`` (seconds, the aggregator's clock), and the
    current run of bad (closed) or good (half-open) samples."""

    state: int = CLOSED
    since: float = -math.inf
    run: int = 0

    @property
    def name(self) -> str:
        return STATE_NAMES[self.state]

    def step(self, options: BreakerOptions, now: float, sample: Sample) -> Breaker:
        """The state after one control interval ending at ``now`` with ``sample``."""
        if self.state == OPEN:
            if now - self.since >= options.cooldown:
                return Breaker(HALF_OPEN, now, 0)
            return self
        v = verdict(options, sample, closed=self.state == CLOSED)
        if v is None:
            return self
        if self.state == CLOSED:
            if not v:
                return replace(self, run=0) if self.run else self
            if self.run + 1 >= options.trip_after:
                return Breaker(OPEN, now, 0)
            return replace(self, run=self.run + 1)
        # half-open
        if v:
            return Breaker(OPEN, now, 0)
        if self.run + 1 >= options.close_after:
            return Breaker(CLOSED, now, 0)
        return replace(self, run=self.run + 1)

    def retry_after(self, options: BreakerOptions, now: float) -> float:
        """Seconds until an open breaker half-opens (0 otherwise)."""
        if self.state != OPEN:
            return 0.0
        return max(0.0, self.since + options.cooldown - now)
