"""How an app server turns on approximate mode: one call, a limiter and its running agent.

>>> limiter, agent = connect(100, 60, bootstrap="kafka:9092", server_id="web-1")  # doctest: +SKIP
>>> limiter.allow_request("alice", Request())                                     # doctest: +SKIP
>>> agent.stop()                                # on shutdown: flushes the last usage batch

``kafka_config`` passes client settings through unchanged (librdkafka names for confluent-kafka,
e.g. ``{"security.protocol": "SASL_SSL", "sasl.mechanisms": "PLAIN", ...}``; keyword names for
kafka-python, e.g. ``{"security_protocol": "SSL", "ssl_cafile": ...}``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from limiter import RateLimiter
from limiter.keylimits import FixedKeyLimits, KeyLimits, LimitSource, ScaledKeyLimits
from limiter.lease import LeaseOptions

from .agent import DEFAULT_HEALTH_INTERVAL, DEFAULT_REPORT_INTERVAL, Agent
from .health import BackendMonitor
from .transport import GRANTS_TOPIC, USAGE_TOPIC, Transport

#: The Kafka clients a transport can use.
CLIENTS = ("confluent", "kafka-python")


def make_transport(
    bootstrap: str, *, client: str = "confluent", config: Mapping[str, Any] | None = None
) -> Transport:
    """A Kafka transport with ``client`` (``confluent`` by default, or ``kafka-python``)."""
    if client == "confluent":
        from .kafka_confluent import ConfluentTransport

        return ConfluentTransport(bootstrap, config)
    if client == "kafka-python":
        from .kafka_python import KafkaPythonTransport

        return KafkaPythonTransport(bootstrap, config)
    raise ValueError(f"unknown Kafka client {client!r}; choose one of {', '.join(CLIENTS)}")


def connect(
    max_requests: int,
    time_window_seconds: float,
    *,
    bootstrap: str | None = None,
    server_id: str,
    transport: Transport | None = None,
    client: str = "confluent",
    kafka_config: Mapping[str, Any] | None = None,
    report_interval: float = DEFAULT_REPORT_INTERVAL,
    usage_topic: str = USAGE_TOPIC,
    grants_topic: str = GRANTS_TOPIC,
    lease_options: LeaseOptions | None = None,
    limits: LimitSource | None = None,
    adaptive: bool = True,
    monitor: BackendMonitor | None = None,
    health_interval: float = DEFAULT_HEALTH_INTERVAL,
    **limiter_options: Any,
) -> tuple[RateLimiter, Agent]:
    """An approximate-mode :class:`RateLimiter` and its started :class:`Agent`.

    Give ``bootstrap`` (and optionally ``client``/``kafka_config``), or a ready ``transport``.
    ``limits``: per-client limits (:class:`~limiter.keylimits.ServiceKeyLimits`; default
    ``max_requests`` for everyone). ``adaptive`` (default on): the limiter's limits follow the
    aggregators' adaptive factors (:class:`~limiter.keylimits.ScaledKeyLimits`; at factor 1
    nothing changes). ``monitor``: the backends this server reports on (docs/adaptive.md),
    every ``health_interval`` seconds.
    """
    if transport is None:
        if not bootstrap:
            raise ValueError("give the Kafka bootstrap servers (or a transport)")
        transport = make_transport(bootstrap, client=client, config=kafka_config)
    if adaptive:
        limits = ScaledKeyLimits(limits or FixedKeyLimits(KeyLimits.uniform(max_requests)))
    limiter = RateLimiter(
        max_requests,
        time_window_seconds,
        mode="approximate",
        lease_options=lease_options,
        limits=limits,
        **limiter_options,
    )
    agent = Agent(
        limiter,
        transport,
        server_id,
        report_interval=report_interval,
        usage_topic=usage_topic,
        grants_topic=grants_topic,
        monitor=monitor,
        health_interval=health_interval,
    )
    return limiter, agent.start()
