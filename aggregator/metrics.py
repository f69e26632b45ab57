"""Prometheus metrics of one aggregator, computed from its counters when scraped.

:class:`AggregatorCollector` reads :class:`~aggregator.service.AggregatorStats` and the
aggregator's state at scrape time, so the usage and tick paths carry no metric code at all. The
one metric that needs a sample per tick, the tick duration histogram, is fed by the service loop
(:mod:`aggregator.run`) from ``stats.last_tick_seconds`` after each tick.

Every metric lives in a dedicated :class:`~prometheus_client.CollectorRegistry` made by
:func:`new_registry` (never the process-global one), so that an aggregator embedded in another
process does not mix its series with that process's. The list with meanings is in
``docs/operations.md``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Iterator, Mapping
from typing import Protocol

from prometheus_client import CollectorRegistry, Histogram, ProcessCollector
from prometheus_client.core import (
    CounterMetricFamily,
    GaugeMetricFamily,
    InfoMetricFamily,
)
from prometheus_client.registry import Collector

from .breaker import STATE_NAMES
from .control import Controller
from .service import Aggregator

#: Tick duration histogram buckets, seconds: a tick normally takes well under a millisecond to a
#: few milliseconds; the default tick interval is 100 ms, so the upper buckets show overruns.
TICK_BUCKETS = (0.0005, 0.001, 0.0025, 0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5)


class ServiceView(Protocol):
    """What the service loop knows beyond the aggregator's own counters."""

    def readiness(self) -> tuple[bool, dict[str, object]]:
        """(ready, details) as ``/readyz`` answers it."""

    def broker_up(self) -> bool:
        """Whether the broker answered the last metadata probe in time."""

    def usage_topic_partitions(self) -> int | None:
        """Partition count of the usage topic at the last probe (None before the first)."""


def new_registry(*, process: bool = True) -> CollectorRegistry:
    """A fresh registry, with the ``process_*`` metrics (CPU, memory, fds) when available."""
    registry = CollectorRegistry(auto_describe=True)
    if process:
        ProcessCollector(registry=registry)
    return registry


def tick_histogram(registry: CollectorRegistry) -> Histogram:
    """``drl_aggregator_tick_duration_seconds``: observe ``stats.last_tick_seconds`` per tick."""
    return Histogram(
        "drl_aggregator_tick_duration_seconds",
        "Wall time of one allocation tick (all owned partitions, grant batches queued).",
        registry=registry,
        buckets=TICK_BUCKETS,
    )


def _counter(name: str, doc: str, value: float) -> CounterMetricFamily:
    return CounterMetricFamily(name, doc, value=value)


def _gauge(name: str, doc: str, value: float) -> GaugeMetricFamily:
    return GaugeMetricFamily(name, doc, value=value)


class AggregatorCollector(Collector):
    """Exposes one :class:`Aggregator`'s counters and state (see ``docs/operations.md``).

    ``lag``, when given, returns records behind the end per owned usage partition (cheap, no
    broker round trip); ``service`` adds readiness and broker reachability. ``clock`` must be the
    aggregator's clock (monotonic by default).
    """

    def __init__(
        self,
        aggregator: Aggregator,
        *,
        lag: Callable[[], Mapping[int, int] | None] | None = None,
        service: ServiceView | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._agg = aggregator
        self._lag = lag
        self._service = service
        self._clock = clock

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily | InfoMetricFamily]:
        agg = self._agg
        s = agg.stats
        c = agg.config
        info = InfoMetricFamily(
            "drl_aggregator", "This aggregator's identity and policy (value always 1)."
        )
        info.add_metric(
            [],
            {
                "aggregator_id": c.aggregator_id,
                "group": c.group,
                "usage_topic": c.usage_topic,
                "grants_topic": c.grants_topic,
                "limit": str(c.policy.limit),
                "window_seconds": f"{c.policy.window:g}",
                "tick_seconds": f"{c.tick:g}",
                "lease_ttl_seconds": f"{c.ttl:g}",
            },
        )
        yield info
        yield _counter(
            "drl_aggregator_usage_batches",
            "Usage batches applied (each server sends one per usage partition per report, "
            "empty ones as heartbeats).",
            s.batches,
        )
        yield _counter(
            "drl_aggregator_usage_records",
            "Usage records (one client's counts from one server for one interval) applied.",
            s.records,
        )
        yield _counter(
            "drl_aggregator_usage_duplicate_batches",
            "Usage batches skipped as duplicates or out of order (sequence not above the last).",
            s.duplicates,
        )
        malformed = CounterMetricFamily(
            "drl_aggregator_usage_malformed",
            "Usage messages skipped because they did not decode, by reason.",
            labels=["reason"],
        )
        for reason, n in sorted(s.malformed_reasons.copy().items()):
            malformed.add_metric([reason], n)
        yield malformed
        yield _counter(
            "drl_aggregator_errors",
            "Usage records that raised while applied, or came from servers beyond the limit.",
            s.errors,
        )
        yield _counter(
            "drl_aggregator_usage_replayed_records",
            "Usage records replayed into the windows of newly assigned partitions (rebuilds).",
            s.replayed_records,
        )
        yield _counter(
            "drl_aggregator_rebuilds", "Newly assigned partitions rebuilt and granting.", s.rebuilds
        )
        yield _counter(
            "drl_aggregator_checkpoint_restores",
            "Rebuilds that started from a window checkpoint in Redis.",
            s.checkpoint_restores,
        )
        store = agg.checkpoints
        if store is not None:
            yield _counter(
                "drl_aggregator_checkpoints_written",
                "Window checkpoints written to Redis.",
                store.written,
            )
            yield _counter(
                "drl_aggregator_checkpoint_errors",
                "Checkpoint reads or writes that failed, and checkpoints that did not decode.",
                store.errors,
            )
        yield _counter(
            "drl_aggregator_consumer_errors",
            "Usage-topic polls and offset commits that raised (the loop retried).",
            s.poll_errors,
        )
        yield _counter("drl_aggregator_ticks", "Allocation ticks run.", s.ticks)
        yield _gauge(
            "drl_aggregator_last_tick_duration_seconds",
            "Wall time of the most recent allocation tick.",
            s.last_tick_seconds,
        )
        yield _counter(
            "drl_aggregator_grant_batches",
            "Grant batches queued for sending (one per active server per tick).",
            s.grant_batches,
        )
        yield _counter(
            "drl_aggregator_grants",
            "Grant records (one client's lease top-up for one server) queued.",
            s.grants,
        )
        yield _counter(
            "drl_aggregator_granted_tokens", "Tokens handed out in grant records.", s.tokens_granted
        )
        yield _counter(
            "drl_aggregator_grant_bytes",
            "Encoded bytes of the grant batches queued (before compression).",
            s.grant_bytes,
        )
        yield _gauge(
            "drl_aggregator_grant_queue_messages",
            "Grant messages in the producer's queue, not yet delivered.",
            agg.grant_queue(),
        )
        yield _counter(
            "drl_aggregator_produce_errors",
            "Grant batches the producer did not take or failed to deliver.",
            s.produce_errors,
        )
        now = self._clock()
        active = agg.active_servers(now)
        yield _gauge(
            "drl_aggregator_clients",
            "Clients with state in the owned usage partitions.",
            agg.clients(),
        )
        yield _gauge(
            "drl_aggregator_partitions_owned",
            "Usage partitions this aggregator owns (assigned by the consumer group).",
            len(agg.partitions),
        )
        yield _gauge(
            "drl_aggregator_partitions_rebuilding",
            "Owned usage partitions not granting yet: replaying the window, or waiting one lease "
            "TTL for the previous owner's leases to expire.",
            len(agg.rebuilding()),
        )
        yield _gauge(
            "drl_aggregator_active_servers",
            "App servers heard from within the server timeout.",
            len(active),
        )
        offsets = GaugeMetricFamily(
            "drl_aggregator_server_clock_offset_seconds",
            "Per active server: its clock minus this aggregator's, less the fastest delivery "
            "seen (an upper bound of the clock offset).",
            labels=["server"],
        )
        estimates = agg.server_clock_offsets()
        for name in sorted(active):
            value = estimates.get(name, math.nan)
            if math.isfinite(value):
                offsets.add_metric([name], value)
        yield offsets
        if agg.control is not None:
            yield from _control_metrics(agg.control)
        if self._lag is not None:
            lag = self._lag()
            if lag is not None:
                family = GaugeMetricFamily(
                    "drl_aggregator_usage_lag_records",
                    "Per owned usage partition: records between the consumer's position and the "
                    "partition's end (as of the last fetch).",
                    labels=["partition"],
                )
                for partition, behind in sorted(lag.items()):
                    family.add_metric([str(partition)], behind)
                yield family
        if self._service is not None:
            ready, _ = self._service.readiness()
            yield _gauge("drl_aggregator_ready", "1 when /readyz answers 200, else 0.", int(ready))
            yield _gauge(
                "drl_aggregator_broker_up",
                "1 when the broker answered the last metadata probe in time, else 0.",
                int(self._service.broker_up()),
            )
            parts = self._service.usage_topic_partitions()
            if parts is not None:
                yield _gauge(
                    "drl_aggregator_usage_topic_partitions",
                    "Partition count of the usage topic (metadata probe).",
                    parts,
                )


def parse_exposition(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """``{(sample name, sorted labels): value}`` from Prometheus text format (tests, tools)."""
    from prometheus_client.parser import text_string_to_metric_families

    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            out[(sample.name, tuple(sorted(sample.labels.items())))] = sample.value
    return out


def _control_metrics(control: Controller) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """Adaptive factors, breakers and the fleet's backend signals of the last control step."""
    factor = GaugeMetricFamily(
        "drl_aggregator_adaptive_factor",
        "Per adaptive scope: the factor applied to its clients' configured limits (floor..1).",
        labels=["scope"],
    )
    for scope, f in sorted(control.factors().items()):
        factor.add_metric([scope], f)
    yield factor
    state = GaugeMetricFamily(
        "drl_aggregator_breaker_state",
        "Per backend: the circuit breaker's state (0 closed, 1 open, 2 half-open).",
        labels=["backend"],
    )
    for name, value in control.breakers().items():
        state.add_metric([name], float(STATE_NAMES.index(value)))
    yield state
    p99 = GaugeMetricFamily(
        "drl_aggregator_backend_p99_seconds",
        "Per backend: the fleet's p99 call latency over the last control interval.",
        labels=["backend"],
    )
    errors = GaugeMetricFamily(
        "drl_aggregator_backend_error_ratio",
        "Per backend: failed calls / calls over the last control interval, fleet-wide.",
        labels=["backend"],
    )
    saturation = GaugeMetricFamily(
        "drl_aggregator_backend_saturation",
        "Per backend: the mean saturation the servers reported over the last control interval.",
        labels=["backend"],
    )
    for name, s in sorted(control.signals().items()):
        if not math.isnan(s.p99):
            p99.add_metric([name], s.p99)
        if s.requests:
            errors.add_metric([name], s.errors / s.requests)
        if not math.isnan(s.saturation):
            saturation.add_metric([name], s.saturation)
    yield p99
    yield errors
    yield saturation
    st = control.stats
    yield _counter(
        "drl_aggregator_health_reports",
        "Health reports folded in (one per server per health interval, whatever the partitions).",
        st.health_reports,
    )
    yield _counter(
        "drl_aggregator_control_messages",
        "Control steps taken (each sends one control message per grant partition).",
        st.messages,
    )
