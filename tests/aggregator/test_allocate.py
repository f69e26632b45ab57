"""``aggregator.allocate.water_fill`` against a plain-Python water-filling reference.

The reference works per group in exact rational arithmetic: pairs sorted by need/weight are
capped at their (whole) need while that is below the water level, the rest share what is left in
proportion to their weights; then the shares are rounded down and the tokens left over go one
each to the largest remainders. Ties in the remainders make the exact rounding ambiguous, so the
implementation is checked against the reference's exact shares (each grant is the share rounded
down or up, the extra tokens go to the largest remainders) rather than token for token.
"""

from __future__ import annotations

import math
from fractions import Fraction

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aggregator.allocate import water_fill

FAST = settings(deadline=None, max_examples=150)
#: float slack of the vectorised implementation when comparing with exact shares (tokens)
EPS = 1e-6


def reference_shares(weights: list[float], needs: list[float], budget: float) -> list[Fraction]:
    """Exact water-filling shares of one group (needs and budget floored to whole tokens)."""
    need = [Fraction(math.floor(max(n, 0.0))) for n in needs]
    w = [Fraction(x) for x in weights]
    left = Fraction(math.floor(max(budget, 0.0)))
    rest_w = sum(w, Fraction(0))
    shares: list[Fraction] = [Fraction(0)] * len(w)
    order = sorted(range(len(w)), key=lambda i: need[i] / w[i])
    for pos, i in enumerate(order):
        level = left / rest_w
        if need[i] <= level * w[i]:
            shares[i] = need[i]
            left -= need[i]
            rest_w -= w[i]
            continue
        for j in order[pos:]:
            shares[j] = level * w[j]
        break
    return shares


def reference_grants(weights: list[float], needs: list[float], budget: float) -> list[int]:
    """Largest-remainder rounding of the reference shares (ties: lowest index first)."""
    shares = reference_shares(weights, needs, budget)
    need = [math.floor(max(n, 0.0)) for n in needs]
    grants = [math.floor(s) for s in shares]
    total = min(math.floor(max(budget, 0.0)), sum(need))
    left = total - sum(grants)
    cands = sorted(
        (i for i in range(len(grants)) if grants[i] < need[i]),
        key=lambda i: (-(shares[i] - grants[i]), i),
    )
    for i in cands[:left]:
        grants[i] += 1
    return grants


def check_group(grants: list[int], weights: list[float], needs: list[float], budget: float) -> None:
    shares = reference_shares(weights, needs, budget)
    need = [math.floor(max(n, 0.0)) for n in needs]
    total = min(math.floor(max(budget, 0.0)), sum(need))
    assert sum(grants) == total, (grants, total)
    level = None
    for i, g in enumerate(grants):
        assert 0 <= g <= need[i], (i, g, need[i])
        # each grant is its exact share rounded down or up
        assert shares[i] - 1 - EPS < g < shares[i] + 1 + EPS, (i, g, float(shares[i]))
        if shares[i] < need[i]:
            level = shares[i] / Fraction(weights[i])
    if level is not None:
        for i, g in enumerate(grants):
            # a pair whose need is below the fair level gets exactly its need
            if need[i] < level * Fraction(weights[i]) - 1:
                assert g == need[i], (i, g, need[i])
            # uncapped pairs: in proportion to weight, within one token
            if shares[i] < need[i]:
                assert abs(g - level * Fraction(weights[i])) < 1 + EPS
    # largest remainders: a pair rounded up never had a clearly smaller remainder than one
    # rounded down that still had room
    up = [i for i, g in enumerate(grants) if g > math.floor(shares[i] + EPS)]
    down = [
        i
        for i, g in enumerate(grants)
        if g == math.floor(shares[i] + EPS) and g < need[i] and shares[i] - g > EPS
    ]
    for i in up:
        for j in down:
            assert shares[i] - math.floor(shares[i]) >= shares[j] - math.floor(shares[j]) - EPS


def run(groups: list[list[tuple[float, float]]], budgets: list[float]) -> list[list[int]]:
    group = np.array([g for g, pairs in enumerate(groups) for _ in pairs], dtype=np.int64)
    weight = np.array([w for pairs in groups for w, _ in pairs], dtype=np.float64)
    need = np.array([n for pairs in groups for _, n in pairs], dtype=np.float64)
    out = water_fill(group, weight, need, np.array(budgets, dtype=np.float64))
    assert out.dtype.kind == "i" and out.shape == group.shape
    res, k = [], 0
    for pairs in groups:
        res.append(out[k : k + len(pairs)].tolist())
        k += len(pairs)
    return res


def test_reference_itself() -> None:
    # equal weights, budget 10 over needs 2, 100, 100: 2 capped, the rest 4 and 4
    assert reference_shares([1, 1, 1], [2, 100, 100], 10) == [2, 4, 4]
    assert reference_grants([1, 1, 1], [2, 100, 100], 10) == [2, 4, 4]
    assert reference_grants([1, 1, 1], [100, 100, 100], 10) == [4, 3, 3]
    assert reference_grants([1, 3], [100, 100], 10) == [3, 7]  # 2.5 / 7.5 -> tie, lowest first
    assert reference_grants([1, 1], [1.9, 0.5], 10) == [1, 0]


# -- examples ------------------------------------------------------------------------------------


def test_empty_input() -> None:
    out = water_fill(
        np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), np.zeros(0, dtype=np.float64)
    )
    assert out.size == 0 and out.dtype.kind == "i"
    out = water_fill(np.zeros(0, dtype=np.int64), np.zeros(0), np.zeros(0), np.array([5.0]))
    assert out.size == 0


def test_zero_budget_grants_nothing() -> None:
    assert run([[(1.0, 5.0), (2.0, 7.0)], [(1.0, 3.0)]], [0.0, 0.0]) == [[0, 0], [0]]
    assert run([[(1.0, 5.0), (2.0, 7.0)]], [0.99]) == [[0, 0]]


def test_budget_below_one_token_per_pair() -> None:
    got = run([[(1.0, 5.0), (1.0, 5.0), (1.0, 5.0)]], [2.0])
    assert sum(got[0]) == 2 and max(got[0]) == 1


def test_small_need_is_filled_and_the_rest_split_by_weight() -> None:
    got = run([[(1.0, 2.0), (1.0, 100.0), (3.0, 100.0)]], [42.0])
    assert got == [[2, 10, 30]]


def test_everyone_satisfied_when_budget_is_ample() -> None:
    assert run([[(1.0, 5.5), (9.0, 7.0), (0.1, 0.0)]], [1000.0]) == [[5, 7, 0]]


def test_groups_are_independent() -> None:
    got = run([[(1.0, 50.0), (1.0, 50.0)], [(1.0, 50.0)], [(5.0, 1.0), (1.0, 100.0)]], [10, 7, 9])
    assert got == [[5, 5], [7], [1, 8]]


def test_group_ids_need_not_be_sorted_or_dense() -> None:
    group = np.array([2, 0, 2, 0, 2], dtype=np.int64)
    weight = np.array([1.0, 1.0, 2.0, 3.0, 1.0])
    need = np.array([100.0, 100.0, 100.0, 100.0, 1.0])
    budget = np.array([8.0, 0.0, 9.0, 4.0])  # group 1 has no pairs, group 3 none either
    out = water_fill(group, weight, need, budget).tolist()
    assert out[4] == 1 and out[0] + out[2] == 8 and out[2] in (5, 6)
    assert out[1] + out[3] == 8 and out[1] == 2 and out[3] == 6


def test_huge_values_stay_exact_enough() -> None:
    got = run([[(1.0, 3e9), (1.0, 3e9), (2.0, 1e6)]], [4e9])
    assert got == [[1_999_500_000, 1_999_500_000, 1_000_000]]


# -- against the reference, hypothesis -----------------------------------------------------------

weights = st.one_of(
    st.floats(min_value=0.01, max_value=1000.0),
    st.integers(1, 50).map(float),
    st.integers(0, 300).map(lambda d: d / 3 + 1.0),  # what PartitionState passes: per_tick + 1
)
needs = st.one_of(
    st.integers(0, 400).map(float),
    st.floats(min_value=0.0, max_value=5000.0),
    st.just(0.0),
)
budgets = st.one_of(
    st.integers(0, 1000).map(float),
    st.floats(min_value=0.0, max_value=20000.0),
    st.just(0.0),
)
pairs = st.lists(st.tuples(weights, needs), min_size=0, max_size=9)


@FAST
@given(st.lists(st.tuples(pairs, budgets), min_size=1, max_size=8))
def test_many_groups_match_the_reference(
    spec: list[tuple[list[tuple[float, float]], float]],
) -> None:
    groups = [p for p, _ in spec]
    got = run(groups, [b for _, b in spec])
    for grants, (ps, budget) in zip(got, spec, strict=True):
        check_group(grants, [w for w, _ in ps], [n for _, n in ps], budget)


@FAST
@given(
    st.lists(st.tuples(st.integers(1, 20).map(float), st.integers(0, 60).map(float)), max_size=7),
    st.integers(0, 200).map(float),
)
def test_whole_numbers_without_ties_match_the_reference_exactly(
    ps: list[tuple[float, float]], budget: float
) -> None:
    ws = [w for w, _ in ps]
    ns = [n for _, n in ps]
    want = reference_grants(ws, ns, budget)
    shares = reference_shares(ws, ns, budget)
    fracs = [s - math.floor(s) for s, n in zip(shares, ns, strict=True) if s < n]
    got = run([ps], [budget])[0]
    if len(set(fracs)) == len(fracs):  # no tie among remainders: rounding is unambiguous
        assert got == want
    else:
        check_group(got, ws, ns, budget)


@FAST
@given(st.lists(st.tuples(weights, needs), min_size=1, max_size=9), budgets, st.randoms())
def test_order_of_pairs_does_not_matter(
    ps: list[tuple[float, float]], budget: float, rnd: object
) -> None:
    got = run([ps], [budget])[0]
    perm = list(range(len(ps)))
    rnd.shuffle(perm)  # type: ignore[attr-defined]
    shuffled = run([[ps[i] for i in perm]], [budget])[0]
    back = [0] * len(ps)
    for k, i in enumerate(perm):
        back[i] = shuffled[k]
    # the same up to how ties in the remainders are broken
    assert sum(back) == sum(got)
    assert all(abs(a - b) <= 1 for a, b in zip(back, got, strict=True))
    check_group(back, [w for w, _ in ps], [n for _, n in ps], budget)


@pytest.mark.parametrize("n", [1, 2, 3, 7, 64])
def test_equal_pairs_split_evenly(n: int) -> None:
    got = run([[(1.0, 1000.0)] * n], [100.0])[0]
    assert sum(got) == 100 and max(got) - min(got) <= 1


# -- numerical robustness ------------------------------------------------------------------------


def test_one_group_is_not_disturbed_by_a_huge_weight_in_another() -> None:
    ps = [(3.0, 77.0), (3.0, 92.0), (1.0, 67.0), (1.0, 94.0)]
    check_group(run([ps], [262.0])[0], [w for w, _ in ps], [n for _, n in ps], 262.0)  # alone: ok
    got = run([[(1.3e16, 0.0)], ps], [0.0, 262.0])
    # after a group with a huge weight (weights were once summed across groups, which gave
    # [77, 92, 67, 94]: 330 tokens of a 262 budget)
    check_group(got[1], [w for w, _ in ps], [n for _, n in ps], 262.0)


def test_weights_far_apart_still_sum_to_the_budget() -> None:
    got = run(
        [[(1.01, 0.0)], [(48577.0, 0.0), (999999.0690212193, 0.0), (1e-06, 4160.0)]],
        [0.0, 4160.0],
    )
    assert got[1] == [0, 0, 4160]  # cross-group rounding once gave [0, 0, 4159]


@settings(deadline=None, max_examples=200)
@given(
    st.lists(
        st.tuples(st.integers(0, 3), st.integers(1, 4), st.integers(0, 9)), min_size=1, max_size=12
    ),
    st.lists(st.integers(0, 20), min_size=4, max_size=4),
    st.randoms(use_true_random=False),
)
def test_with_a_tiebreak_the_rows_order_does_not_matter(
    rows: list[tuple[int, int, int]], budget: list[int], rnd: object
) -> None:
    """Equal weights and needs make ties; with ``tiebreak`` (unique per group) the same pairs in
    any order get the same grants (compaction reorders pairs: it must not change grants)."""
    group = np.array([g for g, _, _ in rows])
    weight = np.array([float(w) for _, w, _ in rows])
    need = np.array([float(n) for _, _, n in rows])
    tie = np.arange(len(rows))  # e.g. the server: unique within a group
    perm = np.arange(len(rows))
    rnd.shuffle(perm)  # type: ignore[attr-defined]
    b = np.array([float(x) for x in budget])
    first = water_fill(group, weight, need, b, tie)
    second = water_fill(group[perm], weight[perm], need[perm], b, tie[perm])
    assert second.tolist() == first[perm].tolist()
