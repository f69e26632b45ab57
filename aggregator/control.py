"""The aggregator's control plane: backend health in, adaptive factors and breakers out.

Every server with a backend monitor sends a health report to every usage partition
(:mod:`producer.wire`, type 3), so every aggregator that owns a partition hears every server.
:meth:`Controller.observe` folds the reports in (each once: by server, incarnation and sequence
number; reports appended more than ``max_health_age`` ago, a rebuild's replay, are skipped).
Every ``interval`` seconds :meth:`Controller.step` merges what came in into one fleet-wide view
per backend (calls and errors summed, latency histograms merged, saturation averaged over the
reports), moves each scope's factor (:mod:`aggregator.adaptive`) and each backend's breaker
(:mod:`aggregator.breaker`), applies the factors to the limits this aggregator grants by
(:class:`limiter.keylimits.ScaledKeyLimits`: its version changes, so the partitions look their
clients' limits up again at the same tick) and returns the control message the aggregator sends
to every grant partition.

All aggregators compute from the same reports, so they agree up to the phase of their intervals;
servers obey the most restrictive fresh message (:class:`producer.health.ControlView`). An
aggregator that owns no partition hears nothing and sends nothing.

Options on the command line (``drl aggregator run --adaptive ... --breaker ...``): policies
separated by ``;``, each ``key=value`` pairs separated by ``,`` (:func:`parse_adaptive`,
:func:`parse_breakers`); the keys are the fields of :class:`~aggregator.adaptive.AdaptiveOptions`
and :class:`~aggregator.breaker.BreakerOptions`, ``none`` turns an optional signal off.
"""

from __future__ import annotations

import dataclasses
import math
import secrets
import threading
from dataclasses import dataclass, field
from typing import Any, TypeVar

import numpy as np

from limiter.keylimits import FixedKeyLimits, KeyLimits, LimitSource, ScaledKeyLimits
from producer import wire
from producer.health import quantile

from .adaptive import Adaptive, AdaptiveOptions, Signal, pressure
from .breaker import Breaker, BreakerOptions, Sample

#: Seconds between control steps (and control messages).
DEFAULT_CONTROL_INTERVAL = 0.5
#: Health reports appended longer ago than this (seconds) are skipped (a rebuild's replay).
DEFAULT_MAX_HEALTH_AGE = 5.0
#: Most backends one controller tracks; reports naming more are skipped (counted).
MAX_TRACKED_BACKENDS = 256
#: Most servers whose health sequence numbers are kept (the oldest are forgotten).
MAX_TRACKED_SERVERS = 65_536


@dataclass(frozen=True)
class ControlOptions:
    """What the control plane runs; times in seconds."""

    adaptive: tuple[AdaptiveOptions, ...] = ()
    breakers: tuple[BreakerOptions, ...] = ()
    #: seconds between control steps and control messages
    interval: float = DEFAULT_CONTROL_INTERVAL
    #: seconds the servers keep a control message's state after receiving it (then: factor 1,
    #: breakers closed); default: three intervals
    ttl: float | None = None
    max_health_age: float = DEFAULT_MAX_HEALTH_AGE

    def __post_init__(self) -> None:
        if not (math.isfinite(self.interval) and self.interval > 0):
            raise ValueError(f"interval must be > 0 seconds, got {self.interval!r}")
        if self.ttl is not None and not (math.isfinite(self.ttl) and self.ttl > 0):
            raise ValueError(f"ttl must be > 0 seconds, got {self.ttl!r}")
        if not self.max_health_age > 0:
            raise ValueError(f"max_health_age must be > 0 seconds, got {self.max_health_age!r}")
        names = [b.backend for b in self.breakers]
        if len(set(names)) != len(names):
            raise ValueError(f"two breakers for one backend: {names}")

    @property
    def state_ttl(self) -> float:
        return self.ttl if self.ttl is not None else 3 * self.interval

    @property
    def enabled(self) -> bool:
        return bool(self.adaptive or self.breakers)


_T = TypeVar("_T")


def _parse(text: str, cls: type[_T], what: str) -> tuple[_T, ...]:
    fields = {f.name: f for f in dataclasses.fields(cls)}  # type: ignore[arg-type]
    out = []
    for part in text.split(";"):
        if not part.strip():
            continue
        kwargs: dict[str, Any] = {}
        for pair in part.split(","):
            key, sep, value = pair.partition("=")
            key, value = key.strip().replace("-", "_"), value.strip()
            if not sep or key not in fields:
                known = ", ".join(fields)
                raise ValueError(
                    f"{what} {part.strip()!r}: expected KEY=VALUE with a key of {known}"
                )
            default = fields[key].default
            try:
                if value.lower() == "none":
                    kwargs[key] = None
                elif isinstance(default, str):
                    kwargs[key] = value
                elif isinstance(default, int) and not isinstance(default, bool):
                    kwargs[key] = int(value)
                else:
                    kwargs[key] = float(value)
            except ValueError:
                raise ValueError(
                    f"{what} {part.strip()!r}: bad value for {key}: {value!r}"
                ) from None
        try:
            out.append(cls(**kwargs))
        except (TypeError, ValueError) as e:
            raise ValueError(f"{what} {part.strip()!r}: {e}") from None
    return tuple(out)


def parse_adaptive(text: str) -> tuple[AdaptiveOptions, ...]:
    """``"scope=free,floor=0.2,target_p99=0.25; scope=*,max_errors=0.05"`` -> options."""
    return _parse(text, AdaptiveOptions, "adaptive policy")


def parse_breakers(text: str) -> tuple[BreakerOptions, ...]:
    """``"backend=db,error_rate=0.5,cooldown=5; backend=*,saturation=0.9"`` -> options."""
    return _parse(text, BreakerOptions, "breaker")


class _Acc:
    """One backend's reports since the last step."""

    __slots__ = ("errors", "latency", "requests", "saturation", "saturations")

    def __init__(self) -> None:
        self.requests = 0
        self.errors = 0
        self.latency = np.zeros(wire.LATENCY_BUCKETS, dtype=np.int64)
        self.saturation = 0.0
        self.saturations = 0

    def signal(self) -> Signal:
        p99 = quantile(self.latency.tolist(), 0.99)
        sat = self.saturation / self.saturations if self.saturations else math.nan
        return Signal(self.requests, self.errors, p99, sat)


@dataclass
class ControlStats:
    health_reports: int = 0
    health_duplicates: int = 0
    health_stale: int = 0
    backends_skipped: int = 0
    steps: int = 0
    messages: int = 0
    #: backend -> its fleet-wide signal of the last step
    signals: dict[str, Signal] = field(default_factory=dict)


class Controller:
    """Adaptive factors and breakers for one aggregator (see the module docstring)."""

    def __init__(self, options: ControlOptions, aggregator_id: str) -> None:
        self.options = options
        self.aggregator_id = aggregator_id
        self.epoch = secrets.randbits(63)
        self.stats = ControlStats()
        self.scaled: ScaledKeyLimits | None = None
        self._lock = threading.Lock()
        self._seq = 0
        self._seen: dict[str, tuple[int, int]] = {}  # server -> (incarnation, seq)
        self._acc: dict[str, _Acc] = {}
        self._known: set[str] = set()
        self._adaptive = [Adaptive() for _ in options.adaptive]
        self._breakers: dict[str, Breaker] = {}
        self._next = -math.inf
        self._factors: dict[str, float] = {}

    # -- wiring --------------------------------------------------------------------------------

    def wrap(self, limits: LimitSource | None, default_limit: float) -> ScaledKeyLimits:
        """The limit source the aggregator grants by: ``limits`` (default: ``default_limit``
        for everyone) scaled by this controller's factors."""
        inner = limits if limits is not None else FixedKeyLimits(KeyLimits.uniform(default_limit))
        self.scaled = ScaledKeyLimits(inner)
        return self.scaled

    # -- health in -----------------------------------------------------------------------------

    def observe(self, report: wire.HealthReport, appended: float, wall: float) -> bool:
        """Fold one health report in (``appended``: its append time, ``wall``: now, both epoch
        seconds); False if it was a duplicate (another partition's copy) or too old."""
        if wall - appended > self.options.max_health_age:
            self.stats.health_stale += 1
            return False
        last = self._seen.get(report.server_id)
        if last is not None and last[0] == report.incarnation and report.seq <= last[1]:
            self.stats.health_duplicates += 1
            return False
        if last is None and len(self._seen) >= MAX_TRACKED_SERVERS:
            self._seen.pop(next(iter(self._seen)))
        self._seen[report.server_id] = (report.incarnation, report.seq)
        self.stats.health_reports += 1
        for b in report.backends:
            acc = self._acc.get(b.name)
            if acc is None:
                if b.name not in self._known and len(self._known) >= MAX_TRACKED_BACKENDS:
                    self.stats.backends_skipped += 1
                    continue
                self._known.add(b.name)
                acc = self._acc[b.name] = _Acc()
            acc.requests += b.requests
            acc.errors += b.errors
            acc.latency += np.asarray(b.latency, dtype=np.int64)
            if not math.isnan(b.saturation):
                acc.saturation += b.saturation
                acc.saturations += 1
        return True

    # -- the step ------------------------------------------------------------------------------

    def step(self, now: float) -> wire.ControlMessage | None:
        """Every ``interval``: move factors and breakers, return the control message to send
        (None between steps, or with nothing configured)."""
        o = self.options
        if not o.enabled or now < self._next:
            return None
        self._next = (
            now + o.interval if self._next == -math.inf else max(self._next + o.interval, now)
        )
        signals = {name: acc.signal() for name, acc in self._acc.items()}
        for name in self._known:
            signals.setdefault(name, Signal())
        self._acc = {}
        factors: dict[str, float] = {}
        for i, policy in enumerate(o.adaptive):
            load = self._pressure(policy, signals)
            self._adaptive[i] = self._adaptive[i].step(policy, now, load)
            f = self._adaptive[i].factor
            factors[policy.scope] = min(f, factors.get(policy.scope, 1.0))
        infos = []
        for name, options in self._breaker_options(signals):
            s = signals.get(name, Signal())
            sample = Sample(s.requests, s.errors, s.saturation)
            breaker = self._breakers.get(name, Breaker()).step(options, now, sample)
            self._breakers[name] = breaker
            infos.append(
                wire.BreakerInfo(
                    name, breaker.state, options.probe, breaker.retry_after(options, now)
                )
            )
        with self._lock:
            self.stats.signals = signals
            self.stats.steps += 1
            self._factors = factors
        if self.scaled is not None:
            self.scaled.set_factors(factors)
        self._seq += 1
        self.stats.messages += 1
        return wire.ControlMessage(
            self.aggregator_id,
            self.epoch,
            self._seq,
            now,
            o.state_ttl,
            tuple(sorted(factors.items())),
            tuple(infos),
        )

    def _pressure(self, options: AdaptiveOptions, signals: dict[str, Signal]) -> float:
        if options.backend != "*":
            return pressure(options, signals.get(options.backend, Signal()))
        loads = [pressure(options, s) for s in signals.values()]
        known = [x for x in loads if not math.isnan(x)]
        return max(known) if known else math.nan

    def _breaker_options(self, signals: dict[str, Signal]) -> list[tuple[str, BreakerOptions]]:
        named = {b.backend: b for b in self.options.breakers}
        fallback = named.pop("*", None)
        out = sorted(named.items())
        if fallback is not None:
            out += [(n, fallback) for n in sorted(self._known) if n not in named]
        return out

    # -- for metrics ---------------------------------------------------------------------------

    def factors(self) -> dict[str, float]:
        """Scope -> factor, for every configured scope (1 included)."""
        with self._lock:
            current = dict(self._factors)
        for options in self.options.adaptive:
            current.setdefault(options.scope, 1.0)
        return current

    def breakers(self) -> dict[str, str]:
        """Backend -> ``closed``, ``open`` or ``half_open``."""
        return {name: b.name for name, b in sorted(self._breakers.copy().items())}

    def signals(self) -> dict[str, Signal]:
        with self._lock:
            return dict(self.stats.signals)
