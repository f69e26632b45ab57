"""``drl aggregator run``: one aggregator as a long-running process.

SIGTERM or SIGINT: finish the current tick, flush the grants, commit, leave the group, exit 0.
With ``--stats-file`` the final counters are written there as JSON (for tests and operators).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import signal
import threading
import time
from typing import Any

from limiter import parse_rate
from producer import CLIENTS, make_transport
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC

from .service import (
    DEFAULT_GROUP,
    DEFAULT_SERVER_TIMEOUT,
    DEFAULT_TICK,
    Aggregator,
    AggregatorConfig,
)


def add_arguments(p: argparse.ArgumentParser, default_bootstrap: str) -> None:
    p.add_argument("--kafka-bootstrap", default=default_bootstrap, help="Kafka bootstrap servers")
    p.add_argument("--client", choices=CLIENTS, default="confluent", help="Kafka client library")
    p.add_argument(
        "--kafka-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="Kafka client setting passed through (repeatable), e.g. security.protocol=SSL",
    )
    p.add_argument("--limit", required=True, help='the policy, e.g. "200 per 5 seconds"')
    p.add_argument("--tick", type=float, default=DEFAULT_TICK, help="seconds between allocations")
    p.add_argument("--lease-ttl", type=float, default=None, help="lease life, seconds")
    p.add_argument("--server-timeout", type=float, default=DEFAULT_SERVER_TIMEOUT)
    p.add_argument("--usage-topic", default=USAGE_TOPIC)
    p.add_argument("--grants-topic", default=GRANTS_TOPIC)
    p.add_argument("--group", default=DEFAULT_GROUP, help="consumer group of the aggregators")
    p.add_argument("--id", default=None, help="aggregator id (default host-pid)")
    p.add_argument("--duration", type=float, default=None, help="stop after this many seconds")
    p.add_argument("--stats-file", default=None, help="write final counters here as JSON")


def _kafka_config(pairs: list[str]) -> dict[str, Any]:
    out: dict[str, Any] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"--kafka-config takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def cmd_run(args: argparse.Namespace) -> int:
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(levelname)s %(name)s %(message)s")
    policy = parse_rate(args.limit)
    extra: dict[str, Any] = {} if args.id is None else {"aggregator_id": args.id}
    config = AggregatorConfig(
        policy,
        tick=args.tick,
        lease_ttl=args.lease_ttl,
        server_timeout=args.server_timeout,
        usage_topic=args.usage_topic,
        grants_topic=args.grants_topic,
        group=args.group,
        **extra,
    )
    transport = make_transport(
        args.kafka_bootstrap, client=args.client, config=_kafka_config(args.kafka_config)
    )
    aggregator = Aggregator(config, transport)
    stop = threading.Event()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: stop.set())
    if args.duration is not None:
        timer = threading.Timer(args.duration, stop.set)
        timer.daemon = True
        timer.start()
    started = time.monotonic()
    logging.getLogger(__name__).info(
        "aggregator %s: %s, tick %.3f s, lease ttl %.3f s",
        config.aggregator_id,
        policy,
        config.tick,
        config.ttl,
    )
    aggregator.run(stop)
    stats = dataclasses.asdict(aggregator.stats)
    stats["uptime_seconds"] = time.monotonic() - started
    stats["clients"] = aggregator.clients()
    if args.stats_file:
        with open(args.stats_file, "w") as f:
            json.dump(stats, f)
    return 0
