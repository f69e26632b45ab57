"""Approximate mode: local decisions against leases granted by the aggregator.

A lease is a token balance plus an expiry on the limiter's clock. Grants top the balance up and
push the expiry out; a request spends from it while it lives. Tokens left when a lease expires
can never be spent any more: the next usage drain reports them as ``released`` so that the
aggregator can hand them to other servers. Without a live lease a request is decided by:

- **degraded** (no grant batch for ``degraded_after`` seconds: aggregator or Kafka down): a
  static share ``limit / N`` per window, ``N`` the active server count of the last grant batch
  (``expected_servers`` before any), paced by GCRA that admits a request of cost c only once
  its meter has drained and then holds it for ``c * window * N / limit``: at most
  ``limit / N + c_max`` tokens per window per server, never unlimited;
- **cold start** (the stream is healthy but this client has no lease here yet): ``optimistic``
  admits up to ``a = max(1, floor(cold_start_allowance * limit))`` tokens per window while the
  usage report asks for a lease (the same drained-meter rule at ``a`` per window: at most ``a``
  unit requests in any window); ``wait`` holds the request up to ``wait_timeout`` for a lease;
  ``reject`` refuses.

Every decision is counted in the client's usage cells (tokens admitted from the lease, admitted
outside it, refused, released), which the streaming agent drains every report interval.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import numpy as np

from .algorithms import Algorithm, Cells
from .rate import Policy

# cell offsets (float64; KEY holds the stable key's int64 bits)
TOKENS, EXPIRY, COLD_TAT, DEGRADED_TAT = 0, 1, 2, 3
#: Usage since the last drain, in tokens: admitted from the lease, admitted outside it (cold
#: start, degraded), refused (or waiting), and released (left in an expired lease).
ADMITTED, EXTRA, REJECTED, RELEASED = 4, 5, 6, 7
USAGE = slice(ADMITTED, RELEASED + 1)
KEY = 8
#: The client's own limit (per-client and tier limits: :mod:`limiter.keylimits`) for the degraded
#: share and the cold-start allowance; 0: the policy's.
LIMIT = 9
WIDTH = 10

COLD_START_POLICIES = ("optimistic", "wait", "reject")

INF = math.inf


@dataclass(frozen=True, slots=True)
class LeaseOptions:
    """The approximate mode's behaviour; defaults documented in docs/consistency.md."""

    #: ``optimistic``, ``wait`` or ``reject``: a request with no lease while the stream is healthy.
    cold_start: str = "optimistic"
    #: Optimistic cold start admits this fraction of the limit per window per server (min 1 token).
    cold_start_allowance: float = 0.01
    #: Servers assumed for the degraded share before the first grant batch says how many there are.
    expected_servers: int = 1
    #: Seconds without any grant batch after which the degraded share applies.
    degraded_after: float = 1.0
    #: Longest a ``wait`` cold start holds a request, seconds.
    wait_timeout: float = 0.5

    def __post_init__(self) -> None:
        if self.cold_start not in COLD_START_POLICIES:
            raise ValueError(
                f"unknown cold_start {self.cold_start!r}; choose one of "
                f"{', '.join(COLD_START_POLICIES)}"
            )
        for name in ("cold_start_allowance", "degraded_after", "wait_timeout"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int | float) or not math.isfinite(v):
                raise ValueError(f"{name} must be a finite number, got {v!r}")
            if v < 0:
                raise ValueError(f"{name} must be >= 0, got {v!r}")
        if (
            isinstance(self.expected_servers, bool)
            or not isinstance(self.expected_servers, int)
            or self.expected_servers < 1
        ):
            raise ValueError(f"expected_servers must be an int >= 1, got {self.expected_servers!r}")


class LeaseAlgorithm(Algorithm):
    """The approximate-mode decision on one client's lease cells (see the module docstring)."""

    name = "lease"
    __slots__ = ("allowance", "degraded_after", "interval", "last_grant", "options", "servers")

    def __init__(self, policy: Policy, options: LeaseOptions, now: float) -> None:
        super().__init__(policy)
        self.options = options
        self.degraded_after = options.degraded_after
        self.allowance = 0.0
        if options.cold_start == "optimistic":
            self.allowance = max(1.0, math.floor(options.cold_start_allowance * policy.limit))
        #: When the last grant batch arrived (limiter clock); the stream counts healthy from start.
        self.last_grant = now
        self.servers = options.expected_servers
        self.interval = self.window * self.servers / self.limit

    def fresh(self) -> tuple[float, ...]:
        return (0.0, -INF, -INF, -INF, 0.0, 0.0, 0.0, 0.0, 0.0, 0.0)

    def _allowance(self, s: Cells, b: int) -> float:
        """The cold-start tokens per window of this client (its own limit, if it has one)."""
        own: float = s[b + LIMIT]
        if own <= 0.0 or self.allowance <= 0.0:
            return self.allowance
        return max(1.0, math.floor(self.options.cold_start_allowance * own))

    def limit_of(self, s: Cells, b: int) -> int:
        """The client's own limit (scaled by an adaptive factor, when one applies), whole tokens
        (at least 1); the policy's when it has none."""
        own: float = s[b + LIMIT]
        return self.limit if own <= 0.0 else max(1, int(own))

    def set_servers(self, servers: int) -> None:
        """The active server count the degraded share divides the limit by."""
        self.servers = max(1, servers)
        self.interval = self.window * self.servers / self.limit

    def degraded(self, now: float) -> bool:
        return now - self.last_grant > self.degraded_after

    def consume(self, s: Cells, b: int, now: float, cost: int) -> bool:
        if s[b + EXPIRY] > now:
            tokens: float = s[b + TOKENS]
            if tokens < cost:
                s[b + REJECTED] += cost
                return False
            s[b + TOKENS] = tokens - cost
            s[b + ADMITTED] += cost
            return True
        if now - self.last_grant > self.degraded_after:
            # GCRA at limit / N per window, admitting only once the meter has drained
            tat: float = s[b + DEGRADED_TAT]
            if tat > now:
                s[b + REJECTED] += cost
                return False
            own: float = s[b + LIMIT]
            step = self.interval if own <= 0.0 else self.window * self.servers / own
            s[b + DEGRADED_TAT] = now + cost * step
            s[b + EXTRA] += cost
            return True
        if self.allowance > 0.0:
            # cold start: the same drained-meter rule, at `allowance` tokens per window
            tat = s[b + COLD_TAT]
            if tat <= now:
                s[b + COLD_TAT] = now + cost * self.window / self._allowance(s, b)
                s[b + EXTRA] += cost
                return True
        s[b + REJECTED] += cost
        return False

    def leased(self, s: Cells, b: int, now: float) -> bool:
        """Whether the client holds a live lease (possibly empty) at ``now``."""
        return bool(s[b + EXPIRY] > now)

    def allows(self, s: Cells, b: int, now: float, cost: int) -> bool:
        return self.remaining(s, b, now) >= cost

    def remaining(self, s: Cells, b: int, now: float) -> int:
        if self.leased(s, b, now):
            return int(s[b + TOKENS])
        if self.degraded(now):
            return 1 if s[b + DEGRADED_TAT] <= now else 0
        return int(self._allowance(s, b)) if s[b + COLD_TAT] <= now else 0

    def retry_after(self, s: Cells, b: int, now: float, cost: int) -> float:
        if self.allows(s, b, now, cost):
            return 0.0
        if not self.leased(s, b, now) and self.degraded(now):
            return max(0.0, s[b + DEGRADED_TAT] - now)
        # the next grant may bring tokens: a report interval and a tick, about
        return min(self.window, 0.2)

    def reset_after(self, s: Cells, b: int, now: float) -> float:
        end = max(s[b + EXPIRY], s[b + DEGRADED_TAT], s[b + COLD_TAT])
        return max(0.0, end - now)

    def idle(self, s: Cells, b: int, now: float) -> bool:
        if s[b + ADMITTED] or s[b + EXTRA] or s[b + REJECTED] or s[b + RELEASED]:
            return False  # usage not yet reported
        if s[b + TOKENS] > 0.0:
            return False  # an expired lease's tokens are not yet released
        return self.reset_after(s, b, now) <= 0.0

    def grant(self, s: Cells, b: int, tokens: float, expiry: float, now: float) -> None:
        """Top the lease up by ``tokens`` and keep it alive until at least ``expiry``."""
        if s[b + EXPIRY] <= now:
            s[b + RELEASED] += s[b + TOKENS]
            s[b + TOKENS] = tokens
            s[b + EXPIRY] = expiry
        else:
            s[b + TOKENS] += tokens
            if expiry > s[b + EXPIRY]:
                s[b + EXPIRY] = expiry


def release_expired(cells: np.ndarray, now: float) -> None:
    """Move the tokens of expired leases to ``released`` (``cells``: rows of WIDTH cells)."""
    expired = (cells[:, EXPIRY] <= now) & (cells[:, TOKENS] > 0.0)
    if expired.any():
        rows = np.flatnonzero(expired)
        cells[rows, RELEASED] += cells[rows, TOKENS]
        cells[rows, TOKENS] = 0.0
