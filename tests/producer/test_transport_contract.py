"""One contract, three transports: confluent-kafka, kafka-python and the in-process bus.

Every test taking ``env`` runs once per transport; the Kafka ones use the session's real broker
(``kafka_bootstrap``) and are marked ``integration``. The dead-broker tests need no broker: they
point a sender at a closed loopback port.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

import pytest

from producer.transport import (
    InProcessBus,
    QueueFull,
    Receiver,
    Record,
    Rewind,
    Sender,
    Transport,
)

pytestmark = pytest.mark.timeout(30)

KAFKA_KINDS = ("confluent", "kafka-python")
#: nothing listens on port 1 of the loopback interface: connections are refused at once
DEAD_BOOTSTRAP = "127.0.0.1:1"
#: a local queue of 10 messages that expire quickly, per client
SMALL_QUEUE: dict[str, dict[str, Any]] = {
    "confluent": {"queue.buffering.max.messages": 10, "message.timeout.ms": 2000},
    "kafka-python": {
        "max_queued_messages": 10,
        "connect_wait_ms": 200,
        "bootstrap_timeout_ms": 1000,
    },
}
#: the barrier's marker message
MARK = b"--mark--"
#: hold messages in the local queue for a second
LONG_LINGER: dict[str, dict[str, Any]] = {
    "confluent": {"linger.ms": 1000},
    "kafka-python": {"linger_ms": 1000},
}


NO_LZ4 = (
    "kafka_confluent compresses with lz4 by default; kafka-python decodes lz4 only with the"
    " 'lz4' package (not installed): its receiver raises UnsupportedCodecError"
)


def _admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap})


def _topic_exists(bootstrap: str, topic: str) -> bool:
    # all topics: a metadata request naming no topic creates none
    return topic in _admin(bootstrap).list_topics(timeout=10).topics


def _appears(bootstrap: str, topic: str, within: float) -> bool:
    """Whether ``topic`` exists within ``within`` s (auto-creation completes asynchronously)."""
    deadline = time.monotonic() + within
    while not _topic_exists(bootstrap, topic):
        if time.monotonic() >= deadline:
            return False
        time.sleep(0.1)
    return True


def _delete_topic(bootstrap: str, topic: str) -> None:
    admin = _admin(bootstrap)  # referenced until the futures are done
    if topic in admin.list_topics(timeout=10).topics:
        for fut in admin.delete_topics([topic], operation_timeout=10).values():
            with contextlib.suppress(Exception):
                fut.result(timeout=10)


def make_transport(kind: str, bootstrap: str, config: Mapping[str, Any] | None = None) -> Transport:
    if kind == "confluent":
        from producer.kafka_confluent import ConfluentTransport

        return ConfluentTransport(bootstrap, config)
    if kind == "kafka-python":
        from producer.kafka_python import KafkaPythonTransport

        return KafkaPythonTransport(bootstrap, config)
    raise ValueError(kind)


@dataclass
class Env:
    """A transport under test, a way to make fresh topics, and cleanup of what tests open."""

    kind: str
    transport: Transport
    new_topic: Callable[[int], str]
    bootstrap: str | None = None
    _open: list[Sender | Receiver] = field(default_factory=list)

    def sender(self) -> Sender:
        s = self.transport.sender()
        self._open.append(s)
        return s

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
        r = self.transport.receiver(
            topic,
            partitions=partitions,
            group=group,
            on_assign=on_assign,
            on_revoke=on_revoke,
            rewind=rewind,
        )
        self._open.append(r)
        return r

    def close(self, x: Sender | Receiver) -> None:
        self._open.remove(x)
        x.close()

    def close_all(self) -> None:
        while self._open:
            with contextlib.suppress(Exception):
                self._open.pop().close()


def _env(request: pytest.FixtureRequest, kind: str) -> Env:
    if kind == "inprocess":
        bus = InProcessBus()

        def new_bus_topic(partitions: int) -> str:
            name = f"t-{uuid.uuid4().hex[:10]}"
            bus.create_topic(name, partitions)
            return name

        return Env(kind, bus, new_bus_topic)
    bootstrap: str = request.getfixturevalue("kafka_bootstrap")
    unique_topic: Callable[..., str] = request.getfixturevalue("unique_topic")
    return Env(
        kind, make_transport(kind, bootstrap), lambda n: unique_topic(partitions=n), bootstrap
    )


ALL = [
    pytest.param("inprocess", id="inprocess"),
    *(pytest.param(k, id=k, marks=pytest.mark.integration) for k in KAFKA_KINDS),
]
KAFKA = [pytest.param(k, id=k, marks=pytest.mark.integration) for k in KAFKA_KINDS]


@pytest.fixture(params=ALL)
def env(request: pytest.FixtureRequest) -> Iterator[Env]:
    e = _env(request, request.param)
    yield e
    e.close_all()


def collect(
    receiver: Receiver, count: int, timeout: float = 6.0, skip: bytes | None = None
) -> list[Record]:
    """Poll until ``count`` records arrived (or ``timeout``), then briefly for any extra."""
    got: list[Record] = []
    deadline = time.monotonic() + timeout
    while len(got) < count and time.monotonic() < deadline:
        got.extend(r for r in receiver.poll(0.2) if r.value != skip)
    got.extend(r for r in receiver.poll(0.3) if r.value != skip)
    return got


def barrier(
    sender: Sender, receivers: Sequence[Receiver], topic: str, partitions: Sequence[int]
) -> None:
    """Send ``MARK`` until every receiver read one on every partition: from then on each reads
    all that is sent (whatever its start-up delay)."""
    pending = {(i, p) for i in range(len(receivers)) for p in partitions}
    deadline = time.monotonic() + 15.0
    while pending:
        assert time.monotonic() < deadline, f"no mark read by (receiver, partition) {pending}"
        for p in sorted({p for _, p in pending}):
            sender.send(topic, p, MARK)
        assert sender.flush(10) == 0
        for i, r in enumerate(receivers):
            pending -= {(i, x.partition) for x in r.poll(0.2) if x.value == MARK}


def wait_assigned(receiver: Receiver, assigned: list[list[int]], want: set[int]) -> None:
    deadline = time.monotonic() + 15.0
    while {p for ps in assigned for p in ps} != want:
        assert time.monotonic() < deadline, f"on_assign calls so far: {assigned}"
        assert receiver.poll(0.1) == []


def assert_plausible(records: list[Record], since: float) -> None:
    now = time.time()
    for r in records:
        assert since - 5 <= r.timestamp <= now + 5, (r, since, now)
    offsets: dict[int, list[int]] = {}
    for r in records:
        offsets.setdefault(r.partition, []).append(r.offset)
    for offs in offsets.values():
        assert offs == sorted(set(offs)), offsets


# -- the contract --------------------------------------------------------------------------------


def test_partitions_reports_the_created_count(env: Env) -> None:
    for n in (1, 3):
        assert env.transport.partitions(env.new_topic(n)) == n


def test_partitions_of_a_missing_topic_raises_and_creates_nothing(
    env: Env, request: pytest.FixtureRequest
) -> None:
    missing = f"missing-{uuid.uuid4().hex}"
    expected = RuntimeError
    try:
        with pytest.raises(expected, match=missing):
            env.transport.partitions(missing)
        if env.bootstrap is not None:
            assert not _appears(env.bootstrap, missing, within=1.0)
    finally:
        if env.bootstrap is not None and _appears(env.bootstrap, missing, within=0.0):
            _delete_topic(env.bootstrap, missing)


def test_fixed_receiver_reads_its_partition_from_its_creation(
    env: Env, request: pytest.FixtureRequest
) -> None:
    topic = env.new_topic(3)
    sender = env.sender()  # connected before the receiver exists, so it sends at once below
    sender.send(topic, 1, b"before the receiver")
    assert sender.flush(10) == 0

    since = time.time()
    receiver = env.receiver(topic, partitions=[1])
    assert receiver.assignment() == [1]
    sent: dict[int, list[bytes]] = {0: [], 1: [], 2: []}
    for i in range(5):
        for p in (0, 1, 2):
            value = f"p{p}-m{i}-".encode() + bytes(range(256))  # every byte value, intact
            sender.send(topic, p, value)
            sent[p].append(value)
    assert sender.flush(10) == 0
    assert sender.errors == 0

    got = collect(receiver, len(sent[1]))
    assert [r.value for r in got] == sent[1]
    assert [r.partition for r in got] == [1] * len(sent[1])
    assert {r.topic for r in got} == {topic}
    assert_plausible(got, since)
    receiver.commit()  # no group: nothing to commit, must not raise
    env.close(receiver)


def test_fixed_receiver_reads_messages_sent_a_second_after_its_creation(env: Env) -> None:
    """The same, minus the first second (which confluent-kafka misses, see above)."""
    topic = env.new_topic(2)
    sender = env.sender()
    sender.send(topic, 0, b"before the receiver")
    assert sender.flush(10) == 0
    since = time.time()
    receiver = env.receiver(topic, partitions=[0])
    time.sleep(1.0)
    sent = [b"m%d" % i for i in range(5)]
    for value in sent:
        sender.send(topic, 0, value)
        sender.send(topic, 1, value + b" elsewhere")
    assert sender.flush(10) == 0
    got = collect(receiver, len(sent))
    assert [(r.partition, r.value) for r in got] == [(0, v) for v in sent]
    assert_plausible(got, since)


def test_group_receiver_is_assigned_every_partition_and_reads_later_messages(
    env: Env, request: pytest.FixtureRequest
) -> None:
    topic = env.new_topic(3)
    sender = env.sender()  # connected before the group is joined, so it sends at once below
    sender.send(topic, 0, b"before the group")
    assert sender.flush(10) == 0
    assigned: list[list[int]] = []
    revoked: list[list[int]] = []
    receiver = env.receiver(
        topic,
        group=f"g-{uuid.uuid4().hex[:10]}",
        on_assign=assigned.append,
        on_revoke=revoked.append,
    )
    receiver.commit()  # before the group is joined: must not raise
    wait_assigned(receiver, assigned, {0, 1, 2})
    assert all(ps == sorted(ps) and ps for ps in assigned), assigned
    assert receiver.assignment() == [0, 1, 2]
    assert revoked == []

    since = time.time()
    sent = [(p, f"g{p}-{i}".encode()) for i in range(4) for p in (0, 1, 2)]
    for p, value in sent:
        sender.send(topic, p, value)
    assert sender.flush(10) == 0

    got = collect(receiver, len(sent))
    assert sorted((r.partition, r.value) for r in got) == sorted(sent)
    for p in (0, 1, 2):  # in order within each partition
        assert [r.value for r in got if r.partition == p] == [v for q, v in sent if q == p]
    assert_plausible(got, since)
    receiver.commit()
    receiver.commit()
    env.close(receiver)


def test_group_receiver_with_rewind_starts_by_time(env: Env) -> None:
    """``rewind``: a newly assigned partition starts at the first record appended within the
    last ``rewind`` seconds (``offsets_for_times``), before ``on_assign`` runs; none: its end."""
    topic = env.new_topic(2)
    sender = env.sender()
    history = [(p, f"old{p}-{i}".encode()) for i in range(3) for p in (0, 1)]
    for p, value in history:
        sender.send(topic, p, value)
    assert sender.flush(10) == 0
    time.sleep(0.05)
    assigned: list[list[int]] = []
    receiver = env.receiver(
        topic,
        group=f"g-{uuid.uuid4().hex[:10]}",
        on_assign=assigned.append,
        rewind=lambda p: 3600.0,
    )
    got = collect(receiver, len(history), timeout=15.0)
    assert {p for ps in assigned for p in ps} == {0, 1}
    assert sorted((r.partition, r.value) for r in got) == sorted(history)
    # a record appended before "now - rewind" is not read: a short rewind starts at the end
    late: list[list[int]] = []
    short = env.receiver(
        topic,
        group=f"g-{uuid.uuid4().hex[:10]}",
        on_assign=late.append,
        rewind=lambda p: 0.001 if p else None,
    )
    wait_assigned(short, late, {0, 1})
    sender.send(topic, 1, b"new")
    assert sender.flush(10) == 0
    assert [r.value for r in collect(short, 1)] == [b"new"]


def test_flush_returns_zero_once_everything_is_delivered(env: Env) -> None:
    topic = env.new_topic(4)
    sender = env.sender()
    for i in range(400):
        sender.send(topic, i % 4, i.to_bytes(4, "big") * 16)
        if i % 100 == 0:
            sender.service()
    assert sender.flush(10) == 0
    sender.service()
    assert sender.errors == 0
    assert sender.flush(0) == 0


def test_receivers_close_promptly(env: Env) -> None:
    topic = env.new_topic(2)
    fixed = env.receiver(topic, partitions=[0, 1])
    assigned: list[list[int]] = []
    group = env.receiver(topic, group=f"g-{uuid.uuid4().hex[:10]}", on_assign=assigned.append)
    wait_assigned(group, assigned, {0, 1})
    assert fixed.poll(0.1) == []
    for r in (fixed, group):
        start = time.monotonic()
        env.close(r)
        assert time.monotonic() - start < 30  # a hang, not a slow leave on a busy broker


@pytest.mark.integration
def test_confluent_lag_counts_unread_records_and_never_waits_for_a_poll(
    kafka_bootstrap: str, unique_topic: Callable[..., str], monkeypatch: pytest.MonkeyPatch
) -> None:
    """The aggregator's metrics read the lag from the HTTP thread while its loop polls: the
    answer comes from the receiver's own polls, not from the consumer (whose calls
    confluent-kafka serialises: a scrape used to wait out the poll, for seconds)."""
    import threading

    from producer import kafka_confluent
    from producer.kafka_confluent import ConfluentReceiver

    monkeypatch.setattr(kafka_confluent, "LAG_REFRESH", 0.0)  # refresh at every poll
    transport = make_transport("confluent", kafka_bootstrap)
    topic = unique_topic(partitions=1)
    assigned: list[list[int]] = []
    receiver = transport.receiver(
        topic, group=f"g-{uuid.uuid4().hex[:10]}", on_assign=assigned.append
    )
    assert isinstance(receiver, ConfluentReceiver)
    sender = transport.sender()
    try:
        wait_assigned(receiver, assigned, {0})
        barrier(sender, [receiver], topic, [0])
        assert receiver.poll(0.3) == [] and receiver.lag() == {0: 0}
        for i in range(3):
            sender.send(topic, 0, f"r{i}".encode())
        assert sender.flush(10) == 0
        behind: list[int] = []
        deadline = time.monotonic() + 10
        while len(behind) < 3 and time.monotonic() < deadline:
            if receiver.poll(0.2, max_records=1):
                behind.append(receiver.lag()[0])
        assert len(behind) == 3 and behind[-1] == 0, behind
        assert all(0 <= b <= 2 - i for i, b in enumerate(behind)), behind
        assert max(behind) > 0, behind  # one fetch brought the three: two were unread

        polled = threading.Event()
        poller = threading.Thread(target=lambda: (receiver.poll(3.0), polled.set()))
        poller.start()
        time.sleep(0.3)
        polling = not polled.is_set()
        started = time.monotonic()
        lag = receiver.lag()
        took = time.monotonic() - started
        poller.join(10)
        assert polling, "the poll ended before lag() was asked: the test proves nothing"
        assert took < 1.0, f"lag() waited {took:.2f} s for the poll"
        assert lag == {0: 0}
    finally:
        sender.close()
        receiver.close()


@pytest.mark.integration
@pytest.mark.parametrize("kind", KAFKA_KINDS)
def test_two_group_members_split_the_partitions(
    kind: str, kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    """Callbacks run inside poll(), on the polling thread; the first member gives up partitions."""
    import threading

    topic = unique_topic(partitions=4)
    transport = make_transport(kind, kafka_bootstrap)
    group = f"g-{uuid.uuid4().hex[:10]}"
    polling = threading.current_thread()
    events: list[tuple[str, str, list[int]]] = []

    def recorder(member: str, what: str) -> Callable[[list[int]], None]:
        def record(parts: list[int]) -> None:
            assert threading.current_thread() is polling
            events.append((member, what, parts))

        return record

    a = transport.receiver(
        topic, group=group, on_assign=recorder("a", "assign"), on_revoke=recorder("a", "revoke")
    )
    b: Receiver | None = None
    try:
        deadline = time.monotonic() + 20
        while a.assignment() != [0, 1, 2, 3]:
            assert time.monotonic() < deadline, events
            a.poll(0.1)
        b = transport.receiver(
            topic, group=group, on_assign=recorder("b", "assign"), on_revoke=recorder("b", "revoke")
        )
        while not (a.assignment() and b.assignment()):
            assert time.monotonic() < deadline, events
            a.poll(0.1)
            b.poll(0.1)
        assert sorted(a.assignment() + b.assignment()) == [0, 1, 2, 3], events
        assert ("a", "revoke", [0, 1, 2, 3]) in events
    finally:
        a.close()
        if b is not None:
            b.close()


# -- local queue bounds (no in-process equivalent: the bus has no queue) ------------------------


@pytest.mark.parametrize("kind", KAFKA_KINDS)
def test_sender_raises_queue_full_when_the_broker_is_unreachable(kind: str) -> None:
    transport = make_transport(kind, DEAD_BOOTSTRAP, SMALL_QUEUE[kind])
    start = time.monotonic()
    sender = transport.sender()
    try:
        taken = 0
        with pytest.raises(QueueFull):
            while taken <= 10:
                t = time.monotonic()
                sender.send("drl.contract", 0, b"x")
                assert time.monotonic() - t < 0.5, "send blocked"
                taken += 1
        # confluent queues up to its bound; kafka-python takes nothing before it connects
        assert taken <= 10
        assert time.monotonic() - start < 5
        assert sender.flush(0.1) == taken  # still queued
        # confluent expires them after message.timeout.ms (2 s) and reports each as an error
        assert sender.flush(5) == 0
        assert sender.errors == taken
    finally:
        t = time.monotonic()
        sender.close()
        assert time.monotonic() - t < 3


@pytest.mark.parametrize("kind", KAFKA)
def test_sender_raises_queue_full_past_its_bound_then_recovers(
    kind: str, kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    topic = unique_topic(partitions=1)
    transport = make_transport(kind, kafka_bootstrap, {**SMALL_QUEUE[kind], **LONG_LINGER[kind]})
    sender = transport.sender()
    try:
        for i in range(10):  # held by the 1 s linger
            sender.send(topic, 0, b"%d" % i)
        with pytest.raises(QueueFull):
            sender.send(topic, 0, b"one too many")
        assert sender.flush(10) == 0
        sender.send(topic, 0, b"room again")
        assert sender.flush(10) == 0
        assert sender.errors == 0
    finally:
        sender.close()


# -- across clients -----------------------------------------------------------------------------


def _has_lz4() -> bool:
    from kafka.codec import has_lz4

    return bool(has_lz4())


@pytest.mark.integration
@pytest.mark.parametrize(
    ("producer_kind", "producer_config", "consumer_kind"),
    [
        pytest.param(
            "confluent",
            {},
            "kafka-python",
            id="confluent-default-lz4-to-kafka-python",
            marks=pytest.mark.xfail(not _has_lz4(), reason=NO_LZ4, strict=True),
        ),
        pytest.param(
            "confluent",
            {"compression.type": "gzip"},
            "kafka-python",
            id="confluent-gzip-to-kafka-python",
        ),
        pytest.param("kafka-python", {}, "confluent", id="kafka-python-to-confluent"),
    ],
)
def test_cross_client(
    producer_kind: str,
    producer_config: dict[str, Any],
    consumer_kind: str,
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
) -> None:
    topic = unique_topic(partitions=2)
    consumer_side = make_transport(consumer_kind, kafka_bootstrap)
    producer_side = make_transport(producer_kind, kafka_bootstrap, producer_config)
    assert consumer_side.partitions(topic) == producer_side.partitions(topic) == 2
    since = time.time()
    fixed = consumer_side.receiver(topic, partitions=[0, 1])
    assigned: list[list[int]] = []
    group = consumer_side.receiver(
        topic, group=f"g-{uuid.uuid4().hex[:10]}", on_assign=assigned.append
    )
    sender = producer_side.sender()
    try:
        wait_assigned(group, assigned, {0, 1})
        barrier(sender, [fixed, group], topic, [0, 1])
        # compressible values (a codec is used only when it shrinks the batch), every byte intact
        sent = [
            (p, f"{producer_kind}-{p}-{i}-".encode() + bytes(range(256)) + bytes(512))
            for i in range(10)
            for p in (0, 1)
        ]
        for p, value in sent:
            sender.send(topic, p, value)
        assert sender.flush(10) == 0
        assert sender.errors == 0
        for r in (fixed, group):
            got = collect(r, len(sent), skip=MARK)
            for p in (0, 1):
                assert [x.value for x in got if x.partition == p] == [v for q, v in sent if q == p]
            assert len(got) == len(sent)
            assert_plausible(got, since)
    finally:
        sender.close()
        fixed.close()
        group.close()


# -- kafka-python specifics ----------------------------------------------------------------------


def test_kafka_python_config_is_routed_and_checked() -> None:
    from producer.kafka_python import KafkaPythonTransport

    t = KafkaPythonTransport(
        DEAD_BOOTSTRAP,
        {
            "linger_ms": 20,
            "client_id": "drl-test",
            "session_timeout_ms": 9000,
            "max_queued_messages": 7,
        },
    )
    assert t.producer_config["linger_ms"] == 20
    assert t.producer_config["acks"] == "all"
    assert "session_timeout_ms" not in t.producer_config
    assert t.consumer_config["session_timeout_ms"] == 9000
    assert "linger_ms" not in t.consumer_config
    assert t.producer_config["client_id"] == t.consumer_config["client_id"] == "drl-test"
    assert t.admin_config["bootstrap_servers"] == DEAD_BOOTSTRAP
    assert t.options["max_queued_messages"] == 7
    assert "max_queued_messages" not in t.producer_config
    # request_timeout_ms applies to every client; the producer's delivery timeout follows it
    t = KafkaPythonTransport(DEAD_BOOTSTRAP, {"request_timeout_ms": 40000})
    assert t.producer_config["delivery_timeout_ms"] >= 40000 + t.producer_config["linger_ms"]
    with pytest.raises(ValueError, match=r"linger\.ms"):
        KafkaPythonTransport(DEAD_BOOTSTRAP, {"linger.ms": 5})  # a librdkafka name


@pytest.mark.integration
def test_kafka_python_sender_surfaces_bad_settings(kafka_bootstrap: str) -> None:
    from producer.kafka_python import KafkaPythonTransport

    # kafka-python checks the codec after connecting: the error comes from sender(), not a
    # background thread
    with pytest.raises(ValueError, match="brotli"):
        KafkaPythonTransport(kafka_bootstrap, {"compression_type": "brotli"}).sender()


@pytest.mark.integration
@pytest.mark.skipif(_has_lz4(), reason="the lz4 package is installed: kafka-python decodes lz4")
def test_kafka_python_receiver_raises_on_a_batch_it_cannot_decode_instead_of_hanging(
    kafka_bootstrap: str, unique_topic: Callable[..., str]
) -> None:
    """kafka-python 3.0 left alone spins forever in the poll() after such an error."""
    from kafka.errors import UnsupportedCodecError

    topic = unique_topic(partitions=1)
    receiver = make_transport("kafka-python", kafka_bootstrap).receiver(topic, partitions=[0])
    sender = make_transport("confluent", kafka_bootstrap, {"compression.type": "lz4"}).sender()
    try:
        for i in range(10):
            sender.send(topic, 0, b"%d" % i + bytes(512))
        assert sender.flush(10) == 0
        for _ in range(3):
            start = time.monotonic()
            with pytest.raises(UnsupportedCodecError):
                deadline = time.monotonic() + 10
                while time.monotonic() < deadline:
                    receiver.poll(0.2)
            assert time.monotonic() - start < 10
        assert getattr(receiver, "errors", None) == 3
    finally:
        sender.close()
        receiver.close()
