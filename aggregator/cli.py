"""The ``drl`` command line.

Subcommands:

- ``drl aggregator run --limit "100/minute"``: one aggregator until SIGTERM (:mod:`aggregator.run`).
- ``drl topics create|describe``: the usage and grant topics (:mod:`aggregator.topics`).
- ``drl limits set|get|list|delete|tier-set|tier-assign|...``: per-client limits in Redis
  (:mod:`aggregator.limits_cli`).
- ``drl demo``: the whole system on this machine under a Zipf HTTP load, with a report
  (:mod:`aggregator.demo`; ``--embedded``: one process, no Kafka).
- ``drl smoke``: checks the wiring to Kafka and Redis end to end: produces a record with
  confluent-kafka to a fresh topic, consumes it with kafka-python, then does a Redis SET/GET and an
  EVALSHA of a small Lua script. Exit 0 on success, 1 with a message on failure.

Connection settings come from ``--kafka-bootstrap`` / ``--redis-url``, else the environment
(``DRL_KAFKA_BOOTSTRAP`` / ``DRL_REDIS_URL``), else the local services of ``scripts/services``.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from .demo import add_arguments as add_demo_arguments
from .demo import cmd_demo
from .limits_cli import add_parser as add_limits_parser
from .run import add_arguments as add_run_arguments
from .run import cmd_run
from .topics import add_parser as add_topics_parser

DEFAULT_KAFKA_PORT = 39092
DEFAULT_REDIS_PORT = 36379

# Adds ARGV[1] to the integer at KEYS[1] and returns the new value together with the key's TTL:
# one atomic round trip, the same shape as the strict-mode scripts.
SMOKE_LUA = """
local v = redis.call('INCRBY', KEYS[1], tonumber(ARGV[1]))
redis.call('EXPIRE', KEYS[1], tonumber(ARGV[2]))
return {v, redis.call('TTL', KEYS[1])}
"""


class SmokeError(RuntimeError):
    """A smoke check failed; the message says which and why."""


def default_kafka_bootstrap() -> str:
    env = os.environ.get("DRL_KAFKA_BOOTSTRAP")
    if env:
        return env
    port = os.environ.get("DRL_KAFKA_PORT") or str(DEFAULT_KAFKA_PORT)
    return f"127.0.0.1:{port}"


def default_redis_url() -> str:
    env = os.environ.get("DRL_REDIS_URL")
    if env:
        return env
    port = os.environ.get("DRL_REDIS_PORT") or str(DEFAULT_REDIS_PORT)
    return f"redis://127.0.0.1:{port}/0"


@dataclass
class SmokeReport:
    lines: list[str] = field(default_factory=list)

    def add(self, line: str) -> None:
        self.lines.append(line)


def _ms(start: float) -> str:
    return f"{(time.monotonic() - start) * 1000:.0f} ms"


def smoke_kafka(bootstrap: str, timeout: float, report: SmokeReport) -> None:
    """confluent-kafka produce -> kafka-python consume through a fresh one-partition topic."""
    try:
        _smoke_kafka(bootstrap, timeout, report)
    except SmokeError:
        raise
    except Exception as exc:
        raise SmokeError(f"kafka: {type(exc).__name__} talking to {bootstrap}: {exc}") from exc


def _smoke_kafka(bootstrap: str, timeout: float, report: SmokeReport) -> None:
    import confluent_kafka
    from confluent_kafka import KafkaError, Message, Producer
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic  # the typed home of NewTopic (cimpl.pyi)

    try:
        import kafka
        from kafka import KafkaConsumer, TopicPartition
    except ImportError as exc:  # pragma: no cover - it is a hard dependency
        raise SmokeError(f"kafka-python is not importable: {exc}") from exc

    topic = f"drl-smoke-{uuid.uuid4().hex[:12]}"
    payload = f"drl smoke {uuid.uuid4()}".encode()
    # log_level 2: keep librdkafka's per-attempt connection errors off stderr; failures are
    # reported once, below, with the step that failed.
    quiet: dict[str, str | int | float] = {"bootstrap.servers": bootstrap, "log_level": 2}
    admin = AdminClient({**quiet, "socket.timeout.ms": int(timeout * 1000)})

    start = time.monotonic()
    try:
        futures = admin.create_topics(
            [NewTopic(topic, num_partitions=1, replication_factor=1)],
            operation_timeout=timeout,
            request_timeout=timeout,
        )
        futures[topic].result(timeout=timeout)
    except Exception as exc:
        raise SmokeError(
            f"kafka: could not create topic {topic} on {bootstrap} within {timeout}s: {exc!r}"
        ) from exc
    report.add(f"kafka: created topic {topic} on {bootstrap} in {_ms(start)}")

    try:
        start = time.monotonic()
        errors: list[str] = []

        def on_delivery(err: KafkaError | None, _msg: Message) -> None:
            if err is not None:
                errors.append(str(err))

        producer = Producer(
            {
                **quiet,
                "message.timeout.ms": int(timeout * 1000),
                "acks": "all",
            }
        )
        producer.produce(topic, key=b"smoke", value=payload, on_delivery=on_delivery)
        remaining = producer.flush(timeout)
        if remaining or errors:
            detail = "; ".join(errors) or f"{remaining} message(s) not delivered in {timeout}s"
            raise SmokeError(f"kafka: confluent-kafka produce to {topic} failed: {detail}")
        report.add(
            f"kafka: produced 1 record with confluent-kafka {confluent_kafka.__version__} "
            f"(librdkafka {confluent_kafka.libversion()[0]}) in {_ms(start)}"
        )

        start = time.monotonic()
        consumer: Any = KafkaConsumer(
            bootstrap_servers=bootstrap,
            group_id=None,
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            request_timeout_ms=max(int(timeout * 1000), 1000) + 1000,
        )
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            consumer.seek_to_beginning(tp)
            deadline = time.monotonic() + timeout
            got: bytes | None = None
            while got is None and time.monotonic() < deadline:
                batches = consumer.poll(timeout_ms=200)
                for records in batches.values():
                    for record in records:
                        if record.value == payload:
                            got = record.value
        finally:
            consumer.close()
        if got is None:
            raise SmokeError(f"kafka: kafka-python did not receive the record from {topic}")
        report.add(f"kafka: consumed it with kafka-python {kafka.__version__} in {_ms(start)}")
    finally:
        with contextlib.suppress(Exception):
            for fut in admin.delete_topics([topic], operation_timeout=timeout).values():
                fut.result(timeout=timeout)


def smoke_redis(url: str, timeout: float, report: SmokeReport) -> None:
    """SET/GET and SCRIPT LOAD + EVALSHA of a small Lua script."""
    import redis

    client = redis.Redis.from_url(url, socket_timeout=timeout, socket_connect_timeout=timeout)
    key = f"drl:smoke:{uuid.uuid4().hex}"
    value = uuid.uuid4().hex.encode()
    try:
        start = time.monotonic()
        client.set(key, value, ex=60)
        got = client.get(key)
        if got != value:
            raise SmokeError(f"redis: GET {key} returned {got!r}, expected {value!r}")
        info: dict[str, Any] = client.info("server")
        report.add(
            f"redis: SET/GET ok on {url} (redis {info.get('redis_version', '?')}) in {_ms(start)}"
        )

        start = time.monotonic()
        counter = key + ":n"
        sha = str(client.script_load(SMOKE_LUA))
        first = client.evalsha(sha, 1, counter, "5", "60")
        second = client.evalsha(sha, 1, counter, "2", "60")
        if not (
            isinstance(first, list)
            and isinstance(second, list)
            and int(first[0]) == 5
            and int(second[0]) == 7
            and 0 < int(second[1]) <= 60
        ):
            raise SmokeError(
                f"redis: EVALSHA returned {first!r}, {second!r}; expected [5, ttl], [7, ttl]"
            )
        report.add(f"redis: SCRIPT LOAD + EVALSHA {sha[:12]}... ok in {_ms(start)}")
        client.delete(key, counter)
    except redis.RedisError as exc:
        raise SmokeError(f"redis: {type(exc).__name__} talking to {url}: {exc}") from exc
    finally:
        client.close()


def cmd_smoke(args: argparse.Namespace) -> int:
    report = SmokeReport()
    started = time.monotonic()
    try:
        smoke_kafka(args.kafka_bootstrap, args.timeout, report)
        smoke_redis(args.redis_url, args.timeout, report)
    except SmokeError as exc:
        for line in report.lines:
            print(line)
        print(f"drl smoke: FAILED: {exc}", file=sys.stderr)
        return 1
    for line in report.lines:
        print(line)
    print(f"drl smoke: OK in {time.monotonic() - started:.2f}s")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="drl", description="Distributed rate limiter tools.")
    sub = parser.add_subparsers(dest="command", required=True)
    smoke = sub.add_parser(
        "smoke",
        help="check Kafka (confluent-kafka -> kafka-python) and Redis (SET/GET, EVALSHA)",
    )
    smoke.add_argument(
        "--kafka-bootstrap",
        default=default_kafka_bootstrap(),
        help="Kafka bootstrap servers (env DRL_KAFKA_BOOTSTRAP; default %(default)s)",
    )
    smoke.add_argument(
        "--redis-url",
        default=default_redis_url(),
        help="Redis URL (env DRL_REDIS_URL; default %(default)s)",
    )
    smoke.add_argument(
        "--timeout", type=float, default=15.0, help="seconds per step (default %(default)s)"
    )
    smoke.set_defaults(func=cmd_smoke)

    agg = sub.add_parser("aggregator", help="the aggregator service")
    agg_sub = agg.add_subparsers(dest="aggregator_command", required=True)
    run = agg_sub.add_parser("run", help="run one aggregator until SIGTERM")
    add_run_arguments(run, default_kafka_bootstrap())
    run.set_defaults(func=cmd_run)
    add_topics_parser(sub, default_kafka_bootstrap())
    add_limits_parser(sub, default_redis_url())

    demo = sub.add_parser(
        "demo",
        help="the product end to end on this machine: aggregator + 4 app servers + HTTP load, "
        "measured (--embedded: one process, no Kafka)",
    )
    add_demo_arguments(demo)
    demo.set_defaults(func=cmd_demo)
    return parser


def main(argv: Sequence[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    result: int = args.func(args)
    return result


if __name__ == "__main__":
    sys.exit(main())
