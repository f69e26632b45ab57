"""``aggregator.service.Aggregator``: server clock offsets, silent servers, budget via grants.

The aggregator is driven by hand: usage batches are built with ``producer.wire`` and given to
``handle``; grants are read back from the in-process bus after ``tick``. Time is an injected
clock.
"""

from __future__ import annotations

import math
import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.service import OFFSET_STEP, Aggregator, AggregatorConfig
from limiter import Policy
from producer import wire
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC, InProcessBus, Record

T0 = 1000.0


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Harness:
    def __init__(self, limit: int = 10, window: float = 1.0, **config: object) -> None:
        self.clock = Clock()
        self.bus = InProcessBus()
        self.agg = Aggregator(
            AggregatorConfig(Policy(limit, window), aggregator_id="agg", **config),  # type: ignore[arg-type]
            self.bus,
            clock=self.clock,
        )
        self.grants = self.bus.receiver(GRANTS_TOPIC)
        self.seq: dict[tuple[str, int], int] = {}
        self.offset = 0

    def report(
        self,
        server: str,
        key: int,
        *,
        admitted: int = 0,
        rejected: int = 0,
        released: int = 0,
        end: float | None = None,
        incarnation: int = 1,
    ) -> bool:
        n = self.seq[(server, incarnation)] = self.seq.get((server, incarnation), 0) + 1
        end = self.clock.t if end is None else end
        rec = wire.usage_records(
            np.array([key], dtype=np.uint64),
            np.array([float(admitted)]),
            np.zeros(1),
            np.array([float(rejected)]),
            np.array([float(released)]),
        )
        data = wire.encode_usage(wire.UsageBatch(server, incarnation, n, end - 0.1, end, 0, 0, rec))
        partition = int(wire.usage_partitions(np.array([key], dtype=np.uint64), 4)[0])
        self.offset += 1
        return self.agg.handle(Record(USAGE_TOPIC, partition, self.offset, time.time(), data))

    def tick(self) -> dict[str, tuple[int, dict[int, int]]]:
        """server -> (servers the batch counts, {key: tokens})"""
        self.agg.tick()
        out: dict[str, tuple[int, dict[int, int]]] = {}
        for r in self.grants.poll(0):
            g = wire.decode_grants(r.value)
            assert g.issued_at == self.clock.t and g.ttl == pytest.approx(self.agg.config.ttl)
            out[g.server_id] = (g.servers, dict(g.records.tolist()))
        return out


K = 8  # a client key (partition 0 of 4)


@settings(deadline=None, max_examples=60)
@given(
    st.floats(-1000.0, 1000.0),
    st.lists(st.floats(0.0, 0.09), min_size=1, max_size=20),
    st.floats(0.01, 0.3),
)
def test_server_offset_is_its_clock_skew_less_the_fastest_delivery(
    skew: float, delays: list[float], gap: float
) -> None:
    """Delivery delays within OFFSET_STEP of each other: the estimate is the skew less the
    fastest delivery seen."""
    h = Harness()
    for d in delays:
        end = h.clock.t + skew  # the interval ends now, on the server's clock
        h.clock.t += d  # delivered d seconds later
        assert h.report("s1", K, rejected=1, end=end)
        h.clock.t += gap
    got = h.agg.server_offsets()["s1"]
    assert got == pytest.approx(skew - min(delays), abs=1e-6)


@settings(deadline=None, max_examples=100)
@given(
    st.floats(-1000.0, 1000.0),
    # at most 21 x 1.3 s in all: within one OFFSET_WINDOW, nothing ages out of the estimate
    st.lists(st.one_of(st.floats(0.0, 0.5), st.sampled_from([0.0, 0.02, 0.5, 1.0])), max_size=20),
    st.floats(0.01, 0.3),
)
def test_server_offset_restarts_after_a_late_batch(
    skew: float, delays: list[float], gap: float
) -> None:
    """Any delays: the estimate is the skew less the fastest delivery since the last batch that
    came more than OFFSET_STEP later than the estimate allowed (it restarts from that one). So a
    batch, charged at ``min(received, end - offset)``, is never charged before its interval
    ended, nor more than OFFSET_STEP before it was received."""
    h = Harness()
    want = -np.inf
    fastest = np.inf  # fastest delivery since the last restart
    for d in [0.02, *delays]:
        end = h.clock.t + skew
        h.clock.t += d
        assert h.report("s1", K, rejected=1, end=end)
        sample = end - h.clock.t  # what the aggregator sees: skew - d, up to float rounding
        if sample < want - OFFSET_STEP:
            want, fastest = sample, d  # a late batch (or a clock step back): restart
        else:
            want, fastest = max(want, sample), min(fastest, d)
        got = h.agg.server_offsets()["s1"]
        assert got == want
        assert got == pytest.approx(skew - fastest, abs=1e-6)
        charged = min(h.clock.t, end - got)
        assert charged >= end - skew - 1e-6  # the interval's end on the aggregator's clock
        assert charged >= h.clock.t - OFFSET_STEP - 1e-6
        h.clock.t += gap


def test_a_fast_server_clock_is_charged_no_later_than_receipt() -> None:
    """A server whose clock runs 5 s ahead: its admissions are charged at receipt (not in the
    future), so they hold the budget for exactly a window from then."""
    h = Harness(limit=10, window=1.0)
    h.report("s1", K, rejected=10, end=T0 + 5.0)
    assert h.tick()["s1"][1] == {K: 10}
    h.clock.t += 0.05
    h.report("s1", K, admitted=10, rejected=10, end=h.clock.t + 5.0)
    for _ in range(9):
        h.clock.t += 0.1
        assert h.tick()["s1"][1] == {K: 0}
    h.clock.t += 0.2  # a window (and a bucket) after the charge
    h.report("s1", K, rejected=10, end=h.clock.t + 5.0)
    assert h.tick()["s1"][1] == {K: 10}


#: seconds between the ticks of :func:`freed_at`
STEP = 0.01
EPS = 1e-6


def freed_at(h: Harness, until: float, delay: float = 0.02) -> float:
    """Ask for tokens every STEP seconds (batches delivered ``delay`` s after their interval
    ends) and tick; the first time s1 is granted any. s1 then holds them (its next lease)."""
    while h.clock.t <= until:
        h.clock.t += STEP
        h.report("s1", K, rejected=10, end=h.clock.t - delay)
        if h.tick()["s1"][1].get(K, 0) > 0:
            return h.clock.t
    raise AssertionError(f"nothing granted until {until}")


def assert_charged_at(h: Harness, charged: float, end: float, window: float = 1.0) -> None:
    """A charge at ``charged`` (never before the interval end): its budget is back after a
    window, at most a bucket (and a STEP of freed_at) later."""
    assert charged >= end
    bucket = h.agg.config.bucket
    freed = freed_at(h, charged + window + bucket + 2 * STEP)
    assert charged + window - EPS < freed <= charged + window + bucket + STEP + EPS, freed - charged


def test_a_delayed_batch_is_charged_at_its_interval_end_not_earlier() -> None:
    """A batch late by less than OFFSET_STEP beyond the fastest delivery is charged at its
    interval end (plus that fastest delivery); a batch later than that at its receipt (later,
    so more conservative); and batches on time again bring back interval-end charging."""
    h = Harness(limit=10, window=1.0)
    assert h.agg.config.bucket == 0.05
    # learn the delivery time: 0.02 s
    for _ in range(3):
        end = h.clock.t
        h.clock.t += 0.02
        h.report("s1", K, rejected=10, end=end)
    assert h.agg.server_offsets()["s1"] == pytest.approx(-0.02)
    assert h.tick()["s1"][1] == {K: 10}

    # the server spends it all; the report is 0.08 s later than the fastest delivery
    end = h.clock.t + 0.01
    h.clock.t = end + 0.1
    received = h.clock.t
    h.report("s1", K, admitted=10, rejected=10, end=end)
    assert h.agg.server_offsets()["s1"] == pytest.approx(-0.02)  # kept
    # charged at end + 0.02: free again before a window after its receipt
    assert_charged_at(h, end + 0.02, end)
    assert h.clock.t < received + 1.0

    # it spends its next lease; the report is stuck for 0.5 s
    end = h.clock.t
    h.clock.t = end + 0.5
    received = h.clock.t
    h.report("s1", K, admitted=10, rejected=10, end=end)
    assert h.agg.server_offsets()["s1"] == pytest.approx(-0.5)  # restarted from the late one
    # charged at its receipt: nothing free until a window after that
    assert_charged_at(h, received, end)
    # the batches of freed_at came on time: the estimate is back
    assert h.agg.server_offsets()["s1"] == pytest.approx(-0.02)

    # so a batch 0.08 s late is charged at its interval end again
    end = h.clock.t + 0.01
    h.clock.t = end + 0.1
    received = h.clock.t
    h.report("s1", K, admitted=10, rejected=10, end=end)
    assert_charged_at(h, end + 0.02, end)
    assert h.clock.t < received + 1.0


def test_a_server_clock_stepping_back_does_not_free_the_budget() -> None:
    """When a server's clock steps back (NTP step, or its server_id reused by a host with a
    slower clock), the estimate restarts: the batch is charged at its receipt, not at
    ``end - old offset`` (5 s before the admissions, out of the window at once)."""
    h = Harness(limit=10, window=1.0)
    h.report("s1", K, rejected=10)
    assert h.tick()["s1"][1] == {K: 10}
    h.clock.t += 0.1
    received = h.clock.t
    # the server admitted its 10 tokens; its clock was then stepped back 5 s
    h.report("s1", K, admitted=10, rejected=10, end=h.clock.t - 5.0)
    assert h.tick()["s1"][1] == {K: 0}
    assert h.agg.server_offsets()["s1"] == pytest.approx(-5.0)
    # the charge holds the budget for a whole window after the receipt
    freed = freed_at(h, received + 1.2, delay=5.0)
    assert received + 1.0 - EPS < freed <= received + 1.0 + h.agg.config.bucket + STEP + EPS


@pytest.mark.parametrize(
    ("window", "tick"),
    [(1.0, 0.1), (0.7, 0.1), (1.0, 0.3), (60.0, 0.1), (3600.0, 0.1), (0.25, 1.0), (2.5, 0.07)],
)
def test_the_window_is_a_whole_number_of_buckets(window: float, tick: float) -> None:
    config = AggregatorConfig(Policy(10, window), tick=tick, server_timeout=100 * tick)
    raw = max(tick / 2, window / 128)  # about half a tick, or window/128 for long windows
    n = window / config.bucket
    assert n == pytest.approx(round(n), abs=1e-9) and round(n) >= 1
    assert min(raw, window) / 2 < config.bucket <= raw * (1 + 1e-12)
    assert round(n) <= max(128, math.ceil(2 * window / tick))


def test_duplicates_and_malformed_do_not_move_the_offset() -> None:
    h = Harness()
    assert h.report("s1", K, rejected=1, end=T0)
    before = h.agg.server_offsets()["s1"]
    # a replay of seq 1 with a very different end: skipped before any bookkeeping
    rec = wire.usage_records(
        np.array([K], dtype=np.uint64), np.zeros(1), np.zeros(1), np.ones(1), np.zeros(1)
    )
    data = wire.encode_usage(wire.UsageBatch("s1", 1, 1, T0 + 99.0, T0 + 100.0, 0, 0, rec))
    assert not h.agg.handle(Record(USAGE_TOPIC, 0, 99, 0.0, data))
    assert h.agg.stats.duplicates == 1
    assert h.agg.server_offsets()["s1"] == before


def test_a_silent_server_is_forgotten_and_its_tokens_return() -> None:
    h = Harness(limit=20, window=1.0)
    h.report("s1", K, rejected=30)
    h.report("s2", K, rejected=30)
    g = h.tick()
    assert g["s1"][0] == 2 and g["s2"][0] == 2
    assert g["s1"][1][K] + g["s2"][1][K] == 20
    first = to_s1 = g["s1"][1][K]
    # s2 goes silent; s1 keeps asking but admits nothing (its lease stays outstanding)
    forgotten_at = None
    while h.clock.t < T0 + h.agg.config.server_timeout + 0.5:
        h.clock.t += 0.1
        h.report("s1", K, rejected=30)
        before = to_s1
        g = h.tick()
        to_s1 += g["s1"][1].get(K, 0)
        if "s2" not in g and forgotten_at is None:
            forgotten_at = h.clock.t
            assert before == first  # until then s2's lease still counted
    assert forgotten_at is not None
    assert forgotten_at >= T0 + h.agg.config.server_timeout
    assert g["s1"][0] == 1
    assert h.agg.active_servers(h.clock.t) == ["s1"]
    # s2's tokens came back to the budget and went to s1: 20 in all, never more
    assert to_s1 == 20


def test_unowned_partition_and_unknown_server_index() -> None:
    h = Harness()
    h.agg._revoked([0])  # the consumer group took partition 0 away
    assert not h.report("s1", K, rejected=1)  # K lives on partition 0
    assert h.agg.stats.batches == 0
    assert h.report("s1", 1, rejected=1)  # key 1: partition 1, still owned


class _FlakyReceiver:
    """A receiver whose first ``fail`` polls raise, as a consumer may while it joins its group
    or while the broker is away; it commits nothing and fails the first commit too."""

    def __init__(self, inner: object, fail: int) -> None:
        self.inner = inner
        self.fail = fail
        self.commit_fails = 1

    def poll(self, timeout: float, max_records: int = 500) -> list[Record]:
        if self.fail > 0:
            self.fail -= 1
            raise RuntimeError("coordinator not available")
        return self.inner.poll(timeout, max_records)  # type: ignore[attr-defined, no-any-return]

    def commit(self) -> None:
        if self.commit_fails:
            self.commit_fails -= 1
            raise RuntimeError("commit failed")

    def assignment(self) -> list[int]:
        return self.inner.assignment()  # type: ignore[attr-defined, no-any-return]

    def close(self) -> None:
        pass


class _FlakyBus(InProcessBus):
    def receiver(self, topic: str, **kw: object) -> _FlakyReceiver:  # type: ignore[override]
        return _FlakyReceiver(super().receiver(topic, **kw), fail=3)  # type: ignore[arg-type]


def test_consumer_errors_never_stop_the_loop() -> None:
    bus = _FlakyBus()
    clock = Clock()
    agg = Aggregator(
        AggregatorConfig(Policy(10, 1.0), aggregator_id="agg", rebuild=False), bus, clock=clock
    )
    rec = wire.usage_records(
        np.array([K], dtype=np.uint64), np.zeros(1), np.zeros(1), np.ones(1), np.zeros(1)
    )
    batch = wire.UsageBatch("s1", 1, 1, 0.0, clock.t, 0, 0, rec)
    bus.append(USAGE_TOPIC, 0, wire.encode_usage(batch))
    for _ in range(12):  # three polls raise, the first commit (tick 10) raises: no exception
        clock.t += 0.1
        agg.step()
    assert agg.stats.poll_errors == 4
    assert agg.stats.batches == 1 and agg.stats.ticks >= 10
