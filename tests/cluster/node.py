"""One app server of the cluster tests, as its own process.

Runs an approximate-mode limiter with its agent against the real broker, offers the requests of
its share of a precomputed schedule at their times, and writes what it admitted.

    python tests/cluster/node.py --bootstrap HOST:PORT --server-id S --schedule in.npz
        --out out.npz --limit 200 --window 5 --start-at EPOCH [--clock-offset SECONDS]
        [--admitted-log PATH] [--watch N] [--sample-interval SECONDS]

The out file (written when the schedule is done) holds ``stamps``/``clients`` (the admitted
requests, true time), ``offered_clients``, ``stats`` (JSON: the agent's counters and the decision
latency), and for the fault tests:

- ``latency_us`` and ``decided_at``: every decision's ``allow_request`` time and its true time;
- ``timeline``: every ``--sample-interval`` seconds ``(true time, degraded, grant batches, seconds
  since the last grant batch, active servers of the last batch)``;
- ``grants``: the grants installed for the watched clients (``client-0`` .. ``client-{N-1}``):
  ``(true time, aggregator index, client, tokens)``; ``stats["aggregators"]`` names the indices.

``--admitted-log`` also appends every burst of admissions to a raw file (float64 true time, int64
client per admission) as it goes: a node killed with SIGKILL writes no out file, and loses at
most the burst being decided when it dies.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import time

import numpy as np

from limiter import RateLimiter, Request
from limiter.keys import client_key
from limiter.lease import LeaseOptions
from producer import Agent, make_transport, wire

#: dtype of the ``--admitted-log`` file
ADMITTED_LOG = np.dtype([("stamp", "<f8"), ("client", "<i8")])


class RecordingAgent(Agent):
    """An Agent that also records the grants it accepted for a few watched clients."""

    def __init__(self, *args: object, watch: dict[int, int], **kwargs: object) -> None:
        super().__init__(*args, **kwargs)  # type: ignore[arg-type]
        self.watch_keys = np.array(sorted(watch), dtype=np.uint64)
        self.watch = watch  # stable key -> client index
        self.aggregators: dict[str, int] = {}
        self.grant_rows: list[tuple[float, int, int, float]] = []

    def _apply(self, batch: wire.GrantBatch) -> bool:
        ok = super()._apply(batch)
        if ok and batch.records.size and self.watch_keys.size:
            keys = batch.records["key"]
            hit = np.flatnonzero(np.isin(keys, self.watch_keys))
            if hit.size:
                agg = self.aggregators.setdefault(batch.aggregator_id, len(self.aggregators))
                now = time.time()
                tokens = batch.records["tokens"][hit].tolist()
                for k, t in zip(keys[hit].tolist(), tokens, strict=True):
                    self.grant_rows.append((now, agg, self.watch[int(k)], float(t)))
        return ok


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--server-id", required=True)
    p.add_argument("--usage-topic", required=True)
    p.add_argument("--grants-topic", required=True)
    p.add_argument("--schedule", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--limit", type=int, required=True)
    p.add_argument("--window", type=float, required=True)
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--cold-start-allowance", type=float, default=0.01)
    p.add_argument("--expected-servers", type=int, default=1)
    p.add_argument("--clock-offset", type=float, default=0.0, help="this server's clock error")
    p.add_argument("--client", default="confluent")
    p.add_argument("--admitted-log", default=None, help="append admissions here as they happen")
    p.add_argument("--watch", type=int, default=0, help="record grants of clients 0..N-1")
    p.add_argument("--sample-interval", type=float, default=0.1, help="timeline period, s")
    a = p.parse_args()

    offset = a.clock_offset

    def clock() -> float:
        return time.time() + offset

    sched = np.load(a.schedule)
    times, clients = sched["times"], sched["clients"]
    ids = [f"client-{c}" for c in range(int(clients.max()) + 1 if clients.size else 0)]
    # what producer.connect does, with an agent that records the watched clients' grants
    limiter = RateLimiter(
        a.limit,
        a.window,
        mode="approximate",
        clock=clock,
        lease_options=LeaseOptions(
            cold_start_allowance=a.cold_start_allowance, expected_servers=a.expected_servers
        ),
    )
    agent = RecordingAgent(
        limiter,
        make_transport(a.bootstrap, client=a.client),
        a.server_id,
        usage_topic=a.usage_topic,
        grants_topic=a.grants_topic,
        watch={client_key(f"client-{c}"): c for c in range(a.watch)},
    ).start()
    lease = limiter.lease
    log_fd = (
        os.open(a.admitted_log, os.O_WRONLY | os.O_CREAT | os.O_APPEND, 0o644)
        if a.admitted_log
        else None
    )
    admitted = np.zeros(times.size, dtype=bool)
    stamps = np.zeros(times.size)
    latency_us = np.zeros(times.size, dtype=np.float32)
    timeline: list[tuple[float, float, float, float, float]] = []
    while time.time() < a.start_at:
        time.sleep(0.005)
    start = a.start_at
    i, n = 0, times.size
    allow = limiter.allow_request
    perf = time.perf_counter
    next_sample = time.time()
    while i < n:
        now = time.time()
        if now >= next_sample:
            next_sample = now + a.sample_interval
            local = clock()
            timeline.append(
                (
                    now,
                    float(lease.degraded(local)),
                    float(agent.stats.grant_batches),
                    local - lease.last_grant,
                    float(lease.servers),
                )
            )
        due = start + times[i]
        if due > now:
            time.sleep(min(due - now, 0.002))
            continue
        first = i
        while i < n and start + times[i] <= now:
            t0 = perf()
            admitted[i] = allow(ids[clients[i]], Request(clock()))
            latency_us[i] = (perf() - t0) * 1e6
            stamps[i] = time.time()  # the true time (the test's common reference)
            i += 1
        if log_fd is not None:
            burst = np.flatnonzero(admitted[first:i]) + first
            if burst.size:
                rows = np.empty(burst.size, dtype=ADMITTED_LOG)
                rows["stamp"] = stamps[burst]
                rows["client"] = clients[burst]
                os.write(log_fd, rows.tobytes())
    agent.stop()
    if log_fd is not None:
        os.close(log_fd)
    lat = latency_us if latency_us.size else np.zeros(1, dtype=np.float32)
    stats = dataclasses.asdict(agent.stats)
    stats["latency_us_p50"] = float(np.percentile(lat, 50))
    stats["latency_us_p99"] = float(np.percentile(lat, 99))
    stats["latency_us_max"] = float(lat.max())
    stats["aggregators"] = sorted(agent.aggregators, key=agent.aggregators.__getitem__)
    np.savez(
        a.out,
        stamps=stamps[admitted],
        clients=clients[admitted],
        offered_clients=clients,
        stats=np.array(json.dumps(stats)),
        latency_us=latency_us,
        decided_at=stamps,
        timeline=np.array(timeline, dtype=np.float64).reshape(-1, 5),
        grants=np.array(agent.grant_rows, dtype=np.float64).reshape(-1, 4),
    )


if __name__ == "__main__":
    main()
