"""Strict mode: exact limits across any number of servers, one atomic Redis round trip each.

>>> from limiter import StrictLimiter
>>> strict = StrictLimiter("redis://127.0.0.1:6379/0", "10/second; 1000/hour")  # doctest: +SKIP
>>> strict.check("alice")                                                       # doctest: +SKIP
Decision(allowed=True, limit=10, remaining=9, reset_after=0.1, retry_after=0.0, reason=<...>)

Every decision runs one Lua script (``limiter/lua/gcra.lua`` or ``limiter/lua/sliding_window.lua``,
loaded with ``SCRIPT LOAD``, run with ``EVALSHA``) that decides all of a client's policies at once
on the Redis server's clock (``TIME``): admitted only if every policy allows, and then taken from
every one; a refusal takes from none. Keys are ``{prefix}{<client key, 16 hex digits>}:<policy>``;
the ``{...}`` hash tag puts all of a client's keys in one Redis Cluster slot.

When Redis fails (error, or no answer within ``timeout_ms``) the decision follows
``failure_mode``: ``fail_closed`` refuses, ``fail_open_bounded`` decides locally at a static share
of every limit. A circuit breaker stops calling a Redis that keeps failing. See
docs/strict-mode.md.
"""

from __future__ import annotations

import hashlib
import itertools
import math
import os
import threading
import time
from collections.abc import Callable, Sequence
from functools import cache
from importlib import resources
from typing import TYPE_CHECKING, Any, Final, cast

from .clientid import validate_client_id
from .decision import Decision, Reason
from .keys import client_key
from .metrics import DecisionMetrics, decision_metrics
from .rate import MAX_SLIDING_LOG_LIMIT, Policy, parse_rates
from .ratelimiter import RateLimiter
from .request import Request

if TYPE_CHECKING:
    import redis
    import redis.cluster

#: The algorithms strict mode runs in Redis. ``sliding_window`` here is the exact sliding log
#: (a sorted set of admission times), not the local two-counter approximation of that name.
STRICT_ALGORITHMS: Final = ("gcra", "sliding_window")
#: What a decision does when Redis fails or does not answer in time.
FAILURE_MODES: Final = ("fail_open_bounded", "fail_closed")
#: The reason of a ``fail_closed`` refusal while Redis is unavailable.
UNAVAILABLE: Final = Reason.UNAVAILABLE

BREAKER_CLOSED: Final = "closed"
BREAKER_OPEN: Final = "open"
BREAKER_HALF_OPEN: Final = "half_open"

#: Keys of :attr:`StrictLimiter.decisions`.
OUTCOMES: Final = (
    "allowed",  # Redis admitted
    "limited",  # Redis refused
    "fallback_allowed",  # Redis failed; the local static share admitted
    "fallback_limited",  # Redis failed; the local static share refused
    "unavailable",  # Redis failed; fail_closed refused
    "cost_exceeds_limit",  # refused without asking Redis: the cost can never fit
)

_US = 1_000_000


@cache
def lua_source(algorithm: str) -> str:
    """The text of the strict-mode script for ``algorithm`` (package data ``limiter/lua``)."""
    if algorithm not in STRICT_ALGORITHMS:
        raise ValueError(f"unknown strict algorithm {algorithm!r}")
    return resources.files("limiter").joinpath("lua", f"{algorithm}.lua").read_text("utf-8")


def _number(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float) or math.isnan(value):
        raise ValueError(f"{name} must be a number, got {value!r}")
    return float(value)


class CircuitBreaker:
    """Closed, then open after ``failures`` consecutive failures, then half-open after
    ``cooldown`` seconds: one probe goes through; its success closes, its failure reopens.

    Thread-safe. :meth:`attempt` says whether a call may go to the network now.
    """

    __slots__ = (
        "_clock",
        "_failures",
        "_lock",
        "_opened_at",
        "_probing",
        "_state",
        "cooldown",
        "threshold",
        "trips",
    )

    def __init__(self, failures: int, cooldown: float, clock: Callable[[], float]) -> None:
        if isinstance(failures, bool) or not isinstance(failures, int) or failures < 1:
            raise ValueError(f"breaker_failures must be a whole number >= 1, got {failures!r}")
        c = _number("breaker_cooldown", cooldown)
        if not 0 <= c < math.inf:
            raise ValueError(f"breaker_cooldown must be finite seconds >= 0, got {cooldown!r}")
        self.threshold = failures
        self.cooldown = c
        self._clock = clock
        self._lock = threading.Lock()
        self._state = BREAKER_CLOSED
        self._failures = 0
        self._opened_at = 0.0
        self._probing = False
        #: Times the breaker has opened (from closed or from a failed probe).
        self.trips = 0

    @property
    def state(self) -> str:
        """``closed``, ``open`` or ``half_open`` (open, with a probe in flight)."""
        return self._state

    def attempt(self) -> bool:
        """True if the caller may call Redis now (and then must report success or failure)."""
        if self._state == BREAKER_CLOSED:
            return True
        with self._lock:
            if self._state == BREAKER_CLOSED:
                return True
            if self._probing:
                return False
            now = self._clock()
            # A clock that went backwards counts as the cooldown having passed.
            if now - self._opened_at < self.cooldown and now >= self._opened_at:
                return False
            self._state = BREAKER_HALF_OPEN
            self._probing = True
            return True

    def retry_in(self) -> float:
        """Seconds until the next probe may go (0 when closed)."""
        if self._state == BREAKER_CLOSED:
            return 0.0
        return max(0.0, self._opened_at + self.cooldown - self._clock())

    def success(self) -> None:
        with self._lock:
            self._state = BREAKER_CLOSED
            self._failures = 0
            self._probing = False

    def failure(self) -> None:
        with self._lock:
            if self._state == BREAKER_HALF_OPEN:
                self._open()
            elif self._state == BREAKER_CLOSED:
                self._failures += 1
                if self._failures >= self.threshold:
                    self._open()
            # Already open: a straggler that left before the breaker opened; nothing to do.

    def _open(self) -> None:
        self._state = BREAKER_OPEN
        self._opened_at = self._clock()
        self._probing = False
        self._failures = 0
        self.trips += 1


class StrictLimiter:
    """Exact per-client limits shared by every server, decided in Redis.

    ``StrictLimiter(redis_url_or_client, policies, ...)``:

    - ``policies``: a rate string (``"10/second; 1000/hour"``), one :class:`Policy` or a sequence
      of them. A request passes only if every policy passes; a refusal consumes from none.
      ``Policy.burst`` is the GCRA bucket (default: the limit); ``Policy.algorithm`` is ignored.
    - ``algorithm``: ``gcra`` (default; one key per client per policy: any interval of ``t``
      seconds admits at most ``burst + limit * t / window``) or ``sliding_window`` (exact: a
      sorted-set log per client per policy, any interval of ``window`` seconds admits at most
      ``limit``; memory grows with the limit).
    - ``key_prefix``: prepended to every key (default ``"drl:"``; no ``{`` or ``}``).
    - ``timeout_ms``: socket connect and read timeout of the Redis client built from a URL, in
      milliseconds (a client you pass keeps its own timeouts and retry policy).
    - ``failure_mode``: ``fail_open_bounded`` (default: while Redis fails, decide locally with
      ``fallback_share`` of every limit per window) or ``fail_closed`` (refuse; the decision's
      reason is :data:`UNAVAILABLE`).
    - ``fallback_share``: fraction of each limit (and burst) this server may admit on its own
      while Redis fails, ``1 / expected servers`` for a fleet-wide bound of about one limit;
      default 1.0 (each server alone enforces the whole limit).
    - ``breaker_failures`` consecutive failures open the circuit breaker; while open no call goes
      to Redis (decisions take microseconds); after ``breaker_cooldown`` seconds one probe goes.
    - ``clock``: the breaker's and the local fallback's clock, seconds. Redis decides on its own.

    Thread-safe. Counters: :attr:`decisions` (by outcome, see :data:`OUTCOMES`),
    :attr:`redis_calls`, :attr:`redis_errors`, :attr:`noscript_reloads`, :attr:`short_circuits`,
    :attr:`breaker_state`, :attr:`breaker_trips`, :attr:`last_error`.
    """

    def __init__(
        self,
        redis_url_or_client: str | redis.Redis | redis.cluster.RedisCluster,
        policies: str | Policy | Sequence[Policy],
        *,
        algorithm: str = "gcra",
        key_prefix: str = "drl:",
        timeout_ms: float = 20,
        failure_mode: str = "fail_open_bounded",
        fallback_share: float | None = None,
        breaker_failures: int = 5,
        breaker_cooldown: float = 1.0,
        clock: Callable[[], float] = time.time,
        metrics: bool | DecisionMetrics = False,
    ) -> None:
        if algorithm not in STRICT_ALGORITHMS:
            raise ValueError(
                f"unknown strict algorithm {algorithm!r}; choose one of "
                f"{', '.join(STRICT_ALGORITHMS)}"
            )
        if failure_mode not in FAILURE_MODES:
            raise ValueError(
                f"unknown failure_mode {failure_mode!r}; choose one of {', '.join(FAILURE_MODES)}"
            )
        timeout = _number("timeout_ms", timeout_ms)
        if not 0 < timeout < math.inf:
            raise ValueError(
                f"timeout_ms must be a finite number of milliseconds > 0, got {timeout_ms!r}"
            )
        if not isinstance(key_prefix, str) or "{" in key_prefix or "}" in key_prefix:
            raise ValueError(
                f"key_prefix must be a str without '{{' or '}}' (the client part of every key is "
                f"the Redis Cluster hash tag), got {key_prefix!r}"
            )
        share = 1.0 if fallback_share is None else _number("fallback_share", fallback_share)
        if not 0 < share <= 1:
            raise ValueError(f"fallback_share must be in (0, 1], got {fallback_share!r}")
        if not callable(clock):
            raise ValueError("clock must be a callable returning seconds")

        self.algorithm = algorithm
        self.policies = _strict_policies(policies, algorithm)
        self.key_prefix = key_prefix
        self.timeout_ms = timeout
        self.failure_mode = failure_mode
        self.fallback_share = share
        self._clock = clock
        #: Decision counts and sampled latency for :class:`~limiter.metrics.LimiterCollector`.
        self.metrics = decision_metrics(metrics)
        self._breaker = CircuitBreaker(breaker_failures, breaker_cooldown, clock)

        self._tags: tuple[str, ...] = tuple(_policy_tag(p, algorithm) for p in self.policies)
        self._args: tuple[int, ...] = tuple(
            v for p in self.policies for v in _policy_args(p, algorithm)
        )
        self._capacity = min(_capacity(p, algorithm) for p in self.policies)
        self._tightest = min(self.policies, key=lambda p: p.limit)
        self._script = lua_source(algorithm)
        self._sha = hashlib.sha1(self._script.encode()).hexdigest()
        self._nonce_base = os.urandom(8).hex()
        self._seq = itertools.count()

        import redis as redis_lib
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        self._errors: tuple[type[BaseException], ...] = (redis_lib.RedisError, OSError)
        self._noscript: type[BaseException] = redis_lib.exceptions.NoScriptError
        if isinstance(redis_url_or_client, str):
            seconds = timeout / 1000.0
            self._redis: redis.Redis | redis.cluster.RedisCluster = redis_lib.Redis.from_url(
                redis_url_or_client,
                socket_timeout=seconds,
                socket_connect_timeout=seconds,
                # One attempt: a retry would double the time a decision may take.
                retry=Retry(NoBackoff(), 0),
                health_check_interval=0,
                # No CLIENT SETINFO round trips when a connection is (re)opened.
                driver_info=None,
            )
            self._owns_client = True
        elif hasattr(redis_url_or_client, "evalsha"):
            self._redis = redis_url_or_client
            self._owns_client = False
        else:
            raise ValueError(
                "redis_url_or_client must be a redis:// URL or a redis.Redis client, got "
                f"{type(redis_url_or_client).__name__}"
            )

        self._fallback: RateLimiter | None = None
        if failure_mode == "fail_open_bounded":
            self._fallback = RateLimiter(
                policies=[_fallback_policy(p, algorithm, share) for p in self.policies],
                clock=clock,
                max_request_age=None,
                max_clock_skew=None,
            )

        self._stats_lock = threading.Lock()
        #: Decisions by outcome (:data:`OUTCOMES`); peeks are not counted.
        self.decisions: dict[str, int] = dict.fromkeys(OUTCOMES, 0)
        #: Round trips attempted (EVALSHA, SCRIPT LOAD, DEL).
        self.redis_calls = 0
        #: Decisions (and peeks) for which Redis failed or did not answer in time.
        self.redis_errors = 0
        #: Times a NOSCRIPT answer made the script be loaded again.
        self.noscript_reloads = 0
        #: Decisions (and peeks) made without calling Redis because the breaker was open.
        self.short_circuits = 0
        #: The last Redis failure: ``"<exception type>: <message>"``.
        self.last_error: str | None = None

    # -- the public API -------------------------------------------------------------------------

    @property
    def mode(self) -> str:
        return "strict"

    def check(self, client_id: str, *, cost: int = 1) -> Decision:
        """Decide ``cost`` tokens for ``client_id``; consumes them from every policy if allowed."""
        return self.check_with_server_time(client_id, cost=cost)[0]

    def check_with_server_time(
        self, client_id: str, *, cost: int = 1
    ) -> tuple[Decision, float | None]:
        """:meth:`check`, and the Redis server time (epoch seconds, microsecond resolution) at
        which the script decided; ``None`` when the decision was made without Redis."""
        m = self.metrics
        if m is None:
            return self._decide(client_id, cost, consume=True)
        started = m.start()
        decision, at = self._decide(client_id, cost, consume=True)
        return m.decided(decision, started), at

    def peek(self, client_id: str, *, cost: int = 1) -> Decision:
        """What :meth:`check` would answer now, consuming nothing (one read-only round trip)."""
        return self._decide(client_id, cost, consume=False)[0]

    def allow_request(self, client_id: str, request: Request) -> bool:
        """The seed API: admit (True) or refuse one request of ``client_id``.

        Decided at the Redis server's time when the script runs; ``request.timestamp`` is not
        used (servers' clocks do not matter in strict mode).
        """
        return self.check_with_server_time(client_id)[0].allowed

    def clear_client(self, client_id: str) -> None:
        """Forget ``client_id`` in Redis (one ``DEL`` of all its keys) and in the local fallback.

        Raises the Redis client's exception if Redis fails: the client was then not cleared.
        """
        client_id = validate_client_id(client_id)
        if self._fallback is not None:
            self._fallback.clear_client(client_id)
        with self._stats_lock:
            self.redis_calls += 1
        self._redis.delete(*self.keys_for(client_id))

    def keys_for(self, client_id: str) -> list[str]:
        """The Redis keys of ``client_id``, one per policy, all in one Cluster hash slot."""
        client_id = validate_client_id(client_id)
        tag = f"{self.key_prefix}{{{client_key(client_id):016x}}}:"
        return [tag + t for t in self._tags]

    @property
    def breaker_state(self) -> str:
        """``closed``, ``open`` or ``half_open``."""
        return self._breaker.state

    @property
    def breaker_trips(self) -> int:
        """Times the circuit breaker has opened."""
        return self._breaker.trips

    def stats(self) -> dict[str, Any]:
        """A snapshot of every counter."""
        with self._stats_lock:
            return {
                "decisions": dict(self.decisions),
                "redis_calls": self.redis_calls,
                "redis_errors": self.redis_errors,
                "noscript_reloads": self.noscript_reloads,
                "short_circuits": self.short_circuits,
                "breaker_state": self.breaker_state,
                "breaker_trips": self.breaker_trips,
                "last_error": self.last_error,
            }

    def close(self) -> None:
        """Close the Redis connections if this limiter made the client (from a URL)."""
        if self._owns_client:
            self._redis.close()

    def __enter__(self) -> StrictLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ------------------------------------------------------------------------------

    def _decide(self, client_id: str, cost: int, *, consume: bool) -> tuple[Decision, float | None]:
        keys = self.keys_for(client_id)
        if isinstance(cost, bool) or not isinstance(cost, int) or cost < 1:
            raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
        if cost > self._capacity:
            p = self._tightest
            if consume:
                self._count("cost_exceeds_limit")
            return Decision(False, p.limit, 0, 0.0, math.inf, Reason.COST_EXCEEDS_LIMIT), None
        breaker = self._breaker
        if not breaker.attempt():
            with self._stats_lock:
                self.short_circuits += 1
            return self._without_redis(client_id, cost, consume), None
        try:
            reply = self._run(keys, ("1" if consume else "0", cost, self._nonce()))
        except self._errors as exc:
            breaker.failure()
            with self._stats_lock:
                self.redis_errors += 1
                self.last_error = f"{type(exc).__name__}: {exc}"
            return self._without_redis(client_id, cost, consume), None
        except BaseException:
            breaker.failure()  # never leave a half-open probe in flight
            raise
        breaker.success()
        decision = self._describe(reply)
        if consume:
            self._count("allowed" if decision.allowed else "limited")
        return decision, reply[1] / _US

    def _run(self, keys: list[str], head: tuple[str, int, str]) -> list[int]:
        """EVALSHA; on NOSCRIPT, SCRIPT LOAD and EVALSHA once more."""
        r = self._redis
        with self._stats_lock:
            self.redis_calls += 1
        try:
            reply = r.evalsha(self._sha, len(keys), *keys, *head, *self._args)
        except self._noscript:
            with self._stats_lock:
                self.noscript_reloads += 1
                self.redis_calls += 2
            sha = r.script_load(self._script)
            sha = sha.decode() if isinstance(sha, bytes) else str(sha)
            if sha != self._sha:  # cannot happen: Redis names a script by its SHA1
                self._sha = sha
            reply = r.evalsha(self._sha, len(keys), *keys, *head, *self._args)
        return cast("list[int]", reply)

    def _nonce(self) -> str:
        """Unique per call across processes: 64 random bits per limiter, the pid (a forked
        child shares the parent's bits and counter) and a counter."""
        return f"{self._nonce_base}.{os.getpid():x}.{next(self._seq):x}"

    def _describe(self, reply: list[int]) -> Decision:
        """The Decision of a script reply: the policy with the fewest tokens left speaks."""
        allowed = reply[0] == 1
        best = 0
        retry = 0
        for i in range(len(self.policies)):
            if reply[2 + 3 * i] < reply[2 + 3 * best]:
                best = i
            retry = max(retry, reply[4 + 3 * i])
        b = 2 + 3 * best
        return Decision(
            allowed,
            self.policies[best].limit,
            int(reply[b]),
            reply[b + 1] / _US,
            0.0 if allowed else retry / _US,
            Reason.OK if allowed else Reason.LIMITED,
        )

    def _without_redis(self, client_id: str, cost: int, consume: bool) -> Decision:
        fallback = self._fallback
        if fallback is None:
            if consume:
                self._count("unavailable")
            p = self._tightest
            return Decision(False, p.limit, 0, 0.0, self._breaker.retry_in(), UNAVAILABLE)
        if not consume:
            return fallback.peek(client_id, cost=cost)
        decision = fallback.check(client_id, cost=cost)
        self._count("fallback_allowed" if decision.allowed else "fallback_limited")
        return decision

    def _count(self, outcome: str) -> None:
        with self._stats_lock:
            self.decisions[outcome] += 1

    def __repr__(self) -> str:
        rates = "; ".join(str(p) for p in self.policies)
        return (
            f"StrictLimiter({rates!r}, algorithm={self.algorithm!r}, "
            f"failure_mode={self.failure_mode!r}, breaker={self.breaker_state!r})"
        )


def _strict_policies(
    policies: str | Policy | Sequence[Policy], algorithm: str
) -> tuple[Policy, ...]:
    if isinstance(policies, str):
        parsed: tuple[Policy, ...] = parse_rates(policies, algorithm="gcra")
    elif isinstance(policies, Policy):
        parsed = (policies,)
    else:
        parsed = tuple(policies)
        if not parsed or not all(isinstance(p, Policy) for p in parsed):
            raise ValueError("policies must be a rate string, a Policy or a sequence of Policy")
    unique: list[Policy] = []
    seen: set[str] = set()
    for p in parsed:
        if algorithm == "sliding_window" and p.burst is not None:
            raise ValueError(f"burst applies to gcra only, not the sliding window (policy {p})")
        if round(p.window * _US) < 1:
            raise ValueError(f"window of {p} is shorter than one microsecond")
        if algorithm == "gcra" and round(p.window * _US) < p.limit:
            raise ValueError(
                f"{p}: more than one token per microsecond; strict GCRA counts whole microseconds"
            )
        tag = _policy_tag(p, algorithm)
        if tag not in seen:
            seen.add(tag)
            unique.append(p)
    return tuple(unique)


def _policy_tag(p: Policy, algorithm: str) -> str:
    """The per-policy part of a key: algorithm, limit and window (``gcra:10/1s``)."""
    return f"{'gcra' if algorithm == 'gcra' else 'sw'}:{p.limit}/{p.window:g}s"


def _policy_args(p: Policy, algorithm: str) -> tuple[int, int]:
    window_us = round(p.window * _US)
    if algorithm == "gcra":
        # Whole microseconds keep the script's arithmetic exact; rounding the interval up never
        # admits more than the policy says (3/second runs at 3 per 1.000002 s).
        interval = -(-window_us // p.limit)
        return interval, p.capacity * interval
    return window_us, p.limit


def _capacity(p: Policy, algorithm: str) -> int:
    return p.capacity if algorithm == "gcra" else p.limit


def _fallback_policy(p: Policy, algorithm: str, share: float) -> Policy:
    """The local policy while Redis fails: ``share`` of the limit (and burst), at least 1."""
    limit = max(1, math.floor(p.limit * share + 1e-9))
    if algorithm == "gcra":
        burst = max(1, math.floor(p.capacity * share + 1e-9))
        return Policy(limit, p.window, burst, "gcra")
    local = "sliding_log" if limit <= MAX_SLIDING_LOG_LIMIT else "sliding_window"
    return Policy(limit, p.window, None, local)
