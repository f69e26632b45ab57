"""scripts/services is idempotent; scripts/with-services stops only what it started."""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from pathlib import Path

import pytest

import drl_services

pytestmark = pytest.mark.integration

REPO_ROOT = Path(__file__).resolve().parents[2]
SERVICES = REPO_ROOT / "scripts" / "services"
WITH_SERVICES = REPO_ROOT / "scripts" / "with-services"


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


def _run(script: Path, *args: str, env: dict[str, str]) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, str(script), *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )


@pytest.fixture
def private_redis_env(tmp_path: Path) -> dict[str, str]:
    """Environment for a second Redis on a free port with its own state dir."""
    env = {k: v for k, v in os.environ.items() if k not in ("DRL_KAFKA_BOOTSTRAP", "DRL_REDIS_URL")}
    env["DRL_SERVICES_DIR"] = str(tmp_path / "services")
    env["DRL_REDIS_PORT"] = str(_free_port())
    return env


def _pid(env: dict[str, str], name: str) -> int | None:
    path = Path(env["DRL_SERVICES_DIR"]) / f"{name}.pid"
    return int(path.read_text()) if path.exists() else None


def test_redis_up_is_idempotent_and_down_up_works(private_redis_env: dict[str, str]) -> None:
    env = private_redis_env
    cfg = drl_services.Config.from_env(env)
    try:
        first = _run(SERVICES, "up", "redis", env=env)
        assert first.returncode == 0, first.stderr
        assert f"DRL_REDIS_URL=redis://127.0.0.1:{cfg.redis_port}/0" in first.stdout
        pid = _pid(env, "redis")
        assert pid is not None and drl_services.redis_ping(cfg.host, cfg.redis_port)

        second = _run(SERVICES, "up", "redis", env=env)
        assert second.returncode == 0, second.stderr
        assert "already running" in second.stderr
        assert _pid(env, "redis") == pid

        assert _run(SERVICES, "status", "redis", env=env).returncode == 0

        down = _run(SERVICES, "down", "redis", env=env)
        assert down.returncode == 0, down.stderr
        assert _pid(env, "redis") is None
        assert not drl_services.redis_ping(cfg.host, cfg.redis_port)
        assert _run(SERVICES, "status", "redis", env=env).returncode == 3

        again = _run(SERVICES, "up", "redis", env=env)
        assert again.returncode == 0, again.stderr
        new_pid = _pid(env, "redis")
        assert new_pid is not None and new_pid != pid
        assert drl_services.redis_ping(cfg.host, cfg.redis_port)
    finally:
        _run(SERVICES, "down", "redis", "--wipe", env=env)
    assert not drl_services.redis_ping(cfg.host, cfg.redis_port)


def test_stale_pid_file_is_cleaned(private_redis_env: dict[str, str]) -> None:
    env = private_redis_env
    state = Path(env["DRL_SERVICES_DIR"])
    state.mkdir(parents=True)
    # A pid that is certainly not a redis-server of ours: a process that already exited.
    dead = subprocess.Popen([sys.executable, "-c", "pass"])
    dead.wait()
    (state / "redis.pid").write_text(f"{dead.pid}\n")
    try:
        result = _run(SERVICES, "up", "redis", env=env)
        assert result.returncode == 0, result.stderr
        assert "stale pid file" in result.stderr
        assert _pid(env, "redis") not in (None, dead.pid)
    finally:
        _run(SERVICES, "down", "redis", "--wipe", env=env)


def test_with_services_stops_only_what_it_started(private_redis_env: dict[str, str]) -> None:
    env = private_redis_env
    cfg = drl_services.Config.from_env(env)
    probe = (
        "import os, sys; sys.path.insert(0, 'scripts'); import drl_services as d; "
        "u = os.environ['DRL_REDIS_URL']; print(u); "
        f"sys.exit(0 if d.redis_ping('127.0.0.1', {cfg.redis_port}) else 9)"
    )
    # Not running before: started for the command, stopped after, exit code propagated.
    result = subprocess.run(
        [sys.executable, str(WITH_SERVICES), "-s", "redis", sys.executable, "-c", probe],
        env=env,
        cwd=REPO_ROOT,
        capture_output=True,
        text=True,
        timeout=120,
        check=False,
    )
    assert result.returncode == 0, result.stderr
    assert cfg.redis_url in result.stdout
    assert not drl_services.redis_ping(cfg.host, cfg.redis_port)
    assert _pid(env, "redis") is None

    failing = _run(
        WITH_SERVICES, "-s", "redis", sys.executable, "-c", "raise SystemExit(7)", env=env
    )
    assert failing.returncode == 7
    assert not drl_services.redis_ping(cfg.host, cfg.redis_port)

    # Already running before: left running after.
    assert _run(SERVICES, "up", "redis", env=env).returncode == 0
    pid = _pid(env, "redis")
    try:
        kept = _run(WITH_SERVICES, "-s", "redis", sys.executable, "-c", "pass", env=env)
        assert kept.returncode == 0, kept.stderr
        assert _pid(env, "redis") == pid
        assert drl_services.redis_ping(cfg.host, cfg.redis_port)
    finally:
        _run(SERVICES, "down", "redis", "--wipe", env=env)


def test_with_services_stops_what_it_started_when_terminated(
    private_redis_env: dict[str, str],
) -> None:
    env = private_redis_env
    cfg = drl_services.Config.from_env(env)
    proc = subprocess.Popen(
        [sys.executable, str(WITH_SERVICES), "-s", "redis", "sleep", "60"],
        env=env,
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    try:
        deadline = time.monotonic() + 30
        while not drl_services.redis_ping(cfg.host, cfg.redis_port):
            assert time.monotonic() < deadline, "redis did not come up"
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(timeout=60) == 128 + signal.SIGTERM
        assert not drl_services.redis_ping(cfg.host, cfg.redis_port)
        assert _pid(env, "redis") is None
    finally:
        if proc.poll() is None:
            proc.kill()
        _run(SERVICES, "down", "redis", "--wipe", env=env)


def test_kafka_second_up_is_a_no_op(
    kafka_bootstrap: str, services_config: drl_services.Config
) -> None:
    if kafka_bootstrap != services_config.kafka_bootstrap or not drl_services.is_running(
        services_config, "kafka"
    ):
        pytest.skip("the session's Kafka is not the local broker of scripts/services")
    env = {k: v for k, v in os.environ.items() if k != "DRL_SERVICES_DIR"}
    before = _pid({"DRL_SERVICES_DIR": str(services_config.state_dir)}, "kafka")
    result = _run(SERVICES, "up", "kafka", env=env)
    assert result.returncode == 0, result.stderr
    assert "already running" in result.stderr
    assert f"DRL_KAFKA_BOOTSTRAP={services_config.kafka_bootstrap}" in result.stdout
    assert _pid({"DRL_SERVICES_DIR": str(services_config.state_dir)}, "kafka") == before


def test_kafka_properties_are_single_node_loopback() -> None:
    cfg = drl_services.Config(
        state_dir=Path("/nonexistent"), kafka_port=1111, kafka_controller_port=2222
    )
    props = dict(
        line.split("=", 1)
        for line in drl_services.kafka_properties(cfg).splitlines()
        if line and not line.startswith("#")
    )
    assert props["process.roles"] == "broker,controller"
    assert props["listeners"] == "PLAINTEXT://127.0.0.1:1111,CONTROLLER://127.0.0.1:2222"
    assert props["controller.quorum.voters"] == "1@127.0.0.1:2222"
    assert props["offsets.topic.num.partitions"] == "1"
    assert props["group.initial.rebalance.delay.ms"] == "0"
    for key in (
        "offsets.topic.replication.factor",
        "transaction.state.log.replication.factor",
        "transaction.state.log.min.isr",
        "share.coordinator.state.topic.replication.factor",
        "share.coordinator.state.topic.min.isr",
    ):
        assert props[key] == "1", key


def test_java_version_parsing() -> None:
    assert drl_services._java_major('openjdk version "17.0.15" 2025-04-15') == 17
    assert drl_services._java_major('java version "1.8.0_392"') == 8
    assert drl_services._java_major('openjdk version "21" 2023-09-19') == 21
    assert drl_services._java_major("garbage") is None
