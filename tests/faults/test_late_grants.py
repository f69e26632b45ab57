"""A grant batch that arrives after its leases expired (the aggregator's producer queued it while
the broker was down, and delivers it on reconnection) must not look like a healthy stream: the
agent should stay degraded, and keep the fleet size it divides the degraded share by.

Seen in tests/faults/test_broker_down.py before the fix: on reconnection every agent left
degraded mode for ``degraded_after`` and two of four took ``servers = 2`` from such a batch (the
aggregator had stopped hearing from the others before the broker went away); back in degraded
mode they admitted ``L/2 + 1`` per window each, and the worst window of the run was 224 for
``L = 200`` (steady degraded bound ``L + N*c_max`` = 204). Deterministic here: one agent on
the in-process bus, a hand-driven clock."""

from __future__ import annotations

from collections.abc import Callable

import numpy as np

from limiter import RateLimiter, Request
from limiter.lease import LeaseOptions
from producer import InProcessBus, wire
from producer.agent import Agent
from producer.transport import GRANTS_TOPIC

LIMIT, WINDOW, SERVERS = 200, 5.0, 4
T0 = 1000.0


class Clock:
    def __init__(self) -> None:
        self.t = T0

    def __call__(self) -> float:
        return self.t


def grant_batch(seq: int, issued_at: float, servers: int) -> bytes:
    return wire.encode_grants(
        wire.GrantBatch(
            "agg-1",
            7,
            seq,
            issued_at,
            1.0,
            servers,
            "srv-0",
            np.empty(0, dtype=wire.GRANT_RECORD),
        )
    )


def test_a_late_grant_batch_keeps_the_agent_degraded(measured: Callable[[str], None]) -> None:
    clock = Clock()
    limiter = RateLimiter(
        LIMIT,
        WINDOW,
        mode="approximate",
        clock=clock,
        lease_options=LeaseOptions(expected_servers=SERVERS),
    )
    bus = InProcessBus()
    agent = Agent(limiter, bus, "srv-0")  # driven by hand: no threads
    partition = wire.grant_partition("srv-0", bus.partitions(GRANTS_TOPIC))
    sender = bus.sender()
    try:
        sender.send(GRANTS_TOPIC, partition, grant_batch(1, T0, SERVERS))
        agent.receive_once(0)
        assert limiter.lease.servers == SERVERS and not limiter.lease.degraded(clock())
        clock.t = T0 + 20.0  # the broker is down: no grant batch for 20 s
        assert limiter.lease.degraded(clock())
        # the batch the aggregator queued half a second into the outage, for two servers
        sender.send(GRANTS_TOPIC, partition, grant_batch(2, T0 + 0.5, 2))
        agent.receive_once(0)
        degraded, n_seen = limiter.lease.degraded(clock()), limiter.lease.servers
        # the degraded share once degraded_after has passed again: a request every 10 ms
        clock.t += 1.1
        start, admitted = clock.t, 0
        while clock.t < start + WINDOW - 1e-9:
            admitted += limiter.allow_request("hot", Request(clock.t))
            clock.t += 0.01
        measured(
            f"late grant batch (issued 19.5 s before it arrived): degraded {degraded}, N_seen "
            f"{n_seen}; then {admitted} admitted in one window on this server (degraded share "
            f"L/N + 1 = {LIMIT // SERVERS + 1}); late batches counted {agent.stats.batches_late}"
        )
        assert agent.stats.batches_late == 1
        assert degraded, "a late grant batch ended degraded mode"
        assert n_seen == SERVERS, f"a late grant batch set the fleet size to {n_seen}"
        assert admitted <= LIMIT // SERVERS + 1
    finally:
        agent.stop(timeout=1)
