"""``drl aggregator run``: one aggregator as a long-running service.

Settings come from flags, environment variables and an optional TOML file (``--config``), in that
order of precedence, then the defaults (:data:`OPTIONS` has the mapping; ``docs/operations.md``
the table). Beside the service loop, an HTTP endpoint (:mod:`aggregator.http`) answers
``/healthz`` (200 while the loop runs), ``/readyz`` (200 once usage partitions are assigned and
the broker answers) and ``/metrics`` (:mod:`aggregator.metrics`, a dedicated registry).

SIGTERM or SIGINT: finish the current step (and its tick), flush the grants, commit the consumed
offsets, leave the consumer group, exit 0; a second signal exits at once with 128 + signal.
With ``--stats-file`` the final counters are written there as JSON (for tests and operators).

Logs go to stderr, one line per event, ``key=value`` (logfmt) or JSON (``--log-format``); never
one per request or per record: repeats of the same message beyond 5 in 10 s are dropped and
counted on the next one that passes (``suppressed=N``).
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import logging
import math
import os
import signal
import sys
import threading
import time
import tomllib
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime
from types import FrameType
from typing import Any

from limiter import (
    ConfigurationService,
    Policy,
    RateLimitConfiguration,
    RedisConfigurationService,
    StaticConfigurationService,
    parse_rate,
)
from limiter.keylimits import ServiceKeyLimits
from producer import CLIENTS, make_transport
from producer.transport import (
    GRANTS_TOPIC,
    USAGE_TOPIC,
    Receiver,
    Rewind,
    Sender,
    Transport,
)

from .checkpoint import CheckpointStore
from .control import (
    DEFAULT_CONTROL_INTERVAL,
    Controller,
    ControlOptions,
    parse_adaptive,
    parse_breakers,
)
from .http import DEFAULT_HOST, DEFAULT_PORT, OpsServer
from .metrics import AggregatorCollector, new_registry, tick_histogram
from .service import (
    DEFAULT_GROUP,
    DEFAULT_SERVER_TIMEOUT,
    DEFAULT_TICK,
    Aggregator,
    AggregatorConfig,
)

log = logging.getLogger(__name__)

#: Environment variable naming the TOML settings file (``--config`` wins over it).
CONFIG_ENV = "DRL_AGG_CONFIG"
LOG_FORMATS = ("logfmt", "json")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR")
#: Seconds between broker metadata probes (readiness, ``drl_aggregator_broker_up``).
BROKER_PROBE_INTERVAL = 10.0
#: Not ready when the broker has not answered a probe for this many seconds.
BROKER_STALE_AFTER = 30.0


class ConfigError(ValueError):
    """A setting is missing or invalid; the message names the setting and where it came from."""


# -- settings ------------------------------------------------------------------------------------


def _text(value: object) -> str:
    if not isinstance(value, str) or not value:
        raise ValueError(f"expected a non-empty string, got {value!r}")
    return value


def _optional_text(value: object) -> str | None:
    return None if value is None else _text(value)


def _seconds(value: object) -> float:
    if isinstance(value, bool):
        raise ValueError(f"expected a number of seconds, got {value!r}")
    try:
        out = float(value)  # type: ignore[arg-type]
    except (TypeError, ValueError):
        raise ValueError(f"expected a number of seconds, got {value!r}") from None
    if not math.isfinite(out) or out < 0:
        raise ValueError(f"expected a finite number of seconds >= 0, got {value!r}")
    return out


def _optional_seconds(value: object) -> float | None:
    if value is None or (isinstance(value, str) and value.lower() == "none"):
        return None
    return _seconds(value)


def _adaptive(value: object) -> str | None:
    text = _optional_text(value)
    if text is not None:
        parse_adaptive(text)  # refused here, before anything starts
    return text


def _breakers(value: object) -> str | None:
    text = _optional_text(value)
    if text is not None:
        parse_breakers(text)
    return text


def _port(value: object) -> int:
    if isinstance(value, bool):
        raise ValueError(f"expected a port number, got {value!r}")
    try:
        out: int = int(value)  # type: ignore[call-overload]
    except (TypeError, ValueError):
        raise ValueError(f"expected a port number, got {value!r}") from None
    if not 0 <= out <= 65535:
        raise ValueError(f"expected a port number 0..65535, got {value!r}")
    return out


def _choice(choices: Sequence[str], *, upper: bool = False) -> Callable[[object], str]:
    def parse(value: object) -> str:
        text = _text(value)
        text = text.upper() if upper else text
        if text not in choices:
            raise ValueError(f"expected one of {', '.join(choices)}, got {value!r}")
        return text

    return parse


@dataclass(frozen=True)
class Option:
    """One setting: its flag (``--`` + name with dashes), environment variable and parser."""

    name: str
    env: str
    parse: Callable[[object], object]
    help: str

    @property
    def flag(self) -> str:
        return "--" + self.name.replace("_", "-")


#: Every setting of ``drl aggregator run`` (``kafka_config`` is merged key by key, see below).
OPTIONS: tuple[Option, ...] = (
    Option("kafka_bootstrap", "DRL_KAFKA_BOOTSTRAP", _text, "Kafka bootstrap servers"),
    Option("client", "DRL_AGG_CLIENT", _choice(CLIENTS), "Kafka client library"),
    Option(
        "kafka_config",
        "DRL_AGG_KAFKA_CONFIG",
        lambda v: v,
        "Kafka client setting KEY=VALUE passed through (repeatable), e.g. security.protocol=SSL;"
        " env: a JSON object",
    ),
    Option("limit", "DRL_AGG_LIMIT", _text, 'the policy, e.g. "200 per 5 seconds" (required)'),
    Option("tick", "DRL_AGG_TICK", _seconds, "seconds between allocations"),
    Option(
        "lease_ttl",
        "DRL_AGG_LEASE_TTL",
        _optional_seconds,
        "lease life, seconds (default 10 ticks)",
    ),
    Option(
        "server_timeout",
        "DRL_AGG_SERVER_TIMEOUT",
        _seconds,
        "seconds of silence after which a server is inactive",
    ),
    Option(
        "redis_url",
        "DRL_AGG_REDIS_URL",
        _optional_text,
        "Redis for window checkpoints (redis[s]://[user:password@]host:port/db; none: off)",
    ),
    Option(
        "config_url",
        "DRL_AGG_CONFIG_URL",
        _optional_text,
        "per-client and tier limits: the configuration store's redis[s]:// URL, or a "
        "TOML/JSON/YAML file (default: --limit for every client)",
    ),
    Option(
        "adaptive",
        "DRL_AGG_ADAPTIVE",
        _adaptive,
        "adaptive limits: policies separated by ';', each KEY=VALUE pairs separated by ',', e.g."
        ' "scope=free,floor=0.2,target_p99=0.25,max_errors=0.05" (docs/adaptive.md; unset: off)',
    ),
    Option(
        "breaker",
        "DRL_AGG_BREAKER",
        _breakers,
        "circuit breakers per backend, same syntax, e.g. "
        '"backend=db,error_rate=0.5,cooldown=5" (docs/adaptive.md; unset: off)',
    ),
    Option(
        "control_interval",
        "DRL_AGG_CONTROL_INTERVAL",
        _seconds,
        "seconds between adaptive/breaker steps and control messages",
    ),
    Option(
        "checkpoint_interval",
        "DRL_AGG_CHECKPOINT_INTERVAL",
        _optional_seconds,
        "seconds between window checkpoints (default window/60 within 5..300)",
    ),
    Option("usage_topic", "DRL_AGG_USAGE_TOPIC", _text, "usage topic"),
    Option("grants_topic", "DRL_AGG_GRANTS_TOPIC", _text, "grants topic"),
    Option("group", "DRL_AGG_GROUP", _text, "consumer group of the aggregators"),
    Option("id", "DRL_AGG_ID", _optional_text, "aggregator id (default host-pid)"),
    Option("duration", "DRL_AGG_DURATION", _optional_seconds, "stop after this many seconds"),
    Option("stats_file", "DRL_AGG_STATS_FILE", _optional_text, "write final counters here (JSON)"),
    Option("http_host", "DRL_AGG_HTTP_HOST", _text, "address of /healthz, /readyz, /metrics"),
    Option("http_port", "DRL_AGG_HTTP_PORT", _port, "port of /healthz, /readyz, /metrics (0: any)"),
    Option("log_format", "DRL_AGG_LOG_FORMAT", _choice(LOG_FORMATS), "log line format"),
    Option("log_level", "DRL_AGG_LOG_LEVEL", _choice(LOG_LEVELS, upper=True), "log level"),
    Option(
        "stats_log_interval",
        "DRL_AGG_STATS_LOG_INTERVAL",
        _seconds,
        "seconds between 'stats' log lines (0: none)",
    ),
)
_BY_NAME = {o.name: o for o in OPTIONS}


@dataclass(frozen=True)
class RunSettings:
    """The resolved settings; ``sources`` says where each came from (flag/env/file/default)."""

    limit: str
    kafka_bootstrap: str
    client: str = "confluent"
    kafka_config: Mapping[str, str] = field(default_factory=dict)
    tick: float = DEFAULT_TICK
    lease_ttl: float | None = None
    server_timeout: float = DEFAULT_SERVER_TIMEOUT
    usage_topic: str = USAGE_TOPIC
    grants_topic: str = GRANTS_TOPIC
    group: str = DEFAULT_GROUP
    redis_url: str | None = None
    config_url: str | None = None
    checkpoint_interval: float | None = None
    adaptive: str | None = None
    breaker: str | None = None
    control_interval: float = DEFAULT_CONTROL_INTERVAL
    id: str | None = None
    duration: float | None = None
    stats_file: str | None = None
    http_host: str = DEFAULT_HOST
    http_port: int = DEFAULT_PORT
    log_format: str = "logfmt"
    log_level: str = "INFO"
    stats_log_interval: float = 60.0
    config_file: str | None = None
    sources: Mapping[str, str] = field(default_factory=dict)


def _pairs(pairs: object, where: str) -> dict[str, str]:
    """``["k=v", ...]`` or ``{"k": v}`` (TOML tables may nest: dotted keys) -> ``{"k": "v"}``."""
    out: dict[str, str] = {}
    if isinstance(pairs, Mapping):

        def walk(prefix: str, table: Mapping[str, object]) -> None:
            for k, v in table.items():
                key = f"{prefix}{k}"
                if isinstance(v, Mapping):
                    walk(key + ".", v)
                elif isinstance(v, bool):
                    out[key] = "true" if v else "false"
                elif isinstance(v, str | int | float):
                    out[key] = str(v)
                else:
                    raise ConfigError(f"{where}: {key}: expected a scalar, got {v!r}")

        walk("", pairs)
        return out
    if isinstance(pairs, list | tuple):
        for pair in pairs:
            key, sep, value = str(pair).partition("=")
            if not sep or not key:
                raise ConfigError(f"{where}: expected KEY=VALUE, got {pair!r}")
            out[key] = value
        return out
    raise ConfigError(f"{where}: expected KEY=VALUE pairs or a table, got {pairs!r}")


def load_config_file(path: str) -> dict[str, Any]:
    """A TOML file of settings: the flag names, with dashes or underscores, at the top level."""
    try:
        with open(path, "rb") as f:
            raw = tomllib.load(f)
    except OSError as e:
        raise ConfigError(f"config file {path}: {e.strerror or e}") from e
    except tomllib.TOMLDecodeError as e:
        raise ConfigError(f"config file {path}: invalid TOML: {e}") from e
    out: dict[str, Any] = {}
    for key, value in raw.items():
        name = key.replace("-", "_")
        if name not in _BY_NAME:
            known = ", ".join(o.name.replace("_", "-") for o in OPTIONS)
            raise ConfigError(f"config file {path}: unknown setting {key!r} (known: {known})")
        out[name] = value
    return out


def resolve_settings(
    flags: Mapping[str, Any],
    env: Mapping[str, str],
    file_values: Mapping[str, Any],
    *,
    default_bootstrap: str,
    config_file: str | None = None,
) -> RunSettings:
    """Flags (only those given) > environment > file > defaults, setting by setting.

    ``kafka_config`` is merged key by key in the same order (a flag's ``KEY=VALUE`` overrides the
    same key from the environment's JSON object, which overrides the file's table). Empty
    environment variables count as unset.
    """
    where_file = f"config file {config_file}" if config_file else "config file"
    values: dict[str, Any] = {}
    sources: dict[str, str] = {}
    for o in OPTIONS:
        if o.name == "kafka_config":
            continue
        layers: list[tuple[str, str, object]] = []
        if flags.get(o.name) is not None:
            layers.append(("flag", o.flag, flags[o.name]))
        if env.get(o.env):
            layers.append(("env", o.env, env[o.env]))
        if o.name in file_values:
            key = o.name.replace("_", "-")
            layers.append(("file", f"{where_file}: {key}", file_values[o.name]))
        if not layers:
            continue
        source, where, raw = layers[0]
        try:
            values[o.name] = o.parse(raw)
        except ValueError as e:
            raise ConfigError(f"{where}: {e}") from None
        sources[o.name] = source
    merged: dict[str, str] = {}
    config_sources: list[str] = []
    if "kafka_config" in file_values:
        merged.update(_pairs(file_values["kafka_config"], f"{where_file}: kafka-config"))
        config_sources.append("file")
    if env.get("DRL_AGG_KAFKA_CONFIG"):
        try:
            parsed = json.loads(env["DRL_AGG_KAFKA_CONFIG"])
        except json.JSONDecodeError as e:
            raise ConfigError(f"DRL_AGG_KAFKA_CONFIG: expected a JSON object: {e}") from None
        if not isinstance(parsed, dict):
            raise ConfigError("DRL_AGG_KAFKA_CONFIG: expected a JSON object")
        merged.update(_pairs(parsed, "DRL_AGG_KAFKA_CONFIG"))
        config_sources.append("env")
    if flags.get("kafka_config"):
        merged.update(_pairs(flags["kafka_config"], "--kafka-config"))
        config_sources.append("flag")
    values["kafka_config"] = merged
    sources["kafka_config"] = "+".join(config_sources) or "default"
    if "kafka_bootstrap" not in values:
        values["kafka_bootstrap"] = default_bootstrap
    if "limit" not in values:
        raise ConfigError(
            "the policy is required: --limit, DRL_AGG_LIMIT or limit = ... in the config file"
        )
    for o in OPTIONS:
        sources.setdefault(o.name, "default")
    return RunSettings(**values, config_file=config_file, sources=sources)


def settings_from_args(args: argparse.Namespace, env: Mapping[str, str]) -> RunSettings:
    """The settings for parsed ``args`` (flags not given are absent), ``env`` and the file."""
    flags = {o.name: getattr(args, o.name) for o in OPTIONS if hasattr(args, o.name)}
    path = getattr(args, "config", None) or env.get(CONFIG_ENV) or None
    file_values = load_config_file(path) if path else {}
    default_bootstrap = getattr(args, "run_default_bootstrap", None) or _local_bootstrap(env)
    return resolve_settings(
        flags, env, file_values, default_bootstrap=default_bootstrap, config_file=path
    )


def _local_bootstrap(env: Mapping[str, str]) -> str:
    return f"127.0.0.1:{env.get('DRL_KAFKA_PORT') or 39092}"


def add_arguments(p: argparse.ArgumentParser, default_bootstrap: str) -> None:
    """The flags of ``drl aggregator run``; a flag not given is absent from the namespace."""
    p.set_defaults(run_default_bootstrap=default_bootstrap)
    p.add_argument(
        "--config",
        default=None,
        metavar="FILE",
        help=f"TOML file with any of these settings (env {CONFIG_ENV}); flags > env > file",
    )
    s = argparse.SUPPRESS
    defaults = {f.name: f.default for f in dataclasses.fields(RunSettings)}
    defaults["kafka_bootstrap"] = default_bootstrap
    for o in OPTIONS:
        default = defaults.get(o.name, dataclasses.MISSING)
        shown = "" if default in (None, dataclasses.MISSING) else f"; default {default}"
        help_text = f"{o.help} (env {o.env}{shown})".replace("%", "%%")
        if o.name == "kafka_config":
            p.add_argument(o.flag, action="append", default=s, metavar="KEY=VALUE", help=help_text)
        elif o.name == "client":
            p.add_argument(o.flag, choices=CLIENTS, default=s, help=help_text)
        elif o.name == "log_format":
            p.add_argument(o.flag, choices=LOG_FORMATS, default=s, help=help_text)
        elif o.name == "log_level":
            p.add_argument(o.flag, default=s, metavar="|".join(LOG_LEVELS), help=help_text)
        elif o.parse in (_seconds, _optional_seconds):
            p.add_argument(o.flag, type=float, default=s, metavar="SECONDS", help=help_text)
        elif o.parse is _port:
            p.add_argument(o.flag, type=int, default=s, metavar="PORT", help=help_text)
        else:
            p.add_argument(o.flag, default=s, help=help_text)


# -- logs ----------------------------------------------------------------------------------------


def _logfmt_value(value: object) -> str:
    if value is None:
        return '""'
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        return f"{value:.6g}"
    if isinstance(value, list | tuple | set | frozenset):
        value = ",".join(str(v) for v in value)
    text = str(value)
    if text and all(c.isprintable() and c not in ' ="\\' for c in text):
        return text
    escaped = text.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")
    return '"' + escaped.replace("\r", "\\r").replace("\t", "\\t") + '"'


class EventFormatter(logging.Formatter):
    """One line per record: ``ts level logger event [msg] fields... [exc]``, logfmt or JSON.

    Records made by :func:`event` carry an event name and fields; any other record (the
    service's, librdkafka's) is ``event=log`` with its message as ``msg``.
    """

    def __init__(self, fmt: str = "logfmt") -> None:
        super().__init__()
        self.json = fmt == "json"

    def format(self, record: logging.LogRecord) -> str:
        ts = datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds")
        out: dict[str, object] = {
            "ts": ts.replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
        }
        name = getattr(record, "event", None)
        if name:
            out["event"] = name
        else:
            out["event"] = "log"
            out["msg"] = record.getMessage()
        fields = getattr(record, "fields", None)
        if isinstance(fields, Mapping):
            for k, v in fields.items():
                if v is not None:
                    out.setdefault(str(k), v)
        suppressed = getattr(record, "suppressed", 0)
        if suppressed:
            out["suppressed"] = suppressed
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        if self.json:
            return json.dumps(out, default=str, separators=(",", ":"))
        return " ".join(f"{k}={_logfmt_value(v)}" for k, v in out.items())


class RepeatFilter(logging.Filter):
    """Passes at most ``burst`` records of one kind per ``period`` seconds and counts the rest.

    A kind is (logger, level, message template) — plus the facility for librdkafka, whose
    records share one template. The first record of a kind to pass after some were dropped
    carries ``suppressed=N``.
    """

    def __init__(self, burst: int = 5, period: float = 10.0) -> None:
        super().__init__()
        self.burst = burst
        self.period = period
        self._kinds: dict[tuple[object, ...], list[float]] = {}  # [start, passed, dropped]
        self._lock = threading.Lock()

    def filter(self, record: logging.LogRecord) -> bool:
        key: tuple[object, ...] = (record.name, record.levelno, str(record.msg))
        if record.name == "librdkafka" and isinstance(record.args, tuple) and record.args:
            key += (record.args[0],)
        now = time.monotonic()
        with self._lock:
            state = self._kinds.get(key)
            if state is None:
                if len(self._kinds) > 10_000:
                    self._kinds.clear()
                state = self._kinds[key] = [now, 0.0, 0.0]
            if now - state[0] >= self.period:
                state[0], state[1] = now, 0.0
            if state[1] >= self.burst:
                state[2] += 1
                return False
            state[1] += 1
            if state[2]:
                record.suppressed = int(state[2])
                state[2] = 0.0
        return True


def event(level: int, name: str, *, exc: bool = False, **fields: Any) -> None:
    """Log one event of the service: ``event=name`` and ``fields`` as key=value pairs (with the
    current exception's traceback as ``exc`` when ``exc``)."""
    log.log(level, name, exc_info=exc, extra={"event": name, "fields": fields})


def configure_logging(fmt: str, level: str) -> logging.Handler:
    """A stderr handler with :class:`EventFormatter` and :class:`RepeatFilter` on the root;
    kafka-python's own loggers at WARNING unless ``level`` is DEBUG."""
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(EventFormatter(fmt))
    handler.addFilter(RepeatFilter())
    root = logging.getLogger()
    root.addHandler(handler)
    root.setLevel(getattr(logging, level))
    if level != "DEBUG":  # kafka-python logs every connection at INFO: not events of ours
        logging.getLogger("kafka").setLevel(logging.WARNING)
    return handler


# -- service state: health, readiness, broker probe ------------------------------------------------


class ServiceState:
    """What ``/healthz`` and ``/readyz`` report, shared between the loop and the HTTP thread."""

    def __init__(self, tick: float, *, clock: Callable[[], float] = time.monotonic) -> None:
        self.clock = clock
        #: ``starting`` (connecting), ``running``, ``stopping``, ``stopped``
        self.phase = "starting"
        self.aggregator: Aggregator | None = None
        self.last_step = -math.inf
        #: The loop counts as stalled when no step completed for this long.
        self.stall_after = max(10.0, 20 * tick)
        self.broker_ok_at = -math.inf
        self.broker_error = ""
        self.probe_ok = False
        self.usage_partitions: int | None = None
        #: The signal that stopped the service, if one did.
        self.signal = ""
        self._lag: Callable[[], Mapping[int, int]] | None = None

    def health(self) -> tuple[bool, dict[str, Any]]:
        if self.phase == "running":
            age = self.clock() - self.last_step
            if age <= self.stall_after:
                return True, {"status": "ok", "last_step_age_seconds": round(age, 3)}
            return False, {
                "status": "stalled",
                "reason": f"the service loop has not completed a step for {age:.1f} s",
            }
        reasons = {
            "starting": "connecting to Kafka",
            "stopping": "shutting down",
            "stopped": "stopped",
        }
        return False, {"status": self.phase, "reason": reasons.get(self.phase, self.phase)}

    def readiness(self) -> tuple[bool, dict[str, Any]]:
        ok, health = self.health()
        if not ok or self.aggregator is None:
            return False, {"ready": False, "reason": health.get("reason", "not running")}
        agg = self.aggregator
        silent = self.clock() - self.broker_ok_at
        if silent > BROKER_STALE_AFTER:
            reason = f"the broker has not answered for {silent:.0f} s"
            if self.broker_error:
                reason += f": {self.broker_error}"
            return False, {"ready": False, "reason": reason}
        partitions = agg.partitions
        base = {
            "aggregator_id": agg.config.aggregator_id,
            "group": agg.config.group,
            "partitions": partitions,
            "usage_topic_partitions": self.usage_partitions,
        }
        if not partitions:
            reason = (
                "no usage partitions assigned: the consumer group is rebalancing, or it has more "
                "aggregators than the usage topic has partitions"
            )
            return False, {"ready": False, "reason": reason, **base}
        rebuilding = agg.rebuilding()
        if rebuilding:
            reason = (
                f"rebuilding usage partitions {rebuilding}: replaying the last window, or "
                "waiting one lease TTL for the previous owner's leases to expire"
            )
            return False, {"ready": False, "reason": reason, "rebuilding": rebuilding, **base}
        return True, {"ready": True, **base}

    def broker_up(self) -> bool:
        return self.probe_ok and self.clock() - self.broker_ok_at <= BROKER_STALE_AFTER

    def usage_topic_partitions(self) -> int | None:
        return self.usage_partitions

    def broker_answered(self, partitions: int | None = None) -> None:
        self.broker_ok_at = self.clock()
        self.probe_ok = True
        if partitions is not None:
            self.usage_partitions = partitions

    def set_lag(self, lag: Callable[[], Mapping[int, int]] | None) -> None:
        self._lag = lag

    def lag(self) -> Mapping[int, int] | None:
        """Records behind per owned partition, or None (not running, or not available)."""
        if self.phase != "running" or self._lag is None:
            return None
        try:
            return self._lag()
        except Exception:
            return None

    def probe(self, transport: Transport, topic: str, stop: threading.Event) -> None:
        """Every :data:`BROKER_PROBE_INTERVAL` s read ``topic``'s metadata; log changes only."""
        while not stop.wait(BROKER_PROBE_INTERVAL):
            try:
                n = transport.partitions(topic)
            except Exception as e:
                self.broker_error = str(e)
                if self.probe_ok:
                    event(logging.WARNING, "broker_unreachable", topic=topic, error=str(e))
                self.probe_ok = False
                continue
            if not self.probe_ok:
                event(logging.INFO, "broker_reachable", topic=topic)
            if self.usage_partitions is not None and n != self.usage_partitions:
                event(
                    logging.WARNING,
                    "usage_partitions_changed",
                    topic=topic,
                    before=self.usage_partitions,
                    after=n,
                    action="restart every agent and aggregator: clients now map to other "
                    "partitions",
                )
            self.broker_answered(n)


class _CapturingTransport:
    """Passes through to ``inner`` and keeps the receivers made (for the lag metric)."""

    def __init__(self, inner: Transport) -> None:
        self.inner = inner
        self.receivers: list[Receiver] = []

    def sender(self) -> Sender:
        return self.inner.sender()

    def receiver(
        self,
        topic: str,
        *,
        partitions: Sequence[int] | None = None,
        group: str | None = None,
        on_assign: Callable[[list[int]], None] | None = None,
        on_revoke: Callable[[list[int]], None] | None = None,
        rewind: Rewind | None = None,
    ) -> Receiver:
        r = self.inner.receiver(
            topic,
            partitions=partitions,
            group=group,
            on_assign=on_assign,
            on_revoke=on_revoke,
            rewind=rewind,
        )
        self.receivers.append(r)
        return r

    def partitions(self, topic: str) -> int:
        return self.inner.partitions(topic)


# -- the command ---------------------------------------------------------------------------------


def _summary(agg: Aggregator) -> dict[str, Any]:
    s = agg.stats
    return {
        "batches": s.batches,
        "records": s.records,
        "duplicates": s.duplicates,
        "malformed": s.malformed,
        "errors": s.errors,
        "ticks": s.ticks,
        "grant_batches": s.grant_batches,
        "grants": s.grants,
        "tokens_granted": s.tokens_granted,
        "produce_errors": s.produce_errors,
        "clients": agg.clients(),
        "partitions": agg.partitions,
    }


def cmd_run(args: argparse.Namespace) -> int:
    try:
        settings = settings_from_args(args, os.environ)
        parse_rate(settings.limit)  # fail before anything starts
    except ValueError as e:
        print(f"drl aggregator run: {e}", file=sys.stderr)
        return 2
    return run_service(settings)


def run_service(settings: RunSettings) -> int:
    """Run one aggregator with ``settings`` until stopped; the exit code."""
    handler = configure_logging(settings.log_format, settings.log_level)
    try:
        return _run(settings)
    finally:
        logging.getLogger().removeHandler(handler)


def _run(settings: RunSettings) -> int:
    policy = parse_rate(settings.limit)
    extra: dict[str, Any] = {} if settings.id is None else {"aggregator_id": settings.id}
    try:
        config = AggregatorConfig(
            policy,
            tick=settings.tick,
            lease_ttl=settings.lease_ttl,
            server_timeout=settings.server_timeout,
            usage_topic=settings.usage_topic,
            grants_topic=settings.grants_topic,
            group=settings.group,
            checkpoint_interval=settings.checkpoint_interval,
            **extra,
        )
    except ValueError as e:
        event(logging.ERROR, "invalid_config", error=str(e))
        return 2
    started = time.monotonic()
    state = ServiceState(config.tick)
    registry = new_registry()
    ticks = tick_histogram(registry)
    stop = threading.Event()
    restore = _install_signals(stop, state)
    try:
        server = OpsServer(
            settings.http_host,
            settings.http_port,
            registry,
            health=state.health,
            ready=state.readiness,
        )
    except OSError as e:
        event(
            logging.ERROR,
            "http_bind_failed",
            host=settings.http_host,
            port=settings.http_port,
            error=str(e),
        )
        restore()
        return 1
    server.start()
    event(
        logging.INFO,
        "starting",
        aggregator_id=config.aggregator_id,
        policy=str(policy),
        tick=config.tick,
        lease_ttl=config.ttl,
        server_timeout=config.server_timeout,
        group=config.group,
        usage_topic=config.usage_topic,
        grants_topic=config.grants_topic,
        kafka_bootstrap=settings.kafka_bootstrap,
        client=settings.client,
        config_file=settings.config_file,
        http=f"{server.host}:{server.port}",
    )
    probe_stop = threading.Event()
    try:
        kafka_config: dict[str, Any] = dict(settings.kafka_config)
        if settings.client == "confluent":
            kafka_config.setdefault("logger", logging.getLogger("librdkafka"))
        transport = _CapturingTransport(
            make_transport(settings.kafka_bootstrap, client=settings.client, config=kafka_config)
        )
        try:
            checkpoints = (
                None
                if settings.redis_url is None
                else CheckpointStore(settings.redis_url, config.group, config.usage_topic)
            )
            limits = None if settings.config_url is None else _limits(settings.config_url, policy)
            control = _control(settings, config.aggregator_id)
            aggregator = Aggregator(
                config, transport, checkpoints=checkpoints, limits=limits, control=control
            )
        except Exception as e:
            event(logging.ERROR, "startup_failed", error=f"{type(e).__name__}: {e}")
            return 1
        try:
            state.broker_answered(transport.partitions(config.usage_topic))
        except Exception as e:
            event(logging.ERROR, "startup_failed", error=f"{type(e).__name__}: {e}")
            aggregator.close()
            return 1
        state.aggregator = aggregator
        lag = getattr(transport.receivers[0], "lag", None) if transport.receivers else None
        state.set_lag(lag if callable(lag) else None)
        registry.register(AggregatorCollector(aggregator, lag=state.lag, service=state))
        threading.Thread(
            target=state.probe,
            args=(transport, config.usage_topic, probe_stop),
            name="drl-broker-probe",
            daemon=True,
        ).start()
        if settings.duration is not None:
            timer = threading.Timer(settings.duration, stop.set)
            timer.daemon = True
            timer.start()
        event(logging.INFO, "running", usage_topic_partitions=state.usage_partitions)
        code = _loop(aggregator, state, stop, ticks.observe, settings.stats_log_interval)
        state.phase = "stopping"
        cause = state.signal or ("duration" if code == 0 else "error")
        event(logging.INFO, "stopping", cause=cause, **_summary(aggregator))
        try:
            aggregator.close()
            if aggregator.checkpoints is not None:
                aggregator.checkpoints.close()
            if isinstance(limits, ServiceKeyLimits):
                limits.close()
        except Exception as e:
            event(logging.ERROR, "close_failed", error=f"{type(e).__name__}: {e}")
            code = code or 1
        state.phase = "stopped"
        stats = dataclasses.asdict(aggregator.stats)
        stats["uptime_seconds"] = time.monotonic() - started
        stats["clients"] = aggregator.clients()
        if settings.stats_file:
            with open(settings.stats_file, "w") as f:
                json.dump(stats, f)
        event(
            logging.INFO,
            "stopped",
            exit_code=code,
            uptime_seconds=round(stats["uptime_seconds"], 3),
            **_summary(aggregator),
        )
        return code
    finally:
        probe_stop.set()
        state.phase = "stopped"
        server.close()
        restore()


def _control(settings: RunSettings, aggregator_id: str) -> Controller | None:
    """The adaptive limits and breakers of ``settings`` (None when neither is configured)."""
    options = ControlOptions(
        adaptive=parse_adaptive(settings.adaptive or ""),
        breakers=parse_breakers(settings.breaker or ""),
        interval=settings.control_interval,
    )
    return Controller(options, aggregator_id) if options.enabled else None


def _limits(url: str, policy: Policy) -> ServiceKeyLimits:
    """Per-client limits from the configuration store at ``url`` (Redis, or a file); clients
    without their own approximate-mode limit get ``policy``'s."""
    fallback = RateLimitConfiguration(policies=(policy,), mode="approximate")
    service: ConfigurationService
    if url.split("://", 1)[0] in ("redis", "rediss", "unix"):
        service = RedisConfigurationService(url, fallback=fallback)
    else:
        service = StaticConfigurationService.from_file(url, fallback=fallback)
    return ServiceKeyLimits(service, policy, owns_service=True)


def _loop(
    aggregator: Aggregator,
    state: ServiceState,
    stop: threading.Event,
    observe_tick: Callable[[float], None],
    stats_interval: float,
) -> int:
    """:meth:`Aggregator.run`'s loop, plus the liveness stamp and the tick histogram."""
    stats = aggregator.stats
    state.last_step = time.monotonic()
    state.phase = "running"
    next_stats = time.monotonic() + stats_interval
    try:
        while not stop.is_set():
            ticks = stats.ticks
            aggregator.step()
            now = time.monotonic()
            state.last_step = now
            if stats.ticks != ticks:
                observe_tick(stats.last_tick_seconds)
            if stats_interval > 0 and now >= next_stats:
                next_stats = now + stats_interval
                event(logging.INFO, "stats", **_summary(aggregator))
    except Exception as e:
        event(logging.ERROR, "loop_failed", exc=True, error=f"{type(e).__name__}: {e}")
        return 1
    return 0


def _install_signals(stop: threading.Event, state: ServiceState) -> Callable[[], None]:
    """SIGTERM/SIGINT set ``stop`` (the loop logs it); a second one exits at once. Returns the
    undo. Nothing is logged from the handler itself."""
    if threading.current_thread() is not threading.main_thread():
        return lambda: None

    def handle(signum: int, _frame: FrameType | None) -> None:
        name = signal.Signals(signum).name
        if stop.is_set():
            os.write(2, f"event=forced_exit signal={name}\n".encode())
            os._exit(128 + signum)
        state.signal = name
        stop.set()

    previous = {sig: signal.signal(sig, handle) for sig in (signal.SIGTERM, signal.SIGINT)}

    def restore() -> None:
        for sig, handler in previous.items():
            signal.signal(sig, handler)

    return restore
