"""Shared fixtures: where Kafka and Redis are, unique topics, per-test Redis keys.

Kafka and Redis are found, in this order:

1. ``DRL_KAFKA_BOOTSTRAP`` / ``DRL_REDIS_URL`` from the environment (``make test`` and
   ``scripts/with-services`` set them; set them yourself to use an existing cluster);
2. testcontainers (``KafkaContainer`` / ``RedisContainer``), only when a Docker engine answers;
3. the local services of ``scripts/services`` (one implementation: ``scripts/drl_services.py``),
   started if they are not running and stopped at the end of the session only if this session
   started them.

Integration tests are marked ``@pytest.mark.integration``.
"""

from __future__ import annotations

import functools
import os
import re
import sys
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

import pytest

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT / "scripts") not in sys.path:
    sys.path.insert(0, str(REPO_ROOT / "scripts"))

import drl_services  # noqa: E402
from producer.kafka_confluent import wait_for_leaders  # noqa: E402

if TYPE_CHECKING:
    import redis

TopicFactory = Callable[..., str]


@functools.cache
def docker_available() -> bool:
    """True when testcontainers is importable and a Docker engine answers a ping quickly."""
    if os.environ.get("DRL_TESTS_NO_DOCKER"):
        return False
    try:
        import docker  # type: ignore[import-untyped,unused-ignore]
        import testcontainers  # noqa: F401
    except ImportError:
        return False
    try:
        client = docker.from_env(timeout=3)
        try:
            return bool(client.ping())
        finally:
            client.close()
    except Exception:
        return False


@pytest.fixture(scope="session")
def services_config() -> drl_services.Config:
    return drl_services.Config.from_env()


@pytest.fixture(scope="session")
def kafka_bootstrap(services_config: drl_services.Config) -> Iterator[str]:
    """Bootstrap servers of a Kafka broker for the whole session."""
    env = os.environ.get("DRL_KAFKA_BOOTSTRAP")
    if env:
        yield env
        return
    if docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer() as container:
            yield str(container.get_bootstrap_server())
        return
    started = drl_services.up(services_config, "kafka")
    try:
        yield services_config.kafka_bootstrap
    finally:
        if started:
            drl_services.down(services_config, "kafka")


@pytest.fixture(scope="session")
def redis_url(services_config: drl_services.Config) -> Iterator[str]:
    """URL of a Redis server for the whole session."""
    env = os.environ.get("DRL_REDIS_URL")
    if env:
        yield env
        return
    if docker_available():
        from testcontainers.redis import RedisContainer

        with RedisContainer("redis:7") as container:
            host = container.get_container_host_ip()
            port = container.get_exposed_port(6379)
            yield f"redis://{host}:{port}/0"
        return
    started = drl_services.up(services_config, "redis")
    try:
        yield services_config.redis_url
    finally:
        if started:
            drl_services.down(services_config, "redis")


def _slug(request: pytest.FixtureRequest, limit: int = 40) -> str:
    name = re.sub(r"[^A-Za-z0-9._-]+", "-", request.node.name).strip("-.")
    return name[:limit] or "test"


@pytest.fixture
def unique_topic(kafka_bootstrap: str, request: pytest.FixtureRequest) -> Iterator[TopicFactory]:
    """Factory: ``unique_topic(partitions=1, config=None) -> name``.

    Creates a uniquely named topic, waits until every partition has a leader, and deletes the
    topics it created when the test ends.
    """
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    created: list[str] = []

    def make(partitions: int = 1, config: dict[str, str] | None = None) -> str:
        name = f"t-{_slug(request)}-{uuid.uuid4().hex[:10]}"
        futures = admin.create_topics(
            [NewTopic(name, num_partitions=partitions, replication_factor=1, config=config or {})],
            operation_timeout=30,
            request_timeout=30,
        )
        futures[name].result(timeout=60)
        created.append(name)
        wait_for_leaders(admin, name, partitions)
        return name

    yield make

    if created:
        futures = admin.delete_topics(created, operation_timeout=30, request_timeout=30)
        for fut in futures.values():
            try:
                fut.result(timeout=60)
            except Exception as exc:  # teardown must not hide the test's result
                print(f"warning: could not delete topic: {exc!r}", file=sys.stderr)


@pytest.fixture
def redis_prefix() -> str:
    """A key prefix unique to this test; ``redis_client`` deletes its keys at teardown."""
    return f"drl-test:{uuid.uuid4().hex[:12]}:"


@pytest.fixture
def redis_client(redis_url: str, redis_prefix: str) -> Iterator[redis.Redis]:
    """A ``redis.Redis`` on ``redis_url``; keys starting with ``redis_prefix`` are deleted after."""
    import redis as redis_lib

    client = redis_lib.Redis.from_url(redis_url, socket_timeout=10, socket_connect_timeout=10)
    try:
        yield client
    finally:
        try:
            keys = list(client.scan_iter(match=redis_prefix + "*", count=1000))
            if keys:
                client.delete(*keys)
        finally:
            client.close()


# -- measured figures: tests report what they measured; the summary prints them --------------

_MEASURED: list[tuple[str, str]] = []


@pytest.fixture
def measured(request: pytest.FixtureRequest) -> Callable[[str], None]:
    """``measured("worst window 400 (+0.0% vs L)")``: printed in the session summary."""

    def record(line: str) -> None:
        _MEASURED.append((request.node.nodeid, line))

    return record


def pytest_terminal_summary(terminalreporter: Any) -> None:
    if not _MEASURED:
        return
    terminalreporter.section("measured")
    for nodeid, line in _MEASURED:
        terminalreporter.write_line(f"{nodeid}: {line}")
