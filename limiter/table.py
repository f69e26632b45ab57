"""The compact per-client table: client hash -> row of state cells in flat arrays.

Layout: ``shards`` independent open-addressing tables (linear probing), each with its own lock.
A shard's index is a key array (int64: the client id's ``hash()``, 0 = empty) and a row array
(int32: the client's row) side by side; the state lives in dense rows, one flat array per state
group (one group per policy; ``width`` cells per row, float64 or uint32 as the group says). No
Python object per client: a tracked client costs ``12 / load`` bytes of index (load between
1/4 and 1/2: the index doubles; short probe chains are the request path's cheapest speed-up
once an index slot costs 12 bytes) plus its row, ``sum(width * cell size)`` bytes, in row
arrays that grow by a quarter at a time (at most 5/4 of the rows in use are allocated).

Keys are the process's own 64-bit string hash (SipHash), so two client ids share a row only if
their hashes collide: odds about ``n**2 / 2**65`` for n live clients (3e-8 at one million).

Idle clients are reclaimed lazily, never by a background thread: when a shard's index is full
enough to grow, an insert first sweeps a few slots with a clock hand and frees those whose state
the owner calls idle (state that no longer limits anyone). Deletion shifts the probe chain back,
so no tombstones are needed; the freed row is reset to fresh state and reused by the next
insert. All methods expect the caller to hold ``shard.lock``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np

from .algorithms import Cells

#: Index slots a shard starts with (a power of two).
INITIAL_SLOTS = 16
#: Grow (double) the index once more than this fraction of its slots is used.
MAX_LOAD = 0.5
#: Row arrays grow by this factor when every row is in use.
ROW_GROWTH = 1.25
#: Slots swept for idle clients before a shard grows.
RECLAIM_SWEEP = 16
#: Slots swept for idle clients when a shard is at its share of ``max_clients``.
RECLAIM_SWEEP_FULL = 1024

#: ``idle(shard, row, now)``: True when the row's state limits nothing and may be forgotten.
IdleTest = Callable[["Shard", int, float], bool]
#: Cell types of a state group: ``"d"`` float64 or ``"I"`` uint32.
DTYPES = {"d": np.float64, "I": np.uint32}


class Shard:
    """One lock-protected open-addressing index over dense rows. Attributes are read on the
    hot path: ``kv`` (keys), ``rv`` (rows), ``v0`` (the first group's cells)."""

    __slots__ = (
        "arrays",
        "count",
        "dtypes",
        "free",
        "fresh",
        "grow_at",
        "hand",
        "idle",
        "ints",
        "keys",
        "kv",
        "lock",
        "mask",
        "max_count",
        "rowix",
        "rv",
        "shift",
        "used_rows",
        "v0",
        "views",
        "widths",
    )

    def __init__(
        self,
        widths: Sequence[int],
        fresh: Sequence[tuple[float, ...]],
        idle: IdleTest,
        max_count: int,
        shift: int,
        dtypes: Sequence[str] | None = None,
    ) -> None:
        self.lock = threading.Lock()
        self.widths = tuple(widths)
        self.fresh = tuple(fresh)
        self.dtypes = tuple(dtypes) if dtypes is not None else ("d",) * len(self.widths)
        self.idle = idle
        self.max_count = max_count
        self.shift = shift
        self.count = 0
        self.hand = 0
        self.used_rows = 0  # rows ever handed out; the ones freed since are in ``free``
        self.free: list[int] = []
        self.arrays: list[np.ndarray] = [np.zeros(0, dtype=DTYPES[d]) for d in self.dtypes]
        self._grow_rows(INITIAL_SLOTS // 2)
        self._allocate(INITIAL_SLOTS)

    def _allocate(self, slots: int) -> None:
        self.keys = np.zeros(slots, dtype=np.int64)
        self.kv: memoryview[int] = self.keys.data
        self.rowix = np.zeros(slots, dtype=np.int32)
        self.rv: memoryview[int] = self.rowix.data
        self.mask = slots - 1
        self.grow_at = min(int(slots * MAX_LOAD), self.max_count)

    def _grow_rows(self, rows: int) -> None:
        """Make room for ``rows`` rows; the new ones hold fresh state."""
        grown = []
        for a, f, d in zip(self.arrays, self.fresh, self.dtypes, strict=True):
            new = np.tile(np.asarray(f, dtype=DTYPES[d]), rows)
            new[: a.size] = a
            grown.append(new)
        self.arrays = grown
        self.views = [cast("Cells", a.data) for a in grown]
        self.v0 = self.views[0]  # the first group's cells, read on the request path
        #: The same cells as int64 bits (for keys stored in a float64 group).
        self.ints: list[memoryview[int]] = [
            a.view(np.int64).data if a.dtype == np.float64 else a.data for a in grown
        ]

    @property
    def slots(self) -> int:
        return self.mask + 1

    @property
    def rows(self) -> int:
        """Rows allocated (in use or free)."""
        return self.arrays[0].size // self.widths[0]

    def find_slot(self, h: int) -> int:
        """Index slot of key ``h``, or -1."""
        kv, mask = self.kv, self.mask
        i = (h >> self.shift) & mask
        while True:
            k = kv[i]
            if k == h:
                return i
            if k == 0:
                return -1
            i = (i + 1) & mask

    def find(self, h: int) -> int:
        """Row of key ``h``, or -1."""
        i = self.find_slot(h)
        return self.rv[i] if i >= 0 else -1

    def insert(self, h: int, now: float) -> int:
        """Row of key ``h``, inserted with fresh state if new; -1 if the shard is full."""
        kv, mask = self.kv, self.mask
        i = (h >> self.shift) & mask
        while True:
            k = kv[i]
            if k == h:
                return self.rv[i]
            if k == 0:
                break
            i = (i + 1) & mask
        if self.count >= self.grow_at:
            if not self.reclaim(now, RECLAIM_SWEEP):
                if self.count < self.max_count:
                    self._grow()
                elif not self.reclaim(now, RECLAIM_SWEEP_FULL):
                    return -1
            return self.insert(h, now)
        if self.free:
            row = self.free.pop()
        else:
            row = self.used_rows
            if row >= self.rows:
                self._grow_rows(max(row + 16, int(row * ROW_GROWTH)))
            self.used_rows = row + 1
        kv[i] = h
        self.rv[i] = row
        self.count += 1
        return row

    def delete(self, i: int) -> None:
        """Forget index slot ``i``: reset its row and free it, shift its probe chain back."""
        kv, rv, mask, shift = self.kv, self.rv, self.mask, self.shift
        row = rv[i]
        for a, w, f in zip(self.arrays, self.widths, self.fresh, strict=True):
            a[row * w : (row + 1) * w] = f
        self.free.append(row)
        j = i
        while True:
            j = (j + 1) & mask
            k = kv[j]
            if k == 0:
                break
            home = (k >> shift) & mask
            # k may move to i unless its home lies cyclically in (i, j].
            if (home <= i or home > j) if i < j else (home <= i and home > j):
                kv[i] = k
                rv[i] = rv[j]
                i = j
        kv[i] = 0
        self.count -= 1

    def reclaim(self, now: float, sweep: int) -> int:
        """Sweep up to ``sweep`` slots from the clock hand; free the idle ones. Returns how many."""
        freed = 0
        kv, rv, mask, idle = self.kv, self.rv, self.mask, self.idle
        i = self.hand
        for _ in range(min(sweep, mask + 1)):
            if kv[i] != 0 and idle(self, rv[i], now):
                self.delete(i)  # may shift another key into i: look at i again next round
                freed += 1
            else:
                i = (i + 1) & mask
        self.hand = i
        return freed

    def occupied(self) -> tuple[np.ndarray, np.ndarray]:
        """``(hashes, rows)`` of every tracked client (vectorised, for bulk passes)."""
        slots = np.flatnonzero(self.keys)
        return self.keys[slots], self.rowix[slots].astype(np.int64)

    def nbytes(self) -> int:
        """Bytes held by this shard's index and row arrays."""
        return self.keys.nbytes + self.rowix.nbytes + sum(a.nbytes for a in self.arrays)

    def _grow(self) -> None:
        old_keys, old_rows = self.keys, self.rowix
        occupied = np.flatnonzero(old_keys)
        self._allocate(2 * (self.mask + 1))
        if occupied.size:
            positions = place(self.keys, old_keys[occupied], self.shift)
            self.rowix[positions] = old_rows[occupied]


def place(keys: np.ndarray, hashes: np.ndarray, shift: int) -> np.ndarray:
    """Insert distinct non-zero ``hashes`` into the empty linear-probing table ``keys``.

    Vectorised: each round, every key still waiting claims its current probe position if free
    (the first in line wins); the others move one slot on. Returns each key's slot.
    """
    mask = keys.size - 1
    pos = (hashes >> shift) & mask
    result = np.empty(hashes.size, dtype=np.int64)
    waiting = np.arange(hashes.size)
    while waiting.size:
        p = pos[waiting]
        free = keys[p] == 0
        claim, first = np.unique(p[free], return_index=True)
        winners = waiting[free][first]
        keys[claim] = hashes[winners]
        result[winners] = claim
        still = np.ones(waiting.size, dtype=bool)
        still[np.flatnonzero(free)[first]] = False
        waiting = waiting[still]
        pos[waiting] = (pos[waiting] + 1) & mask
    return result


class ClientTable:
    """``shards`` shards chosen by the low bits of the client hash; at most about ``max_clients``.

    Each shard holds at most ``ceil(max_clients / shards)`` clients.
    """

    __slots__ = ("shard_mask", "shards")

    def __init__(
        self,
        widths: Sequence[int],
        fresh: Sequence[tuple[float, ...]],
        idle: IdleTest,
        *,
        max_clients: int,
        shards: int,
        dtypes: Sequence[str] | None = None,
    ) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two >= 1, got {shards}")
        shift = shards.bit_length() - 1
        per_shard = -(-max_clients // shards)
        self.shard_mask = shards - 1
        self.shards = [Shard(widths, fresh, idle, per_shard, shift, dtypes) for _ in range(shards)]

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def nbytes(self) -> int:
        """Bytes held by the arrays of all shards."""
        return sum(s.nbytes() for s in self.shards)
