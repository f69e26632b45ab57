"""The whole loop in one process over each transport: in-process bus (fast), confluent-kafka and
kafka-python (real broker). Aggregator and agents run their real threads."""

from __future__ import annotations

import random
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass

import numpy as np
import pytest

from aggregator.service import Aggregator, AggregatorConfig
from limiter import Policy, RateLimiter, Request
from limiter.lease import LeaseOptions
from producer import Agent, InProcessBus, make_transport, wire
from producer.transport import Transport

from .harness import worst_window

LIMIT, WINDOW, TICK = 60, 2.0, 0.1
#: Seconds an aggregator may take to join its group and get its partitions.
JOIN_TIMEOUT = 90.0
joined: list[float] = []


@dataclass
class Loop:
    transport: Transport
    usage: str
    grants: str
    aggregator: Aggregator
    limiters: list[RateLimiter]
    agents: list[Agent]
    stop: threading.Event
    thread: threading.Thread

    def close(self) -> None:
        self.stop.set()
        self.thread.join(10)
        for a in self.agents:
            a.stop()


def _bus_topics() -> tuple[Transport, str, str]:
    bus = InProcessBus({"usage": 4, "grants": 2})
    return bus, "usage", "grants"


@pytest.fixture(params=["bus", "confluent", "kafka-python"])
def loop(request: pytest.FixtureRequest) -> Iterator[Callable[[int], Loop]]:
    made: list[Loop] = []

    def make(servers: int) -> Loop:
        if request.param == "bus":
            transport, usage, grants = _bus_topics()
        else:
            request.applymarker(pytest.mark.integration)
            bootstrap = request.getfixturevalue("kafka_bootstrap")
            topic = request.getfixturevalue("unique_topic")
            usage, grants = topic(4), topic(2)
            transport = make_transport(bootstrap, client=request.param)
        config = AggregatorConfig(
            Policy(LIMIT, WINDOW),
            tick=TICK,
            usage_topic=usage,
            grants_topic=grants,
            group=f"loop-{random.getrandbits(32)}",
        )
        agg = Aggregator(config, transport)
        stop = threading.Event()
        thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
        thread.start()
        started = time.monotonic()
        # kafka-python resolves each new partition's position before it reports the assignment:
        # seconds per partition on a busy broker
        while not agg.partitions and time.monotonic() < started + JOIN_TIMEOUT:
            time.sleep(0.05)
        assert agg.partitions, (
            f"aggregator got no partitions in {JOIN_TIMEOUT} s (consumer errors "
            f"{agg.stats.poll_errors}, loop alive {thread.is_alive()})"
        )
        joined.append(time.monotonic() - started)
        limiters = [
            RateLimiter(
                LIMIT,
                WINDOW,
                mode="approximate",
                lease_options=LeaseOptions(expected_servers=servers),
            )
            for _ in range(servers)
        ]
        agents = [
            Agent(lim, transport, f"srv-{i}", usage_topic=usage, grants_topic=grants).start()
            for i, lim in enumerate(limiters)
        ]
        lp = Loop(transport, usage, grants, agg, limiters, agents, stop, thread)
        made.append(lp)
        return lp

    yield make
    for lp in made:
        lp.close()
    if joined:
        print(f"\n{request.param}: aggregator joined its group in {joined[-1]:.1f} s")


def drive(
    lp: Loop, clients: dict[str, float], seconds: float, servers: list[int] | None = None
) -> dict[str, np.ndarray]:
    """Offer each client `rate` requests per second for `seconds`, on random servers."""
    admitted: dict[str, list[float]] = {c: [] for c in clients}
    rng = random.Random(1)
    pick = servers if servers is not None else list(range(len(lp.limiters)))
    end = time.time() + seconds
    step = 0.005
    while time.time() < end:
        for c, rate in clients.items():
            if rng.random() < rate * step:
                now = time.time()
                if lp.limiters[rng.choice(pick)].allow_request(c, Request(now)):
                    admitted[c].append(now)
        time.sleep(step)
    return {c: np.array(v) for c, v in admitted.items()}


def test_loop_bound_and_flow(loop: Callable[[int], Loop], measured: Callable[[str], None]) -> None:
    lp = loop(3)
    time.sleep(0.5)
    admitted = drive(lp, {"hot": 4 * LIMIT / WINDOW, "mild": 0.5 * LIMIT / WINDOW}, 3 * WINDOW)
    worst = {c: worst_window(t, WINDOW) for c, t in admitted.items()}
    a = max(1, int(0.01 * LIMIT))
    measured(f"worst window {worst} (limit {LIMIT}, bound {LIMIT + 3 * a})")
    assert worst["hot"] <= LIMIT + 3 * a
    assert worst["hot"] >= 0.8 * LIMIT  # leases flow: the hot client gets its limit
    assert lp.aggregator.stats.grants > 0 and lp.aggregator.stats.errors == 0
    assert all(ag.stats.grants_installed > 0 for ag in lp.agents)
    assert all(ag.stats.errors == 0 for ag in lp.agents), [ag.stats for ag in lp.agents]


def test_traffic_shift_follows_within_three_ticks(
    loop: Callable[[int], Loop], measured: Callable[[str], None]
) -> None:
    lp = loop(2)
    time.sleep(0.5)
    drive(lp, {"mover": 0.5 * LIMIT / WINDOW}, 1.5, servers=[0])
    assert lp.limiters[0].lease_info("mover") is not None
    assert lp.limiters[1].lease_info("mover") is None
    # the traffic moves to server 1: its first request starts the clock
    start = time.monotonic()
    lp.limiters[1].allow_request("mover", Request())
    elapsed = None
    while time.monotonic() - start < 3.0:
        info = lp.limiters[1].lease_info("mover")
        if info is not None and info[0] > 0:
            elapsed = time.monotonic() - start
            break
        lp.limiters[1].allow_request("mover", Request())
        time.sleep(0.01)
    assert elapsed is not None, "server 1 never got a lease"
    ticks = elapsed / TICK
    measured(
        f"lease followed the traffic after {elapsed * 1000:.0f} ms = {ticks:.1f} ticks "
        f"(report interval {lp.agents[1].report_interval * 1000:.0f} ms included)"
    )
    # one report interval to tell the aggregator, then at most three ticks
    assert elapsed <= lp.agents[1].report_interval + 3 * TICK + 0.1


def test_poison_messages_are_counted_and_skipped(loop: Callable[[int], Loop]) -> None:
    lp = loop(1)
    sender = lp.transport.sender()
    records = wire.usage_records(
        np.array([7], dtype=np.uint64), np.array([1.0]), np.zeros(1), np.zeros(1), np.zeros(1)
    )

    def batch(seq: int) -> bytes:
        return wire.encode_usage(wire.UsageBatch("srv-x", 1, seq, 0.0, 0.1, 0, 0, records))

    valid, older = batch(5), batch(4)
    unknown_version = valid[:3] + bytes([wire.VERSION + 1]) + valid[4:]
    partitions = lp.aggregator.partitions
    p = partitions[0]
    for message in (valid, valid, older, unknown_version, b"\x00garbage\xff" * 3, b""):
        sender.send(lp.usage, p, message)
    sender.flush(5)
    deadline = time.monotonic() + 10
    stats = lp.aggregator.stats
    while time.monotonic() < deadline and (stats.duplicates < 2 or stats.malformed < 3):
        time.sleep(0.05)
    assert stats.duplicates == 2  # the repeat and the older sequence number
    assert stats.malformed == 3
    assert stats.malformed_reasons == {"bad_version": 1, "bad_magic": 1, "truncated": 1}
    # still running: a real server's usage still gets grants
    drive(lp, {"after": 5.0}, 1.0)
    assert lp.aggregator.stats.grants > 0 and lp.thread.is_alive()
