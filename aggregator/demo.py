"""``drl demo``: the product doing its main job on this machine, measured, in about a minute.

Kafka mode (the default): fresh topics (4 usage, 4 grant partitions) on the broker, one
aggregator process (``drl aggregator run``), four app-server processes (uvicorn serving a tiny
ASGI app behind :class:`limiter.middleware.RateLimitMiddleware`, approximate mode through
:func:`producer.connect`; :mod:`aggregator.demo_server`), and an HTTP load generator in this
process (asyncio + httpx, keep-alive; :mod:`aggregator.loadgen`) offering a Zipf workload with a
few hot clients at 2x-5x their limit, each request to one of the servers at random. Everything
binds 127.0.0.1; everything started is stopped (also on Ctrl-C or a failure) and the topics and
the consumer group are deleted.

Embedded mode (``--embedded``, and the fallback when there is no Java and no
``DRL_KAFKA_BOOTSTRAP``, or no uvicorn/httpx): the same workload in one process, no Kafka: an
:class:`~producer.InProcessBus`, an :class:`~aggregator.service.Aggregator` thread and four
approximate-mode limiters with their agents, requests offered by direct ``check`` calls.

The report (stdout, ``demo-report.json``, ``demo-report.png`` in ``--out-dir``): per client
admitted against the limit, the worst window (most admissions in any ``W`` seconds, from the
servers' decision times) against the documented bound ``L + N·a``, the utilisation of the
saturated clients, decision latency, grants and bytes on the topics, requests per second.
See docs/demo.md.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import dataclasses
import importlib.util
import json
import math
import os
import platform
import shutil
import signal
import subprocess
import sys
import threading
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import numpy as np

from .loadgen import (
    FAILED,
    HTTP_CLIENTS,
    Progress,
    RequestLog,
    Schedule,
    make_schedule,
    multipliers,
)

DEFAULT_DURATION = 30.0
DEFAULT_CLIENTS = 100
DEFAULT_LIMIT = 200
DEFAULT_WINDOW = 10.0
DEFAULT_SERVERS = 4
DEFAULT_SEED = 7
DEFAULT_OUT_DIR = "demo-output"
#: Partitions of the demo's usage and grant topics.
PARTITIONS = 4
#: Clients offered at least this multiple of their limit count as saturated.
SATURATED = 2.0
#: Clients offered at most this multiple of their limit count as light.
LIGHT = 0.5
#: Seconds to wait for the aggregator's partitions and the servers' readiness.
START_TIMEOUT = 60.0
#: Rows of the per-client table in the printed report.
TOP = 10


class DemoError(RuntimeError):
    """The demo could not run; the message says what failed and what to try."""


class _Terminated(BaseException):
    """SIGTERM to the demo: unwind through the cleanup like Ctrl-C."""


# -- configuration -------------------------------------------------------------------------------


@dataclass(frozen=True)
class DemoConfig:
    duration: float = DEFAULT_DURATION
    clients: int = DEFAULT_CLIENTS
    limit: int = DEFAULT_LIMIT
    window: float = DEFAULT_WINDOW
    servers: int = DEFAULT_SERVERS
    seed: int = DEFAULT_SEED
    cold_start_allowance: float = 0.01
    connections: int = 16
    http_client: str = "raw"
    tick: float = 0.1
    out_dir: Path = Path(DEFAULT_OUT_DIR)

    @property
    def allowance(self) -> int:
        """The optimistic cold start's ``a`` (docs/consistency.md)."""
        return max(1, math.floor(self.cold_start_allowance * self.limit))

    @property
    def bound(self) -> int:
        """Most tokens admitted in any window, healthy, optimistic cold start: ``L + N·a``."""
        return self.limit + self.servers * self.allowance

    @property
    def rate_unit(self) -> float:
        """A client offering exactly its limit sends this many requests per second."""
        return self.limit / self.window


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--embedded",
        action="store_true",
        help="one process, no Kafka, no HTTP: in-process bus, aggregator thread, four limiters",
    )
    p.add_argument(
        "--duration",
        type=float,
        default=DEFAULT_DURATION,
        help="seconds of load (default %(default)s)",
    )
    p.add_argument(
        "--clients", type=int, default=DEFAULT_CLIENTS, help="clients (default %(default)s)"
    )
    p.add_argument(
        "--limit",
        type=int,
        default=DEFAULT_LIMIT,
        help="requests per window per client (default %(default)s)",
    )
    p.add_argument(
        "--window", type=float, default=DEFAULT_WINDOW, help="window, seconds (default %(default)s)"
    )
    p.add_argument(
        "--servers",
        type=int,
        default=DEFAULT_SERVERS,
        help="app servers (default %(default)s)",
    )
    p.add_argument("--seed", type=int, default=DEFAULT_SEED, help="workload seed")
    p.add_argument(
        "--connections",
        type=int,
        default=16,
        help="keep-alive connections per server of the load generator (default %(default)s)",
    )
    p.add_argument(
        "--http-client",
        choices=HTTP_CLIENTS,
        default="raw",
        help="the load generator's HTTP client: raw (a minimal keep-alive HTTP/1.1 client on "
        "asyncio, cheap enough for a 2-core machine) or httpx (default %(default)s)",
    )
    p.add_argument(
        "--kafka-bootstrap",
        default=None,
        help="Kafka bootstrap servers (default: env DRL_KAFKA_BOOTSTRAP, else the local "
        "service on 127.0.0.1:39092)",
    )
    p.add_argument(
        "--out-dir",
        default=DEFAULT_OUT_DIR,
        help="where the report, the plot and the processes' logs go (default %(default)s)",
    )


def _config(args: argparse.Namespace) -> DemoConfig:
    if not args.duration > 0 or not math.isfinite(args.duration):
        raise DemoError(f"--duration must be > 0 seconds, got {args.duration}")
    if args.clients < 1:
        raise DemoError(f"--clients must be >= 1, got {args.clients}")
    if args.limit < 1 or not args.window > 0:
        raise DemoError("--limit must be >= 1 and --window > 0")
    if not 1 <= args.servers <= 64:
        raise DemoError(f"--servers must be 1..64, got {args.servers}")
    if args.connections < 1:
        raise DemoError(f"--connections must be >= 1, got {args.connections}")
    return DemoConfig(
        duration=float(args.duration),
        clients=int(args.clients),
        limit=int(args.limit),
        window=float(args.window),
        servers=int(args.servers),
        seed=int(args.seed),
        connections=int(args.connections),
        http_client=str(args.http_client),
        out_dir=Path(args.out_dir),
    )


def _say(message: str) -> None:
    print(f"drl demo: {message}", file=sys.stderr, flush=True)


# -- the progress line ---------------------------------------------------------------------------


class ProgressLine:
    """Elapsed/duration, requests sent, 429 share on stderr: rewritten in place on a terminal,
    else one line every ``every`` seconds."""

    def __init__(
        self,
        progress: Progress,
        start_at: float,
        duration: float,
        stream: TextIO | None = None,
        every: float = 5.0,
    ) -> None:
        self.progress = progress
        self.start_at = start_at
        self.duration = duration
        self.stream = stream if stream is not None else sys.stderr
        self.tty = bool(getattr(self.stream, "isatty", lambda: False)())
        self.every = 0.25 if self.tty else every
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="drl-demo-progress", daemon=True)

    def line(self) -> str:
        p = self.progress
        elapsed = min(max(0.0, time.time() - self.start_at), self.duration)
        share = p.limited / p.done if p.done else 0.0
        rate = p.sent / elapsed if elapsed > 0 else 0.0
        errors = f", {p.errors} failed" if p.errors else ""
        return (
            f"[{elapsed:5.1f}/{self.duration:.0f} s] {p.sent} requests sent ({rate:.0f}/s), "
            f"429: {share:.1%}{errors}"
        )

    def _loop(self) -> None:
        while not self._stop.wait(self.every):
            self._write()

    def _write(self, final: bool = False) -> None:
        with contextlib.suppress(OSError, ValueError):
            if self.tty:
                self.stream.write("\r" + self.line() + "\x1b[K" + ("\n" if final else ""))
            else:
                self.stream.write(self.line() + "\n")
            self.stream.flush()

    def __enter__(self) -> ProgressLine:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._stop.set()
        self._thread.join(2)
        self._write(final=True)


# -- child processes -----------------------------------------------------------------------------


@dataclass
class Child:
    name: str
    proc: subprocess.Popen[bytes]
    log: Path


class Children:
    """The demo's processes, each in its own session (process group), logging to a file.

    :meth:`stop` sends SIGTERM to the group and waits, then SIGKILL; :meth:`close` stops every
    one still running. Ctrl-C on the terminal reaches only the demo, which then stops them in
    order.
    """

    def __init__(self, workdir: Path) -> None:
        self.workdir = workdir
        self.children: dict[str, Child] = {}

    def spawn(self, name: str, argv: list[str]) -> Child:
        log = self.workdir / f"{name}.log"
        with open(log, "wb") as f:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=f,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        child = self.children[name] = Child(name, proc, log)
        return child

    def pids(self) -> dict[str, int]:
        return {name: c.proc.pid for name, c in self.children.items()}

    def tail(self, name: str, lines: int = 20) -> str:
        try:
            text = self.children[name].log.read_text(errors="replace")
        except OSError:
            return ""
        return "\n".join("    " + line for line in text.splitlines()[-lines:])

    def check_alive(self, names: list[str]) -> None:
        for name in names:
            rc = self.children[name].proc.poll()
            if rc is not None:
                raise DemoError(f"{name} exited with {rc}; its log:\n{self.tail(name)}")

    @staticmethod
    def _signal(proc: subprocess.Popen[bytes], sig: int) -> None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(proc.pid, sig)

    def stop(self, names: list[str], timeout: float = 15.0) -> dict[str, int]:
        """SIGTERM each group, wait up to ``timeout`` s for all, SIGKILL what is left.

        A child that exits stays a zombie (not reaped) until its group has been sent SIGKILL
        too, so that the group id cannot have been reused by then; then it is reaped.
        """
        procs = [(n, self.children[n].proc) for n in names if n in self.children]
        for _, p in procs:
            if p.returncode is None:
                self._signal(p, signal.SIGTERM)
        deadline = time.monotonic() + timeout
        codes: dict[str, int] = {}
        for name, p in procs:
            if p.returncode is None:
                while not _exited(p.pid) and time.monotonic() < deadline:
                    time.sleep(0.02)
                self._signal(p, signal.SIGKILL)  # the leader if still running, and any other
            codes[name] = p.wait(10)
        return codes

    def close(self) -> None:
        self.stop(list(self.children), timeout=10.0)


def _exited(pid: int) -> bool:
    """Whether child ``pid`` has exited, without reaping it."""
    try:
        info = os.waitid(os.P_PID, pid, os.WEXITED | os.WNOHANG | os.WNOWAIT)
    except ChildProcessError:
        return True  # already reaped
    return info is not None


# -- what a run produces -------------------------------------------------------------------------


@dataclass
class RunResult:
    mode: str
    log: RequestLog
    mult: np.ndarray
    client_ids: list[str]
    aggregator: dict[str, Any]
    servers: list[dict[str, Any]]
    topics: dict[str, dict[str, int]]
    load_seconds: float
    setup_seconds: float
    processes: dict[str, int] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)
    bootstrap: str | None = None
    #: usage / grants topic and consumer group names (Kafka mode; deleted at the end)
    names: dict[str, str] = field(default_factory=dict)


# -- Kafka mode ----------------------------------------------------------------------------------


def _admin(bootstrap: str) -> Any:
    from confluent_kafka.admin import AdminClient

    return AdminClient({"bootstrap.servers": bootstrap, "log_level": 2})


def _create_topics(admin: Any, names: list[str], partitions: int, timeout: float = 30.0) -> None:
    from confluent_kafka.cimpl import NewTopic

    futures = admin.create_topics(
        [NewTopic(n, num_partitions=partitions, replication_factor=1) for n in names],
        operation_timeout=timeout,
        request_timeout=timeout,
    )
    for fut in futures.values():
        fut.result(timeout=timeout)
    from producer.kafka_confluent import wait_for_leaders

    for name in names:
        try:
            wait_for_leaders(admin, name, partitions, timeout)
        except TimeoutError as e:
            raise DemoError(str(e)) from e


def _delete_topics(admin: Any, names: list[str], group: str | None) -> list[str]:
    problems: list[str] = []
    try:
        for name, fut in admin.delete_topics(names, operation_timeout=30).items():
            try:
                fut.result(timeout=30)
            except Exception as exc:
                problems.append(f"could not delete topic {name}: {exc}")
    except Exception as exc:
        problems.append(f"could not delete topics {names}: {exc}")
    if group is not None:
        try:
            for fut in admin.delete_consumer_groups([group], request_timeout=15).values():
                fut.result(timeout=15)
        except Exception as exc:
            if "GROUP_ID_NOT_FOUND" not in str(exc):  # the aggregator never joined
                problems.append(f"could not delete consumer group {group}: {exc}")
    return problems


def topic_payload(bootstrap: str, topic: str, timeout: float = 20.0) -> dict[str, int]:
    """Messages and payload bytes (message values, before the producer's lz4) on ``topic``."""
    from confluent_kafka import OFFSET_BEGINNING, Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": bootstrap,
            "group.id": f"drl-demo-meter-{uuid.uuid4().hex[:8]}",
            "enable.auto.commit": False,
            "log_level": 2,
        }
    )
    try:
        md = consumer.list_topics(topic, timeout=10)
        ends: dict[int, int] = {}
        for p in md.topics[topic].partitions:
            lo, hi = consumer.get_watermark_offsets(TopicPartition(topic, p), timeout=10)
            if hi > lo:
                ends[p] = hi
        consumer.assign([TopicPartition(topic, p, OFFSET_BEGINNING) for p in ends])
        messages = size = 0
        deadline = time.monotonic() + timeout
        while ends and time.monotonic() < deadline:
            for m in consumer.consume(1000, 0.5):
                if m.error() is not None:
                    continue
                messages += 1
                size += len(m.value() or b"")
                p, off = m.partition(), m.offset()
                if p is not None and off is not None and off + 1 >= ends.get(p, math.inf):
                    ends.pop(p, None)
        return {"messages": messages, "bytes": size}
    finally:
        consumer.close()


def _wait_for(
    what: str, done: Any, children: Children, names: list[str], timeout: float = START_TIMEOUT
) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        children.check_alive(names)
        if time.monotonic() > deadline:
            logs = "\n".join(f"  {n}:\n{children.tail(n)}" for n in names)
            raise DemoError(f"{what} not ready after {timeout:.0f} s; logs:\n{logs}")
        time.sleep(0.05)


def _drl_argv() -> list[str]:
    drl = Path(sys.executable).with_name("drl")
    return [str(drl)] if drl.exists() else [sys.executable, "-m", "aggregator.cli"]


def run_kafka(cfg: DemoConfig, bootstrap: str, schedule: Schedule, mult: np.ndarray) -> RunResult:
    work = cfg.out_dir / "processes"
    work.mkdir(parents=True, exist_ok=True)
    for stale in work.glob("*"):
        stale.unlink()
    run_id = uuid.uuid4().hex[:10]
    usage, grants = f"drl-demo-{run_id}-usage", f"drl-demo-{run_id}-grants"
    group = f"drl-demo-{run_id}"
    client_ids = [f"client-{c}" for c in range(cfg.clients)]
    servers = [f"demo-srv-{s}" for s in range(cfg.servers)]
    started = time.monotonic()

    admin = _admin(bootstrap)
    try:
        admin.list_topics(timeout=10)
    except Exception as exc:
        raise DemoError(
            f"no Kafka broker answers on {bootstrap} ({exc}). Start one with `make demo` "
            "(or scripts/with-services -s kafka -- drl demo), set DRL_KAFKA_BOOTSTRAP / "
            "--kafka-bootstrap, or run `drl demo --embedded`."
        ) from exc
    _say(f"creating topics {usage}, {grants} ({PARTITIONS} partitions each) on {bootstrap}")
    _create_topics(admin, [usage, grants], PARTITIONS)
    children = Children(work)
    problems: list[str] = []
    try:
        _say(f"starting 1 aggregator and {cfg.servers} app servers (uvicorn + RateLimitMiddleware)")
        children.spawn(
            "aggregator",
            [
                *_drl_argv(),
                "aggregator",
                "run",
                "--kafka-bootstrap",
                bootstrap,
                "--limit",
                f"{cfg.limit} per {cfg.window:g} seconds",
                "--usage-topic",
                usage,
                "--grants-topic",
                grants,
                "--group",
                group,
                "--id",
                "demo-aggregator",
                "--tick",
                str(cfg.tick),
                "--stats-file",
                str(work / "aggregator.json"),
                "--http-port",  # its /healthz, /readyz, /metrics: any free port
                "0",
            ],
        )
        for name in servers:
            children.spawn(
                name,
                [
                    sys.executable,
                    "-m",
                    "aggregator.demo_server",
                    "--bootstrap",
                    bootstrap,
                    "--server-id",
                    name,
                    "--usage-topic",
                    usage,
                    "--grants-topic",
                    grants,
                    "--limit",
                    str(cfg.limit),
                    "--window",
                    str(cfg.window),
                    "--expected-servers",
                    str(cfg.servers),
                    "--cold-start-allowance",
                    str(cfg.cold_start_allowance),
                    "--ready-file",
                    str(work / f"{name}.ready"),
                    "--stats-file",
                    str(work / f"{name}.json"),
                ],
            )
        everyone = ["aggregator", *servers]

        def assigned() -> bool:
            try:
                return "assigned [" in children.children["aggregator"].log.read_text(
                    errors="replace"
                )
            except OSError:
                return False

        _wait_for("the aggregator's partitions", assigned, children, everyone)
        _wait_for(
            "the app servers",
            lambda: all((work / f"{n}.ready").exists() for n in servers),
            children,
            everyone,
        )
        urls = []
        for name in servers:
            port = json.loads((work / f"{name}.ready").read_text())["port"]
            urls.append(f"http://127.0.0.1:{port}")
        setup = time.monotonic() - started
        _say(
            f"ready in {setup:.1f} s (servers on {', '.join(u.rsplit(':', 1)[1] for u in urls)}); "
            f"offering {len(schedule)} requests over {cfg.duration:g} s"
        )

        from .loadgen import run_http

        progress = Progress()
        start_at = time.time() + 0.3
        with ProgressLine(progress, start_at, cfg.duration):
            log = asyncio.run(
                run_http(
                    schedule,
                    urls,
                    client_ids,
                    start_at,
                    connections=cfg.connections,
                    progress=progress,
                    client=cfg.http_client,
                )
            )
        load_seconds = max(cfg.duration, float(np.nanmax(log.done_at, initial=start_at)) - start_at)
        children.check_alive(everyone)

        _say("stopping the app servers (last usage flush), then the aggregator")
        codes = children.stop(servers)
        codes.update(children.stop(["aggregator"]))
        bad = {n: rc for n, rc in codes.items() if rc != 0}
        if bad:
            logs = "\n".join(f"  {n}:\n{children.tail(n)}" for n in bad)
            raise DemoError(f"processes exited with errors {bad}; logs:\n{logs}")
        agg_stats = _read_json(work / "aggregator.json")
        srv_stats = [_read_json(work / f"{n}.json") for n in servers]
        topics = {
            "usage": topic_payload(bootstrap, usage),
            "grants": topic_payload(bootstrap, grants),
        }
        topics["usage"]["partitions"] = PARTITIONS
        topics["grants"]["partitions"] = PARTITIONS
        return RunResult(
            mode="kafka",
            log=log,
            mult=mult,
            client_ids=client_ids,
            aggregator=agg_stats,
            servers=srv_stats,
            topics=topics,
            load_seconds=load_seconds,
            setup_seconds=setup,
            processes=children.pids(),
            notes=problems,
            bootstrap=bootstrap,
            names={"usage_topic": usage, "grants_topic": grants, "group": group},
        )
    finally:
        with _shielded():
            children.close()
            problems.extend(_delete_topics(admin, [usage, grants], group))
        for p in problems:
            _say(f"warning: {p}")


@contextlib.contextmanager
def _shielded() -> Iterator[None]:
    """Hold Ctrl-C and SIGTERM off while the cleanup runs (it is bounded): a second Ctrl-C must
    not leave processes or topics behind."""
    try:
        previous = {
            sig: signal.signal(sig, signal.SIG_IGN) for sig in (signal.SIGINT, signal.SIGTERM)
        }
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def _read_json(path: Path) -> dict[str, Any]:
    try:
        data: dict[str, Any] = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise DemoError(f"could not read {path}: {exc}") from exc
    return data


# -- embedded mode -------------------------------------------------------------------------------


def run_embedded(cfg: DemoConfig, schedule: Schedule, mult: np.ndarray) -> RunResult:
    from limiter import Policy
    from limiter.lease import LeaseOptions
    from producer import InProcessBus, connect

    from .loadgen import run_direct
    from .service import Aggregator, AggregatorConfig

    started = time.monotonic()
    usage, grants = "drl-demo-usage", "drl-demo-grants"
    bus = InProcessBus({usage: PARTITIONS, grants: PARTITIONS})
    # readers from the very start: every message, to count the bytes at the end
    meters = {"usage": bus.receiver(usage), "grants": bus.receiver(grants)}
    agg = Aggregator(
        AggregatorConfig(
            Policy(cfg.limit, cfg.window),
            tick=cfg.tick,
            usage_topic=usage,
            grants_topic=grants,
            group="drl-demo",
            aggregator_id="demo-aggregator",
        ),
        bus,
    )
    stop = threading.Event()
    thread = threading.Thread(target=agg.run, args=(stop,), name="drl-demo-aggregator", daemon=True)
    thread.start()
    agg_started = time.monotonic()
    pairs = []
    client_ids = [f"client-{c}" for c in range(cfg.clients)]
    try:
        for s in range(cfg.servers):
            pairs.append(
                connect(
                    cfg.limit,
                    cfg.window,
                    transport=bus,
                    server_id=f"demo-srv-{s}",
                    usage_topic=usage,
                    grants_topic=grants,
                    lease_options=LeaseOptions(
                        cold_start_allowance=cfg.cold_start_allowance,
                        expected_servers=cfg.servers,
                    ),
                )
            )
        setup = time.monotonic() - started
        _say(
            f"embedded: in-process bus, aggregator thread, {cfg.servers} approximate-mode "
            f"limiters; offering {len(schedule)} requests over {cfg.duration:g} s"
        )
        progress = Progress()
        start_at = time.time() + 0.2
        with ProgressLine(progress, start_at, cfg.duration):
            log = run_direct(
                schedule, [lim for lim, _ in pairs], client_ids, start_at, progress=progress
            )
        load_seconds = max(cfg.duration, time.time() - start_at)
    finally:
        for _, agent in pairs:
            agent.stop()
        stop.set()
        thread.join(10)
    srv_stats = []
    for s, (_, agent) in enumerate(pairs):
        ns = log.decision_ns[log.schedule.servers == s]
        srv_stats.append(
            {
                "server_id": agent.server_id,
                "agent": dataclasses.asdict(agent.stats),
                "decision_us": _percentiles_us(ns[ns >= 0]),
            }
        )
    agg_stats: dict[str, Any] = dataclasses.asdict(agg.stats)
    agg_stats["uptime_seconds"] = time.monotonic() - agg_started
    agg_stats["clients"] = agg.clients()
    topics: dict[str, dict[str, int]] = {}
    for name, receiver in meters.items():
        messages = size = 0
        while batch := receiver.poll(0.0, 10_000):
            messages += len(batch)
            size += sum(len(r.value) for r in batch)
        topics[name] = {"messages": messages, "bytes": size, "partitions": PARTITIONS}
    return RunResult(
        mode="embedded",
        log=log,
        mult=mult,
        client_ids=client_ids,
        aggregator=agg_stats,
        servers=srv_stats,
        topics=topics,
        load_seconds=load_seconds,
        setup_seconds=setup,
        processes={},
    )


# -- the report ----------------------------------------------------------------------------------


def worst_window(stamps: np.ndarray, window: float) -> int:
    """Most admissions in any half-open interval ``[t, t + window)``."""
    if stamps.size == 0:
        return 0
    s = np.sort(stamps)
    ends = np.searchsorted(s, s + window, side="left")
    return int((ends - np.arange(s.size)).max())


def mean_window(stamps: np.ndarray, window: float, start: float, end: float) -> float:
    """Mean admissions in ``[t, t + window)`` over ``t`` in ``[start, end - window]``."""
    s = np.sort(stamps)
    t = np.arange(start, end - window + 1e-9, 0.05)
    if t.size == 0:
        return float(s.size)
    return float((np.searchsorted(s, t + window) - np.searchsorted(s, t)).mean())


def _percentiles_us(ns: np.ndarray) -> dict[str, float]:
    a = np.asarray(ns, dtype=np.float64) / 1000.0
    if a.size == 0:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "count": int(a.size),
    }


def _steady(cfg: DemoConfig) -> tuple[float, float, str]:
    """The windows over which utilisation is averaged: ``[t, t + W)`` for t in [start, end]."""
    d, w = cfg.duration, cfg.window
    if d >= 2 * w:
        return w, d, f"mean over windows starting in [{w:g}, {d - w:g}] s (steady state)"
    if d >= w:
        return 0.0, d, f"mean over windows starting in [0, {d - w:g}] s (run shorter than 2W)"
    return 0.0, d, f"admitted in the whole run (shorter than one {w:g} s window)"


def build_report(cfg: DemoConfig, r: RunResult) -> dict[str, Any]:
    log = r.log
    sch = log.schedule
    n_clients = cfg.clients
    rel = log.decided_at - log.start_at  # the servers' decision times, from the load start
    status = log.status
    ok = status == 200
    limited = status == 429
    failed = status == FAILED
    answered = ok | limited
    offered = np.bincount(sch.clients, minlength=n_clients)
    admitted = np.bincount(sch.clients[ok], minlength=n_clients)
    refused = np.bincount(sch.clients[limited], minlength=n_clients)
    fails = np.bincount(sch.clients[failed], minlength=n_clients)
    stamps = rel[ok]
    admitted_clients = sch.clients[ok]
    order = np.argsort(admitted_clients, kind="stable")
    by_client = np.split(stamps[order], np.cumsum(admitted)[:-1])
    start, end, steady_how = _steady(cfg)
    worst = np.array([worst_window(s, cfg.window) for s in by_client], dtype=np.int64)
    per_window = np.array([mean_window(s, cfg.window, start, end) for s in by_client])
    short = cfg.duration < cfg.window
    denom = (
        np.minimum(cfg.limit, np.maximum(offered, 1)).astype(np.float64)
        if short
        else np.full(n_clients, float(cfg.limit))
    )
    util = per_window / denom
    mult = r.mult
    clients = [
        {
            "client": r.client_ids[c],
            "multiplier": round(float(mult[c]), 4),
            "offered": int(offered[c]),
            "admitted": int(admitted[c]),
            "limited": int(refused[c]),
            "failed": int(fails[c]),
            "offered_per_window": round(float(offered[c]) * cfg.window / cfg.duration, 1),
            "admitted_per_window": round(float(per_window[c]), 1),
            "utilisation": round(float(util[c]), 4),
            "worst_window": int(worst[c]),
            "worst_ratio": round(float(worst[c]) / cfg.limit, 4),
        }
        for c in range(n_clients)
    ]
    saturated = np.flatnonzero(mult >= SATURATED)
    light = np.flatnonzero(mult <= LIGHT)
    lightest = int(np.argmin(mult)) if n_clients else 0
    worst_client = int(np.argmax(worst)) if n_clients else 0
    worst_max = int(worst.max()) if n_clients else 0

    dec = log.decision_ns[answered & (log.decision_ns >= 0)]
    rtt = (log.done_at - log.sent_at)[answered] * 1000.0
    lag = (log.sent_at - (log.start_at + sch.times))[~np.isnan(log.sent_at)]
    completed = int(answered.sum())
    last = float(np.nanmax(log.done_at, initial=log.start_at)) - log.start_at
    agg = r.aggregator
    load = max(r.load_seconds, 1e-9)
    usage_b = r.topics.get("usage", {}).get("bytes", 0)
    grant_b = r.topics.get("grants", {}).get("bytes", 0)
    report: dict[str, Any] = {
        "mode": r.mode,
        "machine": {
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
            "platform": platform.platform(),
        },
        "config": {
            "duration_seconds": cfg.duration,
            "clients": cfg.clients,
            "servers": cfg.servers,
            "limit": cfg.limit,
            "window_seconds": cfg.window,
            "seed": cfg.seed,
            "cold_start": "optimistic",
            "cold_start_allowance": cfg.cold_start_allowance,
            "tick_seconds": cfg.tick,
            "partitions": {"usage": PARTITIONS, "grants": PARTITIONS},
            "kafka_bootstrap": r.bootstrap,
            **r.names,
            "connections_per_server": cfg.connections if r.mode == "kafka" else None,
            "http_client": cfg.http_client if r.mode == "kafka" else None,
        },
        "requests": {
            "offered": len(sch),
            "offered_per_second": round(len(sch) / cfg.duration, 1),
            "completed": completed,
            "admitted": int(ok.sum()),
            "limited": int(limited.sum()),
            "failed": int(failed.sum()),
            "not_sent": int((status == 0).sum()),
            "limited_share": round(float(limited.sum()) / max(completed, 1), 4),
            "achieved_per_second": round(completed / max(last, cfg.duration), 1),
            "send_lag_ms": {
                "p50": round(float(np.percentile(lag, 50)) * 1000, 2) if lag.size else 0.0,
                "p99": round(float(np.percentile(lag, 99)) * 1000, 2) if lag.size else 0.0,
                "max": round(float(lag.max()) * 1000, 2) if lag.size else 0.0,
            },
        },
        "bound": {
            "formula": "L + N*a",
            "limit": cfg.limit,
            "servers": cfg.servers,
            "allowance": cfg.allowance,
            "bound": cfg.bound,
            "bound_ratio": round(cfg.bound / cfg.limit, 4),
            "worst_window": worst_max,
            "worst_ratio": round(worst_max / cfg.limit, 4),
            "worst_client": r.client_ids[worst_client] if n_clients else None,
            "within_bound": worst_max <= cfg.bound,
        },
        "saturated": {
            "threshold_multiplier": SATURATED,
            "clients": [r.client_ids[c] for c in saturated],
            "how": steady_how,
            "utilisation_min": round(float(util[saturated].min()), 4) if saturated.size else None,
            "utilisation_mean": round(float(util[saturated].mean()), 4) if saturated.size else None,
            "limited_share": round(
                float(refused[saturated].sum())
                / max(1, int(admitted[saturated].sum() + refused[saturated].sum())),
                4,
            ),
        },
        "light": {
            "threshold_multiplier": LIGHT,
            "clients": int(light.size),
            "offered": int(offered[light].sum()),
            "limited": int(refused[light].sum()),
            "lightest": r.client_ids[lightest] if n_clients else None,
            "lightest_offered": int(offered[lightest]) if n_clients else 0,
            "lightest_limited": int(refused[lightest]) if n_clients else 0,
        },
        "latency": {
            "decision_us": {k: round(v, 2) for k, v in _percentiles_us(dec).items()},
            "decision_what": "limiter.check inside RateLimitMiddleware, timed by the server"
            if r.mode == "kafka"
            else "limiter.check, in process",
            "http_round_trip_ms": {
                "p50": round(float(np.percentile(rtt, 50)), 3) if rtt.size else 0.0,
                "p99": round(float(np.percentile(rtt, 99)), 3) if rtt.size else 0.0,
            }
            if r.mode == "kafka"
            else None,
            "per_server_decision_us": {
                s.get("server_id", str(i)): s.get("decision_us") for i, s in enumerate(r.servers)
            },
        },
        "aggregator": {
            "grant_batches": agg.get("grant_batches", 0),
            "grants": agg.get("grants", 0),
            "tokens_granted": agg.get("tokens_granted", 0),
            "usage_batches": agg.get("batches", 0),
            "usage_records": agg.get("records", 0),
            "ticks": agg.get("ticks", 0),
            "errors": agg.get("errors", 0),
            "malformed": agg.get("malformed", 0),
            "duplicates": agg.get("duplicates", 0),
            "uptime_seconds": round(float(agg.get("uptime_seconds", 0.0)), 2),
            "grants_per_second": round(agg.get("grants", 0) / load, 1),
            "grant_batches_per_second": round(agg.get("grant_batches", 0) / load, 1),
        },
        "kafka": {
            "transport": "Kafka (confluent-kafka, lz4)" if r.mode == "kafka" else "InProcessBus",
            "usage": r.topics.get("usage", {}),
            "grants": r.topics.get("grants", {}),
            "bytes": usage_b + grant_b,
            "bytes_per_second": round((usage_b + grant_b) / load, 1),
            "bytes_per_request": round((usage_b + grant_b) / max(completed, 1), 2),
            "agents_bytes_sent": sum(
                int(s.get("agent", {}).get("bytes_sent", 0)) for s in r.servers
            ),
            "agent_errors": sum(int(s.get("agent", {}).get("errors", 0)) for s in r.servers),
            "note": "payload bytes (message values) read back from the topics; the producer "
            "compresses them with lz4 on the wire"
            if r.mode == "kafka"
            else "payload bytes on the in-process bus",
        },
        "servers": r.servers,
        "processes": r.processes,
        "setup_seconds": round(r.setup_seconds, 2),
        "load_seconds": round(r.load_seconds, 2),
        "clients": clients,
        "notes": r.notes,
    }
    report["checks"] = {
        "within_bound": report["bound"]["within_bound"],
        "no_failed_requests": report["requests"]["failed"] == 0
        and report["requests"]["not_sent"] == 0,
        "kept_up": report["requests"]["send_lag_ms"]["p99"] < 1000.0,
    }
    return report


def _fmt_bytes(n: float) -> str:
    for unit in ("B", "KB", "MB", "GB"):
        if n < 1000 or unit == "GB":
            return f"{n:.0f} {unit}" if unit == "B" else f"{n:.1f} {unit}"
        n /= 1000
    return f"{n:.1f} GB"


def format_report(rep: dict[str, Any]) -> str:
    c, q, b, sat, lat = (
        rep["config"],
        rep["requests"],
        rep["bound"],
        rep["saturated"],
        rep["latency"],
    )
    agg, kafka, light = rep["aggregator"], rep["kafka"], rep["light"]
    where = (
        f"{c['servers']} app servers (uvicorn + RateLimitMiddleware) and 1 aggregator "
        f"(drl aggregator run) on Kafka {c['kafka_bootstrap']}"
        if rep["mode"] == "kafka"
        else f"embedded: {c['servers']} limiters + aggregator thread on an in-process bus, "
        "no Kafka, no HTTP"
    )
    lines = [
        f"drl demo report ({rep['mode']} mode, {rep['machine']['cpus']} CPUs)",
        f"  {where}",
        f"  workload: {c['clients']} clients (Zipf tail, hot clients at 5x..2x their limit), "
        f"limit {c['limit']} per {c['window_seconds']:g} s, {c['duration_seconds']:g} s",
        f"requests: {q['offered']} offered ({q['offered_per_second']:.0f}/s), "
        f"{q['completed']} answered ({q['achieved_per_second']:.0f}/s achieved), "
        f"{q['admitted']} admitted, {q['limited']} refused with 429 ({q['limited_share']:.1%})"
        + (f", {q['failed']} failed" if q["failed"] else "")
        + (f", {q['not_sent']} not sent" if q["not_sent"] else ""),
        f"  send lag behind schedule: p50 {q['send_lag_ms']['p50']:.1f} ms, "
        f"p99 {q['send_lag_ms']['p99']:.1f} ms",
        f"bound L + N·a = {b['limit']} + {b['servers']}·{b['allowance']} = {b['bound']} "
        f"({b['bound_ratio']:.2f} L); worst window over all clients {b['worst_window']} "
        f"({b['worst_client']}) = {b['worst_ratio']:.3f} L: "
        + ("within the bound" if b["within_bound"] else "OVER THE BOUND"),
    ]
    if sat["utilisation_min"] is not None:
        lines.append(
            f"saturated clients (offered >= {sat['threshold_multiplier']:g}x): admitted "
            f"{sat['utilisation_min']:.1%} (min) / {sat['utilisation_mean']:.1%} (mean) of the "
            f"limit per window; {sat['how']}"
        )
    lines.append(
        f"light clients (offered <= {light['threshold_multiplier']:g}x): {light['clients']} "
        f"clients, {light['limited']} of {light['offered']} requests refused; lightest "
        f"{light['lightest']}: {light['lightest_limited']} of {light['lightest_offered']} refused"
    )
    lines.append(
        f"  {'client':<11}{'offered':>9}{'x limit':>9}{'admitted':>10}{'429':>7}"
        f"{'per window':>12}{'of L':>8}{'worst win':>11}{'/ L':>7}"
    )
    rows = sorted(rep["clients"], key=lambda r: -r["multiplier"])
    shown = rows[:TOP] + ([rows[-1]] if len(rows) > TOP else [])
    for i, r in enumerate(shown):
        if i == TOP:
            lines.append(f"  {'...':<11}")
        lines.append(
            f"  {r['client']:<11}{r['offered']:>9}{r['multiplier']:>8.2f}x{r['admitted']:>10}"
            f"{r['limited']:>7}{r['admitted_per_window']:>12.1f}{r['utilisation']:>8.1%}"
            f"{r['worst_window']:>11}{r['worst_ratio']:>7.3f}"
        )
    d = lat["decision_us"]
    lines.append(
        f"decision latency ({lat['decision_what']}): p50 {d['p50']:.1f} µs, p99 {d['p99']:.1f} µs"
        f" over {d['count']} decisions"
    )
    if lat.get("http_round_trip_ms"):
        h = lat["http_round_trip_ms"]
        lines.append(
            f"HTTP round trip (load generator): p50 {h['p50']:.2f} ms, p99 {h['p99']:.2f} ms"
        )
    lines.append(
        f"aggregator: {agg['grants']} grants in {agg['grant_batches']} batches "
        f"({agg['grants_per_second']:.0f} grants/s, {agg['grant_batches_per_second']:.0f} "
        f"batches/s), {agg['tokens_granted']} tokens; {agg['usage_batches']} usage batches, "
        f"{agg['errors']} errors"
    )
    u, g = kafka["usage"], kafka["grants"]
    lines.append(
        f"{kafka['transport']}: usage {u.get('messages', 0)} messages / "
        f"{_fmt_bytes(u.get('bytes', 0))}, grants {g.get('messages', 0)} messages / "
        f"{_fmt_bytes(g.get('bytes', 0))}: {_fmt_bytes(kafka['bytes_per_second'])}/s, "
        f"{kafka['bytes_per_request']:.1f} bytes per request (payload)"
    )
    for note in rep.get("notes", []):
        lines.append(f"note: {note}")
    return "\n".join(lines)


# -- the plot ------------------------------------------------------------------------------------


def plot_report(rep: dict[str, Any], r: RunResult, path: Path) -> str | None:
    """Write the PNG; return why not when matplotlib is missing."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return (
            "matplotlib is not installed: no PNG (pip install matplotlib, or "
            "pip install -e '.[test]')"
        )
    cfg = rep["config"]
    limit, window = cfg["limit"], cfg["window_seconds"]
    bound = rep["bound"]["bound"]
    rows = sorted(rep["clients"], key=lambda x: -x["multiplier"])
    fig, axes = plt.subplots(3, 1, figsize=(11, 12))
    fig.suptitle(
        f"drl demo ({rep['mode']}): {cfg['clients']} clients, {cfg['servers']} servers, "
        f"limit {limit} per {window:g} s, {cfg['duration_seconds']:g} s"
    )

    top = rows[:20]
    x = np.arange(len(top))
    ax = axes[0]
    ax.bar(x - 0.2, [t["offered_per_window"] for t in top], 0.4, label="offered per window")
    ax.bar(x + 0.2, [t["admitted_per_window"] for t in top], 0.4, label="admitted per window")
    ax.axhline(limit, color="k", lw=1, ls="--", label=f"limit L = {limit}")
    ax.set_xticks(x, [t["client"].replace("client-", "c") for t in top], fontsize=8)
    ax.set_ylabel("requests per window")
    ax.set_title("busiest clients: offered vs admitted per window")
    ax.legend(fontsize=8)

    ax = axes[1]
    ratios = [t["worst_ratio"] for t in rows]
    ax.plot(np.arange(len(rows)), ratios, "o", ms=3, label="worst window / L")
    ax.axhline(1.0, color="k", lw=1, ls="--", label="L")
    ax.axhline(
        bound / limit, color="r", lw=1, ls=":", label=f"bound (L + N·a) / L = {bound / limit:.3f}"
    )
    ax.set_xlabel("clients, busiest first")
    ax.set_ylabel("most admitted in any window / L")
    ax.set_ylim(0, max(1.1, max(ratios, default=0) * 1.05, bound / limit * 1.05))
    ax.set_title("worst window per client against the bound")
    ax.legend(fontsize=8, loc="upper right")

    ax = axes[2]
    log = r.log
    rel = log.decided_at - log.start_at
    ok = log.status == 200
    grid = np.arange(0.0, cfg["duration_seconds"] + 0.05, 0.1)
    for c in np.flatnonzero(r.mult >= SATURATED)[:5]:
        s = np.sort(rel[ok & (log.schedule.clients == c)])
        trailing = np.searchsorted(s, grid, side="right") - np.searchsorted(
            s, grid - window, side="right"
        )
        ax.plot(grid, trailing, lw=1, label=f"{r.client_ids[c]} ({r.mult[c]:.1f}x)")
    ax.axhline(limit, color="k", lw=1, ls="--", label="L")
    ax.axhline(bound, color="r", lw=1, ls=":", label="L + N·a")
    ax.set_xlabel("seconds since the load started")
    ax.set_ylabel(f"admitted in the last {window:g} s")
    ax.set_title("hot clients: admissions in the trailing window")
    ax.legend(fontsize=8, loc="lower right")
    fig.tight_layout()
    fig.savefig(path, dpi=90)
    plt.close(fig)
    return None


# -- the command ---------------------------------------------------------------------------------


def _missing_web() -> list[str]:
    return [m for m in ("uvicorn", "httpx") if importlib.util.find_spec(m) is None]


def _bootstrap(args: argparse.Namespace) -> tuple[str, bool]:
    """The bootstrap servers, and whether they were given (flag or environment)."""
    if args.kafka_bootstrap:
        return str(args.kafka_bootstrap), True
    from .cli import default_kafka_bootstrap

    return default_kafka_bootstrap(), bool(os.environ.get("DRL_KAFKA_BOOTSTRAP"))


@contextlib.contextmanager
def _sigterm_unwinds() -> Iterator[None]:
    def raise_terminated(signum: int, frame: FrameType | None) -> None:
        raise _Terminated()

    try:
        previous = signal.signal(signal.SIGTERM, raise_terminated)
    except ValueError:  # not the main thread
        yield
        return
    try:
        yield
    finally:
        signal.signal(signal.SIGTERM, previous)


def cmd_demo(args: argparse.Namespace) -> int:
    try:
        cfg = _config(args)
    except DemoError as exc:
        print(f"drl demo: {exc}", file=sys.stderr)
        return 2
    embedded = bool(args.embedded)
    bootstrap, given = _bootstrap(args)
    if not embedded and not given and shutil.which("java") is None:
        _say(
            "no Java on PATH and no DRL_KAFKA_BOOTSTRAP / --kafka-bootstrap: no Kafka broker to "
            "run against, so running the embedded demo (one process, in-process bus). Install "
            "Java 17+ and run `make demo` for the real one."
        )
        embedded = True
    missing = _missing_web()
    if not embedded and missing:
        _say(
            f"{' and '.join(missing)} not installed (pip install -e '.[web]'): no HTTP servers, "
            "so running the embedded demo instead."
        )
        embedded = True
    cfg.out_dir.mkdir(parents=True, exist_ok=True)
    mult = multipliers(cfg.clients)
    schedule = make_schedule(cfg.seed, mult, cfg.rate_unit, cfg.duration, cfg.servers)
    t0 = time.monotonic()
    try:
        with _sigterm_unwinds():
            if embedded:
                result = run_embedded(cfg, schedule, mult)
            else:
                result = run_kafka(cfg, bootstrap, schedule, mult)
    except DemoError as exc:
        print(f"drl demo: FAILED: {exc}", file=sys.stderr)
        return 1
    except (KeyboardInterrupt, _Terminated):
        print("\ndrl demo: interrupted; everything it started is stopped", file=sys.stderr)
        return 130
    report = build_report(cfg, result)
    report["total_seconds"] = round(time.monotonic() - t0, 2)
    json_path = cfg.out_dir / "demo-report.json"
    png_path = cfg.out_dir / "demo-report.png"
    result.log.save(str(cfg.out_dir / "demo-requests.npz"))
    why = plot_report(report, result, png_path)
    report["png"] = None if why else str(png_path)
    if why:
        report["notes"].append(why)
    json_path.write_text(json.dumps(report, indent=1))
    print(format_report(report))
    print(
        f"report: {json_path}"
        + (f", plot: {png_path}" if not why else "")
        + f", per-request log: {cfg.out_dir / 'demo-requests.npz'} "
        f"({report['total_seconds']:.0f} s in all)"
    )
    if not report["checks"]["kept_up"]:
        _say(
            "warning: the load generator fell behind its schedule (p99 lag "
            f"{report['requests']['send_lag_ms']['p99']:.0f} ms): this machine is too busy for "
            "the offered rate; try fewer --clients or a lower --limit"
        )
    failed = [k for k in ("within_bound", "no_failed_requests") if not report["checks"][k]]
    if failed:
        print(f"drl demo: FAILED checks: {', '.join(failed)}", file=sys.stderr)
        return 1
    return 0
