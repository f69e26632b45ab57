"""The client table (limiter/table.py): open addressing with linear probing, backward-shift
deletion, vectorised growth, and reclaiming idle clients under ``max_clients``."""

from __future__ import annotations

import math

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from limiter import DEFAULT_MAX_REQUEST_AGE, RateLimiter, Reason
from limiter.table import INITIAL_SLOTS, MAX_LOAD, ClientTable, IdleTest, Shard, place

FRESH = (0.0, -1.0)
WIDTH = len(FRESH)
HOME_BITS = 20  # keys of a group share these bits above ``shift``: one home slot up to 2**20


def never_idle(shard: Shard, i: int, now: float) -> bool:
    return False


def idle_when_expired(shard: Shard, i: int, now: float) -> bool:
    """Test state: cell 0 holds an expiry time; the client is idle once it has passed."""
    return bool(shard.arrays[0][i * WIDTH] <= now)


def make_shard(shift: int = 0, max_count: int = 1 << 30, idle: IdleTest = never_idle) -> Shard:
    return Shard([WIDTH], [FRESH], idle, max_count, shift)


def key(group: int, j: int, shift: int, low: int = 0) -> int:
    """A non-zero int64 key whose home bits are ``group`` for every table of <= 2**20 slots."""
    h = ((group + (j << HOME_BITS)) << shift) | low
    return h if j % 2 == 0 else h - (1 << 63)  # negative, same low 63 bits: same home


def home(h: int, shard: Shard) -> int:
    return (h >> shard.shift) & shard.mask


def cells(shard: Shard, i: int) -> tuple[float, float]:
    a = shard.arrays[0]
    return float(a[i * WIDTH]), float(a[i * WIDTH + 1])


def set_cells(shard: Shard, i: int, v: float) -> None:
    a = shard.arrays[0]
    a[i * WIDTH] = v
    a[i * WIDTH + 1] = -v


def check_invariants(shard: Shard, model: dict[int, float], absent: set[int]) -> None:
    keys = shard.keys
    assert shard.count == len(model) == int(np.count_nonzero(keys))
    assert shard.count <= shard.slots * MAX_LOAD
    for h, v in model.items():
        i = shard.find(h)
        assert i >= 0, h
        assert keys[shard.find_slot(h)] == h
        assert cells(shard, i) == (v, -v)
    for h in absent:
        assert shard.find(h) == -1, h
    _, rows = shard.occupied()
    assert len(set(rows.tolist())) == rows.size  # one row per client
    assert set(rows.tolist()).isdisjoint(shard.free)
    assert shard.rows * 4 <= max(5 * shard.used_rows, 4 * (shard.used_rows + 16))
    for r in range(shard.rows):
        if r not in rows:
            assert cells(shard, r) == FRESH  # rows not in use hold fresh state
    for i in range(shard.slots):
        k = int(keys[i])
        if k == 0:
            continue
        # linear probing: no empty slot between a key's home and its slot
        j = home(k, shard)
        while j != i:
            assert keys[j] != 0, (k, i, j)
            j = (j + 1) & shard.mask


@st.composite
def key_pool(draw: st.DrawFn, shift: int) -> list[int]:
    low = draw(st.integers(0, (1 << shift) - 1))
    pool = [key(5, j, shift, low) for j in range(1, 25)]  # one crowded home slot
    pool += [key((1 << HOME_BITS) - 1, j, shift, low) for j in range(1, 15)]  # wraps around
    pool += [key(6, j, shift, low) for j in range(1, 6)]  # the slot after the crowded one
    pool += draw(
        st.lists(
            st.integers(-(2**63), 2**63 - 1).filter(lambda x: x != 0), max_size=20, unique=True
        )
    )
    return list(dict.fromkeys(pool))


@settings(max_examples=150, deadline=None)
@given(data=st.data())
def test_shard_against_dict_model(data: st.DataObject) -> None:
    shift = data.draw(st.sampled_from([0, 2, 4]), label="shift")
    pool = data.draw(key_pool(shift), label="pool")
    # a working set of keys, mostly from the crowded groups, so that chains form and break
    working = data.draw(
        st.lists(st.sampled_from(pool), min_size=1, max_size=40, unique=True), label="working"
    )
    shard = make_shard(shift)
    model: dict[int, float] = {}
    ops = data.draw(
        st.lists(
            st.tuples(
                st.sampled_from(["insert", "insert", "delete", "find"]),
                st.sampled_from(working),
                st.integers(1, 10**6),
            ),
            min_size=10,
            max_size=200,
        ),
        label="ops",
    )
    for op, h, v in ops:
        if op == "insert":
            i = shard.insert(h, 0.0)
            assert i >= 0 and shard.keys[shard.find_slot(h)] == h
            if h in model:
                assert cells(shard, i) == (model[h], -model[h])  # existing state kept
            else:
                assert cells(shard, i) == FRESH  # a new client starts fresh
            set_cells(shard, i, float(v))
            model[h] = float(v)
        elif op == "delete":
            i = shard.find_slot(h)
            assert (i >= 0) == (h in model)
            if i >= 0:
                shard.delete(i)
                del model[h]
        else:
            i = shard.find(h)
            assert (i >= 0) == (h in model)
        check_invariants(shard, model, set(pool) - set(model))


def test_delete_shifts_the_chain_back() -> None:
    """Deleting the head of a probe chain moves the members whose home allows it; a member
    sitting at its own home stays (hand-built chain, table of 16 slots)."""
    shard = make_shard()
    a, b, c = key(5, 2, 0), key(5, 3, 0), key(5, 4, 0)  # home 5
    d = key(6, 2, 0)  # home 6, pushed to 8 by the chain
    e = key(15, 2, 0)  # home 15: the last slot
    f = key(15, 4, 0)  # home 15, wraps to slot 0
    rows = {h: shard.insert(h, 0.0) for h in (a, b, c, d, e, f)}
    slots = {h: shard.find_slot(h) for h in rows}
    assert slots == {a: 5, b: 6, c: 7, d: 8, e: 15, f: 0}
    for h, v in zip((a, b, c, d, e, f), range(1, 7), strict=True):
        set_cells(shard, rows[h], float(v))
    shard.delete(slots[a])
    assert [shard.find_slot(h) for h in (b, c, d)] == [5, 6, 7]  # all shifted back one slot
    assert [shard.find(h) for h in (b, c, d)] == [rows[b], rows[c], rows[d]]  # rows stay
    assert cells(shard, rows[b]) == (2.0, -2.0) and cells(shard, rows[d]) == (4.0, -4.0)
    assert shard.keys[8] == 0 and cells(shard, rows[a]) == FRESH
    assert shard.insert(a, 0.0) == rows[a]  # the freed row is reused
    shard.delete(shard.find_slot(a))
    shard.delete(shard.find_slot(e))
    assert shard.find_slot(f) == 15  # wrapped member moves back across the end
    assert shard.keys[0] == 0 and cells(shard, shard.find(f)) == (6.0, -6.0)
    check_invariants(shard, {b: 2.0, c: 3.0, d: 4.0, f: 6.0}, {a, e})


def test_shard_grows_and_keeps_state() -> None:
    shard = make_shard()
    assert shard.slots == INITIAL_SLOTS
    model = {}
    for j in range(1, 200):
        h = key(3, j, 0) if j % 3 else j * 7919
        i = shard.insert(h, 0.0)
        set_cells(shard, i, float(j))
        model[h] = float(j)
    assert shard.slots >= 256
    check_invariants(shard, model, set())
    for h in list(model)[::2]:
        shard.delete(shard.find_slot(h))
        del model[h]
    check_invariants(shard, model, set())


@settings(max_examples=150, deadline=None)
@given(
    shift=st.sampled_from([0, 1, 3]),
    size_log=st.integers(4, 9),
    data=st.data(),
)
def test_place_gives_findable_keys(shift: int, size_log: int, data: st.DataObject) -> None:
    size = 1 << size_log
    pool = data.draw(key_pool(shift))
    n = data.draw(st.integers(0, min(len(pool), int(size * MAX_LOAD))))
    hashes = np.array(pool[:n], dtype=np.int64)
    keys = np.zeros(size, dtype=np.int64)
    pos = place(keys, hashes, shift)
    assert pos.shape == (n,)
    assert len(set(pos.tolist())) == n
    assert (keys[pos] == hashes).all()
    assert int(np.count_nonzero(keys)) == n
    # every key is reachable by probing from its home slot
    shard = make_shard(shift)
    shard._allocate(size)
    shard.keys[:] = keys  # in place: the shard's memoryview sees them
    for h, p in zip(hashes.tolist(), pos.tolist(), strict=True):
        assert shard.find_slot(h) == p
    for h in pool[n:]:
        assert shard.find_slot(h) == -1
    for i in range(size):
        k = int(keys[i])
        if k:
            j = (k >> shift) & (size - 1)
            while j != i:
                assert keys[j] != 0
                j = (j + 1) & (size - 1)


@settings(max_examples=100, deadline=None)
@given(
    expiries=st.lists(st.integers(0, 20), min_size=1, max_size=60),
    now=st.integers(0, 20),
    sweep=st.integers(1, 64),
)
def test_reclaim_frees_only_idle_slots(expiries: list[int], now: int, sweep: int) -> None:
    shard = make_shard(idle=idle_when_expired)
    model = {}
    for j, e in enumerate(expiries, start=1):
        h = key(9, j, 0) if j % 2 else j * 104729
        set_cells(shard, shard.insert(h, -1.0), float(e))  # nothing idle at -1
        model[h] = float(e)
    check_invariants(shard, model, set())
    freed = shard.reclaim(float(now), sweep)
    gone = {h for h in model if shard.find(h) < 0}
    assert len(gone) == freed <= sweep
    assert all(model[h] <= now for h in gone)  # only idle state was forgotten
    for h in gone:
        del model[h]
    check_invariants(shard, model, gone)
    # sweeping until nothing more is freed leaves exactly the live states
    while shard.reclaim(float(now), shard.slots):
        pass
    live = {h: v for h, v in model.items() if v > now}
    check_invariants(shard, live, set(model) - set(live))


def test_full_shard_refuses_new_keys_until_some_are_idle() -> None:
    shard = make_shard(max_count=10, idle=idle_when_expired)
    model = {}
    for j in range(1, 11):
        h = key(2, j, 0)
        set_cells(shard, shard.insert(h, 0.0), 100.0 + j)
        model[h] = 100.0 + j
    assert shard.insert(key(2, 99, 0), 50.0) == -1
    assert shard.insert(12345, 50.0) == -1
    check_invariants(shard, model, {key(2, 99, 0), 12345})
    # at 102.5 two states (expiring at 101 and 102) are idle: exactly two new keys fit
    for h in (12345, 54321):
        i = shard.insert(h, 102.5)
        assert i >= 0
        set_cells(shard, i, 200.0)  # the new clients are active
    assert shard.insert(99999, 102.5) == -1
    assert shard.count == 10
    for j in range(3, 11):
        assert cells(shard, shard.find(key(2, j, 0)))[0] == 100.0 + j


def test_client_table_caps_each_shard() -> None:
    table = ClientTable([WIDTH], [FRESH], never_idle, max_clients=10, shards=4)
    cap = math.ceil(10 / 4)
    assert all(s.max_count == cap for s in table.shards)
    placed = 0
    for h in range(1, 200):
        shard = table.shards[h & table.shard_mask]
        placed += shard.insert(h, 0.0) >= 0
    assert placed == len(table) == 4 * cap
    assert all(s.count == cap for s in table.shards)
    with pytest.raises(ValueError, match="power of two"):
        ClientTable([WIDTH], [FRESH], never_idle, max_clients=10, shards=6)


# -- through the limiter --------------------------------------------------------------------------


class Clock:
    def __init__(self, now: float) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.mark.parametrize(
    "algorithm", ["sliding_log", "token_bucket", "gcra", "fixed_window", "sliding_window"]
)
@pytest.mark.parametrize("shards", [1, 4])
def test_max_clients_reclaims_only_idle_clients(algorithm: str, shards: int) -> None:
    max_clients = 40
    per_shard = math.ceil(max_clients / shards)
    clock = Clock(1_000.0)
    lim = RateLimiter(
        2, 10, algorithm=algorithm, clock=clock, max_clients=max_clients, shards=shards
    )
    # fill every shard with active clients (each took its whole allowance)
    active = []
    n = 0
    while len(active) < shards * per_shard and n < 10_000:
        cid = f"client-{n}"
        n += 1
        d = lim.check(cid, cost=2)
        if d.allowed:
            active.append(cid)
        else:
            assert d.reason == Reason.CAPACITY
            assert d.retry_after > 0
    assert len(lim) == len(active) == shards * per_shard
    # every new client is now refused for capacity; nothing of the active ones is lost
    for k in range(50):
        d = lim.check(f"new-{k}")
        assert not d.allowed and d.reason == Reason.CAPACITY == "capacity"
    assert len(lim) == shards * per_shard
    for cid in active:
        d = lim.check(cid)
        assert not d.allowed and d.reason == Reason.LIMITED, (cid, d)
    # once the active clients are idle (their state limits no request still accepted: two
    # windows for sliding_window, judged at clock - max_request_age), new clients get in
    clock.now += 2 * 10 + DEFAULT_MAX_REQUEST_AGE + 1.0
    admitted = sum(lim.check(f"later-{k}").allowed for k in range(3 * max_clients))
    assert admitted >= max_clients // 2
    assert len(lim) <= shards * per_shard


@pytest.mark.parametrize("skewed", ["future_insert", "late_request"])
def test_reclaim_never_forgets_state_that_still_limits(skewed: str) -> None:
    clock = Clock(9.5)
    lim = RateLimiter(1, 10, clock=clock, shards=1)  # default age 10 s, skew 1 s
    if skewed == "future_insert":
        assert lim.check("B", now=0.0).allowed  # limits B until 10.0
        insert_at, b_at = clock.now + 1.0, clock.now  # within max_clock_skew
    else:
        clock.now = 10.0
        assert lim.check("B", now=0.5).allowed  # limits B until 10.5
        insert_at, b_at = 10.5, 1.0  # within the clock skew; B's 1.0 within max_request_age
        clock.now = 10.5
    # enough other (active) clients that the next insert sweeps for idle ones
    k = 0
    while len(lim) < int(16 * 0.75):
        assert lim.check(f"A{k}").allowed
        k += 1
    assert not lim.peek("B", now=b_at).allowed
    assert lim.check("C", now=insert_at).allowed
    # B already has an admission within (b_at - 10, b_at]: it must still be refused
    assert not lim.check("B", now=b_at).allowed


def test_peek_at_capacity_says_what_check_says() -> None:
    lim = RateLimiter(1, 10, clock=Clock(0.0), max_clients=1, shards=1)
    assert lim.check("x").allowed
    p = lim.peek("y")
    c = lim.check("y")
    assert c.reason == Reason.CAPACITY
    assert p == c
