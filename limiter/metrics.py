"""Decision metrics of a limiter: decisions by outcome, and a sampled latency histogram.

Off by default (nothing on the request path). ``RateLimiter(..., metrics=True)`` (or
``StrictLimiter(..., metrics=True)``) wraps ``allow_request`` and ``check`` so that every
decision is counted (two C-level ``itertools.count`` steps, atomic under the GIL) and one in
``sample_every`` is timed with ``time.perf_counter_ns`` into a fixed-bucket histogram; the
overhead is measured in ``benchmarks/bench_local.py`` (docs/benchmarks.md). Expose them with
:class:`LimiterCollector`::

    from prometheus_client import REGISTRY
    from limiter.metrics import LimiterCollector

    limiter = RateLimiter(100, 60, metrics=True)
    REGISTRY.register(LimiterCollector(limiter))

Series (labels ``mode`` and, for counters, ``outcome``): ``drl_decisions_total``,
``drl_decision_latency_seconds`` (histogram of the sampled decisions), ``drl_limiter_clients``
and ``drl_limiter_table_bytes`` (local and approximate modes).
"""

from __future__ import annotations

import bisect
import itertools
import threading
import time
from collections.abc import Callable, Iterator, Sequence
from typing import Protocol, runtime_checkable

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, HistogramMetricFamily
from prometheus_client.registry import Collector

from .decision import Decision
from .request import Request

#: One decision in this many is timed (a power of two).
DEFAULT_SAMPLE_EVERY = 64
#: Upper bounds of the latency buckets, seconds: 0.5 µs … 50 ms (strict mode is a round trip).
LATENCY_BUCKETS = (
    5e-7,
    1e-6,
    2e-6,
    5e-6,
    1e-5,
    2e-5,
    5e-5,
    1e-4,
    2.5e-4,
    5e-4,
    1e-3,
    2.5e-3,
    5e-3,
    1e-2,
    2.5e-2,
    5e-2,
)
_BOUNDS_NS = tuple(round(b * 1e9) for b in LATENCY_BUCKETS)


def _read(counter: itertools.count[int]) -> int:
    """The next value of an ``itertools.count`` started at 0: how many steps it took."""
    return int(repr(counter)[6:-1])  # "count(N)"


class DecisionMetrics:
    """Counts decisions by outcome and times a sample of them. Thread-safe."""

    def __init__(self, sample_every: int = DEFAULT_SAMPLE_EVERY) -> None:
        if (
            isinstance(sample_every, bool)
            or not isinstance(sample_every, int)
            or sample_every < 1
            or sample_every & (sample_every - 1)
        ):
            raise ValueError(f"sample_every must be a power of two >= 1, got {sample_every!r}")
        self.sample_every = sample_every
        self._mask = sample_every - 1
        self._calls = itertools.count()
        self._allowed = itertools.count()
        self._denied = itertools.count()
        self._lock = threading.Lock()
        self._buckets = [0] * (len(_BOUNDS_NS) + 1)  # the last one: above every bound
        self._sum_ns = 0

    @property
    def allowed(self) -> int:
        return _read(self._allowed)

    @property
    def denied(self) -> int:
        return _read(self._denied)

    def observe_ns(self, elapsed_ns: int) -> None:
        """Add one timed decision to the histogram."""
        i = bisect.bisect_left(_BOUNDS_NS, elapsed_ns)
        with self._lock:
            self._buckets[i] += 1
            self._sum_ns += elapsed_ns

    def histogram(self) -> tuple[list[int], float]:
        """``(count per bucket, the last above every bound; sum in seconds)``."""
        with self._lock:
            return list(self._buckets), self._sum_ns / 1e9

    def wrap_allow(self, allow: Callable[[str, Request], bool]) -> Callable[[str, Request], bool]:
        """``allow_request`` counted, and timed one call in ``sample_every``."""
        calls, allowed, denied, mask = self._calls, self._allowed, self._denied, self._mask
        clock, observe = time.perf_counter_ns, self.observe_ns

        def allow_request(client_id: str, request: Request) -> bool:
            if next(calls) & mask:
                ok = allow(client_id, request)
            else:
                started = clock()
                ok = allow(client_id, request)
                observe(clock() - started)
            next(allowed if ok else denied)
            return ok

        allow_request.__doc__ = allow.__doc__
        return allow_request

    def decided(self, decision: Decision, started_ns: int | None) -> Decision:
        """Count one decision of the Decision API (timed when ``started_ns`` is given)."""
        if started_ns is not None:
            self.observe_ns(time.perf_counter_ns() - started_ns)
        next(self._allowed if decision.allowed else self._denied)
        return decision

    def start(self) -> int | None:
        """``perf_counter_ns()`` for the decisions that are sampled, else None."""
        return None if next(self._calls) & self._mask else time.perf_counter_ns()


def decision_metrics(option: bool | DecisionMetrics) -> DecisionMetrics | None:
    """A limiter's ``metrics=`` option: ``True`` (the defaults), an instance, or off."""
    if isinstance(option, DecisionMetrics):
        return option
    if option is True:
        return DecisionMetrics()
    if option is False or option is None:
        return None
    raise ValueError(f"metrics must be True, False or a DecisionMetrics, got {option!r}")


class Instrumented(Protocol):
    """What :class:`LimiterCollector` reads from a limiter."""

    @property
    def mode(self) -> str: ...

    @property
    def metrics(self) -> DecisionMetrics | None: ...


@runtime_checkable
class _Sized(Protocol):
    def __len__(self) -> int: ...

    def memory_bytes(self) -> int: ...


class LimiterCollector(Collector):
    """Exposes the decision metrics of one or more limiters built with ``metrics=True``.

    Limiters of one mode are summed into one series per outcome (label ``mode``).
    """

    def __init__(self, limiters: Instrumented | Sequence[Instrumented]) -> None:
        self.limiters: tuple[Instrumented, ...] = (
            tuple(limiters) if isinstance(limiters, Sequence) else (limiters,)
        )
        for limiter in self.limiters:
            if limiter.metrics is None:
                raise ValueError("build the limiter with metrics=True to collect its decisions")

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | HistogramMetricFamily]:
        decisions = CounterMetricFamily(
            "drl_decisions",
            "Decisions made by the limiter (allow_request and check), by mode and outcome.",
            labels=["mode", "outcome"],
        )
        latency = HistogramMetricFamily(
            "drl_decision_latency_seconds",
            "Wall time of a sample of the decisions (one in sample_every), by mode.",
            labels=["mode"],
        )
        clients = GaugeMetricFamily(
            "drl_limiter_clients", "Clients tracked in the limiter's table.", labels=["mode"]
        )
        memory = GaugeMetricFamily(
            "drl_limiter_table_bytes", "Bytes held by the limiter's client table.", labels=["mode"]
        )
        by_mode: dict[str, tuple[int, int, list[int], float, int, int, bool]] = {}
        for limiter in self.limiters:
            m = limiter.metrics
            assert m is not None
            buckets, total = m.histogram()
            a, d, b, s, n, size, sized = by_mode.get(
                limiter.mode, (0, 0, [0] * len(buckets), 0.0, 0, 0, False)
            )
            if isinstance(limiter, _Sized):
                n, size, sized = n + len(limiter), size + limiter.memory_bytes(), True
            by_mode[limiter.mode] = (
                a + m.allowed,
                d + m.denied,
                [x + y for x, y in zip(b, buckets, strict=True)],
                s + total,
                n,
                size,
                sized,
            )
        for mode, (a, d, b, s, n, size, sized) in sorted(by_mode.items()):
            decisions.add_metric([mode, "allowed"], a)
            decisions.add_metric([mode, "denied"], d)
            cumulative = list(itertools.accumulate(b))
            bounds = [f"{x:g}" for x in LATENCY_BUCKETS] + ["+Inf"]
            latency.add_metric([mode], list(zip(bounds, cumulative, strict=True)), s)
            if sized:
                clients.add_metric([mode], n)
                memory.add_metric([mode], size)
        yield decisions
        yield latency
        yield clients
        yield memory
