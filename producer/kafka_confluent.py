"""The default transport: confluent-kafka (librdkafka).

Producer settings: idempotent, lz4-compressed, 5 ms linger, a small local queue (1,000
messages) so that a dead broker shows up as :class:`QueueFull` quickly and the agent merges
counts instead of queueing intervals. ``config`` passes any librdkafka setting through (security
protocol, SASL, TLS, ...), overriding these defaults.
"""

from __future__ import annotations

import contextlib
import threading
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    OFFSET_END,
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from .transport import QueueFull, Record

PRODUCER_DEFAULTS: dict[str, Any] = {
    "enable.idempotence": True,
    "compression.type": "lz4",
    "linger.ms": 5,
    "queue.buffering.max.messages": 1000,
    "message.timeout.ms": 30000,
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable.auto.commit": False,
    "auto.offset.reset": "latest",
    "fetch.wait.max.ms": 50,
    "session.timeout.ms": 6000,
    "heartbeat.interval.ms": 1000,
}


class ConfluentTransport:
    def __init__(self, bootstrap: str, config: Mapping[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        self.config = {"bootstrap.servers": bootstrap, **(config or {})}

    def sender(self) -> ConfluentSender:
        return ConfluentSender({**PRODUCER_DEFAULTS, **self.config})

    def receiver(
        self,
        topic: str,
        *,
        partitions: Sequence[int] | None = None,
        group: str | None = None,
        on_assign: Callable[[list[int]], None] | None = None,
        on_revoke: Callable[[list[int]], None] | None = None,
    ) -> ConfluentReceiver:
        conf = {**CONSUMER_DEFAULTS, **self.config}
        conf["group.id"] = group or f"drl-reader-{uuid.uuid4().hex}"
        consumer = Consumer(conf)
        receiver = ConfluentReceiver(consumer)
        if group is None:
            parts = list(range(self.partitions(topic))) if partitions is None else list(partitions)
            consumer.assign([TopicPartition(topic, p, OFFSET_END) for p in parts])
            receiver.assigned = parts
        else:

            def assigned(c: Any, tps: list[Any]) -> None:
                receiver.assigned = sorted({*receiver.assigned, *(tp.partition for tp in tps)})
                if on_assign is not None:
                    on_assign([tp.partition for tp in tps])

            def revoked(c: Any, tps: list[Any]) -> None:
                gone = {tp.partition for tp in tps}
                receiver.assigned = [p for p in receiver.assigned if p not in gone]
                if on_revoke is not None:
                    on_revoke(sorted(gone))

            consumer.subscribe([topic], on_assign=assigned, on_revoke=revoked, on_lost=revoked)
        return receiver

    def partitions(self, topic: str) -> int:
        admin = AdminClient(self.config)
        meta = admin.list_topics(topic, timeout=10)
        t = meta.topics.get(topic)
        if t is None or t.error is not None or not t.partitions:
            raise RuntimeError(f"topic {topic!r} is not available: {t.error if t else 'missing'}")
        return len(t.partitions)


class ConfluentSender:
    def __init__(self, conf: dict[str, Any]) -> None:
        self._producer = Producer(conf)
        self._errors = 0
        self._lock = threading.Lock()

    def _delivered(self, err: KafkaError | None, msg: Any) -> None:
        if err is not None:
            with self._lock:
                self._errors += 1

    def send(self, topic: str, partition: int, value: bytes) -> None:
        try:
            self._producer.produce(topic, value, partition=partition, on_delivery=self._delivered)
        except BufferError as e:
            raise QueueFull(str(e)) from e
        self._producer.poll(0)

    def service(self) -> None:
        self._producer.poll(0)

    def flush(self, timeout: float) -> int:
        return int(self._producer.flush(timeout))

    def close(self) -> None:
        self._producer.flush(0)

    @property
    def errors(self) -> int:
        return self._errors


class ConfluentReceiver:
    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self.assigned: list[int] = []
        self.errors = 0

    def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        out: list[Record] = []
        for msg in self._consumer.consume(num_messages=max_records, timeout=timeout):
            if msg.error() is not None:
                self.errors += 1
                continue
            value = msg.value()
            if value is None:
                continue
            ts = msg.timestamp()[1] / 1000.0
            out.append(Record(msg.topic(), msg.partition(), msg.offset(), ts, value))
        return out

    def assignment(self) -> list[int]:
        return list(self.assigned)

    def commit(self) -> None:
        # nothing to commit yet, or rebalancing: the next commit covers it
        with contextlib.suppress(KafkaException):
            self._consumer.commit(asynchronous=True)

    def close(self) -> None:
        self._consumer.close()
