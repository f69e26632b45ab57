"""A discrete-event simulator of the approximate mode that runs the real code on a fake clock.

What is real: every server is a :class:`limiter.RateLimiter` in ``mode="approximate"`` (the lease
decision of :mod:`limiter.lease`) driven by the real :class:`producer.agent.Agent` (usage drains,
batching per partition, heartbeats, grant dedup, lease expiry conversion), and the aggregator is
the real :class:`aggregator.service.Aggregator` (server clock offsets, charging at the interval's
end, server timeouts, :class:`aggregator.partition.PartitionState` and
:func:`aggregator.allocate.water_fill`). Every message is encoded and decoded with
:mod:`producer.wire` by that code, as bytes.

What is simulated: the clock (one true time; each server and the aggregator may be skewed from
it), Kafka (a per-message delivery delay, lognormal with a median and a 99th percentile, capped,
FIFO per sender and partition as Kafka keeps order within a partition), the load balancer (each
request goes to the server the workload names, or to a random live one if that server is down),
how the default transport hands records over (the aggregator reads usage at its tick, agents
apply grants every 50 ms), and failures (the aggregator paused, or restarted with empty state;
a server crashed and maybe restarted). The loop: deliveries, allocation ticks, usage reports and
requests, in time order.

A protected backend can be simulated too (``SimConfig.backend``,
:mod:`aggregator.simbackend`: latency rising with load, incidents): every admitted request calls
it, each server's agent reports its health (:class:`producer.health.BackendMonitor`), and with
``SimConfig.control`` the aggregator runs the real :class:`aggregator.control.Controller`
(adaptive factors, breakers), whose control messages reach every server; requests are checked
against the server's breaker before the limiter (refused ones are ``BROKEN``).

For comparison, ``SimConfig.mode`` can also replace the whole approximate mode by local-mode
limiters (the real :class:`limiter.RateLimiter` with a local algorithm, no agents, no
aggregator): ``"local"``, every server enforcing ``L`` on its own (fully disconnected; with one
server, the plain local mode), or ``"static"``, every server enforcing ``max(1, ⌊L/N⌋)`` (a
permanent static split of the limit).

``Simulation(config, workload).run()`` returns a :class:`SimResult`: per client the most admitted
in any window against the limit, the utilisation of saturated clients, false rejections (refusals
while the client had fewer than its limit in the trailing window), the raw request log for time
series, and an exact token account (granted, installed, spent, released, held). See
docs/simulation.md.
"""

from __future__ import annotations

import heapq
import math
import time
from collections.abc import Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np

from limiter import ALGORITHMS, Policy, RateLimiter, Request
from limiter.keylimits import FixedKeyLimits, KeyLimits, ScaledKeyLimits
from limiter.keys import client_key
from limiter.lease import LeaseOptions
from limiter.ratelimiter import Usage
from producer import wire
from producer.agent import DEFAULT_HEALTH_INTERVAL, DEFAULT_HEARTBEAT_INTERVAL, Agent
from producer.health import BackendMonitor, BreakerGate
from producer.transport import MAX_POLL_RECORDS, USAGE_TOPIC, Record

from .control import Controller, ControlOptions
from .service import (
    DEFAULT_SERVER_TIMEOUT,
    DEFAULT_TTL_TICKS,
    MIN_DEFAULT_TTL,
    Aggregator,
    AggregatorConfig,
)
from .simbackend import Backend, BackendSpec

#: The simulation's true clock starts here (seconds); results are relative to it.
T0 = 1000.0
#: How often a ``wait`` cold start polls for its lease (``RateLimiter._wait_for_lease``).
WAIT_POLL = 0.005

#: Where an admission (or refusal) was decided: from a live lease, by the cold-start rule, by the
#: degraded share. ``LOST``: never decided (the server crashed while the request waited, or no
#: server was alive). ``LOCAL``: by a server's local algorithm (modes ``local`` and ``static``).
#: ``BROKEN``: refused by the server's circuit breaker before the limiter saw it.
LEASE, COLD, DEGRADED, LOST, LOCAL, BROKEN = 0, 1, 2, 3, 4, 5

#: ``SimConfig.mode``: the approximate mode (leases), every server a local limiter enforcing
#: ``L`` (fully disconnected), or every server enforcing ``max(1, ⌊L/N⌋)`` (a static split).
MODES = ("approximate", "local", "static")

# event kinds, in the order they run at the same instant
_USAGE, _GRANT, _AGG_DOWN, _AGG_UP, _FAIL, _RESTART, _TICK, _POLL, _REPORT, _WAKE = range(10)


# -- configuration ------------------------------------------------------------------------------


@dataclass(frozen=True)
class Delay:
    """Kafka delivery delay of one message: lognormal with ``median`` and 99th percentile
    ``p99`` (seconds), never above ``cap``. ``p99 == median`` is a constant delay."""

    median: float = 0.005
    p99: float = 0.05
    cap: float = 5.0

    def __post_init__(self) -> None:
        if not (0 <= self.median <= self.p99 and self.cap >= self.median):
            raise ValueError(f"need 0 <= median <= p99 and cap >= median, got {self}")

    @property
    def sigma(self) -> float:
        if self.median <= 0 or self.p99 <= self.median:
            return 0.0
        return math.log(self.p99 / self.median) / 2.3263478740408408

    def sample(self, rng: np.random.Generator, n: int) -> np.ndarray:
        if self.median <= 0:
            return np.zeros(n)
        out: np.ndarray = np.minimum(
            self.median * np.exp(self.sigma * rng.standard_normal(n)), self.cap
        )
        return out


@dataclass(frozen=True)
class AggregatorOutage:
    """The aggregator stops (no ticks, no usage read) from ``start`` to ``end`` (seconds after
    the start). Usage sent meanwhile waits in Kafka and is read at ``end``. ``restart``: a new
    aggregator takes over with empty state (a failover): it rebuilds its partitions from the
    topic's last window and waits out the old leases before it grants, as the real one does."""

    start: float
    end: float
    restart: bool = False


@dataclass(frozen=True)
class ServerFailure:
    """Server ``server`` crashes at ``start``: its leases and unreported usage are lost, its
    requests go to the other servers. At ``end`` (if given) it restarts with empty state."""

    server: int
    start: float
    end: float | None = None


@dataclass(frozen=True)
class SimConfig:
    """One simulated deployment. Times in seconds. ``None`` picks the production default, scaled
    where the default would be inconsistent with a long tick or report interval."""

    limit: int = 400
    window: float = 10.0
    servers: int = 4
    duration: float = 30.0
    #: agents' usage report interval, and the aggregator's allocation tick
    report_interval: float = 0.1
    tick: float = 0.1
    #: default ``max(DEFAULT_TTL_TICKS (10) ticks, MIN_DEFAULT_TTL (1 s))``, as the aggregator's
    lease_ttl: float | None = None
    #: default ``max(3 s, 1.5 ttl, 3 report or heartbeat intervals)`` (must exceed the ttl)
    server_timeout: float | None = None
    #: default ``max(1 s, 3 ticks)``: grant batches come once per tick
    degraded_after: float | None = None
    heartbeat_interval: float = DEFAULT_HEARTBEAT_INTERVAL
    #: delivery delay of usage batches and of grant batches
    delay: Delay = field(default_factory=Delay)
    grant_delay: Delay | None = None
    cold_start: str = "optimistic"
    cold_start_allowance: float = 0.01
    #: default: ``servers``
    expected_servers: int | None = None
    wait_timeout: float = 0.5
    usage_partitions: int = 1
    grant_partitions: int = 4
    #: How the default transport (confluent-kafka) hands records over: its ``consume()`` waits
    #: for its whole timeout unless 500 records come, so the aggregator reads the usage that
    #: arrived at each tick (``usage_at_tick``), and an agent applies the grants that arrived
    #: every ``grant_poll`` seconds (its receive loop's 50 ms). ``False`` / ``0``: on arrival
    #: (kafka-python, the in-process bus).
    usage_at_tick: bool = True
    grant_poll: float = 0.05
    #: each server's clock minus the true one (missing: 0), and the aggregator's
    skews: tuple[float, ...] = ()
    aggregator_skew: float = 0.0
    aggregator_outages: tuple[AggregatorOutage, ...] = ()
    server_failures: tuple[ServerFailure, ...] = ()
    seed: int = 0
    #: a client offering at least this many times its limit counts as saturated
    saturated: float = 1.5
    #: steady state starts this long after the start (default: one window)
    warmup: float | None = None
    #: clients whose tokens in live leases (summed over servers) are sampled at every tick
    track: tuple[int, ...] = ()
    #: ``approximate`` (the default: leases, agents, the aggregator); ``local``: every server a
    #: local-mode :class:`~limiter.RateLimiter` enforcing ``L`` on its own with
    #: ``local_algorithm`` (fully disconnected servers; with one server, the plain local mode);
    #: ``static``: the same, each enforcing ``max(1, ⌊L/N⌋)`` (a permanent static split). The
    #: local modes run no agent and no aggregator: reports, ticks, grants and aggregator outages
    #: do not happen; server failures do (a restarted server starts empty).
    mode: str = "approximate"
    local_algorithm: str = "sliding_log"
    #: a protected backend every admitted request calls (none: no calls, no health reports)
    backend: BackendSpec | None = None
    #: the aggregator's adaptive limits and breakers (none: no controller)
    control: ControlOptions | None = None
    #: seconds between the agents' health reports (with a backend)
    health_interval: float = DEFAULT_HEALTH_INTERVAL

    def __post_init__(self) -> None:
        if self.servers < 1 or self.limit < 1 or self.window <= 0 or self.duration <= 0:
            raise ValueError("need servers >= 1, limit >= 1, window > 0, duration > 0")
        if self.mode not in MODES:
            raise ValueError(f"unknown mode {self.mode!r}: one of {', '.join(MODES)}")
        if self.local_algorithm not in ALGORITHMS:
            raise ValueError(f"unknown local_algorithm {self.local_algorithm!r}")
        if self.report_interval <= 0 or self.tick <= 0:
            raise ValueError("report_interval and tick must be > 0")
        for f in self.server_failures:
            if not 0 <= f.server < self.servers:
                raise ValueError(f"no server {f.server}")

    @property
    def ttl(self) -> float:
        """``lease_ttl``, else the aggregator's default: ``max(10 ticks, 1 s)``."""
        if self.lease_ttl is not None:
            return self.lease_ttl
        return max(DEFAULT_TTL_TICKS * self.tick, MIN_DEFAULT_TTL)

    @property
    def timeout(self) -> float:
        if self.server_timeout is not None:
            return self.server_timeout
        slowest = max(self.report_interval, self.heartbeat_interval)
        return max(DEFAULT_SERVER_TIMEOUT, 1.5 * self.ttl, 3 * slowest)

    @property
    def degraded(self) -> float:
        if self.degraded_after is not None:
            return self.degraded_after
        return max(1.0, 3 * self.tick)

    @property
    def allowance(self) -> int:
        """``a``: cold-start tokens per window per server (0 unless optimistic)."""
        if self.cold_start != "optimistic":
            return 0
        return max(1, math.floor(self.cold_start_allowance * self.limit))

    def lease_options(self) -> LeaseOptions:
        return LeaseOptions(
            cold_start=self.cold_start,
            cold_start_allowance=self.cold_start_allowance,
            expected_servers=self.expected_servers or self.servers,
            degraded_after=self.degraded,
            wait_timeout=self.wait_timeout,
        )

    def aggregator_config(self, name: str) -> AggregatorConfig:
        return AggregatorConfig(
            Policy(self.limit, self.window),
            tick=self.tick,
            lease_ttl=self.ttl,
            server_timeout=self.timeout,
            aggregator_id=name,
        )

    @property
    def local(self) -> bool:
        """Servers decide with local-mode limiters (modes ``local`` and ``static``)."""
        return self.mode != "approximate"

    @property
    def server_limit(self) -> int:
        """What each server enforces on its own in the local modes: ``L`` (``local``) or
        ``max(1, ⌊L/N⌋)`` (``static``; the shares sum to at most ``L`` while ``N ≤ L``)."""
        if self.mode == "static":
            return max(1, self.limit // self.servers)
        return self.limit

    def bound(self) -> int:
        """docs/consistency.md, healthy: ``L + N·a`` (``L`` for ``wait`` and ``reject``). In the
        local modes, ``N`` times what one server can admit in a window (docs/algorithms.md):
        its limit with the sliding log, twice it with the others (``B + L`` with the default
        burst ``B = L``, ``2L`` for the window counters)."""
        if self.local:
            per_server = self.server_limit * (1 if self.local_algorithm == "sliding_log" else 2)
            return self.servers * per_server
        return self.limit + self.servers * self.allowance

    def lag(self) -> float:
        """docs/consistency.md's accounting lag of a token, term by term: the wait for its
        report (half a report interval) and its charge at the interval's end (another half),
        the wait for the next tick (half a tick), the usage and grant deliveries (medians, plus
        half the agent's grant poll), and the wait of a granted token at its server (for a
        saturated client, about half a tick: a tick's tokens are spent before the next come).
        It leaves out tokens stranded at servers where the client's next requests do not land
        (they come back when the lease expires), which grows with the number of servers."""
        grants = (self.grant_delay or self.delay).median + self.grant_poll / 2
        return self.report_interval + self.tick + self.delay.median + grants

    def predicted_utilisation(self) -> float:
        """``W / (W + lag)``: the share of ``L`` a saturated client gets (docs/consistency.md);
        nan in the local modes, where it depends on how the client's requests spread."""
        if self.local:
            return math.nan
        return self.window / (self.window + self.lag())


# -- workloads ----------------------------------------------------------------------------------


@dataclass(frozen=True)
class Workload:
    """Requests: ``times`` (seconds after the start, sorted), ``clients`` (0..n-1) and the
    ``servers`` the load balancer sends them to; ``labels`` names each client's kind."""

    times: np.ndarray
    clients: np.ndarray
    servers: np.ndarray
    labels: tuple[str, ...]

    @property
    def n_clients(self) -> int:
        return len(self.labels)

    def __len__(self) -> int:
        return int(self.times.size)

    def __add__(self, other: Workload) -> Workload:
        """Both workloads at once; ``other``'s clients are numbered after this one's."""
        times = np.concatenate((self.times, other.times))
        order = np.argsort(times, kind="stable")
        return Workload(
            times[order],
            np.concatenate((self.clients, other.clients + self.n_clients))[order],
            np.concatenate((self.servers, other.servers))[order],
            self.labels + other.labels,
        )

    def offered_rate(self, duration: float) -> np.ndarray:
        """Requests per second offered by each client."""
        return np.bincount(self.clients, minlength=self.n_clients) / duration

    @staticmethod
    def from_schedule(per_server: Sequence[tuple[np.ndarray, np.ndarray]]) -> Workload:
        """The cluster harness's format: ``[(times, clients)]`` per server."""
        times = np.concatenate([np.asarray(t, dtype=np.float64) for t, _ in per_server])
        clients = np.concatenate([np.asarray(c, dtype=np.int64) for _, c in per_server])
        servers = np.concatenate(
            [np.full(len(t), s, dtype=np.int64) for s, (t, _) in enumerate(per_server)]
        )
        order = np.argsort(times, kind="stable")
        n = int(clients.max()) + 1 if clients.size else 0
        return Workload(times[order], clients[order], servers[order], ("schedule",) * n)


#: Where the load balancer sends a workload's requests: ``random`` (any server), ``sticky``
#: (client mod N), ``spray`` (round robin over every server, per client), a server index, or a
#: tuple of server indices (at random among those: a client whose traffic lands on a few servers).
Routing = str | int | tuple[int, ...]


def _route(
    rng: np.random.Generator, clients: np.ndarray, servers: int, routing: Routing
) -> np.ndarray:
    if isinstance(routing, int):
        return np.full(clients.size, routing, dtype=np.int64)
    if isinstance(routing, tuple):
        if not routing or min(routing) < 0 or max(routing) >= servers:
            raise ValueError(f"routing {routing!r} names no server or one out of 0..{servers - 1}")
        chosen: np.ndarray = np.asarray(routing, dtype=np.int64)[
            rng.integers(0, len(routing), clients.size)
        ]
        return chosen
    if routing == "random":
        return rng.integers(0, servers, clients.size)
    if routing == "sticky":
        return clients % servers
    if routing == "spray":  # round robin over every server, per client
        out = np.empty(clients.size, dtype=np.int64)
        for c in np.unique(clients):
            idx = np.flatnonzero(clients == c)
            out[idx] = np.arange(idx.size) % servers
        return out
    raise ValueError(
        f"unknown routing {routing!r}: random, sticky, spray, a server index or a tuple of them"
    )


def poisson(
    rates: Sequence[float] | np.ndarray,
    duration: float,
    servers: int,
    *,
    seed: int = 0,
    routing: Routing = "random",
    label: str = "poisson",
    start: float = 0.0,
) -> Workload:
    """Poisson arrivals at ``rates[c]`` requests per second for each client c, from ``start``."""
    rng = np.random.default_rng(seed)
    rates = np.asarray(rates, dtype=np.float64)
    counts = rng.poisson(rates * max(0.0, duration - start))
    clients = np.repeat(np.arange(rates.size), counts)
    times = rng.uniform(start, duration, clients.size)
    order = np.argsort(times, kind="stable")
    times, clients = times[order], clients[order]
    return Workload(times, clients, _route(rng, clients, servers, routing), (label,) * rates.size)


def uniform(
    clients: int, load: float, limit: int, window: float, duration: float, servers: int, **kw: Any
) -> Workload:
    """``clients`` clients each offering ``load`` times its limit."""
    kw.setdefault("label", "uniform")
    return poisson(np.full(clients, load * limit / window), duration, servers, **kw)


def zipf(
    clients: int,
    top: float,
    limit: int,
    window: float,
    duration: float,
    servers: int,
    s: float = 1.0,
    **kw: Any,
) -> Workload:
    """Client i offers ``top / (i + 1) ** s`` times its limit."""
    kw.setdefault("label", "zipf")
    mult = top / np.arange(1, clients + 1, dtype=np.float64) ** s
    return poisson(mult * limit / window, duration, servers, **kw)


def hot_and_tail(clients: int = 200) -> np.ndarray:
    """tests/cluster's offered load per client, in multiples of the limit: five hot clients at
    5x..2x, then a Zipf tail ``1.5 * 5 / i``."""
    hot = np.array([5.0, 4.0, 3.0, 2.5, 2.0])
    i = np.arange(hot.size, clients, dtype=np.float64)
    return np.concatenate((hot, 1.5 * hot.size / i))[:clients]


def bursty(
    clients: int,
    load: float,
    limit: int,
    window: float,
    duration: float,
    servers: int,
    *,
    on: float = 2.0,
    off: float = 8.0,
    seed: int = 0,
    routing: Routing = "random",
    label: str = "bursty",
) -> Workload:
    """On/off clients: ``load`` times the limit while on; on and off periods exponential with
    means ``on`` and ``off`` seconds, each client starting at a random phase."""
    rng = np.random.default_rng(seed)
    rate = load * limit / window
    times, ids = [], []
    for c in range(clients):
        t = -rng.exponential(on + off) * rng.uniform()  # a random phase
        is_on = bool(rng.uniform() < on / (on + off))
        while t < duration:
            length = rng.exponential(on if is_on else off)
            if is_on:
                lo, hi = max(0.0, t), min(duration, t + length)
                if hi > lo:
                    n = rng.poisson(rate * (hi - lo))
                    times.append(rng.uniform(lo, hi, n))
                    ids.append(np.full(n, c, dtype=np.int64))
            t += length
            is_on = not is_on
    tt = np.concatenate(times) if times else np.zeros(0)
    cc = np.concatenate(ids) if ids else np.zeros(0, dtype=np.int64)
    order = np.argsort(tt, kind="stable")
    tt, cc = tt[order], cc[order]
    return Workload(tt, cc, _route(rng, cc, servers, routing), (label,) * clients)


def spray(
    load: float, limit: int, window: float, duration: float, servers: int, **kw: Any
) -> Workload:
    """One client at ``load`` times its limit, round robin over every server (each server sees
    it cold: the ``N·a`` worst case of the optimistic cold start)."""
    kw.setdefault("label", "spray")
    kw.setdefault("routing", "spray")
    return poisson([load * limit / window], duration, servers, **kw)


def shift(
    load: float,
    limit: int,
    window: float,
    duration: float,
    servers: int,
    *,
    at: float,
    src: int = 0,
    dst: int = 1,
    seed: int = 0,
    label: str = "shift",
) -> Workload:
    """One client at ``load`` times its limit on server ``src``, moving to ``dst`` at ``at``."""
    w = poisson([load * limit / window], duration, servers, seed=seed, routing=src, label=label)
    moved = np.where(w.times >= at, dst, src).astype(np.int64)
    return replace(w, servers=moved)


# -- the simulated transport --------------------------------------------------------------------


class _Parked(Exception):
    """Raised by a limiter's ``sleep``: a ``wait`` cold start is parked, not blocked."""


def _no_sleep(seconds: float) -> None:
    raise _Parked


class _Inbox:
    """A :class:`producer.transport.Receiver` the simulator fills."""

    def __init__(self) -> None:
        self.records: list[Record] = []

    def poll(self, timeout: float, max_records: int = MAX_POLL_RECORDS) -> list[Record]:
        out, self.records = self.records[:max_records], self.records[max_records:]
        return out

    def assignment(self) -> list[int]:
        return []

    def commit(self) -> None:
        pass

    def close(self) -> None:
        pass


class _Endpoint:
    """One process's view of Kafka (its :class:`~producer.transport.Transport` and sender)."""

    def __init__(self, sim: Simulation, name: str) -> None:
        self.sim = sim
        self.name = name
        self.inbox = _Inbox()

    def sender(self) -> _Endpoint:
        return self

    def receiver(
        self,
        topic: str,
        *,
        partitions: Sequence[int] | None = None,
        group: str | None = None,
        on_assign: Any = None,
        on_revoke: Any = None,
        rewind: Any = None,
    ) -> _Inbox:
        if on_assign is not None:
            on_assign(list(range(self.partitions(topic))))
        return self.inbox

    def partitions(self, topic: str) -> int:
        c = self.sim.config
        return c.usage_partitions if topic == USAGE_TOPIC else c.grant_partitions

    def send(self, topic: str, partition: int, value: bytes) -> None:
        self.sim._send(self, topic, partition, value)

    def service(self) -> None:
        pass

    def flush(self, timeout: float) -> int:
        return 0

    def close(self) -> None:
        pass

    @property
    def errors(self) -> int:
        return 0

    @property
    def queued(self) -> int:
        return 0


@dataclass
class Accounts:
    """Tokens per client over the whole run (all servers, all incarnations).

    ``granted``: in grant batches the aggregator sent; of those, ``delivered`` to an agent,
    ``dropped`` on the way (addressed to a crashed server or to an earlier incarnation), or
    ``in_flight`` at the end; ``installed``: put into leases by a server (the rest of
    ``delivered`` the agent refused: late batch, client not known); ``admitted`` (from leases),
    ``extra`` (outside leases), ``rejected`` and ``released``: as drained from the limiters
    (the agents' reports plus a final drain); ``held``: in live leases at the end.

    Conservation, exactly: ``granted = delivered + dropped + in_flight``,
    ``installed <= delivered`` and ``installed = admitted + released + held``.
    """

    granted: np.ndarray
    delivered: np.ndarray
    dropped: np.ndarray
    in_flight: np.ndarray
    installed: np.ndarray
    admitted: np.ndarray
    extra: np.ndarray
    rejected: np.ndarray
    released: np.ndarray
    held: np.ndarray

    @staticmethod
    def zeros(n: int) -> Accounts:
        return Accounts(*(np.zeros(n) for _ in range(10)))


class _KeyMap:
    """Stable client key -> client index (and name)."""

    def __init__(self, names: Sequence[str]) -> None:
        self.names = list(names)
        keys = np.array([client_key(n) for n in names], dtype=np.uint64)
        self.order = np.argsort(keys)
        self.sorted = keys[self.order]

    def __call__(self, keys: np.ndarray) -> np.ndarray:
        keys = np.asarray(keys, dtype=np.uint64)
        pos = np.minimum(np.searchsorted(self.sorted, keys), max(0, self.sorted.size - 1))
        if keys.size and not (self.sorted[pos] == keys).all():
            raise AssertionError("a key that belongs to no simulated client")
        out: np.ndarray = self.order[pos]
        return out


class _Metered(RateLimiter):
    """The real limiter; its drains and grant installs are also tallied in :class:`Accounts`.

    Which grants of a batch were installed: all of them when ``apply_grants`` says so; else
    those whose client holds a live lease afterwards (the agent passes on only grants that
    expire in the future, and a client can only hold a lease that ``apply_grants`` can find
    again). The count must agree with what ``apply_grants`` returned, or the run fails."""

    __slots__ = ("_accounts", "_keymap")

    def __init__(self, accounts: Accounts, keymap: _KeyMap, *args: Any, **kw: Any) -> None:
        super().__init__(*args, **kw)
        self._accounts = accounts
        self._keymap = keymap

    def drain_usage(self) -> Usage:
        usage = super().drain_usage()
        if len(usage):
            a, idx = self._accounts, self._keymap(usage.keys)
            np.add.at(a.admitted, idx, usage.admitted)
            np.add.at(a.extra, idx, usage.extra)
            np.add.at(a.rejected, idx, usage.rejected)
            np.add.at(a.released, idx, usage.released)
        return usage

    def apply_grants(
        self,
        keys: np.ndarray,
        tokens: np.ndarray,
        expiry: float,
        *,
        unclaimed: list[int] | None = None,
    ) -> int:
        missed: list[int] = []
        installed = super().apply_grants(keys, tokens, expiry, unclaimed=missed)
        if unclaimed is not None:
            unclaimed.extend(missed)
        live = np.ones(keys.size, dtype=bool)
        live[missed] = False
        if int(live.sum()) != installed:
            raise AssertionError(f"apply_grants installed {installed}, {int(live.sum())} claimed")
        idx = self._keymap(keys)
        np.add.at(self._accounts.installed, idx[live], tokens[live].astype(np.float64))
        return installed


#: a grant batch's (client indices, tokens)
_Grants = tuple[np.ndarray, np.ndarray]


@dataclass
class _Server:
    index: int
    name: str
    #: a :class:`_Metered` approximate-mode limiter, or a local-mode one (modes local, static)
    limiter: RateLimiter
    #: None in the local modes
    agent: Agent | None
    endpoint: _Endpoint
    started: float
    alive: bool = True
    parked: dict[int, float] = field(default_factory=dict)  # request -> lease-ready poll time
    pending: list[_Grants] = field(default_factory=list)  # delivered, not yet polled
    #: the server's breaker of the simulated backend (with breakers configured)
    gate: BreakerGate | None = None


# -- results ------------------------------------------------------------------------------------


def _windows(x: np.ndarray, window: float) -> np.ndarray:
    """For sorted times ``x``: admissions in ``[x[i], x[i] + window)`` for each i."""
    counts: np.ndarray = np.searchsorted(x, x + window, side="left") - np.arange(x.size)
    return counts


def worst_windows(times: np.ndarray, groups: np.ndarray, n: int, window: float) -> np.ndarray:
    """Most events in any half-open interval ``[t, t + window)``, per group (0..n-1)."""
    out = np.zeros(n, dtype=np.int64)
    if times.size == 0:
        return out
    span = float(times.max() - times.min()) + 2 * window + 1.0
    x = groups.astype(np.float64) * span + (times - times.min())
    order = np.argsort(x, kind="stable")
    np.maximum.at(out, groups[order], _windows(x[order], window))
    return out


def misjudged(
    times: np.ndarray,
    clients: np.ndarray,
    admitted: np.ndarray,
    limit: int,
    window: float,
    n: int,
    judged: np.ndarray | None = None,
) -> tuple[np.ndarray, np.ndarray]:
    """Per client (0..n-1), the decisions an exact sliding log would have made otherwise, given
    what was admitted before each one: ``(wrongly_allowed, wrongly_limited)``, the admissions
    while the client already had ``limit`` admissions in ``(t - window, t]``, and the refusals
    while it had fewer. Requests at the same time count in the order given; only the ``judged``
    ones (default: all) are classified, but every admission counts as history. A sliding log's
    own decisions are never misjudged (up to float rounding at exactly ``window`` apart)."""
    allowed = np.zeros(n, dtype=np.int64)
    limited = np.zeros(n, dtype=np.int64)
    if times.size == 0:
        return allowed, limited
    judged = np.ones(times.size, dtype=bool) if judged is None else judged
    order = np.lexsort((np.arange(times.size), times, clients))
    c, t, a, j = clients[order], times[order], admitted[order], judged[order]
    edges = np.flatnonzero(np.diff(c)) + 1
    for lo, hi in zip(np.r_[0, edges], np.r_[edges, c.size], strict=True):
        tt, aa, jj = t[lo:hi], a[lo:hi], j[lo:hi]
        before = np.cumsum(aa) - aa  # admissions earlier in the order
        stamps = tt[aa]
        inside = before - np.searchsorted(stamps, tt - window, side="right")
        full = inside >= limit
        allowed[c[lo]] = int((aa & jj & full).sum())
        limited[c[lo]] = int((~aa & jj & ~full).sum())
    return allowed, limited


@dataclass
class SimResult:
    """One run. Per-client arrays are indexed by client; the request log by request."""

    config: SimConfig
    labels: tuple[str, ...]
    #: the request log: arrival, client, the server that decided it (-1: none alive),
    #: admitted, where it was decided (LEASE, COLD, DEGRADED, LOST), when it was decided
    times: np.ndarray
    clients: np.ndarray
    servers: np.ndarray
    admitted: np.ndarray
    source: np.ndarray
    decided: np.ndarray
    #: per client
    offered: np.ndarray
    worst: np.ndarray
    per_window: np.ndarray
    false_rejections: np.ndarray
    accounts: Accounts
    #: wall-clock seconds the run took, and counts of what happened
    seconds: float
    stats: dict[str, float]
    #: with ``config.track``: sample times, and tokens in live leases ``[sample, tracked]``
    held_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    held: np.ndarray = field(default_factory=lambda: np.zeros((0, 0)))
    #: with ``config.backend``, per request: the backend call's latency (NaN: not called) and
    #: whether it succeeded
    latency: np.ndarray = field(default_factory=lambda: np.zeros(0))
    call_ok: np.ndarray = field(default_factory=lambda: np.zeros(0, dtype=bool))
    #: with ``config.control``, at every tick: the aggregator's factor per scope and breaker
    #: state per backend (0 closed, 1 open, 2 half-open)
    control_t: np.ndarray = field(default_factory=lambda: np.zeros(0))
    factors: dict[str, np.ndarray] = field(default_factory=dict)
    breakers: dict[str, np.ndarray] = field(default_factory=dict)

    @property
    def limit(self) -> int:
        return self.config.limit

    @property
    def saturated(self) -> np.ndarray:
        """Clients offering at least ``config.saturated`` times their limit."""
        c = self.config
        rate = self.offered / c.duration * c.window
        mask: np.ndarray = rate >= c.saturated * c.limit
        return mask

    @property
    def worst_over(self) -> int:
        """Most admitted in any window, over all clients, minus the limit (may be < 0)."""
        return int(self.worst.max(initial=0)) - self.limit

    @property
    def utilisation(self) -> float:
        """Mean admitted per window (steady state) / L over the saturated clients (nan if
        none)."""
        sat = self.saturated
        return float(self.per_window[sat].mean() / self.limit) if sat.any() else math.nan

    @property
    def false_rejection_rate(self) -> float:
        """False rejections per request offered."""
        return float(self.false_rejections.sum() / max(1, self.times.size))

    @property
    def light(self) -> np.ndarray:
        """Clients offering less than their limit (on average over the run)."""
        c = self.config
        mask: np.ndarray = self.offered / c.duration * c.window < c.limit
        return mask

    @property
    def light_false_rejection_rate(self) -> float:
        """False rejections per request offered, among the clients offering less than their
        limit: the harm done to clients the limiter should leave alone."""
        light = self.light
        return float(self.false_rejections[light].sum() / max(1, self.offered[light].sum()))

    def misjudged(self) -> tuple[np.ndarray, np.ndarray]:
        """Per client ``(wrongly_allowed, wrongly_limited)`` against the exact sliding log, given
        what was admitted before each decision (:func:`misjudged`; requests never decided,
        ``LOST``, are not judged). ``wrongly_limited`` is ``false_rejections`` but for ties."""
        return misjudged(
            self.decided,
            self.clients,
            self.admitted,
            self.limit,
            self.config.window,
            self.offered.size,
            ~np.isin(self.source, (LOST, BROKEN)),
        )

    def summary(self) -> dict[str, float]:
        c = self.config
        return {
            "servers": c.servers,
            "report_interval": c.report_interval,
            "tick": c.tick,
            "requests": int(self.times.size),
            "admitted": int(self.admitted.sum()),
            "worst_window": int(self.worst.max(initial=0)),
            "worst_over": self.worst_over,
            "bound": c.bound(),
            "utilisation": self.utilisation,
            "predicted_utilisation": c.predicted_utilisation(),
            "false_rejections": int(self.false_rejections.sum()),
            "false_rejection_rate": self.false_rejection_rate,
            "light_false_rejection_rate": self.light_false_rejection_rate,
            "seconds": self.seconds,
        }

    def admissions(self, client: int | None = None) -> np.ndarray:
        """Decision times (seconds after the start) of the admitted requests (of ``client``)."""
        mask = self.admitted if client is None else self.admitted & (self.clients == client)
        out: np.ndarray = np.sort(self.decided[mask])
        return out

    def series(
        self, client: int, step: float = 0.1, server: int | None = None, source: int | None = None
    ) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """``(t, in_window, offered)``: at each step t, the client's admissions in
        ``(t - W, t]`` (optionally only those decided by ``server`` / from ``source``) and its
        requests offered in ``(t - W, t]``."""
        c = self.config
        t = np.arange(0.0, c.duration + step / 2, step)
        mask = self.admitted & (self.clients == client)
        if server is not None:
            mask &= self.servers == server
        if source is not None:
            mask &= self.source == source
        adm = np.sort(self.decided[mask])
        off = np.sort(self.times[self.clients == client])

        def trailing(x: np.ndarray) -> np.ndarray:
            counts: np.ndarray = np.searchsorted(x, t, side="right") - np.searchsorted(
                x, t - c.window, side="right"
            )
            return counts

        return t, trailing(adm), trailing(off)

    def worst_by_server(self, source: int | None = None) -> np.ndarray:
        """``[client, server]``: most admitted in any window by one server (from ``source``)."""
        c = self.config
        mask = self.admitted & (self.servers >= 0)
        if source is not None:
            mask &= self.source == source
        pair = self.clients[mask] * c.servers + self.servers[mask]
        n = self.offered.size * c.servers
        return worst_windows(self.decided[mask], pair, n, c.window).reshape(-1, c.servers)

    def conservation_error(self) -> float:
        """Largest error over clients of ``granted = delivered + dropped + in_flight`` and
        ``installed = admitted + released + held`` (0 when exact)."""
        a = self.accounts
        sent = np.abs(a.granted - a.delivered - a.dropped - a.in_flight)
        spent = np.abs(a.installed - a.admitted - a.released - a.held)
        return float(np.maximum(sent, spent).max(initial=0.0))


# -- the simulator ------------------------------------------------------------------------------


class Simulation:
    """Run :class:`SimConfig` on a :class:`Workload`: ``Simulation(config, workload).run()``."""

    def __init__(self, config: SimConfig, workload: Workload) -> None:
        if workload.times.size and (
            workload.servers.min() < 0 or workload.servers.max() >= config.servers
        ):
            raise ValueError("the workload names servers the config does not have")
        self.config = config
        self.workload = workload
        self.t = T0
        self._rng = np.random.default_rng(config.seed)
        self._delays: dict[int, tuple[np.ndarray, int]] = {}
        self._heap: list[tuple[float, int, int, int, Any]] = []
        self._seq = 0
        self._fifo: dict[tuple[str, object], float] = {}
        self._offsets = 0
        self.names = [f"client-{c}" for c in range(workload.n_clients)]
        self._keymap = _KeyMap(self.names)
        self.accounts = Accounts.zeros(workload.n_clients)
        self._server_of = {f"server-{s}": s for s in range(config.servers)}
        self._skew = [
            config.skews[s] if s < len(config.skews) else 0.0 for s in range(config.servers)
        ]
        self.servers: list[_Server] = []
        self._retired: list[_Server] = []
        self._old_aggregators: list[Aggregator] = []
        for s in range(config.servers):
            self.servers.append(self._start_server(s))
        self._aggregators = 0
        self.aggregator = self._start_aggregator()
        self._agg_up = True
        self._backlog: list[Record] = []
        #: usage records the aggregators have read: the topic's history a new one replays
        self._consumed: list[Record] = []
        self._held_t: list[float] = []
        self._held: list[list[float]] = []
        n = len(workload)
        self._admitted = np.zeros(n, dtype=bool)
        self._source = np.full(n, LOST, dtype=np.int8)
        self._decided = np.array(workload.times, dtype=np.float64)
        self._decided_by = np.full(n, -1, dtype=np.int64)
        self.backend = None if config.backend is None else Backend(config.backend, config.seed)
        self._latency = np.full(n if config.backend is not None else 0, np.nan)
        self._call_ok = np.ones(n if config.backend is not None else 0, dtype=bool)
        self._control_t: list[float] = []
        self._factors: dict[str, list[float]] = {}
        self._breakers: dict[str, list[int]] = {}
        self.stats: dict[str, float] = {
            "usage_batches": 0,
            "grant_batches": 0,
            "grant_batches_dropped": 0,
            "bytes": 0,
            "rerouted": 0,
            "parked": 0,
            "broken": 0,
        }

    # -- processes -----------------------------------------------------------------------------

    def _clock(self, skew: float) -> Any:
        return lambda: self.t + skew

    def _start_server(self, s: int) -> _Server:
        c = self.config
        name = f"server-{s}"
        if c.local:
            local = RateLimiter(
                c.server_limit,
                c.window,
                algorithm=c.local_algorithm,
                clock=self._clock(self._skew[s]),
                shards=1,
            )
            return _Server(s, name, local, None, _Endpoint(self, name), self.t)
        limits = None
        if c.control is not None:
            limits = ScaledKeyLimits(FixedKeyLimits(KeyLimits.uniform(c.limit)))
        limiter = _Metered(
            self.accounts,
            self._keymap,
            c.limit,
            c.window,
            mode="approximate",
            lease_options=c.lease_options(),
            clock=self._clock(self._skew[s]),
            sleep=_no_sleep,
            shards=1,
            limits=limits,
        )
        endpoint = _Endpoint(self, name)
        monitor = None if c.backend is None else BackendMonitor()
        agent = Agent(
            limiter,
            endpoint,
            name,
            report_interval=c.report_interval,
            heartbeat_interval=c.heartbeat_interval,
            monitor=monitor,
            health_interval=c.health_interval,
        )
        server = _Server(s, name, limiter, agent, endpoint, self.t)
        if c.backend is not None and c.control is not None and c.control.breakers:
            server.gate = agent.breaker(c.backend.name)
        return server

    def _start_aggregator(self) -> Aggregator:
        name = f"agg-{self._aggregators}"
        self._aggregators += 1
        skew = self.config.aggregator_skew
        self._agg_endpoint = _Endpoint(self, name)
        # records are stamped with the true time (the broker's append time)
        control = self.config.control
        return Aggregator(
            self.config.aggregator_config(name),
            self._agg_endpoint,
            clock=self._clock(skew),
            wall=lambda: self.t,
            control=None if control is None else Controller(control, name),
        )

    # -- Kafka ---------------------------------------------------------------------------------

    def _delay(self, kind: int) -> float:
        c = self.config
        d = c.delay if kind == _USAGE else (c.grant_delay or c.delay)
        buf, i = self._delays.get(kind, (np.zeros(0), 0))
        if i >= buf.size:
            buf, i = d.sample(self._rng, 4096), 0
        self._delays[kind] = (buf, i + 1)
        return float(buf[i])

    def _push(self, at: float, kind: int, arg: Any) -> None:
        self._seq += 1
        heapq.heappush(self._heap, (at, kind, self._seq, kind, arg))

    def _deliver_at(self, channel: tuple[str, object], kind: int) -> float:
        at = max(self.t + self._delay(kind), self._fifo.get(channel, -math.inf))
        self._fifo[channel] = at
        return at

    def _send(self, src: _Endpoint, topic: str, partition: int, value: bytes) -> None:
        self._offsets += 1
        record = Record(topic, partition, self._offsets, self.t, value)
        self.stats["bytes"] += len(value)
        if topic == USAGE_TOPIC:
            self._push(self._deliver_at((src.name, partition), _USAGE), _USAGE, record)
            return
        if wire.message_type(value) == wire.CONTROL_TYPE:  # every server reads it
            nothing = (np.zeros(0, dtype=np.int64), np.zeros(0))
            for dest in range(len(self.servers)):
                at = self._deliver_at((src.name, dest), _GRANT)
                self._push(at, _GRANT, (dest, self.t, record, nothing))
            return
        batch = wire.decode_grants(value)
        grants = (self._keymap(batch.records["key"]), batch.records["tokens"].astype(np.float64))
        np.add.at(self.accounts.granted, *grants)
        dest = self._server_of[batch.server_id]
        at = self._deliver_at((src.name, dest), _GRANT)
        self._push(at, _GRANT, (dest, self.t, record, grants))

    # -- events --------------------------------------------------------------------------------

    def _on_usage(self, record: Record) -> None:
        self.stats["usage_batches"] += 1
        if self._agg_up and not self.config.usage_at_tick:
            self._consumed.append(record)
            self.aggregator.handle(record)
        else:
            self._backlog.append(record)

    def _read_backlog(self) -> None:
        backlog, self._backlog = self._backlog, []
        self._consumed.extend(backlog)
        for record in backlog:
            self.aggregator.handle(record)

    def _on_grant(self, dest: int, sent: float, record: Record, grants: _Grants) -> None:
        server = self.servers[dest]
        if not server.alive or sent < server.started:
            self.stats["grant_batches_dropped"] += 1
            np.add.at(self.accounts.dropped, *grants)
            return
        self.stats["grant_batches"] += 1
        server.endpoint.inbox.records.append(record)
        server.pending.append(grants)
        if self.config.grant_poll <= 0:
            self._on_poll(server)

    def _on_poll(self, server: _Server) -> None:
        if not server.alive or not server.endpoint.inbox.records or server.agent is None:
            return
        for grants in server.pending:
            np.add.at(self.accounts.delivered, *grants)
        server.pending.clear()
        server.agent.receive_once(0)
        if server.parked:
            self._check_parked(server)

    def _check_parked(self, server: _Server) -> None:
        """Wake the parked ``wait`` requests whose client now holds a lease, at the limiter's
        next poll (every WAIT_POLL seconds from the request)."""
        lim = server.limiter
        for i, ready in list(server.parked.items()):
            if ready < math.inf:
                continue
            if lim.lease_info(self.names[self.workload.clients[i]]) is not None:
                arrival = T0 + float(self.workload.times[i])
                polls = math.ceil((self.t - arrival) / WAIT_POLL - 1e-9)
                at = min(arrival + polls * WAIT_POLL, arrival + self.config.wait_timeout)
                server.parked[i] = at
                self._push(max(at, self.t), _WAKE, (server.index, server.started, i))

    def _on_wake(self, s: int, started: float, i: int) -> None:
        server = self.servers[s]
        if server.started != started or i not in server.parked:
            return  # restarted meanwhile, or already decided
        del server.parked[i]
        self._decide(server, i, final=True)

    def _on_fail(self, s: int) -> None:
        server = self.servers[s]
        if not server.alive:
            return
        server.alive = False
        for grants in server.pending:
            np.add.at(self.accounts.dropped, *grants)
        server.pending.clear()
        for i in server.parked:
            self._source[i] = LOST
            self._decided[i] = self.t - T0
        server.parked.clear()

    def _on_restart(self, s: int) -> None:
        old = self.servers[s]
        if old.alive:
            return
        self._retired.append(old)
        self.servers[s] = self._start_server(s)

    def _on_tick(self) -> None:
        if self._agg_up:
            self._read_backlog()
            self.aggregator.tick()
        control = self.aggregator.control
        if control is not None:
            self._control_t.append(self.t - T0)
            for scope, f in control.factors().items():
                self._factors.setdefault(scope, []).append(f)
            states = control.breakers()
            for name in {b.backend for b in control.options.breakers if b.backend != "*"}:
                states.setdefault(name, "closed")
            for name, state in states.items():
                code = ("closed", "open", "half_open").index(state)
                self._breakers.setdefault(name, []).append(code)
        if self.config.track:
            names = [self.names[c] for c in self.config.track]
            live = [s.limiter for s in self.servers if s.alive]
            self._held_t.append(self.t - T0)
            self._held.append(
                [sum((lim.lease_info(n) or (0.0, 0.0))[0] for lim in live) for n in names]
            )

    # -- requests ------------------------------------------------------------------------------

    def _pick(self, i: int, s: int) -> _Server | None:
        server = self.servers[s]
        if server.alive:
            return server
        live = [x for x in self.servers if x.alive]
        if not live:
            return None
        self.stats["rerouted"] += 1
        return live[(i * 2654435761) % len(live)]

    def _call_backend(self, i: int, server: _Server) -> None:
        """An admitted request calls the backend; its server's monitor sees the outcome."""
        if self.backend is None:
            return
        latency, ok = self.backend.call(self.t - T0)
        self._latency[i], self._call_ok[i] = latency, ok
        if server.agent is not None and server.agent.monitor is not None:
            server.agent.monitor.observe(self.backend.spec.name, latency, ok)

    def _decide(self, server: _Server, i: int, final: bool = False) -> None:
        lim = server.limiter
        name = self.names[self.workload.clients[i]]
        now = lim.now()
        if not final and server.gate is not None and not server.gate.allow():
            self._source[i] = BROKEN
            self._decided_by[i] = server.index
            self.stats["broken"] += 1
            return
        if self.config.local:
            self._source[i] = LOCAL
            self._decided_by[i] = server.index
            self._admitted[i] = lim.allow_request(name, Request(now))
            if self._admitted[i]:
                self._call_backend(i, server)
            return
        if lim.lease_info(name) is not None:
            source = LEASE
        elif lim.lease.degraded(now):
            source = DEGRADED
        else:
            source = COLD
        self._source[i] = source
        self._decided[i] = self.t - T0 if final else self.workload.times[i]
        self._decided_by[i] = server.index
        try:
            ok = lim.check(name).allowed if final else lim.allow_request(name, Request(now))
        except _Parked:
            if final:
                return  # the lease came too late or empty: refused
            self.stats["parked"] += 1
            server.parked[i] = math.inf
            deadline = now - self._skew[server.index] + self.config.wait_timeout
            self._push(deadline, _WAKE, (server.index, server.started, i))
            return
        self._admitted[i] = ok
        if ok:
            self._call_backend(i, server)

    # -- the loop ------------------------------------------------------------------------------

    def run(self) -> SimResult:
        started = time.perf_counter()
        c = self.config
        end = T0 + c.duration
        phases = self._rng.uniform(0.0, c.report_interval, c.servers)
        polls = self._rng.uniform(0.0, max(c.grant_poll, 0.0), c.servers)
        if not c.local:  # the local modes have no agents and no aggregator
            for s in range(c.servers):
                self._push(T0 + phases[s], _REPORT, s)
                if c.grant_poll > 0:
                    self._push(T0 + polls[s], _POLL, s)
            self._push(T0, _TICK, None)
            for o in c.aggregator_outages:
                self._push(T0 + o.start, _AGG_DOWN, o)
                self._push(T0 + o.end, _AGG_UP, o)
        for f in c.server_failures:
            self._push(T0 + f.start, _FAIL, f.server)
            if f.end is not None:
                self._push(T0 + f.end, _RESTART, f.server)
        times = self.workload.times + T0
        wanted = self.workload.servers
        n = times.size
        i = 0
        heap = self._heap
        while True:
            next_request = times[i] if i < n else math.inf
            if heap and heap[0][0] <= next_request:
                if heap[0][0] > end:
                    break
                at, kind, _, _, arg = heapq.heappop(heap)
                self.t = at
                self._event(kind, arg)
                continue
            if next_request > end:
                break
            self.t = float(next_request)
            server = self._pick(i, int(wanted[i]))
            if server is not None:  # else no server is alive: refused (LOST)
                self._decide(server, i)
            i += 1
        self.t = end
        return self._finish(time.perf_counter() - started)

    def _event(self, kind: int, arg: Any) -> None:
        c = self.config
        if kind == _USAGE:
            self._on_usage(arg)
        elif kind == _GRANT:
            self._on_grant(*arg)
        elif kind == _REPORT:
            server = self.servers[arg]
            if server.alive and server.agent is not None:
                server.agent.report_once()
            self._push(self.t + c.report_interval, _REPORT, arg)
        elif kind == _POLL:
            self._on_poll(self.servers[arg])
            self._push(self.t + c.grant_poll, _POLL, arg)
        elif kind == _TICK:
            self._on_tick()
            self._push(self.t + c.tick, _TICK, None)
        elif kind == _WAKE:
            self._on_wake(*arg)
        elif kind == _AGG_DOWN:
            self._agg_up = False
        elif kind == _AGG_UP:
            if arg.restart:
                self._old_aggregators.append(self.aggregator)
                self.aggregator = self._start_aggregator()
                # its partitions are new to it: it replays the topic's last window (rebuild)
                back = self.aggregator.config.rewind
                if back is not None:
                    since = self.t - back
                    history = [r for r in self._consumed if r.timestamp >= since]
                    self._consumed = []
                    self._backlog = history + self._backlog
            self._agg_up = True
            self._read_backlog()
        elif kind == _FAIL:
            self._on_fail(arg)
        elif kind == _RESTART:
            self._on_restart(arg)

    # -- results -------------------------------------------------------------------------------

    def _finish(self, seconds: float) -> SimResult:
        c = self.config
        w = self.workload
        k = w.n_clients
        # requests still parked at the end are left undecided: refused
        for server in self.servers:
            for i in server.parked:
                self._source[i] = LOST
        # grants not yet delivered, or delivered and not yet polled
        for _at, kind, _, _, arg in self._heap:
            if kind == _GRANT:
                np.add.at(self.accounts.in_flight, *arg[3])
        for server in self.servers:
            for grants in server.pending:
                np.add.at(self.accounts.in_flight, *grants)
        # the last drain: every limiter ever started, so the token account closes
        for lim in [s.limiter for s in (*self._retired, *self.servers) if s.agent is not None]:
            lim.drain_usage()
            for cl, name in enumerate(self.names):
                info = lim.lease_info(name)
                if info is not None:
                    self.accounts.held[cl] += info[0]
        adm = self._admitted
        offered = np.bincount(w.clients, minlength=k)
        worst = worst_windows(self._decided[adm], w.clients[adm], k, c.window)
        warm = c.window if c.warmup is None else c.warmup
        per_window = np.zeros(k)
        rate = offered / c.duration * c.window
        for j in np.flatnonzero(rate >= min(1.0, c.saturated) * c.limit):
            stamps = np.sort(self._decided[adm & (w.clients == j)])
            per_window[j] = _mean_window(stamps, c.window, warm, c.duration)
        false = _false_rejections(
            self._decided,
            w.clients,
            adm,
            ~np.isin(self._source, (LOST, BROKEN)),
            c.limit,
            c.window,
            k,
        )
        self.stats["wall_seconds"] = seconds
        agents = [s.agent.stats for s in (*self._retired, *self.servers) if s.agent is not None]
        for name in ("grants_installed", "grants_unknown", "batches_late", "malformed", "errors"):
            self.stats[f"agent_{name}"] = sum(getattr(a, name) for a in agents)
        aggs = [a.stats for a in (*self._old_aggregators, self.aggregator)]
        for name in ("ticks", "duplicates", "malformed", "errors", "tokens_granted"):
            self.stats[f"aggregator_{name}"] = sum(getattr(a, name) for a in aggs)
        return SimResult(
            c,
            w.labels,
            w.times,
            w.clients,
            self._decided_by,
            adm,
            self._source,
            self._decided,
            offered,
            worst,
            per_window,
            false,
            self.accounts,
            seconds,
            dict(self.stats),
            np.array(self._held_t),
            np.array(self._held, dtype=np.float64).reshape(len(self._held_t), len(c.track)),
            self._latency,
            self._call_ok,
            np.array(self._control_t),
            {k: np.array(v) for k, v in self._factors.items()},
            {k: np.array(v, dtype=np.int8) for k, v in self._breakers.items()},
        )


def _mean_window(stamps: np.ndarray, window: float, start: float, end: float) -> float:
    """Mean admissions in ``[t, t + window)`` over t in ``[start, end - window]`` (as
    tests/cluster measures), every 50 ms; over the whole run if it is shorter than that."""
    if end - window <= start:
        start = 0.0
    t = np.arange(start, max(start, end - window) + 1e-9, 0.05)
    return float((np.searchsorted(stamps, t + window) - np.searchsorted(stamps, t)).mean())


def _false_rejections(
    decided: np.ndarray,
    clients: np.ndarray,
    admitted: np.ndarray,
    judged: np.ndarray,
    limit: int,
    window: float,
    k: int,
) -> np.ndarray:
    """Per client: refusals at t while the client had fewer than ``limit`` admissions in
    ``(t - window, t)`` (an exact global sliding log would have admitted them)."""
    if decided.size == 0:
        return np.zeros(k, dtype=np.int64)
    span = float(decided.max() - decided.min()) + 2 * window + 1.0
    x = clients.astype(np.float64) * span + (decided - decided.min())
    ax = np.sort(x[admitted])
    refused = ~admitted & judged
    rx = x[refused]
    inside = np.searchsorted(ax, rx, side="left") - np.searchsorted(ax, rx - window, side="right")
    return np.bincount(clients[refused][inside < limit], minlength=k)


def simulate(config: SimConfig, workload: Workload) -> SimResult:
    """``Simulation(config, workload).run()``."""
    return Simulation(config, workload).run()
