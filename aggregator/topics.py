"""``drl topics create|describe``: the usage and grant topics.

``create`` makes both topics with the documented partition counts (usage 16, grants 8),
replication factor (the broker's default unless ``--replication-factor``),
``cleanup.policy=delete``, ``message.timestamp.type=LogAppendTime`` (a new partition owner
rewinds the usage topic by the broker's time, not a server's) and ``retention.ms`` (1 day by
default; with ``--limit`` it must cover the window plus an hour).
It is idempotent: a topic that already exists is reported, and is an error only when its
partition count differs from the one asked for, or it is compacted (the messages carry no key).
Other differing settings are reported and left alone. ``describe`` prints each topic's partitions
and settings (``--json`` for scripts). Sizing: ``docs/operations.md``.

Exit codes: 0 done, 1 a topic does not match (or is missing, for ``describe``) or Kafka failed,
2 bad arguments.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from limiter import parse_rate
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC

#: Default partition counts. Usage partitions bound how many aggregators share the work (one
#: owns each); grant partitions only spread the grant traffic of many servers.
DEFAULT_USAGE_PARTITIONS = 16
DEFAULT_GRANTS_PARTITIONS = 8
#: Default retention: 1 day. It must exceed the longest policy window plus a margin.
DEFAULT_RETENTION_MS = 24 * 3600 * 1000
#: The margin over the window that ``--limit`` enforces: one hour.
RETENTION_MARGIN_MS = 3600 * 1000
#: ``-1``: the broker's ``default.replication.factor``.
DEFAULT_REPLICATION_FACTOR = -1
#: Settings ``describe`` always shows (other ones only when not the broker's default).
SHOWN_CONFIGS = (
    "cleanup.policy",
    "message.timestamp.type",
    "retention.ms",
    "retention.bytes",
    "min.insync.replicas",
    "max.message.bytes",
    "segment.bytes",
)


class TopicsError(RuntimeError):
    """Kafka failed or a topic does not match; the message says which and what to do."""


@dataclass
class PartitionInfo:
    id: int
    leader: int | None
    replicas: list[int]
    isr: list[int]


@dataclass
class TopicInfo:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]
    partition_details: list[PartitionInfo] = field(default_factory=list)


def _pairs(pairs: Sequence[str], flag: str) -> dict[str, str]:
    out: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        if not sep or not key:
            raise SystemExit(f"{flag} takes KEY=VALUE, got {pair!r}")
        out[key] = value
    return out


def _admin(args: argparse.Namespace) -> Any:
    from confluent_kafka.admin import AdminClient

    # log_level 2: keep librdkafka's per-attempt connection errors off stderr; a failure is
    # reported once, with the step that failed.
    conf: dict[str, Any] = {"bootstrap.servers": args.kafka_bootstrap, "log_level": 2}
    conf.update(_pairs(args.kafka_config, "--kafka-config"))
    return AdminClient(conf)


def describe_topic(admin: Any, name: str, timeout: float) -> TopicInfo | None:
    """The topic's partitions and settings, or None when it does not exist."""
    from confluent_kafka import KafkaError, KafkaException, TopicCollection
    from confluent_kafka.admin._config import ConfigResource  # typed homes (not re-exported)
    from confluent_kafka.admin._resource import ResourceType

    future = admin.describe_topics(TopicCollection([name]), request_timeout=timeout)[name]
    try:
        desc = future.result(timeout=timeout + 5)
    except KafkaException as e:
        err = e.args[0]
        if isinstance(err, KafkaError) and err.code() == KafkaError.UNKNOWN_TOPIC_OR_PART:
            return None
        raise TopicsError(f"cannot describe topic {name}: {err}") from e
    details = [
        PartitionInfo(
            p.id,
            None if p.leader is None else int(p.leader.id),
            [int(n.id) for n in p.replicas],
            [int(n.id) for n in p.isr],
        )
        for p in sorted(desc.partitions, key=lambda p: p.id)
    ]
    resource = ConfigResource(ResourceType.TOPIC, name)
    try:
        entries = admin.describe_configs([resource], request_timeout=timeout)[resource].result(
            timeout=timeout + 5
        )
    except KafkaException as e:
        raise TopicsError(f"cannot read the settings of topic {name}: {e.args[0]}") from e
    config = {
        key: str(entry.value)
        for key, entry in sorted(entries.items())
        if entry.value is not None and (key in SHOWN_CONFIGS or not entry.is_default)
    }
    rf = max((len(p.replicas) for p in details), default=0)
    return TopicInfo(name, len(details), rf, config, details)


def _wait_for_leaders(admin: Any, name: str, timeout: float) -> None:
    from producer.kafka_confluent import wait_for_leaders

    try:
        wait_for_leaders(admin, name, timeout=timeout)
    except TimeoutError as e:
        raise TopicsError(str(e)) from e


@dataclass(frozen=True)
class TopicSpec:
    name: str
    partitions: int
    replication_factor: int
    config: dict[str, str]
    #: the flag that sets ``partitions``, for messages
    flag: str = "--partitions"


def create_topics(admin: Any, specs: Sequence[TopicSpec], timeout: float) -> list[str]:
    """Create what is missing; report what exists. Lines to print; raises :class:`TopicsError`
    listing every topic that does not match."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.cimpl import NewTopic  # the typed home of NewTopic (cimpl.pyi)

    futures = admin.create_topics(
        [
            NewTopic(
                s.name,
                num_partitions=s.partitions,
                replication_factor=s.replication_factor,
                config=s.config,
            )
            for s in specs
        ],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    lines: list[str] = []
    problems: list[str] = []
    for spec in specs:
        created = True
        try:
            futures[spec.name].result(timeout=timeout + 5)
        except KafkaException as e:
            err = e.args[0]
            if not (isinstance(err, KafkaError) and err.code() == KafkaError.TOPIC_ALREADY_EXISTS):
                raise TopicsError(f"cannot create topic {spec.name}: {err}") from e
            created = False
        if created:
            _wait_for_leaders(admin, spec.name, timeout)
        info = describe_topic(admin, spec.name, timeout)
        if info is None:
            raise TopicsError(f"topic {spec.name} was created but cannot be described yet")
        settings = " ".join(f"{k}={info.config.get(k, '?')}" for k in sorted(spec.config))
        verb = "created" if created else "exists "
        lines.append(
            f"{verb} {spec.name}: {info.partitions} partitions, replication factor "
            f"{info.replication_factor}, {settings}"
        )
        if created:
            continue
        if info.partitions != spec.partitions:
            problems.append(
                f"topic {spec.name} exists with {info.partitions} partitions, asked for "
                f"{spec.partitions}. Either pass {spec.flag} {info.partitions} to keep it, or "
                "stop every agent and aggregator first (clients map to partitions by count) and "
                "raise it "
                f"with kafka-topics.sh --alter --topic {spec.name} --partitions {spec.partitions}"
                " (partition counts cannot be lowered)"
            )
        policy = info.config.get("cleanup.policy", "delete")
        if "delete" not in policy.split(",") or "compact" in policy.split(","):
            problems.append(
                f"topic {spec.name} has cleanup.policy={policy}: it must be delete (the "
                "messages carry no key); kafka-configs.sh --alter --entity-type topics "
                f"--entity-name {spec.name} --add-config cleanup.policy=delete"
            )
        if spec.replication_factor > 0 and info.replication_factor != spec.replication_factor:
            lines.append(
                f"  note: replication factor {info.replication_factor}, asked for "
                f"{spec.replication_factor} (not changed)"
            )
        for key, wanted in sorted(spec.config.items()):
            have = info.config.get(key)
            if key != "cleanup.policy" and have is not None and have != wanted:
                lines.append(f"  note: {key}={have}, asked for {wanted} (not changed)")
    if problems:
        raise TopicsError("\n".join(problems))
    return lines


def _specs(args: argparse.Namespace) -> list[TopicSpec]:
    for flag, value in (
        ("--usage-partitions", args.usage_partitions),
        ("--grants-partitions", args.grants_partitions),
    ):
        if value < 1:
            raise SystemExit(f"{flag} must be >= 1, got {value}")
    if args.replication_factor == 0 or args.replication_factor < -1:
        raise SystemExit(
            f"--replication-factor must be >= 1 (or -1: the broker's default), got "
            f"{args.replication_factor}"
        )
    if args.retention_ms < 1:
        raise SystemExit(f"--retention-ms must be >= 1, got {args.retention_ms}")
    if args.limit:
        try:
            window_ms = parse_rate(args.limit).window * 1000
        except ValueError as e:
            raise SystemExit(f"--limit: {e}") from None
        if args.retention_ms < window_ms + RETENTION_MARGIN_MS:
            raise SystemExit(
                f"--retention-ms {args.retention_ms} is shorter than the window of "
                f"{args.limit!r} plus an hour ({window_ms + RETENTION_MARGIN_MS:.0f} ms)"
            )
    config = {
        "cleanup.policy": "delete",
        "retention.ms": str(args.retention_ms),
        # the broker's clock, not a server's: a new partition owner rewinds by time
        "message.timestamp.type": "LogAppendTime",
    }
    config.update(_pairs(args.topic_config, "--topic-config"))
    return [
        TopicSpec(
            args.usage_topic,
            args.usage_partitions,
            args.replication_factor,
            config,
            "--usage-partitions",
        ),
        TopicSpec(
            args.grants_topic,
            args.grants_partitions,
            args.replication_factor,
            config,
            "--grants-partitions",
        ),
    ]


def cmd_create(args: argparse.Namespace) -> int:
    specs = _specs(args)
    try:
        lines = create_topics(_admin(args), specs, args.timeout)
    except TopicsError as e:
        print(f"drl topics create: {e}", file=sys.stderr)
        return 1
    for line in lines:
        print(line)
    return 0


def format_topic(info: TopicInfo) -> list[str]:
    lines = [
        f"{info.name}: {info.partitions} partitions, replication factor {info.replication_factor}",
        "  config: " + " ".join(f"{k}={v}" for k, v in info.config.items()),
    ]
    for p in info.partition_details:
        leader = "none" if p.leader is None else str(p.leader)
        lines.append(
            f"  partition {p.id}: leader {leader}, replicas {','.join(map(str, p.replicas))}, "
            f"isr {','.join(map(str, p.isr))}"
        )
    return lines


def cmd_describe(args: argparse.Namespace) -> int:
    admin = _admin(args)
    found: list[TopicInfo] = []
    missing: list[str] = []
    try:
        for name in (args.usage_topic, args.grants_topic):
            info = describe_topic(admin, name, args.timeout)
            if info is None:
                missing.append(name)
            else:
                found.append(info)
    except TopicsError as e:
        print(f"drl topics describe: {e}", file=sys.stderr)
        return 1
    if args.json:
        print(json.dumps({"topics": [asdict(t) for t in found], "missing": missing}, indent=2))
    else:
        for info in found:
            print("\n".join(format_topic(info)))
    for name in missing:
        print(
            f"drl topics describe: topic {name} does not exist (drl topics create makes it)",
            file=sys.stderr,
        )
    return 1 if missing else 0


def add_parser(sub: Any, default_bootstrap: str) -> None:
    """Register ``drl topics create|describe`` on the ``drl`` subcommands ``sub``."""
    topics = sub.add_parser("topics", help="create or describe the usage and grant topics")
    topics_sub = topics.add_subparsers(dest="topics_command", required=True)
    common = argparse.ArgumentParser(add_help=False)
    common.add_argument(
        "--kafka-bootstrap",
        default=default_bootstrap,
        help="Kafka bootstrap servers (env DRL_KAFKA_BOOTSTRAP; default %(default)s)",
    )
    common.add_argument(
        "--kafka-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="admin client setting (repeatable), e.g. security.protocol=SSL",
    )
    common.add_argument("--usage-topic", default=USAGE_TOPIC, help="default %(default)s")
    common.add_argument("--grants-topic", default=GRANTS_TOPIC, help="default %(default)s")
    common.add_argument(
        "--timeout", type=float, default=30.0, help="seconds per Kafka step (default %(default)s)"
    )
    create = topics_sub.add_parser(
        "create", parents=[common], help="create the topics (idempotent)"
    )
    create.add_argument(
        "--usage-partitions",
        type=int,
        default=DEFAULT_USAGE_PARTITIONS,
        help="usage topic partitions: the most aggregators that share the work "
        "(default %(default)s)",
    )
    create.add_argument(
        "--grants-partitions",
        type=int,
        default=DEFAULT_GRANTS_PARTITIONS,
        help="grants topic partitions (default %(default)s)",
    )
    create.add_argument(
        "--replication-factor",
        type=int,
        default=DEFAULT_REPLICATION_FACTOR,
        help="replicas per partition; -1: the broker's default.replication.factor "
        "(default %(default)s)",
    )
    create.add_argument(
        "--retention-ms",
        type=int,
        default=DEFAULT_RETENTION_MS,
        help="retention.ms of both topics: more than the longest window plus a margin "
        "(default %(default)s, 1 day)",
    )
    create.add_argument(
        "--limit",
        default=None,
        help="the aggregators' policy, e.g. '100 per 60 seconds': checks that retention "
        "covers its window plus an hour",
    )
    create.add_argument(
        "--topic-config",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="another topic setting for both topics (repeatable), e.g. min.insync.replicas=2",
    )
    create.set_defaults(func=cmd_create)
    describe = topics_sub.add_parser(
        "describe", parents=[common], help="print the topics' partitions and settings"
    )
    describe.add_argument("--json", action="store_true", help="print JSON")
    describe.set_defaults(func=cmd_describe)
