"""Fixtures of the fault-injection tests: private services (a broker or a redis-server of one
test alone, on free ports, started and stopped with scripts/drl_services.py's own code) and the
real-process cluster of tests/cluster/harness.py."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

import drl_services
from tests.cluster.harness import Cluster
from tests.private_redis import free_port


@pytest.fixture
def private_services(tmp_path: Path) -> Iterator[drl_services.Config]:
    """A drl_services Config of this test alone: its own ports and state under ``tmp_path``, the
    Kafka jars shared with the default state directory (no second download). Whatever the test
    started with it is stopped at the end; the session's Kafka and Redis are never touched."""
    default = drl_services.Config.from_env()
    cfg = drl_services.Config(
        state_dir=tmp_path / "services",
        kafka_port=free_port(),
        kafka_controller_port=free_port(),
        redis_port=free_port(),
        cache_dir=default.cache_root,
    )
    try:
        yield cfg
    finally:
        for name in drl_services.SERVICES:
            with contextlib.suppress(Exception):
                drl_services.down(cfg, name)


def start_private(cfg: drl_services.Config, name: drl_services.ServiceName) -> None:
    """``drl_services.up`` for a private service; skips the test when the service cannot run
    here (no Java, no jars and no Maven, no redis-server)."""
    try:
        started = drl_services.up(cfg, name, timeout=120)
    except drl_services.ServiceError as e:
        if name == "kafka" and not drl_services.kafka_libs_dir(cfg).exists():
            pytest.skip(f"cannot start a private Kafka broker: {e}")
        if name == "redis" and "not installed" in str(e):
            pytest.skip(str(e))
        raise
    assert started, f"private {name} on {cfg.port(name)} was already running?"


@pytest.fixture
def make_cluster(tmp_path: Path) -> Iterator[Callable[..., Cluster]]:
    """``make_cluster(bootstrap, usage, grants, limit, window) -> Cluster``; every process it
    started is killed at the end."""
    made: list[Cluster] = []

    def make(bootstrap: str, usage: str, grants: str, limit: int, window: float) -> Cluster:
        workdir = tmp_path / f"cluster-{len(made)}"
        workdir.mkdir()
        c = Cluster(bootstrap, usage, grants, limit, window, workdir)
        made.append(c)
        return c

    try:
        yield make
    finally:
        for c in made:
            c.close()
