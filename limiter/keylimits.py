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
        self._table = KeyLimits.from_snapshot(service.snapshot(), policy)
        self._unsubscribe: Callable[[], None] = service.subscribe(self._changed)

    def current(self) -> KeyLimits:
        return self._table

    def _changed(self, old: ConfigSnapshot, new: ConfigSnapshot) -> None:
        table = KeyLimits.from_snapshot(new, self.policy)
        with self._lock:
            if table.version >= self._table.version:
                self._table = table
        log.info("approximate-mode limits: version %d, %d own limits", new.version, table.keys.size)

    def close(self) -> None:
        self._unsubscribe()
        close = getattr(self.service, "close", None)
        if self._owns and callable(close):
            close()
