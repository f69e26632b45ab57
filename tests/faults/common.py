"""What the fault tests share: the documented bounds (docs/consistency.md) and the measures."""

from __future__ import annotations

import math
import time
import uuid

import numpy as np

from tests.cluster.harness import Cluster, worst_window

#: The aggregator's defaults the tests rely on (aggregator/service.py): tick, lease TTL (10
#: ticks, at least 1 s) and the silence after which a server counts as gone.
TICK = 0.1
LEASE_TTL = 1.0
SERVER_TIMEOUT = 3.0
#: LeaseOptions.degraded_after (limiter/lease.py): no grant batch for this long -> degraded.
DEGRADED_AFTER = 1.0


def cold_allowance(limit: int, fraction: float) -> int:
    """``a = max(1, floor(f * L))``: optimistic cold-start tokens per window per server."""
    return max(1, math.floor(fraction * limit))


def healthy_bound(limit: int, servers: int, allowance: int) -> int:
    """docs/consistency.md, healthy with optimistic cold start: ``L + N*a`` in any window."""
    return limit + servers * allowance


def group_name() -> str:
    return f"drl-fault-{uuid.uuid4().hex[:8]}"


def sleep_until(t: float) -> None:
    while (left := t - time.time()) > 0:
        time.sleep(min(left, 0.05))


def admissions(cluster: Cluster, names: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Every admission of the nodes ``names`` (true time, client), from the logs they stream as
    they go (so a node killed with SIGKILL counts too)."""
    stamps, clients = [], []
    for name in names:
        st, cl = cluster.admitted(name)
        stamps.append(st)
        clients.append(cl)
    return np.concatenate(stamps), np.concatenate(clients)


def worst_per_client(
    stamps: np.ndarray, clients: np.ndarray, n_clients: int, window: float
) -> np.ndarray:
    """Most admissions of each client in any window of ``window`` seconds."""
    return np.array([worst_window(stamps[clients == c], window) for c in range(n_clients)])


def windows_within(stamps: np.ndarray, window: float, start: float, end: float) -> int:
    """Most admissions in any ``[t, t + window)`` with ``start <= t`` and ``t + window <= end``
    (0 when no window fits)."""
    if end - start < window:
        return 0
    s = np.sort(stamps)
    s = s[(s >= start) & (s < end)]
    if s.size == 0:
        return 0
    # a window's count is largest when it starts at an admission (or at `start`)
    starts = np.concatenate(([start], s[s <= end - window]))
    counts = np.searchsorted(s, starts + window, side="left") - np.searchsorted(s, starts)
    return int(counts.max())
