"""Real-process cluster harness: aggregators (`drl aggregator run`) and app-server nodes
(`tests/cluster/node.py`) on the real broker, a precomputed Zipf workload, and the measures.

The fault tests (tests/faults) also use it to kill a chosen process (:meth:`Cluster.kill`), read
what a killed node admitted (:meth:`Cluster.admitted`), read a node's timeline and grants
(:meth:`Cluster.outputs`), scrape an aggregator's /metrics (:meth:`Cluster.scrape`) and follow its
partition assignments (:meth:`Cluster.assigned`)."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from limiter.keys import client_key
from producer import make_transport, wire

ROOT = Path(__file__).resolve().parents[2]
NODE = Path(__file__).with_name("node.py")
#: One admission in a node's ``--admitted-log``: true time, client index.
ADMITTED_LOG = np.dtype([("stamp", "<f8"), ("client", "<i8")])


def multipliers(n_clients: int) -> np.ndarray:
    """Offered load per client as a multiple of its limit: five hot clients at 5x..2x, then a
    Zipf tail (1.5x * 5/i)."""
    hot = np.array([5.0, 4.0, 3.0, 2.5, 2.0])
    i = np.arange(hot.size, n_clients, dtype=np.float64)
    return np.concatenate((hot, 1.5 * hot.size / i))[:n_clients]


def make_schedule(
    seed: int, mult: np.ndarray, rate_unit: float, duration: float, servers: int
) -> list[tuple[np.ndarray, np.ndarray]]:
    """Poisson arrivals per client at ``mult * rate_unit`` per second for ``duration`` seconds,
    each request sent to a server drawn uniformly: ``[(times, clients)]`` per server."""
    rng = np.random.default_rng(seed)
    times, clients = [], []
    for c, m in enumerate(mult):
        n = rng.poisson(m * rate_unit * duration)
        times.append(np.sort(rng.uniform(0.0, duration, n)))
        clients.append(np.full(n, c, dtype=np.int64))
    t = np.concatenate(times)
    cl = np.concatenate(clients)
    order = np.argsort(t, kind="stable")
    t, cl = t[order], cl[order]
    srv = rng.integers(0, servers, t.size)
    return [(t[srv == s], cl[srv == s]) for s in range(servers)]


def usage_partition(client: int, partitions: int) -> int:
    """The usage-topic partition of ``client-{client}`` (the aggregator that owns it decides)."""
    key = np.array([client_key(f"client-{client}")], dtype=np.uint64)
    return int(wire.usage_partitions(key, partitions)[0])


def create_topics(bootstrap: str, topics: dict[str, int], timeout: float = 60.0) -> None:
    """Create ``{name: partitions}`` on ``bootstrap`` (replication 1) and wait for the leaders:
    for a private broker, where the session's ``unique_topic`` fixture does not reach."""
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    from producer.kafka_confluent import wait_for_leaders

    admin = AdminClient({"bootstrap.servers": bootstrap})
    futures = admin.create_topics(
        [NewTopic(t, num_partitions=n, replication_factor=1) for t, n in topics.items()],
        operation_timeout=30,
        request_timeout=30,
    )
    for f in futures.values():
        f.result(timeout=timeout)
    for t, n in topics.items():
        wait_for_leaders(admin, t, n, timeout=timeout)


def delete_topics(bootstrap: str, topics: list[str]) -> None:
    """Delete ``topics`` (what :func:`create_topics` made); failures are printed, not raised."""
    from confluent_kafka.admin import AdminClient

    admin = AdminClient({"bootstrap.servers": bootstrap})
    for name, f in admin.delete_topics(topics, operation_timeout=30).items():
        try:
            f.result(timeout=60)
        except Exception as e:  # teardown must not hide the test's result
            print(f"warning: could not delete topic {name}: {e!r}", file=sys.stderr)


_LABEL = re.compile(r'([a-zA-Z_][a-zA-Z0-9_]*)="((?:[^"\\]|\\.)*)"')


def parse_metrics(text: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Prometheus text format -> ``{(name, ((label, value), ...)): value}``."""
    out: dict[tuple[str, tuple[tuple[str, str], ...]], float] = {}
    for line in text.splitlines():
        if not line or line.startswith("#"):
            continue
        m = re.match(r"^([a-zA-Z_:][a-zA-Z0-9_:]*)(?:\{(.*)\})?\s+(\S+)", line)
        if m is None:
            continue
        labels = tuple(sorted(_LABEL.findall(m[2] or "")))
        out[(m[1], labels)] = float(m[3])
    return out


def rate_series(
    stamps: np.ndarray, start: float, end: float, step: float, span: float
) -> tuple[np.ndarray, np.ndarray]:
    """Events per second in the trailing ``span`` seconds at ``start, start + step, ... end``."""
    s = np.sort(stamps)
    t = np.arange(start, end + step / 2, step)
    n = np.searchsorted(s, t, side="right") - np.searchsorted(s, t - span, side="right")
    return t, n / span


def ramped_schedule(
    seed: int, mult: np.ndarray, rate_unit: float, duration: float, servers: int, ramp: float
) -> list[tuple[np.ndarray, np.ndarray]]:
    """:func:`make_schedule`, but every client offers at most 0.9x its limit for the first
    ``ramp`` seconds (one window): the hot clients then fill their windows evenly, so their
    admissions (and grants) stay smooth instead of repeating a start-up burst every window."""
    first = make_schedule(seed, np.minimum(mult, 0.9), rate_unit, ramp, servers)
    rest = make_schedule(seed + 1, mult, rate_unit, duration - ramp, servers)
    return [
        (np.concatenate((t0, t1 + ramp)), np.concatenate((c0, c1)))
        for (t0, c0), (t1, c1) in zip(first, rest, strict=True)
    ]


class GrantTap:
    """Reads every partition of the grants topic in a thread, as an extra consumer: the grants
    the aggregators sent to each server (dead ones too) for the watched clients.

    ``rows()``: ``(true time received, aggregator index, server index, client, tokens)``;
    :attr:`aggregators` and :attr:`servers` name the indices."""

    def __init__(self, bootstrap: str, grants_topic: str, watch: int) -> None:
        self._receiver = make_transport(bootstrap).receiver(grants_topic)
        self._watch = {client_key(f"client-{c}"): c for c in range(watch)}
        self._keys = np.array(sorted(self._watch), dtype=np.uint64)
        self.aggregators: dict[str, int] = {}
        self.servers: dict[str, int] = {}
        self._rows: list[tuple[float, int, int, int, float]] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, name="grant-tap", daemon=True)
        self._thread.start()

    def _run(self) -> None:
        while not self._stop.is_set():
            for record in self._receiver.poll(0.05):
                try:
                    batch = wire.decode_grants(record.value)
                except wire.WireError:
                    continue
                now = time.time()
                agg = self.aggregators.setdefault(batch.aggregator_id, len(self.aggregators))
                srv = self.servers.setdefault(batch.server_id, len(self.servers))
                keys = batch.records["key"]
                hit = np.flatnonzero(np.isin(keys, self._keys))
                tokens = batch.records["tokens"][hit].tolist()
                for k, t in zip(keys[hit].tolist(), tokens, strict=True):
                    self._rows.append((now, agg, srv, self._watch[int(k)], float(t)))

    def rows(self) -> np.ndarray:
        return np.array(self._rows, dtype=np.float64).reshape(-1, 5)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(5)
        self._receiver.close()


def worst_window(stamps: np.ndarray, window: float) -> int:
    """Most admissions in any half-open interval [t, t + window)."""
    if stamps.size == 0:
        return 0
    s = np.sort(stamps)
    ends = np.searchsorted(s, s + window, side="left")
    return int((ends - np.arange(s.size)).max())


@dataclass
class Cluster:
    bootstrap: str
    usage_topic: str
    grants_topic: str
    limit: int
    window: float
    workdir: Path
    procs: list[subprocess.Popen[bytes]] = field(default_factory=list)
    logs: dict[str, Path] = field(default_factory=dict)
    by_name: dict[str, subprocess.Popen[bytes]] = field(default_factory=dict)

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append(proc)
        self.by_name[name] = proc
        return proc

    def start_aggregator(
        self,
        name: str = "aggregator",
        *,
        group: str,
        tick: float = 0.1,
        extra: list[str] | None = None,
    ) -> subprocess.Popen[bytes]:
        drl = str(Path(sys.executable).with_name("drl"))
        argv = [
            drl,
            "aggregator",
            "run",
            "--kafka-bootstrap",
            self.bootstrap,
            "--limit",
            f"{self.limit} per {self.window:g} seconds",
            "--usage-topic",
            self.usage_topic,
            "--grants-topic",
            self.grants_topic,
            "--group",
            group,
            "--id",
            name,
            "--tick",
            str(tick),
            "--stats-file",
            str(self.workdir / f"{name}.json"),
            "--http-port",
            "0",
            *(extra or []),
        ]
        return self._spawn(name, argv)

    def wait_for_log(self, name: str, text: str, timeout: float = 30.0) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if text in self.logs[name].read_text(errors="replace"):
                return
            time.sleep(0.1)
        raise AssertionError(f"{name} did not log {text!r} in {timeout} s:\n" + self.tail(name))

    def http_address(self, name: str, timeout: float = 30.0) -> str:
        """``host:port`` of aggregator ``name``'s /healthz, /readyz, /metrics (from its log)."""
        self.wait_for_log(name, "event=starting", timeout)
        m = re.search(r"event=starting .*?\bhttp=(\S+)", self.logs[name].read_text())
        assert m is not None, self.tail(name)
        return m[1].strip('"')

    def scrape(self, name: str) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """Aggregator ``name``'s /metrics, parsed (see :func:`parse_metrics`)."""
        url = f"http://{self.http_address(name)}/metrics"
        with urllib.request.urlopen(url, timeout=10) as r:
            return parse_metrics(r.read().decode())

    def assigned(self, name: str) -> set[int]:
        """The usage partitions aggregator ``name`` owns now, from its assigned/revoked log
        lines."""
        owned: set[int] = set()
        pattern = re.compile(r"aggregator \S+ (assigned|revoked) \[([0-9, ]*)\]")
        for m in pattern.finditer(self.logs[name].read_text(errors="replace")):
            parts = {int(x) for x in m[2].replace(",", " ").split()}
            owned = owned | parts if m[1] == "assigned" else owned - parts
        return owned

    def kill(self, name: str) -> float:
        """SIGKILL process ``name`` (no shutdown of any kind); returns the time it was sent."""
        proc = self.by_name[name]
        at = time.time()
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        return at

    def tail(self, name: str, lines: int = 30) -> str:
        return "\n".join(self.logs[name].read_text(errors="replace").splitlines()[-lines:])

    def start_node(
        self,
        name: str,
        schedule: tuple[np.ndarray, np.ndarray],
        start_at: float,
        *,
        cold_start_allowance: float,
        expected_servers: int,
        clock_offset: float = 0.0,
        watch: int = 0,
    ) -> subprocess.Popen[bytes]:
        """Node ``name`` offers ``schedule`` from ``start_at`` on; ``watch``: record the grants
        of clients 0..watch-1. It always streams its admissions (see :meth:`admitted`)."""
        path = self.workdir / f"{name}-schedule.npz"
        np.savez(path, times=schedule[0], clients=schedule[1])
        argv = [
            sys.executable,
            str(NODE),
            "--bootstrap",
            self.bootstrap,
            "--server-id",
            name,
            "--usage-topic",
            self.usage_topic,
            "--grants-topic",
            self.grants_topic,
            "--schedule",
            str(path),
            "--out",
            str(self.workdir / f"{name}-out.npz"),
            "--limit",
            str(self.limit),
            "--window",
            str(self.window),
            "--start-at",
            str(start_at),
            "--cold-start-allowance",
            str(cold_start_allowance),
            "--expected-servers",
            str(expected_servers),
            "--clock-offset",
            str(clock_offset),
            "--admitted-log",
            str(self.workdir / f"{name}-admitted.bin"),
            "--watch",
            str(watch),
        ]
        return self._spawn(name, argv)

    def result(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, object]]:
        with np.load(self.workdir / f"{name}-out.npz") as d:
            stats = json.loads(str(d["stats"]))
            return d["stamps"], d["clients"], d["offered_clients"], stats

    def outputs(self, name: str) -> dict[str, Any]:
        """Everything node ``name`` wrote at its end (see tests/cluster/node.py), ``stats``
        decoded."""
        with np.load(self.workdir / f"{name}-out.npz") as d:
            out: dict[str, Any] = {k: d[k] for k in d.files}
        out["stats"] = json.loads(str(out["stats"]))
        return out

    def admitted(self, name: str) -> tuple[np.ndarray, np.ndarray]:
        """``(stamps, clients)`` node ``name`` admitted, from the log it streams as it goes: also
        for a node killed before it wrote its out file."""
        raw = (self.workdir / f"{name}-admitted.bin").read_bytes()
        whole = len(raw) // ADMITTED_LOG.itemsize * ADMITTED_LOG.itemsize
        rows = np.frombuffer(raw[:whole], dtype=ADMITTED_LOG)
        return rows["stamp"].copy(), rows["client"].copy()

    def stop(self, proc: subprocess.Popen[bytes], timeout: float = 15.0) -> int:
        if proc.poll() is None:
            proc.send_signal(signal.SIGTERM)
        try:
            return proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            return proc.wait(5)

    def close(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.kill()
                p.wait(5)
