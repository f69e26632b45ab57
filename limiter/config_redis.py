"""The fleet's configuration store in Redis, and a reader that serves it from memory.

>>> from limiter.config import RateLimitConfiguration
>>> from limiter.config_redis import RedisConfigurationService
>>> store = RedisConfigurationService("redis://127.0.0.1:36379/0")  # doctest: +SKIP
>>> store.set_tier("pro", RateLimitConfiguration.from_rates("1000/minute"))  # doctest: +SKIP
>>> store.assign("alice", "pro")  # doctest: +SKIP
>>> store.get("alice").rates  # doctest: +SKIP
'1000/minute'

Key layout (``prefix`` defaults to ``drl:config:``; use a Redis Cluster hash tag such as
``{drl:config}:`` to keep every key in one slot on a cluster)::

    {prefix}version      STRING  the version: INCRemented by every write, in the same transaction
    {prefix}default      STRING  the default configuration, canonical JSON
    {prefix}tiers        HASH    tier name -> configuration JSON
    {prefix}clients      HASH    client id -> override configuration JSON
    {prefix}assignments  HASH    client id -> tier name
    {prefix}changes      pub/sub channel: every write publishes its new version here

Writes are validated first, then applied in one ``MULTI``/``EXEC`` transaction under ``WATCH``
of the version key, which also sets the version to the next number and ``PUBLISH``es it: a
write is whole or absent, and two writers never interleave (the loser retries on the new state).

Readers keep a full snapshot in memory (``get`` is a dict lookup, never a network call). A
watcher thread reloads it (one ``MULTI`` of ``GET``/``HGETALL``: a consistent view) when a
message names another version, and every ``reconcile_interval`` seconds compares the version key
with its own, so a missed message costs at most that long. While Redis is unreachable the last
good snapshot is served and the watcher reconnects by itself. See docs/configuration.md.
"""

from __future__ import annotations

import contextlib
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final

from .clientid import validate_client_id
from .config import (
    FALLBACK_CONFIGURATION,
    ConfigDocument,
    ConfigSnapshot,
    RateLimitConfiguration,
    SnapshotHolder,
    configuration_from_json,
    configuration_to_json,
    validate_tier_name,
)

if TYPE_CHECKING:
    import redis
    from redis.client import Pipeline, PubSub

log = logging.getLogger("limiter.config")

DEFAULT_PREFIX: Final = "drl:config:"
#: Seconds between two comparisons of the stored version with the served one.
DEFAULT_RECONCILE_INTERVAL: Final = 2.0
#: Socket connect and read timeout of the store's Redis client, seconds.
DEFAULT_TIMEOUT: Final = 2.0
#: Most attempts of one write when other writers keep winning the race.
MAX_WRITE_ATTEMPTS: Final = 50


@dataclass(frozen=True, slots=True)
class StoreKeys:
    """The Redis names under one prefix."""

    version: str
    default: str
    tiers: str
    clients: str
    assignments: str
    channel: str

    @classmethod
    def under(cls, prefix: str) -> StoreKeys:
        return cls(
            prefix + "version",
            prefix + "default",
            prefix + "tiers",
            prefix + "clients",
            prefix + "assignments",
            prefix + "changes",
        )

    @property
    def data(self) -> tuple[str, str, str, str]:
        """The keys that hold configurations (not the version)."""
        return (self.default, self.tiers, self.clients, self.assignments)


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


class RedisConfigurationService(SnapshotHolder):
    """Configurations stored in Redis, served from an in-memory snapshot kept up to date.

    ``RedisConfigurationService(url_or_client, prefix="drl:config:", ...)``:

    - ``url_or_client``: a ``redis://`` or ``rediss://`` (TLS) URL, with AUTH as
      ``redis://user:password@host:port/db``; or a ``redis.Redis`` client (kept open on close).
    - ``watch`` (default True): run the watcher thread (pub/sub + periodic reconcile); ``load``
      (default True): load the store in the constructor. The admin command line writes with
      both off and reads with :meth:`read`.
    - ``reconcile_interval``: seconds between version comparisons (heals a missed message).
    - ``timeout``: socket connect and read timeout of a client built from a URL, seconds.
    - ``fallback``: served as the default while the store holds none
      (:data:`~limiter.config.FALLBACK_CONFIGURATION`).

    The constructor loads the store once; if Redis is unreachable it serves the fallback
    (version 0) and the watcher keeps trying. ``get`` never touches the network and never
    raises. Writes (:meth:`set_client`, :meth:`assign`, ...) raise :class:`ValueError` for bad
    input (nothing written) and the Redis client's exception if Redis fails (nothing written,
    unless the failure hid a successful ``EXEC``).
    """

    def __init__(
        self,
        url_or_client: str | redis.Redis,
        prefix: str = DEFAULT_PREFIX,
        *,
        watch: bool = True,
        load: bool = True,
        reconcile_interval: float = DEFAULT_RECONCILE_INTERVAL,
        timeout: float = DEFAULT_TIMEOUT,
        fallback: RateLimitConfiguration = FALLBACK_CONFIGURATION,
    ) -> None:
        import redis as redis_lib
        from redis.backoff import NoBackoff
        from redis.retry import Retry

        if not isinstance(prefix, str) or not prefix:
            raise ValueError(f"prefix must be a non-empty str, got {prefix!r}")
        if isinstance(reconcile_interval, bool) or not isinstance(reconcile_interval, int | float):
            raise ValueError(f"reconcile_interval must be seconds, got {reconcile_interval!r}")
        if not 0 < reconcile_interval < float("inf"):
            raise ValueError(f"reconcile_interval must be > 0 seconds, got {reconcile_interval!r}")
        if isinstance(timeout, bool) or not isinstance(timeout, int | float) or not timeout > 0:
            raise ValueError(f"timeout must be seconds > 0, got {timeout!r}")
        if not isinstance(fallback, RateLimitConfiguration):
            raise ValueError(f"fallback must be a RateLimitConfiguration, got {fallback!r}")
        self.prefix = prefix
        self.keys = StoreKeys.under(prefix)
        self.reconcile_interval = float(reconcile_interval)
        self._timeout = float(timeout)
        self.fallback = fallback
        self._errors: tuple[type[BaseException], ...] = (redis_lib.RedisError, OSError)
        self._watch_error = redis_lib.WatchError
        if isinstance(url_or_client, str):
            self._client: redis.Redis = redis_lib.Redis.from_url(
                url_or_client,
                socket_timeout=timeout,
                socket_connect_timeout=timeout,
                retry=Retry(NoBackoff(), 0),  # the watcher reconnects; a write is never resent
                health_check_interval=0,
            )
            self._owns_client = True
        elif hasattr(url_or_client, "pubsub"):
            self._client = url_or_client
            self._owns_client = False
        else:
            raise ValueError(
                f"url_or_client must be a redis:// URL or a redis.Redis client, got "
                f"{type(url_or_client).__name__}"
            )
        super().__init__(ConfigSnapshot(ConfigDocument(), 0, fallback))
        self._refresh_lock = threading.Lock()
        self._parsed: dict[tuple[str, bytes], RateLimitConfiguration] = {}
        self._stop = threading.Event()
        #: Counters: snapshots installed, pub/sub messages, reconciles that found a difference,
        #: Redis errors, watcher (re)connections (subscribed and reloaded).
        self.refreshes = 0
        self.messages = 0
        self.healed = 0
        self.errors = 0
        self.connections = 0
        #: The last failure (Redis or a stored entry that did not parse), or None.
        self.last_error: str | None = None
        #: False while the watcher cannot reach Redis (the last good snapshot is served).
        self.healthy = False
        if load:
            try:
                self.refresh()
                self.healthy = True
            except self._errors as exc:
                self._failed(exc)
            except ValueError as exc:
                self._bad_store(exc)
        self._thread: threading.Thread | None = None
        if watch:
            self._thread = threading.Thread(
                target=self._watch, name=f"drl-config-watcher[{prefix}]", daemon=True
            )
            self._thread.start()

    # -- reading ---------------------------------------------------------------------------------

    def read(self) -> tuple[int, ConfigDocument]:
        """The stored version and document, read now in one transaction (a consistent view).

        Raises the Redis client's exception if Redis fails, :class:`ValueError` if a stored
        entry is invalid (written around this module)."""
        k = self.keys
        pipe = self._client.pipeline(transaction=True)
        pipe.get(k.version)
        pipe.get(k.default)
        pipe.hgetall(k.tiers)
        pipe.hgetall(k.clients)
        pipe.hgetall(k.assignments)
        raw_version, raw_default, raw_tiers, raw_clients, raw_assignments = pipe.execute()
        version = int(raw_version) if raw_version is not None else 0
        parsed: dict[tuple[str, bytes], RateLimitConfiguration] = {}

        def parse(where: str, raw: bytes) -> RateLimitConfiguration:
            cached = self._parsed.get((where, raw))
            if cached is None:
                cached = configuration_from_json(raw, where=f"{self.prefix}{where}")
            parsed[(where, raw)] = cached
            return cached

        default = parse("default", raw_default) if raw_default is not None else None
        tiers = {_text(n): parse(f"tiers[{_text(n)}]", v) for n, v in raw_tiers.items()}
        clients = {_text(c): parse(f"clients[{_text(c)}]", v) for c, v in raw_clients.items()}
        assignments = {_text(c): _text(t) for c, t in raw_assignments.items()}
        for client, tier in assignments.items():
            if tier not in tiers:
                raise ValueError(
                    f"{k.assignments}[{client}] names tier {tier!r}, which {k.tiers} lacks"
                )
        self._parsed = parsed
        return version, ConfigDocument(default, tiers, clients, assignments)

    def refresh(self) -> bool:
        """Load the store now and install it if its version differs; True if installed.

        Keeps the served snapshot, and raises, if Redis fails or an entry is invalid. A store
        without a version key (empty: wiped, or restarted without persistence) never replaces
        a snapshot that came from Redis: that is logged, the last good snapshot stays.
        """
        with self._refresh_lock:
            version, document = self.read()
            current = self._snapshot
            if version == current.version:
                return False
            if version == 0 and current.version > 0:
                message = (
                    f"the configuration store {self.prefix!r} is empty (no {self.keys.version}): "
                    f"keeping version {current.version}; was Redis restarted without persistence?"
                )
                if self.last_error != message:
                    log.error("%s", message)
                self.last_error = message
                return False
            self._install(ConfigSnapshot(document, version, self.fallback))
            self.refreshes += 1
            return True

    def stored_version(self) -> int:
        """The version key now (0 if absent); one ``GET``. Raises if Redis fails."""
        raw = self._client.get(self.keys.version)
        return int(raw) if raw is not None else 0

    # -- the watcher -----------------------------------------------------------------------------

    def _watch(self) -> None:
        backoff = 0.05
        while not self._stop.is_set():
            pubsub: PubSub | None = None
            try:
                pubsub = self._client.pubsub()  # type: ignore[no-untyped-call]
                pubsub.subscribe(self.keys.channel)
                self._await_subscribed(pubsub)
                self._reload("connect")  # after SUBSCRIBE: no change falls between the two
                self.connections += 1
                if not self.healthy:
                    if self.connections > 1:
                        log.info("configuration store %r reachable again", self.prefix)
                    self.healthy = True
                backoff = 0.05
                self._listen(pubsub)
            except self._errors as exc:
                self._failed(exc)
                self._stop.wait(backoff)
                backoff = min(backoff * 2, 1.0)
            except Exception as exc:  # never let the thread die: the snapshot would freeze
                log.exception("configuration watcher %r failed", self.prefix)
                self._failed(exc)
                self._stop.wait(1.0)
            finally:
                if pubsub is not None:
                    with contextlib.suppress(Exception):  # a dead connection may fail to close
                        pubsub.close()

    def _await_subscribed(self, pubsub: PubSub) -> None:
        deadline = time.monotonic() + max(self._timeout, 1.0)
        while True:
            message = pubsub.get_message(timeout=0.5)
            if message is not None and message.get("type") == "subscribe":
                return
            if self._stop.is_set() or time.monotonic() > deadline:
                raise TimeoutError("no SUBSCRIBE confirmation from Redis")

    def _listen(self, pubsub: PubSub) -> None:
        next_reconcile = time.monotonic() + self.reconcile_interval
        while not self._stop.is_set():
            wait = max(0.0, min(0.25, next_reconcile - time.monotonic()))
            message = pubsub.get_message(timeout=wait)
            if message is not None and message.get("type") == "message":
                self.messages += 1
                try:
                    announced: int | None = int(message["data"])
                except (TypeError, ValueError):
                    announced = None
                if announced != self._snapshot.version:
                    self._reload("message")
            if time.monotonic() >= next_reconcile:
                stored = self.stored_version()
                if stored != self._snapshot.version and self._reload("reconcile"):
                    self.healed += 1
                    log.info(
                        "configuration %r: reconcile found version %d (no message seen)",
                        self.prefix,
                        stored,
                    )
                next_reconcile = time.monotonic() + self.reconcile_interval

    def _reload(self, why: str) -> bool:
        """:meth:`refresh`; an invalid store is logged and the last good snapshot kept."""
        try:
            installed = self.refresh()
        except ValueError as exc:
            self._bad_store(exc)
            return False
        if installed:
            log.debug("configuration %r: version %d (%s)", self.prefix, self.version, why)
        return installed

    def _failed(self, exc: BaseException) -> None:
        self.errors += 1
        self.last_error = f"{type(exc).__name__}: {exc}"
        if self.healthy or self.errors == 1:
            log.warning(
                "configuration store %r unreachable (%s); serving version %d",
                self.prefix,
                self.last_error,
                self.version,
            )
        self.healthy = False

    def _bad_store(self, exc: ValueError) -> None:
        message = f"invalid entry in the store, keeping version {self.version}: {exc}"
        if self.last_error != message:
            log.error("configuration %r: %s", self.prefix, message)
        self.last_error = message

    def stats(self) -> dict[str, Any]:
        """Counters and health of the reader."""
        return {
            "version": self.version,
            "healthy": self.healthy,
            "refreshes": self.refreshes,
            "messages": self.messages,
            "healed": self.healed,
            "errors": self.errors,
            "connections": self.connections,
            "last_error": self.last_error,
        }

    def close(self) -> None:
        """Stop the watcher; close the Redis connections if this service made the client."""
        self._stop.set()
        if self._thread is not None:
            self._thread.join(timeout=5.0)
        if self._owns_client:
            self._client.close()

    def __enter__(self) -> RedisConfigurationService:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    # -- writing ---------------------------------------------------------------------------------

    def _transaction(
        self,
        check: Callable[[Pipeline], bool],
        apply: Callable[[Pipeline], object],
    ) -> int | None:
        """Validate with ``check`` (reads under WATCH; False: nothing to do), then apply,
        set the next version and publish it, all in one MULTI/EXEC. Returns the new version,
        or None when ``check`` found nothing to do."""
        k = self.keys
        for _ in range(MAX_WRITE_ATTEMPTS):
            with self._client.pipeline(transaction=True) as pipe:
                try:
                    pipe.watch(k.version)  # type: ignore[no-untyped-call]
                    raw = pipe.get(k.version)
                    version = (int(raw) if raw is not None else 0) + 1
                    if not check(pipe):
                        return None
                    pipe.multi()
                    apply(pipe)
                    pipe.set(k.version, version)
                    pipe.publish(k.channel, version)
                    pipe.execute()
                    return version
                except self._watch_error:
                    continue
        raise RuntimeError(
            f"configuration write gave up after {MAX_WRITE_ATTEMPTS} attempts: "
            "other writers kept changing the store"
        )

    @staticmethod
    def _config(config: object) -> str:
        if not isinstance(config, RateLimitConfiguration):
            raise ValueError(f"expected a RateLimitConfiguration, got {type(config).__name__}")
        return configuration_to_json(config)

    def set_default(self, config: RateLimitConfiguration) -> int:
        """Store the default configuration; returns the new version."""
        value = self._config(config)
        v = self._transaction(lambda p: True, lambda p: p.set(self.keys.default, value))
        assert v is not None
        return v

    def set_client(self, client_id: str, config: RateLimitConfiguration) -> int:
        """Store ``client_id``'s override (it wins over its tier); returns the new version."""
        client_id = validate_client_id(client_id)
        value = self._config(config)
        v = self._transaction(lambda p: True, lambda p: p.hset(self.keys.clients, client_id, value))
        assert v is not None
        return v

    def delete_client(self, client_id: str) -> int | None:
        """Remove ``client_id``'s override and tier assignment (it gets the default); the new
        version, or None if nothing was stored for it."""
        client_id = validate_client_id(client_id)
        k = self.keys

        def check(p: Pipeline) -> bool:
            return bool(p.hexists(k.clients, client_id) or p.hexists(k.assignments, client_id))

        def apply(p: Pipeline) -> None:
            p.hdel(k.clients, client_id)
            p.hdel(k.assignments, client_id)

        return self._transaction(check, apply)

    def set_tier(self, tier: str, config: RateLimitConfiguration) -> int:
        """Create or change tier ``tier``: every client assigned to it follows."""
        tier = validate_tier_name(tier)
        value = self._config(config)
        v = self._transaction(lambda p: True, lambda p: p.hset(self.keys.tiers, tier, value))
        assert v is not None
        return v

    def delete_tier(self, tier: str) -> int | None:
        """Remove an unused tier; :class:`ValueError` while clients are assigned to it. The new
        version, or None if there was no such tier."""
        tier = validate_tier_name(tier)
        k = self.keys

        def check(p: Pipeline) -> bool:
            if not p.hexists(k.tiers, tier):
                return False
            users = sorted(
                _text(c) for c, t in p.hgetall(k.assignments).items() if _text(t) == tier
            )
            if users:
                shown = ", ".join(users[:5]) + (", ..." if len(users) > 5 else "")
                raise ValueError(
                    f"tier {tier!r} has {len(users)} assigned client(s) ({shown}); "
                    "assign them elsewhere first"
                )
            return True

        return self._transaction(check, lambda p: p.hdel(k.tiers, tier))

    def assign(self, client_id: str, tier: str) -> int:
        """Put ``client_id`` in ``tier`` (refused with :class:`ValueError` if no such tier)."""
        client_id = validate_client_id(client_id)
        tier = validate_tier_name(tier)
        k = self.keys

        def check(p: Pipeline) -> bool:
            if not p.hexists(k.tiers, tier):
                known = sorted(_text(t) for t in p.hkeys(k.tiers))
                raise ValueError(
                    f"unknown tier {tier!r}; the tiers are {', '.join(known) or '(none)'} "
                    "(create it with tier-set)"
                )
            return True

        v = self._transaction(check, lambda p: p.hset(k.assignments, client_id, tier))
        assert v is not None
        return v

    def unassign(self, client_id: str) -> int | None:
        """Take ``client_id`` out of its tier; the new version, or None if it had none."""
        client_id = validate_client_id(client_id)
        k = self.keys
        return self._transaction(
            lambda p: bool(p.hexists(k.assignments, client_id)),
            lambda p: p.hdel(k.assignments, client_id),
        )

    def import_document(self, document: ConfigDocument, *, replace: bool = True) -> int:
        """Write a whole validated document in one transaction: all of it or nothing.

        ``replace`` (default): the store becomes exactly the document (entries it lacks are
        removed; its default, if it has none, too). Otherwise entries are added or overwritten
        and the rest kept. Assignments must name a tier of the document (or, merging, one
        already stored): :class:`ValueError` otherwise, and nothing is written.
        """
        if not isinstance(document, ConfigDocument):
            raise ValueError(f"expected a ConfigDocument, got {type(document).__name__}")
        k = self.keys
        default = None if document.default is None else self._config(document.default)
        tiers = {n: self._config(c) for n, c in document.tiers.items()}
        clients = {c: self._config(v) for c, v in document.clients.items()}
        assignments = dict(document.assignments)

        def check(p: Pipeline) -> bool:
            known = set(tiers) if replace else set(tiers) | {_text(t) for t in p.hkeys(k.tiers)}
            for client, tier in sorted(assignments.items()):
                if tier not in known:
                    raise ValueError(f"assignments.{client}: unknown tier {tier!r}")
            return True

        def apply(p: Pipeline) -> None:
            if replace:
                p.delete(*k.data)
            if default is not None:
                p.set(k.default, default)
            mappings: tuple[tuple[str, dict[Any, Any]], ...] = (
                (k.tiers, tiers),
                (k.clients, clients),
                (k.assignments, assignments),
            )
            for key, mapping in mappings:
                if mapping:
                    p.hset(key, mapping=mapping)

        v = self._transaction(check, apply)
        assert v is not None
        return v
