"""One app server of the breaker test, as its own process.

Calls a simulated backend every ``--call-interval`` seconds through ``agent.breaker("db")``: the
backend answers errors from ``--fail-from`` to ``--fail-until`` (seconds after ``--start-at``),
else successes; every call is reported to the agent's backend monitor. Writes to ``--out``
(JSON): every change of the breaker's state as this server sees it (epoch time, state), the calls
made and refused, and the agent's counters.

    python tests/faults/breaker_node.py --bootstrap HOST:PORT --server-id S --usage-topic U
        --grants-topic G --start-at EPOCH --duration 16 --fail-from 4 --fail-until 10 --out F
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import time

from producer import connect, make_transport
from producer.health import BackendMonitor


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--bootstrap", required=True)
    p.add_argument("--server-id", required=True)
    p.add_argument("--usage-topic", required=True)
    p.add_argument("--grants-topic", required=True)
    p.add_argument("--start-at", type=float, required=True)
    p.add_argument("--duration", type=float, required=True)
    p.add_argument("--fail-from", type=float, required=True)
    p.add_argument("--fail-until", type=float, required=True)
    p.add_argument("--call-interval", type=float, default=0.005)
    p.add_argument("--out", required=True)
    a = p.parse_args()
    monitor = BackendMonitor()
    _limiter, agent = connect(
        1000,
        1.0,
        transport=make_transport(a.bootstrap),
        server_id=a.server_id,
        usage_topic=a.usage_topic,
        grants_topic=a.grants_topic,
        monitor=monitor,
    )
    gate = agent.breaker("db")
    transitions: list[tuple[float, str]] = []
    calls = {"made": 0, "failed": 0, "refused": 0}
    try:
        time.sleep(max(0.0, a.start_at - time.time()))
        state = gate.current()
        transitions.append((time.time(), state))
        end = a.start_at + a.duration
        while (now := time.time()) < end:
            if gate.current() != state:
                state = gate.current()
                transitions.append((now, state))
            if gate.allow():
                failing = a.fail_from <= now - a.start_at < a.fail_until
                calls["made"] += 1
                calls["failed"] += failing
                monitor.observe("db", 0.002, not failing)
            else:
                calls["refused"] += 1
            time.sleep(a.call_interval)
    finally:
        agent.stop()
    with open(a.out, "w") as f:
        json.dump(
            {"transitions": transitions, "calls": calls, "stats": dataclasses.asdict(agent.stats)},
            f,
        )


if __name__ == "__main__":
    main()
