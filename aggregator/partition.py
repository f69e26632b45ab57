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
from collections.abc import Callable

import numpy as np

from .allocate import water_fill
from .keyindex import KeyIndex
from .window import ChargeRing

#: A pair is granted up to NEED_TICKS ticks of its recent demand plus NEED_FLOOR tokens (minus
#: what it holds): enough to last until the next grant after its report, with room for bursts.
NEED_TICKS = 3.0
NEED_FLOOR = 2.0
#: Most servers one aggregator tracks; pair ids are ``client slot * MAX_SERVERS + server + 1``.
MAX_SERVERS = 1 << 16

_EMPTY_I = np.zeros(0, dtype=np.int64)
_NEVER = -(1 << 62)
_EMPTY_F = np.zeros(0)


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
        self.pair_server = np.zeros(1024, dtype=np.int64)
        self.outstanding = np.zeros(1024)  # pair slot -> tokens granted, not yet reported
        #: pair slot -> tokens wanted over the ticks in ``_history`` (kept as they come and go)
        self.wanted = np.zeros(1024)
        self.seen = np.full(1024, _NEVER, dtype=np.int64)  # pair slot -> tick of last demand
        self.keepalive = max(memory, keepalive or memory)
        self._ticks = 0
        self._demand: list[tuple[np.ndarray, np.ndarray]] = []
        #: (pairs, tokens) wanted in each of the last ``memory`` ticks, newest last
        self._history: collections.deque[tuple[np.ndarray, np.ndarray]] = collections.deque(
            maxlen=max(1, memory)
        )

    def __len__(self) -> int:
        return len(self.clients)

    def _pair_slots(self, clients: np.ndarray, server: np.ndarray | int) -> np.ndarray:
        ids = (clients * MAX_SERVERS + server + 1).astype(np.uint64)
        before = len(self.pairs)
        slots = self.pairs.lookup_or_insert(ids)
        n = len(self.pairs)
        if n > before:
            self.pair_client = _grow(self.pair_client, n)
            self.pair_server = _grow(self.pair_server, n)
            self.outstanding = _grow(self.outstanding, n)
            self.wanted = _grow(self.wanted, n)
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
        return clients

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
        if records.size == 0:
            return
        clients = self._rows(records["key"], now)
        admitted = records["admitted"].astype(np.float64)
        extra = records["extra"].astype(np.float64)
        at = now if admitted_by is None else admitted_by
        self.ring.charge(clients, admitted + extra, at)
        if replay:
            np.maximum.at(self.last_active, clients, at)
            return
        pairs = self._pair_slots(clients, server)
        # one row per pair: a key may come in several records (split counts, merged retries)
        pairs, inverse = np.unique(pairs, return_inverse=True)
        inverse = inverse.reshape(-1)
        size = pairs.size

        def per_pair(values: np.ndarray) -> np.ndarray:
            return np.bincount(inverse, weights=values, minlength=size)

        returned = per_pair(admitted + records["released"])
        demand = per_pair(admitted + extra + records["rejected"])
        # reported tokens leave the outstanding count (never below zero: a lost grant or a
        # previous owner's lease must not make room that is not there)
        back = np.minimum(self.outstanding[pairs], returned)
        self.outstanding[pairs] -= back
        np.subtract.at(self.held, self.pair_client[pairs], back)
        wanted = demand > 0  # a report of released tokens only is no demand
        if wanted.any():
            self._demand.append((pairs[wanted], demand[wanted]))
            self.seen[pairs[wanted]] = self._ticks
        self.last_active[clients] = now

    def tick(self, now: float, *, grant: bool = True) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Allocate: ``(keys, servers, tokens)`` for every (client, server) pair with demand.

        A pair may get 0 tokens: its lease then stays as it is (empty means "limited").
        ``grant=False`` (a partition being rebuilt) keeps the demand history and grants nothing.
        """
        self.ring.advance(now)
        if self._demand:
            cur_pairs = np.concatenate([p for p, _ in self._demand])
            cur_amounts = np.concatenate([a for _, a in self._demand])
            self._demand.clear()
            cur_pairs, inverse = np.unique(cur_pairs, return_inverse=True)
            cur_amounts = np.bincount(
                inverse.reshape(-1), weights=cur_amounts, minlength=cur_pairs.size
            )
        else:
            cur_pairs, cur_amounts = _EMPTY_I, _EMPTY_F
        history = self._history
        if len(history) == history.maxlen:  # the oldest tick leaves the average
            old_pairs, old_amounts = history.popleft()
            self.wanted[old_pairs] -= old_amounts  # unique pairs: no duplicate indices
        history.append((cur_pairs, cur_amounts))
        self.wanted[cur_pairs] += cur_amounts
        # pairs still kept alive: demand within `keepalive` ticks (a superset of the history's)
        m = len(self.pairs)
        pairs = np.flatnonzero(self.seen[:m] > self._ticks - self.keepalive)
        self._ticks += 1
        if pairs.size == 0 or not grant:
            return np.zeros(0, dtype=np.uint64), _EMPTY_I, _EMPTY_I
        # whole tokens: the running sums are exact
        per_tick = self.wanted[pairs] / len(history)
        clients, group = _groups(self.pair_client[pairs], len(self.clients))
        budget = np.maximum(
            0.0, self.limits[clients] - self.ring.used(clients, now) - self.held[clients]
        )
        need = np.maximum(
            0.0, np.ceil(NEED_TICKS * per_tick) + NEED_FLOOR - self.outstanding[pairs]
        )
        tokens = water_fill(group, per_tick + 1.0, need, budget, self.pair_server[pairs])
        self.outstanding[pairs] += tokens
        self.held[clients] += np.bincount(group, weights=tokens, minlength=clients.size)
        # Every pair with recent demand hears from us each tick (an empty grant still says
        # "limited" and keeps its lease alive); a pair only kept alive hears when it gets tokens,
        # and otherwise every memory/2 ticks (staggered), often enough to keep its lease alive.
        memory = self._history.maxlen or 1
        refresh = (pairs + self._ticks) % max(1, memory // 2) == 0
        send = (tokens > 0) | (per_tick > 0) | refresh
        pairs, group, tokens = pairs[send], group[send], tokens[send]
        return self.clients.slot_keys[clients[group]], self.pair_server[pairs], tokens

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
        self.pairs = KeyIndex(max(1024, k))
        self.pairs.lookup_or_insert(
            (self.pair_client[:k] * MAX_SERVERS + self.pair_server[:k] + 1).astype(np.uint64)
        )

        def remap(p: np.ndarray, a: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
            kept = pair_map[p] >= 0
            return pair_map[p][kept], a[kept]

        history = [remap(p, a) for p, a in self._history]
        self._history.clear()
        self._history.extend(history)
        self._demand = [remap(p, a) for p, a in self._demand]
        return len(self.clients)
