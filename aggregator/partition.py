"""One usage partition's global state and its allocation tick.

Accounting, per client with limit L over window W (docs/consistency.md has the proof):

- ``window``: every admission a server reports (from its lease or outside it) is charged at the
  end of its report's interval on the aggregator's clock (an upper bound: see
  :class:`aggregator.service.Aggregator`), never before the admission happened;
- ``outstanding``: per (client, server) pair, the tokens granted that the server has not yet
  reported as admitted or released. A token is either unspent (in a lease), spent but not yet
  reported, or reported: so ``window + outstanding`` always covers what a client's leases
  admitted in the last W seconds;
- at a tick, ``budget = L - window - outstanding`` is split among the servers that showed demand
  in the last ``keepalive`` ticks, in proportion to their demand per tick over the last
  ``memory`` ticks, each capped at ``NEED_TICKS`` ticks of that demand plus ``NEED_FLOOR``
  tokens, minus what it holds
  (:func:`aggregator.allocate.water_fill`).

Hence, between ticks, lease admissions in any window of length W never exceed L; admissions
outside leases (cold start, degraded) are the only excess, and they are bounded by their rules.
"""

from __future__ import annotations

import collections
from collections.abc import Callable, Sequence

import numpy as np

from .allocate import water_fill_sparse
from .keyindex import KeyIndex
from .window import ChargeRing

#: A pair is granted up to NEED_TICKS ticks of its recent demand plus NEED_FLOOR tokens (minus
#: what it holds): enough to last until the next grant after its report, with room for bursts.
NEED_TICKS = 3.0
NEED_FLOOR = 2.0
#: Most servers one aggregator tracks; pair ids are ``client slot * MAX_SERVERS + server + 1``.
MAX_SERVERS = 1 << 16
#: A pair's server index (below MAX_SERVERS): 2 bytes per pair, and a tick's servers sort by
#: radix (``np.argsort(kind="stable")``) when its grants are split per server.
SERVER_DTYPE = np.uint16

_EMPTY_I = np.zeros(0, dtype=np.int64)
_NEVER = -(1 << 62)
_EMPTY_F = np.zeros(0)
_EMPTY_S = np.zeros(0, dtype=SERVER_DTYPE)


def _grow(a: np.ndarray, n: int) -> np.ndarray:
    if n <= a.size:
        return a
    out = np.zeros(max(n, 2 * a.size), dtype=a.dtype)
    out[: a.size] = a
    return out


def _groups(of: np.ndarray, n: int) -> tuple[np.ndarray, np.ndarray]:
    """``np.unique(of, return_inverse=True)`` for ``of`` in ``[0, n)``: without a sort when
    ``of`` is not much smaller than ``n`` (a mark per value and a running count)."""
    if 8 * of.size < n:
        values, inverse = np.unique(of, return_inverse=True)
        return values, inverse.reshape(-1)
    mark = np.zeros(n, dtype=bool)
    mark[of] = True
    index = np.cumsum(mark) - 1
    return np.flatnonzero(mark), index[of]


class PartitionState:
    """Windowed use, outstanding leases and recent demand of one usage partition's clients."""

    def __init__(
        self,
        limit: int,
        window: float,
        bucket: float,
        memory: int = 2,
        keepalive: int | None = None,
        limit_of: Callable[[np.ndarray], np.ndarray] | None = None,
    ) -> None:
        """``memory``: ticks of demand the rate per tick is averaged over; ``keepalive`` (at least
        ``memory``): ticks after a pair's last demand that it still gets grants (a small lease
        keeps a sparse client's requests off the cold-start path). ``limit_of(keys)``: each
        client's own limit (default: ``limit`` for all)."""
        self.limit = limit
        self.limit_of = limit_of
        self.limits = np.zeros(1024)  # client slot -> its limit
        self.window = window
        self.clients = KeyIndex()
        self.ring = ChargeRing(window, 0.0, bucket)
        self.held = np.zeros(1024)  # client slot -> outstanding tokens over all its servers
        self.last_active = np.zeros(1024)  # client slot -> last report time
        self.pairs = KeyIndex()
        self.pair_client = np.zeros(1024, dtype=np.int64)
        self.pair_server = np.zeros(1024, dtype=SERVER_DTYPE)
        self.outstanding = np.zeros(1024)  # pair slot -> tokens granted, not yet reported
        #: pair slot -> tokens wanted over the ticks in ``_history`` (kept as they come and go)
        self.wanted = np.zeros(1024)
        self.seen = np.full(1024, _NEVER, dtype=np.int64)  # pair slot -> tick of last demand
        self.keepalive = max(memory, keepalive or memory)
        self._ticks = 0
        #: (pairs, tokens) wanted since the last tick, one entry per batch with demand; each
        #: batch's pairs are distinct, and so is the whole list unless ``_demand_repeats``
        self._demand: list[tuple[np.ndarray, np.ndarray]] = []
        self._demand_repeats = False
        #: client slot / pair slot -> scratch (any value): duplicates in a batch, without a sort
        self._scratch = np.zeros(1024, dtype=np.int32)
        self._pair_scratch = np.zeros(1024, dtype=np.int32)
        #: (pairs, tokens) wanted in each of the last ``memory`` ticks, newest last
        self._history: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque(
            maxlen=max(1, memory)
        )

    def __len__(self) -> int:
        return len(self.clients)

    def _pair_slots(self, clients: np.ndarray, server: np.ndarray | int) -> np.ndarray:
        ids = clients * MAX_SERVERS
        ids += server + 1
        ids = ids.view(np.uint64)  # non-negative int64: the same values
        before = len(self.pairs)
        slots = self.pairs.lookup_or_insert(ids)
        n = len(self.pairs)
        if n > before:
            self.pair_client = _grow(self.pair_client, n)
            self.pair_server = _grow(self.pair_server, n)
            self.outstanding = _grow(self.outstanding, n)
            self.wanted = _grow(self.wanted, n)
            self._pair_scratch = _grow(self._pair_scratch, n)
            if n > self.seen.size:
                seen = np.full(max(n, 2 * self.seen.size), _NEVER, dtype=np.int64)
                seen[: self.seen.size] = self.seen
                self.seen = seen
            new = np.arange(before, n)
            raw = self.pairs.slot_keys[new].astype(np.int64) - 1
            self.pair_client[new] = raw // MAX_SERVERS
            self.pair_server[new] = raw % MAX_SERVERS
        return slots

    def _rows(self, keys: np.ndarray, now: float) -> np.ndarray:
        """The client slots of ``keys`` (new ones added), the ring advanced to ``now``."""
        self.ring.advance(now)
        before = len(self.clients)
        clients = self.clients.lookup_or_insert(keys)
        n = len(self.clients)
        if n > before:
            self.ring.ensure_rows(n)
            self.held = _grow(self.held, n)
            self.last_active = _grow(self.last_active, n)
            self.limits = _grow(self.limits, n)
            self.limits[before:n] = self._limits_of(self.clients.slot_keys[before:n])
            if n > self._scratch.size:
                self._scratch = np.zeros(max(n, 2 * self._scratch.size), dtype=np.int32)
        return clients

    @staticmethod
    def _distinct(slots: np.ndarray, scratch: np.ndarray) -> bool:
        """Whether no slot repeats in ``slots``: each writes its position at its slot of a
        scratch array (one entry per slot) and reads it back (a repeated slot keeps only its
        last position)."""
        if slots.size < 2:
            return True
        at = np.arange(slots.size, dtype=np.int32)  # a poll holds far fewer than 2**31 records
        scratch[slots] = at
        return bool((scratch[slots] == at).all())

    def _limits_of(self, keys: np.ndarray) -> np.ndarray:
        if self.limit_of is None:
            return np.full(keys.size, float(self.limit))
        return self.limit_of(keys)

    def relimit(self) -> None:
        """Look every client's limit up again (the configuration changed)."""
        n = len(self.clients)
        self.limits[:n] = self._limits_of(self.clients.slot_keys[:n])

    def history(self, now: float, width: float) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """The window as ``(keys, ages, tokens)``: each client's charges summed into age slots of
        ``width`` seconds; a charge of age ``a`` (seconds before ``now``, by its bucket's end)
        goes to the slot ``floor(a / width)``, whose age is ``slot * width <= a``: charged back
        at ``now - slot * width``, it counts at least as long as it did here (conservative)."""
        ring = self.ring
        n = len(self.clients)
        if ring.current is None or n == 0:
            return np.zeros(0, dtype=np.uint64), _EMPTY_F, _EMPTY_F
        ring.advance(now)
        keys, ages, tokens = [], [], []
        for j in range(ring.current - ring.back, ring.current + ring.ahead + 1):
            age = max(0.0, now - (j + 1) * ring.bucket)
            if age >= self.window:
                continue
            column = ring.charges[j % ring.k, :n]
            rows = np.flatnonzero(column)
            if rows.size:
                keys.append(self.clients.slot_keys[rows])
                ages.append(np.full(rows.size, np.floor(age / width) * width))
                tokens.append(column[rows])
        if not keys:
            return np.zeros(0, dtype=np.uint64), _EMPTY_F, _EMPTY_F
        return np.concatenate(keys), np.concatenate(ages), np.concatenate(tokens)

    def restore(self, keys: np.ndarray, ages: np.ndarray, tokens: np.ndarray, now: float) -> None:
        """Charge ``tokens`` of each of ``keys`` at ``now - ages`` (a checkpoint's window)."""
        if keys.size == 0:
            return
        clients = self._rows(keys, now)
        for age in np.unique(ages):
            sel = ages == age
            self.ring.charge(clients[sel], tokens[sel], now - float(age))
        np.maximum.at(self.last_active, clients, now - ages)

    def apply(
        self,
        records: np.ndarray,
        server: int,
        now: float,
        admitted_by: float | None = None,
        *,
        replay: bool = False,
    ) -> None:
        """Fold one usage batch's records (``producer.wire.USAGE_RECORD``) in at ``now``.

        ``admitted_by`` (<= now) is a time no admission of the batch can be later than (its
        interval's end on the aggregator's clock); admissions are charged then (default: now).
        ``replay``: a batch from before this state existed (a rebuild): charged to the window
        only, neither demand nor a return of outstanding tokens.
        """
        at = now if admitted_by is None else admitted_by
        self.apply_many([(records, server, at)], now, replay=replay)

    def apply_many(
        self,
        batches: Sequence[tuple[np.ndarray, int, float]],
        now: float,
        *,
        replay: bool = False,
    ) -> None:
        """Fold usage batches ``(records, server, admitted_by)`` in at ``now``, as
        :meth:`apply` one after the other would: one pass over all their records, so that
        many small batches (one per server and report interval) cost about one large one."""
        batches = [b for b in batches if b[0].size]
        if not batches:
            return
        sizes = [b[0].size for b in batches]
        servers: np.ndarray | int
        at: np.ndarray | float
        if len(batches) == 1:
            records, servers, at = batches[0]
        else:
            records = np.concatenate([b[0] for b in batches])
            servers = np.repeat(np.array([b[1] for b in batches], dtype=np.int64), sizes)
            at = np.repeat(np.array([b[2] for b in batches]), sizes)
        clients = self._rows(records["key"], now)
        # usually one record per key and server (an agent drains one per client): plain fancy
        # indexing; a key split over several records (large counts, merged retries, two
        # batches of one server) takes the general path
        distinct = self._distinct(clients, self._scratch)
        admitted = records["admitted"].astype(np.float64)
        charged = admitted + records["extra"]
        self._charge(batches, sizes, clients, charged, distinct)
        if replay:  # history: the window only, and when its clients were last active
            if distinct:
                self.last_active[clients] = np.maximum(self.last_active[clients], at)
            else:
                np.maximum.at(self.last_active, clients, at)
            return
        pairs = self._pair_slots(clients, servers)
        returned = admitted + records["released"]
        demand = charged + records["rejected"]
        if not (distinct or self._distinct(pairs, self._pair_scratch)):
            # one row per pair: sums over the records of each key
            pairs, inverse = np.unique(pairs, return_inverse=True)
            inverse = inverse.reshape(-1)
            returned = np.bincount(inverse, weights=returned, minlength=pairs.size)
            demand = np.bincount(inverse, weights=demand, minlength=pairs.size)
        # reported tokens leave the outstanding count (never below zero: a lost grant or a
        # previous owner's lease must not make room that is not there)
        out = self.outstanding[pairs]
        back = np.minimum(out, returned)
        self.outstanding[pairs] = out - back
        if distinct:
            self.held[clients] -= back
        else:
            np.subtract.at(self.held, self.pair_client[pairs], back)
        wanted = demand > 0  # a report of released tokens only is no demand
        if not wanted.all():
            pairs, demand = pairs[wanted], demand[wanted]
        if pairs.size:
            # a pair already in this tick's demand (a second batch of the server's) makes the
            # tick merge the batches' rows
            if not self._demand_repeats:
                self._demand_repeats = bool((self.seen[pairs] == self._ticks).any())
            self._demand.append((pairs, demand))
            self.seen[pairs] = self._ticks
        self.last_active[clients] = now

    def _charge(
        self,
        batches: Sequence[tuple[np.ndarray, int, float]],
        sizes: Sequence[int],
        clients: np.ndarray,
        amounts: np.ndarray,
        distinct: bool,
    ) -> None:
        """Charge each batch's records (``sizes`` of them) at its ``admitted_by``: one ring
        column at a time."""
        ats = [b[2] for b in batches]
        columns = [self.ring.column(at) for at in ats]
        if len(set(columns)) == 1:
            self.ring.charge(clients, amounts, ats[0], distinct=distinct)
            return
        of_record = np.repeat(np.array([-1 if c is None else c for c in columns]), sizes)
        for column, at in dict(zip(columns, ats, strict=True)).items():
            if column is not None:
                rows = of_record == column
                self.ring.charge(clients[rows], amounts[rows], at, distinct=distinct)

    def _take_demand(self) -> tuple[np.ndarray, np.ndarray]:
        """This tick's demand, one row per pair (in no particular order), and none left."""
        demand, repeats = self._demand, self._demand_repeats
        self._demand, self._demand_repeats = [], False
        if not demand:
            return _EMPTY_I, _EMPTY_F
        if len(demand) == 1:
            return demand[0]
        pairs = np.concatenate([p for p, _ in demand])
        amounts = np.concatenate([a for _, a in demand])
        if repeats:
            pairs, inverse = _groups(pairs, len(self.pairs))
            amounts = np.bincount(inverse, weights=amounts, minlength=pairs.size)
        return pairs, amounts

    def tick(self, now: float, *, grant: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Allocate: ``(keys, servers, tokens)`` for every (client, server) pair with demand
        (uint64, ``SERVER_DTYPE`` and int64 arrays, in the order of the pairs' slots).

        A pair may get 0 tokens: its lease then stays as it is (empty means "limited").
        ``grant=False`` (a partition being rebuilt) keeps the demand history and grants nothing.
        """
        self.ring.advance(now)
        cur_pairs, cur_amounts = self._take_demand()
        history = self._history
        if len(history) == history.maxlen:  # the oldest tick leaves the average
            old_pairs, old_amounts = history.popleft()
            self.wanted[old_pairs] -= old_amounts  # unique pairs: no duplicate indices
        history.append((cur_pairs, cur_amounts))
        self.wanted[cur_pairs] += cur_amounts
        # pairs still kept alive: demand within `keepalive` ticks (a superset of the history's)
        m = len(self.pairs)
        alive = self.seen[:m] > self._ticks - self.keepalive
        self._ticks += 1
        if not grant or not alive.any():
            return np.zeros(0, dtype=np.uint64), _EMPTY_S, _EMPTY_I
        # A pair kept alive without demand in the history (per tick 0) that holds NEED_FLOOR
        # tokens or more needs nothing: it gets 0 tokens whatever its client's budget, and
        # only matters to the allocation of a client whose needs the budget does not cover
        # (water_fill_sparse fetches it then). Most kept-alive pairs are idle: the work is
        # done for the others only.
        idle = self.wanted[:m] == 0.0
        idle &= self.outstanding[:m] >= NEED_FLOOR
        idle &= alive
        pairs = np.flatnonzero(alive ^ idle)  # alive and not idle
        # whole tokens: the running sums are exact
        per_tick = self.wanted[pairs] / len(history)
        client = self.pair_client[pairs]  # the allocation's group of a pair: its client slot
        # every client's budget max(0, limit - used - held) (a pass over the clients costs less
        # than picking those of the pairs out); need = max(0, ceil(NEED_TICKS * per_tick) +
        # NEED_FLOOR - outstanding); in place
        n = len(self.clients)
        budget = self.limits[:n] - self.ring.used(slice(0, n), now)
        budget -= self.held[:n]
        np.maximum(budget, 0.0, out=budget)
        need = NEED_TICKS * per_tick
        np.ceil(need, out=need)
        need += NEED_FLOOR
        need -= self.outstanding[pairs]
        np.maximum(need, 0.0, out=need)

        def idle_of(clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            mark = np.zeros(n, dtype=bool)
            mark[clients] = True
            them = np.flatnonzero(idle & mark[self.pair_client[:m]])
            return self.pair_client[them], self.pair_server[them]

        tokens = water_fill_sparse(
            client, per_tick + 1.0, need, budget, self.pair_server[pairs], idle_of
        )
        granted = tokens > 0
        got = np.flatnonzero(granted)  # few rows: indices, not a mask, to pick them
        more = tokens[got].astype(np.float64)
        self.outstanding[pairs[got]] += more
        np.add.at(self.held, client[got], more)  # whole tokens: exact in any order
        # Every pair with recent demand hears from us each tick (an empty grant still says
        # "limited" and keeps its lease alive); a pair only kept alive hears when it gets tokens,
        # and otherwise every memory/2 ticks (staggered), often enough to keep its lease alive:
        # the pairs p with (p + ticks) % (memory/2) == 0, every (memory/2)-th from `first`.
        every = max(1, (self._history.maxlen or 1) // 2)
        first = -self._ticks % every
        refresh = np.zeros(m, dtype=bool)
        refresh[first::every] = True
        send = granted | (per_tick > 0) | refresh[pairs]
        if not idle[first::every].any():  # no idle pair's refresh: the rows are these pairs'
            sent, out = (pairs, tokens) if send.all() else (pairs[send], tokens[send])
        else:
            mine = np.zeros(m, dtype=bool)  # pairs allocated here that get a row
            mine[pairs[send]] = True
            rows = mine.copy()
            rows[first::every] |= idle[first::every]  # an idle pair: a row of 0 tokens
            sent = np.flatnonzero(rows)
            out = np.zeros(sent.size, dtype=np.int64)
            out[np.flatnonzero(mine[sent])] = tokens[send]  # both in pair order
        return self.clients.slot_keys[self.pair_client[sent]], self.pair_server[sent], out

    def forget_server(self, server: int) -> float:
        """A server is gone: its leases have expired; returns the tokens freed."""
        n = len(self.pairs)
        rows = np.flatnonzero((self.pair_server[:n] == server) & (self.outstanding[:n] > 0))
        freed = float(self.outstanding[rows].sum())
        np.subtract.at(self.held, self.pair_client[rows], self.outstanding[rows])
        self.outstanding[rows] = 0.0
        return freed

    def compact(self, now: float) -> int:
        """Forget clients with nothing in the window, nothing outstanding and no report for a
        window, and pairs with nothing outstanding and no recent demand. Returns clients left."""
        n, m = len(self.clients), len(self.pairs)
        keep = (
            (self.ring.total[:n] > 0)
            | (self.held[:n] > 0)
            | (self.last_active[:n] > now - self.window)
        )
        recent = self.seen[:m] > self._ticks - self.keepalive
        for p, _ in (*self._history, *self._demand):
            recent[p] = True
        keep_pairs = keep[self.pair_client[:m]] & ((self.outstanding[:m] > 0) | recent)
        if keep.all() and keep_pairs.all():
            return n
        old = self.clients.compact(keep)
        self.ring.keep_rows(old)
        self.held = _grow(self.held[old], 1024)
        self.last_active = _grow(self.last_active[old], 1024)
        self.limits = _grow(self.limits[old], 1024)
        client_map = np.full(n, -1, dtype=np.int64)
        client_map[old] = np.arange(old.size)
        old_pairs = np.flatnonzero(keep_pairs)
        pair_map = np.full(m, -1, dtype=np.int64)
        pair_map[old_pairs] = np.arange(old_pairs.size)
        self.pair_client = _grow(client_map[self.pair_client[old_pairs]], 1024)
        self.pair_server = _grow(self.pair_server[old_pairs], 1024)
        self.outstanding = _grow(self.outstanding[old_pairs], 1024)
        self.wanted = _grow(self.wanted[old_pairs], 1024)
        seen = np.full(max(1024, 2 * old_pairs.size), _NEVER, dtype=np.int64)
        seen[: old_pairs.size] = self.seen[old_pairs]
        self.seen = seen
        k = old_pairs.size
        self.pairs = KeyIndex.of_distinct(
            (self.pair_client[:k] * MAX_SERVERS + self.pair_server[:k] + 1).view(np.uint64)
        )

        def remap(p: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            kept = pair_map[p] >= 0
            return pair_map[p][kept], a[kept]

        history = [remap(p, a) for p, a in self._history]
        self._history.clear()
        self._history.extend(history)
        self._demand = [remap(p, a) for p, a in self._demand]
        return len(self.clients)
