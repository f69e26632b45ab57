"""Operating the aggregator: settings precedence, the HTTP endpoint, logs, the agent's metrics,
``drl topics``, and ``drl aggregator run`` as a real process on the real broker (health,
readiness, metrics under load, SIGTERM with the last offsets committed and the group left)."""

from __future__ import annotations

import argparse
import contextlib
import json
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from pathlib import Path

import numpy as np
import pytest
from prometheus_client import CollectorRegistry, generate_latest

from aggregator.http import OpsServer
from aggregator.metrics import AggregatorCollector, parse_exposition
from aggregator.run import (
    ConfigError,
    EventFormatter,
    RepeatFilter,
    ServiceState,
    add_arguments,
    load_config_file,
    resolve_settings,
    settings_from_args,
)
from aggregator.service import Aggregator, AggregatorConfig
from limiter import Policy, RateLimiter, Request
from limiter.keys import client_key
from producer import Agent, InProcessBus, make_transport
from producer.metrics import AgentCollector
from producer.transport import Record
from tests.private_redis import free_port

ROOT = Path(__file__).resolve().parents[2]
DRL = str(Path(sys.executable).with_name("drl"))

Metrics = dict[tuple[str, tuple[tuple[str, str], ...]], float]


# -- settings: flags > env > file > defaults (no broker) ------------------------------------------


def _parse(argv: list[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser()
    add_arguments(parser, "default-host:9092")
    return parser.parse_args(argv)


def test_settings_precedence_flag_over_env_over_file(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text(
        'limit = "100 per 60 seconds"\n'
        "tick = 0.5\n"
        'group = "from-file"\n'
        'usage-topic = "file.usage"\n'
        "http_port = 9999\n"
        "lease-ttl = 2\n"
        "[kafka-config]\n"
        'security.protocol = "SSL"\n'
        '"client.id" = "file"\n'
        "linger.ms = 7\n"
    )
    env = {
        "DRL_AGG_TICK": "0.25",
        "DRL_AGG_GROUP": "from-env",
        "DRL_AGG_HTTP_HOST": "0.0.0.0",
        "DRL_AGG_KAFKA_CONFIG": '{"client.id": "env", "acks": "all"}',
        "DRL_AGG_ID": "",  # empty: unset
    }
    args = _parse(["--config", str(path), "--group", "from-flag", "--kafka-config", "acks=1"])
    s = settings_from_args(args, env)
    assert s.group == "from-flag" and s.sources["group"] == "flag"
    assert s.tick == 0.25 and s.sources["tick"] == "env"
    assert s.http_host == "0.0.0.0" and s.sources["http_host"] == "env"
    assert s.limit == "100 per 60 seconds" and s.sources["limit"] == "file"
    assert s.usage_topic == "file.usage" and s.http_port == 9999 and s.lease_ttl == 2.0
    assert s.grants_topic == "drl.grants" and s.sources["grants_topic"] == "default"
    assert s.kafka_bootstrap == "default-host:9092" and s.id is None
    # kafka_config merges key by key: flag > env > file
    assert dict(s.kafka_config) == {
        "security.protocol": "SSL",
        "client.id": "env",
        "linger.ms": "7",
        "acks": "1",
    }
    assert s.sources["kafka_config"] == "file+env+flag"
    assert s.config_file == str(path)


def test_settings_file_from_env_and_flag_beats_it(tmp_path: Path) -> None:
    path = tmp_path / "agg.toml"
    path.write_text('limit = "5/second"\nkafka_bootstrap = "file:9092"\n')
    s = settings_from_args(_parse([]), {"DRL_AGG_CONFIG": str(path)})
    assert s.limit == "5/second" and s.kafka_bootstrap == "file:9092"
    s = settings_from_args(
        _parse(["--limit", "7/second"]),
        {"DRL_AGG_CONFIG": str(path), "DRL_KAFKA_BOOTSTRAP": "env:9092"},
    )
    assert s.limit == "7/second" and s.kafka_bootstrap == "env:9092"
    assert (s.sources["limit"], s.sources["kafka_bootstrap"]) == ("flag", "env")


def test_settings_errors_name_the_setting_and_its_source(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="policy is required"):
        resolve_settings({}, {}, {}, default_bootstrap="x")
    with pytest.raises(ConfigError, match="DRL_AGG_TICK: expected a number"):
        resolve_settings({"limit": "1/s"}, {"DRL_AGG_TICK": "fast"}, {}, default_bootstrap="x")
    with pytest.raises(ConfigError, match="DRL_AGG_HTTP_PORT: expected a port"):
        resolve_settings(
            {"limit": "1/s"}, {"DRL_AGG_HTTP_PORT": "70000"}, {}, default_bootstrap="x"
        )
    with pytest.raises(ConfigError, match="DRL_AGG_KAFKA_CONFIG: expected a JSON object"):
        resolve_settings(
            {"limit": "1/s"}, {"DRL_AGG_KAFKA_CONFIG": "a=b"}, {}, default_bootstrap="x"
        )
    with pytest.raises(ConfigError, match="--kafka-config: expected KEY=VALUE"):
        resolve_settings({"limit": "1/s", "kafka_config": ["oops"]}, {}, {}, default_bootstrap="x")
    bad = tmp_path / "bad.toml"
    bad.write_text('limit = "1/s"\ntick = "soon"\n')
    with pytest.raises(ConfigError, match=r"config file .*bad.toml: tick: expected a number"):
        resolve_settings(
            {}, {}, load_config_file(str(bad)), default_bootstrap="x", config_file=str(bad)
        )
    bad.write_text('limit = "1/s"\ntik = 0.1\n')
    with pytest.raises(ConfigError, match="unknown setting 'tik'"):
        load_config_file(str(bad))
    bad.write_text("limit = \n")
    with pytest.raises(ConfigError, match="invalid TOML"):
        load_config_file(str(bad))
    with pytest.raises(ConfigError, match="No such file"):
        load_config_file(str(tmp_path / "missing.toml"))


def test_run_exits_2_on_bad_settings(tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRL_AGG_")}
    proc = subprocess.run(
        [DRL, "aggregator", "run", "--limit", "100 per fortnight"],
        capture_output=True,
        text=True,
        env=env,
        timeout=30,
    )
    assert proc.returncode == 2, proc.stderr
    assert "drl aggregator run:" in proc.stderr


# -- the HTTP endpoint and the log lines (no broker) ----------------------------------------------


def _get(url: str, headers: dict[str, str] | None = None) -> tuple[int, str, str]:
    """(status, content type, body) of a GET, also for 4xx/5xx."""
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with urllib.request.urlopen(req, timeout=5) as r:
            return r.status, r.headers.get("Content-Type", ""), r.read().decode()
    except urllib.error.HTTPError as e:
        return e.code, e.headers.get("Content-Type", ""), e.read().decode()


def test_ops_server_answers_health_readiness_metrics() -> None:
    registry = CollectorRegistry()
    from prometheus_client import Counter

    Counter("drl_test_things", "Things.", registry=registry).inc(3)
    state = {"healthy": False, "ready": False}
    server = OpsServer(
        "127.0.0.1",
        0,
        registry,
        health=lambda: (state["healthy"], {"status": "ok" if state["healthy"] else "starting"}),
        ready=lambda: (state["ready"], {"ready": state["ready"], "reason": "no partitions"}),
    ).start()
    base = f"http://127.0.0.1:{server.port}"
    try:
        code, ctype, body = _get(base + "/healthz")
        assert (code, ctype, json.loads(body)) == (503, "application/json", {"status": "starting"})
        code, _, body = _get(base + "/readyz")
        assert code == 503 and json.loads(body)["reason"] == "no partitions"
        state["healthy"] = state["ready"] = True
        assert _get(base + "/healthz")[0] == 200
        assert _get(base + "/readyz/")[0] == 200
        code, ctype, body = _get(base + "/metrics")
        assert code == 200 and ctype.startswith("text/plain")
        assert parse_exposition(body)[("drl_test_things_total", ())] == 3.0
        code, ctype, body = _get(
            base + "/metrics", {"Accept": "application/openmetrics-text; version=1.0.0"}
        )
        assert code == 200 and ctype.startswith("application/openmetrics-text")
        assert body.rstrip().endswith("# EOF")
        code, _, body = _get(base + "/nope")
        assert code == 404 and "/metrics" in json.loads(body)["paths"]
    finally:
        server.close()
    # the port is free again, and a taken port fails loudly
    with pytest.raises(OSError), socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        s.listen()
        OpsServer("127.0.0.1", s.getsockname()[1], registry, health=dict, ready=dict)  # type: ignore[arg-type]


def _record(
    msg: str, *args: object, level: int = logging.WARNING, **extra: object
) -> logging.LogRecord:
    record = logging.LogRecord("aggregator.service", level, __file__, 1, msg, args, None)
    for k, v in extra.items():
        setattr(record, k, v)
    return record


def test_log_lines_are_one_event_each_and_repeats_are_capped() -> None:
    fmt = EventFormatter("logfmt")
    line = fmt.format(
        _record("x", event="stopped", fields={"exit_code": 0, "partitions": [1, 2], "id": "a b"})
    )
    assert " event=stopped " in line and "exit_code=0" in line and "partitions=1,2" in line
    assert 'id="a b"' in line and line.startswith("ts=")
    try:
        raise ValueError("two\nlines")
    except ValueError:
        rec = _record("failed at %s/%d", "t", 3, level=logging.ERROR)
        rec.exc_info = sys.exc_info()
    line = fmt.format(rec)
    assert "\n" not in line and 'msg="failed at t/3"' in line and "exc=" in line
    as_json = json.loads(EventFormatter("json").format(rec))
    assert as_json["event"] == "log" and as_json["level"] == "error" and "two" in as_json["exc"]

    f = RepeatFilter(burst=3, period=60.0)
    passed = [
        f.filter(_record("skipping malformed usage record at %s/%d", "t", i)) for i in range(10)
    ]
    assert passed == [True] * 3 + [False] * 7
    f.period = 0.0  # a new period: the next one passes and carries the count
    rec = _record("skipping malformed usage record at %s/%d", "t", 10)
    assert f.filter(rec) and getattr(rec, "suppressed", 0) == 7
    assert f.filter(_record("another message"))


def test_service_state_and_aggregator_collector_without_a_broker() -> None:
    now = [100.0]
    bus = InProcessBus({"usage": 4, "grants": 2})
    config = AggregatorConfig(
        Policy(50, 10), usage_topic="usage", grants_topic="grants", aggregator_id="agg-u"
    )
    agg = Aggregator(config, bus, clock=lambda: now[0])
    state = ServiceState(config.tick, clock=lambda: now[0])
    assert state.health() == (False, {"status": "starting", "reason": "connecting to Kafka"})
    assert state.readiness()[0] is False
    state.aggregator = agg
    state.phase = "running"
    state.last_step = now[0]
    state.broker_answered(4)
    registry = CollectorRegistry()
    registry.register(
        AggregatorCollector(agg, lag=lambda: {0: 5}, service=state, clock=lambda: now[0])
    )
    ready, details = state.readiness()  # new partitions rebuild first
    assert not ready and details["rebuilding"] == [0, 1, 2, 3]
    assert "rebuilding usage partitions" in details["reason"]
    assert _scrape(registry)[("drl_aggregator_partitions_rebuilding", ())] == 4
    now[0] += config.server_timeout  # nothing to replay, nothing arrived: rebuilt at the tick
    agg.tick()
    ready, details = state.readiness()
    assert ready and details["partitions"] == [0, 1, 2, 3] and details["aggregator_id"] == "agg-u"

    agg.handle(Record("usage", 1, 0, 0.0, b"not a batch"))
    agg.tick()
    m = _scrape(registry)
    assert m[("drl_aggregator_partitions_owned", ())] == 4
    assert m[("drl_aggregator_partitions_rebuilding", ())] == 0
    assert m[("drl_aggregator_rebuilds_total", ())] == 4
    assert m[("drl_aggregator_ticks_total", ())] == 2
    assert sum(v for k, v in m.items() if k[0] == "drl_aggregator_usage_malformed_total") == 1
    assert m[("drl_aggregator_usage_lag_records", (("partition", "0"),))] == 5
    assert m[("drl_aggregator_ready", ())] == 1 and m[("drl_aggregator_broker_up", ())] == 1
    assert m[("drl_aggregator_usage_topic_partitions", ())] == 4

    now[0] += 11.0  # no step for 11 s: stalled, hence not ready either
    ok, health = state.health()
    assert not ok and health["status"] == "stalled"
    assert "has not completed a step" in state.readiness()[1]["reason"]
    state.last_step = now[0]
    now[0] += 25.0  # the broker has not answered the probe for 36 s
    state.last_step = now[0]
    ready, details = state.readiness()
    assert not ready and "broker has not answered" in details["reason"]
    assert _scrape(registry)[("drl_aggregator_broker_up", ())] == 0
    state.phase = "stopping"
    assert state.health()[1]["status"] == "stopping" and state.lag() is None


# -- the agent's metrics (in-process bus, no broker) ----------------------------------------------


def _scrape(registry: CollectorRegistry) -> Metrics:
    return parse_exposition(generate_latest(registry).decode())


def test_agent_collector_counts_decisions_from_drained_usage() -> None:
    now = [1000.0]
    bus = InProcessBus({"usage": 2, "grants": 1})
    limiter = RateLimiter(10, 60, mode="approximate", clock=lambda: now[0])
    agent = Agent(limiter, bus, "web-1", usage_topic="usage", grants_topic="grants")
    registry = CollectorRegistry()
    registry.register(AgentCollector(agent))
    outcomes = [limiter.allow_request(f"c{i % 3}", Request(timestamp=now[0])) for i in range(30)]
    agent.report_once()
    m = _scrape(registry)
    sid = ("server_id", "web-1")

    def decided(outcome: str) -> float:
        return m[("drl_agent_decided_tokens_total", (("outcome", outcome), sid))]

    # no lease yet, healthy stream: optimistic cold start admits 1 per client per window
    assert decided("admitted_extra") == sum(outcomes) == 3
    assert decided("rejected") == 27 and decided("admitted_lease") == 0
    assert m[("drl_agent_usage_batches_sent_total", (sid,))] == agent.stats.batches_sent > 0
    assert m[("drl_agent_usage_records_sent_total", (sid,))] == 3
    assert m[("drl_agent_clients", (sid,))] == 3
    assert m[("drl_agent_table_bytes", (sid,))] == limiter.memory_bytes() > 0
    assert m[("drl_agent_usage_pending_records", (sid,))] == agent.pending_records == 0
    assert (m[("drl_agent_leases", (sid,))], m[("drl_agent_lease_tokens", (sid,))]) == (0, 0)
    assert m[("drl_agent_produce_queue_messages", (sid,))] == 0  # the bus delivers at once
    assert m[("drl_agent_degraded", (sid,))] == 0
    now[0] += 5.0  # no grant batch for 5 s: degraded
    m = _scrape(registry)
    assert m[("drl_agent_degraded", (sid,))] == 1
    assert m[("drl_agent_lease_age_seconds", (sid,))] == pytest.approx(5.0)
    assert m[("drl_agent_active_servers", (sid,))] == 1
    key = np.array([client_key("c0")], dtype=np.uint64)
    assert limiter.apply_grants(key, np.array([7.0]), now[0] + 5.0) == 1
    m = _scrape(registry)
    assert (m[("drl_agent_leases", (sid,))], m[("drl_agent_lease_tokens", (sid,))]) == (1, 7)
    now[0] += 6.0  # expired: no longer a live lease
    assert limiter.leases() == (0, 0.0)
    agent.stop()


# -- real broker: drl topics, drl aggregator run -------------------------------------------------


@pytest.fixture
def topic_names(kafka_bootstrap: str) -> Iterator[Callable[[str], str]]:
    """Factory of unique topic names; the topics are deleted at teardown."""
    from confluent_kafka.admin import AdminClient

    names: list[str] = []

    def make(role: str) -> str:
        names.append(f"ops-{role}-{uuid.uuid4().hex[:10]}")
        return names[-1]

    yield make
    admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
    for fut in admin.delete_topics(names, operation_timeout=30).values():
        try:
            fut.result(timeout=30)
        except Exception as exc:  # missing (never created) or teardown trouble: not the test's
            print(f"note: topic not deleted: {exc!r}", file=sys.stderr)


def _drl(*argv: str, timeout: float = 30) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRL_AGG_")}
    env["PYTHONPATH"] = str(ROOT)
    return subprocess.run(
        [DRL, *argv], capture_output=True, text=True, env=env, timeout=timeout, cwd=ROOT
    )


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_topics_create_is_idempotent_and_describe_prints_them(
    kafka_bootstrap: str, topic_names: Callable[[str], str]
) -> None:
    usage, grants = topic_names("usage"), topic_names("grants")
    common = [
        "--kafka-bootstrap",
        kafka_bootstrap,
        "--usage-topic",
        usage,
        "--grants-topic",
        grants,
    ]
    sizes = ["--usage-partitions", "3", "--grants-partitions", "2", "--replication-factor", "1"]
    first = _drl("topics", "create", *common, *sizes, "--retention-ms", "7200000")
    assert first.returncode == 0, first.stderr
    assert f"created {usage}: 3 partitions, replication factor 1" in first.stdout
    assert f"created {grants}: 2 partitions" in first.stdout
    assert (
        "cleanup.policy=delete message.timestamp.type=LogAppendTime retention.ms=7200000"
        in first.stdout
    )

    again = _drl("topics", "create", *common, *sizes, "--retention-ms", "3600000")
    assert again.returncode == 0, again.stderr
    assert f"exists  {usage}: 3 partitions" in again.stdout
    assert "note: retention.ms=7200000, asked for 3600000 (not changed)" in again.stdout

    wrong = _drl("topics", "create", *common, "--usage-partitions", "5", "--grants-partitions", "2")
    assert wrong.returncode == 1
    assert f"topic {usage} exists with 3 partitions, asked for 5" in wrong.stderr
    assert "--usage-partitions 3" in wrong.stderr and grants not in wrong.stderr

    short = _drl("topics", "create", *common, "--limit", "10 per 2 days")
    assert short.returncode != 0 and "shorter than the window" in short.stderr

    described = _drl("topics", "describe", *common)
    assert described.returncode == 0, described.stderr
    out = described.stdout
    assert f"{usage}: 3 partitions, replication factor 1" in out
    assert f"{grants}: 2 partitions, replication factor 1" in out
    assert out.count("partition ") == 5 and "cleanup.policy=delete" in out
    as_json = json.loads(_drl("topics", "describe", *common, "--json").stdout)
    by_name = {t["name"]: t for t in as_json["topics"]}
    assert by_name[usage]["config"]["retention.ms"] == "7200000"
    assert [p["id"] for p in by_name[usage]["partition_details"]] == [0, 1, 2]

    missing = _drl(
        "topics",
        "describe",
        "--kafka-bootstrap",
        kafka_bootstrap,
        "--usage-topic",
        usage,
        "--grants-topic",
        topic_names("absent"),
    )
    assert missing.returncode == 1 and "does not exist" in missing.stderr


def _wait(
    what: str, ok: Callable[[], bool], timeout: float, proc: subprocess.Popen[bytes], log: Path
) -> None:
    deadline = time.monotonic() + timeout
    while not ok():
        if proc.poll() is not None:
            raise AssertionError(f"aggregator exited ({proc.returncode}):\n{log.read_text()}")
        if time.monotonic() > deadline:
            raise AssertionError(f"{what} not within {timeout} s:\n{log.read_text()[-3000:]}")
        time.sleep(0.1)


@pytest.mark.integration
@pytest.mark.timeout(30)
def test_aggregator_service_health_metrics_and_sigterm(
    kafka_bootstrap: str, topic_names: Callable[[str], str], tmp_path: Path
) -> None:
    from confluent_kafka import (
        Consumer,
        ConsumerGroupState,
        ConsumerGroupTopicPartitions,
        TopicPartition,
    )
    from confluent_kafka.admin import AdminClient

    usage, grants = topic_names("usage"), topic_names("grants")
    created = _drl(
        "topics",
        "create",
        "--kafka-bootstrap",
        kafka_bootstrap,
        "--usage-topic",
        usage,
        "--grants-topic",
        grants,
        "--usage-partitions",
        "4",
        "--grants-partitions",
        "2",
    )
    assert created.returncode == 0, created.stderr
    group = f"ops-{uuid.uuid4().hex[:8]}"
    port = free_port()
    # all three layers: the policy and tick from the file, the group from the environment,
    # the rest from flags (a flag beats the file's http-port)
    config = tmp_path / "aggregator.toml"
    config.write_text(
        f'limit = "100 per 5 seconds"\ntick = 0.1\nhttp-port = 1\nusage-topic = "{usage}"\n'
    )
    env = {k: v for k, v in os.environ.items() if not k.startswith("DRL_AGG_")}
    env.update(PYTHONPATH=str(ROOT), DRL_AGG_GROUP=group, DRL_AGG_STATS_LOG_INTERVAL="1")
    log = tmp_path / "aggregator.log"
    stats_file = tmp_path / "stats.json"
    argv = [
        DRL,
        "aggregator",
        "run",
        "--config",
        str(config),
        "--kafka-bootstrap",
        kafka_bootstrap,
        "--grants-topic",
        grants,
        "--id",
        "ops-agg",
        "--http-port",
        str(port),
        "--stats-file",
        str(stats_file),
    ]
    base = f"http://127.0.0.1:{port}"
    agent: Agent | None = None
    with open(log, "wb") as out:
        proc = subprocess.Popen(argv, stdout=out, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
    try:

        def status(path: str) -> int:
            try:
                return _get(base + path)[0]
            except OSError:
                return 0

        _wait("/healthz 200", lambda: status("/healthz") == 200, 15, proc, log)
        _wait("/readyz 200", lambda: status("/readyz") == 200, 15, proc, log)
        ready = json.loads(_get(base + "/readyz")[2])
        assert ready["group"] == group and ready["partitions"] == [0, 1, 2, 3]
        assert ready["aggregator_id"] == "ops-agg" and ready["usage_topic_partitions"] == 4

        def scrape() -> Metrics:
            code, ctype, body = _get(base + "/metrics")
            assert code == 200 and ctype.startswith("text/plain")
            return parse_exposition(body)

        before = scrape()
        info = next(k for k in before if k[0] == "drl_aggregator_info")
        assert ("limit", "100") in info[1] and ("window_seconds", "5") in info[1]
        assert before[("drl_aggregator_partitions_owned", ())] == 4
        assert before[("drl_aggregator_usage_records_total", ())] == 0
        assert before[("drl_aggregator_ready", ())] == 1
        assert before[("drl_aggregator_broker_up", ())] == 1

        # some usage: an approximate-mode limiter and its agent in this process
        limiter = RateLimiter(100, 5, mode="approximate")
        transport = make_transport(kafka_bootstrap)
        agent = Agent(limiter, transport, "ops-web-1", usage_topic=usage, grants_topic=grants)
        agent.start()
        requests = 0
        for burst in range(30):
            for i in range(12):
                limiter.allow_request(f"client-{(burst + i) % 20}", Request())
                requests += 1
            time.sleep(0.05)

        def leased() -> bool:
            return agent is not None and agent.stats.grants_installed > 0

        _wait("leases installed", leased, 10, proc, log)
        during = scrape()
        for name in (
            "drl_aggregator_usage_batches_total",
            "drl_aggregator_usage_records_total",
            "drl_aggregator_ticks_total",
            "drl_aggregator_grant_batches_total",
            "drl_aggregator_grants_total",
            "drl_aggregator_granted_tokens_total",
            "drl_aggregator_grant_bytes_total",
            "drl_aggregator_tick_duration_seconds_count",
        ):
            assert during[(name, ())] > before.get((name, ()), 0.0), name
        assert during[("drl_aggregator_clients", ())] > 0
        assert during[("drl_aggregator_active_servers", ())] == 1
        # same machine, same clock: the offset is about minus the fastest delivery (not the
        # gap between the wall clock and the aggregator's monotonic one)
        offset = during[("drl_aggregator_server_clock_offset_seconds", (("server", "ops-web-1"),))]
        assert -1.0 < offset <= 0.05
        lag = {k[1]: v for k, v in during.items() if k[0] == "drl_aggregator_usage_lag_records"}
        assert lag and all(v >= 0 for v in lag.values())
        assert during[("drl_aggregator_usage_duplicate_batches_total", ())] == 0
        assert during[("drl_aggregator_produce_errors_total", ())] == 0
        assert during[("drl_aggregator_grant_queue_messages", ())] >= 0
        assert during[("drl_aggregator_partitions_rebuilding", ())] == 0  # ready: rebuilt

        # agent side, through its collector: every decision is counted once drained
        agent.stop()
        registry = CollectorRegistry()
        registry.register(AgentCollector(agent))
        mine = _scrape(registry)
        sid = ("server_id", "ops-web-1")
        decided = sum(
            mine[("drl_agent_decided_tokens_total", (("outcome", o), sid))]
            for o in ("admitted_lease", "admitted_extra", "rejected")
        )
        assert decided == requests
        assert mine[("drl_agent_grants_installed_total", (sid,))] > 0
        sent = agent.stats.batches_sent

        # the aggregator applies everything the agent sent, then SIGTERM
        def applied() -> bool:
            return scrape()[("drl_aggregator_usage_batches_total", ())] >= sent

        _wait("all usage batches applied", applied, 10, proc, log)
        stopped_at = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        assert proc.wait(10) == 0, log.read_text()
        assert time.monotonic() - stopped_at < 5.0

        # the last batch committed: the group's offsets are the partitions' ends
        admin = AdminClient({"bootstrap.servers": kafka_bootstrap})
        request = ConsumerGroupTopicPartitions(group, [TopicPartition(usage, p) for p in range(4)])
        committed = admin.list_consumer_group_offsets([request])[group].result(timeout=10)
        offsets = {tp.partition: tp.offset for tp in committed.topic_partitions}
        reader = Consumer({"bootstrap.servers": kafka_bootstrap, "group.id": f"{group}-reader"})
        try:
            ends = {
                p: reader.get_watermark_offsets(TopicPartition(usage, p), timeout=10)[1]
                for p in range(4)
            }
        finally:
            reader.close()
        assert all(end > 0 for end in ends.values()), ends  # heartbeats reach every partition
        assert offsets == ends
        # ... and it left the group
        described = admin.describe_consumer_groups([group])[group].result(timeout=10)
        assert described.state == ConsumerGroupState.EMPTY and not described.members

        stats = json.loads(stats_file.read_text())
        assert stats["batches"] == sent and stats["duplicates"] == 0 and stats["malformed"] == 0
        lines = log.read_text().splitlines()
        assert lines and all(line.startswith("ts=") and " event=" in line for line in lines), lines
        events = [line.split(" event=", 1)[1].split(" ", 1)[0] for line in lines]
        assert events[0] == "starting" and events[-1] == "stopped"
        assert {"running", "stopping", "stats"} <= set(events)
        assert "cause=SIGTERM" in next(line for line in lines if " event=stopping " in line)
        assert "exit_code=0" in lines[-1]
        assert len(lines) < 60  # events, not per-record or per-request lines
    finally:
        if agent is not None:
            with contextlib.suppress(Exception):  # already stopped above, or failed
                agent.stop(timeout=1)
        if proc.poll() is None:
            proc.kill()
            proc.wait(5)
