"""One app server of the cluster tests, as its own process.

Runs an approximate-mode limiter with its agent against the real broker, offers the requests of
its share of a precomputed schedule at their times, and writes what it admitted.

    python tests/cluster/node.py --bootstrap HOST:PORT --server-id S --schedule in.npz
        --out out.npz --limit 200 --window 5 --start-at EPOCH [--clock-offset SECONDS]
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

import numpy as np

from limiter import Request
from limiter.lease import LeaseOptions
from producer import connect


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
    a = p.parse_args()

    offset = a.clock_offset

    def clock() -> float:
        return time.time() + offset

    sched = np.load(a.schedule)
    times, clients = sched["times"], sched["clients"]
    ids = [f"client-{c}" for c in range(int(clients.max()) + 1 if clients.size else 0)]
    limiter, agent = connect(
        a.limit,
        a.window,
        bootstrap=a.bootstrap,
        server_id=a.server_id,
        client=a.client,
        usage_topic=a.usage_topic,
        grants_topic=a.grants_topic,
        clock=clock,
        lease_options=LeaseOptions(
            cold_start_allowance=a.cold_start_allowance, expected_servers=a.expected_servers
        ),
    )
    admitted = np.zeros(times.size, dtype=bool)
    stamps = np.zeros(times.size)
    worst_us = []
    while time.time() < a.start_at:
        time.sleep(0.005)
    start = a.start_at
    i, n = 0, times.size
    allow = limiter.allow_request
    while i < n:
        now = time.time()
        due = start + times[i]
        if due > now:
            time.sleep(min(due - now, 0.002))
            continue
        while i < n and start + times[i] <= now:
            t0 = time.perf_counter()
            admitted[i] = allow(ids[clients[i]], Request(clock()))
            worst_us.append((time.perf_counter() - t0) * 1e6)
            stamps[i] = time.time()  # the true time (the test's common reference)
            i += 1
    agent.stop()
    lat = np.array(worst_us) if worst_us else np.zeros(1)
    stats = dataclasses.asdict(agent.stats)
    stats["latency_us_p50"] = float(np.percentile(lat, 50))
    stats["latency_us_p99"] = float(np.percentile(lat, 99))
    np.savez(
        a.out,
        stamps=stamps[admitted],
        clients=clients[admitted],
        offered_clients=clients,
        stats=np.array(json.dumps(stats)),
    )


if __name__ == "__main__":
    main()
