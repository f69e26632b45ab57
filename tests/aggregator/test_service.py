"""``aggregator.service.Aggregator``: server clock offsets, silent servers, budget via grants.

The aggregator is driven by hand: usage batches are built with ``producer.wire`` and given to
``handle``; grants are read back from the in-process bus after ``tick``. Time is an injected
clock.
"""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.service import Aggregator, AggregatorConfig
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
        return self.agg.handle(Record(USAGE_TOPIC, partition, self.offset, 0.0, data))

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
    st.lists(st.floats(0.0, 0.5), min_size=1, max_size=20),
    st.floats(0.01, 0.3),
)
def test_server_offset_is_its_clock_skew_less_the_fastest_delivery(
    skew: float, delays: list[float], gap: float
) -> None:
    h = Harness()
    for d in delays:
        end = h.clock.t + skew  # the interval ends now, on the server's clock
        h.clock.t += d  # delivered d seconds later
        assert h.report("s1", K, rejected=1, end=end)
        h.clock.t += gap
    got = h.agg.server_offsets()["s1"]
    assert got == pytest.approx(skew - min(delays), abs=1e-6)


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


def test_a_delayed_batch_is_charged_at_its_interval_end_not_earlier() -> None:
    h = Harness(limit=10, window=1.0)
    # learn the delivery time: 0.02 s
    for _ in range(3):
        end = h.clock.t
        h.clock.t += 0.02
        h.report("s1", K, rejected=10, end=end)
    assert h.tick()["s1"][1] == {K: 10}
    # the server spends it all; the report is stuck for 0.5 s
    end = h.clock.t + 0.01
    h.clock.t += 0.5
    h.report("s1", K, admitted=10, rejected=10, end=end)
    # the admissions happened no later than end (+ delivery): until end + W nothing is free
    while h.clock.t < end + 0.02 + 1.0 - 0.1:
        assert h.tick()["s1"][1].get(K, 0) == 0, h.clock.t
        h.clock.t += 0.1
    h.clock.t = end + 0.02 + 1.0 + 0.1
    h.report("s1", K, rejected=10)
    assert h.tick()["s1"][1][K] == 10


@pytest.mark.xfail(
    strict=True,
    reason="BUG (design): the server clock offset is a max over a minute, kept across "
    "incarnations and clock steps; when a server's clock steps back (NTP step, or its server_id "
    "reused by a host with a slower clock) `end - offset` lies before the admissions, the charge "
    "falls out of the window at once, and the aggregator grants the limit again",
)
def test_a_server_clock_stepping_back_does_not_free_the_budget() -> None:
    h = Harness(limit=10, window=1.0)
    h.report("s1", K, rejected=10)
    assert h.tick()["s1"][1] == {K: 10}
    h.clock.t += 0.1
    # the server admitted its 10 tokens; its clock was then stepped back 5 s
    h.report("s1", K, admitted=10, rejected=10, end=h.clock.t - 5.0)
    assert h.tick()["s1"][1] == {K: 0}  # today: 10 more tokens in the same window


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
