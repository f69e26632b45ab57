"""Fixtures of the configuration tests: a store prefix under the test's Redis prefix (deleted
after the test by ``redis_client``), services closed at teardown, and a private ``redis-server``
for the tests that stop, restart or password-protect Redis."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import redis

from limiter.config_redis import RedisConfigurationService

from .helpers import PrivateRedis


@pytest.fixture
def store_prefix(redis_client: redis.Redis, redis_prefix: str) -> str:
    """A configuration store prefix of this test alone (its keys are deleted afterwards)."""
    return redis_prefix + "config:"


@pytest.fixture
def services() -> Iterator[Callable[..., RedisConfigurationService]]:
    """Factory of :class:`RedisConfigurationService`; every one is closed at teardown."""
    made: list[RedisConfigurationService] = []

    def make(url: str, prefix: str, **options: Any) -> RedisConfigurationService:
        service = RedisConfigurationService(url, prefix, **options)
        made.append(service)
        return service

    yield make
    for service in made:
        service.close()


@pytest.fixture
def private_redis(tmp_path: Path) -> Iterator[PrivateRedis]:
    """Not started: the test calls ``start()`` with the options it needs; killed afterwards."""
    server = PrivateRedis(tmp_path)
    try:
        yield server
    finally:
        server.kill()
