"""docker-compose.yml describes the same two services (not started here: no Docker engine)."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import yaml

REPO_ROOT = Path(__file__).resolve().parents[2]


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def test_compose_has_kafka_and_redis_with_healthchecks() -> None:
    services = _compose()["services"]
    assert {"kafka", "redis"} <= set(services)
    for name in ("kafka", "redis"):
        health = services[name]["healthcheck"]
        assert health["test"], name
        assert "interval" in health and "retries" in health, name


def test_compose_images() -> None:
    services = _compose()["services"]
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["redis"]["image"].startswith("redis:7")


def test_compose_kafka_is_single_node_kraft() -> None:
    env = _compose()["services"]["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == "1"
    assert str(env["KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS"]) == "1"


def test_compose_cluster_id_is_a_kafka_uuid() -> None:
    import base64

    cid = str(_compose()["services"]["kafka"]["environment"]["CLUSTER_ID"])
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16
