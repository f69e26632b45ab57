"""``aggregator.keyindex.KeyIndex`` against a dict model: key -> dense slot, growth, compaction."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from hypothesis.stateful import RuleBasedStateMachine, invariant, rule

from aggregator.keyindex import KeyIndex

U64 = 2**64 - 1


class Model:
    """The plain model: slots handed out 0, 1, 2, ... in order of first sight."""

    def __init__(self) -> None:
        self.slot: dict[int, int] = {}

    def lookup_or_insert(self, keys: list[int]) -> list[int]:
        out = []
        for k in keys:
            if k not in self.slot:
                self.slot[k] = len(self.slot)
            out.append(self.slot[k])
        return out

    def lookup(self, keys: list[int]) -> list[int]:
        return [self.slot.get(k, -1) for k in keys]

    def compact(self, keep: list[bool]) -> list[int]:
        by_slot = sorted(self.slot.items(), key=lambda kv: kv[1])
        kept = [(k, s) for k, s in by_slot if keep[s]]
        self.slot = {k: i for i, (k, _) in enumerate(kept)}
        return [s for _, s in kept]


def arr(keys: list[int]) -> np.ndarray:
    return np.array(keys, dtype=np.uint64)


def check_against(index: KeyIndex, model: Model, probes: list[int]) -> None:
    assert len(index) == len(model.slot)
    keys = list(model.slot)
    assert index.lookup(arr(keys)).tolist() == model.lookup(keys)
    assert index.lookup(arr(probes)).tolist() == model.lookup(probes)
    # slot -> key is the inverse
    for k, s in model.slot.items():
        assert int(index.slot_keys[s]) == k


# keys that share their low bits (one usage partition: key mod partitions is constant), keys near
# 2**64 - 1, small keys, and keys colliding on the Fibonacci home of a small table
same_low = st.integers(1, 2**40).map(lambda x: (x << 20) | 0x5)
near_max = st.integers(U64 - 5000, U64)
small = st.integers(1, 3000)
any_key = st.integers(1, U64)
keys = st.one_of(same_low, near_max, small, any_key)


@settings(deadline=None, max_examples=60)
@given(st.lists(st.lists(keys, max_size=300), max_size=8), st.lists(keys, max_size=50))
def test_lookup_or_insert_matches_dict(batches: list[list[int]], probes: list[int]) -> None:
    index = KeyIndex(capacity=4)  # tiny: growth and rebuilds happen early
    model = Model()
    for batch in batches:
        # duplicates inside one call get one slot, in order of first sight
        batch = batch + batch[: len(batch) // 3]
        got = index.lookup_or_insert(arr(batch))
        assert got.dtype == np.int64
        assert got.tolist() == model.lookup_or_insert(batch)
        check_against(index, model, probes)


def test_growth_across_many_rebuilds() -> None:
    index = KeyIndex(capacity=1)
    model = Model()
    rng = np.random.default_rng(7)
    table_sizes = set()
    for step in range(30):
        batch = rng.integers(1, 2**63, size=int(rng.integers(1, 3000)), dtype=np.uint64)
        batch = (batch << np.uint64(16)) | np.uint64(step % 3)  # shared low bits
        batch = np.concatenate([batch, batch[:10]])
        want = model.lookup_or_insert([int(x) for x in batch])
        assert index.lookup_or_insert(batch).tolist() == want
        table_sizes.add(index.keys.size)
        assert index.keys.size >= 2 * len(index)  # load factor at most 1/2
    assert len(table_sizes) >= 4  # it did grow several times
    check_against(index, model, [1, 2, 3, U64])


def test_keys_with_the_same_home_probe_linearly() -> None:
    index = KeyIndex(capacity=4)
    home0 = [k for k in range(1, 200_000) if index._home(arr([k]))[0] == 0][:40]
    assert len(home0) == 40
    model = Model()
    assert index.lookup_or_insert(arr(home0)).tolist() == model.lookup_or_insert(home0)
    assert index.lookup(arr(home0[::-1])).tolist() == model.lookup(home0[::-1])
    assert index.lookup(arr([k + 1 for k in home0])).tolist() == model.lookup(
        [k + 1 for k in home0]
    )


def test_wraps_around_the_end_of_the_table() -> None:
    index = KeyIndex(capacity=4)
    last = (1 << index.bits) - 1
    at_end = [k for k in range(1, 400_000) if index._home(arr([k]))[0] == last][:30]
    model = Model()
    assert index.lookup_or_insert(arr(at_end)).tolist() == model.lookup_or_insert(at_end)
    check_against(index, model, [])


def test_empty_calls() -> None:
    index = KeyIndex()
    assert index.lookup(arr([])).tolist() == []
    assert index.lookup_or_insert(arr([])).tolist() == []
    assert len(index) == 0
    assert index.lookup(arr([1, U64])).tolist() == [-1, -1]
    assert index.compact(np.zeros(0, dtype=bool)).tolist() == []


@settings(deadline=None, max_examples=60)
@given(
    st.lists(keys, min_size=1, max_size=400, unique=True),
    st.data(),
)
def test_compact_keeps_chosen_slots_renumbered_densely(
    initial: list[int], data: st.DataObject
) -> None:
    index = KeyIndex(capacity=8)
    model = Model()
    model.lookup_or_insert(initial)
    index.lookup_or_insert(arr(initial))
    keep = data.draw(st.lists(st.booleans(), min_size=len(initial), max_size=len(initial)))
    old = index.compact(np.array(keep, dtype=bool))
    want_old = model.compact(keep)
    assert old.tolist() == want_old  # old slot of each new slot, in order
    check_against(index, model, initial)
    # removed keys are gone and come back as new slots after the kept ones
    later = data.draw(st.lists(keys, max_size=100))
    assert index.lookup_or_insert(arr(later)).tolist() == model.lookup_or_insert(later)
    check_against(index, model, initial)


def test_compact_with_a_keep_array_longer_than_size() -> None:
    """Callers pass per-slot arrays that are larger than the index (grown by doubling)."""
    index = KeyIndex()
    index.lookup_or_insert(arr([10, 20, 30]))
    keep = np.zeros(1024, dtype=bool)
    keep[[0, 2, 500]] = True
    assert index.compact(keep).tolist() == [0, 2]
    assert index.lookup(arr([10, 20, 30])).tolist() == [0, -1, 1]


class KeyIndexMachine(RuleBasedStateMachine):
    """Interleaved inserts, lookups and compactions."""

    def __init__(self) -> None:
        super().__init__()
        self.index = KeyIndex(capacity=2)
        self.model = Model()
        self.seen: list[int] = []

    @rule(batch=st.lists(keys, max_size=120))
    def insert(self, batch: list[int]) -> None:
        assert self.index.lookup_or_insert(arr(batch)).tolist() == self.model.lookup_or_insert(
            batch
        )
        self.seen.extend(batch)

    @rule(data=st.data())
    def compact(self, data: st.DataObject) -> None:
        n = len(self.model.slot)
        keep = data.draw(st.lists(st.booleans(), min_size=n, max_size=n))
        assert self.index.compact(np.array(keep, dtype=bool)).tolist() == self.model.compact(keep)

    @rule(probes=st.lists(keys, max_size=30))
    def lookup(self, probes: list[int]) -> None:
        assert self.index.lookup(arr(probes)).tolist() == self.model.lookup(probes)

    @invariant()
    def agrees(self) -> None:
        check_against(self.index, self.model, self.seen[-50:])


TestKeyIndexMachine = KeyIndexMachine.TestCase
TestKeyIndexMachine.settings = settings(deadline=None, max_examples=40, stateful_step_count=25)


@pytest.mark.parametrize("n", [1, 511, 512, 513, 5000])
def test_dense_slots_for_sequential_inserts(n: int) -> None:
    index = KeyIndex()
    ks = np.arange(1, n + 1, dtype=np.uint64) * np.uint64(1 << 20)  # all share low bits
    assert index.lookup_or_insert(ks).tolist() == list(range(n))
    assert index.lookup_or_insert(ks[::-1]).tolist() == list(range(n))[::-1]
    assert index.slot_keys[:n].tolist() == ks.tolist()
