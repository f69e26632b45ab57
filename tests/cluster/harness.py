"""Real-process cluster harness: an aggregator (`drl aggregator run`) and app-server nodes
(`tests/cluster/node.py`) on the real broker, a precomputed Zipf workload, and the measures."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[2]
NODE = Path(__file__).with_name("node.py")


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

    def _spawn(self, name: str, argv: list[str]) -> subprocess.Popen[bytes]:
        log = self.workdir / f"{name}.log"
        self.logs[name] = log
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        with open(log, "wb") as f:
            proc = subprocess.Popen(argv, stdout=f, stderr=subprocess.STDOUT, env=env, cwd=ROOT)
        self.procs.append(proc)
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
    ) -> subprocess.Popen[bytes]:
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
        ]
        return self._spawn(name, argv)

    def result(self, name: str) -> tuple[np.ndarray, np.ndarray, np.ndarray, dict[str, object]]:
        with np.load(self.workdir / f"{name}-out.npz") as d:
            stats = json.loads(str(d["stats"]))
            return d["stamps"], d["clients"], d["offered_clients"], stats

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
