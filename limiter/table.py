"""The compact per-client table: client hash -> slot, state as float64 cells in flat arrays.

Layout: ``shards`` independent open-addressing tables (linear probing), each with its own lock,
a key array (int64: the client id's ``hash()``, 0 = empty) and one flat float64 array per state
group (one group per policy; ``width`` cells per slot). No Python object per client: a tracked
client costs ``8 + 8 * sum(widths)`` bytes per slot, at a load factor between 3/8 and 3/4.

Keys are the process's own 64-bit string hash (SipHash), so two client ids share a slot only if
their hashes collide: odds about ``n**2 / 2**65`` for n live clients (3e-8 at one million).

Idle clients are reclaimed lazily, never by a background thread: when a shard is full enough to
grow, an insert first sweeps a few slots with a clock hand and frees those whose state the owner
calls idle (state that no longer limits anyone). Deletion shifts the probe chain back, so no
tombstones are needed. All methods expect the caller to hold ``shard.lock``.
"""

from __future__ import annotations

import threading
from collections.abc import Callable, Sequence
from typing import cast

import numpy as np

from .algorithms import Cells

#: Slots a shard starts with (a power of two).
INITIAL_SLOTS = 16
#: Grow (double) once more than this fraction of slots is used.
MAX_LOAD = 0.75
#: Slots swept for idle clients before a shard grows.
RECLAIM_SWEEP = 16
#: Slots swept for idle clients when a shard is at its share of ``max_clients``.
RECLAIM_SWEEP_FULL = 1024

#: ``idle(shard, slot, now)``: True when the slot's state limits nothing and may be forgotten.
IdleTest = Callable[["Shard", int, float], bool]


class Shard:
    """One lock-protected open-addressing table. Attributes are read on the hot path."""

    __slots__ = (
        "arrays",
        "count",
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
        "shift",
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
    ) -> None:
        self.lock = threading.Lock()
        self.widths = tuple(widths)
        self.fresh = tuple(fresh)
        self.idle = idle
        self.max_count = max_count
        self.shift = shift
        self.count = 0
        self.hand = 0
        self._allocate(INITIAL_SLOTS)

    def _allocate(self, slots: int) -> None:
        self.keys = np.zeros(slots, dtype=np.int64)
        self.kv: memoryview[int] = self.keys.data
        self.arrays = [np.tile(np.asarray(f, dtype=np.float64), slots) for f in self.fresh]
        self.views = [cast("Cells", a.data) for a in self.arrays]
        self.v0 = self.views[0]  # the first group's cells, read on the request path
        #: The same cells as int64 bits (for keys stored in a float64 group).
        self.ints: list[memoryview[int]] = [a.view(np.int64).data for a in self.arrays]
        self.mask = slots - 1
        self.grow_at = min(int(slots * MAX_LOAD), self.max_count)

    @property
    def slots(self) -> int:
        return self.mask + 1

    def find(self, h: int) -> int:
        """Slot of key ``h``, or -1."""
        kv, mask = self.kv, self.mask
        i = (h >> self.shift) & mask
        while True:
            k = kv[i]
            if k == h:
                return i
            if k == 0:
                return -1
            i = (i + 1) & mask

    def slot(self, h: int, now: float) -> int:
        """Slot of key ``h``, inserted with fresh state if new; -1 if the shard is full."""
        kv, mask = self.kv, self.mask
        i = (h >> self.shift) & mask
        while True:
            k = kv[i]
            if k == h:
                return i
            if k == 0:
                break
            i = (i + 1) & mask
        if self.count >= self.grow_at:
            if not self.reclaim(now, RECLAIM_SWEEP):
                if self.count < self.max_count:
                    self._grow()
                elif not self.reclaim(now, RECLAIM_SWEEP_FULL):
                    return -1
            return self.slot(h, now)
        kv[i] = h
        self.count += 1
        return i

    def delete(self, i: int) -> None:
        """Forget slot ``i``: shift later members of its probe chain back, reset the freed slot."""
        kv, mask, shift = self.kv, self.mask, self.shift
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
                for a, w in zip(self.arrays, self.widths, strict=True):
                    a[i * w : (i + 1) * w] = a[j * w : (j + 1) * w]
                i = j
        kv[i] = 0
        for a, w, f in zip(self.arrays, self.widths, self.fresh, strict=True):
            a[i * w : (i + 1) * w] = f
        self.count -= 1

    def reclaim(self, now: float, sweep: int) -> int:
        """Sweep up to ``sweep`` slots from the clock hand; free the idle ones. Returns how many."""
        freed = 0
        kv, mask, idle = self.kv, self.mask, self.idle
        i = self.hand
        for _ in range(min(sweep, mask + 1)):
            if kv[i] != 0 and idle(self, i, now):
                self.delete(i)  # may shift another key into i: look at i again next round
                freed += 1
            else:
                i = (i + 1) & mask
        self.hand = i
        return freed

    def _grow(self) -> None:
        old_keys, old_arrays = self.keys, self.arrays
        occupied = np.flatnonzero(old_keys)
        self._allocate(2 * (self.mask + 1))
        if occupied.size == 0:
            return
        positions = place(self.keys, old_keys[occupied], self.shift)
        for new, old, w in zip(self.arrays, old_arrays, self.widths, strict=True):
            new.reshape(-1, w)[positions] = old.reshape(-1, w)[occupied]


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
    ) -> None:
        if shards < 1 or shards & (shards - 1):
            raise ValueError(f"shards must be a power of two >= 1, got {shards}")
        shift = shards.bit_length() - 1
        per_shard = -(-max_clients // shards)
        self.shard_mask = shards - 1
        self.shards = [Shard(widths, fresh, idle, per_shard, shift) for _ in range(shards)]

    def __len__(self) -> int:
        return sum(s.count for s in self.shards)

    def nbytes(self) -> int:
        """Bytes held by the arrays of all shards."""
        return sum(s.keys.nbytes + sum(a.nbytes for a in s.arrays) for s in self.shards)
