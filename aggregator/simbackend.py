"""A simulated protected backend whose latency rises with load (for the simulator and tests).

A single queue of capacity ``capacity`` calls per second: at utilisation ``rho`` (the calls of
the last ``horizon`` seconds per second, over the capacity in force) a call takes an
exponentially distributed time of mean ``base / (1 - rho)`` (an M/M/1 queue's response time;
``rho`` is capped at ``1 - 1 / max_slowdown``, so its p99 is about ``4.6 x`` the mean). Past
capacity the excess fails: a call errs with probability ``1 - 1 / rho``. An :class:`Incident`
scales the capacity and adds a failure probability for a while (a slow disk, a failing
dependency). Times are seconds on the caller's clock; all draws come from one seeded generator.
"""

from __future__ import annotations

import collections
import math
from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class Incident:
    """From ``start`` to ``end`` (seconds) the capacity is ``capacity`` times the nominal one
    and every call also fails with probability ``errors``."""

    start: float
    end: float
    capacity: float = 1.0
    errors: float = 0.0

    def __post_init__(self) -> None:
        if not self.end > self.start or not self.capacity > 0 or not 0 <= self.errors <= 1:
            raise ValueError(f"bad incident {self!r}")


@dataclass(frozen=True)
class BackendSpec:
    """A backend: ``capacity`` calls per second, ``base`` seconds per call when idle."""

    capacity: float = 500.0
    base: float = 0.01
    horizon: float = 1.0
    max_slowdown: float = 50.0
    incidents: tuple[Incident, ...] = ()
    name: str = "backend"

    def __post_init__(self) -> None:
        if not (self.capacity > 0 and self.base > 0 and self.horizon > 0):
            raise ValueError("capacity, base and horizon must be > 0")
        if not self.max_slowdown > 1:
            raise ValueError("max_slowdown must be > 1")

    def capacity_at(self, t: float) -> float:
        factor = 1.0
        for i in self.incidents:
            if i.start <= t < i.end:
                factor *= i.capacity
        return self.capacity * factor

    def errors_at(self, t: float) -> float:
        ok = 1.0
        for i in self.incidents:
            if i.start <= t < i.end:
                ok *= 1.0 - i.errors
        return 1.0 - ok


class Backend:
    """One running :class:`BackendSpec`: :meth:`call` at time ``t`` gives ``(seconds, ok)``."""

    def __init__(self, spec: BackendSpec, seed: int = 0) -> None:
        self.spec = spec
        self._rng = np.random.default_rng(seed)
        self._recent: collections.deque[float] = collections.deque()
        self._draws = np.zeros(0)
        self._uniform = np.zeros(0)
        self._i = 0

    def utilisation(self, t: float) -> float:
        """Calls in ``(t - horizon, t]`` per second over the capacity in force at ``t``."""
        recent = self._recent
        while recent and recent[0] <= t - self.spec.horizon:
            recent.popleft()
        return len(recent) / self.spec.horizon / self.spec.capacity_at(t)

    def call(self, t: float) -> tuple[float, bool]:
        """One call at ``t``: its latency (seconds) and whether it succeeded."""
        if self._i >= self._draws.size:
            self._draws = self._rng.exponential(1.0, 4096)
            self._uniform = self._rng.random(4096)
            self._i = 0
        e, u = float(self._draws[self._i]), float(self._uniform[self._i])
        self._i += 1
        s = self.spec
        rho = self.utilisation(t)
        self._recent.append(t)
        slow = min(1.0 / max(1.0 - rho, 1e-12), s.max_slowdown)
        fail = 1.0 - (1.0 - s.errors_at(t)) * (1.0 / rho if rho > 1.0 else 1.0)
        return s.base * slow * e, u >= fail

    @staticmethod
    def p99_at(spec: BackendSpec, rate: float, t: float = -math.inf) -> float:
        """The p99 latency (seconds) at a steady ``rate`` calls per second."""
        rho = rate / spec.capacity_at(t)
        slow = min(1.0 / max(1.0 - rho, 1e-12), spec.max_slowdown)
        return spec.base * slow * math.log(100.0)
