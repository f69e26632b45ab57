"""The allocation rule: split each client's budget among its servers (vectorised, pure).

Input is one row per (client, server) pair with demand, grouped by client. Each group's budget
is shared in proportion to the pairs' weights, water-filling: a pair never gets more than its
``need``, and what it does not need goes to the others of its group. Grants are whole tokens:
the fractional shares are rounded down and the tokens left over go one each to the pairs with
the largest remainders (never above a pair's need). So for every group:
``sum(grants) <= budget`` and ``sum(grants) = min(floor(budget), sum(need))`` when needs are whole.
"""

from __future__ import annotations

from collections.abc import Callable

import numpy as np


def water_fill(
    group: np.ndarray,
    weight: np.ndarray,
    need: np.ndarray,
    budget: np.ndarray,
    tiebreak: np.ndarray | None = None,
) -> np.ndarray:
    """Whole-token grants per pair.

    ``group[i]`` is pair i's client group (0..G-1), ``weight[i] > 0`` its share weight (demand),
    ``need[i] >= 0`` the most it should get, ``budget[g] >= 0`` the tokens group g may hand out.
    ``tiebreak[i]`` (e.g. the server): among pairs of a group with equal remainders, the lower
    gets a left-over token first (default: the input order), so the result does not depend on
    the order of the rows.
    """
    n = group.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    g_count = budget.size
    need = np.maximum(np.floor(need), 0.0)
    budget = np.maximum(np.floor(budget), 0.0)
    # No sort for the groups whose pairs all get their need (the budget covers it: most
    # clients, most ticks) nor for a group of one pair (a client on one server): min(need,
    # budget).
    alone = np.bincount(group, minlength=g_count)[group] == 1
    alone |= (np.bincount(group, weights=need, minlength=g_count) <= budget)[group]
    if alone.any():
        out = np.empty(n, dtype=np.int64)
        out[alone] = np.minimum(need[alone], budget[group[alone]])
        rest = ~alone
        if rest.any():
            out[rest] = water_fill(
                group[rest],
                weight[rest],
                need[rest],
                budget,
                None if tiebreak is None else tiebreak[rest],
            )
        return out
    # Weights count only relative to their own group: scale each group's to at most 1 so that
    # the running sums below carry no rounding from other groups. Needs and budgets are whole
    # numbers, exact in float64 sums below 2**53.
    w_max = np.zeros(g_count)
    np.maximum.at(w_max, group, weight)
    weight = weight / w_max[group]
    ratio = need / weight
    # sort pairs by group, then by need/weight: within a group the capped pairs form a prefix
    tie = np.arange(n) if tiebreak is None else tiebreak
    order = np.lexsort((tie, ratio, group))
    g = group[order]
    w = weight[order]
    nd = need[order]
    r = ratio[order]
    starts = np.flatnonzero(np.r_[True, g[1:] != g[:-1]])
    first = np.repeat(starts, np.diff(np.r_[starts, n]))  # index of each pair's group start
    need_before = np.cumsum(nd) - nd
    need_before -= need_before[first]
    w_before = np.cumsum(w) - w
    w_before -= w_before[first]
    w_total = np.bincount(g, weights=w, minlength=g_count)
    w_rest = w_total[g] - w_before
    # level if every pair before this one is capped at its need and the rest share by weight
    level = (budget[g] - need_before) / w_rest
    # In exact arithmetic the capped pairs are a prefix of their group; counting them and
    # capping that many first keeps rounding from breaking it.
    capped = r <= level
    n_capped = np.bincount(g, weights=capped, minlength=g_count).astype(np.int64)
    group_start = np.zeros(g_count, dtype=np.int64)
    group_start[g[starts]] = starts
    group_size = np.bincount(g, minlength=g_count)
    boundary = group_start + np.minimum(n_capped, np.maximum(group_size - 1, 0))
    lam = np.where(n_capped < group_size, level[boundary], 0.0)
    pos = np.arange(n) - first
    is_capped = pos < n_capped[g]
    share = np.clip(np.where(is_capped, nd, lam[g] * w), 0.0, nd)
    whole = np.floor(share)
    # largest remainders get the tokens rounding left over
    granted = np.bincount(g, weights=whole, minlength=g_count)
    left = np.minimum(budget, np.bincount(g, weights=nd, minlength=g_count)) - granted
    frac = np.where(whole < nd, share - whole, -1.0)
    by_frac = np.lexsort((tie[order], -frac, g))
    rank = np.empty(n, dtype=np.int64)
    rank[by_frac] = np.arange(n) - first
    bonus = (rank < left[g]) & (frac >= 0.0)  # left <= 0 (rounding) gives no bonus
    whole += bonus
    out = np.empty(n, dtype=np.int64)
    out[order] = whole.astype(np.int64)
    return out


def water_fill_sparse(
    group: np.ndarray,
    weight: np.ndarray,
    need: np.ndarray,
    budget: np.ndarray,
    tiebreak: np.ndarray,
    left_out: Callable[[np.ndarray], tuple[np.ndarray, np.ndarray]],
    left_out_weight: float = 1.0,
) -> np.ndarray:
    """:func:`water_fill` of these rows and of rows left out of them, for these rows only.

    The rows left out all have need 0 and weight ``left_out_weight``: they get 0 tokens, and
    they change the others' grants only in a group whose needs the budget does not cover and
    that has more than one row (the sort). ``left_out(groups)`` (sorted group ids, only called
    if a group's needs are not covered) returns ``(group, tiebreak)`` of the rows left out of
    those groups. The grants are exactly ``water_fill`` of all the rows (its result does not
    depend on the order of the rows when ``tiebreak`` is unique within each group).
    """
    n = group.size
    if n == 0:
        return np.zeros(0, dtype=np.int64)
    g_count = budget.size
    need = np.floor(need)
    np.maximum(need, 0.0, out=need)
    budget = np.floor(budget)
    np.maximum(budget, 0.0, out=budget)
    capped = budget[group]
    np.minimum(capped, need, out=capped)
    # each group whose needs the budget covers (and one-row groups): min(need, budget)
    out: np.ndarray = capped.astype(np.int64)
    short = np.bincount(group, weights=need, minlength=g_count) > budget
    if not short.any():
        return out
    other_group, other_tie = left_out(np.flatnonzero(short))
    count = np.bincount(group, minlength=g_count)
    count += np.bincount(other_group, minlength=g_count)
    sort = short & (count > 1)  # a short group of one row gets min(need, budget) as above
    rows = np.flatnonzero(sort[group])
    if rows.size:
        others = sort[other_group]
        k = int(np.count_nonzero(others))
        # the groups to sort, numbered densely in the same order (water_fill's arrays per
        # group are then as small as they can be)
        groups, dense = np.unique(
            np.concatenate((group[rows], other_group[others])), return_inverse=True
        )
        grants = water_fill(
            dense.reshape(-1),
            np.concatenate((weight[rows], np.full(k, left_out_weight))),
            np.concatenate((need[rows], np.zeros(k))),
            budget[groups],
            np.concatenate((tiebreak[rows], other_tie[others])),
        )
        out[rows] = grants[: rows.size]
    return out
