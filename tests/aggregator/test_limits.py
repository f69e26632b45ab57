"""Per-client limits in the aggregator: each client's budget is its own limit (from
:mod:`limiter.keylimits`), and a change of the table reaches every owned partition at the next
tick."""

from __future__ import annotations

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.partition import PartitionState
from aggregator.service import Aggregator, AggregatorConfig
from limiter import Policy
from limiter.keylimits import KeyLimits
from producer import wire
from producer.transport import USAGE_TOPIC, InProcessBus


class Source:
    """A LimitSource the test swaps tables in."""

    def __init__(self, table: KeyLimits) -> None:
        self.table = table

    def current(self) -> KeyLimits:
        return self.table


def demand(keys: list[int], wanted: int = 50) -> np.ndarray:
    n = len(keys)
    return wire.usage_records(
        np.array(keys, dtype=np.uint64),
        np.zeros(n),
        np.zeros(n),
        np.full(n, float(wanted)),
        np.zeros(n),
    )


def granted(state: PartitionState, now: float) -> dict[int, int]:
    keys, _, tokens = state.tick(now)
    out: dict[int, int] = {}
    for k, t in zip(keys.tolist(), tokens.tolist(), strict=True):
        out[k] = out.get(k, 0) + int(t)
    return out


@settings(deadline=None, max_examples=40)
@given(st.dictionaries(st.integers(1, 50), st.integers(1, 300), min_size=1, max_size=6))
def test_each_client_is_granted_up_to_its_own_limit(own: dict[int, int]) -> None:
    """Clients that keep asking and never report spending: in a window they are granted
    exactly their own limit (outstanding tokens count as used), others the default."""
    source = Source(
        KeyLimits(np.array(list(own), dtype=np.uint64), np.array(list(own.values())), 77)
    )
    state = PartitionState(77, 60.0, 0.5, limit_of=lambda k: source.current().lookup(k))
    keys = [*own, 99]
    total: dict[int, int] = {}
    now = 1000.0
    for _ in range(40):
        state.apply(demand(keys, wanted=1000), 0, now)  # need (3 ticks of it) above any limit
        for k, t in granted(state, now).items():
            total[k] = total.get(k, 0) + t
        now += 0.1
    assert total == {**own, 99: 77}


def test_a_changed_table_reaches_the_partitions_at_the_next_tick() -> None:
    bus = InProcessBus()
    source = Source(KeyLimits.from_clients({}, 100, version=1))
    agg = Aggregator(
        AggregatorConfig(Policy(100, 60.0), aggregator_id="a", rebuild=False), bus, limits=source
    )
    key = 8  # usage partition 0 of 4
    batch = wire.UsageBatch("s1", 1, 1, 0.0, 0.1, 0, 0, demand([key]))
    bus.append(USAGE_TOPIC, 0, wire.encode_usage(batch))
    for r in agg._receiver.poll(0):
        agg.handle(r)
    agg.tick()
    state = agg._partitions[0]
    row = state.clients.lookup(np.array([key], dtype=np.uint64))[0]
    assert state.limits[row] == 100
    source.table = KeyLimits(np.array([key], dtype=np.uint64), np.array([7.0]), 100, version=2)
    assert state.limits[row] == 100  # not before the tick
    agg.tick()
    assert state.limits[row] == 7
    # a new client takes its limit from the table as it is seen
    batch = wire.UsageBatch("s1", 1, 2, 0.1, 0.2, 0, 0, demand([12]))
    bus.append(USAGE_TOPIC, 0, wire.encode_usage(batch))
    for r in agg._receiver.poll(0):
        agg.handle(r)
    assert state.limits[state.clients.lookup(np.array([12], dtype=np.uint64))[0]] == 100
