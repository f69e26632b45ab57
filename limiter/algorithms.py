"""The rate-limiting algorithms, each a small state transition on a few cells.

A client's state for one policy is ``width`` consecutive cells (float64, or uint32 where the
algorithm's ``dtype`` says so) of a flat array, starting at offset ``b``; :mod:`limiter.table`
owns the arrays. Every method is deterministic in ``(cells, now, cost)``: no clock, no I/O, no
allocation beyond Python numbers. Times are seconds
on the limiter's clock, costs are tokens (whole requests, or weighted units).

Guarantees, for ``limit`` L per ``window`` W (see docs/algorithms.md):

============== ======================================= ============== ==========================
algorithm      any interval of length W holds at most   state (cells)  cost per decision
============== ======================================= ============== ==========================
sliding_log    L (exact, also with late timestamps)    L + 2 (uint32) O(cost)
token_bucket   burst + L                                2              O(1)
gcra           burst + L                                1              O(1)
fixed_window   2L (exactly L per aligned window)        2              O(1)
sliding_window < 2L (approximate, exact for even load)  3              O(1)
============== ======================================= ============== ==========================

A request stamped earlier than what a client's state has already seen never gets more than it
would at the latest time seen (token bucket and fixed window decide it exactly as then; the
others are stricter): late timestamps never earn tokens back.
"""

from __future__ import annotations

import math
from typing import TYPE_CHECKING, ClassVar

import numpy as np

from .rate import Policy

INF = math.inf
#: Seconds of slack when GCRA compares absolute times: float64 epoch times carry rounding of
#: about 2.4e-7 s, which must not decide whether the last token of a burst passes.
TIME_EPSILON = 1e-6

if TYPE_CHECKING:
    #: A flat float64 cell array as the request path sees it (a memoryview of a numpy array).
    Cells = memoryview[float]
    #: The same for a uint32 group (``dtype = "I"``): cells read as ints.
    IntCells = memoryview[int]
else:
    Cells = IntCells = memoryview


class Algorithm:
    """Base: the methods every algorithm implements on cells ``s[b : b + width]``."""

    name: ClassVar[str]
    #: Cell type: ``"d"`` float64 or ``"I"`` uint32 (see :mod:`limiter.table`).
    dtype: ClassVar[str] = "d"
    __slots__ = ("burst", "capacity", "limit", "policy", "width", "window")

    def __init__(self, policy: Policy) -> None:
        self.policy = policy
        self.limit = policy.limit
        self.window = policy.window
        self.capacity = policy.capacity
        self.width = len(self.fresh())

    def fresh(self) -> tuple[float, ...]:
        """Cell values of a client never seen: full allowance."""
        raise NotImplementedError

    def consume(self, s: Cells, b: int, now: float, cost: int) -> bool:
        """Take ``cost`` tokens at ``now`` if all are available; otherwise change nothing."""
        raise NotImplementedError

    def allows(self, s: Cells, b: int, now: float, cost: int) -> bool:
        """Whether :meth:`consume` would succeed, changing nothing."""
        raise NotImplementedError

    def remaining(self, s: Cells, b: int, now: float) -> int:
        """Whole tokens a request at ``now`` could still take."""
        raise NotImplementedError

    def retry_after(self, s: Cells, b: int, now: float, cost: int) -> float:
        """Seconds from ``now`` until ``cost`` tokens are available (0 if now, inf if never)."""
        raise NotImplementedError

    def reset_after(self, s: Cells, b: int, now: float) -> float:
        """Seconds from ``now`` until the state is back to :meth:`fresh` if nothing is admitted."""
        raise NotImplementedError

    def idle(self, s: Cells, b: int, now: float) -> bool:
        """True when the state limits nothing any more: forgetting it changes no decision."""
        return self.reset_after(s, b, now) <= 0.0

    def limit_of(self, s: Cells, b: int) -> int:
        """The limit this client's decisions report (``Decision.limit``): the policy's."""
        return self.limit


class TokenBucket(Algorithm):
    """Cells: ``used`` tokens (capacity minus tokens left), ``last`` refill time.

    Refills ``limit / window`` tokens per second up to ``burst`` (default ``limit``).
    """

    name = "token_bucket"
    __slots__ = ("rate",)

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.rate = self.limit / self.window

    def fresh(self) -> tuple[float, ...]:
        return (0.0, -INF)

    def _used(self, s: Cells, b: int, now: float) -> float:
        elapsed = now - s[b + 1]
        used: float = s[b]
        if elapsed > 0.0:
            used -= elapsed * self.rate
            if used < 0.0:
                used = 0.0
        return used

    def consume(self, s: Cells, b: int, now: float, cost: int) -> bool:
        # _used() inlined: this is the request path
        last = s[b + 1]
        used: float = s[b]
        if now > last:
            used -= (now - last) * self.rate
            if used < 0.0:
                used = 0.0
        if used + cost > self.capacity:
            return False
        s[b] = used + cost
        if now > last:
            s[b + 1] = now
        return True

    def allows(self, s: Cells, b: int, now: float, cost: int) -> bool:
        return self._used(s, b, now) + cost <= self.capacity

    def remaining(self, s: Cells, b: int, now: float) -> int:
        return int(self.capacity - self._used(s, b, now))

    def retry_after(self, s: Cells, b: int, now: float, cost: int) -> float:
        if cost > self.capacity:
            return INF
        used = self._used(s, b, now)
        if used + cost <= self.capacity:
            return 0.0
        # A late request (now < last) is decided at ``last``, where ``used`` was written.
        return max(0.0, s[b + 1] - now) + (used + cost - self.capacity) / self.rate

    def reset_after(self, s: Cells, b: int, now: float) -> float:
        return self._used(s, b, now) / self.rate + max(0.0, s[b + 1] - now)


class GCRA(Algorithm):
    """Generic cell rate algorithm: one cell, the theoretical arrival time ``tat``.

    Emission interval ``T = window / limit``; tolerance ``burst * T``. The same meter as the token
    bucket in one float.
    """

    name = "gcra"
    __slots__ = ("interval", "tolerance")

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        self.interval = self.window / self.limit
        self.tolerance = self.capacity * self.interval + TIME_EPSILON

    def fresh(self) -> tuple[float, ...]:
        return (-INF,)

    def consume(self, s: Cells, b: int, now: float, cost: int) -> bool:
        tat: float = s[b]
        if tat < now:
            tat = now
        new_tat = tat + cost * self.interval
        if new_tat - now > self.tolerance:
            return False
        s[b] = new_tat
        return True

    def allows(self, s: Cells, b: int, now: float, cost: int) -> bool:
        return max(s[b], now) + cost * self.interval - now <= self.tolerance

    def remaining(self, s: Cells, b: int, now: float) -> int:
        backlog = max(s[b], now) - now
        n = max(0, int((self.tolerance - backlog) / self.interval))
        # the largest cost allows() accepts, whatever the division rounded to
        while n > 0 and not self.allows(s, b, now, n):
            n -= 1
        while self.allows(s, b, now, n + 1):
            n += 1
        return n

    def retry_after(self, s: Cells, b: int, now: float, cost: int) -> float:
        if cost > self.capacity:
            return INF
        return max(0.0, max(s[b], now) + cost * self.interval - self.tolerance - now)

    def reset_after(self, s: Cells, b: int, now: float) -> float:
        return max(0.0, s[b] - now)


class FixedWindow(Algorithm):
    """Cells: ``start`` of the current window (aligned to multiples of ``window``), ``count``."""

    name = "fixed_window"
    __slots__ = ()

    def fresh(self) -> tuple[float, ...]:
        return (-INF, 0.0)

    def _count(self, s: Cells, b: int, now: float) -> float:
        # A window that began at or before now - W has ended; its count no longer applies.
        return s[b + 1] if s[b] > now - self.window else 0.0

    def consume(self, s: Cells, b: int, now: float, cost: int) -> bool:
        start = s[b]
        if start > now - self.window:
            count: float = s[b + 1] + cost
            if count > self.limit:
                return False
            s[b + 1] = count
            return True
        if cost > self.limit:
            return False
        s[b] = math.floor(now / self.window) * self.window
        s[b + 1] = float(cost)
        return True

    def allows(self, s: Cells, b: int, now: float, cost: int) -> bool:
        return self._count(s, b, now) + cost <= self.limit

    def remaining(self, s: Cells, b: int, now: float) -> int:
        return int(self.limit - self._count(s, b, now))

    def retry_after(self, s: Cells, b: int, now: float, cost: int) -> float:
        if cost > self.limit:
            return INF
        if self._count(s, b, now) + cost <= self.limit:
            return 0.0
        return s[b] + self.window - now

    def reset_after(self, s: Cells, b: int, now: float) -> float:
        return max(0.0, s[b] + self.window - now) if s[b + 1] > 0.0 else 0.0


class SlidingWindow(Algorithm):
    """Sliding window counter: cells ``start`` of the current aligned window, ``cur``, ``prev``.

    Estimates the count in ``(now - W, now]`` as ``prev * (1 - f) + cur``, ``f`` the elapsed
    fraction of the current window (Cloudflare's approximation).
    """

    name = "sliding_window"
    __slots__ = ()

    def fresh(self) -> tuple[float, ...]:
        return (-INF, 0.0, 0.0)

    def _roll(self, s: Cells, b: int, now: float) -> tuple[float, float, float]:
        """(start, cur, prev) as seen at ``now``, without writing."""
        w = self.window
        start: float = s[b]
        if now - start < w:  # includes late timestamps: decided in the newest window
            return start, s[b + 1], s[b + 2]
        new_start = math.floor(now / w) * w
        if new_start - start < 1.5 * w:  # exactly the next window
            return new_start, 0.0, s[b + 1]
        return new_start, 0.0, 0.0

    def _estimate(self, start: float, cur: float, prev: float, now: float) -> float:
        f = (now - start) / self.window
        if f < 0.0:
            f = 0.0
        return prev * (1.0 - f) + cur

    def consume(self, s: Cells, b: int, now: float, cost: int) -> bool:
        w = self.window
        start: float = s[b]
        if now - start < w:  # the common case, _roll() and _estimate() inlined
            cur: float = s[b + 1]
            f = (now - start) / w
            if f < 0.0:
                f = 0.0
            if s[b + 2] * (1.0 - f) + cur + cost > self.limit:
                return False
            s[b + 1] = cur + cost
            return True
        start, cur, prev = self._roll(s, b, now)
        if self._estimate(start, cur, prev, now) + cost > self.limit:
            return False
        s[b] = start
        s[b + 1] = cur + cost
        s[b + 2] = prev
        return True

    def allows(self, s: Cells, b: int, now: float, cost: int) -> bool:
        start, cur, prev = self._roll(s, b, now)
        return self._estimate(start, cur, prev, now) + cost <= self.limit

    def remaining(self, s: Cells, b: int, now: float) -> int:
        start, cur, prev = self._roll(s, b, now)
        return max(0, int(self.limit - self._estimate(start, cur, prev, now)))

    def retry_after(self, s: Cells, b: int, now: float, cost: int) -> float:
        if cost > self.limit:
            return INF
        start, cur, prev = self._roll(s, b, now)
        w, room = self.window, self.limit - cost
        if self._estimate(start, cur, prev, now) <= room:
            return 0.0
        if cur <= room and prev > 0.0:  # this window, once prev has decayed enough
            return max(0.0, start + w * (1.0 - (room - cur) / prev) - now)
        # next window, once this window's count has decayed enough
        return max(0.0, start + w + w * (1.0 - room / cur) - now)

    def reset_after(self, s: Cells, b: int, now: float) -> float:
        start, cur, prev = self._roll(s, b, now)
        if cur > 0.0:
            return start + 2.0 * self.window - now
        if prev > 0.0:
            return start + self.window - now
        return 0.0


#: Sliding log clock: ticks per second at most 2**22 (0.24 us: the spacing of float64 Unix
#: times from 2004 to 2038, so every such time is a whole tick), fewer for windows over 32 s
#: (a window spans at most LOG_PAST / 2 ticks).
LOG_TICKS_LOG2 = 22
#: A row's origin lies this many ticks before the first time it stores (room for late requests).
LOG_PAST = 1 << 28
#: Largest tick a row stores (cells hold tick + 1; 0 = empty). Cell values stay below 2**30:
#: one-digit Python ints, the cheapest to read and compare.
LOG_MAX_TICK = (1 << 30) - 2
#: Row origins count whole units of LOG_BASE_UNIT seconds from -LOG_BASE_OFFSET seconds (the
#: year 1697; the last origin is in 2242). Floats: exact, and cheaper than large ints.
LOG_BASE_UNIT = 16.0
LOG_BASE_OFFSET = 2.0**33
#: The first base whose origin is not before 1970 (origin >= 0). From it on ``now - origin`` is
#: exact for every ``now`` after the origin (``0 <= now - origin <= now``: both lie on now's
#: float grid), which the request paths' written-out steps rely on; rows with an earlier origin
#: (test clocks near 0, negative times) go through :meth:`SlidingLog.consume`.
LOG_EXACT_BASE = int(LOG_BASE_OFFSET / LOG_BASE_UNIT)


class SlidingLog(Algorithm):
    """Exact sliding window log: a ring of the last ``limit`` admission times and its ``head``.

    A request of cost c at ``now`` is admitted iff the c ring cells from ``head`` (the oldest
    admissions, in admission order) all lie at or before ``now - window``. With any admission
    order, two admissions ``limit`` apart in that order are at least ``window`` apart in time, so
    no interval ``(t - W, t]`` ever holds more than ``limit`` (pigeonhole on the ring index).

    Cells are uint32 (4 bytes each): ``[base, head, ring...]``. ``base`` (0: nothing stored yet)
    names the row's time origin in units of 16 s; a ring cell holds ``tick + 1`` (0: empty),
    ``tick`` counting ``scale`` per second from the origin. A stored time is rounded *up* to a
    tick and ``now`` *down*, so the check never admits what the exact log would refuse; on the
    tick grid (every float64 Unix time until 2038 when ``scale`` is 2**22) it is exact. A row
    whose next time does not fit (about 4 minutes at 2**22 per second) moves its origin
    forward; a cell then older than the origin is raised to it (later, so stricter), which only
    matters to a request more than ``LOG_PAST`` ticks (64 s at 2**22 per second) late.
    """

    name = "sliding_log"
    dtype = "I"
    __slots__ = ("scale", "span", "ticks", "wait")

    def __init__(self, policy: Policy) -> None:
        super().__init__(policy)
        k = min(LOG_TICKS_LOG2, math.floor(math.log2((LOG_PAST >> 1) / self.window)))
        if k < -4:  # 16 s of origin must be a whole number of ticks
            raise ValueError(f"sliding_log window too long: {self.window} s")
        self.scale = 2.0**k  # ticks per second
        self.ticks = math.ceil(self.window * self.scale)  # the window in ticks, rounded up
        #: admitted iff ``cell == 0 or cell + wait <= x`` (``cell - 1 + ticks <= floor(x)``)
        self.wait = self.ticks - 1
        self.span = LOG_PAST / self.scale  # seconds from a new origin to the time it is set for

    def fresh(self) -> tuple[float, ...]:
        return (0.0,) * (self.limit + 2)

    def _origin(self, base: int) -> float:
        return base * LOG_BASE_UNIT - LOG_BASE_OFFSET

    def _tick(self, base: int, now: float) -> float:
        """``now`` in ticks from the origin ``base`` names (a float: not rounded yet).

        Before :data:`LOG_EXACT_BASE`, ``now - origin`` may round (a tiny ``now`` against a
        negative origin) and land on a whole tick the exact difference is just above or below:
        it is then moved one float step the way the exact difference lies (its floor and ceiling
        are then the exact ones; ``scale`` is a power of two, so the product adds no error)."""
        origin = self._origin(base)
        d = now - origin
        x = d * self.scale
        if base < LOG_EXACT_BASE and x == math.floor(x):
            back = d - now  # two-sum: the exact error of d = now + (-origin)
            err = (now - (d - back)) + (-origin - back)
            if err:
                x = math.nextafter(x, math.inf if err > 0 else -math.inf)
        return x

    def _base_for(self, now: float) -> int:
        return max(1, math.floor((now - self.span + LOG_BASE_OFFSET) / LOG_BASE_UNIT))

    def _store_tick(self, cells: Cells, b: int, now: float) -> int:
        """The cell value for an admission at ``now``: its tick, rounded up, plus one (the
        row's origin set or moved forward first when needed)."""
        s: IntCells = cells  # type: ignore[assignment]
        base = s[b]
        if not base:
            base = s[b] = self._base_for(now)
        x = self._tick(base, now)
        if x > LOG_MAX_TICK:
            new = self._base_for(now)
            delta = (new - base) * int(LOG_BASE_UNIT * self.scale)  # whole ticks
            ring = np.asarray(s)[b + 2 : b + 2 + self.limit]
            live = ring > 0
            ring[live] = np.maximum(ring[live].astype(np.int64) - delta, 1)
            s[b] = new
            x = self._tick(new, now)
        if x <= 0.0:  # before the origin: stored at the origin (later, so stricter)
            return 1
        c = int(x)
        return c + 2 if c < x else c + 1

    def consume(self, cells: Cells, b: int, now: float, cost: int) -> bool:
        s: IntCells = cells  # type: ignore[assignment]
        n = self.limit
        if cost > n:
            return False
        base = s[b]
        head = s[b + 1]
        if base:
            x = self._tick(base, now)
            wait = self.wait
            if cost == 1:
                v = s[b + 2 + head]
                if v and v + wait > x:
                    return False
            else:
                for k in range(cost):
                    v = s[b + 2 + (head + k) % n]
                    if v and v + wait > x:
                        return False
        v = self._store_tick(cells, b, now)
        if cost == 1:
            s[b + 2 + head] = v
            s[b + 1] = head + 1 if head + 1 < n else 0
            return True
        for k in range(cost):
            s[b + 2 + (head + k) % n] = v
        s[b + 1] = (head + cost) % n
        return True

    def _ring(self, s: Cells, b: int) -> np.ndarray:
        """The ring's cells in admission order, oldest first (int64 copy; 0 = empty)."""
        cells = np.asarray(s)[b + 2 : b + 2 + self.limit].astype(np.int64)
        return np.roll(cells, -int(s[b + 1]))

    def _passing(self, s: Cells, b: int, now: float) -> np.ndarray:
        """Per ring cell (admission order): whether it no longer blocks a request at ``now``."""
        ring = self._ring(s, b)
        base = int(s[b])
        if not base:
            return np.ones(ring.size, dtype=bool)
        x = self._tick(base, now)
        passing: np.ndarray = (ring == 0) | (ring + self.wait <= x)
        return passing

    def allows(self, s: Cells, b: int, now: float, cost: int) -> bool:
        return cost <= self.limit and bool(self._passing(s, b, now)[:cost].all())

    def remaining(self, s: Cells, b: int, now: float) -> int:
        passing = self._passing(s, b, now)
        return self.limit if passing.all() else int(np.argmin(passing))

    def _free_at(self, s: Cells, b: int, cells: np.ndarray) -> float:
        """The time from which none of ``cells`` blocks any more (-inf if none is stored)."""
        stored = cells[cells > 0]
        if stored.size == 0:
            return -INF
        return self._origin(int(s[b])) + float(stored.max() + self.wait) / self.scale

    def retry_after(self, s: Cells, b: int, now: float, cost: int) -> float:
        if cost > self.limit:
            return INF
        return max(0.0, self._free_at(s, b, self._ring(s, b)[:cost]) - now)

    def reset_after(self, s: Cells, b: int, now: float) -> float:
        return max(0.0, self._free_at(s, b, self._ring(s, b)) - now)


ALGORITHMS: dict[str, type[Algorithm]] = {
    cls.name: cls for cls in (SlidingLog, TokenBucket, GCRA, FixedWindow, SlidingWindow)
}


def make_algorithm(policy: Policy) -> Algorithm:
    """The algorithm object a policy names, with its parameters precomputed."""
    return ALGORITHMS[policy.algorithm](policy)
