"""``ConfiguredLimiter``: limits from a configuration service, changes applied without restart,
usage carried to the new limits, cost rules, strict mode in Redis, and a limit changed while four
threads send requests (real Redis store)."""

from __future__ import annotations

import bisect
import threading
import time
from collections.abc import Callable

import pytest
import redis

from limiter import RateLimiter, Reason, Request, StrictLimiter
from limiter.config import RateLimitConfiguration, StaticConfigurationService
from limiter.config_redis import RedisConfigurationService
from limiter.configured import ConfiguredLimiter

Factory = Callable[..., RedisConfigurationService]


class Clock:
    def __init__(self) -> None:
        self.t = 1_000_000.0

    def __call__(self) -> float:
        return self.t


def doc(**tiers: str) -> dict[str, object]:
    return {
        "default": {"rate": "100/minute"},
        "tiers": {name: {"rate": rate} for name, rate in tiers.items()},
    }


def test_one_limiter_per_distinct_configuration() -> None:
    service = StaticConfigurationService(
        {
            **doc(free="3/minute", pro="50/minute", also_free="3/minute"),
            "clients": {"vip": {"rate": "3/minute", "costs": {"POST": 3}}},
            "assignments": {"a": "free", "b": "free", "c": "also_free", "d": "pro"},
        }
    )
    limiter = ConfiguredLimiter(service)
    # free, also_free and vip's override have the same mode and policies: one limiter
    assert limiter.limiter_for("a") is limiter.limiter_for("b") is limiter.limiter_for("c")
    assert limiter.limiter_for("vip") is limiter.limiter_for("a")
    assert limiter.limiter_for("d") is not limiter.limiter_for("a")
    assert len(limiter.limiters()) == 3  # free, pro, default
    # each client still has its own state in the shared limiter
    assert [limiter.allow_request("a", Request()) for _ in range(4)] == [True] * 3 + [False]
    assert limiter.allow_request("b", Request())
    assert limiter.check("nobody").limit == 100  # unknown client: the default


def test_cost_rules() -> None:
    service = StaticConfigurationService(
        {"default": {"rate": "10/minute", "costs": {"POST": 4}, "default_cost": 2}}
    )
    limiter = ConfiguredLimiter(service)
    assert limiter.check("a", kind="POST").remaining == 6
    assert limiter.check("a").remaining == 4  # default_cost 2
    assert limiter.check("a", cost=1).remaining == 3  # an explicit cost wins
    assert limiter.allow_request("a", Request(), kind="GET")  # unnamed kind: default_cost
    assert not limiter.allow_request("a", Request(), kind="POST")
    assert limiter.peek("a", cost=1).remaining == 1


def test_lowered_limit_holds_at_once_and_raised_limit_frees_quota_at_once() -> None:
    clock = Clock()
    service = StaticConfigurationService({**doc(), "clients": {"alice": {"rate": "10/minute"}}})
    limiter = ConfiguredLimiter(service, clock=clock)
    for _ in range(8):
        assert limiter.check("alice").allowed
    # lowered below current use (8 used, new limit 5): the very next request is refused
    service.replace({**doc(), "clients": {"alice": {"rate": "5/minute"}}})
    d = limiter.check("alice")
    assert not d.allowed and d.limit == 5 and d.reason == Reason.LIMITED
    assert limiter.stats()["moves"] == 1
    # raised: quota freed at once (5 charged over from the last limit, 15 left)
    service.replace({**doc(), "clients": {"alice": {"rate": "20/minute"}}})
    d = limiter.check("alice")
    assert d.allowed and d.limit == 20 and d.remaining == 14
    # the charge weighs for one window, then the full allowance is back
    clock.t += 61
    assert limiter.check("alice").remaining == 19


def test_client_moved_between_tiers_carries_its_usage() -> None:
    clock = Clock()
    base = doc(free="10/minute", pro="100/minute")
    service = StaticConfigurationService({**base, "assignments": {"alice": "free", "bob": "free"}})
    limiter = ConfiguredLimiter(service, clock=clock)
    for _ in range(10):
        assert limiter.check("alice").allowed
    for _ in range(4):
        assert limiter.check("bob").allowed
    free_limiter = limiter.limiter_for("bob")
    assert not limiter.check("alice").allowed
    service.replace({**base, "assignments": {"alice": "pro", "bob": "free"}})
    d = limiter.check("alice")
    assert d.allowed and d.limit == 100 and d.remaining == 89  # her 10 came along
    # bob did not move: same limiter object, same state
    assert limiter.limiter_for("bob") is free_limiter
    assert limiter.check("bob").remaining == 5
    # alice's usage left the free limiter: back in free, she brings 11 (capped at 10)
    service.replace({**base, "assignments": {"alice": "free", "bob": "free"}})
    assert not limiter.check("alice").allowed
    assert free_limiter.peek("alice").remaining == 0
    # after the window, moved usage has expired everywhere
    clock.t += 61
    assert limiter.check("alice").remaining == 9


def test_clients_idle_through_the_change_keep_no_stale_usage() -> None:
    clock = Clock()
    service = StaticConfigurationService({**doc(), "clients": {"a": {"rate": "4/minute"}}})
    limiter = ConfiguredLimiter(service, clock=clock, max_request_age=None)
    for _ in range(4):
        limiter.check("a")
    service.replace({**doc(), "clients": {"a": {"rate": "6/minute"}}})
    clock.t += 3600  # the transition is long over when "a" comes back
    limiter._expire(time.monotonic() + 3600)  # as if monotonic time had passed too
    assert limiter.check("a").remaining == 5
    assert limiter.stats()["pending_transitions"] == 0


def test_strict_mode_in_redis_and_a_mode_change(
    redis_url: str, redis_client: redis.Redis, redis_prefix: str
) -> None:
    strict_doc = {"default": {"rate": "5/minute", "mode": "strict", "algorithm": "gcra"}}
    service = StaticConfigurationService(strict_doc)
    with pytest.raises(ValueError, match=r"give ConfiguredLimiter\(strict="):
        ConfiguredLimiter(service)
    with ConfiguredLimiter(
        service, strict=redis_url, strict_options={"key_prefix": redis_prefix}
    ) as limiter:
        strict = limiter.limiter_for("alice")
        assert isinstance(strict, StrictLimiter) and strict.algorithm == "gcra"
        assert [limiter.allow_request("alice", Request()) for _ in range(6)] == [True] * 5 + [False]
        assert redis_client.exists(*strict.keys_for("alice"))
        # strict -> local 3/minute: alice's 5 strict tokens come along, capped at 3
        service.replace({"default": {"rate": "3/minute"}})
        assert isinstance(limiter.limiter_for("alice"), RateLimiter)
        assert not limiter.check("alice").allowed
        assert not redis_client.exists(*strict.keys_for("alice"))  # cleared in Redis
        # local -> strict sliding window: the exact Redis log, usage carried over
        service.replace({"default": {"rate": "4/minute", "mode": "strict"}})
        strict2 = limiter.limiter_for("alice")
        assert isinstance(strict2, StrictLimiter) and strict2.algorithm == "sliding_window"
        d = limiter.check("alice")
        assert d.allowed and d.remaining == 0  # 3 carried + this one
        assert not limiter.check("alice").allowed
    # a factory instead of a URL
    made: list[RateLimitConfiguration] = []

    def factory(config: RateLimitConfiguration) -> StrictLimiter:
        made.append(config)
        return StrictLimiter(redis_url, config.policies, key_prefix=redis_prefix + "f:")

    with ConfiguredLimiter(StaticConfigurationService(strict_doc), strict=factory) as limiter:
        assert limiter.check("bob").allowed and len(made) == 1


def service_of_local() -> StaticConfigurationService:
    return StaticConfigurationService({"default": {"rate": "100/s"}})


def test_unsupported_and_bad_options() -> None:
    approx = StaticConfigurationService({"default": {"rate": "100/s", "mode": "approximate"}})
    with pytest.raises(ValueError, match=r"approximate limits.*give ConfiguredLimiter"):
        ConfiguredLimiter(approx)
    with pytest.raises(ValueError, match="one policy of window 60 s"):
        ConfiguredLimiter(approx, approximate=RateLimiter(100, 60, mode="approximate"))
    with pytest.raises(ValueError, match="mode='approximate'"):
        ConfiguredLimiter(service_of_local(), approximate=RateLimiter(100, 1))
    service = StaticConfigurationService(doc())
    with pytest.raises(ValueError, match="policies comes from the configuration"):
        ConfiguredLimiter(service, policies="5/s")
    with pytest.raises(ValueError, match="the mode comes from the configuration"):
        ConfiguredLimiter(service, mode="approximate")
    with pytest.raises(ValueError, match="strict_options need strict="):
        ConfiguredLimiter(service, strict_options={"timeout_ms": 5})
    with pytest.raises(ValueError, match="ConfigurationService"):
        ConfiguredLimiter(object())  # type: ignore[arg-type]
    # a later approximate configuration never fails requests: decided locally, logged
    limiter = ConfiguredLimiter(service)
    service.replace({"default": {"rate": "100/s", "mode": "approximate"}})
    assert limiter.version == 2 and limiter.allow_request("a", Request())
    assert isinstance(limiter.limiter_for("a"), RateLimiter)


@pytest.mark.integration
@pytest.mark.timeout(120)
def test_limit_changed_while_four_threads_send_requests(
    redis_url: str, store_prefix: str, services: Factory, measured: Callable[[str], None]
) -> None:
    """60 per 2 s, lowered to 10 per 2 s, then raised to 100 per 2 s through the Redis store,
    while 4 threads hammer one client. The new limit holds from <= 1 s after each write, the
    lowered one at once (the client's usage came along), and no request fails."""
    window, high, low, raised = 2.0, 60, 10, 100
    admin = services(redis_url, store_prefix, watch=False)
    admin.set_default(RateLimitConfiguration.from_rates("100/minute"))
    admin.set_client("hot", RateLimitConfiguration.from_rates(f"{high} per 2 seconds"))
    reader = services(redis_url, store_prefix, reconcile_interval=1.0)
    limiter = ConfiguredLimiter(reader)
    assert limiter.configuration("hot").policies[0].limit == high

    stop = threading.Event()
    admitted: list[list[float]] = [[] for _ in range(4)]
    calls = [0] * 4
    errors: list[BaseException] = []

    def worker(n: int) -> None:
        try:
            while not stop.is_set():
                t = time.time()
                ok = limiter.allow_request("hot", Request(t))
                assert ok is True or ok is False
                calls[n] += 1
                if ok:
                    admitted[n].append(t)
                time.sleep(0.001)
        except BaseException as exc:  # the test fails on any
            errors.append(exc)

    def change(limit: int) -> tuple[float, float]:
        """Write the new limit; (write time, time the limiter decides by it)."""
        written = time.time()
        version = admin.set_client("hot", RateLimitConfiguration.from_rates(f"{limit} per 2 s"))
        while limiter.version < version:
            assert time.time() - written < 1.0, f"limit {limit} not applied within 1 s"
            time.sleep(0.0002)
        return written, time.time()

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    for th in threads:
        th.start()
    try:
        time.sleep(2.5)
        t1, s1 = change(low)
        time.sleep(3.5)
        t2, s2 = change(raised)
        time.sleep(3.0)
    finally:
        stop.set()
        for th in threads:
            th.join(timeout=10)
    end = time.time()
    assert not errors, errors
    times = sorted(t for per_thread in admitted for t in per_thread)

    def count(a: float, b: float) -> int:
        return bisect.bisect_left(times, b) - bisect.bisect_left(times, a)

    def worst(a: float, b: float) -> int:
        """Most admissions in any window of ``window`` seconds starting in [a, b)."""
        starts = times[bisect.bisect_left(times, a) : bisect.bisect_left(times, b)]
        return max((count(s, min(s + window, b)) for s in starts), default=0)

    measured(
        f"limit change under 4 threads ({sum(calls)} requests): applied "
        f"{(s1 - t1) * 1000:.1f} ms (60 -> 10 per 2 s) and {(s2 - t2) * 1000:.1f} ms "
        "(10 -> 100) after the write"
    )
    # before: saturated at the old limit (so the lowered limit is below current use)
    assert worst(times[0], t1) <= high
    assert count(t1 - window, t1) >= high - 2
    # the new limit holds from <= 1 s after the write
    assert s1 - t1 < 1.0 and s2 - t2 < 1.0
    assert worst(t1 + 1.0, t2) <= low
    # ... and at once: the 60 used came along (capped at 10): nothing more for one window from
    # the write on (a sliding log saturated by a hammering start admits in bursts, every 2 s
    # from the start: none falls between the write, 2.5 s in, and the end of this window)
    assert count(t1, s1 + window - 0.1) <= 1
    # no request failed because of the change: admissions resume at the new rate
    assert low - 2 <= count(s1 + window, t2) <= 2 * low
    # raised: quota freed at once (at most 10 came along from the lowered limit); counted from
    # the write, since requests decided by the new routing before this thread saw the new
    # version (a loaded machine may not run it for milliseconds) belong to the new limit too
    assert count(t2, s2 + 1.0) >= raised - low - 2
    assert worst(t2 + 1.0, end) <= raised
