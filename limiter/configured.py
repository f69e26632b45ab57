"""``ConfiguredLimiter``: the seed API with each client's limits from a configuration service.

>>> from limiter import Request
>>> from limiter.config import StaticConfigurationService
>>> from limiter.configured import ConfiguredLimiter
>>> service = StaticConfigurationService({
...     "default": {"rate": "100/minute"},
...     "tiers": {"free": {"rate": "2/minute"}},
...     "assignments": {"bob": "free"},
... })
>>> limiter = ConfiguredLimiter(service)
>>> [limiter.allow_request("bob", Request()) for _ in range(3)]
[True, True, False]
>>> limiter.check("alice").limit
100

One limiter per distinct configuration (mode and policies), shared by every client that resolves
to it; the request path is a dict lookup on the service's snapshot, then that limiter's own
decision. When the configuration changes (the service calls back), a new routing is swapped in
and the clients whose configuration changed carry their usage to the new limiter on their next
request: a lowered limit holds at once, a raised one frees quota at once. See
:class:`ConfiguredLimiter` for what that move approximates.
"""

from __future__ import annotations

import logging
import threading
import time
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Any, Final

from .clientid import validate_client_id
from .config import ConfigSnapshot, ConfigurationService, RateLimitConfiguration, Resolution
from .decision import Decision
from .keylimits import approximate_limit
from .ratelimiter import DEFAULT_MAX_REQUEST_AGE, RateLimiter
from .request import Request
from .strict import StrictLimiter

if TYPE_CHECKING:
    import redis

log = logging.getLogger("limiter.config")

Limiter = RateLimiter | StrictLimiter
#: Builds the strict limiter of a strict configuration.
StrictFactory = Callable[[RateLimitConfiguration], StrictLimiter]

#: Most configuration changes whose moves are pending at once; an older one is dropped (its
#: clients that sent nothing since keep their usage behind: they get a fresh allowance).
MAX_TRANSITIONS: Final = 8
#: Lock stripes serialising the move of one client's usage (only while a change is pending).
_STRIPES: Final = 64


_RESERVED_OPTIONS: Final = ("max_requests", "time_window_seconds", "policies", "algorithm", "burst")


class _Entry:
    """One distinct configuration: its limiter (shared by configurations with the same mode
    and policies) and its cost rules."""

    __slots__ = ("config", "cost", "limiter", "strict")

    def __init__(self, config: RateLimitConfiguration, limiter: Limiter) -> None:
        self.config = config
        self.limiter = limiter
        self.cost = config.default_cost
        self.strict = isinstance(limiter, StrictLimiter)


class _Routing:
    """A snapshot turned into limiters: client id -> entry, and the default entry."""

    __slots__ = ("default", "route", "snapshot")

    def __init__(self, snapshot: ConfigSnapshot, route: dict[str, _Entry], default: _Entry) -> None:
        self.snapshot = snapshot
        self.route = route
        self.default = default

    def limiters(self) -> dict[tuple[str, Any], Limiter]:
        out = {e.config.limiter_key: e.limiter for e in self.route.values()}
        out[self.default.config.limiter_key] = self.default.limiter
        return out


class _Transition:
    """A replaced routing whose limiters may still hold usage of clients that moved away:
    pending until ``until`` (monotonic), after which that usage limits nothing any more."""

    __slots__ = ("moved", "old", "until")

    def __init__(self, old: _Routing, until: float) -> None:
        self.old = old
        self.until = until
        #: clients already moved out of ``old`` (or found with nothing to move)
        self.moved: set[str] = set()


class ConfiguredLimiter:
    """Rate-limit each client by the configuration ``service`` resolves for it.

    ``ConfiguredLimiter(service, strict=None, strict_options=None, **limiter_options)``:

    - ``service``: a :class:`~limiter.config.ConfigurationService` (static or Redis).
    - ``strict``: how strict configurations are decided: a Redis URL or ``redis.Redis`` client
      (one client shared by every strict configuration), or a factory
      ``config -> StrictLimiter``. Without it a strict configuration is refused at construction
      and, arriving later, is decided locally (logged as an error): requests never fail.
    - ``strict_options``: keyword arguments of :class:`~limiter.StrictLimiter` (``key_prefix``,
      ``timeout_ms``, ``failure_mode``, ...) when ``strict`` is a URL or client.
    - ``approximate``: the server's approximate-mode :class:`~limiter.RateLimiter` (with its
      agent: :func:`producer.connect`, given ``limits=``
      :class:`~limiter.keylimits.ServiceKeyLimits` over the same service). Every approximate
      configuration (one policy, that limiter's window) is decided by it: the aggregators grant
      each client by its own limit, read from the same configuration. Without it (or with
      another window) an approximate configuration is refused at construction and, arriving
      later, is decided locally (logged as an error).
    - ``limiter_options``: keyword arguments of every local :class:`~limiter.RateLimiter`
      (``clock``, ``max_request_age``, ``max_clients``, ...); policies come from the
      configuration.

    **Changes.** The service calls back with the new snapshot; a new routing is built (limiters
    of unchanged configurations are kept, with their state) and swapped in with one reference
    assignment: no request waits for it or fails because of it. A client whose configuration
    changed has its usage moved on its next request: its *used* tokens are read from the old
    limiter's ``peek`` (capacity minus remaining of the policy with the fewest tokens left),
    charged to the new limiter as one weighted request at the present time (capped at what the
    new limiter has left), and the old limiter forgets the client. Approximations: (1) the
    charge is stamped now, so it weighs for a whole new window although the old tokens would
    have left sooner (stricter than exact); (2) with several policies only the tightest one's
    usage moves (a long-window policy's older usage may be forgotten); (3) a request that read
    the old routing just before the swap and decides on the old limiter after the move is not
    carried over (at most one per thread per client per change); (4) a client that sends nothing
    for longer than the old configuration's longest window (or after more than
    :data:`MAX_TRANSITIONS` further changes) starts afresh, which its old usage would allow by
    then anyway. Strict limits keep their state in Redis under keys named by their policies, so
    unchanged policies keep their state across mode changes of other clients.

    Thread-safe. Requests carry no kind in the seed API: ``allow_request(client, request,
    kind=None)`` and ``check(client, kind=...)`` take one to apply the cost rules.
    """

    def __init__(
        self,
        service: ConfigurationService,
        *,
        strict: str | redis.Redis | StrictFactory | None = None,
        strict_options: Mapping[str, Any] | None = None,
        approximate: RateLimiter | None = None,
        **limiter_options: Any,
    ) -> None:
        for name in ("get", "snapshot", "subscribe"):
            if not callable(getattr(service, name, None)):
                raise ValueError(f"service must be a ConfigurationService, got {service!r}")
        reserved = [k for k in limiter_options if k in _RESERVED_OPTIONS]
        if reserved:
            raise ValueError(
                f"{reserved[0]} comes from the configuration, not from ConfiguredLimiter options"
            )
        if limiter_options.get("mode", "local") != "local":
            raise ValueError("the mode comes from the configuration")
        limiter_options.pop("mode", None)
        if approximate is not None and approximate.mode != "approximate":
            raise ValueError("approximate= takes a RateLimiter built with mode='approximate'")
        self.service = service
        self._approximate = approximate
        self._options = dict(limiter_options)
        self._strict_client: redis.Redis | None = None
        self._strict_factory = self._strict_factory_of(strict, dict(strict_options or {}))
        max_age = limiter_options.get("max_request_age", DEFAULT_MAX_REQUEST_AGE)
        #: seconds after a change during which old usage still counts, beyond the longest window
        self._slack = float(max_age) if max_age is not None else 0.0
        self._lock = threading.Lock()
        self._stripes = tuple(threading.Lock() for _ in range(_STRIPES))
        self._recent: tuple[_Transition, ...] = ()
        #: Snapshots applied since construction, clients whose usage moved, failed moves.
        self.changes = 0
        self.moves = 0
        self.move_errors = 0
        self._unsubscribe = service.subscribe(self._on_change)
        try:
            with self._lock:
                self._routing = self._build(service.snapshot(), strict_check=True)
        except BaseException:
            self._unsubscribe()
            raise

    # -- the seed API and the Decision API ---------------------------------------------------

    def allow_request(self, client_id: str, request: Request, kind: str | None = None) -> bool:
        """Admit (True) or refuse one request of ``client_id``; ``kind`` selects a cost rule."""
        if type(client_id) is not str:
            client_id = validate_client_id(client_id)
        r = self._routing
        e = r.route.get(client_id, r.default)
        if self._recent:
            self._settle(client_id, e.limiter)
        cost = e.cost if kind is None else e.config.cost_for(kind)
        if cost == 1 and not e.strict:
            return e.limiter.allow_request(client_id, request)
        if e.strict:
            return e.limiter.check(client_id, cost=cost).allowed
        limiter: RateLimiter = e.limiter  # type: ignore[assignment]
        return limiter.check(client_id, cost=cost, now=request.timestamp).allowed

    def check(
        self,
        client_id: str,
        *,
        cost: int | None = None,
        kind: str | None = None,
        now: float | None = None,
    ) -> Decision:
        """Decide and consume ``cost`` tokens (default: the cost rule of ``kind``) at ``now``
        (local limiters; strict ones decide at the Redis server's time)."""
        e = self._entry(client_id)
        c = e.config.cost_for(kind) if cost is None else cost
        if e.strict:
            return e.limiter.check(client_id, cost=c)
        limiter: RateLimiter = e.limiter  # type: ignore[assignment]
        return limiter.check(client_id, cost=c, now=now)

    def peek(
        self,
        client_id: str,
        *,
        cost: int | None = None,
        kind: str | None = None,
        now: float | None = None,
    ) -> Decision:
        """What :meth:`check` would answer, consuming nothing."""
        e = self._entry(client_id)
        c = e.config.cost_for(kind) if cost is None else cost
        if e.strict:
            return e.limiter.peek(client_id, cost=c)
        limiter: RateLimiter = e.limiter  # type: ignore[assignment]
        return limiter.peek(client_id, cost=c, now=now)

    def clear_client(self, client_id: str) -> None:
        """Forget ``client_id`` in its limiter and in any limiter it is moving from."""
        client_id = validate_client_id(client_id)
        r = self._routing
        seen = {id(r.route.get(client_id, r.default).limiter)}
        r.route.get(client_id, r.default).limiter.clear_client(client_id)
        for t in self._recent:
            old = t.old.route.get(client_id, t.old.default).limiter
            if id(old) not in seen:
                seen.add(id(old))
                old.clear_client(client_id)

    # -- introspection ---------------------------------------------------------------------------

    def configuration(self, client_id: str) -> RateLimitConfiguration:
        """The configuration ``client_id`` is decided by now."""
        r = self._routing
        return r.route.get(client_id, r.default).config

    def explain(self, client_id: str) -> Resolution:
        """The configuration of ``client_id`` and where it came from."""
        return self._routing.snapshot.explain(client_id)

    def limiter_for(self, client_id: str) -> Limiter:
        """The limiter that decides ``client_id`` now."""
        r = self._routing
        return r.route.get(client_id, r.default).limiter

    @property
    def version(self) -> int:
        """The configuration version this limiter decides by."""
        return self._routing.snapshot.version

    def limiters(self) -> list[Limiter]:
        """The limiters in use (one per distinct mode and policies)."""
        return list(self._routing.limiters().values())

    def stats(self) -> dict[str, Any]:
        return {
            "version": self.version,
            "limiters": len(self._routing.limiters()),
            "changes": self.changes,
            "moves": self.moves,
            "move_errors": self.move_errors,
            "pending_transitions": len(self._recent),
        }

    def close(self) -> None:
        """Stop following the service; close the shared strict Redis client if made here."""
        self._unsubscribe()
        if self._strict_client is not None:
            self._strict_client.close()

    def __enter__(self) -> ConfiguredLimiter:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- internals ---------------------------------------------------------------------------

    def _entry(self, client_id: str) -> _Entry:
        if type(client_id) is not str:
            client_id = validate_client_id(client_id)
        r = self._routing
        e = r.route.get(client_id, r.default)
        if self._recent:
            self._settle(client_id, e.limiter)
        return e

    def _strict_factory_of(
        self, strict: str | redis.Redis | StrictFactory | None, options: dict[str, Any]
    ) -> StrictFactory | None:
        if strict is None:
            if options:
                raise ValueError("strict_options need strict= (a Redis URL, client or factory)")
            return None
        if isinstance(strict, str) or hasattr(strict, "evalsha"):
            if "algorithm" in options:
                raise ValueError("the strict algorithm comes from the configuration")
            if isinstance(strict, str):
                import redis as redis_lib
                from redis.backoff import NoBackoff
                from redis.retry import Retry

                seconds = float(options.get("timeout_ms", 20)) / 1000.0
                client: redis.Redis = redis_lib.Redis.from_url(
                    strict,
                    socket_timeout=seconds,
                    socket_connect_timeout=seconds,
                    retry=Retry(NoBackoff(), 0),
                    health_check_interval=0,
                )
                self._strict_client = client
            else:
                client = strict  # type: ignore[assignment]

            def factory(config: RateLimitConfiguration) -> StrictLimiter:
                return StrictLimiter(
                    client, config.policies, algorithm=config.strict_algorithm, **options
                )

            return factory
        if callable(strict):
            if options:
                raise ValueError("strict_options apply to a URL or client, not to a factory")
            return strict
        raise ValueError(
            f"strict must be a Redis URL, a redis.Redis client or a factory, got {strict!r}"
        )

    def _make(self, config: RateLimitConfiguration, strict_check: bool) -> Limiter:
        if config.mode == "approximate":
            a = self._approximate
            if a is not None and approximate_limit(config, a.policies[0].window) is not None:
                return a
            problem = (
                "give ConfiguredLimiter(approximate=<RateLimiter(mode='approximate') with its "
                "agent>)"
                if a is None
                else f"approximate mode here has one policy of window {a.policies[0].window:g} s"
            )
            if strict_check:
                raise ValueError(f"the configuration has approximate limits ({config}): {problem}")
            log.error("approximate configuration %s: %s; deciding it locally", config, problem)
        if config.mode == "strict":
            if self._strict_factory is not None:
                return self._strict_factory(config)
            if strict_check:
                raise ValueError(
                    f"the configuration has strict limits ({config}): give "
                    "ConfiguredLimiter(strict=<redis URL, client or factory>)"
                )
            log.error("strict configuration %s without strict=: deciding it locally", config)
        return RateLimiter(policies=config.policies, **self._options)

    def _build(self, snapshot: ConfigSnapshot, *, strict_check: bool = False) -> _Routing:
        """The routing of ``snapshot``, reusing the limiters (and state) of the current and
        pending routings for configurations that did not change."""
        limiters: dict[tuple[str, Any], Limiter] = {}
        for t in reversed(self._recent):
            limiters.update(t.old.limiters())
        current: _Routing | None = getattr(self, "_routing", None)
        if current is not None:
            limiters.update(current.limiters())
        entries: dict[int, _Entry] = {}
        by_value: dict[RateLimitConfiguration, _Entry] = {}

        def entry(config: RateLimitConfiguration) -> _Entry:
            e = entries.get(id(config))
            if e is None:
                e = by_value.get(config)
                if e is None:
                    limiter = limiters.get(config.limiter_key)
                    if limiter is None:
                        limiter = self._make(config, strict_check)
                        limiters[config.limiter_key] = limiter
                    e = by_value[config] = _Entry(config, limiter)
                entries[id(config)] = e
            return e

        default = entry(snapshot.default)
        route = {client: entry(config) for client, config in snapshot.resolved.items()}
        return _Routing(snapshot, route, default)

    def _on_change(self, old: ConfigSnapshot, new: ConfigSnapshot) -> None:
        """The service installed ``new``: build its routing and swap it in."""
        with self._lock:
            current: _Routing | None = getattr(self, "_routing", None)
            if current is None or new is current.snapshot:  # still in __init__: it reads `new`
                return
            try:
                routing = self._build(new)
            except Exception:
                log.exception("configuration version %d could not be applied", new.version)
                return
            now = time.monotonic()
            horizon = max(c.horizon for c in current.snapshot.configurations())
            live = tuple(t for t in self._recent if t.until > now)[: MAX_TRANSITIONS - 1]
            # pending moves first, then the routing: a request that sees the new routing also
            # sees the transition that moves its usage
            self._recent = (_Transition(current, now + horizon + self._slack + 1.0), *live)
            self._routing = routing
            self.changes += 1

    def _settle(self, client_id: str, limiter: Limiter) -> None:
        """Move ``client_id``'s usage out of the limiters of replaced routings into ``limiter``
        (once per change), before it is decided. Never raises."""
        recent = self._recent
        now = time.monotonic()
        for t in recent:
            if t.until <= now:
                self._expire(now)
                continue
            old = t.old.route.get(client_id, t.old.default)
            if old.limiter is limiter or client_id in t.moved:
                continue
            with self._stripes[hash(client_id) & (_STRIPES - 1)]:
                if client_id in t.moved:
                    continue
                try:
                    if self._move(client_id, old, limiter):
                        self.moves += 1
                except Exception:
                    self.move_errors += 1
                    log.exception("moving the usage of %r failed; it starts afresh", client_id)
                t.moved.add(client_id)

    def _expire(self, now: float) -> None:
        with self._lock:
            self._recent = tuple(t for t in self._recent if t.until > now)

    @staticmethod
    def _move(client_id: str, old: _Entry, new: Limiter) -> bool:
        """Charge ``client_id``'s usage in ``old`` to ``new`` and forget it in ``old``."""
        d = old.limiter.peek(client_id)
        capacity = next((p.capacity for p in old.config.policies if p.limit == d.limit), d.limit)
        used = max(0, capacity - d.remaining)
        moved = False
        if used > 0:
            room = new.peek(client_id).remaining
            charge = min(used, room)
            if charge > 0:
                new.check(client_id, cost=charge)
                moved = True
        old.limiter.clear_client(client_id)
        return moved
