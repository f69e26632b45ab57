"""Prometheus metrics of the server-side agent and its approximate-mode limiter.

:class:`AgentCollector` reads :class:`~producer.agent.AgentStats` and the limiter when scraped;
nothing is added to the request path. Register it with the app's registry::

    from prometheus_client import REGISTRY
    from producer.metrics import AgentCollector

    limiter, agent = connect(100, 60, bootstrap=..., server_id="web-1")
    REGISTRY.register(AgentCollector(agent))          # or AgentCollector([agent1, agent2])

Decisions by outcome come from the usage the agent drains every report interval (so they lag by
up to one interval), in tokens: at cost 1, tokens are requests. The decision-latency histogram
and per-call decision counts are :class:`limiter.metrics.LimiterCollector`'s (a limiter built
with ``metrics=True``).

Every series has a ``server_id`` label (the agent's), so one collector can cover several agents
of one process. The list with meanings is in ``docs/operations.md``.
"""

from __future__ import annotations

import math
from collections.abc import Iterator, Sequence

from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily
from prometheus_client.registry import Collector

from .agent import Agent

_COUNTERS: tuple[tuple[str, str, str], ...] = (
    # (metric name without _total, AgentStats field, help)
    ("drl_agent_usage_batches_sent", "batches_sent", "Usage batches handed to the producer."),
    ("drl_agent_usage_records_sent", "records_sent", "Usage records in those batches."),
    ("drl_agent_usage_bytes_sent", "bytes_sent", "Encoded bytes of those batches."),
    (
        "drl_agent_usage_send_retries",
        "send_retries",
        "Usage batches the producer did not take (queue full, broker down), kept for the next "
        "report.",
    ),
    (
        "drl_agent_usage_records_dropped",
        "records_dropped",
        "Usage records dropped because more than max_pending_records waited for the broker.",
    ),
    ("drl_agent_usage_tokens_dropped", "tokens_dropped", "Tokens in the dropped usage records."),
    (
        "drl_agent_grant_batches",
        "grant_batches",
        "Grant batches addressed to this server and accepted (not duplicates).",
    ),
    (
        "drl_agent_grant_batches_duplicate",
        "batches_duplicate",
        "Grant batches skipped as duplicates or out of order.",
    ),
    (
        "drl_agent_grant_batches_late",
        "batches_late",
        "Grant batches whose leases had already expired when they arrived.",
    ),
    ("drl_agent_grants_installed", "grants_installed", "Leases installed in the limiter."),
    (
        "drl_agent_grants_unknown",
        "grants_unknown",
        "Grants for clients this limiter no longer tracks (skipped).",
    ),
    ("drl_agent_malformed", "malformed", "Grant messages that did not decode (skipped)."),
    ("drl_agent_errors", "errors", "Exceptions caught in the agent's threads."),
    (
        "drl_agent_health_reports",
        "health_reports",
        "Health reports handed to the producer (one per usage partition per health interval).",
    ),
    (
        "drl_agent_control_messages",
        "control_messages",
        "Control messages (adaptive factors, breakers) applied.",
    ),
    (
        "drl_agent_released_tokens",
        "tokens_released",
        "Tokens left unspent in expired leases, reported back to the aggregator.",
    ),
)

#: outcome label -> AgentStats field
_OUTCOMES = (
    ("admitted_lease", "tokens_admitted"),
    ("admitted_extra", "tokens_extra"),
    ("rejected", "tokens_rejected"),
)


class AgentCollector(Collector):
    """Exposes one or more :class:`Agent` (see the module docstring)."""

    def __init__(self, agents: Agent | Sequence[Agent]) -> None:
        self.agents: tuple[Agent, ...] = (agents,) if isinstance(agents, Agent) else tuple(agents)

    def collect(self) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
        label = ["server_id"]
        for name, attr, doc in _COUNTERS:
            family = CounterMetricFamily(name, doc, labels=label)
            for agent in self.agents:
                family.add_metric([agent.server_id], float(getattr(agent.stats, attr)))
            yield family
        decided = CounterMetricFamily(
            "drl_agent_decided_tokens",
            "Tokens decided by the limiter, by outcome: admitted_lease (spent from a lease), "
            "admitted_extra (cold start or degraded share), rejected (refused, or held while "
            "waiting for a lease); counted when the usage is drained for a report.",
            labels=["server_id", "outcome"],
        )
        for agent in self.agents:
            for outcome, attr in _OUTCOMES:
                decided.add_metric([agent.server_id, outcome], float(getattr(agent.stats, attr)))
        yield decided
        gauges = {
            "degraded": GaugeMetricFamily(
                "drl_agent_degraded",
                "1 while no grant batch arrived for degraded_after seconds (aggregator or Kafka "
                "down): requests without a live lease get the static share limit/N.",
                labels=label,
            ),
            "age": GaugeMetricFamily(
                "drl_agent_lease_age_seconds",
                "Seconds since the last grant batch arrived (since start before the first).",
                labels=label,
            ),
            "servers": GaugeMetricFamily(
                "drl_agent_active_servers",
                "Active servers in the fleet per the last grant batch (the degraded share's N).",
                labels=label,
            ),
            "clients": GaugeMetricFamily(
                "drl_agent_clients", "Clients tracked by the limiter.", labels=label
            ),
            "bytes": GaugeMetricFamily(
                "drl_agent_table_bytes", "Bytes held by the limiter's client table.", labels=label
            ),
            "leases": GaugeMetricFamily(
                "drl_agent_leases", "Clients holding a live lease on this server.", labels=label
            ),
            "lease_tokens": GaugeMetricFamily(
                "drl_agent_lease_tokens", "Tokens left in the live leases.", labels=label
            ),
            "pending": GaugeMetricFamily(
                "drl_agent_usage_pending_records",
                "Usage records waiting for the broker (merged, bounded by max_pending_records).",
                labels=label,
            ),
            "queue": GaugeMetricFamily(
                "drl_agent_produce_queue_messages",
                "Messages in the producer's queue, not yet delivered.",
                labels=label,
            ),
        }
        offsets = GaugeMetricFamily(
            "drl_agent_aggregator_clock_offset_seconds",
            "Per aggregator: this server's clock minus the aggregator's, plus the fastest "
            "delivery seen (used to convert lease expiries).",
            labels=["server_id", "aggregator"],
        )
        for agent in self.agents:
            limiter = agent.limiter
            lease = limiter.lease
            now = limiter.now()
            sid = [agent.server_id]
            gauges["degraded"].add_metric(sid, int(lease.degraded(now)))
            gauges["age"].add_metric(sid, max(0.0, now - lease.last_grant))
            gauges["servers"].add_metric(sid, lease.servers)
            gauges["clients"].add_metric(sid, len(limiter))
            gauges["bytes"].add_metric(sid, limiter.memory_bytes())
            leases, tokens = limiter.leases()
            gauges["leases"].add_metric(sid, leases)
            gauges["lease_tokens"].add_metric(sid, tokens)
            gauges["pending"].add_metric(sid, agent.pending_records)
            gauges["queue"].add_metric(sid, agent.produce_queue)
            for aggregator_id, value in sorted(agent.stats.offsets.copy().items()):
                if math.isfinite(value):
                    offsets.add_metric([agent.server_id, aggregator_id], value)
        yield from gauges.values()
        yield offsets
        yield from _control_metrics(self.agents)


def _control_metrics(agents: Sequence[Agent]) -> Iterator[CounterMetricFamily | GaugeMetricFamily]:
    """What the aggregators' control messages say, as this server obeys it."""
    factor = GaugeMetricFamily(
        "drl_agent_adaptive_factor",
        "Per adaptive scope below 1: the factor applied to its clients' limits here.",
        labels=["server_id", "scope"],
    )
    state = GaugeMetricFamily(
        "drl_agent_breaker_state",
        "Per backend: the circuit breaker as this server obeys it (0 closed, 1 open, 2 half-open).",
        labels=["server_id", "backend"],
    )
    refused = CounterMetricFamily(
        "drl_agent_breaker_refused",
        "Per backend: calls the breaker refused (open, or half-open beyond the probe share).",
        labels=["server_id", "backend"],
    )
    for agent in agents:
        for scope, f in sorted(agent.factors().items()):
            factor.add_metric([agent.server_id, scope], f)
        for name, gate in sorted(agent.control.gates().items()):
            code = ("closed", "open", "half_open").index(gate.current())
            state.add_metric([agent.server_id, name], float(code))
            refused.add_metric([agent.server_id, name], float(gate.refused))
    yield factor
    yield state
    yield refused
