"""The pure-Python transport: kafka-python (3.0.x).

Same contract as :mod:`producer.kafka_confluent`, with these differences, all forced by
kafka-python:

- **Sender start.** ``KafkaProducer()`` bootstraps eagerly and blocks (and fails) while no broker
  answers, so the producer is built on a background thread: :meth:`KafkaPythonTransport.sender`
  waits up to ``connect_wait_ms`` (default 2 s) for it and then returns anyway; until the producer
  exists, :meth:`KafkaPythonSender.send` raises :class:`~producer.transport.QueueFull` (the agent
  keeps the counts), and the thread keeps retrying until the sender is closed.
- **Queue bound.** kafka-python 3.0 has no bounded buffer (no ``buffer_memory``): the sender counts
  undelivered messages itself and raises ``QueueFull`` past ``max_queued_messages`` (default
  1,000, like librdkafka's ``queue.buffering.max.messages`` in the confluent transport).
- **Metadata.** The first send to a topic waits up to ``max_block_ms`` (default 1 s) for the
  topic's metadata, then raises ``QueueFull``; once known, ``send`` never blocks.
- **Rebalance callbacks.** kafka-python runs the rebalance listener on its own I/O thread (where
  blocking calls are refused), and also reports empty assignments. The receiver queues those
  events and replays them from :meth:`KafkaPythonReceiver.poll` (and ``close``), on the polling
  thread as confluent-kafka does, skipping empty lists. Before ``on_assign`` runs, the positions
  of the new partitions are resolved, so every message produced after ``on_assign`` returns is
  received.
- **Receiver start.** ``KafkaConsumer()`` bootstraps eagerly too: creating a receiver while no
  broker answers fails after ``bootstrap_timeout_ms`` (default 10 s). A fixed-partition receiver
  resolves its end offsets before returning, so it receives everything sent after it exists.
- **Undecodable batches.** A batch kafka-python cannot decode (lz4, snappy or zstd without their
  Python packages -- lz4 is the confluent transport's default -- or a bad CRC) makes ``poll``
  raise, and again on every later call: that partition stalls there. (Left alone, kafka-python
  3.0 would spin forever inside the next ``poll``; the receiver prevents that.)
- **Topics** are never auto-created by this transport (``allow_auto_create_topics=False``).

``config`` holds kafka-python keyword settings (``security_protocol``, ``sasl_*``, ``ssl_*``,
``client_id``, ``request_timeout_ms``...), overriding the defaults below; each key goes to the
clients that know it (producer, consumer, admin). Four keys belong to this transport:
``max_queued_messages``, ``connect_wait_ms``, ``position_timeout_ms`` (how long a receiver
waits to resolve a new partition's start offset, default 3 s) and ``metadata_wait_ms`` (how long
a group member waits for its topic's metadata before it joins, default 15 s: a group leader
without it assigns nothing). Unknown keys raise :class:`ValueError`.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

from kafka import (
    ConsumerRebalanceListener,
    KafkaAdminClient,
    KafkaConsumer,
    KafkaProducer,
    TopicPartition,
)
from kafka.errors import KafkaError, for_code

from .transport import MAX_POLL_RECORDS, QueueFull, Record, Rewind

log = logging.getLogger(__name__)

PRODUCER_DEFAULTS: dict[str, Any] = {
    "acks": "all",
    "enable_idempotence": True,
    "linger_ms": 5,
    # kafka-python compresses gzip at level 9 in its I/O thread; lz4/snappy/zstd need extra
    # packages. Usage and grant batches are small: send them uncompressed.
    "compression_type": None,
    "max_block_ms": 1000,
    "allow_auto_create_topics": False,  # a missing topic is an error, not a 1-partition topic
    "request_timeout_ms": 10000,
    "delivery_timeout_ms": 30000,
    "bootstrap_timeout_ms": 10000,
}
CONSUMER_DEFAULTS: dict[str, Any] = {
    "enable_auto_commit": False,
    "auto_offset_reset": "latest",
    "fetch_max_wait_ms": 50,
    "session_timeout_ms": 6000,
    "heartbeat_interval_ms": 1000,
    "bootstrap_timeout_ms": 10000,
    "allow_auto_create_topics": False,
    # a group subscribed to a topic created moments ago sees its partitions within seconds,
    # not at the default 5-minute metadata refresh (and rebalances then)
    "metadata_max_age_ms": 5000,
}
ADMIN_DEFAULTS: dict[str, Any] = {
    "request_timeout_ms": 10000,
    "bootstrap_timeout_ms": 10000,
}
#: Settings of this transport itself (not kafka-python's), with their defaults.
TRANSPORT_DEFAULTS: dict[str, int] = {
    "max_queued_messages": 1000,
    "connect_wait_ms": 2000,
    "position_timeout_ms": 3000,  # per new partition, before on_assign (see _dispatch)
    "metadata_wait_ms": 15000,  # a group member's topic metadata, before it joins
}

_PRODUCER_KEYS = frozenset(KafkaProducer.DEFAULT_CONFIG)
_CONSUMER_KEYS = frozenset(KafkaConsumer.DEFAULT_CONFIG)
_ADMIN_KEYS = frozenset(KafkaAdminClient.DEFAULT_CONFIG)
_KNOWN_KEYS = _PRODUCER_KEYS | _CONSUMER_KEYS | _ADMIN_KEYS | frozenset(TRANSPORT_DEFAULTS)
_CLOSE_TIMEOUT_MS = 5000


def _await_topic(consumer: Any, topic: str, wait: float) -> None:
    """Until ``consumer``'s own metadata knows ``topic``'s partitions (at most ``wait`` s).

    A group leader assigns from its own metadata: joining before it knows a new topic, it logs
    "No partition metadata for topic", hands out nothing, and kafka-python may not rejoin for a
    long time (seen: over 90 s). Past ``wait`` it joins anyway (the topic may come later)."""
    deadline = time.monotonic() + wait
    while not consumer.partitions_for_topic(topic) and time.monotonic() < deadline:
        time.sleep(0.1)


def _only(keys: frozenset[str], conf: Mapping[str, Any]) -> dict[str, Any]:
    return {k: v for k, v in conf.items() if k in keys}


class KafkaPythonTransport:
    def __init__(self, bootstrap: str, config: Mapping[str, Any] | None = None) -> None:
        self.bootstrap = bootstrap
        user = dict(config or {})
        unknown = set(user) - _KNOWN_KEYS
        if unknown:
            raise ValueError(f"unknown kafka-python settings: {sorted(unknown)}")
        self.options = {k: int(user.pop(k, v)) for k, v in TRANSPORT_DEFAULTS.items()}
        if self.options["max_queued_messages"] < 1:
            raise ValueError("max_queued_messages must be >= 1")
        self.config: dict[str, Any] = {"bootstrap_servers": bootstrap, **user}

        self.producer_config = {**PRODUCER_DEFAULTS, **_only(_PRODUCER_KEYS, self.config)}
        if "delivery_timeout_ms" not in user:
            # kafka-python refuses delivery_timeout_ms < linger_ms + request_timeout_ms
            p = self.producer_config
            p["delivery_timeout_ms"] = max(
                p["delivery_timeout_ms"], p["linger_ms"] + p["request_timeout_ms"]
            )
        self.consumer_config = {**CONSUMER_DEFAULTS, **_only(_CONSUMER_KEYS, self.config)}
        self.admin_config = {**ADMIN_DEFAULTS, **_only(_ADMIN_KEYS, self.config)}

    def sender(self) -> KafkaPythonSender:
        return KafkaPythonSender(
            self.producer_config,
            max_queued=self.options["max_queued_messages"],
            connect_wait=self.options["connect_wait_ms"] / 1000.0,
        )

    def receiver(
        self,
        topic: str,
        *,
        partitions: Sequence[int] | None = None,
        group: str | None = None,
        on_assign: Callable[[list[int]], None] | None = None,
        on_revoke: Callable[[list[int]], None] | None = None,
        rewind: Rewind | None = None,
    ) -> KafkaPythonReceiver:
        position_timeout_ms = self.options["position_timeout_ms"]
        if group is None:
            parts = list(range(self.partitions(topic))) if partitions is None else list(partitions)
            consumer = KafkaConsumer(**{**self.consumer_config, "group_id": None})
            receiver = KafkaPythonReceiver(consumer, topic, position_timeout_ms)
            try:
                tps = [TopicPartition(topic, p) for p in parts]
                consumer.assign(tps)
                if tps:
                    consumer.seek_to_end(*tps)
                receiver._resolve_positions(parts)
            except BaseException:
                receiver.close()
                raise
            receiver.assigned = parts
            return receiver
        consumer = KafkaConsumer(**{**self.consumer_config, "group_id": group})
        receiver = KafkaPythonReceiver(
            consumer,
            topic,
            position_timeout_ms,
            on_assign=on_assign,
            on_revoke=on_revoke,
            rewind=rewind,
        )
        try:
            _await_topic(consumer, topic, self.options["metadata_wait_ms"] / 1000.0)
            consumer.subscribe([topic], listener=_Listener(receiver))
        except BaseException:
            receiver.close()
            raise
        return receiver

    def partitions(self, topic: str) -> int:
        try:
            admin = KafkaAdminClient(**self.admin_config)
        except KafkaError as e:
            raise RuntimeError(
                f"topic {topic!r}: cannot read metadata from {self.bootstrap}: {e}"
            ) from e
        try:
            topics = admin.describe_topics([topic])
        except KafkaError as e:
            raise RuntimeError(f"topic {topic!r}: cannot read metadata: {e}") from e
        finally:
            admin.close()
        for t in topics:
            if t.get("name") != topic:
                continue
            code, parts = t.get("error_code", 0), t.get("partitions") or []
            if code == 0 and parts:
                return len(parts)
            reason = for_code(code).__name__ if code else "no partitions"
            raise RuntimeError(f"topic {topic!r} is not available: {reason}")
        raise RuntimeError(f"topic {topic!r} is not available: missing from the metadata")


class KafkaPythonSender:
    """A ``KafkaProducer`` built in the background, with a bound on undelivered messages."""

    def __init__(self, conf: dict[str, Any], *, max_queued: int, connect_wait: float) -> None:
        self._conf = conf
        self._max_queued = max_queued
        self._lock = threading.Lock()
        self._pending = 0
        self._errors = 0
        self._producer: Any = None
        self._failure: BaseException | None = None
        self._closed = threading.Event()
        self._settled = threading.Event()  # the producer exists, or cannot be built
        self._thread = threading.Thread(
            target=self._connect, name="drl-kafka-python-connect", daemon=True
        )
        self._thread.start()
        self._settled.wait(max(0.0, connect_wait))
        if self._failure is not None:
            raise self._failure

    def _connect(self) -> None:
        delay, warned = 0.2, False
        while not self._closed.is_set():
            try:
                producer = KafkaProducer(**self._conf)
            except KafkaError as e:
                if not e.retriable:
                    self._failure = e
                    self._settled.set()
                    return
                (log.debug if warned else log.warning)("kafka-python producer: %s; retrying", e)
                warned = True
                self._closed.wait(delay)
                delay = min(delay * 2, 5.0)
                continue
            except Exception as e:  # bad settings: permanent
                self._failure = e
                self._settled.set()
                return
            with self._lock:
                closed = self._closed.is_set()
                if not closed:
                    self._producer = producer
            if closed:
                _close_producer(producer)
            self._settled.set()
            return

    def _delivered(self, _metadata: Any) -> None:
        with self._lock:
            self._pending -= 1

    def _failed(self, _exc: BaseException) -> None:
        with self._lock:
            self._pending -= 1
            self._errors += 1

    def send(self, topic: str, partition: int, value: bytes) -> None:
        producer = self._producer
        if producer is None:
            if self._failure is not None:
                raise RuntimeError(f"kafka-python producer failed: {self._failure!r}")
            raise QueueFull("kafka-python producer is not connected (yet)")
        with self._lock:
            if self._pending >= self._max_queued:
                raise QueueFull(f"{self._pending} messages undelivered (max_queued_messages)")
            self._pending += 1
        try:
            future = producer.send(topic, value=value, partition=partition)
        except KafkaError as e:  # metadata unknown after max_block_ms, producer closed, ...
            with self._lock:
                self._pending -= 1
            raise QueueFull(f"kafka-python: {e}") from e
        except BaseException:
            with self._lock:
                self._pending -= 1
            raise
        future.add_callback(self._delivered)
        future.add_errback(self._failed)

    def service(self) -> None:
        """Nothing to do: kafka-python serves delivery callbacks on its I/O thread."""

    def flush(self, timeout: float) -> int:
        producer = self._producer
        if producer is not None:
            # raises KafkaTimeoutError when messages are left after timeout
            with contextlib.suppress(KafkaError):
                producer.flush(timeout=max(0.0, timeout))
        return self._pending

    def close(self) -> None:
        """Stop at once; undelivered messages are still sent (or expire) in the background."""
        self._closed.set()
        with self._lock:
            producer, self._producer = self._producer, None
        if producer is not None:
            _close_producer(producer)

    @property
    def errors(self) -> int:
        return self._errors

    @property
    def queued(self) -> int:
        """Messages queued and not yet delivered or failed."""
        return self._pending


def _close_producer(producer: Any) -> None:
    try:
        producer.close(timeout=0)
    except KafkaError:
        # close() flushes first and raises while records are undelivered: let a daemon thread
        # wait for them (bounded by delivery_timeout_ms) and then stop the I/O thread
        threading.Thread(target=producer.close, name="drl-kafka-python-close", daemon=True).start()


class KafkaPythonReceiver:
    def __init__(
        self,
        consumer: Any,
        topic: str,
        position_timeout_ms: int,
        *,
        on_assign: Callable[[list[int]], None] | None = None,
        on_revoke: Callable[[list[int]], None] | None = None,
        rewind: Rewind | None = None,
    ) -> None:
        self._consumer = consumer
        self._rewind = rewind
        self._topic = topic
        self._position_timeout_ms = position_timeout_ms
        self._on_assign = on_assign
        self._on_revoke = on_revoke
        self._events: list[tuple[bool, list[int]]] = []  # (assigned?, partitions)
        self._events_lock = threading.Lock()
        self._closed = False
        self.assigned: list[int] = []
        self.errors = 0  # polls that raised

    # called by _Listener on kafka-python's I/O thread
    def _queue(self, assigned: bool, tps: Any) -> None:
        parts = sorted({tp.partition for tp in tps or ()})
        if parts:
            with self._events_lock:
                self._events.append((assigned, parts))

    def _resolve_positions(self, parts: list[int]) -> None:
        for p in parts:
            # unresolved (timeout, or no longer assigned): poll() resolves it later
            with contextlib.suppress(KafkaError):
                self._consumer.position(
                    TopicPartition(self._topic, p), timeout_ms=self._position_timeout_ms
                )

    def _seek_back(self, parts: list[int], rewind: Rewind) -> None:
        """Start each of ``parts`` at the first record appended at or after
        ``now - rewind(partition)`` (those for which it gives a number)."""
        now = time.time()
        backs = {p: rewind(p) for p in parts}
        since = {
            TopicPartition(self._topic, p): int((now - b) * 1000)
            for p, b in backs.items()
            if b is not None
        }
        tps = list(since)
        if not tps:
            return
        try:
            found = self._consumer.offsets_for_times(since)
        except KafkaError:
            return  # the committed offset (else the end) stands: poll() resolves it
        for tp in tps:
            hit = found.get(tp)
            if hit is None:
                self._consumer.seek_to_end(tp)
            else:
                self._consumer.seek(tp, hit.offset)

    def _dispatch(self) -> None:
        with self._events_lock:
            events, self._events = self._events, []
        for assigned, parts in events:
            if assigned:
                if not self._closed:
                    if self._rewind is not None:
                        self._seek_back(parts, self._rewind)
                    self._resolve_positions(parts)
                self.assigned = sorted({*self.assigned, *parts})
                if self._on_assign is not None:
                    self._on_assign(parts)
            else:
                gone = set(parts)
                self.assigned = [p for p in self.assigned if p not in gone]
                if self._on_revoke is not None:
                    self._on_revoke(parts)

    def poll(self, timeout: float, max_records: int = MAX_POLL_RECORDS) -> list[Record]:
        try:
            batches = self._consumer.poll(
                timeout_ms=max(0, int(timeout * 1000)), max_records=max(1, max_records)
            )
        except Exception:
            # a batch kafka-python cannot decode (lz4/snappy/zstd without their package, bad
            # CRC) raises here; left as is, the next poll() spins forever on the broken batch
            self.errors += 1
            self._unstick()
            raise
        finally:
            self._dispatch()
        out: list[Record] = []
        for records in batches.values():
            for r in records:
                if r.value is None:
                    continue
                out.append(Record(r.topic, r.partition, r.offset, r.timestamp / 1000.0, r.value))
        return out

    def _unstick(self) -> None:
        """Drop kafka-python 3.0's half-read batch, so the next poll fetches it again (and raises
        again) instead of looping on it without end."""
        fetcher: Any = getattr(self._consumer, "_fetcher", None)
        part = getattr(fetcher, "_next_partition_records", None)
        if part is not None:
            with contextlib.suppress(Exception):
                part.drain()
            fetcher._next_partition_records = None

    def assignment(self) -> list[int]:
        return list(self.assigned)

    def commit(self) -> None:
        if self._closed or self._consumer.config.get("group_id") is None:
            return
        # best effort: no group yet, rebalancing, broker down -> the next commit covers it
        with contextlib.suppress(Exception):
            self._consumer.commit_async()

    def close(self) -> None:
        if self._closed:
            return
        self._closed = True
        try:
            self._consumer.close(autocommit=False, timeout_ms=_CLOSE_TIMEOUT_MS)
        finally:
            self._dispatch()  # the revocation of leaving the group


class _Listener(ConsumerRebalanceListener):  # type: ignore[misc]
    def __init__(self, receiver: KafkaPythonReceiver) -> None:
        self._receiver = receiver

    def on_partitions_revoked(self, revoked: Any) -> None:
        self._receiver._queue(False, revoked)

    def on_partitions_assigned(self, assigned: Any) -> None:
        self._receiver._queue(True, assigned)
