"""Approximate mode's per-client limits by stable key: the table, the lease's own-limit cell
(degraded share, cold-start allowance), and the limiter refreshing it when the table changes."""

from __future__ import annotations

import math

import numpy as np
from hypothesis import given, settings
from hypothesis import strategies as st

from limiter import RateLimiter, Request, StaticConfigurationService
from limiter.keylimits import FixedKeyLimits, KeyLimits, ServiceKeyLimits, approximate_limit
from limiter.keys import client_key
from limiter.lease import LIMIT, WIDTH, LeaseOptions
from limiter.rate import Policy


@settings(deadline=None, max_examples=100)
@given(
    st.dictionaries(st.integers(1, 2**64 - 1), st.integers(1, 10**6), max_size=30),
    st.lists(st.integers(1, 2**64 - 1), max_size=30),
    st.integers(1, 1000),
)
def test_lookup_matches_a_dict(own: dict[int, int], others: list[int], default: int) -> None:
    table = KeyLimits(
        np.array(list(own), dtype=np.uint64), np.array(list(own.values())), default, 3
    )
    asked = [*own, *others]
    want = [float(own.get(k, default)) for k in asked]
    assert table.lookup(np.array(asked, dtype=np.uint64)).tolist() == want
    assert [table.limit(k) for k in asked] == want


def test_from_a_configuration_only_approximate_limits_of_the_deployments_window() -> None:
    service = StaticConfigurationService(
        {
            "default": {"rate": "100 per 2 seconds", "mode": "approximate"},
            "tiers": {
                "free": {"rate": "10 per 2 seconds", "mode": "approximate"},
                "hourly": {"rate": "500/hour", "mode": "approximate"},  # another window
                "local": {"rate": "7 per 2 seconds"},  # local mode: not on the stream
            },
            "clients": {"vip": {"rate": "1000 per 2 seconds", "mode": "approximate"}},
            "assignments": {"f1": "free", "f2": "free", "h": "hourly", "l": "local"},
        }
    )
    policy = Policy(50, 2.0)
    table = KeyLimits.from_snapshot(service.snapshot(), policy)
    names = ["f1", "f2", "vip", "h", "l", "nobody"]
    got = table.lookup(np.array([client_key(n) for n in names], dtype=np.uint64))
    assert got.tolist() == [10, 10, 1000, 100, 100, 100]  # default: the configured default
    assert approximate_limit(service.get("h"), 2.0) is None
    # no approximate default: the deployment's policy
    local_default = StaticConfigurationService({"default": {"rate": "5/s"}})
    assert KeyLimits.from_snapshot(local_default.snapshot(), policy).default == 50


def test_service_limits_follow_changes() -> None:
    service = StaticConfigurationService(
        {"default": {"rate": "100 per 2 seconds", "mode": "approximate"}}
    )
    source = ServiceKeyLimits(service, Policy(100, 2.0))
    before = source.current()
    service.replace(
        {
            "default": {"rate": "100 per 2 seconds", "mode": "approximate"},
            "clients": {"x": {"rate": "20 per 2 seconds", "mode": "approximate"}},
        }
    )
    after = source.current()
    assert after.version > before.version and after.limit(client_key("x")) == 20
    source.close()
    service.replace({"default": {"rate": "3 per 2 seconds", "mode": "approximate"}})
    assert source.current() is after  # unsubscribed


class Clock:
    def __init__(self) -> None:
        self.t = 1000.0

    def __call__(self) -> float:
        return self.t


def _own_limit(limiter: RateLimiter, client: str) -> float:
    h = hash(client) or 1
    shard = limiter._shards[h & limiter._shard_mask]
    i = shard.find(h)
    assert i >= 0
    return float(shard.views[0][i * WIDTH + LIMIT])


@settings(deadline=None, max_examples=40)
@given(own=st.integers(1, 400), servers=st.integers(1, 4), seconds=st.integers(1, 6))
def test_degraded_share_follows_the_clients_own_limit(own: int, servers: int, seconds: int) -> None:
    """No grant for degraded_after: a client with its own limit L' gets at most L'/N + 1 per
    window (unit requests), never the policy's share."""
    clock = Clock()
    window = 10.0
    limits = FixedKeyLimits(KeyLimits.from_clients({"c": own}, 1000))
    limiter = RateLimiter(
        1000,
        window,
        mode="approximate",
        clock=clock,
        limits=limits,
        lease_options=LeaseOptions(expected_servers=servers, degraded_after=0.5),
    )
    clock.t += 1.0  # degraded from now on
    admitted = []
    for _ in range(int(seconds * window * 100)):  # 100 requests per second
        clock.t += 0.01
        if limiter.allow_request("c", Request(clock.t)):
            admitted.append(clock.t)
    assert _own_limit(limiter, "c") == own
    times = np.array(admitted)
    per_window = max(
        int(np.searchsorted(times, t + window, "left") - i) for i, t in enumerate(times)
    )
    assert per_window <= own / servers + 1
    # and not far below it: paced at one request per window * N / L' (each admission waits up
    # to one 10 ms request step more), not starved
    step = window * servers / own
    assert per_window >= math.floor(window / (step + 0.01)) - 1


def test_cold_start_allowance_follows_the_clients_own_limit() -> None:
    clock = Clock()
    limits = FixedKeyLimits(KeyLimits.from_clients({"big": 10_000, "small": 50}, 1000))
    limiter = RateLimiter(
        1000,
        60,
        mode="approximate",
        clock=clock,
        limits=limits,
        lease_options=LeaseOptions(cold_start_allowance=0.01),
    )
    # a = max(1, floor(0.01 * own)): 100 for "big", 1 for "small", 10 for others
    for name, allowance in (("big", 100), ("small", 1), ("other", 10)):
        assert limiter.allow_request(name, Request(clock.t))
        assert limiter.peek(name).remaining == 0  # the meter holds window / a
        clock.t += 60 / allowance + 1e-6
        limiter.note_grant_batch(clock.t, 1)  # the stream is healthy: cold start, not degraded
        assert limiter.peek(name).remaining == allowance
        clock.t -= 60 / allowance + 1e-6


def test_limiter_relimits_tracked_clients_when_the_table_changes() -> None:
    clock = Clock()
    service = StaticConfigurationService(
        {"default": {"rate": "100 per 2 seconds", "mode": "approximate"}}
    )
    source = ServiceKeyLimits(service, Policy(100, 2.0))
    limiter = RateLimiter(100, 2.0, mode="approximate", clock=clock, limits=source)
    limiter.allow_request("x", Request(clock.t))
    assert _own_limit(limiter, "x") == 100
    service.replace(
        {
            "default": {"rate": "100 per 2 seconds", "mode": "approximate"},
            "clients": {"x": {"rate": "20 per 2 seconds", "mode": "approximate"}},
        }
    )
    assert _own_limit(limiter, "x") == 100  # not yet: refreshed with the next usage drain
    limiter.drain_usage()
    assert _own_limit(limiter, "x") == 20
