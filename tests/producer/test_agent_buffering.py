"""The agent when the broker does not take its batches: never blocks, merges, bounds, counts.

The sender here is a test double of the agent's own ``Sender`` interface (the transports are
tested against a real broker in ``test_transport_contract.py``); it refuses while "down".
"""

from __future__ import annotations

import time

import numpy as np

from limiter import RateLimiter, Request
from limiter.lease import LeaseOptions
from producer import wire
from producer.agent import Agent
from producer.transport import USAGE_TOPIC, InProcessBus, QueueFull


class FlakySender:
    """Takes messages into ``sent`` while ``up``; raises QueueFull otherwise."""

    def __init__(self) -> None:
        self.up = False
        self.sent: list[bytes] = []
        self.attempts = 0

    def send(self, topic: str, partition: int, value: bytes) -> None:
        self.attempts += 1
        if not self.up:
            raise QueueFull("broker down")
        if topic == USAGE_TOPIC:
            self.sent.append(value)

    def service(self) -> None:
        pass

    def flush(self, timeout: float) -> int:
        return 0

    def close(self) -> None:
        pass

    @property
    def errors(self) -> int:
        return 0


class FlakyBus(InProcessBus):
    def __init__(self, sender: FlakySender) -> None:
        super().__init__()
        self._flaky = sender

    def sender(self) -> FlakySender:  # type: ignore[override]
        return self._flaky


def make(max_pending: int = 1_000_000) -> tuple[RateLimiter, Agent, FlakySender, list[float]]:
    now = [1000.0]
    limiter = RateLimiter(
        1000,
        60.0,
        mode="approximate",
        clock=lambda: now[0],
        lease_options=LeaseOptions(cold_start_allowance=1.0, degraded_after=1e9),
    )
    sender = FlakySender()
    agent = Agent(limiter, FlakyBus(sender), "srv-1", max_pending_records=max_pending)
    return limiter, agent, sender, now


def totals(messages: list[bytes]) -> dict[int, int]:
    out: dict[int, int] = {}
    for m in messages:
        rec = wire.decode_usage(m).records
        for key, extra in zip(rec["key"].tolist(), rec["extra"].tolist(), strict=True):
            out[key] = out.get(key, 0) + extra
    return out


def test_counts_are_kept_while_the_broker_is_down_and_sent_once_it_is_back() -> None:
    limiter, agent, sender, now = make()
    admitted = 0
    for round_ in range(5):  # five report intervals with the broker down
        for c in range(20):
            admitted += limiter.allow_request(f"c{c}", Request(now[0]))
        started = time.perf_counter()
        agent.report_once()
        assert time.perf_counter() - started < 0.5  # never waits for the broker
        now[0] += 0.1
        assert agent.stats.send_retries > round_
    assert sender.sent == []
    sender.up = True
    agent.report_once()
    got = totals(sender.sent)
    assert sum(got.values()) == admitted  # nothing lost, nothing counted twice
    assert agent.stats.records_dropped == 0


def test_pending_records_are_bounded_and_drops_are_counted() -> None:
    limiter, agent, sender, now = make(max_pending=30)
    for c in range(100):
        assert limiter.allow_request(f"c{c}", Request(now[0]))
    agent.report_once()  # down: 100 records, 30 kept
    assert agent.stats.records_dropped == 70
    assert agent.stats.tokens_dropped == 70.0
    sender.up = True
    agent.report_once()
    assert sum(totals(sender.sent).values()) == 30


def test_a_request_never_raises_while_the_broker_is_down() -> None:
    limiter, agent, _sender, now = make()
    agent.start()
    try:
        deadline = time.monotonic() + 0.5
        n = 0
        while time.monotonic() < deadline:
            limiter.allow_request(f"c{n % 50}", Request(now[0]))
            n += 1
        assert n > 1000
    finally:
        agent.stop(timeout=1.0)
    assert agent.stats.errors == 0 and agent.stats.send_retries > 0


def test_the_wait_cold_start_holds_a_request_until_a_lease_arrives() -> None:
    now = [1000.0]
    limiter = RateLimiter(
        10,
        1.0,
        mode="approximate",
        clock=lambda: now[0],
        sleep=lambda s: now.__setitem__(0, now[0] + s),
        lease_options=LeaseOptions(cold_start="wait", wait_timeout=0.3),
    )
    # no lease ever comes: held for wait_timeout, then refused
    started = now[0]
    assert not limiter.allow_request("a", Request(now[0]))
    assert 0.3 - 1e-9 <= now[0] - started < 0.35
    # a lease installed while the request waits: admitted
    usage = limiter.drain_usage()
    keys = usage.keys

    def sleep_then_grant(s: float) -> None:
        now[0] += s
        limiter.apply_grants(keys, np.array([5]), now[0] + 1.0)

    limiter._sleep = sleep_then_grant  # type: ignore[misc]
    assert limiter.allow_request("a", Request(now[0]))


def test_grants_reach_a_client_whose_usage_was_drained_long_ago() -> None:
    """Keepalive grants for a sparse client arrive many reports after its last request."""
    now = [1000.0]
    limiter = RateLimiter(10, 10.0, mode="approximate", clock=lambda: now[0])
    assert limiter.allow_request("sparse", Request(now[0]))
    key = limiter.drain_usage().keys
    for _ in range(50):  # five seconds of reports without any request of that client
        now[0] += 0.1
        assert len(limiter.drain_usage()) == 0
    assert limiter.apply_grants(key, np.array([3]), now[0] + 1.0) == 1
    assert limiter.lease_info("sparse") == (3.0, 1.0)
    # a client the table forgot is dropped from the index, and never resurrected
    limiter.clear_client("sparse")
    assert limiter.apply_grants(key, np.array([3]), now[0] + 1.0) == 0
    assert limiter.lease_info("sparse") is None


def test_grants_that_cannot_be_installed_go_back_as_released() -> None:
    """A grant for a client this server does not track (or a batch too late to use) is
    reported as released, so the aggregator stops counting it as outstanding."""
    _limiter, agent, sender, _now = make()
    sender.up = True
    bus = agent._transport
    stranger = np.array([(12345, 7)], dtype=wire.GRANT_RECORD)
    late = np.array([(777, 4)], dtype=wire.GRANT_RECORD)

    def grants(seq: int, records: np.ndarray, issued: float) -> bytes:
        return wire.encode_grants(wire.GrantBatch("agg", 1, seq, issued, 1.0, 1, "srv-1", records))

    agent.receive_once(0)  # the receiver exists before anything is sent
    bus.append(agent.grants_topic, agent._grant_partition, grants(1, stranger, 0.0))
    bus.append(agent.grants_topic, agent._grant_partition, grants(2, late, -100.0))
    assert agent.receive_once(0.5) == 1  # the late one is not applied
    assert agent.stats.grants_unknown == 1 and agent.stats.batches_late == 1
    agent.report_once()
    released: dict[int, int] = {}
    for m in sender.sent:
        rec = wire.decode_usage(m).records
        for key, tokens in zip(rec["key"].tolist(), rec["released"].tolist(), strict=True):
            released[key] = released.get(key, 0) + tokens
    assert released == {12345: 7, 777: 4}


def test_approximate_mode_takes_large_limits() -> None:
    """The local sliding log caps limits at 4096; approximate mode does not use it."""
    limiter = RateLimiter(1_000_000, 60.0, mode="approximate")
    assert limiter.policies[0].limit == 1_000_000
    assert limiter.allow_request("a", Request())  # cold start admits the first request
