"""Naive reference models of the limiter's algorithms, written from their documented semantics.

Each model keeps the plainest state that states its rule (a list of admissions, a token count,
a theoretical arrival time, per-window counts) in exact rational arithmetic
(:class:`fractions.Fraction`), so a model never suffers from float rounding. A model says by how
much a request would pass (``margin``: >= 0 admitted, < 0 refused), and ``record`` takes an
admission. ``decide`` is both.

Shared semantics, for ``limit`` L per ``window`` W:

- a request of cost c at time t;
- a late request (t earlier than the latest *admitted* time of the client; a refusal leaves no
  trace) is decided as if it came at that latest time (its "effective time"): late timestamps
  never earn tokens back;
- windows of the window algorithms are aligned to multiples of W: ``floor(t / W) * W``.

None of this code imports :mod:`limiter`.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Iterable, Sequence
from fractions import Fraction

Number = float | int | Fraction


def q(x: Number) -> Fraction:
    """The exact rational value of a float/int (floats are dyadic rationals)."""
    return x if isinstance(x, Fraction) else Fraction(x)


class Model:
    """Base of the reference models: effective time, margin, record, remaining."""

    #: Whether float decisions of the implementation must match this model to the token
    #: (integer counts only, no rates or fractions of windows involved).
    exact: bool = False

    def __init__(self, limit: int, window: Number, burst: int | None = None) -> None:
        assert limit >= 1 and window > 0
        self.limit = limit
        self.window = q(window)
        self.capacity = limit if burst is None else burst
        self.latest: Fraction | None = None  # latest admitted time

    def effective(self, t: Number) -> Fraction:
        """The time a request stamped ``t`` is decided at: ``max(t, latest admitted)``."""
        t = q(t)
        return t if self.latest is None or t >= self.latest else self.latest

    def margin(self, t: Number, cost: int) -> Fraction:
        """Tokens left over if a request of ``cost`` at ``t`` were admitted (< 0: refused)."""
        return self.available(self.effective(t)) - cost

    def remaining(self, t: Number) -> Fraction:
        """Tokens (possibly fractional) a request at ``t`` could take."""
        return self.available(self.effective(t))

    def record(self, t: Number, cost: int) -> None:
        te = self.effective(t)
        self._take(te, cost)
        self.latest = te

    def decide(self, t: Number, cost: int) -> bool:
        ok = self.margin(t, cost) >= 0
        if ok:
            self.record(t, cost)
        return ok

    # -- per algorithm --------------------------------------------------------------------------

    def available(self, te: Fraction) -> Fraction:
        raise NotImplementedError

    def _take(self, te: Fraction, cost: int) -> None:
        raise NotImplementedError


class SlidingLogModel(Model):
    """Admit iff the tokens admitted in ``(t - W, t]`` plus ``cost`` are at most L.

    Keeps every admission as ``(time, cost)``. For non-decreasing timestamps this is exactly the
    sliding log; for out-of-order ones the implementation is only required to be conservative.
    """

    exact = True

    def __init__(self, limit: int, window: Number, burst: int | None = None) -> None:
        assert burst is None
        super().__init__(limit, window)
        self.log: list[tuple[Fraction, int]] = []

    def available(self, te: Fraction) -> Fraction:
        used = sum(c for (s, c) in self.log if te - self.window < s <= te)
        return Fraction(self.limit - used)

    def _take(self, te: Fraction, cost: int) -> None:
        self.log.append((te, cost))


class TokenBucketModel(Model):
    """A bucket of ``burst`` tokens (default L), refilled at L / W tokens per second."""

    def __init__(self, limit: int, window: Number, burst: int | None = None) -> None:
        super().__init__(limit, window, burst)
        self.tokens = Fraction(self.capacity)
        self.last: Fraction | None = None

    def available(self, te: Fraction) -> Fraction:
        if self.last is None:
            return self.tokens
        refill = (te - self.last) * self.limit / self.window
        return min(Fraction(self.capacity), self.tokens + refill)

    def _take(self, te: Fraction, cost: int) -> None:
        self.tokens = self.available(te) - cost
        self.last = te


class GCRAModel(Model):
    """Theoretical arrival time ``tat``: each token pushes it by ``T = W / L``; a request passes
    iff the pushed ``tat`` is at most ``burst * T`` after now. Margins are in tokens."""

    def __init__(self, limit: int, window: Number, burst: int | None = None) -> None:
        super().__init__(limit, window, burst)
        self.interval = self.window / limit
        self.tolerance = self.capacity * self.interval
        self.tat: Fraction | None = None

    def _base(self, te: Fraction) -> Fraction:
        return te if self.tat is None or self.tat < te else self.tat

    def available(self, te: Fraction) -> Fraction:
        backlog = self._base(te) - te
        return (self.tolerance - backlog) / self.interval

    def _take(self, te: Fraction, cost: int) -> None:
        self.tat = self._base(te) + cost * self.interval


class FixedWindowModel(Model):
    """At most L tokens per aligned window ``[k W, (k + 1) W)``."""

    exact = True

    def __init__(self, limit: int, window: Number, burst: int | None = None) -> None:
        assert burst is None
        super().__init__(limit, window)
        self.counts: defaultdict[int, int] = defaultdict(int)

    def index(self, te: Fraction) -> int:
        return math.floor(te / self.window)

    def available(self, te: Fraction) -> Fraction:
        return Fraction(self.limit - self.counts[self.index(te)])

    def _take(self, te: Fraction, cost: int) -> None:
        self.counts[self.index(te)] += cost


class SlidingWindowModel(Model):
    """Estimate ``prev * (1 - f) + cur`` over aligned windows; admit iff estimate + cost <= L.

    ``cur``/``prev`` are the tokens admitted in the current/previous aligned window and ``f`` the
    elapsed fraction of the current one.
    """

    def __init__(self, limit: int, window: Number, burst: int | None = None) -> None:
        assert burst is None
        super().__init__(limit, window)
        self.counts: defaultdict[int, int] = defaultdict(int)

    def estimate(self, te: Fraction) -> Fraction:
        k = math.floor(te / self.window)
        f = (te - k * self.window) / self.window
        return self.counts[k - 1] * (1 - f) + self.counts[k]

    def available(self, te: Fraction) -> Fraction:
        return self.limit - self.estimate(te)

    def _take(self, te: Fraction, cost: int) -> None:
        self.counts[math.floor(te / self.window)] += cost


MODELS: dict[str, type[Model]] = {
    "sliding_log": SlidingLogModel,
    "token_bucket": TokenBucketModel,
    "gcra": GCRAModel,
    "fixed_window": FixedWindowModel,
    "sliding_window": SlidingWindowModel,
}


def make_model(algorithm: str, limit: int, window: Number, burst: int | None = None) -> Model:
    return MODELS[algorithm](limit, window, burst)


# -- measuring what was admitted ---------------------------------------------------------------


def max_in_any_window(admissions: Iterable[tuple[Number, int]], window: Number) -> int:
    """Most tokens admitted in any half-open interval ``(x - W, x]``.

    The maximum is reached with ``x`` at an admission time, so scanning those suffices.
    """
    events = sorted((q(t), c) for t, c in admissions)
    w = q(window)
    best = 0
    lo = 0
    total = 0
    for hi, (x, c) in enumerate(events):
        total += c
        while events[lo][0] <= x - w:
            total -= events[lo][1]
            lo += 1
        # equal times after ``hi`` belong to the same interval ending at x: counted on their turn
        if hi + 1 == len(events) or events[hi + 1][0] != x:
            best = max(best, total)
    return best


def max_in_any_window_naive(admissions: Sequence[tuple[Number, int]], window: Number) -> int:
    """Quadratic version of :func:`max_in_any_window`, to cross-check it."""
    w = q(window)
    best = 0
    for x, _ in admissions:
        xq = q(x)
        best = max(best, sum(c for t, c in admissions if xq - w < q(t) <= xq))
    return best


def max_per_aligned_window(admissions: Iterable[tuple[Number, int]], window: Number) -> int:
    """Most tokens admitted in one aligned window ``[k W, (k + 1) W)``."""
    w = q(window)
    counts: defaultdict[int, int] = defaultdict(int)
    for t, c in admissions:
        counts[math.floor(q(t) / w)] += c
    return max(counts.values(), default=0)


def effective_times(admissions: Iterable[tuple[Number, int]]) -> list[tuple[Fraction, int]]:
    """Admissions re-stamped at their effective time: the running maximum of admitted times."""
    out: list[tuple[Fraction, int]] = []
    latest: Fraction | None = None
    for t, c in admissions:
        tq = q(t)
        latest = tq if latest is None or tq > latest else latest
        out.append((latest, c))
    return out
