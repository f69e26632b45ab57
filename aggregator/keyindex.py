"""Stable client key (uint64, never 0) -> dense slot, vectorised open addressing in numpy.

Linear probing from ``home``: the top ``bits`` of ``h * G`` with ``h = key * G``, ``h ^= h >> 29``
and ``G = 0x9E3779B97F4A7C15`` (Fibonacci hashing, with a shift-xor in between: keys of one usage
partition share ``key mod partitions``, so the low bits cannot serve as home; and the aggregator's
pair ids ``client * 2**16 + server + 1`` are arithmetic progressions that one multiplication
alone clusters, 30 probes per key on average at 4 million pairs instead of 1.5).
Slots are handed out densely (0, 1, 2, ...) so that per-client arrays elsewhere are indexed by
slot and grow by appending. Nothing is deleted one by one: :meth:`KeyIndex.compact` rebuilds the
index with the slots to keep and returns the old-to-new mapping.
"""

from __future__ import annotations

import numpy as np

_GOLDEN = np.uint64(0x9E3779B97F4A7C15)
_MIX = np.uint64(29)
#: positions probed at once after a key's home (then 4 times as many, and so on)
_WINDOW = 4
#: the longest window _place probes at once
_WINDOW_MAX = 64


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
        """Home position of each key (``keys``: a 1-d uint64 array; its products wrap around
        modulo 2**64, without a warning as for arrays)."""
        h = keys * _GOLDEN
        h ^= h >> _MIX
        h *= _GOLDEN
        h >>= np.uint64(64 - self.bits)
        return h.view(np.int64)  # < 2**bits: the same value

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, -1 where absent."""
        return self._probe(np.asarray(keys, dtype=np.uint64))[0]

    def _probe(self, keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """``(slot, end)`` of each key (uint64): its slot (-1 where absent) and the table position
        its probe ended at (its own, or the first empty one from its home: equal keys end at
        the same position)."""
        mask = self.keys.size - 1
        pos = self._home(keys)
        end = pos.copy()
        # the first probe for every key at once (most keys are found there)
        here = self.keys[pos]
        hit = here == keys
        out = np.where(hit, self.slot_of[pos], -1)
        waiting = np.flatnonzero(~hit & (here != 0))
        # The others probe a window of positions at once, a longer one each round (few keys
        # are far from home, but one numpy round per position costs more than the probes):
        # a key stops at its first match or at the first empty position (absent).
        width = _WINDOW
        while waiting.size:
            p = (pos[waiting] + np.arange(1, width + 1)[:, None]) & mask  # [offset, key]
            here = self.keys[p]
            match = here == keys[waiting]
            stop = match | (here == 0)
            first = np.argmax(stop, axis=0)
            cols = np.arange(waiting.size)
            found = match[first, cols]
            out[waiting[found]] = self.slot_of[p[first[found], cols[found]]]
            stopped = stop[first, cols]
            end[waiting[stopped]] = p[first[stopped], cols[stopped]]
            waiting = waiting[~stopped]  # no match and no empty position yet
            pos[waiting] += width
            width *= 4
        return out, end

    def lookup_or_insert(self, keys: np.ndarray) -> np.ndarray:
        """Slot of each key, giving new keys the next free slots (in order of first sight).

        All keys are looked up first; the missing ones (none, in a steady state) that end their
        probes at distinct empty positions are distinct and take slots in their order; otherwise
        they are sorted to find the distinct new keys and their first sight."""
        keys = np.asarray(keys, dtype=np.uint64)
        slots, end = self._probe(keys)
        missing = np.flatnonzero(slots < 0)
        if not missing.size:
            return slots
        new_keys = keys[missing]
        if self._distinct_ends(end[missing], new_keys):
            unique, rank = new_keys, np.arange(missing.size)
        else:
            unique, first, inverse = np.unique(new_keys, return_index=True, return_inverse=True)
            order = np.argsort(first, kind="stable")  # new keys in order of first sight
            unique = unique[order]
            rank = np.empty(unique.size, dtype=np.int64)
            rank[order] = np.arange(unique.size)
            rank = rank[inverse.reshape(-1)]
        while (self.size + unique.size) * 2 > self.keys.size:
            self._rebuild(self.keys.size * 2)
        new = np.arange(self.size, self.size + unique.size)
        self._ensure_slots(self.size + unique.size)
        self.slot_keys[new] = unique
        self._place(unique, new)
        slots[missing] = self.size + rank
        self.size += unique.size
        return slots

    def _distinct_ends(self, at: np.ndarray, keys: np.ndarray) -> bool:
        """Whether absent ``keys``, whose probes ended at the empty positions ``at``, are
        distinct (equal keys end at one position): each writes its index + 1 at its position
        of the table (just probed: in cache; restored to empty after) and reads it back; the
        keys that share a position are compared by a sort (few: those of colliding probes)."""
        mark = np.arange(1, at.size + 1, dtype=np.uint64)
        self.keys[at] = mark
        won = self.keys[at]
        self.keys[at] = 0
        lost = np.flatnonzero(won != mark)
        if not lost.size:
            return True
        shared = np.unique(np.concatenate((lost, won[lost].astype(np.int64) - 1)))
        return bool(np.unique(keys[shared]).size == shared.size)

    @classmethod
    def of_distinct(cls, keys: np.ndarray) -> KeyIndex:
        """An index of ``keys`` (distinct, non-zero) with slot ``i`` for ``keys[i]``: what
        ``lookup_or_insert(keys)`` on an empty index gives, without looking them up first."""
        keys = np.asarray(keys, dtype=np.uint64)
        index = cls(max(1024, keys.size))
        index.slot_keys[: keys.size] = keys
        index._place(keys, np.arange(keys.size))
        index.size = keys.size
        return index

    def _place(self, keys: np.ndarray, slots: np.ndarray) -> None:
        """Insert absent, distinct ``keys`` with the given ``slots``.

        Each key takes the first empty position from its home on; it looks for one in a window
        of positions at a time (as :meth:`lookup` does). Keys that find the same empty
        position all write their index there (in ``slot_of``, free there) and the one whose
        index stays wins it; the others go on from the next position."""
        mask = self.keys.size - 1
        pos = self._home(keys)
        waiting = np.arange(keys.size)
        width = 1
        while waiting.size:
            p = (pos[waiting] + np.arange(width)[:, None]) & mask  # [offset, key]
            empty = self.keys[p] == 0
            first = np.argmax(empty, axis=0)
            cols = np.arange(waiting.size)
            has = np.flatnonzero(empty[first, cols])
            at = p[first[has], has]  # each such key's first empty position
            who = waiting[has]
            self.slot_of[at] = who
            won = self.slot_of[at] == who
            self.keys[at[won]] = keys[who[won]]
            self.slot_of[at[won]] = slots[who[won]]
            # the others: after their window, or after the position another key took
            pos[waiting] += width
            lost = has[~won]
            pos[waiting[lost]] = at[~won] + 1
            going = np.ones(waiting.size, dtype=bool)
            going[has[won]] = False
            waiting = waiting[going]
            width = min(4 * width, _WINDOW_MAX)

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
