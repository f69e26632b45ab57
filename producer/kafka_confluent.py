"""The default transport: confluent-kafka (librdkafka).

Producer settings: idempotent, lz4-compressed, 5 ms linger, a small local queue (1,000
messages) so that a dead broker shows up as :class:`QueueFull` quickly and the agent merges
counts instead of queueing intervals. ``config`` passes any librdkafka setting through (security
protocol, SASL, TLS, ...), overriding these defaults.
"""

from __future__ import annotations

import contextlib
import threading
import time
import uuid
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from confluent_kafka import (
    Consumer,
    KafkaError,
    KafkaException,
    Producer,
    TopicCollection,
    TopicPartition,
)
from confluent_kafka.admin import AdminClient

from .transport import MAX_POLL_RECORDS, QueueFull, Record, Rewind

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
        rewind: Rewind | None = None,
    ) -> ConfluentReceiver:
        conf = {**CONSUMER_DEFAULTS, **self.config}
        conf["group.id"] = group or f"drl-reader-{uuid.uuid4().hex}"
        consumer = Consumer(conf)
        receiver = ConfluentReceiver(consumer)
        if group is None:
            parts = list(range(self.partitions(topic))) if partitions is None else list(partitions)
            consumer.assign([TopicPartition(topic, p, _end(consumer, topic, p)) for p in parts])
            receiver.assigned = parts
        else:

            def assigned(c: Any, tps: list[Any]) -> None:
                # A partition without a committed offset starts at its end as of now: resolve it
                # here rather than let the client do it later and skip what arrives meanwhile.
                backs = [None if rewind is None else rewind(tp.partition) for tp in tps]
                start = c.committed(tps, timeout=10)
                if any(b is not None for b in backs):
                    now = time.time()
                    asked = [
                        TopicPartition(topic, tp.partition, int((now - b) * 1000))
                        for tp, b in zip(tps, backs, strict=True)
                        if b is not None
                    ]
                    found = iter(c.offsets_for_times(asked, timeout=10))
                    start = [
                        s if b is None else next(found) for s, b in zip(start, backs, strict=True)
                    ]
                for tp, at in zip(tps, start, strict=True):
                    tp.offset = at.offset if at.offset >= 0 else _end(c, topic, tp.partition)
                c.assign(tps)
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
        """Partition count from the broker; never creates the topic."""
        admin = AdminClient(self.config)
        future = admin.describe_topics(TopicCollection([topic]), request_timeout=10)[topic]
        try:
            return len(future.result(timeout=15).partitions)
        except KafkaException as e:
            raise RuntimeError(f"topic {topic!r} is not available: {e}") from e


def wait_for_leaders(
    admin: Any, topic: str, partitions: int | None = None, timeout: float = 30.0
) -> None:
    """Wait until every partition of ``topic`` (``partitions`` of them, if given) has a leader;
    :class:`TimeoutError` after ``timeout`` seconds. ``admin``: a confluent-kafka AdminClient."""
    deadline = time.monotonic() + timeout
    while True:
        md = admin.list_topics(topic=topic, timeout=min(10.0, timeout))
        t = md.topics.get(topic)
        if (
            t is not None
            and t.error is None
            and t.partitions
            and (partitions is None or len(t.partitions) == partitions)
            and all(p.leader >= 0 for p in t.partitions.values())
        ):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"topic {topic}: partitions without a leader after {timeout:g} s")
        time.sleep(0.1)


#: Errors a partition reports while its leader is being elected (a topic created moments ago).
_NOT_READY = frozenset(
    (
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.UNKNOWN_TOPIC_OR_PART,
    )
)


def _end(consumer: Any, topic: str, partition: int, timeout: float = 10.0) -> int:
    """The partition's end offset (high watermark) now; retried while its leader is elected."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            _low, high = consumer.get_watermark_offsets(
                TopicPartition(topic, partition), timeout=timeout
            )
            return int(high)
        except KafkaException as e:
            err = e.args[0] if e.args else None
            code = err.code() if isinstance(err, KafkaError) else None
            if code not in _NOT_READY or time.monotonic() > deadline:
                raise
            time.sleep(0.1)


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
        """Drop what is still queued (flush first to keep it) and stop the client."""
        self._producer.purge()
        self._producer.flush(0)
        del self._producer

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def queued(self) -> int:
        producer = getattr(self, "_producer", None)
        return 0 if producer is None else len(producer)


#: Seconds between the receiver's refreshes of its lag (:meth:`ConfluentReceiver.lag`).
LAG_REFRESH = 1.0


class ConfluentReceiver:
    def __init__(self, consumer: Any) -> None:
        self._consumer = consumer
        self.assigned: list[int] = []
        self.errors = 0
        self._lag: dict[int, int] = {}
        self._lag_due = 0.0

    def poll(self, timeout: float, max_records: int = MAX_POLL_RECORDS) -> list[Record]:
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
        now = time.monotonic()
        if now >= self._lag_due:
            self._lag_due = now + LAG_REFRESH
            with contextlib.suppress(KafkaException):  # rebalancing: keep the last reading
                self._lag = self._read_lag()
        return out

    def assignment(self) -> list[int]:
        return list(self.assigned)

    def lag(self) -> dict[int, int]:
        """Records between the position and the end of each assigned partition, as of the last
        refresh (at most :data:`LAG_REFRESH` s before the last poll); partitions with no position
        yet are left out. Safe from any thread: it does not touch the consumer, whose calls
        confluent-kafka serialises (a metrics scrape asking it directly waited for the poll to
        end, and under a busy poll loop for seconds)."""
        return dict(self._lag)

    def _read_lag(self) -> dict[int, int]:
        """:meth:`lag`, read from the consumer (local state, no broker round trip)."""
        out: dict[int, int] = {}
        for tp in self._consumer.position(self._consumer.assignment()):
            if tp.offset < 0:
                continue
            _low, high = self._consumer.get_watermark_offsets(tp, cached=True)
            if high >= 0:
                out[tp.partition] = max(0, int(high) - int(tp.offset))
        return out

    def commit(self) -> None:
        # nothing to commit yet, or rebalancing: the next commit covers it
        with contextlib.suppress(KafkaException):
            self._consumer.commit(asynchronous=True)

    def close(self) -> None:
        self._consumer.close()
