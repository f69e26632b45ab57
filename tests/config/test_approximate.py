"""Approximate-mode limits from the configuration store, end to end on a real broker and a real
Redis: an aggregator and an app server (approximate limiter, agent, ``ConfiguredLimiter``) both
read per-client limits from the Redis store; a limit lowered while 4 threads send requests holds
(within the approximate bound) from <= 1 s after the write, and a raised one frees quota."""

from __future__ import annotations

import bisect
import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path

import pytest

from aggregator.service import Aggregator, AggregatorConfig
from limiter import ConfiguredLimiter, Policy, RateLimitConfiguration, RateLimiter, Request
from limiter.config_redis import RedisConfigurationService
from limiter.keylimits import ServiceKeyLimits
from limiter.keys import client_key
from limiter.lease import LeaseOptions
from producer import Agent, make_transport

WINDOW = 2.0
HIGH, LOW, RAISED = 200, 40, 120


@pytest.mark.integration
@pytest.mark.timeout(180)
def test_a_limit_changed_in_the_store_reaches_servers_and_aggregator(
    kafka_bootstrap: str,
    unique_topic: Callable[..., str],
    redis_url: str,
    store_prefix: str,
    services: Callable[..., RedisConfigurationService],
    measured: Callable[[str], None],
) -> None:
    policy = Policy(HIGH, WINDOW)
    approximate = RateLimitConfiguration(policies=(policy,), mode="approximate")
    admin = services(redis_url, store_prefix, watch=False)
    admin.set_default(approximate)
    admin.set_client(
        "hot", RateLimitConfiguration.from_rates(f"{HIGH} per 2 s", mode="approximate")
    )

    usage, grants = unique_topic(2), unique_topic(1)
    transport = make_transport(kafka_bootstrap)
    # the aggregator: limits from the store (what `drl aggregator run --config-url` does)
    agg_service = services(redis_url, store_prefix, reconcile_interval=1.0, fallback=approximate)
    agg = Aggregator(
        AggregatorConfig(
            policy, usage_topic=usage, grants_topic=grants, group=f"g-{uuid.uuid4().hex[:8]}"
        ),
        transport,
        limits=ServiceKeyLimits(agg_service, policy),
    )
    stop = threading.Event()
    agg_thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    agg_thread.start()
    # the app server: one approximate limiter with its agent, behind ConfiguredLimiter
    app_service = services(redis_url, store_prefix, reconcile_interval=1.0, fallback=approximate)
    limiter = RateLimiter(
        HIGH,
        WINDOW,
        mode="approximate",
        limits=ServiceKeyLimits(app_service, policy),
        lease_options=LeaseOptions(cold_start="reject"),
    )
    agent = Agent(limiter, transport, "app-1", usage_topic=usage, grants_topic=grants).start()
    configured = ConfiguredLimiter(app_service, approximate=limiter)

    admitted: list[list[float]] = [[] for _ in range(4)]
    errors: list[BaseException] = []
    halt = threading.Event()

    def worker(n: int) -> None:  # ~4 x 250 requests/s offered: well above every limit
        try:
            while not halt.is_set():
                t = time.time()
                if configured.allow_request("hot", Request(t)):
                    admitted[n].append(t)
                time.sleep(0.004)
        except BaseException as exc:
            errors.append(exc)

    def change(limit: int) -> float:
        written = time.time()
        version = admin.set_client(
            "hot", RateLimitConfiguration.from_rates(f"{limit} per 2 s", mode="approximate")
        )
        while app_service.version < version or agg_service.version < version:
            assert time.time() - written < 1.0, f"limit {limit} not seen within 1 s"
            time.sleep(0.001)
        return written

    threads = [threading.Thread(target=worker, args=(n,)) for n in range(4)]
    try:
        deadline = time.time() + 60
        while not agg.partitions or agg.rebuilding():
            assert time.time() < deadline, "the aggregator did not get ready"
            time.sleep(0.05)
        for th in threads:
            th.start()
        time.sleep(5.0)  # the hot client settles at its high limit
        lowered = change(LOW)
        time.sleep(5.0)
        raised = change(RAISED)
        time.sleep(5.0)
    finally:
        halt.set()
        for th in threads:
            th.join(timeout=10)
        stop.set()
        agg_thread.join(timeout=15)
        agent.stop()
        configured.close()
    end = time.time()
    assert not errors, errors
    times = sorted(t for per in admitted for t in per)

    def worst(a: float, b: float) -> int:
        """Most admissions in any window of WINDOW seconds that starts in [a, b)."""
        lo, hi = bisect.bisect_left(times, a), bisect.bisect_left(times, b)
        return max(
            (bisect.bisect_left(times, t + WINDOW) - i for i, t in enumerate(times[lo:hi], lo)),
            default=0,
        )

    before = worst(lowered - 3.0, lowered - WINDOW)
    after_low = worst(lowered + 1.0, raised - WINDOW)
    after_raise = worst(raised + 1.0, end - WINDOW)
    measured(
        f"hot client, most admitted in any {WINDOW:g} s window: {before} at limit {HIGH}; "
        f"{after_low} from 1 s after lowering to {LOW}; {after_raise} from 1 s after raising to "
        f"{RAISED}"
    )
    # one server, cold start "reject": the approximate bound is the limit itself
    assert before <= HIGH and before >= 0.8 * HIGH
    assert after_low <= LOW
    assert after_low >= 0.7 * LOW  # still served, at the new limit
    assert RAISED * 0.7 <= after_raise <= RAISED


def test_aggregator_run_reads_limits_from_a_file_or_the_store(
    tmp_path: Path, redis_url: str, store_prefix: str
) -> None:
    from aggregator.run import _limits

    path = tmp_path / "limits.toml"
    path.write_text(
        '[tiers.free]\nrate = "10 per 2 seconds"\nmode = "approximate"\n'
        '[assignments]\n"u1" = "free"\n'
    )
    policy = Policy(HIGH, WINDOW)
    table = _limits(str(path), policy).current()
    assert table.limit(client_key("u1")) == 10
    assert table.limit(client_key("u2")) == HIGH  # no default in the file: --limit's
    bad = tmp_path / "bad.toml"
    bad.write_text('[tiers.free]\nrate = "-1/s"\n')
    with pytest.raises(ValueError, match="limit"):
        _limits(str(bad), policy)
    # a Redis URL: the store (default prefix) through a reader that watches it
    source = _limits(redis_url, policy)
    try:
        assert source.current().default == HIGH
    finally:
        source.close()
