"""docker-compose.yml, Dockerfile and .dockerignore, checked statically (no Docker engine here).

The compose file runs Kafka and Redis, and the system built from the Dockerfile: the topics
(one-shot), the aggregators and four demo app servers. Every command line of ours is parsed with
the parser that will read it in the container (nothing is executed), so a renamed flag breaks
this test rather than the deployment.
"""

from __future__ import annotations

import argparse
import base64
import importlib
import json
import re
import shlex
from pathlib import Path
from typing import Any

import pytest
import yaml

from aggregator.cli import build_parser
from aggregator.run import settings_from_args
from limiter import parse_rate
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC

REPO_ROOT = Path(__file__).resolve().parents[2]
#: Where containers reach Kafka: its INTERNAL listener.
INTERNAL_BOOTSTRAP = "kafka:19092"
APPS = ("app-1", "app-2", "app-3", "app-4")


def _compose() -> dict[str, Any]:
    data = yaml.safe_load((REPO_ROOT / "docker-compose.yml").read_text())
    assert isinstance(data, dict)
    return data


def _services() -> dict[str, dict[str, Any]]:
    services = _compose()["services"]
    assert isinstance(services, dict)
    return services


def _dockerfile() -> list[tuple[str, str]]:
    """The Dockerfile's instructions as (KEYWORD, rest), continuation lines joined."""
    text = (REPO_ROOT / "Dockerfile").read_text()
    text = re.sub(r"\\\n", " ", text)
    out: list[tuple[str, str]] = []
    for line in text.splitlines():
        line = line.strip()
        if not line or line.startswith("#"):
            continue
        keyword, _, rest = line.partition(" ")
        out.append((keyword.upper(), rest.strip()))
    return out


def _exec_form(value: str) -> list[str]:
    """A Dockerfile ``ENTRYPOINT``/``CMD`` value: JSON (exec form) or a shell string."""
    if value.startswith("["):
        parsed = json.loads(value)
        assert isinstance(parsed, list)
        return [str(v) for v in parsed]
    return shlex.split(value)


def _image_entrypoint() -> list[str]:
    entries = [rest for keyword, rest in _dockerfile() if keyword == "ENTRYPOINT"]
    assert entries, "Dockerfile has no ENTRYPOINT"
    return _exec_form(entries[-1])


def _argv(value: object) -> list[str]:
    if isinstance(value, str):
        return shlex.split(value)
    assert isinstance(value, list), value
    return [str(v) for v in value]


def _command_line(service: dict[str, Any]) -> list[str] | None:
    """Entrypoint + command of a service built from the Dockerfile (None for an image)."""
    if "build" not in service:
        return None
    entrypoint = _argv(service["entrypoint"]) if "entrypoint" in service else _image_entrypoint()
    return entrypoint + _argv(service.get("command", []))


def _parse(parser: argparse.ArgumentParser, args: list[str], what: str) -> argparse.Namespace:
    try:
        return parser.parse_args(args)
    except SystemExit as exc:  # argparse prints the reason to stderr
        pytest.fail(f"{what}: arguments rejected (exit {exc.code}): {args}")


def _drl_args(name: str) -> argparse.Namespace:
    line = _command_line(_services()[name])
    assert line and line[0] == "drl", (name, line)
    return _parse(build_parser(), line[1:], name)


def _env(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(str(item).partition("=")[::2] for item in env)
    assert isinstance(env, dict)
    return {str(k): str(v) for k, v in env.items()}


# -- kafka and redis -----------------------------------------------------------------------------


def test_compose_has_kafka_and_redis_with_healthchecks() -> None:
    services = _services()
    assert {"kafka", "redis"} <= set(services)
    for name in ("kafka", "redis"):
        health = services[name]["healthcheck"]
        assert health["test"], name
        assert "interval" in health and "retries" in health, name


def test_compose_images() -> None:
    services = _services()
    assert services["kafka"]["image"].startswith("apache/kafka:4.")
    assert services["redis"]["image"].startswith("redis:7")


def test_compose_kafka_is_single_node_kraft() -> None:
    env = _services()["kafka"]["environment"]
    assert env["KAFKA_PROCESS_ROLES"] == "broker,controller"
    assert str(env["KAFKA_OFFSETS_TOPIC_REPLICATION_FACTOR"]) == "1"
    assert str(env["KAFKA_OFFSETS_TOPIC_NUM_PARTITIONS"]) == "1"


def test_compose_cluster_id_is_a_kafka_uuid() -> None:
    cid = str(_services()["kafka"]["environment"]["CLUSTER_ID"])
    assert len(base64.urlsafe_b64decode(cid + "==")) == 16


def test_compose_kafka_advertises_the_internal_bootstrap_to_containers() -> None:
    advertised = _services()["kafka"]["environment"]["KAFKA_ADVERTISED_LISTENERS"]
    assert f"INTERNAL://{INTERNAL_BOOTSTRAP}" in advertised.split(",")


# -- every service -------------------------------------------------------------------------------


def test_compose_every_service_has_an_image_or_build() -> None:
    for name, service in _services().items():
        assert "image" in service or "build" in service, name
        if "build" in service:
            assert service["build"] == ".", name


def test_compose_system_services_exist_and_are_built_here() -> None:
    services = _services()
    assert {"topics", "aggregator", *APPS} <= set(services)
    for name in ("topics", "aggregator", *APPS):
        assert services[name]["build"] == ".", name


def test_compose_healthchecks() -> None:
    services = _services()
    for name in ("kafka", "redis", "aggregator", *APPS):
        health = services[name].get("healthcheck")
        assert health and health["test"], f"{name} has no healthcheck"
        assert "interval" in health and "retries" in health, name
        test = health["test"]
        assert isinstance(test, list) and test[0] in ("CMD", "CMD-SHELL"), name


def test_compose_python_healthchecks_compile() -> None:
    """The python -c one-liners (slim has no curl) are valid Python."""
    found = 0
    for name, service in _services().items():
        test = service.get("healthcheck", {}).get("test", [])
        if test[:3] == ["CMD", "python", "-c"]:
            compile(test[3], f"<{name} healthcheck>", "exec")
            found += 1
    assert found >= 1 + len(APPS)


def test_compose_every_built_command_parses() -> None:
    """drl commands parse with aggregator.cli's parser; python -m commands with their module's."""
    for name, service in _services().items():
        line = _command_line(service)
        if line is None:
            continue
        if line[0] == "drl":
            args = _parse(build_parser(), line[1:], name)
            assert callable(getattr(args, "func", None)), name
        elif line[:2] == ["python", "-m"]:
            module = importlib.import_module(line[2])
            parse_args = getattr(module, "parse_args", None)
            if parse_args is not None:
                try:
                    parse_args(line[3:])
                except SystemExit as exc:
                    pytest.fail(f"{name}: {line[2]} rejected {line[3:]} (exit {exc.code})")
        else:
            pytest.fail(f"{name}: unexpected command line {line}")


def test_compose_dependencies_exist() -> None:
    services = _services()
    for name, service in services.items():
        for dep in service.get("depends_on", {}):
            assert dep in services, f"{name} depends on unknown service {dep}"


# -- topics --------------------------------------------------------------------------------------


def test_compose_topics_is_a_one_shot_create_after_kafka_is_healthy() -> None:
    service = _services()["topics"]
    args = _drl_args("topics")
    assert (args.command, args.topics_command) == ("topics", "create")
    assert service["depends_on"]["kafka"]["condition"] == "service_healthy"
    assert str(service.get("restart", "no")) == "no"
    assert _env(service)["DRL_KAFKA_BOOTSTRAP"] == INTERNAL_BOOTSTRAP
    assert args.limit is not None
    parse_rate(args.limit)


# -- aggregator ----------------------------------------------------------------------------------


def test_compose_aggregator_command_and_settings() -> None:
    service = _services()["aggregator"]
    args = _drl_args("aggregator")
    assert (args.command, args.aggregator_command) == ("aggregator", "run")
    settings = settings_from_args(args, _env(service))
    assert settings.kafka_bootstrap == INTERNAL_BOOTSTRAP
    assert settings.sources["kafka_bootstrap"] == "env"
    assert settings.limit == "200 per 10 seconds"
    parse_rate(settings.limit)
    assert settings.http_host == "0.0.0.0"
    assert settings.http_port == 9464
    assert (settings.usage_topic, settings.grants_topic) == (USAGE_TOPIC, GRANTS_TOPIC)


def test_compose_aggregator_runs_two_and_probes_readyz() -> None:
    services = _services()
    service = services["aggregator"]
    assert service["deploy"]["replicas"] == 2
    probe = " ".join(service["healthcheck"]["test"])
    assert "http://127.0.0.1:9464/readyz" in probe
    depends = service["depends_on"]
    assert depends["topics"]["condition"] == "service_completed_successfully"
    # Same policy as the topics' retention check.
    assert _drl_args("topics").limit == settings_from_args(_drl_args("aggregator"), {}).limit


# -- demo app servers ----------------------------------------------------------------------------


def test_compose_app_servers() -> None:
    from aggregator import demo_server

    services = _services()
    aggregator = settings_from_args(_drl_args("aggregator"), _env(services["aggregator"]))
    policy = parse_rate(aggregator.limit)
    host_ports: set[str] = set()
    for name in APPS:
        service = services[name]
        line = _command_line(service)
        assert line is not None and line[:3] == ["python", "-m", "aggregator.demo_server"], name
        args = demo_server.parse_args(line[3:])
        assert args.server_id == name
        assert args.bootstrap == INTERNAL_BOOTSTRAP, name
        assert args.usage_topic == aggregator.usage_topic, name
        assert args.grants_topic == aggregator.grants_topic, name
        assert args.limit == policy.limit and args.window == policy.window, name
        assert args.expected_servers == len(APPS), name
        assert args.host == "0.0.0.0" and args.port == 8000, name
        assert f":{args.port}/healthz" in " ".join(service["healthcheck"]["test"]), name
        ports = [str(p) for p in service["ports"]]
        assert any(p.endswith(f":{args.port}") for p in ports), name
        host_ports.update(ports)
        assert service["depends_on"]["topics"]["condition"] == "service_completed_successfully"
    assert len(host_ports) == len(APPS), "app servers must publish distinct host ports"


# -- Dockerfile and .dockerignore ----------------------------------------------------------------


def test_dockerfile_base_entrypoint_and_user() -> None:
    instructions = _dockerfile()
    froms = [rest for keyword, rest in instructions if keyword == "FROM"]
    assert froms and froms[0].split()[0] == "python:3.11-slim"
    assert _image_entrypoint() == ["drl"]
    users = [rest for keyword, rest in instructions if keyword == "USER"]
    assert users, "Dockerfile has no USER"
    user = users[-1].split(":")[0]
    assert user not in ("root", "0"), "the image must not run as root"
    runs = " ".join(rest for keyword, rest in instructions if keyword == "RUN")
    assert re.search(r"pip install [^&]*\[web\]", runs), "installs the package with the web extra"


def test_dockerignore_keeps_the_context_small() -> None:
    patterns = {
        line.strip().rstrip("/")
        for line in (REPO_ROOT / ".dockerignore").read_text().splitlines()
        if line.strip() and not line.lstrip().startswith("#")
    }
    assert {".venv", ".services", ".git", "demo-output"} <= patterns
    # What the image build copies must not be ignored.
    copied = {"pyproject.toml", "README.md", "limiter", "producer", "aggregator"}
    assert not copied & patterns
