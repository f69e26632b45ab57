"""``aggregator.partition.PartitionState`` and ``aggregator.window.ChargeRing``.

PartitionState is driven by hypothesis-generated sequences of usage reports (from a few honest
servers: a server never admits or releases more than the leases it holds) and ticks at injected
times. After every step the bookkeeping invariants are checked against a model kept by the test:
``held[c] == sum(outstanding of c's pairs)``, ``outstanding >= 0``, and, after every tick, the
budget invariant ``ring.used + held <= limit`` for every client (no ``extra`` admissions). Grants
are checked against the allocation rule (demand in the last ``memory`` ticks, capped at the pair's
need), ``forget_server`` and ``compact`` against an untouched copy.
"""

from __future__ import annotations

import copy
import math
from collections import defaultdict
from dataclasses import dataclass, field
from fractions import Fraction
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.partition import NEED_FLOOR, NEED_TICKS, PartitionState
from aggregator.window import ChargeRing
from producer.wire import usage_records

U64 = 2**64 - 1
CLIENTS = [1, 2, 3, 2**63 + 5, U64]  # stable keys, including ones near 2**64 - 1
SERVERS = [0, 1, 2]


def recs(
    keys: list[int],
    admitted: list[float] | float = 0.0,
    extra: list[float] | float = 0.0,
    rejected: list[float] | float = 0.0,
    released: list[float] | float = 0.0,
) -> np.ndarray:
    n = len(keys)

    def col(v: list[float] | float) -> np.ndarray:
        return np.array(v if isinstance(v, list) else [v] * n, dtype=np.float64)

    return usage_records(
        np.array(keys, dtype=np.uint64), col(admitted), col(extra), col(rejected), col(released)
    )


def grants_of(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> dict[tuple[int, int], int]:
    keys, servers, tokens = result
    assert keys.size == servers.size == tokens.size
    out: dict[tuple[int, int], int] = {}
    for k, s, t in zip(keys.tolist(), servers.tolist(), tokens.tolist(), strict=True):
        assert (k, s) not in out, "one row per pair"
        out[(k, s)] = t
    return out


def outstanding_of(state: PartitionState) -> dict[tuple[int, int], float]:
    """(client key, server) -> outstanding tokens, read through the public-ish arrays."""
    m = len(state.pairs)
    out: dict[tuple[int, int], float] = {}
    for p in range(m):
        c = int(state.pair_client[p])
        key = int(state.clients.slot_keys[c])
        out[(key, int(state.pair_server[p]))] = float(state.outstanding[p])
    return out


def used_of(state: PartitionState, key: int, now: float) -> float:
    """The client's charges in the window ending at ``now`` (as the tick at ``now`` sees them)."""
    slot = int(state.clients.lookup(np.array([key], dtype=np.uint64))[0])
    return 0.0 if slot < 0 else float(state.ring.used(np.array([slot]), now)[0])


def held_of(state: PartitionState, key: int) -> float:
    slot = int(state.clients.lookup(np.array([key], dtype=np.uint64))[0])
    return 0.0 if slot < 0 else float(state.held[slot])


# -- the simulation ------------------------------------------------------------------------------


@dataclass
class Sim:
    """An aggregator partition and the honest servers it grants to."""

    limit: int
    window: float
    tick_every: float
    memory: int
    state: PartitionState = field(init=False)
    now: float = 1000.0
    #: tokens each server holds per client (granted, neither admitted nor released)
    leases: dict[tuple[int, int], float] = field(default_factory=lambda: defaultdict(float))
    #: (pair -> demand) reported between ticks, newest last; one entry per tick
    demand_log: list[dict[tuple[int, int], float]] = field(default_factory=list)
    current: dict[tuple[int, int], float] = field(default_factory=lambda: defaultdict(float))
    reported: set[tuple[int, int]] = field(default_factory=set)
    recent_reports: list[set[tuple[int, int]]] = field(default_factory=list)
    extra_seen: bool = False
    ticks: int = 0

    def __post_init__(self) -> None:
        self.state = PartitionState(self.limit, self.window, self.tick_every, self.memory)

    # a server reports: admits from its leases, releases some, and wants more (rejected)
    def report(
        self, server: int, rows: list[tuple[int, float, float, float, float]], dt: float
    ) -> None:
        self.now += dt
        keys, adm, ext, rej, rel = [], [], [], [], []
        for key, a_frac, extra, rejected, r_frac in rows:
            have = self.leases[(key, server)]
            a = math.floor(have * a_frac)
            r = math.floor((have - a) * r_frac)
            self.leases[(key, server)] = have - a - r
            keys.append(key)
            adm.append(a)
            ext.append(extra)
            rej.append(rejected)
            rel.append(r)
            # the wire carries whole tokens, rounded up
            self.current[(key, server)] += a + math.ceil(extra) + math.ceil(rejected)
            self.reported.add((key, server))
            self.extra_seen |= extra > 0
        if keys:
            self.state.apply(recs(keys, adm, ext, rej, rel), server, self.now)

    def tick(self, dt: float) -> dict[tuple[int, int], int]:
        self.now += dt
        before = outstanding_of(self.state)
        self.demand_log.append(dict(self.current))
        self.recent_reports.append(set(self.reported))
        self.current = defaultdict(float)
        self.reported = set()
        self.ticks += 1
        got = grants_of(self.state.tick(self.now))
        window = self.demand_log[-self.memory :]
        for pair, tokens in got.items():
            assert tokens >= 0
            # the pair reported in the last `memory` ticks
            assert any(pair in s for s in self.recent_reports[-self.memory :]), pair
            # need: NEED_TICKS ticks of its mean demand plus NEED_FLOOR, minus what it holds
            total = sum((Fraction(d.get(pair, 0.0)) for d in window), Fraction(0))
            per_tick = total / len(window)
            need = max(0, math.ceil(NEED_TICKS * per_tick) + NEED_FLOOR - before.get(pair, 0.0))
            assert tokens <= need, (pair, tokens, need)
            self.leases[pair] += tokens
        return got

    def forget(self, server: int) -> None:
        before = outstanding_of(self.state)
        held_before = {k: held_of(self.state, k) for k in CLIENTS}
        freed = self.state.forget_server(server)
        after = outstanding_of(self.state)
        want = sum(v for (k, s), v in before.items() if s == server)
        assert freed == pytest.approx(want)
        for (k, s), v in before.items():
            assert after[(k, s)] == (0.0 if s == server else v)
        for k in CLIENTS:
            mine = sum(v for (kk, s), v in before.items() if kk == k and s == server)
            assert held_of(self.state, k) == pytest.approx(held_before[k] - mine)
        for pair in list(self.leases):
            if pair[1] == server:
                self.leases[pair] = 0.0  # its leases have expired

    def check(self, after_tick: bool) -> None:
        st_ = self.state
        n = len(st_.clients)
        m = len(st_.pairs)
        assert (st_.outstanding[:m] >= 0).all()
        sums = np.zeros(n)
        np.add.at(sums, st_.pair_client[:m], st_.outstanding[:m])
        assert np.allclose(sums, st_.held[:n])
        # the aggregator's outstanding equals what the honest servers hold
        for pair, v in outstanding_of(st_).items():
            assert v == pytest.approx(self.leases[pair])
        if after_tick and not self.extra_seen:
            for k in CLIENTS:
                assert used_of(st_, k, self.now) + held_of(st_, k) <= self.limit + 1e-9, k


row = st.tuples(
    st.sampled_from(CLIENTS),
    st.sampled_from([0.0, 0.5, 1.0, 0.3]),  # fraction of the lease admitted
    st.just(0.0),  # extra
    st.one_of(st.just(0.0), st.integers(1, 40).map(float), st.floats(0.0, 300.0)),
    st.sampled_from([0.0, 0.0, 1.0, 0.5]),  # fraction of the rest released
)
report_op = st.tuples(
    st.just("report"),
    st.sampled_from(SERVERS),
    st.lists(row, max_size=5),
    st.sampled_from([0.0, 0.01, 0.03, 0.05]),
)
tick_op = st.tuples(st.just("tick"), st.sampled_from([0.05, 0.1, 0.1, 0.1, 0.25, 1.5]))
forget_op = st.tuples(st.just("forget"), st.sampled_from(SERVERS))
ops = st.lists(
    st.one_of(report_op, report_op, tick_op, tick_op, forget_op), min_size=1, max_size=60
)
configs = st.tuples(
    st.sampled_from([1, 7, 40, 300, 150_000]),  # limit (150k: counts split over records)
    st.sampled_from([0.3, 1.0, 2.0]),  # window
    st.sampled_from([1, 2, 5]),  # memory
)


def run_ops(sim: Sim, program: list[Any]) -> None:
    for op in program:
        if op[0] == "report":
            _, server, rows, dt = op
            if sim.limit >= 100_000:
                rows = [(k, a, e, r * 1000, rel) for k, a, e, r, rel in rows]
            sim.report(server, rows, dt)
            sim.check(after_tick=False)
        elif op[0] == "tick":
            sim.tick(op[1])
            sim.check(after_tick=True)
        else:
            sim.forget(op[1])
            sim.check(after_tick=False)


@settings(deadline=None, max_examples=120)
@given(configs, ops)
def test_invariants_under_random_reports_and_ticks(
    config: tuple[int, float, int], program: list[Any]
) -> None:
    limit, window, memory = config
    sim = Sim(limit, window, 0.1, memory)
    run_ops(sim, program)


@settings(deadline=None, max_examples=60)
@given(configs, ops)
def test_grants_only_follow_demand(config: tuple[int, float, int], program: list[Any]) -> None:
    """Every grant row (even of 0 tokens) answers demand (admitted + extra + rejected > 0)
    reported in the last ``memory`` ticks: records without demand (only released tokens, or
    nothing at all) are reported too, and never get a row by themselves."""
    limit, window, memory = config
    sim = Sim(limit, window, 0.1, memory)
    for op in program:
        if op[0] == "tick":
            got = sim.tick(op[1])
            for pair in got:
                assert any(d.get(pair, 0.0) > 0 for d in sim.demand_log[-memory:]), pair
            sim.check(after_tick=True)
        else:
            run_ops(sim, [op])


@settings(deadline=None, max_examples=60)
@given(configs, ops, ops)
def test_compact_keeps_the_state_of_active_clients(
    config: tuple[int, float, int], program: list[Any], rest: list[Any]
) -> None:
    """Compacting right after a tick (as the service does) changes no later grant."""
    limit, window, memory = config
    sim = Sim(limit, window, 0.1, memory)
    run_ops(sim, program)
    sim.tick(0.1)
    other = copy.deepcopy(sim)
    left = other.state.compact(other.now)
    assert left == len(other.state.clients)
    for op in [*rest, ("tick", 0.1)]:
        if op[0] == "tick":
            a = sim.tick(op[1])
            b = other.tick(op[1])
            assert a == b
            sim.check(after_tick=True)
            other.check(after_tick=True)
        else:
            run_ops(sim, [op])
            run_ops(other, [op])
    for k in CLIENTS:
        assert used_of(sim.state, k, sim.now) == pytest.approx(used_of(other.state, k, other.now))
        assert held_of(sim.state, k) == pytest.approx(held_of(other.state, k))


def test_compact_forgets_idle_clients_and_keeps_busy_ones() -> None:
    s = PartitionState(10, 1.0, 0.1, memory=2)
    s.apply(recs([1, 2], rejected=3.0), 0, 0.0)
    g = grants_of(s.tick(0.0))
    assert g[(1, 0)] > 0 and g[(2, 0)] > 0
    s.apply(recs([1], admitted=float(g[(1, 0)])), 0, 0.05)
    s.tick(0.1)
    s.forget_server(0)  # the server is gone: its leases expired
    for t in range(2, 30):
        s.tick(0.1 * t)
    assert len(s) == 2
    assert s.compact(2.95) == 0  # nothing in the window, nothing held, silent for a window
    assert len(s.pairs) == 0 and len(s) == 0
    # they come back as new clients, with a full budget
    s.apply(recs([2], rejected=100.0), 0, 3.0)
    assert grants_of(s.tick(3.0)) == {(2, 0): 10}

    s = PartitionState(10, 1.0, 0.1, memory=2)
    s.apply(recs([1], rejected=3.0), 0, 0.0)
    s.apply(recs([8], rejected=1.0), 1, 0.0)
    s.tick(0.0)
    s.apply(recs([7], admitted=0.0, extra=4.0), 1, 0.5)
    for t in range(6, 12):
        s.tick(0.1 * t)
    s.forget_server(1)
    # 1 holds a lease; 7 has charges in the window; 8 holds nothing and spoke 1.2 s ago
    assert s.compact(1.2) == 2
    assert used_of(s, 7, 1.2) == 4.0 and held_of(s, 1) > 0
    assert int(s.clients.lookup(np.array([8], dtype=np.uint64))[0]) == -1


# -- directed cases ------------------------------------------------------------------------------


def test_budget_is_shared_and_never_exceeded() -> None:
    s = PartitionState(30, 1.0, 0.1, memory=3)
    s.apply(recs([9], rejected=100.0), 0, 0.0)
    s.apply(recs([9], rejected=100.0), 1, 0.0)
    g = grants_of(s.tick(0.0))
    assert g[(9, 0)] + g[(9, 1)] == 30
    assert abs(g[(9, 0)] - g[(9, 1)]) <= 1
    # all of it admitted: the window holds it, nothing more until it slides out
    s.apply(recs([9], admitted=float(g[(9, 0)]), rejected=50.0), 0, 0.05)
    s.apply(recs([9], admitted=float(g[(9, 1)]), rejected=50.0), 1, 0.05)
    for t in range(1, 10):
        assert sum(grants_of(s.tick(0.1 * t)).values()) == 0
    # after the window (+ at most one bucket) the budget is back
    s.apply(recs([9], rejected=50.0), 0, 1.1)
    assert sum(grants_of(s.tick(1.2)).values()) > 0


def test_released_tokens_return_to_the_budget() -> None:
    s = PartitionState(10, 1.0, 0.1, memory=5)
    s.apply(recs([5], rejected=100.0), 0, 0.0)
    assert grants_of(s.tick(0.0)) == {(5, 0): 10}
    s.apply(recs([5], rejected=100.0), 1, 0.01)
    assert grants_of(s.tick(0.1)) == {(5, 0): 0, (5, 1): 0}
    s.apply(recs([5], released=10.0), 0, 0.15)
    g = grants_of(s.tick(0.2))
    assert sum(g.values()) == 10 and g[(5, 1)] > 0


def test_forget_server_frees_only_that_server() -> None:
    s = PartitionState(100, 1.0, 0.1, memory=5)
    s.apply(recs([1, 2], rejected=10.0), 0, 0.0)
    s.apply(recs([1], rejected=10.0), 1, 0.0)
    g = grants_of(s.tick(0.0))
    assert s.forget_server(0) == g[(1, 0)] + g[(2, 0)]
    assert held_of(s, 1) == g[(1, 1)] and held_of(s, 2) == 0
    assert s.forget_server(0) == 0.0
    assert s.forget_server(2) == 0.0  # never seen


def test_a_report_above_the_outstanding_frees_no_more_than_it() -> None:
    s = PartitionState(100, 1.0, 0.1, memory=5)
    s.apply(recs([1], rejected=4.0), 0, 0.0)
    g = grants_of(s.tick(0.0))[(1, 0)]
    # a previous owner's lease: the server reports more than this aggregator granted
    s.apply(recs([1], admitted=float(g + 50)), 0, 0.05)
    assert outstanding_of(s)[(1, 0)] == 0.0 and held_of(s, 1) == 0.0
    assert used_of(s, 1, 0.05) == g + 50


def test_split_records_above_the_outstanding_never_make_it_negative() -> None:
    """A key split over several records is summed per pair before the outstanding is reduced
    (once, this was capped per record: outstanding and held went to -60000)."""
    s = PartitionState(1_000_000, 1.0, 0.1, memory=2)
    s.apply(recs([7], rejected=100_000.0), 0, 0.0)
    g = grants_of(s.tick(0.0))[(7, 0)]
    assert g > 65535
    # e.g. after a rebalance: admissions from this lease and from a previous owner's lease
    records = recs([7], admitted=float(g + 60_000))
    assert records.size > 1  # split over several records
    s.apply(records, 0, 0.05)
    assert outstanding_of(s)[(7, 0)] == 0.0
    assert held_of(s, 7) == 0.0
    assert used_of(s, 7, 0.05) == g + 60_000  # every admission is charged


def test_split_records_below_the_outstanding_return_their_sum() -> None:
    s = PartitionState(1_000_000, 1.0, 0.1, memory=2)
    s.apply(recs([7], rejected=100_000.0), 0, 0.0)
    g = grants_of(s.tick(0.0))[(7, 0)]
    assert g > 3 * 65535
    # two record sets for the same key in one batch (split counts and a merged retry)
    both = np.concatenate((recs([7], admitted=70_000.0), recs([7], released=80_000.0)))
    assert both.size == 4
    s.apply(both, 0, 0.05)
    assert outstanding_of(s)[(7, 0)] == g - 150_000
    assert held_of(s, 7) == g - 150_000
    assert used_of(s, 7, 0.05) == 70_000


@pytest.mark.parametrize("released", [5.0, 0.0])
def test_a_record_without_demand_is_not_demand(released: float) -> None:
    """A record with admitted + extra + rejected == 0 (e.g. only the `released` tokens of an
    expired lease) gets no grant row (once, it was granted NEED_FLOOR tokens)."""
    s = PartitionState(100, 1.0, 0.1, memory=2)
    s.apply(recs([3], released=released), 0, 0.0)
    assert (3, 0) not in grants_of(s.tick(0.0))


def test_a_release_only_record_returns_its_tokens_and_the_client_goes_idle() -> None:
    s = PartitionState(100, 1.0, 0.1, memory=2)
    s.apply(recs([3], rejected=4.0), 0, 0.0)
    g = grants_of(s.tick(0.0))[(3, 0)]
    assert g > 0 and held_of(s, 3) == g
    # the lease expires unspent: the server reports its tokens released, and nothing else
    s.apply(recs([3], released=float(g)), 0, 0.05)
    assert outstanding_of(s)[(3, 0)] == 0.0 and held_of(s, 3) == 0.0
    assert used_of(s, 3, 0.05) == 0.0
    # the demand of tick 0 is still remembered at tick 1 (memory 2): a last lease
    g = grants_of(s.tick(0.1))[(3, 0)]
    assert g > 0 and held_of(s, 3) == g
    s.apply(recs([3], released=float(g)), 0, 0.15)  # it expires unspent too
    assert held_of(s, 3) == 0.0
    granted = grants_of(s.tick(0.2))
    assert (3, 0) not in granted, granted  # the releases are no demand
    for t in range(3, 15):
        assert grants_of(s.tick(0.1 * t)) == {}
    # held nothing, charged nothing, silent for a window: compacted away
    assert s.compact(1.4) == 0


# -- ChargeRing ----------------------------------------------------------------------------------


@dataclass
class RingModel:
    charges: list[tuple[float, int, float]] = field(default_factory=list)  # (time, row, amount)

    def bounds(self, row: int, now: float, window: float, late: float) -> tuple[float, float]:
        """(must count, may count): charges newer than now - window must count; older than
        now - window - late must not."""
        must = sum(a for t, r, a in self.charges if r == row and t > now - window)
        may = sum(a for t, r, a in self.charges if r == row and t > now - window - late)
        return must, may


ring_steps = st.lists(
    st.tuples(
        st.integers(0, 40).map(lambda k: k / 64),  # dt, dyadic: no float noise in t / bucket
        st.integers(0, 3),
        st.integers(1, 9).map(float),
    ),
    min_size=1,
    max_size=80,
)


@settings(deadline=None, max_examples=100)
@given(
    st.sampled_from([(1.0, 0.125), (1.0, 0.25), (0.5, 0.5), (2.0, 1 / 64), (0.25, 0.25)]),
    ring_steps,
    st.integers(0, 10_000).map(lambda k: k / 8),
)
def test_charge_ring_window_multiple_of_bucket(
    wb: tuple[float, float], steps: list[tuple[float, int, float]], start: float
) -> None:
    window, bucket = wb
    ring = ChargeRing(window, 0.0, bucket, rows=2)
    ring.ensure_rows(4)
    model = RingModel()
    now = start
    for dt, row, amount in steps:
        now += dt
        ring.advance(now)
        rows = np.arange(4)
        for r in range(4):
            must, may = model.bounds(r, now, window, bucket)
            used = float(ring.used(rows, now)[r])
            assert must <= used <= may, (r, now, must, used, may)
        ring.charge(np.array([row]), np.array([amount]), now)
        model.charges.append((now, row, amount))


@settings(deadline=None, max_examples=100)
@given(
    st.sampled_from([(1.0, 0.1), (0.7, 0.1), (3.0, 0.1), (1.0, 1 / 3), (60.0, 60 / 64)]),
    st.lists(
        st.tuples(st.floats(0.0, 0.5), st.integers(0, 2), st.integers(1, 9).map(float)),
        min_size=1,
        max_size=60,
    ),
    st.floats(0.0, 1e6),
)
def test_charge_ring_real_times_never_drop_early(
    wb: tuple[float, float], steps: list[tuple[float, int, float]], start: float
) -> None:
    """Arbitrary float times: never dropped before the window ends (up to float rounding of
    ``t / bucket``), and gone once a window and one bucket have passed, also when the window is
    not a multiple of the bucket."""
    window, bucket = wb
    ring = ChargeRing(window, 0.0, bucket, rows=3)
    model = RingModel()
    now = start
    eps = 1e-9 * max(1.0, now)
    for dt, row, amount in steps:
        now += dt
        ring.advance(now)
        rows = np.arange(3)
        for r in range(3):
            must, _ = model.bounds(r, now - eps, window, 0.0)
            _, may = model.bounds(r, now + eps, window, bucket)
            used = float(ring.used(rows, now)[r])
            assert must <= used <= may, (r, now, must, used, may)
        ring.charge(np.array([row]), np.array([amount]), now)
        model.charges.append((now, row, amount))


def test_charge_ring_window_not_a_multiple_of_bucket_overhangs_at_most_one_bucket() -> None:
    """A charge at 0.0 (bucket [0, 0.3)) counts while its bucket reaches into the window:
    until 1.3 s, not until 1.5 s as when ceil(window / bucket) buckets back all counted."""
    window, bucket = 1.0, 0.3
    ring = ChargeRing(window, 0.0, bucket, rows=1)
    ring.advance(0.0)
    ring.charge(np.array([0]), np.array([1.0]), 0.0)
    for now in (0.5, 0.99, 1.25):  # never dropped before the window ends
        ring.advance(now)
        assert ring.used(np.array([0]), now)[0] == 1.0, now
    for now in (1.35, 1.45):  # past the window and one whole bucket
        ring.advance(now)
        assert ring.used(np.array([0]), now)[0] == 0.0, now


def test_charge_ring_examples() -> None:
    ring = ChargeRing(1.0, 0.0, 0.25, rows=2)
    ring.advance(10.0)
    ring.charge(np.array([0, 0, 1]), np.array([1.0, 2.0, 5.0]), 10.0)  # np.add.at: dups sum
    assert ring.used(np.array([0, 1]), 10.0).tolist() == [3.0, 5.0]
    ring.advance(10.99)
    assert ring.used(np.array([0, 1]), 10.99).tolist() == [3.0, 5.0]
    ring.advance(11.2)  # its bucket [10, 10.25) still reaches into (10.2, 11.2]
    assert ring.used(np.array([0, 1]), 11.2).tolist() == [3.0, 5.0]
    ring.advance(11.25)
    assert ring.used(np.array([0, 1]), 11.25).tolist() == [0.0, 0.0]
    # a charge older than the window is not placed at all
    ring.charge(np.array([0]), np.array([1.0]), 9.0)
    assert ring.used(np.array([0]), 11.25)[0] == 0.0
    # a jump far ahead clears everything
    ring.charge(np.array([0]), np.array([4.0]), 11.25)
    assert ring.used(np.array([0]), 11.25)[0] == 4.0
    ring.advance(1e6)
    assert ring.used(np.array([0]), 1e6)[0] == 0.0
    # time going backwards does not clear anything
    ring.charge(np.array([1]), np.array([1.0]), 1e6)
    ring.advance(1e6 - 5)
    assert ring.used(np.array([1]), 1e6 - 5)[0] == 1.0


def test_charge_ring_keep_rows() -> None:
    ring = ChargeRing(1.0, 0.0, 0.25, rows=4)
    ring.advance(0.0)
    ring.charge(np.arange(4), np.array([1.0, 2.0, 3.0, 4.0]), 0.0)
    ring.keep_rows(np.array([3, 1]))
    assert ring.used(np.array([0, 1]), 0.0).tolist() == [4.0, 2.0]
    ring.ensure_rows(5000)
    assert ring.used(np.array([0, 1, 4999]), 0.0).tolist() == [4.0, 2.0, 0.0]


def test_charge_ring_refuses_bad_sizes() -> None:
    for args in [(0.0, 0.0, 0.1), (1.0, -1.0, 0.1), (1.0, 0.0, 0.0)]:
        with pytest.raises(ValueError):
            ChargeRing(*args)
