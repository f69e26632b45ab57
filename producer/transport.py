"""The small interface every transport implements, and the in-process bus.

Two roles: a :class:`Sender` produces byte messages to a topic partition without blocking, and a
:class:`Receiver` returns the records of the partitions it reads (a fixed assignment, or a
consumer group that the transport balances). Implementations: confluent-kafka (default,
:mod:`producer.kafka_confluent`), kafka-python (:mod:`producer.kafka_python`) and
:class:`InProcessBus` (one process: the embedded mode and fast unit tests).
"""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Protocol

#: Default topic names.
USAGE_TOPIC = "drl.usage"
GRANTS_TOPIC = "drl.grants"
#: Most records one ``Receiver.poll`` returns (the aggregator folds one poll's usage at once).
MAX_POLL_RECORDS = 500


@dataclass(frozen=True, slots=True)
class Record:
    topic: str
    partition: int
    offset: int
    timestamp: float  # seconds since the epoch (the record's Kafka timestamp)
    value: bytes


class QueueFull(Exception):
    """The sender's local queue is full: the message was not taken."""


class Sender(Protocol):
    def send(self, topic: str, partition: int, value: bytes) -> None:
        """Queue one message; never blocks. Raises :class:`QueueFull` if it cannot be queued."""

    def service(self) -> None:
        """Serve delivery reports (counts failures in ``errors``)."""

    def flush(self, timeout: float) -> int:
        """Wait up to ``timeout`` seconds for queued messages; returns how many are left."""

    def close(self) -> None: ...

    @property
    def errors(self) -> int:
        """Messages that failed delivery so far."""

    @property
    def queued(self) -> int:
        """Messages queued in the client, not yet delivered or failed."""


class Receiver(Protocol):
    def poll(self, timeout: float, max_records: int = MAX_POLL_RECORDS) -> list[Record]:
        """Up to ``max_records`` records, waiting at most ``timeout`` seconds. A client may
        return as soon as it has some (kafka-python, the in-process bus) or only once it has
        ``max_records`` or the time is up (confluent-kafka's ``consume``)."""

    def assignment(self) -> list[int]:
        """Partitions currently read."""

    def commit(self) -> None:
        """Commit the offsets of the records returned so far (consumer groups)."""

    def close(self) -> None: ...


#: ``rewind(partition) -> seconds``: where a group member starts a newly assigned partition, as
#: seconds back from now by append time; None: its committed offset (else its end).
Rewind = Callable[[int], float | None]


class Transport(Protocol):
    """Makes senders and receivers and answers metadata."""

    def sender(self) -> Sender: ...

    def receiver(
        self,
        topic: str,
        *,
        partitions: Sequence[int] | None = None,
        group: str | None = None,
        on_assign: Callable[[list[int]], None] | None = None,
        on_revoke: Callable[[list[int]], None] | None = None,
        rewind: Rewind | None = None,
    ) -> Receiver:
        """Read ``partitions`` of ``topic`` from their end, or join consumer ``group``.

        A group member starts a newly assigned partition at its committed offset (else its
        end); when ``rewind(partition)`` gives seconds, at the first record appended at or
        after ``time.time() - seconds`` instead (Kafka's ``offsets_for_times``; the end if
        none). ``on_assign`` runs once those positions are set.
        """

    def partitions(self, topic: str) -> int:
        """Partition count of ``topic``."""


# -- the in-process bus --------------------------------------------------------------------------


@dataclass
class _Topic:
    partitions: list[list[Record]]
    cond: threading.Condition = field(default_factory=threading.Condition)


class InProcessBus:
    """Topics as lists in memory; one group member gets every partition. Never for production.

    Differences from Kafka: every group member gets every partition (no balancing, no
    ``on_revoke``).
    """

    def __init__(self, topics: dict[str, int] | None = None) -> None:
        self._topics: dict[str, _Topic] = {}
        for name, n in (topics or {USAGE_TOPIC: 4, GRANTS_TOPIC: 4}).items():
            self.create_topic(name, n)

    def create_topic(self, name: str, partitions: int) -> None:
        self._topics[name] = _Topic([[] for _ in range(partitions)])

    def _topic(self, name: str) -> _Topic:
        try:
            return self._topics[name]
        except KeyError:
            raise RuntimeError(f"topic {name!r} is not available: unknown topic") from None

    def partitions(self, topic: str) -> int:
        return len(self._topic(topic).partitions)

    def sender(self) -> _BusSender:
        return _BusSender(self)

    def receiver(
        self,
        topic: str,
        *,
        partitions: Sequence[int] | None = None,
        group: str | None = None,
        on_assign: Callable[[list[int]], None] | None = None,
        on_revoke: Callable[[list[int]], None] | None = None,
        rewind: Rewind | None = None,
    ) -> _BusReceiver:
        t = self._topic(topic)
        parts = list(range(len(t.partitions))) if partitions is None else list(partitions)
        # like a new Kafka group with auto.offset.reset=latest, or a fixed assignment: the end
        with t.cond:
            start = {p: len(t.partitions[p]) for p in parts}
            if rewind is not None and group is not None:
                for p in parts:
                    back = rewind(p)
                    if back is not None:
                        stamps = [r.timestamp for r in t.partitions[p]]
                        start[p] = bisect.bisect_left(stamps, time.time() - back)
        if on_assign is not None:
            on_assign(parts)
        return _BusReceiver(t, start)

    def append(self, topic: str, partition: int, value: bytes) -> None:
        t = self._topic(topic)
        with t.cond:
            log = t.partitions[partition]
            log.append(Record(topic, partition, len(log), time.time(), value))
            t.cond.notify_all()


class _BusSender:
    def __init__(self, bus: InProcessBus) -> None:
        self._bus = bus

    def send(self, topic: str, partition: int, value: bytes) -> None:
        self._bus.append(topic, partition, value)

    def service(self) -> None:
        pass

    def flush(self, timeout: float) -> int:
        return 0

    def close(self) -> None:
        pass

    @property
    def errors(self) -> int:
        return 0

    @property
    def queued(self) -> int:
        return 0


class _BusReceiver:
    def __init__(self, topic: _Topic, positions: dict[int, int]) -> None:
        self._topic = topic
        self._pos = positions

    def poll(self, timeout: float, max_records: int = MAX_POLL_RECORDS) -> list[Record]:
        t = self._topic
        deadline = time.monotonic() + timeout
        with t.cond:
            while True:
                out: list[Record] = []
                for p, pos in self._pos.items():
                    log = t.partitions[p]
                    take = log[pos : pos + max_records - len(out)]
                    out.extend(take)
                    self._pos[p] = pos + len(take)
                    if len(out) >= max_records:
                        break
                left = deadline - time.monotonic()
                if out or left <= 0:
                    return out
                t.cond.wait(left)

    def assignment(self) -> list[int]:
        return list(self._pos)

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass
