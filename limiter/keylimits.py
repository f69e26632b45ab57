"""Approximate mode's per-client limits, by stable client key: what servers and aggregators share.

The aggregator never sees client ids, only their stable keys (:func:`limiter.keys.client_key`),
so the configuration (:mod:`limiter.config`) is turned into a sorted array of the keys of every
client with its own approximate-mode limit, their limits, and the default limit for everyone
else. Approximate mode has one window per deployment (the aggregators' ``--limit``): a
configuration in approximate mode with another window, or with several policies, is not in the
table (its clients get the default) and is reported by :func:`approximate_limit`'s caller.

:class:`ServiceKeyLimits` keeps a table current with a :class:`~limiter.config.ConfigurationService`
(rebuilt on each change, ``O(configured clients)``); readers compare ``version`` and look keys up
in bulk (``searchsorted``), off the request path.

:class:`ScaledKeyLimits` wraps any source with adaptive factors per *scope* (``"*"``: every
client; ``"default"``: clients in no tier and without their own limit; else a tier's name): the
aggregators apply the factors they compute (docs/adaptive.md), the servers the ones they receive,
so that the degraded share, the cold-start allowance and ``Decision.limit`` (the
``RateLimit-Policy`` header) follow the effective limit.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable, Mapping
from typing import Protocol

import numpy as np

from .config import ConfigSnapshot, ConfigurationService, RateLimitConfiguration
from .keys import client_key
from .rate import Policy

log = logging.getLogger(__name__)


def approximate_limit(config: RateLimitConfiguration, window: float) -> int | None:
    """The limit of ``config`` in a deployment whose window is ``window``; None if ``config`` is
    not an approximate-mode configuration of one policy with that window."""
    if config.mode != "approximate" or len(config.policies) != 1:
        return None
    policy = config.policies[0]
    return policy.limit if policy.window == window else None


class KeyLimits:
    """Sorted keys with their own limit, and the default. Immutable."""

    __slots__ = ("_own", "default", "keys", "limits", "version")

    def __init__(
        self, keys: np.ndarray, limits: np.ndarray, default: float, version: int = 0
    ) -> None:
        order = np.argsort(keys, kind="stable")
        self.keys = np.asarray(keys, dtype=np.uint64)[order]
        self.limits = np.asarray(limits, dtype=np.float64)[order]
        self.default = float(default)
        self.version = version
        self._own: dict[int, float] = dict(
            zip(self.keys.tolist(), self.limits.tolist(), strict=True)
        )

    @classmethod
    def uniform(cls, limit: float, version: int = 0) -> KeyLimits:
        return cls(np.zeros(0, dtype=np.uint64), np.zeros(0), limit, version)

    @classmethod
    def from_clients(
        cls, limits: Mapping[str, float], default: float, version: int = 0
    ) -> KeyLimits:
        keys = np.array([client_key(c) for c in limits], dtype=np.uint64)
        return cls(keys, np.array(list(limits.values()), dtype=np.float64), default, version)

    @classmethod
    def from_snapshot(cls, snapshot: ConfigSnapshot, policy: Policy) -> KeyLimits:
        """Every configured client whose resolved configuration is approximate with the
        deployment's window; the default's limit if it is such a configuration, else
        ``policy.limit``."""
        window = policy.window
        own: dict[str, float] = {}
        for client, config in snapshot.resolved.items():
            limit = approximate_limit(config, window)
            if limit is not None:
                own[client] = limit
        default = approximate_limit(snapshot.default, window)
        return cls.from_clients(own, policy.limit if default is None else default, snapshot.version)

    def lookup(self, keys: np.ndarray) -> np.ndarray:
        """The limit of each of ``keys`` (uint64), float64."""
        keys = np.asarray(keys, dtype=np.uint64)
        out = np.full(keys.shape, self.default)
        if self.keys.size and keys.size:
            i = np.minimum(np.searchsorted(self.keys, keys), self.keys.size - 1)
            hit = self.keys[i] == keys
            out[hit] = self.limits[i[hit]]
        return out

    def limit(self, key: int) -> float:
        """The limit of one key (an unsigned 64-bit int)."""
        return self._own.get(key, self.default)


class LimitSource(Protocol):
    """Where the current :class:`KeyLimits` comes from (its ``version`` grows with changes)."""

    def current(self) -> KeyLimits: ...


#: The scope of every client, and that of the clients with no limit of their own.
ALL_SCOPE = "*"
DEFAULT_SCOPE = "default"


def tier_members(snapshot: ConfigSnapshot) -> dict[str, np.ndarray]:
    """Tier name -> the stable keys of the clients that resolve to that tier (an override of
    their own wins over their tier, as in :meth:`ConfigSnapshot.explain`)."""
    doc = snapshot.document
    members: dict[str, list[int]] = {}
    for client, tier in doc.assignments.items():
        if tier in doc.tiers and client not in doc.clients:
            members.setdefault(tier, []).append(client_key(client))
    return {t: np.array(keys, dtype=np.uint64) for t, keys in members.items()}


class ScaledKeyLimits:
    """A :class:`LimitSource` that multiplies another's limits by a factor per scope.

    A client's factor is the smallest of the factors of the scopes it is in: ``"*"`` (everyone),
    its tier (``tiers()``: tier -> member keys; default: the inner source's ``tiers`` method if it
    has one), and ``"default"`` for clients in no tier whose limit is the inner table's
    default. Unknown scopes are ignored. ``version`` grows whenever the inner version or
    the factors change, so that readers comparing versions (``PartitionState.relimit``, the
    server's ``RateLimiter``) look everything up again. The table is rebuilt lazily by
    :meth:`current` (``O(configured clients)``), never on the request path.
    """

    def __init__(
        self,
        inner: LimitSource,
        *,
        tiers: Callable[[], Mapping[str, np.ndarray]] | None = None,
    ) -> None:
        self.inner = inner
        found = getattr(inner, "tiers", None)
        self._tiers = tiers if tiers is not None else (found if callable(found) else None)
        self._lock = threading.Lock()
        self._factors: dict[str, float] = {}
        self._changes = 0
        self._version = 0
        self._built: tuple[int, int] | None = None  # (inner version, changes) of the table
        self._table = inner.current()

    def factors(self) -> dict[str, float]:
        """Scope -> factor currently applied (scopes at 1 are left out)."""
        with self._lock:
            return dict(self._factors)

    def set_factors(self, factors: Mapping[str, float]) -> bool:
        """Replace the factors (each in (0, 1]; 1 or absent: unscaled); True if they changed."""
        clean = {}
        for scope, f in factors.items():
            if not 0.0 < f <= 1.0:
                raise ValueError(f"factor of scope {scope!r} must be in (0, 1], got {f!r}")
            if f < 1.0:
                clean[scope] = float(f)
        with self._lock:
            if clean == self._factors:
                return False
            self._factors = clean
            self._changes += 1
            return True

    def current(self) -> KeyLimits:
        inner = self.inner.current()
        with self._lock:
            state = (inner.version, self._changes)
            if state != self._built:
                self._built = state
                self._version += 1
                self._table = self._scaled(inner, dict(self._factors))
            return self._table

    def _scaled(self, inner: KeyLimits, factors: dict[str, float]) -> KeyLimits:
        everyone = factors.get(ALL_SCOPE, 1.0)
        by_default = min(everyone, factors.get(DEFAULT_SCOPE, 1.0))
        tiers = {} if self._tiers is None else self._tiers()
        scaled = {t: f for t, f in factors.items() if t in tiers}
        if not scaled and by_default == everyone:
            # one factor for everyone (or none): scale the table as it is
            return KeyLimits(
                inner.keys, inner.limits * everyone, inner.default * everyone, self._version
            )
        # tier members must be listed: those of scaled tiers get their tier's factor, and when
        # the default scope has its own, those of every tier must escape it
        listed = tiers if by_default != everyone else {t: tiers[t] for t in scaled}
        keys = np.unique(np.concatenate([inner.keys, *listed.values()]))
        factor = np.full(keys.size, everyone)
        for t, f in scaled.items():
            member = np.isin(keys, tiers[t])
            factor[member] = np.minimum(factor[member], f)
        return KeyLimits(
            keys, inner.lookup(keys) * factor, inner.default * by_default, self._version
        )


class FixedKeyLimits:
    """A :class:`LimitSource` that never changes (tests, a static configuration)."""

    def __init__(self, table: KeyLimits) -> None:
        self.table = table

    def current(self) -> KeyLimits:
        return self.table


class ServiceKeyLimits:
    """A :class:`KeyLimits` kept current with a configuration service (thread-safe reads)."""

    def __init__(
        self, service: ConfigurationService, policy: Policy, *, owns_service: bool = False
    ) -> None:
        """``owns_service``: :meth:`close` closes ``service`` too."""
        self.policy = policy
        self.service = service
        self._owns = owns_service
        self._lock = threading.Lock()
        snapshot = service.snapshot()
        self._table = KeyLimits.from_snapshot(snapshot, policy)
        self._tiers = tier_members(snapshot)
        self._unsubscribe: Callable[[], None] = service.subscribe(self._changed)

    def current(self) -> KeyLimits:
        return self._table

    def tiers(self) -> Mapping[str, np.ndarray]:
        """Tier -> member keys of the current snapshot (:func:`tier_members`)."""
        return self._tiers

    def _changed(self, old: ConfigSnapshot, new: ConfigSnapshot) -> None:
        table = KeyLimits.from_snapshot(new, self.policy)
        tiers = tier_members(new)
        with self._lock:
            if table.version >= self._table.version:
                self._tiers = tiers
                self._table = table
        log.info("approximate-mode limits: version %d, %d own limits", new.version, table.keys.size)

    def close(self) -> None:
        self._unsubscribe()
        close = getattr(self.service, "close", None)
        if self._owns and callable(close):
            close()
