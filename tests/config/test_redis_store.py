"""The Redis configuration store against real Redis: round trips, the hierarchy, transactions
that refuse bad input and write nothing, propagation to another reader (measured), a reconcile
that heals a missed message, and a Redis that stops, pauses and comes back empty."""

from __future__ import annotations

import json
import statistics
import threading
import time
import uuid
from collections.abc import Callable
from typing import Any

import pytest
import redis
from hypothesis import HealthCheck, given, settings

from limiter.config import (
    FALLBACK_CONFIGURATION,
    ConfigDocument,
    RateLimitConfiguration,
    configuration_to_json,
    parse_document,
)
from limiter.config_redis import RedisConfigurationService

from .helpers import PrivateRedis, wait_until
from .test_model import DOC, documents

pytestmark = pytest.mark.integration

Factory = Callable[..., RedisConfigurationService]
FREE = RateLimitConfiguration.from_rates("10/minute")
PRO = RateLimitConfiguration.from_rates("1000/minute; 4000/hour", costs={"POST": 5})
DEFAULT = RateLimitConfiguration.from_rates("100/minute")


def store_dump(client: redis.Redis, prefix: str) -> dict[bytes, Any]:
    """Every key under ``prefix`` with its value: to compare before and after."""
    out: dict[bytes, Any] = {}
    for key in client.scan_iter(match=prefix + "*"):
        kind = client.type(key)
        out[key] = client.hgetall(key) if kind == b"hash" else client.get(key)
    return out


def test_round_trips_and_key_layout(
    redis_url: str, redis_client: redis.Redis, store_prefix: str, services: Factory
) -> None:
    store = services(redis_url, store_prefix, watch=False)
    assert store.version == 0 and store.get("anyone") == FALLBACK_CONFIGURATION
    assert store.explain("anyone").source == "fallback"
    assert store.set_default(DEFAULT) == 1
    assert store.set_tier("free", FREE) == 2
    assert store.set_tier("pro", PRO) == 3
    assert store.assign("alice", "pro") == 4
    bot = RateLimitConfiguration.from_rates("5/s", algorithm="gcra", burst=10, mode="strict")
    assert store.set_client("bot-7", bot) == 5
    # the documented layout: JSON strings and hashes under the prefix
    assert redis_client.get(store_prefix + "version") == b"5"
    assert json.loads(redis_client.get(store_prefix + "default") or b"") == {
        "mode": "local",
        "policies": [{"algorithm": "sliding_log", "limit": 100, "window": 60}],
    }
    assert redis_client.hget(store_prefix + "tiers", "pro") == configuration_to_json(PRO).encode()
    assert redis_client.hget(store_prefix + "assignments", "alice") == b"pro"
    assert redis_client.hexists(store_prefix + "clients", "bot-7")
    version, doc = store.read()
    assert version == 5
    assert doc == ConfigDocument(
        DEFAULT, {"free": FREE, "pro": PRO}, {"bot-7": bot}, {"alice": "pro"}
    )
    assert store.refresh() and store.version == 5
    assert store.get("alice") == PRO and store.get("bot-7") == bot and store.get("zed") == DEFAULT
    # deletes: nothing stored is not an error and writes nothing
    assert store.delete_client("bot-7") == 6
    assert store.delete_client("bot-7") is None
    assert store.unassign("alice") == 7
    assert store.unassign("alice") is None
    assert store.delete_tier("free") == 8
    assert store.delete_tier("free") is None
    assert store.stored_version() == 8


@settings(
    max_examples=25, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(doc=documents())
def test_import_then_read_is_the_document(
    redis_url: str, redis_client: redis.Redis, store_prefix: str, doc: ConfigDocument
) -> None:
    prefix = f"{store_prefix}{uuid.uuid4().hex[:8]}:"
    with RedisConfigurationService(redis_url, prefix, watch=False, load=False) as store:
        store.set_tier("stale", FREE)  # replaced away by the import
        store.import_document(doc)
        _, stored = store.read()
        assert stored == doc


def test_hierarchy_unknown_clients_and_moves_between_tiers(
    redis_url: str, store_prefix: str, services: Factory
) -> None:
    admin = services(redis_url, store_prefix, watch=False)
    admin.import_document(parse_document(DOC))
    reader = services(redis_url, store_prefix, reconcile_interval=5.0)
    free, pro = reader.snapshot().document.tiers["free"], reader.snapshot().document.tiers["pro"]
    assert reader.get("alice") == pro and reader.explain("alice").tier == "pro"
    assert reader.get("bob") == free
    assert reader.get("bot-7").rates == "5/second"  # its override beats tier enterprise
    for unknown in ("nobody", "x" * 256, "ünïcode"):
        assert reader.get(unknown).rates == "100/minute"
        assert reader.explain(unknown).source == "default"
    # move alice to free, then bob to pro
    v = admin.assign("alice", "free")
    wait_until(lambda: reader.version >= v, 2.0)
    assert reader.get("alice") == free and reader.explain("alice").tier == "free"
    v = admin.assign("bob", "pro")
    wait_until(lambda: reader.version >= v, 2.0)
    assert reader.get("bob") == pro
    # a tier changed: every member follows
    v = admin.set_tier("free", RateLimitConfiguration.from_rates("3/minute"))
    wait_until(lambda: reader.version >= v, 2.0)
    assert reader.get("alice").rates == "3/minute"
    # deleting the client's entries sends it back to the default
    v = admin.delete_client("alice") or 0
    wait_until(lambda: reader.version >= v, 2.0)
    assert reader.explain("alice").source == "default"


def test_bad_input_is_refused_and_nothing_is_stored(
    redis_url: str, redis_client: redis.Redis, store_prefix: str, services: Factory
) -> None:
    store = services(redis_url, store_prefix, watch=False)
    store.import_document(parse_document(DOC))
    before = store_dump(redis_client, store_prefix)
    assert before[(store_prefix + "version").encode()] == b"1"
    with pytest.raises(ValueError, match=r"unknown tier 'gold'; the tiers are enterprise, free"):
        store.assign("alice", "gold")
    with pytest.raises(ValueError, match=r"tier 'pro' has 1 assigned client\(s\) \(alice\)"):
        store.delete_tier("pro")
    with pytest.raises(ValueError, match=r"invalid tier name"):
        store.set_tier("bad name", FREE)
    with pytest.raises(ValueError, match=r"client_id must not be empty"):
        store.set_client("", FREE)
    with pytest.raises(ValueError, match=r"expected a RateLimitConfiguration"):
        store.set_client("alice", {"rate": "5/s"})  # type: ignore[arg-type]
    # a document built around the parser: the transaction's own check refuses it
    bad = ConfigDocument(DEFAULT, {"free": FREE}, {}, {"carol": "gold"})
    with pytest.raises(ValueError, match=r"assignments.carol: unknown tier 'gold'"):
        store.import_document(bad)
    with pytest.raises(ValueError, match=r"unknown tier 'gold'"):
        store.import_document(bad, replace=False)
    # configurations that cannot be built never reach the store
    cases: list[tuple[str, dict[str, Any]]] = [
        ("-5/minute", {}),
        ("5/minute", {"algorithm": "magic"}),
        ("5 per fortnight", {}),
    ]
    for rate, options in cases:
        with pytest.raises(ValueError):
            store.set_client("alice", RateLimitConfiguration.from_rates(rate, **options))
    assert store_dump(redis_client, store_prefix) == before


def test_propagation_to_another_instance_within_one_second(
    redis_url: str,
    store_prefix: str,
    services: Factory,
    measured: Callable[[str], None],
) -> None:
    admin = services(redis_url, store_prefix, watch=False)
    admin.set_default(DEFAULT)
    # a long reconcile interval: only the pub/sub message can make it in time
    reader = services(redis_url, store_prefix, reconcile_interval=30.0)
    wait_until(lambda: reader.connections == 1 and reader.version == 1, 5.0)
    latencies = []
    for i in range(20):
        config = RateLimitConfiguration.from_rates(f"{i + 1}/second")
        start = time.perf_counter()
        version = admin.set_client("alice", config)
        while reader.version < version:
            assert time.perf_counter() - start < 1.0, f"change {i} not seen within 1 s"
            time.sleep(0.0005)
        latencies.append(time.perf_counter() - start)
        assert reader.get("alice") == config
    assert reader.healed == 0
    line = (
        f"propagation write -> second instance: median {statistics.median(latencies) * 1000:.1f}"
        f" ms, max {max(latencies) * 1000:.1f} ms over {len(latencies)} changes"
    )
    print(line)
    measured(line)
    assert max(latencies) < 1.0


def test_reconcile_heals_a_missed_notification(
    redis_url: str, redis_client: redis.Redis, store_prefix: str, services: Factory
) -> None:
    admin = services(redis_url, store_prefix, watch=False)
    admin.set_default(DEFAULT)
    healing = services(redis_url, store_prefix, reconcile_interval=0.3)
    deaf = services(redis_url, store_prefix, reconcile_interval=60.0)  # the control
    wait_until(lambda: healing.connections == 1 and deaf.connections == 1, 5.0)
    assert healing.version == 1 and deaf.version == 1
    # a write whose message is lost: the entry and the version, no PUBLISH
    with redis_client.pipeline(transaction=True) as pipe:
        pipe.hset(store_prefix + "clients", "alice", configuration_to_json(FREE))
        pipe.incr(store_prefix + "version")
        pipe.execute()
    took = wait_until(lambda: healing.version == 2, 3.0)
    assert healing.get("alice") == FREE and healing.healed == 1
    assert took < 0.3 + 0.5
    time.sleep(0.5)
    # without a message, only the reconcile saw it
    assert deaf.version == 1 and deaf.get("alice") == DEFAULT


def test_invalid_stored_entry_keeps_the_last_good_snapshot(
    redis_url: str, redis_client: redis.Redis, store_prefix: str, services: Factory
) -> None:
    admin = services(redis_url, store_prefix, watch=False)
    admin.set_tier("free", FREE)
    reader = services(redis_url, store_prefix, reconcile_interval=0.2)
    assert reader.get("x") == FALLBACK_CONFIGURATION and reader.version == 1
    admin.set_default(DEFAULT)
    wait_until(lambda: reader.version == 2, 2.0)
    # written around the API: garbage, and an assignment to a missing tier
    redis_client.hset(store_prefix + "tiers", "free", b"{not json")
    redis_client.incr(store_prefix + "version")
    time.sleep(0.6)
    assert reader.version == 2 and reader.get("x") == DEFAULT
    assert "not valid JSON" in (reader.last_error or "")
    with pytest.raises(ValueError, match="not valid JSON"):
        admin.read()
    admin.set_tier("free", FREE)  # repaired through the API
    wait_until(lambda: reader.version == 4, 2.0)


def test_redis_down_serves_the_last_snapshot_and_the_watcher_comes_back(
    private_redis: PrivateRedis, services: Factory, measured: Callable[[str], None]
) -> None:
    private_redis.start()
    url, prefix = private_redis.url, "drl:config:"
    admin = services(url, prefix, watch=False)
    admin.set_default(DEFAULT)
    admin.set_tier("pro", PRO)
    admin.assign("alice", "pro")
    reader = services(url, prefix, reconcile_interval=0.2, timeout=0.3)
    assert reader.version == 3 and reader.healthy

    def serving() -> float:
        """Slowest of many gets; every one answers from the snapshot."""
        worst = 0.0
        for _ in range(2000):
            t = time.perf_counter()
            assert reader.get("alice") == PRO and reader.get("zed") == DEFAULT
            worst = max(worst, time.perf_counter() - t)
        return worst

    # paused: connections hang; gets do not
    private_redis.pause()
    try:
        wait_until(lambda: not reader.healthy, 3.0)
        paused_worst = serving()
    finally:
        private_redis.resume()
    wait_until(lambda: reader.healthy, 5.0)
    # stopped
    private_redis.kill()
    wait_until(lambda: not reader.healthy, 3.0)
    stopped_worst = serving()
    assert reader.version == 3 and reader.errors >= 1
    assert paused_worst < 0.05 and stopped_worst < 0.05
    measured(
        f"get() while Redis paused/stopped: worst {paused_worst * 1e6:.0f} / "
        f"{stopped_worst * 1e6:.0f} µs"
    )
    # back, but empty (no persistence): the last good snapshot stays
    private_redis.start()
    wait_until(lambda: reader.healthy, 5.0)
    time.sleep(0.5)
    assert reader.version == 3 and reader.get("alice") == PRO
    assert "is empty" in (reader.last_error or "")
    # a new write after the restart is followed: the watcher reconnected by itself
    admin2 = services(url, prefix, watch=False)
    admin2.set_default(FREE)
    wait_until(lambda: reader.version == 1, 2.0)
    assert reader.get("alice") == FREE  # the store now holds only the new default


def test_start_with_redis_down_serves_the_fallback(services: Factory) -> None:
    start = time.perf_counter()
    reader = services("redis://127.0.0.1:1/0", "drl:config:", reconcile_interval=0.2)
    assert time.perf_counter() - start < 2.0
    assert reader.get("alice") == FALLBACK_CONFIGURATION and reader.version == 0
    assert not reader.healthy and "ConnectionError" in (reader.last_error or "")
    with pytest.raises(redis.ConnectionError):
        reader.set_default(DEFAULT)


def test_auth_in_the_url(private_redis: PrivateRedis, services: Factory) -> None:
    private_redis.start(password="s3cret-pw")
    store = services(private_redis.url, "drl:config:", watch=False)
    assert store.set_default(DEFAULT) == 1
    reader = services(private_redis.url, "drl:config:", reconcile_interval=5.0)
    assert reader.get("x") == DEFAULT
    v = store.set_default(FREE)
    wait_until(lambda: reader.version == v, 2.0)
    bad_url = private_redis.url.replace("s3cret-pw", "wrong")
    with pytest.raises(redis.AuthenticationError):
        services(bad_url, "drl:config:", watch=False).set_default(DEFAULT)


def test_redis_killed_during_config_changes_loses_no_acknowledged_change(
    private_redis: PrivateRedis, services: Factory, measured: Callable[[str], None]
) -> None:
    """The store on a Redis with AOF persistence (``appendonly yes``; ``appendfsync always``
    here, ``everysec`` in docs/configuration.md: at most a second of writes at risk): Redis is
    SIGKILLed while a writer changes limits, then restarted on the same files. Every change the
    writer saw acknowledged is there afterwards, a change cut off is all there or not at all
    (MULTI/EXEC), the reader answers from its snapshot throughout and catches up by itself."""
    private_redis.start(appendonly=True)
    url, prefix = private_redis.url, "drl:config:"
    admin = services(url, prefix, watch=False, timeout=0.3)
    admin.set_default(DEFAULT)
    reader = services(url, prefix, reconcile_interval=0.2, timeout=0.3)
    acknowledged: dict[str, int] = {}  # client -> limit of its last acknowledged change
    failures: list[str] = []
    stop = threading.Event()

    def writer() -> None:
        n = 0
        while not stop.is_set():
            n += 1
            client, limit = f"c{n % 40}", 10 + n
            try:
                admin.set_client(client, RateLimitConfiguration.from_rates(f"{limit}/minute"))
            except (redis.RedisError, OSError) as e:
                failures.append(type(e).__name__)
                time.sleep(0.02)
                continue
            acknowledged[client] = limit

    worst = 0.0
    thread = threading.Thread(target=writer)
    thread.start()
    try:
        time.sleep(0.5)
        private_redis.kill()  # mid-change
        down = time.perf_counter()
        while time.perf_counter() - down < 1.0:  # answers come from the snapshot meanwhile
            t = time.perf_counter()
            reader.get("c1")
            worst = max(worst, time.perf_counter() - t)
        private_redis.start(appendonly=True)  # same directory: the AOF is replayed
        time.sleep(0.5)
    finally:
        stop.set()
        thread.join(timeout=10)
    version, document = admin.read()
    stored = {c: cfg.policies[0].limit for c, cfg in document.clients.items()}
    lost = {c: v for c, v in acknowledged.items() if stored.get(c) != v}
    wait_until(lambda: reader.version == version, 3.0)
    measured(
        f"Redis SIGKILLed during {len(acknowledged)} clients' changes, restarted with AOF: "
        f"{len(lost)} acknowledged changes lost, {len(failures)} writes refused while down; "
        f"reader's slowest get while down {worst * 1e6:.0f} µs; reader at version {version}"
    )
    assert failures, "the kill did not interrupt the writer"
    assert not lost, lost
    assert document.default == DEFAULT
    assert reader.get("c1") == document.clients.get("c1", DEFAULT)
    assert worst < 0.05
