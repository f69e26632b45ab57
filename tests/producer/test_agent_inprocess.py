"""Agents, an aggregator and approximate-mode limiters on the in-process bus, with one fake clock.

Most tests drive everything by hand on one injected clock (limiters and aggregator share it):
``Agent.report_once`` / ``Agent.receive_once(0)`` and, on the aggregator, ``handle`` for every
usage record (read by a test-owned consumer) followed by ``tick``. One smoke test runs the real
threads for about two seconds.
"""

from __future__ import annotations

import math
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aggregator.service import Aggregator, AggregatorConfig
from limiter import AcquireTimeout, Policy, RateLimiter, Request
from limiter.keys import client_key
from limiter.lease import LeaseOptions
from producer import wire
from producer.agent import Agent
from producer.transport import GRANTS_TOPIC, USAGE_TOPIC, InProcessBus

T0 = 1000.0
REPORT = 0.1  # the agents' report interval (the default)


class Clock:
    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t


class Spy:
    """A limiter seen through the agent: remembers when usage outside leases was drained."""

    def __init__(self, limiter: RateLimiter, clock: Clock) -> None:
        self._limiter = limiter
        self._clock = clock
        self.extras: list[tuple[float, float]] = []  # (drained at, tokens)

    def drain_usage(self):  # type: ignore[no-untyped-def]
        usage = self._limiter.drain_usage()
        if usage.extra.sum() > 0:
            self.extras.append((self._clock(), float(usage.extra.sum())))
        return usage

    def __getattr__(self, name: str) -> object:
        return getattr(self._limiter, name)


def max_in_window(times: list[float], window: float, after: float = -math.inf) -> int:
    """Most admissions in any interval (T - window, T] with T - window >= ``after``."""
    ts = np.sort(np.asarray(times, dtype=np.float64))
    best = 0
    for j, t in enumerate(ts):
        if t - window < after:
            continue
        i = np.searchsorted(ts, t - window, side="right")
        best = max(best, j + 1 - int(i))
    return best


@dataclass
class Fleet:
    """One aggregator, ``n`` servers (limiter + agent each), one clock."""

    limit: int
    window: float
    n: int
    options: LeaseOptions | None = None
    config: dict[str, object] = field(default_factory=dict)
    clock: Clock = field(default_factory=Clock)
    bus: InProcessBus = field(default_factory=InProcessBus)
    #: each server's clock minus the true one, and the aggregator's
    skews: list[float] | None = None
    agg_skew: float = 0.0

    def __post_init__(self) -> None:
        true = self.clock
        agg_skew = self.agg_skew
        self.agg = Aggregator(
            AggregatorConfig(Policy(self.limit, self.window), aggregator_id="agg", **self.config),  # type: ignore[arg-type]
            self.bus,
            clock=(lambda: true.t + agg_skew),
        )
        self.usage_in = self.bus.receiver(USAGE_TOPIC, group="test-reader")
        skews = self.skews or [0.0] * self.n
        self.limiters = [
            RateLimiter(
                self.limit,
                self.window,
                mode="approximate",
                clock=(lambda s=skews[i]: true.t + s),
                lease_options=self.options,
            )
            for i in range(self.n)
        ]
        self.spies = [Spy(lim, self.clock) for lim in self.limiters]
        self.agents = [
            Agent(spy, self.bus, f"server-{i}")  # type: ignore[arg-type]
            for i, spy in enumerate(self.spies)
        ]
        self.admitted: list[float] = []
        self.admitted_by: list[list[float]] = [[] for _ in range(self.n)]
        self.aggregator_up = True

    def pump(self) -> None:
        """The aggregator: apply every usage record that arrived, then tick."""
        for record in self.usage_in.poll(0):
            self.agg.handle(record)
        self.agg.tick()

    def run(
        self,
        seconds: float,
        requests: Callable[[int], list[int]],
        client: str = "alice",
        dt: float = 0.005,
        phase: list[int] | None = None,
        api: str = "check",
    ) -> None:
        """Advance ``seconds``; at each step ``requests(step)`` names the servers asked."""
        per_tick = round(0.1 / dt)
        phase = phase or [0] * self.n
        start = self.clock.t
        for step in range(round(seconds / dt)):
            self.clock.t = start + step * dt
            for i, agent in enumerate(self.agents):
                if step % per_tick == phase[i]:
                    agent.report_once()
            if step % per_tick == 0 and self.aggregator_up:
                self.pump()
            for agent in self.agents:
                agent.receive_once(0)
            for i in requests(step):
                lim = self.limiters[i]
                if api == "check":
                    ok = lim.check(client).allowed
                else:
                    assert api == "allow_request"
                    ok = lim.allow_request(client, Request(lim.now()))
                if ok:
                    self.admitted.append(self.clock.t)
                    self.admitted_by[i].append(self.clock.t)
        self.clock.t = start + seconds

    @property
    def allowance(self) -> int:
        return max(1, math.floor(0.01 * self.limit))

    def last_extra_report(self) -> float:
        return max((t for s in self.spies for t, _ in s.extras), default=-math.inf)

    def check_budget(self, admitted: list[float] | None = None) -> None:
        """In any window (T - W, T]: at most the limit plus the admissions made outside leases
        in it (cold start, degraded). Those are drained at most one report interval after they
        happen, so the tokens drained in (T - W, T + interval] bound them."""
        times = np.sort(np.asarray(self.admitted if admitted is None else admitted))
        extras = sorted(e for s in self.spies for e in s.extras)
        et = np.array([t for t, _ in extras])
        ea = np.cumsum([0.0] + [a for _, a in extras])
        w = self.window
        for j, t in enumerate(times):
            inside = j + 1 - int(np.searchsorted(times, t - w, side="right"))
            lo = int(np.searchsorted(et, t - w, side="right"))
            hi = int(np.searchsorted(et, t + REPORT + 1e-9, side="right"))
            assert inside <= self.limit + ea[hi] - ea[lo], (t, inside, ea[hi] - ea[lo])


# -- the budget across servers -------------------------------------------------------------------


@pytest.mark.parametrize(
    ("limit", "window", "n", "pattern", "skews", "agg_skew"),
    [
        (100, 1.0, 3, "all", None, 0.0),
        (40, 0.5, 2, "all", None, 0.0),
        (250, 2.0, 4, "random", None, 0.0),
        (100, 1.0, 4, "one-at-a-time", None, 0.0),
        # clocks that disagree: servers 3 s ahead / 2 s behind, the aggregator 500 s behind
        (100, 1.0, 3, "all", [3.0, -2.0, 0.25], -500.0),
        (60, 1.0, 2, "random", [-0.7, 0.7], 1e6),
    ],
)
def test_total_admissions_never_exceed_the_limit(
    limit: int,
    window: float,
    n: int,
    pattern: str,
    skews: list[float] | None,
    agg_skew: float,
) -> None:
    fleet = Fleet(limit, window, n, skews=skews, agg_skew=agg_skew)
    rng = np.random.default_rng(limit + n)

    def requests(step: int) -> list[int]:
        if pattern == "all":
            return list(range(n))
        if pattern == "random":
            return [int(i) for i in rng.integers(0, n, size=int(rng.integers(0, 4)))]
        return [(step // 50) % n]  # moves from server to server every 0.25 s

    fleet.run(6 * window + 1.0, requests, phase=[(7 * i) % 20 for i in range(n)])
    # the limit, plus what was admitted outside leases in the same window
    fleet.check_budget()
    # cold-start admissions: one allowance per server per (fixed) window at most
    extra = sum(a for s in fleet.spies for _, a in s.extras)
    assert extra <= n * fleet.allowance * math.ceil((6 * window + 1.0) / window + 1)
    # and once they are reported and no more come, any window holds at most the limit
    last = fleet.last_extra_report()
    if last < T0 + 1.0:
        assert max_in_window(fleet.admitted, window, after=last) <= limit
    assert fleet.agg.stats.malformed == 0 and fleet.agg.stats.errors == 0
    assert all(a.stats.errors == 0 and a.stats.malformed == 0 for a in fleet.agents)
    assert all(a.stats.batches_late == 0 for a in fleet.agents)
    # both sides learnt the clock offsets: the agent's is its skew against the aggregator's
    for i, agent in enumerate(fleet.agents):
        skew = (skews or [0.0] * n)[i]
        assert agent.stats.offsets["agg"] == pytest.approx(skew - agg_skew, abs=1e-6)
        # and the aggregator's: the skew less the fastest delivery (at most a report interval)
        seen = fleet.agg.server_offsets()[f"server-{i}"]
        assert skew - agg_skew - REPORT - 1e-6 <= seen <= skew - agg_skew + 1e-6


def saturate(fleet: Fleet, seconds: float, api: str) -> float:
    """About 3x the limit, spread over the servers; returns admissions per window after the
    first two windows."""
    limit, window, n = fleet.limit, fleet.window, fleet.n
    per_step = 3 * limit / window * 0.005 / n
    k, every = max(1, round(per_step)), max(1, round(1 / per_step))
    fleet.run(seconds, lambda step: list(range(n)) * k if step % every == 0 else [], api=api)
    later = [t for t in fleet.admitted if t >= T0 + 2 * window]
    return len(later) / (seconds - 2 * window) * window


@pytest.mark.parametrize(
    ("limit", "window", "n"), [(100, 1.0, 3), (60, 1.0, 2), (1000, 1.0, 2), (400, 2.0, 4)]
)
def test_a_saturated_client_gets_most_of_its_limit(limit: int, window: float, n: int) -> None:
    fleet = Fleet(limit, window, n)
    per_window = saturate(fleet, 8 * window, api="allow_request")
    # each token stays charged for about a window plus a report interval, a tick and a bucket
    assert per_window >= 0.75 * limit, per_window
    fleet.check_budget()


@pytest.mark.parametrize(("limit", "window", "n"), [(400, 2.0, 4), (100, 5.0, 2)])
def test_long_windows_are_used_almost_fully(limit: int, window: float, n: int) -> None:
    fleet = Fleet(limit, window, n)
    assert saturate(fleet, 8 * window, api="allow_request") >= 0.9 * limit
    fleet.check_budget()


@pytest.mark.parametrize(("limit", "window", "n"), [(400, 2.0, 4), (100, 5.0, 2)])
def test_long_windows_are_used_almost_fully_through_check(
    limit: int, window: float, n: int
) -> None:
    """check() counts its refusals as demand (`rejected`) like allow_request(): the aggregator
    keeps granting (once, without that demand, clients fell back to cold start: 67%/84%)."""
    fleet = Fleet(limit, window, n)
    assert saturate(fleet, 8 * window, api="check") >= 0.9 * limit
    fleet.check_budget()


def test_a_refused_check_is_reported_as_demand() -> None:
    _, limiter, agent = one_server(100, 1.0)
    # a new group reads from the end: the reader must exist before the batch is sent
    reader = agent._transport.receiver(USAGE_TOPIC, group="t")  # type: ignore[attr-defined]
    assert [limiter.check("alice").allowed for _ in range(3)] == [True, False, False]
    agent.report_once()
    rows = [r for rec in reader.poll(0) for r in wire.decode_usage(rec.value).records.tolist()]
    # (key, admitted, extra, rejected, released): the cold-start token and the two refusals
    assert rows == [(client_key("alice"), 0, 1, 2, 0)]


def test_a_refused_acquire_is_reported_as_demand() -> None:
    _, limiter, agent = one_server(100, 1.0)
    reader = agent._transport.receiver(USAGE_TOPIC, group="t")  # type: ignore[attr-defined]
    assert limiter.acquire("alice", timeout=0).allowed  # the cold-start token
    for _ in range(2):
        with pytest.raises(AcquireTimeout):
            limiter.acquire("alice", timeout=0)
    agent.report_once()
    rows = [r for rec in reader.poll(0) for r in wire.decode_usage(rec.value).records.tolist()]
    assert rows == [(client_key("alice"), 0, 1, 2, 0)]


def test_a_refused_allow_request_is_reported_as_demand() -> None:
    clock, limiter, agent = one_server(100, 1.0)
    reader = agent._transport.receiver(USAGE_TOPIC, group="t")  # type: ignore[attr-defined]
    assert [limiter.allow_request("alice", Request(clock.t)) for _ in range(3)] == [
        True,
        False,
        False,
    ]
    agent.report_once()
    rows = [r for rec in reader.poll(0) for r in wire.decode_usage(rec.value).records.tolist()]
    assert rows == [(client_key("alice"), 0, 1, 2, 0)]


def test_clients_are_limited_independently() -> None:
    fleet = Fleet(50, 1.0, 2)
    fleet.run(3.0, lambda step: [0, 1], client="alice")
    alice = list(fleet.admitted)
    fleet.check_budget()
    fleet.admitted.clear()
    fleet.run(3.0, lambda step: [0, 1], client="bob")
    fleet.check_budget()  # bob's own budget, untouched by alice's
    assert len(fleet.admitted) >= 0.7 * 50 * 3
    assert len(alice) >= 0.7 * 50 * 3


# -- bad usage messages are counted and skipped ---------------------------------------------------


def usage(
    server: str,
    seq: int,
    keys: list[int],
    *,
    admitted: float = 0.0,
    rejected: float = 0.0,
    incarnation: int = 1,
    start: float = 0.0,
) -> bytes:
    n = len(keys)
    rec = wire.usage_records(
        np.array(keys, dtype=np.uint64),
        np.full(n, admitted),
        np.zeros(n),
        np.full(n, rejected),
        np.zeros(n),
    )
    return wire.encode_usage(
        wire.UsageBatch(server, incarnation, seq, start, start + 0.1, 0, 0, rec)
    )


def grant_log(bus: InProcessBus) -> list[tuple[object, ...]]:
    """Every grant batch on the bus, without the (random) epoch."""
    out = []
    for p in range(bus.partitions(GRANTS_TOPIC)):
        for r in bus._topic(GRANTS_TOPIC).partitions[p]:
            g = wire.decode_grants(r.value)
            out.append((g.server_id, g.seq, g.issued_at, g.ttl, g.servers, g.records.tobytes()))
    return out


class Scripted:
    """An aggregator fed hand-built usage messages on its own bus and clock."""

    def __init__(self, limit: int = 20, window: float = 1.0) -> None:
        self.clock = Clock()
        self.bus = InProcessBus()
        self.agg = Aggregator(
            AggregatorConfig(Policy(limit, window), aggregator_id="agg"), self.bus, clock=self.clock
        )
        self.reader = self.bus.receiver(USAGE_TOPIC, group="test-reader")
        self.handled: list[bool] = []

    def send(self, partition: int, value: bytes) -> None:
        self.bus.append(USAGE_TOPIC, partition, value)

    def pump(self, dt: float = 0.1) -> None:
        self.clock.t += dt
        for record in self.reader.poll(0):
            self.handled.append(self.agg.handle(record))
        self.agg.tick()


KEYS = [client_key(c) for c in ("alice", "bob", "carol")]


def good_batch(server: str, rnd: int, partition: int) -> bytes | None:
    """The usage ``server`` sends on ``partition`` in round ``rnd`` (its seq is ``rnd + 1``)."""
    keys = [k for k in KEYS if k % 4 == partition]
    if not keys:
        return None
    return usage(
        server,
        rnd + 1,
        keys,
        admitted=float(rnd % 2),
        rejected=float(3 + rnd),
        start=rnd * 0.1,
    )


def script(agg: Scripted, bad: dict[int, list[tuple[int, bytes]]]) -> None:
    """Six rounds of good usage from two servers; ``bad[round]`` adds (partition, bytes) after."""
    for rnd in range(6):
        for server in ("s1", "s2"):
            for p in range(4):
                value = good_batch(server, rnd, p)
                if value is not None:
                    agg.send(p, value)
        for p, value in bad.get(rnd, []):
            agg.send(p, value)
        agg.pump()


def reference_run() -> Scripted:
    ref = Scripted()
    script(ref, {})
    return ref


def assert_same_outcome(ref: Scripted, run: Scripted) -> None:
    assert grant_log(run.bus) == grant_log(ref.bus)
    assert run.agg.stats.batches == ref.agg.stats.batches
    assert run.agg.stats.records == ref.agg.stats.records
    assert run.agg.stats.tokens_granted == ref.agg.stats.tokens_granted
    assert run.agg.stats.ticks == ref.agg.stats.ticks
    assert run.agg.clients() == ref.agg.clients()
    assert run.agg.active_servers(run.clock()) == ref.agg.active_servers(ref.clock())
    assert run.agg.stats.errors == 0


def test_reference_script_grants_something() -> None:
    ref = reference_run()
    assert ref.agg.stats.tokens_granted > 0 and ref.agg.stats.malformed == 0
    assert ref.agg.stats.duplicates == 0 and all(ref.handled)


def _first_batch(seq: int = 1, server: str = "s1", **kw: object) -> tuple[int, bytes]:
    k = KEYS[0]
    return k % 4, usage(server, seq, [k], rejected=3.0, **kw)  # type: ignore[arg-type]


def test_duplicate_batch_is_counted_and_skipped() -> None:
    ref = reference_run()
    run = Scripted()
    p = KEYS[0] % 4
    value = good_batch("s1", 1, p)  # round 1's batch from s1, delivered again (same bytes)
    assert value is not None
    script(run, {1: [(p, value)], 3: [(p, value)]})
    assert run.agg.stats.duplicates == 2
    assert run.agg.stats.malformed == 0
    assert_same_outcome(ref, run)


def test_out_of_order_batch_is_counted_and_skipped() -> None:
    ref = reference_run()
    run = Scripted()
    p, value = _first_batch(seq=1)  # an older sequence number after newer ones
    script(run, {4: [(p, value)]})
    assert run.agg.stats.duplicates == 1
    assert_same_outcome(ref, run)


@pytest.mark.parametrize("version", [0, 2, 255])
def test_unknown_version_is_counted_as_malformed(version: int) -> None:
    ref = reference_run()
    run = Scripted()
    p, value = _first_batch(seq=99)
    bad = value[:3] + bytes((version,)) + value[4:]
    script(run, {0: [(p, bad)], 2: [(p, bad)]})
    assert run.agg.stats.malformed == 2
    assert run.agg.stats.malformed_reasons == {"bad_version": 2}
    assert_same_outcome(ref, run)


def test_garbage_on_the_usage_topic_is_counted_and_skipped() -> None:
    ref = reference_run()
    run = Scripted()
    rng = np.random.default_rng(3)
    junk = [
        b"",
        b"DRL",
        b"\x00" * 64,
        wire.encode_grants(
            wire.GrantBatch("x", 1, 1, 0.0, 1.0, 1, "s1", np.empty(0, dtype=wire.GRANT_RECORD))
        ),
    ]
    junk += [rng.bytes(int(rng.integers(1, 300))) for _ in range(20)]
    assert not any(j.startswith(wire.MAGIC + b"\x01\x01") for j in junk[4:])
    bad = {r: [(i % 4, j) for i, j in enumerate(junk) if i % 6 == r] for r in range(6)}
    script(run, bad)
    assert run.agg.stats.malformed == len(junk)
    assert sum(run.agg.stats.malformed_reasons.values()) == len(junk)
    assert set(run.agg.stats.malformed_reasons) <= {
        "bad_magic",
        "truncated",
        "bad_type",
        "bad_version",
        "bad_length",
        "bad_field",
        "too_large",
    }
    assert run.agg.stats.malformed_reasons["bad_type"] >= 1  # the grant batch
    assert_same_outcome(ref, run)


@settings(
    deadline=None, max_examples=25, suppress_health_check=[HealthCheck.function_scoped_fixture]
)
@given(
    st.lists(
        st.tuples(
            st.integers(0, 5),
            st.integers(0, 3),
            st.one_of(
                st.binary(max_size=80),
                st.binary(max_size=80).map(lambda b: wire.MAGIC + b"\x01\x01" + b),
                st.sampled_from(["dup", "old"]),
            ),
        ),
        max_size=12,
    )
)
def test_any_bad_messages_leave_the_outcome_unchanged(
    bad: list[tuple[int, int, bytes | str]],
) -> None:
    ref = reference_run()
    run = Scripted()
    plan: dict[int, list[tuple[int, bytes]]] = {}
    for rnd, partition, value in bad:
        if value == "dup":  # this round's batch from s1, again
            p = KEYS[0] % 4
            dup = good_batch("s1", rnd, p)
            assert dup is not None
            plan.setdefault(rnd, []).append((p, dup))
        elif value == "old":
            p, data = _first_batch(seq=max(1, rnd))
            plan.setdefault(rnd, []).append((p, data))
        else:
            assert isinstance(value, bytes)
            try:
                wire.decode_usage(value)
            except wire.WireError:
                plan.setdefault(rnd, []).append((partition, value))
    script(run, plan)
    assert_same_outcome(ref, run)
    skipped = run.agg.stats.malformed + run.agg.stats.duplicates
    assert skipped == sum(len(v) for v in plan.values())


def test_the_aggregator_step_loop_survives_garbage() -> None:
    """The same through ``Aggregator.step`` (its own consumer), on the real clock."""
    bus = InProcessBus()
    agg = Aggregator(AggregatorConfig(Policy(10, 1.0), tick=0.01), bus)
    bus.append(USAGE_TOPIC, 0, b"garbage")
    bus.append(USAGE_TOPIC, 1, usage("s1", 1, [4], rejected=2.0)[:-3])
    k = 8  # key 8 lives on partition 0
    bus.append(USAGE_TOPIC, 0, usage("s1", 1, [k], rejected=2.0))
    deadline = time.monotonic() + 2.0
    while agg.stats.ticks < 3 and time.monotonic() < deadline:
        agg.step()
    assert agg.stats.ticks >= 3
    assert agg.stats.malformed == 2
    assert agg.stats.malformed_reasons == {"bad_magic": 1, "bad_length": 1}
    assert agg.stats.batches == 1 and agg.stats.tokens_granted > 0


# -- the agent's side of grants ----------------------------------------------------------------


def grant_to(
    agent: Agent,
    server_id: str,
    records: list[tuple[int, int]],
    *,
    seq: int,
    issued_at: float,
    servers: int = 1,
    aggregator_id: str = "agg",
    ttl: float = 0.5,
) -> None:
    rec = np.array(records, dtype=wire.GRANT_RECORD)
    data = wire.encode_grants(
        wire.GrantBatch(aggregator_id, 5, seq, issued_at, ttl, servers, server_id, rec)
    )
    bus: InProcessBus = agent._transport  # type: ignore[assignment]
    bus.append(GRANTS_TOPIC, agent._grant_partition, data)


def one_server(
    limit: int = 100, window: float = 1.0, **options: object
) -> tuple[Clock, RateLimiter, Agent]:
    clock = Clock()
    bus = InProcessBus()
    limiter = RateLimiter(
        limit,
        window,
        mode="approximate",
        clock=clock,
        lease_options=LeaseOptions(**options) if options else None,  # type: ignore[arg-type]
    )
    agent = Agent(limiter, bus, "me")
    return clock, limiter, agent


def test_grants_to_another_server_are_ignored() -> None:
    clock, limiter, agent = one_server()
    assert limiter.check("alice").allowed  # cold start: 1 token
    agent.report_once()  # alice is now known to the limiter's agent side
    clock.t += 0.5
    grant_to(agent, "someone-else", [(client_key("alice"), 50)], seq=1, issued_at=clock.t)
    assert agent.receive_once(0) == 0
    assert agent.stats.grant_batches == 0 and agent.stats.grants_installed == 0
    assert limiter.lease.last_grant == T0  # the stream's health was not touched either
    assert not limiter.check("alice").allowed  # still cold, allowance spent
    # the same batch addressed to this server installs the lease
    grant_to(agent, "me", [(client_key("alice"), 50)], seq=2, issued_at=clock.t)
    assert agent.receive_once(0) == 1
    assert agent.stats.grants_installed == 1
    assert sum(limiter.check("alice").allowed for _ in range(60)) == 50


def test_grants_for_unknown_clients_are_counted() -> None:
    clock, limiter, agent = one_server()
    limiter.check("alice")
    agent.report_once()
    grant_to(
        agent,
        "me",
        [(client_key("alice"), 5), (client_key("nobody"), 7), (2**64 - 1, 1)],
        seq=1,
        issued_at=clock.t,
    )
    assert agent.receive_once(0) == 1
    assert agent.stats.grants_installed == 1
    assert agent.stats.grants_unknown == 2


def test_duplicate_and_late_grant_batches() -> None:
    clock, limiter, agent = one_server()
    limiter.check("alice")
    agent.report_once()
    grant_to(agent, "me", [(client_key("alice"), 5)], seq=3, issued_at=clock.t)
    grant_to(agent, "me", [(client_key("alice"), 5)], seq=3, issued_at=clock.t)
    grant_to(agent, "me", [(client_key("alice"), 5)], seq=2, issued_at=clock.t)
    assert agent.receive_once(0) == 1
    assert agent.stats.batches_duplicate == 2
    assert sum(limiter.check("alice").allowed for _ in range(20)) == 5
    # a batch issued long ago (by the offset the agent learnt) is too late to use
    grant_to(agent, "me", [(client_key("alice"), 5)], seq=4, issued_at=clock.t - 10.0)
    assert agent.receive_once(0) == 0
    assert agent.stats.batches_late == 1
    # malformed bytes on the grant partition are counted
    bus: InProcessBus = agent._transport  # type: ignore[assignment]
    bus.append(GRANTS_TOPIC, agent._grant_partition, b"junk")
    assert agent.receive_once(0) == 0 and agent.stats.malformed == 1


# -- cold start ----------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "allowance"), [(50, 1), (99, 1), (250, 2), (1000, 10)])
def test_cold_start_optimistic_allowance_per_window(limit: int, allowance: int) -> None:
    clock, limiter, agent = one_server(limit, 1.0)
    assert allowance == max(1, math.floor(0.01 * limit))
    seq = 0
    admitted: list[float] = []
    for k in range(300):
        clock.t = T0 + k * 0.01
        if k % 10 == 0:
            # the stream is healthy (empty grant batches keep coming) but no lease for this client
            seq += 1
            grant_to(agent, "me", [], seq=seq, issued_at=clock.t)
            agent.receive_once(0)
        if limiter.check("alice").allowed:
            admitted.append(clock.t)
    assert not limiter.lease.degraded(clock.t)
    assert admitted[0] == T0  # the first request passes at once
    assert max_in_window(admitted, 1.0) <= allowance  # then at most the allowance per window
    assert len(admitted) >= 3 * allowance - 1  # and about that much (3 windows)


def test_cold_start_reject_refuses_at_once() -> None:
    clock, limiter, _ = one_server(100, 1.0, cold_start="reject")
    assert not limiter.check("alice").allowed
    assert not limiter.allow_request("alice", Request(clock.t))
    assert limiter.peek("alice").allowed is False


def ask(limiter: RateLimiter, clock: Clock, api: str) -> bool:
    if api == "check":
        return limiter.check("alice").allowed
    return limiter.allow_request("alice", Request(clock.t))


def test_cold_start_reject_gets_a_lease_once_its_demand_is_reported() -> None:
    fleet = Fleet(100, 1.0, 1, options=LeaseOptions(cold_start="reject"))
    lim = fleet.limiters[0]
    assert not ask(lim, fleet.clock, "allow_request")
    fleet.run(0.2, lambda step: [])
    assert fleet.agents[0].stats.grants_installed >= 1
    assert ask(lim, fleet.clock, "allow_request")


def test_cold_start_reject_gets_a_lease_through_check() -> None:
    """With cold_start='reject' a client that only calls check() is heard of through its
    refusals (`rejected`), and gets a lease."""
    fleet = Fleet(100, 1.0, 1, options=LeaseOptions(cold_start="reject"))
    fleet.run(2.0, lambda step: [0], api="check")
    assert fleet.agents[0].stats.grants_installed >= 1
    assert len(fleet.admitted) > 0
    assert min(fleet.admitted) <= T0 + 0.3  # within a report and a tick or two
    fleet.check_budget()


def test_cold_start_then_lease_through_the_aggregator() -> None:
    fleet = Fleet(200, 1.0, 2)
    # before any report: each server admits one request at once (the allowance is paced)
    got = [sum(ask(lim, fleet.clock, "allow_request") for _ in range(10)) for lim in fleet.limiters]
    assert got == [1, 1]
    fleet.run(0.3, lambda step: [])
    assert all(a.stats.grants_installed >= 1 for a in fleet.agents)
    # the lease covers the demand reported (1 admitted outside a lease + 9 refused, per tick)
    assert sum(ask(fleet.limiters[0], fleet.clock, "allow_request") for _ in range(10)) == 10


# -- degraded mode -------------------------------------------------------------------------------


@pytest.mark.parametrize(("limit", "n"), [(100, 4), (60, 2), (90, 3)])
def test_degraded_share_and_recovery(limit: int, n: int) -> None:
    window = 1.0
    fleet = Fleet(limit, window, n)
    everyone = list(range(n))
    fleet.run(2.0, lambda step: everyone)
    assert all(a.stats.grants_installed > 0 for a in fleet.agents)
    assert fleet.limiters[0].lease.servers == n  # from the grant batches
    # the aggregator goes away; server 0 keeps being asked
    fleet.aggregator_up = False
    down_at = fleet.clock.t
    fleet.admitted_by[0].clear()
    fleet.run(6.0, lambda step: [0])
    lease = fleet.limiters[0].lease
    assert lease.degraded(fleet.clock.t)
    degraded_from = down_at + lease.degraded_after
    share = limit / n
    times = [t for t in fleet.admitted_by[0] if t > degraded_from + 0.01]
    # about limit / N per window: GCRA at N * window / limit per token
    most = max_in_window(times, window)
    assert share - 1 <= most <= share + 1, (most, share)
    per_window = len(times) / (fleet.clock.t - degraded_from - 0.01) * window
    # (requests come every 5 ms: an admission waits up to one more step after the meter drains)
    assert 0.85 * share - 1 <= per_window <= share + 1, (per_window, share)
    # the aggregator is back: the next grant batch ends degraded mode
    fleet.aggregator_up = True
    fleet.run(0.1, lambda step: [0])
    assert not lease.degraded(fleet.clock.t)
    assert fleet.agents[0].stats.grants_installed > 0


def test_degraded_before_any_grant_uses_expected_servers() -> None:
    clock, limiter, agent = one_server(100, 1.0, expected_servers=5, degraded_after=0.2)
    clock.t = T0 + 0.3
    assert limiter.lease.degraded(clock.t)
    admitted = []
    for k in range(400):
        clock.t = T0 + 0.3 + k * 0.005
        if limiter.check("alice").allowed:
            admitted.append(clock.t)
    assert 19 <= max_in_window(admitted, 1.0) <= 21
    grant_to(agent, "me", [], seq=1, issued_at=clock.t, servers=2)
    agent.receive_once(0)
    assert not limiter.lease.degraded(clock.t) and limiter.lease.servers == 2


# -- idle clients --------------------------------------------------------------------------------


def test_an_idle_client_stops_getting_grants() -> None:
    """The expired lease's `released` report is no demand (once, it was re-granted NEED_FLOOR
    tokens after every expiry, forever): an idle client stops being granted and is forgotten."""
    fleet = Fleet(100, 1.0, 1)
    fleet.run(0.2, lambda step: [0] if step == 0 else [])  # one request, then silence
    assert fleet.agg.stats.tokens_granted > 0  # it got a lease
    fleet.run(5.0, lambda step: [])
    granted = fleet.agg.stats.tokens_granted
    grants = fleet.agg.stats.grants
    fleet.run(5.0, lambda step: [])
    assert fleet.agg.stats.tokens_granted == granted
    assert fleet.agg.stats.grants == grants  # not even 0-token rows for it
    # the aggregator compacts every 100 ticks: by now it has forgotten the client
    assert fleet.agg.clients() == 0


# -- many clients: usage split into batches ------------------------------------------------------


def test_usage_of_more_than_batch_records_clients_goes_out_in_several_batches() -> None:
    """One partition's records are split into batches of at most wire.BATCH_RECORDS (a batch
    the decoder refuses would lose all of its usage): every batch decodes, and the aggregator
    applies them all and grants every client."""
    n = wire.BATCH_RECORDS + 1234
    clock = Clock()
    bus = InProcessBus({USAGE_TOPIC: 1, GRANTS_TOPIC: 1})  # every client on one partition
    limiter = RateLimiter(100, 1.0, mode="approximate", clock=clock)
    agent = Agent(limiter, bus, "big")
    agg = Aggregator(AggregatorConfig(Policy(100, 1.0), aggregator_id="agg"), bus, clock=clock)
    reader = bus.receiver(USAGE_TOPIC, group="test-reader")  # before anything is sent
    names = [f"c{i}" for i in range(n)]
    for name in names:
        assert limiter.check(name).allowed  # a cold-start token each: extra 1
    clock.t += REPORT
    agent.report_once()
    records = reader.poll(0, max_records=100)
    assert len(records) == agent.stats.batches_sent == 2
    batches = [wire.decode_usage(r.value) for r in records]
    assert [b.records.size for b in batches] == [wire.BATCH_RECORDS, 1234]
    assert [b.seq for b in batches] == [1, 2]  # each its own sequence number
    assert all(len(r.value) < 1 << 20 for r in records)
    keys = np.concatenate([b.records["key"] for b in batches])
    assert np.array_equal(np.sort(keys), np.sort([client_key(c) for c in names]))
    for b in batches:
        assert (b.records["extra"] == 1).all() and (b.records["admitted"] == 0).all()
    assert agent.stats.records_sent == n
    # the aggregator takes both (no duplicate, nothing malformed) and grants every client
    assert all(agg.handle(r) for r in records)
    assert agg.stats.records == n and agg.stats.malformed == 0 and agg.stats.duplicates == 0
    assert agg.clients() == n
    agg.tick()
    assert agent.receive_once(0) == 1
    assert agent.stats.grants_installed == n and agent.stats.grants_unknown == 0


# -- real threads --------------------------------------------------------------------------------


@pytest.mark.timeout(30)
def test_threads_smoke() -> None:
    """Agents' and the aggregator's own threads, real clocks, about two seconds."""
    limit, window, n = 60, 0.5, 3
    bus = InProcessBus()
    agg = Aggregator(AggregatorConfig(Policy(limit, window), tick=0.05), bus)
    stop = threading.Event()
    agg_thread = threading.Thread(target=agg.run, args=(stop,), daemon=True)
    agg_thread.start()
    limiters = [RateLimiter(limit, window, mode="approximate") for _ in range(n)]
    agents = [
        Agent(lim, bus, f"t{i}", report_interval=0.05).start() for i, lim in enumerate(limiters)
    ]
    admitted: list[float] = []
    try:
        end = time.time() + 2.0
        i = 0
        while time.time() < end:
            lim = limiters[i % n]
            if lim.check("alice").allowed:
                admitted.append(time.time())
            i += 1
            time.sleep(0.001)
    finally:
        for a in agents:
            a.stop(timeout=2.0)
        stop.set()
        agg_thread.join(5.0)
    assert not agg_thread.is_alive()
    allowance = max(1, math.floor(0.01 * limit))
    assert max_in_window(admitted, window) <= limit + n * allowance
    assert len(admitted) >= limit  # leases flowed
    assert agg.stats.errors == 0 and all(a.stats.errors == 0 for a in agents)
    assert sum(a.stats.grants_installed for a in agents) > 0


def test_window_helper() -> None:
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5], 1.0) == 3
    assert max_in_window([0.0, 0.5, 0.99, 1.0, 1.5], 1.0, after=0.6) == 0
