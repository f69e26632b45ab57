"""Both Kafka clients talk to the real broker, in both directions."""

from __future__ import annotations

import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest

pytestmark = pytest.mark.integration


def _confluent_produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from confluent_kafka import KafkaError, Message, Producer

    errors: list[str] = []

    def on_delivery(err: KafkaError | None, _msg: Message) -> None:
        if err is not None:
            errors.append(str(err))

    producer = Producer({"bootstrap.servers": bootstrap, "acks": "all", "linger.ms": 5})
    for key, value in records:
        producer.produce(topic, key=key, value=value, on_delivery=on_delivery)
    assert producer.flush(30) == 0
    assert errors == []


def _kafka_python_consume(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    from kafka import KafkaConsumer

    consumer: Any = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex[:8]}",
        auto_offset_reset="earliest",
        enable_auto_commit=False,
    )
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < count and time.monotonic() < deadline:
            for records in consumer.poll(timeout_ms=500).values():
                got.extend((r.key, r.value) for r in records)
    finally:
        consumer.close()
    return got


def _kafka_python_produce(bootstrap: str, topic: str, records: list[tuple[bytes, bytes]]) -> None:
    from kafka import KafkaProducer

    producer: Any = KafkaProducer(bootstrap_servers=bootstrap, acks="all")
    try:
        futures = [producer.send(topic, key=k, value=v) for k, v in records]
        producer.flush(timeout=30)
        for fut in futures:
            fut.get(timeout=30)
    finally:
        producer.close()


def _confluent_consume(bootstrap: str, topic: str, count: int) -> list[tuple[bytes, bytes]]:
    from confluent_kafka import Consumer

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"g-{uuid.uuid4().hex[:8]}",
            "auto.offset.reset": "earliest",
            "enable.auto.commit": False,
        }
    )
    consumer.subscribe([topic])
    got: list[tuple[bytes, bytes]] = []
    deadline = time.monotonic() + 30
    try:
        while len(got) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.5)
            if msg is None:
                continue
            assert msg.error() is None, msg.error()
            key, value = msg.key(), msg.value()
            assert isinstance(key, bytes) and isinstance(value, bytes)
            got.append((key, value))
    finally:
        consumer.close()
    return got


def _records(n: int) -> list[tuple[bytes, bytes]]:
    tag = uuid.uuid4().hex
    return [(f"k{i}".encode(), f"{tag}-{i}".encode()) for i in range(n)]


def test_confluent_produce_kafka_python_consume(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=1)
    sent = _records(20)
    _confluent_produce(kafka_bootstrap, topic, sent)
    assert _kafka_python_consume(kafka_bootstrap, topic, len(sent)) == sent


def test_kafka_python_produce_confluent_consume(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=3)
    sent = _records(30)
    _kafka_python_produce(kafka_bootstrap, topic, sent)
    got = _confluent_consume(kafka_bootstrap, topic, len(sent))
    # Three partitions: order holds per key only, so compare as sets.
    assert sorted(got) == sorted(sent)


def test_unique_topic_creates_requested_partitions(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    from confluent_kafka.admin import AdminClient

    a, b = unique_topic(partitions=4), unique_topic()
    assert a != b
    md = AdminClient({"bootstrap.servers": kafka_bootstrap}).list_topics(timeout=10)
    assert len(md.topics[a].partitions) == 4
    assert len(md.topics[b].partitions) == 1
