"""Stable client key (uint64, never 0) -> dense slot, vectorised open addressing in numpy.

Linear probing from ``home = (key * 0x9E3779B97F4A7C15) >> (64 - bits)`` (Fibonacci hashing: keys
of one usage partition share ``key mod partitions``, so the low bits cannot serve as home).
Slots are handed out densely (0, 1, 2, ...) so that per-client arrays elsewhere are indexed by
slot and grow by appending. Nothing is deleted one by one: :meth:`KeyIndex.compact` rebuilds the
index with the slots to keep and returns the old-to-new mapping.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


class KeyIndex:
    __slots__ = ("bits", "keys", "size", "slot_keys", "slot_of")

    def __init__(self, capacity: int = 1024) -> None:
        self.size = 0
        self.slot_keys = np.zeros(capacity, dtype=np.uint64)  # slot -> key
        self._allocate(max(10, int(capacity * 2 - 1).bit_length()))

    def _allocate(self, bits: int) -> None:
        self.bits = bits
        self.keys = np.zeros(1 << bits, dtype=np.uint64)  # table position -> key (0 = empty)
        self.slot_of = np.full(1 << bits, -1, dtype=np.int64)  # table position -> slot

    def __len__(self) -> int:
        return self.size

    def _home(self, keys: np.ndarray) -> np.ndarray:
        with np.errstate(over="ignore"):
            return ((keys * _GOLDEN) >> np.uint64(64 - self.bits)).astype(np.int64)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.full(keys.size, -1, dtype=np.int64)
        mask = self.keys.size - 1
        pos = self._home(keys)
        waiting = np.arange(keys.size)
        while waiting.size:
            p = pos[waiting]
            here = self.keys[p]
            hit = here == keys[waiting]
            out[waiting[hit]] = self.slot_of[p[hit]]
            waiting = waiting[~hit & (here != 0)]
            pos[waiting] = (pos[waiting] + 1) & mask
        return out

    def lookup_or_insert(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, giving new keys the next free slots (in order of first sight)."""
        unique, first, inverse = np.unique(
            np.asarray(keys, dtype=np.uint64), return_index=True, return_inverse=True
        )
        slots = self.lookup(unique)
        missing = np.flatnonzero(slots < 0)
        if missing.size:
            missing = missing[np.argsort(first[missing], kind="stable")]
            while (self.size + missing.size) * 2 > self.keys.size:
                self._rebuild(self.keys.size * 2)
            new = np.arange(self.size, self.size + missing.size)
            self._ensure_slots(self.size + missing.size)
            self.slot_keys[new] = unique[missing]
            self._place(unique[missing], new)
            self.size += missing.size
            slots[missing] = new
        return slots[inverse.reshape(-1)]

    def _place(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Insert absent, distinct ``keys`` with the given ``slots``."""
        mask = self.keys.size - 1
        pos = self._home(keys)
        waiting = np.arange(keys.size)
        while waiting.size:
            p = pos[waiting]
            empty = np.flatnonzero(self.keys[p] == 0)
            claim, first = np.unique(p[empty], return_index=True)
            winners = waiting[empty[first]]
            self.keys[claim] = keys[winners]
            self.slot_of[claim] = slots[winners]
            placed = np.zeros(waiting.size, dtype=bool)
            placed[empty[first]] = True
            waiting = waiting[~placed]
            pos[waiting] = (pos[waiting] + 1) & mask  # their spot holds another key now

    def _ensure_slots(self, n: int) -> None:
        if n > self.slot_keys.size:
            grown = np.zeros(max(n, 2 * self.slot_keys.size), dtype=np.uint64)
            grown[: self.size] = self.slot_keys[: self.size]
            self.slot_keys = grown

    def _rebuild(self, table_size: int) -> None:
        self._allocate(int(table_size).bit_length() - 1)
        self._place(self.slot_keys[: self.size], np.arange(self.size))

    def compact(self, keep: np.ndarray) -> np.ndarray:
        """Keep only the slots where ``keep`` (bool per slot) is set; renumber them densely.

        Returns the old slot of each new slot (``new_arrays = old_arrays[returned]``).
        """
        old = np.flatnonzero(keep[: self.size])
        self.slot_keys = self.slot_keys[old].copy()
        self.size = old.size
        self._allocate(max(10, int(max(self.size, 1) * 4 - 1).bit_length()))
        self._place(self.slot_keys[: self.size], np.arange(self.size))
        return old
