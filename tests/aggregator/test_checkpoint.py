"""Window checkpoints in Redis for long windows: format, conservative restore, and a rebuild that
starts from a checkpoint and replays only the tail (real Redis; the usage topic is the bus)."""

from __future__ import annotations

import socket
import time
import uuid

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.checkpoint import SLOTS, Checkpoint, CheckpointStore
from aggregator.partition import PartitionState
from aggregator.service import REWIND_MARGIN, Aggregator, AggregatorConfig
from limiter import Policy
from producer import wire
from producer.transport import USAGE_TOPIC, InProcessBus, Record

WINDOW = 3600.0
K = 8  # usage partition 0 of 4


@settings(deadline=None, max_examples=50)
@given(
    st.lists(
        st.tuples(st.integers(1, 2**64 - 1), st.floats(0, 1e6), st.floats(0, 1e9)), max_size=40
    ),
    st.floats(0, 2e9),
    st.floats(0, 2e9),
)
def test_checkpoint_round_trip(
    rows: list[tuple[int, float, float]], taken: float, resume: float
) -> None:
    keys = np.array([r[0] for r in rows], dtype=np.uint64)
    ages = np.array([r[1] for r in rows])
    tokens = np.array([r[2] for r in rows])
    got = Checkpoint.decode(Checkpoint(taken, resume, WINDOW, keys, ages, tokens).encode())
    assert (got.taken_at, got.resume_from, got.window) == (taken, resume, WINDOW)
    assert got.keys.tolist() == keys.tolist()
    assert got.ages.tolist() == ages.tolist() and got.tokens.tolist() == tokens.tolist()


@settings(deadline=None, max_examples=200)
@given(st.binary(max_size=300))
def test_anything_else_is_refused_clearly(data: bytes) -> None:
    with pytest.raises(ValueError, match="checkpoint"):
        Checkpoint.decode(data)


def test_truncated_and_non_finite_checkpoints_are_refused() -> None:
    good = Checkpoint(
        1.0, 0.0, WINDOW, np.array([1], dtype=np.uint64), np.zeros(1), np.ones(1)
    ).encode()
    import zlib

    raw = zlib.decompress(good)
    with pytest.raises(ValueError, match="length"):
        Checkpoint.decode(zlib.compress(raw[:-1]))
    bad = Checkpoint(
        1.0, 0.0, WINDOW, np.array([1], dtype=np.uint64), np.zeros(1), np.array([np.nan])
    )
    with pytest.raises(ValueError, match="non-finite"):
        Checkpoint.decode(bad.encode())


@settings(deadline=None, max_examples=60)
@given(
    st.lists(st.tuples(st.integers(1, 5), st.floats(0, 59.9), st.integers(1, 9)), max_size=30),
    st.lists(st.floats(0, 70), min_size=1, max_size=5),
)
def test_restored_charges_count_at_least_as_long(
    charges: list[tuple[int, float, int]], later: list[float]
) -> None:
    """history() then restore(): at the checkpoint's time the use is the same; at any later
    time it is at least what the original shows (charges move later, never earlier)."""
    window, bucket = 60.0, 0.5
    old = PartitionState(1000, window, bucket)
    t0 = 1000.0
    for key, at, n in sorted(charges, key=lambda c: c[1]):
        rec = wire.usage_records(
            np.array([key], dtype=np.uint64), np.array([float(n)]), *(np.zeros(1),) * 3
        )
        old.apply(rec, 0, t0 + at, t0 + at)
    now = t0 + 60.0
    keys, ages, tokens = old.history(now, window / SLOTS)
    new = PartitionState(1000, window, bucket)
    new.restore(keys, ages, tokens, now)
    for i, dt in enumerate([0.0, *sorted(later)]):  # rings only move forward
        o, n = _use(old, now + dt), _use(new, now + dt)
        assert (n >= o).all(), (dt, n, o)
        if i == 0:
            assert n.tolist() == o.tolist()


def _use(state: PartitionState, t: float) -> np.ndarray:
    """Use in the window at ``t`` of the clients with keys 1..5 (0 for unknown ones)."""
    out = np.zeros(5)
    if state.ring.current is None:
        return out
    state.ring.advance(t)
    rows = state.clients.lookup(np.arange(1, 6, dtype=np.uint64))
    known = rows >= 0
    if known.any():
        out[known] = state.ring.used(rows[known], t)
    return out


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _usage(server: str, seq: int, admitted: int) -> bytes:
    one = np.ones(1)
    rec = wire.usage_records(
        np.array([K], dtype=np.uint64), admitted * one, 0 * one, 0 * one, 0 * one
    )
    return wire.encode_usage(wire.UsageBatch(server, 1, seq, 0.0, 0.1, 0, 0, rec))


def _append_at(bus: InProcessBus, value: bytes, appended: float) -> None:
    """Append to usage partition 0 as if the broker stamped it at ``appended`` (epoch s)."""
    log = bus._topic(USAGE_TOPIC).partitions[0]
    log.append(Record(USAGE_TOPIC, 0, len(log), appended, value))


def _settle(agg: Aggregator, clock: Clock, seconds: float) -> None:
    for _ in range(int(seconds / 0.1)):
        clock.t += 0.1
        for r in agg._receiver.poll(0):
            agg.handle(r)
        agg.tick()


def _used(agg: Aggregator, clock: Clock) -> float:
    state = agg._partitions[0]
    row = state.clients.lookup(np.array([K], dtype=np.uint64))
    return float(state.ring.used(row, clock.t)[0]) if row[0] >= 0 else 0.0


@pytest.mark.integration
def test_a_new_owner_restores_the_checkpoint_and_replays_only_the_tail(redis_url: str) -> None:
    unique_group = f"g-{uuid.uuid4().hex[:10]}"
    wall = time.time()
    bus = InProcessBus()
    _append_at(bus, _usage("s1", 1, 40), wall - 1000.0)  # before the checkpoint's tail
    _append_at(bus, _usage("s1", 2, 2), wall - 50.0)
    config = AggregatorConfig(
        Policy(100, WINDOW), aggregator_id="a", group=unique_group, checkpoint_interval=1.0
    )
    store = CheckpointStore(redis_url, unique_group, USAGE_TOPIC)
    try:
        clock = Clock()
        a = Aggregator(config, bus, clock=clock, checkpoints=store)
        _settle(a, clock, config.server_timeout + 1.5)  # replays both, rebuilt, checkpoints
        assert a.rebuilding() == [] and _used(a, clock) == 42
        assert store.flush() and store.written >= 4 and store.errors == 0
        saved = store.load(0)
        assert saved is not None
        assert saved.resume_from == pytest.approx(wall - 50.0 - REWIND_MARGIN)
        a.close()

        b = Aggregator(
            AggregatorConfig(
                Policy(100, WINDOW), aggregator_id="b", group=unique_group, checkpoint_interval=1.0
            ),
            bus,
            clock=clock,
            checkpoints=store,
        )
        clock.t += 0.1
        for r in b._receiver.poll(0):
            b.handle(r)
        assert b.stats.checkpoint_restores == 4  # every partition had one (3 of them empty)
        assert b.stats.replayed_records == 1  # only the record within the tail
        assert _used(b, clock) == 44  # 42 restored + the tail's 2 again (counted twice)
        b.close()
    finally:
        store.close()


@pytest.mark.integration
def test_without_redis_the_rebuild_replays_the_whole_window() -> None:
    with socket.socket() as s:  # a port nothing listens on
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    store = CheckpointStore(f"redis://127.0.0.1:{port}/0", "g", USAGE_TOPIC)
    wall = time.time()
    bus = InProcessBus()
    _append_at(bus, _usage("s1", 1, 40), wall - 1000.0)
    clock = Clock()
    started = time.monotonic()
    agg = Aggregator(
        AggregatorConfig(Policy(100, WINDOW), checkpoint_interval=0.5),
        bus,
        clock=clock,
        checkpoints=store,
    )
    _settle(agg, clock, 4.0)  # checkpoints are queued, never written: the ticks go on
    assert time.monotonic() - started < 10.0
    assert agg.stats.checkpoint_restores == 0 and agg.stats.replayed_records == 1
    assert _used(agg, clock) == 40
    assert store.errors >= 4  # the four loads failed (and writes, as they come)
    store.close()
