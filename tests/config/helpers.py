"""Helpers of the configuration tests: a polling wait, and the private ``redis-server`` of
:mod:`tests.private_redis`."""

from __future__ import annotations

import time
from collections.abc import Callable

from tests.private_redis import PrivateRedis

__all__ = ["PrivateRedis", "wait_until"]


def wait_until(predicate: Callable[[], bool], timeout: float, step: float = 0.005) -> float:
    """Seconds until ``predicate()`` was true; AssertionError after ``timeout``."""
    start = time.perf_counter()
    while not predicate():
        if time.perf_counter() - start > timeout:
            raise AssertionError(f"condition not met within {timeout} s")
        time.sleep(step)
    return time.perf_counter() - start
