"""Backend health on the server side: what the app measures, and the breakers it obeys.

- :class:`BackendMonitor`: the app calls ``observe(backend, seconds, ok)`` after each call to a
  protected backend (a few hundred nanoseconds: a bucket search and four increments under the
  backend's lock, no allocation), and may register ``watch(backend, fn)``, a callable returning
  the backend's saturation in 0..1 (CPU, queue depth over capacity, pool use) that the agent's
  reporter thread calls once per health report. :meth:`BackendMonitor.drain` turns the counts
  since the last drain into the :class:`~producer.wire.BackendHealth` of a health report.
- :class:`ControlView`: the control messages of every aggregator, combined (the most
  restrictive fresh answer wins: the smallest factor, the most closed breaker); state older
  than its ``ttl`` is dropped (factor 1, breaker closed).
- :class:`BreakerGate`: ``agent.breaker("db").allow()`` before calling the backend: True while
  closed, False while open, a ``probe`` share of calls while half-open.

:func:`latency_bucket` and :func:`quantile` define the latency histogram both sides share
(:data:`producer.wire.LATENCY_EDGES`).
"""

from __future__ import annotations

import bisect
import math
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass

from . import wire

#: Most backends one monitor tracks; calls naming further backends are counted in ``dropped``.
MAX_BACKENDS = 64

_EDGES = list(wire.LATENCY_EDGES)


def latency_bucket(seconds: float) -> int:
    """The histogram bucket of a latency (``LATENCY_EDGES[i-1] <= seconds < LATENCY_EDGES[i]``)."""
    return bisect.bisect_right(_EDGES, seconds)


def quantile(counts: list[int] | tuple[int, ...], q: float) -> float:
    """The ``q`` quantile (0 < q <= 1) of a latency histogram, seconds; NaN when it is empty.

    Interpolated geometrically within the bucket that holds the rank (buckets are a factor of
    10^0.1 = 1.26 wide, so the estimate is within that factor of the truth); the first bucket
    reports its upper edge (100 µs), the last its lower edge (100 s)."""
    total = sum(counts)
    if total <= 0:
        return math.nan
    rank = q * total
    seen = 0
    for i, c in enumerate(counts):
        if c and seen + c >= rank:
            if i == 0:
                return _EDGES[0]
            if i >= len(_EDGES):
                return _EDGES[-1]
            lo, hi = _EDGES[i - 1], _EDGES[i]
            return float(lo * (hi / lo) ** ((rank - seen) / c))
        seen += c
    return _EDGES[-1]


class _Backend:
    __slots__ = ("errors", "latency", "lock", "requests", "watch")

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.requests = 0
        self.errors = 0
        self.latency = [0] * wire.LATENCY_BUCKETS
        self.watch: Callable[[], float] | None = None


class BackendMonitor:
    """Per-backend call counts, errors and a latency histogram, drained by the agent.

    ``saturation``: backend name -> a callable returning its saturation in 0..1, called from the
    agent's reporter thread once per health report (never on the request path); a callable that
    raises or returns something outside 0..1 (clipped; NaN: not reported) is counted in
    ``watch_errors``.
    """

    def __init__(self, saturation: Mapping[str, Callable[[], float]] | None = None) -> None:
        self._backends: dict[str, _Backend] = {}
        self._lock = threading.Lock()
        self.dropped = 0
        self.watch_errors = 0
        for name, fn in (saturation or {}).items():
            self.watch(name, fn)

    def _backend(self, name: str) -> _Backend | None:
        b = self._backends.get(name)
        if b is not None:
            return b
        wire._pack_str("backend name", name)
        with self._lock:
            b = self._backends.get(name)
            if b is None:
                if len(self._backends) >= MAX_BACKENDS:
                    self.dropped += 1
                    return None
                b = self._backends[name] = _Backend()
            return b

    def watch(self, backend: str, saturation: Callable[[], float]) -> None:
        """Report ``saturation()`` (0..1) for ``backend`` with every health report."""
        b = self._backend(backend)
        if b is None:
            raise ValueError(f"more than {MAX_BACKENDS} backends")
        b.watch = saturation

    def observe(self, backend: str, seconds: float, ok: bool = True) -> None:
        """One call to ``backend`` took ``seconds`` and succeeded (``ok``) or failed."""
        b = self._backends.get(backend) or self._backend(backend)
        if b is None:
            return
        i = bisect.bisect_right(_EDGES, seconds)
        with b.lock:
            b.requests += 1
            if not ok:
                b.errors += 1
            b.latency[i] += 1

    @property
    def backends(self) -> list[str]:
        return sorted(self._backends)

    def drain(self) -> tuple[wire.BackendHealth, ...]:
        """The counts since the last drain (and zero them), with each watched saturation."""
        out = []
        for name, b in sorted(self._backends.copy().items()):
            fresh = [0] * wire.LATENCY_BUCKETS
            with b.lock:
                requests, errors, latency = b.requests, b.errors, b.latency
                b.requests, b.errors, b.latency = 0, 0, fresh
            saturation = math.nan
            if b.watch is not None:
                try:
                    saturation = float(b.watch())
                except Exception:
                    self.watch_errors += 1
                else:
                    if math.isnan(saturation):
                        self.watch_errors += 1
                    else:
                        saturation = min(1.0, max(0.0, saturation))
            out.append(
                wire.BackendHealth(
                    name,
                    min(requests, 0xFFFFFFFF),
                    min(errors, 0xFFFFFFFF),
                    saturation,
                    tuple(min(c, 0xFFFFFFFF) for c in latency),
                )
            )
        return tuple(out)


# -- what the aggregators said -------------------------------------------------------------------

CLOSED, OPEN, HALF_OPEN = 0, 1, 2
#: The most restrictive state first: what a server obeys when aggregators disagree.
_STRICTNESS = {OPEN: 2, HALF_OPEN: 1, CLOSED: 0}


class BreakerGate:
    """One backend's breaker on this server: check :meth:`allow` before each call.

    State comes from the aggregators' control messages (:class:`ControlView`); with none fresh,
    the gate is closed (calls go through). Half-open lets ``probe`` of the calls through, evenly
    (a credit counter: every ``1/probe``-th call). Counters ``allowed`` and ``refused`` are
    plain ints (increments may rarely be lost between threads: they are for metrics).
    """

    __slots__ = (
        "_clock",
        "_credit",
        "allowed",
        "expires",
        "name",
        "probe",
        "refused",
        "state",
        "until",
    )

    def __init__(self, name: str, clock: Callable[[], float]) -> None:
        self.name = name
        self._clock = clock
        self.state = CLOSED
        self.probe = 1.0
        self.expires = -math.inf  # limiter clock: the state is dropped after this
        self.until = -math.inf  # limiter clock: when an open breaker half-opens (estimate)
        self._credit = 0.0
        self.allowed = 0
        self.refused = 0

    def current(self) -> str:
        """``closed``, ``open`` or ``half_open`` (closed when the state is stale)."""
        state = self.state if self._clock() <= self.expires else CLOSED
        return wire.BREAKER_STATES[state]

    def allow(self) -> bool:
        """Whether to call the backend now."""
        state = self.state
        if state != CLOSED and self._clock() > self.expires:
            state = CLOSED
        if state == CLOSED:
            self.allowed += 1
            return True
        if state == HALF_OPEN:
            credit = self._credit + self.probe
            if credit >= 1.0:
                self._credit = credit - 1.0
                self.allowed += 1
                return True
            self._credit = credit
        self.refused += 1
        return False

    def retry_after(self) -> float:
        """Seconds until an open breaker half-opens (0 when calls may go through)."""
        if self.state != OPEN or self._clock() > self.expires:
            return 0.0
        return max(0.0, self.until - self._clock())


@dataclass(frozen=True, slots=True)
class _Heard:
    epoch: int
    seq: int
    expires: float  # limiter clock
    received: float
    message: wire.ControlMessage


class ControlView:
    """The latest control message of each aggregator, combined; thread-safe.

    ``on_factors(factors)`` is called (from the receiving thread) whenever the combined factors
    change (the agent passes them to the limiter's :class:`~limiter.keylimits.ScaledKeyLimits`).
    """

    def __init__(
        self,
        clock: Callable[[], float],
        on_factors: Callable[[dict[str, float]], object] | None = None,
    ) -> None:
        self._clock = clock
        self._on_factors = on_factors
        self._lock = threading.Lock()
        self._heard: dict[str, _Heard] = {}
        self._gates: dict[str, BreakerGate] = {}
        self._factors: dict[str, float] = {}
        self.messages = 0
        self.duplicates = 0

    def gate(self, backend: str) -> BreakerGate:
        """The breaker of ``backend`` (one object per name; cheap to call once and keep)."""
        gate = self._gates.get(backend)
        if gate is None:
            with self._lock:
                gate = self._gates.setdefault(backend, BreakerGate(backend, self._clock))
        return gate

    def gates(self) -> dict[str, BreakerGate]:
        return dict(self._gates)

    def factors(self) -> dict[str, float]:
        """Scope -> the combined factor (scopes at 1 left out), as last computed."""
        return dict(self._factors)

    def apply(self, message: wire.ControlMessage) -> bool:
        """Take one aggregator's message; False for a duplicate or an older one."""
        now = self._clock()
        with self._lock:
            last = self._heard.get(message.aggregator_id)
            if last is not None and last.epoch == message.epoch and message.seq <= last.seq:
                self.duplicates += 1
                return False
            self._heard[message.aggregator_id] = _Heard(
                message.epoch, message.seq, now + message.ttl, now, message
            )
            self.messages += 1
        self.refresh()
        return True

    def refresh(self) -> None:
        """Recombine the fresh messages (after a message, and periodically: stale ones go)."""
        now = self._clock()
        with self._lock:
            fresh = [h for h in self._heard.values() if h.expires >= now]
            factors: dict[str, float] = {}
            breakers: dict[str, tuple[int, float, float, float]] = {}
            for h in fresh:
                for scope, f in h.message.factors:
                    # float32 on the wire: back to the aggregator's 6 decimals (0.7, not 0.69999)
                    factors[scope] = min(round(f, 6), factors.get(scope, 1.0))
                for b in h.message.breakers:
                    until = h.received + b.retry_after
                    old = breakers.get(b.name)
                    if old is None or _STRICTNESS[b.state] > _STRICTNESS[old[0]]:
                        breakers[b.name] = (b.state, b.probe, until, h.expires)
                    elif _STRICTNESS[b.state] == _STRICTNESS[old[0]]:
                        breakers[b.name] = (
                            b.state,
                            min(b.probe, old[1]),
                            max(until, old[2]),
                            max(h.expires, old[3]),
                        )
            factors = {s: f for s, f in factors.items() if f < 1.0}
            for name, (state, probe, until, expires) in breakers.items():
                gate = self._gates.get(name)
                if gate is None:
                    gate = self._gates[name] = BreakerGate(name, self._clock)
                gate.probe, gate.until, gate.expires = probe, until, expires
                gate.state = state
            for name, gate in self._gates.items():
                if name not in breakers:
                    gate.state = CLOSED
            changed = factors != self._factors
            self._factors = factors
        if changed and self._on_factors is not None:
            self._on_factors(factors)
