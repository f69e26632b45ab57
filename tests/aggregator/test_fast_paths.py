"""The aggregator's fast paths against its general ones (they must give the same results).

- ``KeyIndex.lookup_or_insert`` looks every key up first and sorts only the missing ones; its
  lookup probes windows of positions: slots in order of first sight, whatever the mix of old,
  new and repeated keys, and however far from home a key sits;
- ``ChargeRing.charge(distinct=True)`` (plain fancy indexing) against ``np.add.at``;
- ``PartitionState.apply`` with one record per key (no sort) against the same records split
  into several per key (the general path: rows merged per pair), and several batches of one
  server in one tick against one merged batch;
- ``PartitionState.tick`` (kept-alive pairs without demand left out of the allocation,
  ``water_fill_sparse``) against the tick as it was: every kept-alive pair through
  ``water_fill``, grants and state compared exactly;
- ``water_fill_sparse`` against ``water_fill`` of all the rows.
"""

from __future__ import annotations

import copy
from typing import Any

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.allocate import water_fill, water_fill_sparse
from aggregator.keyindex import KeyIndex
from aggregator.partition import MAX_SERVERS, NEED_FLOOR, NEED_TICKS, PartitionState, _groups
from aggregator.window import ChargeRing
from producer.wire import usage_records

U64 = 2**64 - 1


def arr(keys: list[int]) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


# -- KeyIndex ------------------------------------------------------------------------------------


def first_sight(slots: dict[int, int], keys: list[int]) -> list[int]:
    out = []
    for k in keys:
        if k not in slots:
            slots[k] = len(slots)
        out.append(slots[k])
    return out


key_strategy = st.one_of(
    st.integers(1, 60),  # few distinct keys: repeats within and across batches
    st.integers(1, 2**40).map(lambda c: c * MAX_SERVERS + 3),  # pair ids: progressions
    st.integers(U64 - 50, U64),
    st.integers(1, U64),
)


@settings(deadline=None, max_examples=80)
@given(st.lists(st.lists(key_strategy, max_size=200), min_size=1, max_size=6), st.randoms())
def test_lookup_or_insert_mixed_old_new_and_repeated_keys(
    batches: list[list[int]], rnd: Any
) -> None:
    index = KeyIndex(capacity=2)
    slots: dict[int, int] = {}
    seen: list[int] = []
    for batch in batches:
        # old keys (from earlier batches) and repeats of this batch's new keys, mixed in
        mixed = batch + rnd.sample(seen, min(len(seen), 30)) + batch[: len(batch) // 2]
        rnd.shuffle(mixed)
        assert index.lookup_or_insert(arr(mixed)).tolist() == first_sight(slots, mixed)
        seen.extend(batch)
        assert index.slot_keys[: len(slots)].tolist() == list(slots)
        probe = mixed + [k ^ 1 for k in mixed]  # present and (mostly) absent keys
        assert index.lookup(arr(probe)).tolist() == [slots.get(k, -1) for k in probe]


def test_lookup_far_from_home_and_across_the_table_end() -> None:
    """Clusters longer than every probe window, wrapping around the end of the table: found
    keys, and absent keys that stop at the first empty position after the cluster."""
    index = KeyIndex(capacity=64)  # 128 positions, no growth below 64 keys
    size = index.keys.size
    candidates = np.arange(1, 200_000, dtype=np.uint64)
    near_end = candidates[index._home(candidates) >= size - 3].tolist()
    chain = near_end[:60]
    assert len(chain) == 60
    slots: dict[int, int] = {}
    for i in range(0, 60, 7):  # inserted in several calls: the cluster grows across the end
        part = chain[i : i + 7]
        assert index.lookup_or_insert(arr(part)).tolist() == first_sight(slots, part)
    assert index.keys.size == size
    absent = near_end[60:100]
    probe = chain + absent + chain[::-1]
    assert index.lookup(arr(probe)).tolist() == [slots.get(k, -1) for k in probe]


def test_lookup_of_a_big_index_matches_the_slots() -> None:
    rng = np.random.default_rng(3)
    clients = np.arange(200_000)
    ids = (np.repeat(clients, 3) * MAX_SERVERS + np.tile([1, 2, 5], clients.size)).astype(np.uint64)
    ids = ids[rng.permutation(ids.size)]
    index = KeyIndex()
    assert index.lookup_or_insert(ids).tolist() == list(range(ids.size))
    pick = rng.integers(0, ids.size, 50_000)
    assert np.array_equal(index.lookup(ids[pick]), pick)
    assert (index.lookup(ids[pick] + np.uint64(MAX_SERVERS // 2)) == -1).all()


@settings(deadline=None, max_examples=60)
@given(st.integers(0, 2**32), st.integers(1, 400), st.integers(0, 40))
def test_new_keys_colliding_on_their_end_positions(seed: int, new: int, repeats: int) -> None:
    """New keys whose probes end at one empty position (a crowded table): distinct ones take
    slots in order without a sort, repeated ones (equal keys end alike) once each; the table's
    empty positions stay empty (key 0, slot -1)."""
    rng = np.random.default_rng(seed)
    index = KeyIndex(capacity=512)
    slots: dict[int, int] = {}
    old = rng.integers(1, U64, 300, dtype=np.uint64).tolist()
    assert index.lookup_or_insert(arr(old)).tolist() == first_sight(slots, old)
    fresh = rng.integers(1, U64, new, dtype=np.uint64).tolist()
    batch = fresh + [fresh[i] for i in rng.integers(0, new, repeats)] + old[:20]
    rng.shuffle(batch)
    assert index.lookup_or_insert(arr(batch)).tolist() == first_sight(slots, batch)
    assert index.slot_keys[: len(slots)].tolist() == list(slots)
    empty = index.keys == 0
    assert (index.slot_of[empty] == -1).all()
    assert int((~empty).sum()) == len(slots)


# -- ChargeRing ----------------------------------------------------------------------------------


@settings(deadline=None, max_examples=50)
@given(
    st.lists(
        st.tuples(st.integers(0, 40), st.integers(0, 500).map(float)),
        min_size=1,
        max_size=40,
        unique_by=lambda r: r[0],
    )
)
def test_charge_distinct_rows_matches_add_at(rows: list[tuple[int, float]]) -> None:
    a = ChargeRing(1.0, 0.0, 0.25, rows=64)
    b = ChargeRing(1.0, 0.0, 0.25, rows=64)
    for ring in (a, b):
        ring.advance(10.0)
        ring.charge(np.array([1, 2]), np.array([3.0, 4.0]), 9.9)
    r = np.array([x for x, _ in rows])
    v = np.array([y for _, y in rows])
    a.charge(r, v, 10.0)
    b.charge(r, v, 10.0, distinct=True)
    assert np.array_equal(a.charges, b.charges)
    assert np.array_equal(a.total, b.total)


# -- PartitionState.apply ------------------------------------------------------------------------


def state_arrays(s: PartitionState) -> dict[str, np.ndarray]:
    n, m = len(s.clients), len(s.pairs)
    return {
        "client_keys": s.clients.slot_keys[:n].copy(),
        "pair_keys": s.pairs.slot_keys[:m].copy(),
        "charges": s.ring.charges[:, :n].copy(),
        "total": s.ring.total[:n].copy(),
        "held": s.held[:n].copy(),
        "last_active": s.last_active[:n].copy(),
        "outstanding": s.outstanding[:m].copy(),
        "wanted": s.wanted[:m].copy(),
        "seen": s.seen[:m].copy(),
    }


def assert_same_state(a: PartitionState, b: PartitionState) -> None:
    sa, sb = state_arrays(a), state_arrays(b)
    for name in sa:
        assert np.array_equal(sa[name], sb[name]), name
    assert len(a._history) == len(b._history)
    for (pa, da), (pb, db) in zip(a._history, b._history, strict=True):
        order_a, order_b = np.argsort(pa), np.argsort(pb)
        assert np.array_equal(pa[order_a], pb[order_b])
        assert np.array_equal(da[order_a], db[order_b])


def grants(result: tuple[np.ndarray, np.ndarray, np.ndarray]) -> list[tuple[int, int, int]]:
    keys, servers, tokens = result
    return list(zip(keys.tolist(), servers.tolist(), tokens.tolist(), strict=True))


KEYS = [5, 6, 7, 2**63 + 1, U64]
#: one key's counts: (admitted, extra, rejected, released)
counts = st.tuples(st.integers(0, 6), st.integers(0, 2), st.integers(0, 30), st.integers(0, 4)).map(
    lambda c: tuple(float(x) for x in c)
)


def records_of(rows: list[tuple[int, tuple[float, ...]]]) -> np.ndarray:
    keys = arr([k for k, _ in rows])
    cols = [np.array([c[i] for _, c in rows]) for i in range(4)]
    return usage_records(keys, *cols)


def merged(rows: list[tuple[int, tuple[float, ...]]]) -> list[tuple[int, tuple[float, ...]]]:
    """One row per key (first sight order), counts summed."""
    out: dict[int, list[float]] = {}
    for k, c in rows:
        acc = out.setdefault(k, [0.0] * 4)
        for i in range(4):
            acc[i] += c[i]
    return [(k, tuple(v)) for k, v in out.items()]


batch_rows = st.lists(st.tuples(st.sampled_from(KEYS), counts), min_size=1, max_size=12)


@settings(deadline=None, max_examples=80)
@given(
    st.lists(st.tuples(st.integers(0, 2), batch_rows, st.booleans()), min_size=1, max_size=25),
    st.sampled_from([3, 20, 1000]),
)
def test_batches_with_repeated_keys_match_the_merged_batches(
    program: list[tuple[int, list[tuple[int, tuple[float, ...]]], bool]], limit: int
) -> None:
    """A batch with a key in several records (general path) changes the state exactly as the
    same batch merged into one record per key (fast path); ``tick_after`` ticks in between."""
    split = PartitionState(limit, 1.0, 0.1, memory=3, keepalive=6)
    whole = PartitionState(limit, 1.0, 0.1, memory=3, keepalive=6)
    now = 100.0
    for server, rows, tick_after in program:
        now += 0.02
        split.apply(records_of(rows), server, now, now - 0.01)
        whole.apply(records_of(merged(rows)), server, now, now - 0.01)
        assert_same_state(split, whole)
        if tick_after:
            now += 0.1
            assert grants(split.tick(now)) == grants(whole.tick(now))
            assert_same_state(split, whole)
    now += 0.1
    assert grants(split.tick(now)) == grants(whole.tick(now))


@settings(deadline=None, max_examples=60)
@given(st.lists(st.lists(batch_rows, min_size=1, max_size=3), min_size=1, max_size=12))
def test_several_batches_of_a_server_in_one_tick_match_one_batch(
    ticks: list[list[list[tuple[int, tuple[float, ...]]]]],
) -> None:
    """Batches of one server between two ticks (a pair in several of them: the tick merges
    their rows) against one merged batch; also as replayed batches (window only)."""
    many = PartitionState(50, 1.0, 0.1, memory=2, keepalive=4)
    one = PartitionState(50, 1.0, 0.1, memory=2, keepalive=4)
    now = 10.0
    for batches in ticks:
        now += 0.1
        for rows in batches:
            many.apply(records_of(merged(rows)), 1, now)
            many.apply(records_of(merged(rows)), 2, now, replay=True)
        everything = [r for rows in batches for r in rows]
        one.apply(records_of(merged(everything)), 1, now)
        one.apply(records_of(everything), 2, now, replay=True)
        assert grants(many.tick(now)) == grants(one.tick(now))
        assert_same_state(many, one)


# -- PartitionState.tick against the tick as it was ----------------------------------------------


def reference_tick(self: PartitionState, now: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
    """The tick before its idle pairs were left out: every kept-alive pair allocated by
    ``water_fill`` (and this tick's demand merged by a sort)."""
    self.ring.advance(now)
    if self._demand:
        cur_pairs = np.concatenate([p for p, _ in self._demand])
        cur_amounts = np.concatenate([a for _, a in self._demand])
        cur_pairs, inverse = np.unique(cur_pairs, return_inverse=True)
        cur_amounts = np.bincount(
            inverse.reshape(-1), weights=cur_amounts, minlength=cur_pairs.size
        )
    else:
        cur_pairs, cur_amounts = np.zeros(0, dtype=np.int64), np.zeros(0)
    self._demand, self._demand_repeats = [], False
    history = self._history
    if len(history) == history.maxlen:
        old_pairs, old_amounts = history.popleft()
        self.wanted[old_pairs] -= old_amounts
    history.append((cur_pairs, cur_amounts))
    self.wanted[cur_pairs] += cur_amounts
    m = len(self.pairs)
    pairs = np.flatnonzero(self.seen[:m] > self._ticks - self.keepalive)
    self._ticks += 1
    if pairs.size == 0:
        return np.zeros(0, dtype=np.uint64), np.zeros(0, np.int64), np.zeros(0, np.int64)
    per_tick = self.wanted[pairs] / len(history)
    clients, group = _groups(self.pair_client[pairs], len(self.clients))
    budget = np.maximum(
        0.0, self.limits[clients] - self.ring.used(clients, now) - self.held[clients]
    )
    need = np.maximum(0.0, np.ceil(NEED_TICKS * per_tick) + NEED_FLOOR - self.outstanding[pairs])
    tokens = water_fill(group, per_tick + 1.0, need, budget, self.pair_server[pairs])
    self.outstanding[pairs] += tokens
    self.held[clients] += np.bincount(group, weights=tokens, minlength=clients.size)
    memory = self._history.maxlen or 1
    refresh = (pairs + self._ticks) % max(1, memory // 2) == 0
    send = (tokens > 0) | (per_tick > 0) | refresh
    pairs, group, tokens = pairs[send], group[send], tokens[send]
    return self.clients.slot_keys[clients[group]], self.pair_server[pairs], tokens


report_op = st.tuples(
    st.just("report"),
    st.integers(0, 3),
    st.lists(
        st.tuples(
            st.integers(0, 11),  # client
            st.sampled_from([0.0, 0.5, 1.0]),  # share of its lease admitted
            st.integers(0, 40),  # rejected
            st.sampled_from([0.0, 0.0, 1.0]),  # share of the rest released
        ),
        max_size=10,
        unique_by=lambda r: r[0],
    ),
)
ops = st.lists(
    st.one_of(
        report_op,
        report_op,
        report_op,
        st.tuples(st.just("tick"), st.sampled_from([1, 1, 2, 5])),
        st.tuples(st.just("tick"), st.sampled_from([1, 1, 2, 5])),
        st.tuples(st.just("forget"), st.integers(0, 3)),
        st.tuples(st.just("compact"), st.just(0)),
    ),
    min_size=10,
    max_size=80,
)


@settings(deadline=None, max_examples=120)
@given(ops, st.sampled_from([(4, 2, 10), (30, 4, 9), (1000, 10, 30)]))
def test_tick_matches_the_tick_as_it_was(program: list[Any], config: tuple[int, int, int]) -> None:
    """Honest servers (they admit and release from what they were granted), small limits
    (clients short of budget: the sort with the idle pairs fetched back), long keepalives
    (many idle pairs), server loss and compaction: same grants, same state."""
    limit, memory, keepalive = config
    fast = PartitionState(limit, 2.0, 0.1, memory=memory, keepalive=keepalive)
    ref = copy.deepcopy(fast)
    keys = [1000 + 17 * c for c in range(12)]
    held: dict[tuple[int, int], float] = {}
    now = 50.0
    for op in program:
        if op[0] == "report":
            _, server, rows = op
            now += 0.01
            ks, cols = [], []
            for c, a_share, rejected, r_share in rows:
                have = held.get((keys[c], server), 0.0)
                a = float(np.floor(have * a_share))
                r = float(np.floor((have - a) * r_share))
                held[(keys[c], server)] = have - a - r
                ks.append(keys[c])
                cols.append((a, 0.0, float(rejected), r))
            if ks:
                records = usage_records(arr(ks), *(np.array(x) for x in zip(*cols, strict=True)))
                for s in (fast, ref):
                    s.apply(records, server, now)
        elif op[0] == "tick":
            for _ in range(op[1]):
                now += 0.1
                got = fast.tick(now)
                want = reference_tick(ref, now)
                assert grants(got) == grants(want)
                assert got[2].dtype == want[2].dtype
                for k, s, t in grants(got):
                    held[(k, s)] = held.get((k, s), 0.0) + t
                assert_same_state(fast, ref)
        elif op[0] == "forget":
            assert fast.forget_server(op[1]) == ref.forget_server(op[1])
            for pair in held:
                if pair[1] == op[1]:
                    held[pair] = 0.0
        else:
            assert fast.compact(now) == ref.compact(now)
            assert_same_state(fast, ref)


# -- water_fill_sparse ---------------------------------------------------------------------------


@settings(deadline=None, max_examples=200)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),  # group
            st.integers(0, 12).map(float),  # per tick (0: a candidate to leave out)
            st.integers(0, 9).map(float),  # need
            st.booleans(),  # left out if it can be (need 0, per tick 0)
        ),
        min_size=1,
        max_size=30,
    ),
    st.lists(st.integers(0, 25).map(lambda b: b / 2), min_size=6, max_size=6),
)
def test_water_fill_sparse_matches_water_fill(
    rows: list[tuple[int, float, float, bool]], budget: list[float]
) -> None:
    group = np.array([g for g, _, _, _ in rows])
    per_tick = np.array([w for _, w, _, _ in rows])
    need = np.array([n for _, _, n, _ in rows])
    out = np.array([o for _, _, _, o in rows]) & (need == 0) & (per_tick == 0)
    tie = np.zeros(group.size, dtype=np.int64)
    for g in range(6):  # unique within each group (the server)
        tie[group == g] = np.arange(np.count_nonzero(group == g))[::-1]
    b = np.array(budget)
    want = water_fill(group, per_tick + 1.0, need, b, tie)
    keep = ~out
    calls: list[np.ndarray] = []

    def left_out(groups: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        calls.append(groups)
        sel = out & np.isin(group, groups)
        return group[sel], tie[sel]

    got = water_fill_sparse(group[keep], per_tick[keep] + 1.0, need[keep], b, tie[keep], left_out)
    assert got.dtype == want.dtype
    assert got.tolist() == want[keep].tolist()
    assert (want[out] == 0).all()
    for groups in calls:  # only asked about groups short of budget
        assert (np.bincount(group, weights=need, minlength=6)[groups] > np.floor(b[groups])).all()


@settings(deadline=None, max_examples=40)
@given(st.lists(key_strategy, max_size=300, unique=True), st.lists(key_strategy, max_size=50))
def test_an_index_of_distinct_keys_is_the_same_as_inserting_them(
    keys: list[int], later: list[int]
) -> None:
    built = KeyIndex.of_distinct(arr(keys))
    inserted = KeyIndex()
    inserted.lookup_or_insert(arr(keys))
    assert len(built) == len(inserted) == len(keys)
    assert built.slot_keys[: len(keys)].tolist() == keys
    probe = keys + later
    assert built.lookup(arr(probe)).tolist() == inserted.lookup(arr(probe)).tolist()
    assert (
        built.lookup_or_insert(arr(later)).tolist()
        == inserted.lookup_or_insert(arr(later)).tolist()
    )


# -- PartitionState.apply_many (the service folds one poll's batches) --------------------------


@settings(deadline=None, max_examples=80)
@given(
    st.lists(
        st.lists(
            st.tuples(st.integers(0, 3), batch_rows, st.sampled_from([0.0, 0.01, 0.25, 2.0])),
            min_size=1,
            max_size=6,
        ),
        min_size=1,
        max_size=8,
    ),
    st.sampled_from([3, 20, 1000]),
)
def test_folded_batches_match_batches_applied_one_by_one(
    polls: list[list[tuple[int, list[tuple[int, tuple[float, ...]]], float]]], limit: int
) -> None:
    """Each poll's batches (servers repeating, keys repeating within and across batches,
    charged at times in different ring buckets or older than the window) folded in at once
    leave the state and the next tick's grants exactly as applying them one by one."""
    folded = PartitionState(limit, 1.0, 0.1, memory=3, keepalive=6)
    single = PartitionState(limit, 1.0, 0.1, memory=3, keepalive=6)
    now = 100.0
    for poll in polls:
        now += 0.1
        batches = [(records_of(rows), server, now - age) for server, rows, age in poll]
        folded.apply_many(batches, now)
        for records, server, at in batches:
            single.apply(records, server, now, at)
        assert_same_state(folded, single)
        assert grants(folded.tick(now)) == grants(single.tick(now))
        assert_same_state(folded, single)
