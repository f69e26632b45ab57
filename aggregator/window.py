"""Windowed charges per client: a ring of time buckets in one float64 array ``[k, clients]``.

The ring covers the buckets from ``now - window`` to ``now + horizon`` on the aggregator's
clock, so that a charge placed at a future time (a lease's last usable moment) counts from the
moment it is made until a whole window after that time. A client's use is the sum of its column
of buckets, kept as a running ``total`` per client (charges add to it, a bucket leaving the
window subtracts from it: whole tokens, exact in float64).

Buckets are ``bucket`` seconds wide, one row of the array each (clearing a bucket is one
contiguous write). A bucket counts while any part of it is inside ``(now - window, now +
horizon]``: a charge counts for at most one bucket longer than its exact window, never shorter
(conservative by at most ``bucket / window`` of the limit).
"""

from __future__ import annotations

import math

import numpy as np


class ChargeRing:
    __slots__ = ("ahead", "back", "bucket", "charges", "current", "k", "total", "window")

    def __init__(self, window: float, horizon: float, bucket: float, rows: int = 1024) -> None:
        if not (window > 0 and horizon >= 0 and bucket > 0):
            raise ValueError("window and bucket must be > 0 seconds, horizon >= 0")
        self.bucket = bucket
        self.window = window
        self.back = math.ceil(window / bucket)
        self.ahead = math.ceil(horizon / bucket) + 1
        self.k = self.back + 1 + self.ahead
        self.charges = np.zeros((self.k, rows), dtype=np.float64)  # [bucket, client]
        self.total = np.zeros(rows, dtype=np.float64)  # client -> sum over the buckets
        self.current: int | None = None

    @property
    def rows(self) -> int:
        return int(self.charges.shape[1])

    def ensure_rows(self, n: int) -> None:
        if n > self.rows:
            size = max(n, 2 * self.rows)
            grown = np.zeros((self.k, size), dtype=np.float64)
            grown[:, : self.rows] = self.charges
            self.charges = grown
            total = np.zeros(size, dtype=np.float64)
            total[: self.total.size] = self.total
            self.total = total

    def keep_rows(self, rows: np.ndarray) -> None:
        """Keep only ``rows`` (in that order): the ring after a key-index compaction."""
        size = max(1024, 2 * rows.size)
        kept = np.zeros((self.k, size), dtype=np.float64)
        kept[:, : rows.size] = self.charges[:, rows]
        self.charges = kept
        total = np.zeros(size, dtype=np.float64)
        total[: rows.size] = self.total[rows]
        self.total = total

    def advance(self, now: float) -> None:
        """Move the ring to ``now``: buckets that fall out of the window are cleared for reuse."""
        b = math.floor(now / self.bucket)
        if self.current is None or b - self.current >= self.k:
            if self.current is not None:
                self.charges[:] = 0.0
                self.total[:] = 0.0
            self.current = b
            return
        for j in range(self.current + 1, b + 1):
            column = self.charges[(j + self.ahead) % self.k]
            self.total -= column
            column[:] = 0.0
        self.current = max(self.current, b)

    def column(self, at: float) -> int | None:
        """The ring column of time ``at``; None if it is older than the window.

        A time beyond the horizon is placed in the last bucket ahead; the owner keeps
        ``horizon`` at least as long as any charge it places in the future.
        """
        assert self.current is not None, "advance() first"
        b = math.floor(at / self.bucket)
        if b < self.current - self.back:
            return None
        return min(b, self.current + self.ahead) % self.k

    def charge(
        self, rows: np.ndarray, amounts: np.ndarray, at: float, *, distinct: bool = False
    ) -> None:
        """Add ``amounts`` to ``rows`` at time ``at`` (a row may repeat: its amounts add up).
        ``distinct``: the caller knows no row repeats (plain fancy indexing, no ``np.add.at``)."""
        col = self.column(at)
        if col is not None and rows.size:
            if distinct:
                column = self.charges[col]
                column[rows] += amounts
                self.total[rows] += amounts
            else:
                np.add.at(self.charges[col], rows, amounts)
                np.add.at(self.total, rows, amounts)

    def used(self, rows: np.ndarray | slice, now: float) -> np.ndarray:
        """Charges of each row in the buckets that reach into ``(now - window, ...]`` (``rows``:
        an index array or a slice; a new array either way)."""
        assert self.current is not None, "advance() first"
        first = max(self.current - self.back, math.floor((now - self.window) / self.bucket))
        if first == self.current - self.back:  # every bucket counts: the running totals
            used: np.ndarray = (
                self.total[rows].copy() if isinstance(rows, slice) else self.total[rows]
            )
            return used
        cols = np.arange(first, self.current + self.ahead + 1) % self.k
        used = self.charges[cols][:, rows].sum(axis=0)
        return used
