"""``RateLimiter``: local decisions in microseconds against per-client state in compact arrays."""

from __future__ import annotations

import asyncio
import math
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

import numpy as np

from . import compiled
from .algorithms import (
    GCRA,
    LOG_BASE_OFFSET,
    LOG_BASE_UNIT,
    LOG_EXACT_BASE,
    LOG_MAX_TICK,
    Algorithm,
    FixedWindow,
    SlidingLog,
    SlidingWindow,
    TokenBucket,
    make_algorithm,
)
from .clientid import MAX_CLIENT_ID_LENGTH, validate_client_id
from .decision import Decision, Reason
from .errors import AcquireTimeout, RateLimitExceeded
from .keys import client_key, signed
from .lease import (
    ADMITTED,
    EXPIRY,
    KEY,
    LIMIT,
    REJECTED,
    TOKENS,
    USAGE,
    WIDTH,
    LeaseAlgorithm,
    LeaseOptions,
    release_expired,
)
from .metrics import DecisionMetrics, decision_metrics
from .rate import DEFAULT_ALGORITHM, Policy, parse_rates
from .request import Request
from .table import ClientTable, Shard

if TYPE_CHECKING:
    from .keylimits import LimitSource

#: Requests stamped more than this many seconds before now are refused as ``stale``.
DEFAULT_MAX_REQUEST_AGE = 10.0
#: Requests stamped more than this many seconds after now are refused as ``future``.
DEFAULT_MAX_CLOCK_SKEW = 1.0
#: Most clients tracked at once (about; enforced per shard). At ~50 bytes each: ~200 MiB.
DEFAULT_MAX_CLIENTS = 1 << 22
#: Independent lock-protected shards of the client table.
DEFAULT_SHARDS = 16
#: ``local``: this process alone; ``approximate``: leases streamed from the aggregator.
MODES = ("local", "approximate")


@dataclass(frozen=True, slots=True)
class Usage:
    """Usage drained from an approximate-mode limiter: one row per client with any, in tokens.

    ``keys`` are stable client keys (uint64); ``admitted`` came from leases, ``extra`` was admitted
    outside leases (cold start, degraded), ``rejected`` was refused, ``released`` were left in
    leases that expired.
    """

    keys: np.ndarray
    admitted: np.ndarray
    extra: np.ndarray
    rejected: np.ndarray
    released: np.ndarray

    def __len__(self) -> int:
        return int(self.keys.size)


_MAX_ID = MAX_CLIENT_ID_LENGTH
#: The algorithms whose cost-1 step ``allow_request`` writes out, in the order of
#: ``limiter/_requestpath.c``'s kinds (kind = position + 1).
WRITTEN_OUT: tuple[type[Algorithm], ...] = (
    SlidingLog,
    LeaseAlgorithm,
    GCRA,
    TokenBucket,
    FixedWindow,
    SlidingWindow,
)

ALLOW_REQUEST_DOC = """Admit (True) or refuse one request of ``client_id`` at ``request.timestamp``.

The seed API's decision, thread-safe; ``check()`` says why. Built per limiter as a closure
(``RateLimiter.allow_request`` is an instance attribute): the request path reads no attribute.
"""


def _tolerance(name: str, value: float | None) -> float:
    """A time tolerance in seconds; ``None`` disables the check (infinite tolerance)."""
    if value is None:
        return math.inf
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number of seconds or None, got {value!r}")
    if value < 0:
        raise ValueError(f"{name} must be >= 0 seconds, got {value!r}")
    return float(value)


class RateLimiter:
    """At most ``max_requests`` per ``time_window_seconds`` for each client, decided locally.

    ``RateLimiter(100, 60)`` admits at most 100 requests per client in any 60-second interval
    (sliding log, exact). Options:

    - ``algorithm``: ``sliding_log`` (default, exact), ``token_bucket``, ``gcra``,
      ``fixed_window``, ``sliding_window``; ``burst``: bucket capacity for the bucket algorithms.
    - ``policies``: several :class:`Policy` (or a rate string such as ``"10/s; 1000/hour"``)
      instead of ``max_requests`` and ``time_window_seconds``; a request passes only if every
      policy passes, and a refusal consumes from none.
    - ``clock``: seconds, ``time.time`` by default (the clock ``Request`` stamps with);
      ``sleep``: what :meth:`acquire` waits with.
    - ``max_request_age`` (default 10 s) and ``max_clock_skew`` (default 1 s): requests stamped
      before ``now - max_request_age`` are refused as ``stale``, after ``now + max_clock_skew``
      as ``future``. ``None`` turns a check off.
    - ``max_clients`` (default 4,194,304) and ``shards`` (default 16): memory cap and lock
      striping of the client table.
    - ``mode``: ``local`` (default) or ``approximate``: decisions against leases that the
      streaming agent (``producer.Agent``) receives from the aggregator; ``lease_options``
      (:class:`LeaseOptions`) sets its cold-start and degraded behaviour. One policy only.
    - ``limits``: approximate mode's per-client limits
      (:class:`~limiter.keylimits.ServiceKeyLimits` over the configuration service): each
      client's degraded share and cold-start allowance follow its own limit (the aggregators
      grant by it); default: the policy's limit for everyone.
    - ``metrics``: ``True`` (or a :class:`~limiter.metrics.DecisionMetrics`) counts decisions
      by outcome and times one in 64 (:mod:`limiter.metrics`); off by default.

    Thread-safe: each shard of the table has its own lock, held for one decision.
    """

    __slots__ = (
        "_agent_lock",
        "_algos",
        "_by_key",
        "_clock",
        "_consume1",
        "_keyed",
        "_lease",
        "_limits",
        "_limits_version",
        "_max_age",
        "_max_skew",
        "_mode",
        "_shard_mask",
        "_shards",
        "_sleep",
        "_table",
        "_w0",
        "_waits",
        "allow_request",
        "metrics",
        "policies",
    )

    #: ``allow_request(client_id, request) -> bool``: see :data:`ALLOW_REQUEST_DOC`.
    allow_request: Callable[[str, Request], bool]

    def __init__(
        self,
        max_requests: int | None = None,
        time_window_seconds: float | None = None,
        *,
        policies: Sequence[Policy] | str | None = None,
        algorithm: str | None = None,
        burst: int | None = None,
        clock: Callable[[], float] = time.time,
        sleep: Callable[[float], None] = time.sleep,
        max_request_age: float | None = DEFAULT_MAX_REQUEST_AGE,
        max_clock_skew: float | None = DEFAULT_MAX_CLOCK_SKEW,
        max_clients: int = DEFAULT_MAX_CLIENTS,
        shards: int = DEFAULT_SHARDS,
        mode: str = "local",
        lease_options: LeaseOptions | None = None,
        metrics: bool | DecisionMetrics = False,
        limits: LimitSource | None = None,
    ) -> None:
        if mode == "approximate" and algorithm is None:
            # leases decide, not a local algorithm: name one without a limit cap
            algorithm = "gcra"
        self.policies = _resolve_policies(
            max_requests, time_window_seconds, policies, algorithm, burst
        )
        if isinstance(max_clients, bool) or not isinstance(max_clients, int) or max_clients < 1:
            raise ValueError(f"max_clients must be a whole number >= 1, got {max_clients!r}")
        if isinstance(shards, bool) or not isinstance(shards, int):
            raise ValueError(f"shards must be a whole number, got {shards!r}")
        if not callable(clock) or not callable(sleep):
            raise ValueError("clock and sleep must be callables")
        if mode not in MODES:
            raise ValueError(f"unknown mode {mode!r}; choose one of {', '.join(MODES)}")
        self._mode = mode
        self.metrics = decision_metrics(metrics)
        self._lease: LeaseAlgorithm | None = None
        if mode == "approximate":
            if len(self.policies) != 1:
                raise ValueError("approximate mode takes exactly one policy")
            self._lease = LeaseAlgorithm(self.policies[0], lease_options or LeaseOptions(), clock())
            self._algos: tuple[Algorithm, ...] = (self._lease,)
        elif lease_options is not None or limits is not None:
            raise ValueError("lease_options and limits apply to mode='approximate' only")
        else:
            self._algos = tuple(make_algorithm(p) for p in self.policies)
        self._limits = limits
        self._limits_version = None if limits is None else limits.current().version
        self._keyed = self._lease is not None
        self._waits = self._lease is not None and self._lease.options.cold_start == "wait"
        #: stable key -> client hash of every client whose usage was drained and that the table
        #: still tracks (pruned lazily; rebuilt from the table when it grows past twice its size)
        self._by_key: dict[int, int] = {}
        self._agent_lock = threading.Lock()
        self._consume1 = self._algos[0].consume if len(self._algos) == 1 else None
        self._w0 = self._algos[0].width
        self._clock = clock
        self._sleep = sleep
        self._max_age = _tolerance("max_request_age", max_request_age)
        self._max_skew = _tolerance("max_clock_skew", max_clock_skew)
        self._table = ClientTable(
            [a.width for a in self._algos],
            [a.fresh() for a in self._algos],
            self._idle,
            max_clients=max_clients,
            shards=shards,
            dtypes=[a.dtype for a in self._algos],
        )
        self._shards = self._table.shards
        self._shard_mask = self._table.shard_mask
        self.allow_request = self._build_allow_request()
        if self.metrics is not None:
            self.allow_request = self.metrics.wrap_allow(self.allow_request)

    @property
    def mode(self) -> str:
        """``local`` or ``approximate``."""
        return self._mode

    @classmethod
    def from_rates(cls, rates: str, **options: object) -> RateLimiter:
        """``RateLimiter.from_rates("10/second; 1000/hour", algorithm="gcra")``."""
        return cls(policies=rates, **options)  # type: ignore[arg-type]

    # -- the seed API --------------------------------------------------------------------------

    def _build_allow_request(self) -> Callable[[str, Request], bool]:
        """The request path as a closure: everything it reads per call is a local constant.

        For one policy (a local algorithm, or the lease) its cost-1 step is written out in the
        closure (a call costs about as much as the step): each copy is the common path of that
        algorithm's ``consume()``, which it falls back to otherwise, and
        ``tests/limiter/test_request_path.py`` checks the two decide alike.
        """
        clock = self._clock
        max_age = self._max_age
        max_skew = self._max_skew
        shards = self._shards
        shard_mask = self._shard_mask
        shift = self._shards[0].shift
        consume = self._consume1
        consume_all = self._consume_all
        width = self._w0
        keyed = self._keyed
        set_key = self._set_key
        waits = self._waits
        wait_for_lease = self._wait_for_lease
        algo = self._algos[0]
        # whose cost-1 step is written out below (none with several policies); one flag per
        # step: a test of a local flag is the cheapest branch
        step = type(algo) if consume is not None else None
        is_log, is_lease, is_gcra, is_bucket, is_fixed, is_sliding = (
            step is t for t in WRITTEN_OUT
        )
        window, limit = algo.window, algo.limit
        capacity, flimit = float(algo.capacity), float(limit)
        interval = tolerance = rate = 0.0
        log_scale = log_wait = 0.0
        if isinstance(algo, GCRA):
            interval, tolerance = algo.interval, algo.tolerance
        elif isinstance(algo, TokenBucket):
            rate = algo.rate
        elif isinstance(algo, SlidingLog):
            log_scale, log_wait = algo.scale, float(algo.wait)
        log_last = limit - 1

        def allow_request(client_id: str, request: Request) -> bool:
            if type(client_id) is not str or not 0 < len(client_id) <= _MAX_ID:
                client_id = validate_client_id(client_id)
            now = request.timestamp
            t = clock()
            if now < t - max_age or now > t + max_skew:
                return False
            h = hash(client_id) or 1
            shard = shards[h & shard_mask]
            lock = shard.lock
            lock.acquire()
            try:
                kv = shard.kv
                mask = shard.mask
                i = (h >> shift) & mask
                k = kv[i]
                while k != h:  # linear probe; an empty slot means a new client
                    if not k:
                        row = shard.insert(h, now)
                        if row < 0:
                            return False
                        if keyed:
                            set_key(shard, row, client_id)
                        break
                    i = (i + 1) & mask
                    k = kv[i]
                else:
                    row = shard.rv[i]
                s = shard.v0
                b = row * width
                if is_log:
                    base = s[b]
                    x = (now - (base * LOG_BASE_UNIT - LOG_BASE_OFFSET)) * log_scale
                    head = s[b + 1]
                    v = s[b + 2 + head]  # type: ignore[call-overload]
                    if base < LOG_EXACT_BASE:  # no origin yet, or one before 1970
                        ok = consume(s, b, now, 1)  # type: ignore[misc]
                    elif v and v > x - log_wait:
                        ok = False
                    elif 0.0 < x <= LOG_MAX_TICK:
                        c = int(x)
                        s[b + 2 + head] = c + 2 if c < x else c + 1  # type: ignore[call-overload]
                        s[b + 1] = head + 1 if head < log_last else 0
                        ok = True
                    else:
                        ok = consume(s, b, now, 1)  # type: ignore[misc]
                elif is_lease and s[b + EXPIRY] > now:  # a live lease (else: cold start, ...)
                    tokens = s[b + TOKENS]
                    ok = tokens >= 1.0
                    if ok:
                        s[b + TOKENS] = tokens - 1.0
                        s[b + ADMITTED] += 1.0
                    else:
                        s[b + REJECTED] += 1.0
                elif is_gcra:
                    tat = s[b]
                    if tat < now:
                        tat = now
                    tat += interval
                    ok = tat - now <= tolerance
                    if ok:
                        s[b] = tat
                elif is_bucket:
                    last = s[b + 1]
                    used = s[b]
                    if now > last:
                        used -= (now - last) * rate
                        if used < 0.0:
                            used = 0.0
                    ok = used + 1.0 <= capacity
                    if ok:
                        s[b] = used + 1.0
                        if now > last:
                            s[b + 1] = now
                elif is_fixed and s[b] > now - window:
                    count = s[b + 1] + 1.0
                    ok = count <= flimit
                    if ok:
                        s[b + 1] = count
                elif is_sliding and now - s[b] < window:
                    start = s[b]
                    f = (now - start) / window
                    if f < 0.0:
                        f = 0.0
                    cur = s[b + 1]
                    ok = s[b + 2] * (1.0 - f) + cur + 1.0 <= flimit
                    if ok:
                        s[b + 1] = cur + 1.0
                elif consume is not None:
                    ok = consume(s, b, now, 1)
                else:
                    ok = consume_all(shard, row, now, 1)
            finally:
                lock.release()
            if ok or not waits:
                return ok
            return wait_for_lease(client_id, 1).allowed

        allow_request.__doc__ = ALLOW_REQUEST_DOC
        fast = None
        if step in WRITTEN_OUT and not waits:
            fast = compiled.decider(
                fallback=allow_request,
                clock=clock,
                shards=shards,
                shard_mask=shard_mask,
                shift=shift,
                width=width,
                kind=WRITTEN_OUT.index(step) + 1,
                consume=consume,
                set_key=set_key if keyed else None,
                max_id=_MAX_ID,
                max_age=max_age,
                max_skew=max_skew,
                window=float(window),
                capacity=capacity,
                flimit=flimit,
                interval=interval,
                tolerance=tolerance,
                rate=rate,
                log_scale=log_scale,
                log_wait=log_wait,
                log_unit=LOG_BASE_UNIT,
                log_offset=LOG_BASE_OFFSET,
                log_max_tick=float(LOG_MAX_TICK),
                log_exact_base=LOG_EXACT_BASE,
                log_last=log_last,
                expiry=EXPIRY,
                tokens=TOKENS,
                admitted=ADMITTED,
                rejected=REJECTED,
            )
        return allow_request if fast is None else fast

    def clear_client(self, client_id: str) -> None:
        """Forget everything about ``client_id``: its next request starts with a full allowance."""
        client_id = validate_client_id(client_id)
        h = hash(client_id) or 1
        shard = self._shards[h & self._shard_mask]
        with shard.lock:
            i = shard.find_slot(h)
            if i >= 0:
                shard.delete(i)

    # -- the Decision API ----------------------------------------------------------------------

    def check(self, client_id: str, *, cost: int = 1, now: float | None = None) -> Decision:
        """Decide ``cost`` tokens at ``now`` (default: the clock); consumes them if allowed."""
        m = self.metrics
        if m is None:
            return self._decide(client_id, cost, now, consume=True)
        started = m.start()
        return m.decided(self._decide(client_id, cost, now, consume=True), started)

    def peek(self, client_id: str, *, cost: int = 1, now: float | None = None) -> Decision:
        """What :meth:`check` would answer, consuming nothing and tracking no new client."""
        return self._decide(client_id, cost, now, consume=False)

    def acquire(self, client_id: str, cost: int = 1, timeout: float | None = None) -> Decision:
        """Wait until ``cost`` tokens are granted and take them.

        Raises :class:`AcquireTimeout` (nothing consumed) if that would take longer than
        ``timeout`` seconds, or :class:`RateLimitExceeded` at once if it never can.
        """
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            decision = self.check(client_id, cost=cost)
            wait = self._wait_or_raise(client_id, decision, deadline)
            if wait is None:
                return decision
            self._sleep(wait)

    async def acquire_async(
        self, client_id: str, cost: int = 1, timeout: float | None = None
    ) -> Decision:
        """:meth:`acquire` for asyncio: waits with ``asyncio.sleep``, never blocks the loop."""
        deadline = None if timeout is None else self._clock() + timeout
        while True:
            decision = self.check(client_id, cost=cost)
            wait = self._wait_or_raise(client_id, decision, deadline)
            if wait is None:
                return decision
            await asyncio.sleep(wait)

    # -- introspection -------------------------------------------------------------------------

    def __len__(self) -> int:
        """Clients tracked now."""
        return len(self._table)

    def memory_bytes(self) -> int:
        """Bytes held by the client table's arrays."""
        return self._table.nbytes()

    # -- approximate mode: what the streaming agent calls ---------------------------------------

    @property
    def limit_source(self) -> LimitSource | None:
        """Approximate mode's per-client limits (``limits=``), if any."""
        return self._limits

    @property
    def lease(self) -> LeaseAlgorithm:
        """The approximate mode's lease state (policy, degraded share, last grant time)."""
        if self._lease is None:
            raise RuntimeError("this limiter is in local mode; use mode='approximate'")
        return self._lease

    def now(self) -> float:
        """The limiter's clock, seconds."""
        return self._clock()

    def drain_usage(self) -> Usage:
        """Take (and zero) every client's usage since the last drain; each shard lock briefly."""
        lease = self.lease
        if self._limits is not None and self._limits.current().version != self._limits_version:
            self._relimit()
        parts: list[tuple[np.ndarray, np.ndarray, np.ndarray]] = []
        now = self._clock()
        for shard in self._shards:
            with shard.lock:
                cells = shard.arrays[0].reshape(-1, lease.width)
                release_expired(cells, now)
                usage = cells[:, USAGE]
                if not usage.any():
                    continue
                hashes, rows = shard.occupied()
                used = usage[rows].any(axis=1)
                hashes, rows = hashes[used], rows[used]
                counts = usage[rows]
                usage[rows] = 0.0
                keys = cells[rows, KEY].view(np.int64)
            parts.append((keys, hashes, counts))
        if not parts:
            empty = np.zeros(0)
            return Usage(np.zeros(0, dtype=np.uint64), empty, empty, empty, empty)
        keys = np.concatenate([p[0] for p in parts])
        counts = np.concatenate([p[2] for p in parts])
        hashes = np.concatenate([p[1] for p in parts])
        with self._agent_lock:
            self._by_key.update(zip(keys.tolist(), hashes.tolist(), strict=True))
            if len(self._by_key) > 2 * max(len(self._table), 1024):
                self._by_key = self._key_index()
        return Usage(keys.view(np.uint64), counts[:, 0], counts[:, 1], counts[:, 2], counts[:, 3])

    def apply_grants(
        self,
        keys: np.ndarray,
        tokens: np.ndarray,
        expiry: float,
        *,
        unclaimed: list[int] | None = None,
    ) -> int:
        """Install leases of ``tokens`` until ``expiry`` (limiter clock) for stable ``keys``.

        Clients whose usage was never drained cannot be found; returns how many grants were
        installed (the rest name clients this limiter does not track). The indices of the
        grants not installed are appended to ``unclaimed``: the agent reports their tokens as
        released, so that the aggregator does not count them as outstanding.
        """
        lease = self.lease
        now = self._clock()
        index = self._by_key
        installed = 0
        signed_keys = keys.astype(np.uint64).view(np.int64).tolist()
        for n, (key, amount) in enumerate(zip(signed_keys, tokens.tolist(), strict=True)):
            h = index.get(key)
            if h is None:
                if unclaimed is not None:
                    unclaimed.append(n)
                continue
            shard = self._shards[h & self._shard_mask]
            with shard.lock:
                i = shard.find(h)
                if i >= 0:
                    lease.grant(shard.views[0], i * lease.width, float(amount), expiry, now)
            if i < 0:  # forgotten by the table since: forget it here too
                with self._agent_lock:
                    self._by_key.pop(key, None)
                if unclaimed is not None:
                    unclaimed.append(n)
                continue
            installed += 1
        return installed

    def _key_index(self) -> dict[int, int]:
        """stable key -> client hash of every tracked client that has a stable key."""
        index: dict[int, int] = {}
        for shard in self._shards:
            with shard.lock:
                hashes, rows = shard.occupied()
                stable = shard.arrays[0].reshape(-1, WIDTH)[rows, KEY].view(np.int64)
            known = stable != 0
            index.update(zip(stable[known].tolist(), hashes[known].tolist(), strict=True))
        return index

    def lease_info(self, client_id: str) -> tuple[float, float] | None:
        """``(tokens, seconds left)`` of the client's live lease here, else None."""
        lease = self.lease
        client_id = validate_client_id(client_id)
        h = hash(client_id) or 1
        shard = self._shards[h & self._shard_mask]
        now = self._clock()
        with shard.lock:
            i = shard.find(h)
            if i < 0:
                return None
            s, b = shard.views[0], i * WIDTH
            if not lease.leased(s, b, now):
                return None
            return s[b + TOKENS], s[b + EXPIRY] - now

    def leases(self) -> tuple[int, float]:
        """``(clients holding a live lease, tokens left in those leases)`` (approximate mode);
        one vectorised pass over each shard under its lock, for metrics."""
        self.lease  # noqa: B018 -- raises in local mode
        now = self._clock()
        count, tokens = 0, 0.0
        for shard in self._shards:
            with shard.lock:
                _, rows = shard.occupied()
                cells = shard.arrays[0].reshape(-1, WIDTH)[rows]
                live = cells[:, EXPIRY] > now
                count += int(live.sum())
                tokens += float(cells[live, TOKENS].sum())
        return count, tokens

    def note_grant_batch(self, received_at: float, servers: int) -> None:
        """A grant batch arrived (the stream is healthy); ``servers`` are active in the fleet."""
        lease = self.lease
        lease.last_grant = received_at
        if servers != lease.servers:
            lease.set_servers(servers)

    # -- internals -----------------------------------------------------------------------------

    def _set_key(self, shard: Shard, i: int, client_id: str) -> None:
        """Store the stable key (and own limit) of a newly tracked client (approximate mode)."""
        cell = i * WIDTH + KEY
        ints = shard.ints[0]
        if ints[cell] == 0:
            key = client_key(client_id)
            ints[cell] = signed(key)
            if self._limits is not None:
                shard.views[0][i * WIDTH + LIMIT] = self._limits.current().limit(key)

    def _relimit(self) -> None:
        """Look every tracked client's own limit up again (the configuration changed)."""
        assert self._limits is not None
        table = self._limits.current()
        self._limits_version = table.version
        for shard in self._shards:
            with shard.lock:
                cells = shard.arrays[0].reshape(-1, WIDTH)
                _, rows = shard.occupied()
                keys = cells[rows, KEY].view(np.uint64)
                cells[rows, LIMIT] = table.lookup(keys)

    def _wait_for_lease(self, client_id: str, cost: int) -> Decision:
        """``wait`` cold start: poll up to ``wait_timeout`` for a lease, then decide again."""
        lease = self.lease
        deadline = self._clock() + lease.options.wait_timeout
        h = hash(client_id) or 1
        shard = self._shards[h & self._shard_mask]
        while True:
            now = self._clock()
            with shard.lock:
                i = shard.find(h)
                ready = i >= 0 and lease.leased(shard.views[0], i * WIDTH, now)
            if ready or now >= deadline:
                break
            self._sleep(min(0.005, deadline - now))
        decision = self._decide(client_id, cost, None, consume=True, wait=False)
        return decision

    def _wait_or_raise(
        self, client_id: str, decision: Decision, deadline: float | None
    ) -> float | None:
        """None when granted; else seconds to sleep before trying again."""
        if decision.allowed:
            return None
        wait = decision.retry_after
        if math.isinf(wait) or decision.reason not in (Reason.LIMITED, Reason.CAPACITY):
            raise RateLimitExceeded(
                client_id, decision, f"{client_id!r} can never be granted: {decision.reason}"
            )
        if deadline is not None and self._clock() + wait > deadline:
            raise AcquireTimeout(
                client_id,
                decision,
                f"{client_id!r} would wait {wait:.3f} s, beyond the acquire timeout",
            )
        return max(wait, 1e-4)

    def _consume_all(self, shard: Shard, i: int, now: float, cost: int) -> bool:
        """All policies or none: check every one, then take from every one."""
        views = shard.views
        if len(self._algos) == 1:  # consume() decides and counts (approximate-mode usage)
            algo = self._algos[0]
            return algo.consume(views[0], i * algo.width, now, cost)
        for algo, s in zip(self._algos, views, strict=True):
            if not algo.allows(s, i * algo.width, now, cost):
                return False
        for algo, s in zip(self._algos, views, strict=True):
            algo.consume(s, i * algo.width, now, cost)
        return True

    def _idle(self, shard: Shard, i: int, now: float) -> bool:
        """Whether row ``i`` limits no request this limiter could still accept.

        Judged at the earliest timestamp still accepted (clock - max_request_age), not at the
        inserting request's own (possibly late or early) timestamp. With the age check off,
        at the clock: a request stamped before that may then find the client forgotten.
        """
        now = self._clock() - self._max_age if self._max_age != math.inf else self._clock()
        views = shard.views
        return all(a.idle(s, i * a.width, now) for a, s in zip(self._algos, views, strict=True))

    def _refusal(self, reason: Reason, retry_after: float) -> Decision:
        p = self.policies[0]
        return Decision(False, p.limit, 0, 0.0, retry_after, reason)

    def _decide(
        self, client_id: str, cost: int, now: float | None, *, consume: bool, wait: bool = True
    ) -> Decision:
        client_id = validate_client_id(client_id)
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
        t = self._clock()
        if now is None:
            now = t
        elif isinstance(now, bool) or not isinstance(now, int | float) or not math.isfinite(now):
            raise ValueError(f"now must be a finite number of seconds, got {now!r}")
        elif now < t - self._max_age:
            return self._refusal(Reason.STALE, math.inf)
        elif now > t + self._max_skew:
            return self._refusal(Reason.FUTURE, now - t - self._max_skew)
        for a in self._algos:
            if cost > a.capacity:
                return Decision(False, a.limit, 0, 0.0, math.inf, Reason.COST_EXCEEDS_LIMIT)
        h = hash(client_id) or 1
        shard = self._shards[h & self._shard_mask]
        with shard.lock:
            i = shard.insert(h, now) if consume else shard.find(h)
            if i < 0 and consume:
                return self._refusal(Reason.CAPACITY, 1.0)
            if i < 0:
                if shard.count >= shard.max_count:  # check() could only track it by reclaiming
                    return self._refusal(Reason.CAPACITY, 1.0)
                return self._fresh_decision(cost)
            if self._keyed:
                self._set_key(shard, i, client_id)
            allowed = (
                self._consume_all(shard, i, now, cost)
                if consume
                else all(
                    a.allows(s, i * a.width, now, cost)
                    for a, s in zip(self._algos, shard.views, strict=True)
                )
            )
            decision = self._describe(shard, i, now, cost, allowed)
        if allowed or not consume or not wait or not self._waits:
            return decision
        return self._wait_for_lease(client_id, cost)

    def _describe(self, shard: Shard, i: int, now: float, cost: int, allowed: bool) -> Decision:
        """The Decision for row ``i`` after the decision: the most restrictive policy speaks."""
        best: tuple[int, float, int] | None = None
        retry = 0.0
        for a, s in zip(self._algos, shard.views, strict=True):
            b = i * a.width
            remaining = a.remaining(s, b, now)
            if best is None or remaining < best[0]:
                best = (remaining, a.reset_after(s, b, now), a.limit_of(s, b))
            if not allowed:
                retry = max(retry, a.retry_after(s, b, now, cost))
        assert best is not None
        remaining, reset_after, limit = best
        return Decision(
            allowed, limit, remaining, reset_after, retry, Reason.OK if allowed else Reason.LIMITED
        )

    def _fresh_decision(self, cost: int) -> Decision:
        a = min(self._algos, key=lambda a: a.capacity)
        return Decision(True, a.limit, a.capacity, 0.0, 0.0, Reason.OK)


def _resolve_policies(
    max_requests: int | None,
    window: float | None,
    policies: Sequence[Policy] | str | None,
    algorithm: str | None,
    burst: int | None,
) -> tuple[Policy, ...]:
    if policies is not None:
        if max_requests is not None or window is not None:
            raise ValueError("give either max_requests and time_window_seconds, or policies")
        if isinstance(policies, str):
            parsed = parse_rates(policies, algorithm=algorithm or DEFAULT_ALGORITHM)
        else:
            parsed = tuple(policies)
            if not parsed or not all(isinstance(p, Policy) for p in parsed):
                raise ValueError("policies must be a non-empty sequence of Policy")
        if algorithm is not None or burst is not None:
            parsed = tuple(
                Policy(
                    p.limit,
                    p.window,
                    burst if burst is not None else p.burst,
                    algorithm or p.algorithm,
                )
                for p in parsed
            )
        return parsed
    if max_requests is None or window is None:
        raise ValueError("max_requests and time_window_seconds are required (or give policies)")
    if isinstance(max_requests, bool) or not isinstance(max_requests, int) or max_requests <= 0:
        raise ValueError(f"max_requests must be a whole number > 0, got {max_requests!r}")
    if (
        isinstance(window, bool)
        or not isinstance(window, int | float)
        or not math.isfinite(window)
        or window <= 0
    ):
        raise ValueError(f"time_window_seconds must be a finite number > 0, got {window!r}")
    return (Policy(max_requests, window, burst, algorithm or DEFAULT_ALGORITHM),)
