"""A newly assigned partition is rebuilt from the usage topic before it grants (failover).

Over the in-process bus: an aggregator reports usage, "dies", and a new one takes its
partitions. The new one replays the last window into its charge ring, grants nothing while it
replays, waits one lease TTL when the replay found usage (the old owner's leases), and then
grants at most ``L - replayed use``. The same with ``rebuild=False`` grants the whole limit
again: the tests would catch a rebuild that does nothing.
"""

from __future__ import annotations

import time

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.service import Aggregator, AggregatorConfig
from limiter import Policy
from producer import wire
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC, InProcessBus

LIMIT, WINDOW = 100, 10.0
K = 8  # a client key: usage partition 0 of 4


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


class Fleet:
    """A bus, servers that report usage on it, and aggregators joined in turn."""

    def __init__(self) -> None:
        self.bus = InProcessBus()
        self.clock = Clock()
        self.seq: dict[str, int] = {}
        self.grants = self.bus.receiver(GRANTS_TOPIC)

    def aggregator(self, name: str, *, rebuild: bool = True) -> Aggregator:
        config = AggregatorConfig(Policy(LIMIT, WINDOW), aggregator_id=name, rebuild=rebuild)
        return Aggregator(config, self.bus, clock=self.clock)

    def report(self, server: str, key: int, *, admitted: int = 0, rejected: int = 0) -> None:
        n = self.seq[server] = self.seq.get(server, 0) + 1
        one = np.ones(1)
        rec = wire.usage_records(
            np.array([key], dtype=np.uint64), admitted * one, 0 * one, rejected * one, 0 * one
        )
        end = self.clock.t
        batch = wire.UsageBatch(server, 1, n, end - 0.1, end, 0, 0, rec)
        partition = int(wire.usage_partitions(np.array([key], dtype=np.uint64), 4)[0])
        self.bus.append(USAGE_TOPIC, partition, wire.encode_usage(batch))

    def step(self, agg: Aggregator, seconds: float = 0.1) -> dict[str, int]:
        """Move the clock, apply what arrived, tick: {server: tokens granted for K}."""
        self.clock.t += seconds
        for r in agg._receiver.poll(0):
            agg.handle(r)
        agg.tick()
        out: dict[str, int] = {}
        for r in self.grants.poll(0):
            g = wire.decode_grants(r.value)
            if g.aggregator_id == agg.config.aggregator_id:
                tokens = dict(g.records.tolist()).get(K, 0)
                out[g.server_id] = out.get(g.server_id, 0) + tokens
        return out


def run_failover(used: int, *, rebuild: bool) -> tuple[Aggregator, list[dict[str, int]]]:
    """Old owner A sees ``used`` admissions of K; B takes over; servers keep asking."""
    fleet = Fleet()
    a = fleet.aggregator("a")
    fleet.report("s1", K, admitted=used, rejected=5)
    fleet.step(a)
    a.close()
    fleet.clock.t += 0.5  # A is gone; the group hands its partitions to B
    b = fleet.aggregator("b", rebuild=rebuild)
    ticks = []
    for _ in range(40):  # 4 s: servers report demand every tick
        fleet.report("s1", K, rejected=5)
        fleet.report("s2", K, rejected=5)
        ticks.append(fleet.step(b))
    return b, ticks


@settings(deadline=None, max_examples=25)
@given(st.integers(0, LIMIT))
def test_new_owner_grants_no_more_than_the_limit_less_the_replayed_use(used: int) -> None:
    b, ticks = run_failover(used, rebuild=True)
    total = sum(sum(t.values()) for t in ticks)
    assert total <= LIMIT - used
    assert b.stats.replayed_records >= 1
    if used < LIMIT - 10:  # there is room: it is handed out once the rebuild is done
        assert total > 0


def test_without_rebuild_the_new_owner_grants_the_used_tokens_again() -> None:
    """The control: the same failover with ``rebuild=False`` over-grants, so the test above can
    fail."""
    _, ticks = run_failover(80, rebuild=False)
    assert sum(sum(t.values()) for t in ticks) > LIMIT - 80


def test_grants_wait_one_lease_ttl_after_a_replay_and_not_without_one() -> None:
    fleet = Fleet()
    a = fleet.aggregator("a")
    fleet.report("s1", K, admitted=3, rejected=1)
    fleet.step(a)
    b = fleet.aggregator("b")
    assigned = fleet.clock.t
    first = None
    for _ in range(60):
        fleet.report("s1", K, rejected=2)
        if sum(fleet.step(b).values()) > 0 and first is None:
            first = fleet.clock.t
    assert first is not None and b.rebuilding() == []
    # history found: no grant before every lease the old owner granted has expired
    assert first - assigned >= b.config.takeover_wait > b.config.ttl
    assert first - assigned <= b.config.takeover_wait + 0.25

    fresh = Fleet()  # an empty topic: nothing to replay, granting from the first live report
    c = fresh.aggregator("c")
    fresh.report("s1", K, rejected=2)
    assert sum(fresh.step(c).values()) > 0
    assert 0 not in c.rebuilding() and c.stats.replayed_records == 0


def test_an_idle_partition_is_rebuilt_after_the_server_timeout() -> None:
    fleet = Fleet()
    agg = fleet.aggregator("a")
    assert agg.rebuilding() == [0, 1, 2, 3]
    fleet.step(agg, agg.config.server_timeout - 0.2)
    assert agg.rebuilding() == [0, 1, 2, 3]
    fleet.step(agg, 0.3)
    assert agg.rebuilding() == [] and agg.stats.rebuilds == 4


def test_replayed_usage_is_neither_demand_nor_a_returned_lease() -> None:
    fleet = Fleet()
    a = fleet.aggregator("a")
    fleet.report("s1", K, admitted=40, rejected=7)
    fleet.step(a)
    b = fleet.aggregator("b")
    fleet.step(b)
    state = b._partitions[0]
    assert b.stats.replayed_records == 1 and b.stats.records == 0
    row = state.clients.lookup(np.array([K], dtype=np.uint64))
    assert state.ring.used(row, fleet.clock.t)[0] == 40  # in the window
    assert len(state.pairs) == 0 and not state._demand  # no demand, no pair, nothing out


def test_usage_older_than_the_rewind_is_not_replayed() -> None:
    fleet = Fleet()
    fleet.report("s1", K, admitted=30)
    stale = fleet.bus._topic(USAGE_TOPIC).partitions[0]
    # as if appended a window and a margin ago
    stale[0] = stale[0].__class__(*(stale[0].topic, 0, 0, time.time() - 3600.0, stale[0].value))
    fleet.report("s1", K, admitted=5)
    b = fleet.aggregator("b")
    fleet.step(b)
    assert b.stats.replayed_records == 1
    row = b._partitions[0].clients.lookup(np.array([K], dtype=np.uint64))
    assert b._partitions[0].ring.used(row, fleet.clock.t)[0] == 5


@pytest.mark.parametrize("rewind", [None, 3600.0])
def test_bus_rewind_starts_a_group_member_by_time(rewind: float | None) -> None:
    bus = InProcessBus({"t": 1})
    for i in range(3):
        bus.append("t", 0, bytes([i]))
    got: list[list[int]] = []
    r = bus.receiver(
        "t", group="g", on_assign=got.append, rewind=None if rewind is None else lambda p: rewind
    )
    bus.append("t", 0, b"\x09")
    values = [rec.value for rec in r.poll(0)]
    assert got == [[0]]
    assert values == ([b"\x09"] if rewind is None else [b"\x00", b"\x01", b"\x02", b"\x09"])
