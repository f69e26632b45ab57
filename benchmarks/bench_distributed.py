"""CPU cost of the approximate mode's distributed path, in one process, no broker.

``python benchmarks/bench_distributed.py`` runs the full benchmark (a few minutes) and prints
Markdown tables; ``--quick`` is a smoke run (< 30 s); ``--write-docs`` also rewrites this
benchmark's section of ``docs/benchmarks.md`` (between ``<!-- bench_distributed:start -->`` and
``<!-- bench_distributed:end -->``; appended at the end of the file if the markers are missing).

Four measurements, all on in-memory data (see the method in the section this writes):

1. aggregator throughput: usage records per second through ``wire.decode_usage`` +
   ``PartitionState.apply_many`` (one poll's batches), with one ``PartitionState.tick`` (and
   the grant batches it turns into) per report round of every server: four servers at low
   loads, and the target load of 1,000,000 records/s (100,000 records per 100 ms round) from
   4 or 40 servers;
2. one allocation tick with a million active clients, and its parts;
3. the request path of an approximate-mode ``RateLimiter`` holding leases, next to local-mode
   limiters in the same run, with and without the agent's background drain;
4. bytes on the wire per usage and per grant record, raw and lz4-compressed.
"""

from __future__ import annotations

import argparse
import copy
import gc
import hashlib
import json
import math
import os
import platform
import statistics
import sys
import threading
import time
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aggregator.allocate import water_fill_sparse  # noqa: E402
from aggregator.partition import NEED_FLOOR, NEED_TICKS, PartitionState  # noqa: E402
from aggregator.service import Aggregator, AggregatorConfig  # noqa: E402
from limiter import Policy, RateLimiter, Request  # noqa: E402
from producer import wire  # noqa: E402
from producer.agent import Agent  # noqa: E402
from producer.transport import MAX_POLL_RECORDS, InProcessBus  # noqa: E402

try:  # a dependency (kafka-python reads confluent-kafka's lz4 batches); reported if missing
    import lz4
    import lz4.frame
except ImportError:  # pragma: no cover - reported in the output
    lz4 = None  # type: ignore[assignment, unused-ignore]

DOC = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- bench_distributed:start -->"
END_MARK = "<!-- bench_distributed:end -->"

#: The aggregator's policy: 1,000 tokens per 10 s per client. Any window of 6.4 s or more gets
#: the same ring (window / 128 buckets), so the cost does not depend on it beyond that.
AGG_POLICY = Policy(1000, 10.0)
#: Servers reporting to the aggregator; each sends one usage batch per round (the low-load
#: workloads, the first-seen pass and the tick at scale).
SERVERS = 4
#: The aggregator's target: usage records per second per process (issue #4).
TARGET = 1_000_000
#: Report interval and tick, seconds (the defaults of the agent and of the aggregator).
ROUND = 0.1
#: Zipf exponent of the skewed workload (rank i has weight 1 / i**ZIPF_S).
ZIPF_S = 1.0
#: A server admits at most this many tokens per client per round (about L / rounds per window
#: / servers with the policy above); the rest of a client's requests are reported as rejected.
ADMIT_CAP = 3
#: Calls per block and per timed chunk in the request-path loop (as in bench_local.py).
BLOCK = 1000
CHUNK = 100
#: The request path's policies: bench_local.py's small one (sliding_log) and large one.
SMALL = (10, 10)
LARGE = (1_000_000, 100_000_000)
#: Tokens per lease installed for the request-path run: never run out during a run.
LEASE_TOKENS = 1_000_000
#: The agent's report interval (the drain thread's period), seconds.
DRAIN_INTERVAL = 0.1

pc = time.perf_counter


# -- workload ------------------------------------------------------------------------------------


def client_keys(n: int, rng: np.random.Generator) -> np.ndarray:
    """``n`` distinct random non-zero uint64 keys (what BLAKE2b stable keys look like)."""
    keys = np.unique(rng.integers(1, 2**64 - 1, int(n * 1.01) + 16, dtype=np.uint64))
    return rng.permutation(keys)[:n]


class Workload:
    """Requests per server and round: draws over ``n`` clients, uniform or Zipf, aggregated into
    one usage record per client; the draws per round are set so that a batch holds ``batch``
    records on average."""

    def __init__(self, dist: str, keys: np.ndarray, batch: int) -> None:
        n = keys.size
        self.dist = dist
        self.keys = keys
        if dist == "zipf":
            weight = 1.0 / np.arange(1, n + 1, dtype=np.float64) ** ZIPF_S
        else:
            weight = np.ones(n)
        p = weight / weight.sum()
        self.cdf = np.cumsum(p)
        self.requests = self._calibrate(p, batch)

    @staticmethod
    def _calibrate(p: np.ndarray, batch: int) -> int:
        """Draws M such that the expected distinct clients among M draws is ``batch``."""
        log_q = np.log1p(-p)

        def distinct(m: float) -> float:
            return float(-np.expm1(m * log_q).sum())

        lo, hi = float(batch), float(batch)
        while distinct(hi) < batch:
            hi *= 2
        while hi / lo > 1.0005:
            mid = math.sqrt(lo * hi)
            lo, hi = (mid, hi) if distinct(mid) < batch else (lo, mid)
        return round(hi)

    def records(self, rng: np.random.Generator) -> np.ndarray:
        u = rng.random(self.requests)
        u.sort()  # sorted draws: a faster search, and the clients come out sorted
        draws = np.searchsorted(self.cdf, u * self.cdf[-1], side="right")
        np.minimum(draws, self.keys.size - 1, out=draws)
        first = np.flatnonzero(np.r_[True, draws[1:] != draws[:-1]])
        idx, counts = draws[first], np.diff(np.r_[first, draws.size])
        order = rng.permutation(idx.size)  # a drain's order: not sorted by key
        idx, counts = idx[order], counts[order].astype(np.float64)
        admitted = np.minimum(counts, ADMIT_CAP)
        zero = np.zeros(idx.size)
        return wire.usage_records(self.keys[idx], admitted, zero, counts - admitted, zero)


def usage_message(server: int, seq: int, start: float, records: np.ndarray) -> bytes:
    batch = wire.UsageBatch(
        f"server-{server}", 7 + server, seq, start, start + ROUND, 0, 0, records
    )
    return wire.encode_usage(batch)


def grant_messages(
    keys: np.ndarray,
    servers: np.ndarray,
    tokens: np.ndarray,
    now: float,
    seq: int,
    active: int = SERVERS,
) -> list[bytes]:
    """One grant batch per server, split the way ``Aggregator.tick`` splits a tick's result."""
    order = np.argsort(servers, kind="stable")
    servers, keys, tokens = servers[order], keys[order], tokens[order]
    bounds = np.flatnonzero(np.diff(servers)) + 1
    out = []
    for s, k, t in zip(
        servers[np.r_[0, bounds]] if servers.size else [],
        np.split(keys, bounds),
        np.split(tokens, bounds),
        strict=False,
    ):
        rec = np.empty(k.size, dtype=wire.GRANT_RECORD)
        rec["key"] = k
        rec["tokens"] = np.minimum(t, wire.MAX_GRANT)
        batch = wire.GrantBatch("bench-aggregator", 1, seq, now, 1.0, active, f"server-{s}", rec)
        out.append(wire.encode_grants(batch))
    return out


def new_state() -> PartitionState:
    """A partition exactly as ``Aggregator`` builds one for ``AGG_POLICY`` with the default tick
    and lease ttl (its own ``_new_partition``, so that memory and keepalive follow the code)."""
    aggregator = Aggregator(AggregatorConfig(AGG_POLICY), InProcessBus())
    return aggregator._new_partition()


def memory_of(state: PartitionState) -> tuple[int, int]:
    """(ticks of demand history, ticks a pair keeps getting grants after its last demand)."""
    memory = state._history.maxlen or 1
    return memory, max(memory, int(getattr(state, "keepalive", memory)))


# -- 1. aggregator throughput ----------------------------------------------------------------------


@dataclass
class AggSample:
    records: int  # timed records
    batches: int
    decode_s: float
    apply_s: float
    tick_s: list[float]  # per timed tick
    grants_s: list[float]  # per timed tick: split + encode of the grant batches
    pairs: float  # mean pairs in a timed tick (= grant records)
    clients: int  # clients in the last timed tick
    advance_s: float = 0.0  # of apply_s: ChargeRing.advance (the ring's column clearing)

    @property
    def total_s(self) -> float:
        return self.decode_s + self.apply_s + sum(self.tick_s) + sum(self.grants_s)


@dataclass
class AggRow:
    dist: str
    clients: int
    batch: int
    requests: int  # draws per server per round
    servers: int = SERVERS  # usage batches per round
    samples: list[AggSample] = field(default_factory=list)
    #: timed usage batches: (records, encoded bytes, lz4 bytes or -1)
    usage_sizes: list[tuple[int, int, int]] = field(default_factory=list)
    #: grant batches of the last timed tick: (records, encoded bytes, lz4 bytes or -1)
    grant_sizes: list[tuple[int, int, int]] = field(default_factory=list)

    def median(self, f: Callable[[AggSample], float]) -> float:
        return float(statistics.median(f(s) for s in self.samples))


@dataclass
class FirstSeen:
    clients: int
    records: int
    seconds: float
    rounds: int


class Clock:
    """The simulated aggregator clock: one round of ``ROUND`` seconds per step."""

    def __init__(self) -> None:
        self.now = 1000.0


def first_seen(state: PartitionState, keys: np.ndarray, clock: Clock) -> FirstSeen:
    """Every server reports every client once, zero counts: the key index and the ring fill up
    (an aggregator that just took over a partition). Timed: decode + apply."""
    zero = np.zeros(keys.size)
    records = wire.usage_records(keys, zero, zero, zero, zero)
    step = wire.BATCH_RECORDS
    elapsed = 0.0
    seq = 0
    for s in range(SERVERS):
        for i in range(0, keys.size, step):
            seq += 1
            data = usage_message(s, seq, clock.now - ROUND, records[i : i + step])
            t0 = pc()
            batch = wire.decode_usage(data)
            state.apply(batch.records, s, clock.now, clock.now)
            elapsed += pc() - t0
        state.tick(clock.now)
        clock.now += ROUND
    return FirstSeen(keys.size, SERVERS * keys.size, elapsed, SERVERS)


def run_rounds(
    state: PartitionState,
    clock: Clock,
    messages: list[list[bytes]],
    timed_from: int,
    row: AggRow | None,
) -> AggSample:
    """Feed rounds of usage batches, one tick per round; time the rounds from ``timed_from``."""
    sample = AggSample(0, 0, 0.0, 0.0, [], [], 0.0, 0)
    pairs = []
    seq = 1_000_000
    for r, round_msgs in enumerate(messages):
        timed = r >= timed_from
        start = clock.now
        # the service folds one poll's batches into one apply_many; confluent-kafka's poll
        # returns when it has MAX_POLL_RECORDS messages or the tick is due: a round's batches,
        # MAX_POLL_RECORDS at a time
        for first in range(0, len(round_msgs), MAX_POLL_RECORDS):
            polled = round_msgs[first : first + MAX_POLL_RECORDS]
            arrive = start + (first + len(polled)) * ROUND / (len(round_msgs) + 1)
            t0 = pc()
            batches = [wire.decode_usage(data).records for data in polled]
            t1 = pc()
            # apply_many() first advances the ring to `arrive`; done here to time it on its own
            state.ring.advance(arrive)
            ta = pc()
            # each batch's interval ended at ``start``
            state.apply_many(
                [(records, first + i, start) for i, records in enumerate(batches)], arrive
            )
            t2 = pc()
            if timed:
                sample.decode_s += t1 - t0
                sample.apply_s += t2 - t1
                sample.advance_s += ta - t1
                sample.records += sum(int(r.size) for r in batches)
                sample.batches += len(batches)
        now = start + ROUND
        t0 = pc()
        keys, servers, tokens = state.tick(now)
        t1 = pc()
        seq += 1
        grants = grant_messages(keys, servers, tokens, now, seq, len(round_msgs))
        t2 = pc()
        clock.now = now
        if timed:
            sample.tick_s.append(t1 - t0)
            sample.grants_s.append(t2 - t1)
            pairs.append(keys.size)
            if r == len(messages) - 1:
                sample.clients = int(np.unique(keys).size)
                if row is not None:
                    row.grant_sizes = [
                        (wire.decode_grants(g).records.size, len(g), lz4_size(g)) for g in grants
                    ]
    sample.pairs = float(np.mean(pairs)) if pairs else 0.0
    return sample


@dataclass
class Config:
    sizes: tuple[int, ...]  # client keys in the aggregator workload
    batches: tuple[int, ...]  # records per usage batch (mean), from SERVERS servers
    dists: tuple[str, ...]
    #: (servers, records per batch) at the target load: TARGET * ROUND records per round
    loads: tuple[tuple[int, int], ...]
    warm_rounds: int  # >= the partition's memory (10 ticks): the history is this workload's
    timed_rounds: int
    rounds: int  # interleaved repetitions (median taken)
    tick_clients: int
    tick_timed: int  # timed ticks (half whole, half in parts)
    calls: int
    warmup: int
    latency_calls: int
    request_clients: int = 10_000
    seed: int = 20240607


def warm_keepalive(
    state: PartitionState, clock: Clock, records: list[np.ndarray], servers: int
) -> None:
    """Rounds older than the demand history but within the keepalive, applied at once and
    allocated by one tick: their pairs are kept alive (and get grants) as in a steady state."""
    for i, rec in enumerate(records):
        state.apply(rec, i % servers, clock.now, clock.now - ROUND)
    clock.now += ROUND
    state.tick(clock.now)


def aggregator_throughput(
    cfg: Config, log: Callable[[str], None]
) -> tuple[list[AggRow], list[FirstSeen], tuple[int, int]]:
    rows: list[AggRow] = []
    seen: list[FirstSeen] = []
    memory, keepalive = memory_of(new_state())
    # two groups of workloads, one after the other (fewer states in memory at once): the
    # low loads of SERVERS servers, then the target load from `cfg.loads`
    groups = [
        [(dist, SERVERS, b) for dist in cfg.dists for b in cfg.batches],
        [(dist, servers, b) for servers, b in cfg.loads for dist in cfg.dists],
    ]
    for n in cfg.sizes:
        rng = np.random.default_rng(cfg.seed + n)
        keys = client_keys(n, rng)
        start = Clock()
        base = new_state()
        gc.collect()
        fs = first_seen(base, keys, start)
        seen.append(fs)
        log(
            f"  aggregator n={n:>9,}: first seen {fs.records:,} records in {fs.seconds:.1f} s "
            f"({fs.records / fs.seconds / 1e3:.0f} k/s); demand history {memory} ticks, "
            f"keepalive {keepalive} ticks"
        )
        for g, group in enumerate(groups):
            work = warm_workloads(cfg, group, base, keys, start, rng, (memory, keepalive), log)
            if g == len(groups) - 1:
                del base
            interleave(cfg, work, log)
            rows.extend(row for row, _, _, _ in work)
            del work
            gc.collect()
        del keys
        gc.collect()
    return rows, seen, (memory, keepalive)


Work = list[tuple[AggRow, PartitionState, Clock, list[list[bytes]]]]


def warm_workloads(
    cfg: Config,
    group: list[tuple[str, int, int]],
    base: PartitionState,
    keys: np.ndarray,
    start: Clock,
    rng: np.random.Generator,
    history: tuple[int, int],
    log: Callable[[str], None],
) -> Work:
    """One state per workload ``(dist, servers, batch)``, warmed once: the older rounds within
    the keepalive, then `memory` rounds with a tick each; the interleaved rounds then continue
    each state."""
    memory, keepalive = history
    n = keys.size
    work: Work = []
    for dist, servers, b in group:
        t0 = pc()
        w = Workload(dist, keys, b)
        older = [w.records(rng) for _ in range((keepalive - memory) * servers)]
        msgs = [
            [usage_message(s, r, 0.0, w.records(rng)) for s in range(servers)]
            for r in range(memory + cfg.rounds * cfg.timed_rounds)
        ]
        row = AggRow(dist, n, b, w.requests, servers)
        row.usage_sizes = [
            (wire.decode_usage(m).records.size, len(m), lz4_size(m))
            for round_msgs in msgs[memory:]
            for m in round_msgs
        ]
        state = copy.deepcopy(base)
        clock = Clock()
        clock.now = start.now
        warm_keepalive(state, clock, older, servers)
        del older
        run_rounds(state, clock, msgs[:memory], memory, None)
        work.append((row, state, clock, msgs[memory:]))
        log(f"  aggregator n={n:>9,} {workload_name(row)}: warmed in {pc() - t0:.1f} s")
    return work


def interleave(cfg: Config, work: Work, log: Callable[[str], None]) -> None:
    """The timed rounds: the workloads take turns in rotating order."""
    for r in range(cfg.rounds):
        order = work[r % len(work) :] + work[: r % len(work)]
        for row, state, clock, msgs in order:
            t0 = pc()
            gc.collect()
            block = msgs[r * cfg.timed_rounds : (r + 1) * cfg.timed_rounds]
            s = run_rounds(state, clock, block, 0, row)
            row.samples.append(s)
            log(
                f"  aggregator n={row.clients:>9,} round {r + 1}/{cfg.rounds} "
                f"{workload_name(row)}: decode {s.records / s.decode_s / 1e6:6.1f} M/s, "
                f"apply {s.records / s.apply_s / 1e6:5.2f} M/s, tick "
                f"{statistics.median(s.tick_s) * 1e3:7.1f} ms ({s.pairs:,.0f} pairs), "
                f"CPU/round {s.total_s / len(s.tick_s) * 1e3:6.1f} ms, "
                f"total {s.records / s.total_s / 1e6:5.2f} M/s  ({pc() - t0:.1f} s)"
            )


def workload_name(row: AggRow) -> str:
    return f"{row.dist}, {row.servers} × ~{row.batch:,}"


# -- 2. the tick with a million active clients, and its parts -------------------------------------


PARTS = (
    "advance",
    "demand",
    "history",
    "keepalive",
    "pairs",
    "budget",
    "water_fill",
    "update",
    "rows",
    "result",
)


def tick_in_parts(
    self: PartitionState, now: float
) -> tuple[tuple[np.ndarray, np.ndarray, np.ndarray], dict[str, float]]:
    """``PartitionState.tick`` step by step with a timer between steps (a copy of its code,
    reading its internals; :func:`tick_copy_ok` checks it against the real one every run)."""
    t: dict[str, float] = {}
    t0 = pc()
    self.ring.advance(now)
    t1 = pc()
    t["advance"] = t1 - t0
    cur_pairs, cur_amounts = self._take_demand()
    t0 = pc()
    t["demand"] = t0 - t1
    history = self._history
    if len(history) == history.maxlen:
        old_pairs, old_amounts = history.popleft()
        self.wanted[old_pairs] -= old_amounts
    history.append((cur_pairs, cur_amounts))
    self.wanted[cur_pairs] += cur_amounts
    t1 = pc()
    t["history"] = t1 - t0
    m = len(self.pairs)
    alive = self.seen[:m] > self._ticks - self.keepalive
    self._ticks += 1
    if not alive.any():
        empty = np.zeros(0, dtype=np.int64)
        return (np.zeros(0, dtype=np.uint64), self.pair_server[:0], empty), t
    idle = self.wanted[:m] == 0.0
    idle &= self.outstanding[:m] >= NEED_FLOOR
    idle &= alive
    pairs = np.flatnonzero(alive ^ idle)
    t0 = pc()
    t["keepalive"] = t0 - t1
    per_tick = self.wanted[pairs] / len(history)
    client = self.pair_client[pairs]
    need = NEED_TICKS * per_tick
    np.ceil(need, out=need)
    need += NEED_FLOOR
    need -= self.outstanding[pairs]
    np.maximum(need, 0.0, out=need)
    server = self.pair_server[pairs]
    t1 = pc()
    t["pairs"] = t1 - t0
    n = len(self.clients)
    budget = self.limits[:n] - self.ring.used(slice(0, n), now)
    budget -= self.held[:n]
    np.maximum(budget, 0.0, out=budget)
    t0 = pc()
    t["budget"] = t0 - t1

    def idle_of(clients: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        mark = np.zeros(n, dtype=bool)
        mark[clients] = True
        them = np.flatnonzero(idle & mark[self.pair_client[:m]])
        return self.pair_client[them], self.pair_server[them]

    tokens = water_fill_sparse(client, per_tick + 1.0, need, budget, server, idle_of)
    t1 = pc()
    t["water_fill"] = t1 - t0
    granted = tokens > 0
    got = np.flatnonzero(granted)
    more = tokens[got].astype(np.float64)
    self.outstanding[pairs[got]] += more
    np.add.at(self.held, client[got], more)
    t0 = pc()
    t["update"] = t0 - t1
    every = max(1, (self._history.maxlen or 1) // 2)
    first = -self._ticks % every
    refresh = np.zeros(m, dtype=bool)
    refresh[first::every] = True
    send = granted | (per_tick > 0) | refresh[pairs]
    if not idle[first::every].any():
        sent, tok = (pairs, tokens) if send.all() else (pairs[send], tokens[send])
    else:
        mine = np.zeros(m, dtype=bool)
        mine[pairs[send]] = True
        rows = mine.copy()
        rows[first::every] |= idle[first::every]
        sent = np.flatnonzero(rows)
        tok = np.zeros(sent.size, dtype=np.int64)
        tok[np.flatnonzero(mine[sent])] = tokens[send]
    t1 = pc()
    t["rows"] = t1 - t0
    out = self.clients.slot_keys[self.pair_client[sent]], self.pair_server[sent], tok
    t["result"] = pc() - t1
    return out, t


class TickScenario:
    """``n`` clients, each with demand at 1-4 servers (uniformly many, random ones); each
    (client, server) pair reports its demand once per ``memory`` ticks, in a random tick of
    the cycle, so that every pair is in the tick's history at every tick."""

    def __init__(self, n: int, seed: int) -> None:
        rng = np.random.default_rng(seed)
        self.rng = rng
        self.state = new_state()
        self.memory, self.keepalive = memory_of(self.state)
        self.keys = client_keys(n, rng)
        per_client = rng.integers(1, SERVERS + 1, n)
        servers = np.argsort(rng.random((n, SERVERS)), axis=1)
        mask = np.arange(SERVERS)[None, :] < per_client[:, None]
        self.pair_client = np.nonzero(mask)[0]
        self.pair_server = servers[mask]
        self.slot = rng.integers(0, self.memory, self.pair_client.size)
        self.demand = rng.integers(1, ADMIT_CAP + 1, self.pair_client.size).astype(np.float64)
        self.t = 0
        self.now = 1000.0

    def feed(self) -> None:
        """This tick's reports: the pairs of the current cycle slot, one batch per server."""
        sel = self.slot == self.t % self.memory
        for s in range(SERVERS):
            m = sel & (self.pair_server == s)
            c = self.pair_client[m]
            zero = np.zeros(c.size)
            rec = wire.usage_records(self.keys[c], self.demand[m], zero, zero, zero)
            for i in range(0, rec.size, wire.BATCH_RECORDS):
                self.state.apply(rec[i : i + wire.BATCH_RECORDS], s, self.now, self.now)
        self.t += 1


def tick_copy_ok(seed: int) -> bool:
    """Whether :func:`tick_in_parts` still does what ``PartitionState.tick`` does."""
    try:
        sc = TickScenario(3000, seed)
        # reports for a while, then none: pairs leave the demand history (idle, kept alive)
        for j in range(3 * sc.memory + 2):
            if j < sc.memory + 2:
                sc.feed()
            twin = copy.deepcopy(sc.state)
            a = sc.state.tick(sc.now)
            b, _ = tick_in_parts(twin, sc.now)
            if not all(np.array_equal(x, y) for x, y in zip(a, b, strict=True)):
                return False
            for name in ("outstanding", "held", "seen", "wanted"):
                if not np.array_equal(getattr(sc.state, name), getattr(twin, name)):
                    return False
            sc.now += ROUND
        return True
    except (AttributeError, TypeError, ValueError):  # the partition's internals changed
        return False


def huge_page_share(arr: np.ndarray) -> float | None:
    """Share of ``arr``'s resident memory on transparent huge pages (Linux), else None."""
    lo, hi = arr.ctypes.data, arr.ctypes.data + arr.nbytes
    rss = huge = 0
    inside = False
    try:
        with open("/proc/self/smaps") as f:
            for line in f:
                head, _, rest = line.partition(" ")
                if not head.endswith(":"):  # a mapping "start-end perms ..."
                    start, _, end = head.partition("-")
                    inside = int(start, 16) < hi and int(end, 16) > lo
                elif inside and head == "Rss:":
                    rss += int(rest.split()[0])
                elif inside and head == "AnonHugePages:":
                    huge += int(rest.split()[0])
    except (OSError, ValueError):
        return None
    return huge / rss if rss else None


def array_bytes(*objs: object) -> int:
    total = 0
    for obj in objs:
        names = getattr(type(obj), "__slots__", None) or list(vars(obj))
        for name in names:
            v = getattr(obj, name, None)
            if isinstance(v, np.ndarray):
                total += v.nbytes
    return total


@dataclass
class TickResult:
    clients: int
    pairs: int
    ring_columns: int
    setup_s: float
    whole_s: list[float]  # real PartitionState.tick
    parts: list[dict[str, float]] | None  # tick_in_parts, None if the copy is stale
    advance_s: list[float]  # ring.advance to the next round (clears the buckets passed)
    advance_columns: int  # buckets passed in those advances
    bucket_s: float
    advance_warm_s: list[float]  # one bucket each, back to back (no tick in between)
    ring_huge_pages: float | None  # share of the ring's resident memory on huge pages
    kernel_share: float  # of a whole tick's CPU time (os.times), median
    compact_s: float
    state_bytes: int
    ring_bytes: int
    pair_index_bytes: int
    memory: int
    keepalive: int

    def per_round_advance(self) -> float:
        """Seconds of ``ChargeRing.advance`` per round: per bucket cleared x buckets per round."""
        per_column = sum(self.advance_s) / max(1, self.advance_columns)
        return per_column * ROUND / self.bucket_s

    def part(self, name: str) -> float:
        assert self.parts is not None
        return float(statistics.median(p[name] for p in self.parts))


def tick_at_scale(cfg: Config, log: Callable[[str], None]) -> TickResult:
    gc.collect()
    copy_ok = tick_copy_ok(cfg.seed)
    if not copy_ok:
        log("  tick parts skipped: tick_in_parts no longer matches PartitionState.tick")
    t0 = pc()
    sc = TickScenario(cfg.tick_clients, cfg.seed + 1)
    st = sc.state
    for _ in range(sc.memory):  # fill the history: every pair has demand in it
        sc.feed()
        st.tick(sc.now)
        sc.now += ROUND
    setup = pc() - t0
    log(f"  tick n={cfg.tick_clients:,}: {sc.pair_client.size:,} pairs, set up in {setup:.1f} s")
    whole: list[float] = []
    parts: list[dict[str, float]] = []
    advance: list[float] = []
    kernel: list[float] = []  # share of each whole tick's CPU time spent in the kernel
    columns = 0
    pairs = 0
    for j in range(cfg.tick_timed):
        gc.collect()
        before = st.ring.current or 0
        t0 = pc()
        st.ring.advance(sc.now)  # what the round's first apply() does
        advance.append(pc() - t0)
        columns += (st.ring.current or 0) - before
        sc.feed()
        in_parts = copy_ok and j % 2 == 1
        t0 = pc()
        if in_parts:
            (keys, _, _), p = tick_in_parts(st, sc.now)
            parts.append(p)
        else:
            cpu0 = os.times()
            keys, _, _ = st.tick(sc.now)
            whole.append(pc() - t0)
            cpu1 = os.times()
            kernel.append(
                (cpu1.system - cpu0.system)
                / max(1e-9, cpu1.system - cpu0.system + cpu1.user - cpu0.user)
            )
        pairs = keys.size
        log(
            f"  tick n={cfg.tick_clients:,} {j + 1}/{cfg.tick_timed}: {pc() - t0:.3f} s "
            f"({'parts' if in_parts else 'whole'}), {keys.size:,} pairs, advance "
            f"{advance[-1] * 1e3:.1f} ms"
        )
        sc.now += ROUND
    t0 = pc()
    st.compact(sc.now)
    compact = pc() - t0
    huge = huge_page_share(st.ring.charges)
    # the same clearing back to back, one bucket at a time, without a tick in between
    warm: list[float] = []
    for _ in range(6):
        nxt = ((st.ring.current or 0) + 1.5) * st.ring.bucket
        t0 = pc()
        st.ring.advance(nxt)
        warm.append(pc() - t0)
    result = TickResult(
        clients=len(st),
        pairs=pairs,
        ring_columns=st.ring.k,
        setup_s=setup,
        whole_s=whole,
        parts=parts if copy_ok else None,
        advance_s=advance,
        advance_columns=columns,
        bucket_s=st.ring.bucket,
        advance_warm_s=warm,
        kernel_share=float(statistics.median(kernel)) if kernel else 0.0,
        ring_huge_pages=huge,
        compact_s=compact,
        state_bytes=array_bytes(st, st.ring, st.clients, st.pairs),
        ring_bytes=st.ring.charges.nbytes,
        pair_index_bytes=array_bytes(st.pairs),
        memory=sc.memory,
        keepalive=sc.keepalive,
    )
    del sc, st
    gc.collect()
    return result


# -- 3. the request path ---------------------------------------------------------------------------

Blocks = list[list[list[str]]]


@dataclass
class Built:
    call: Callable[[str, Request], bool]
    #: after the first-seen pass: installs leases; returns (drain s, apply_grants s, clients)
    prepare: Callable[[], tuple[float, float, int]] = lambda: (0.0, 0.0, 0)
    start: Callable[[], None] = lambda: None  # background threads, before the warm-up
    stop: Callable[[], None] = lambda: None
    report: Callable[[], tuple[int, float]] = lambda: (0, 0.0)  # (drains, mean drain seconds)


@dataclass(frozen=True)
class Contender:
    name: str
    policy: str
    build: Callable[[], Built]


def _local(algorithm: str) -> Callable[[], Built]:
    def build() -> Built:
        limit, window = SMALL if algorithm == "sliding_log" else LARGE
        return Built(RateLimiter(limit, window, algorithm=algorithm).allow_request)

    return build


def _install_leases(rl: RateLimiter, tokens: float) -> tuple[float, float, int]:
    """Drain the first-seen usage and grant every client a lease: (drain s, grant s, clients)."""
    t0 = pc()
    usage = rl.drain_usage()
    t1 = pc()
    amounts = np.full(usage.keys.size, tokens)
    expiry = rl.now() + 1e6
    t2 = pc()
    installed = rl.apply_grants(usage.keys, amounts, expiry)
    t3 = pc()
    if installed != usage.keys.size:
        raise RuntimeError(f"installed {installed} leases for {usage.keys.size} clients")
    return t1 - t0, t3 - t2, installed


def _approximate(background: str, tokens: float = LEASE_TOKENS) -> Callable[[], Built]:
    """``background``: ``none``, ``drain`` (a thread calling drain_usage every 100 ms) or
    ``agent`` (``producer.Agent``'s reporter and receiver threads on an in-process bus)."""

    def build() -> Built:
        # algorithm="gcra" only passes the policy check: sliding_log, the default, refuses
        # limits above 4,096, although approximate mode decides with leases, not with it
        rl = RateLimiter(*LARGE, algorithm="gcra", mode="approximate")
        built = Built(rl.allow_request, prepare=lambda: _install_leases(rl, tokens))
        durations: list[float] = []
        if background == "drain":
            stop = threading.Event()

            def loop() -> None:
                next_at = time.monotonic()
                while not stop.is_set():
                    next_at += DRAIN_INTERVAL
                    t0 = time.thread_time()
                    rl.drain_usage()
                    durations.append(time.thread_time() - t0)
                    stop.wait(max(0.0, next_at - time.monotonic()))

            thread = threading.Thread(target=loop, name="bench-drain", daemon=True)

            def halt() -> None:
                stop.set()
                thread.join()

            built.start, built.stop = thread.start, halt
        elif background == "agent":
            agent = Agent(rl, InProcessBus(), "bench-server", report_interval=DRAIN_INTERVAL)
            report_once = agent.report_once

            def timed_report() -> None:
                t0 = time.thread_time()
                report_once()
                durations.append(time.thread_time() - t0)

            agent.report_once = timed_report  # type: ignore[method-assign]

            def start() -> None:
                agent.start()

            built.start, built.stop = start, agent.stop
        built.report = lambda: (len(durations), float(np.mean(durations)) if durations else 0.0)
        return built

    return build


def request_contenders() -> list[Contender]:
    small = f"{SMALL[0]} per {SMALL[1]} s"
    large = f"{LARGE[0]:,} per {LARGE[1]:,} s"
    return [
        Contender("local, sliding_log (default)", small, _local("sliding_log")),
        Contender("local, gcra", large, _local("gcra")),
        Contender("approximate, lease", large, _approximate("none")),
        Contender("approximate, lease + drain thread (100 ms)", large, _approximate("drain")),
        Contender("approximate, lease + producer.Agent threads", large, _approximate("agent")),
        Contender("approximate, empty lease (refusals)", large, _approximate("none", 0.0)),
    ]


def blocks_of(ids: list[str], idx: np.ndarray) -> Blocks:
    seq = [ids[i] for i in idx.tolist()]
    return [
        [seq[c : c + CHUNK] for c in range(b, min(b + BLOCK, len(seq)), CHUNK)]
        for b in range(0, len(seq), BLOCK)
    ]


def run_blocks(f: Callable[[str, Request], bool], blocks: Blocks) -> tuple[int, list[int]]:
    """bench_local.py's loop: a fresh ``Request()`` per block, chunks timed on their own."""
    pcn = time.perf_counter_ns
    per_chunk: list[int] = []
    app = per_chunk.append
    t0 = pcn()
    for block in blocks:
        req = Request()
        for chunk in block:
            tc = pcn()
            for cid in chunk:
                f(cid, req)
            app(pcn() - tc)
    return pcn() - t0, per_chunk


def time_calls(f: Callable[[str, Request], bool], blocks: Blocks) -> tuple[list[int], int]:
    pcn = time.perf_counter_ns
    out: list[int] = []
    app = out.append
    ok = 0
    for block in blocks:
        req = Request()
        for chunk in block:
            for cid in chunk:
                t0 = pcn()
                r = f(cid, req)
                t1 = pcn()
                app(t1 - t0)
                if r:
                    ok += 1
    return out, ok


def timer_overhead_ns(samples: int = 200_000) -> float:
    pcn = time.perf_counter_ns
    d = []
    for _ in range(samples):
        t0 = pcn()
        t1 = pcn()
        d.append(t1 - t0)
    return float(statistics.median(d))


@dataclass
class ReqSample:
    calls: int
    rate: float  # whole loop
    chunk_rate: float  # median chunk
    p50: float
    p99: float
    admitted: float
    insert_rate: float
    drains: int
    drain_ms: float
    drain_ns: float  # drain_usage() per client with usage, in the main thread, no contention
    grant_ns: float  # apply_grants() per grant record


@dataclass
class ReqRow:
    contender: str
    policy: str
    samples: list[ReqSample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in self.samples))


def request_path(cfg: Config, overhead: float, log: Callable[[str], None]) -> list[ReqRow]:
    n = cfg.request_clients
    rng = np.random.default_rng(cfg.seed + 3)
    ids = [f"client-{i}" for i in range(n)]
    insert = blocks_of(ids, rng.permutation(n))
    warm = blocks_of(ids, rng.integers(0, n, cfg.warmup))
    timed = blocks_of(ids, rng.integers(0, n, cfg.calls))
    lat = blocks_of(ids, rng.integers(0, n, cfg.latency_calls))
    cs = request_contenders()
    rows = {c.name: ReqRow(c.name, c.policy) for c in cs}
    for r in range(cfg.rounds):
        for c in cs[r % len(cs) :] + cs[: r % len(cs)]:
            t0 = pc()
            built = c.build()
            gc.collect()
            t_ins, _ = run_blocks(built.call, insert)
            drain_once, grant_once, leased = built.prepare()
            built.start()
            try:
                run_blocks(built.call, warm)
                gc.collect()
                elapsed, per_chunk = run_blocks(built.call, timed)
                lats, ok = time_calls(built.call, lat)
            finally:
                built.stop()
            drains, drain_s = built.report()
            calls = sum(len(ch) for b in timed for ch in b)
            arr = np.asarray(lats, dtype=np.float64) - overhead
            sizes = [len(ch) for b in timed for ch in b]
            s = ReqSample(
                calls=calls,
                rate=calls / (elapsed / 1e9),
                chunk_rate=float(
                    1e9 / np.median([ns / k for k, ns in zip(sizes, per_chunk, strict=True)])
                ),
                p50=float(np.percentile(arr, 50)),
                p99=float(np.percentile(arr, 99)),
                admitted=ok / len(lats),
                insert_rate=n / (t_ins / 1e9),
                drains=drains,
                drain_ms=drain_s * 1e3,
                drain_ns=drain_once / leased * 1e9 if leased else 0.0,
                grant_ns=grant_once / leased * 1e9 if leased else 0.0,
            )
            rows[c.name].samples.append(s)
            log(
                f"  request round {r + 1}/{cfg.rounds} {c.name:<46} {s.rate / 1e6:6.3f} M/s "
                f"(chunk median {s.chunk_rate / 1e6:6.3f})  p50 {s.p50:6.0f} ns  "
                f"p99 {s.p99:6.0f} ns  admitted {s.admitted:6.1%}"
                + (f"  {drains} drains, {s.drain_ms:.2f} ms each" if drains else "")
                + f"  ({pc() - t0:.1f} s)"
            )
            del built
    return list(rows.values())


# -- 4. bytes on the wire --------------------------------------------------------------------------


def lz4_size(data: bytes) -> int:
    """Bytes after ``lz4.frame.compress`` (default level); -1 without the lz4 package."""
    if lz4 is None:
        return -1
    return len(lz4.frame.compress(data))


@dataclass
class WireRow:
    what: str
    batches: int
    records_per_batch: float
    raw_per_record: float
    lz4_per_record: float | None


def wire_sizes(rows: list[AggRow]) -> list[WireRow]:
    """Bytes per record of the usage batches and grant batches of the aggregator run."""
    out: list[WireRow] = []
    for kind in ("usage", "grants"):
        for row in rows:
            sizes = row.usage_sizes if kind == "usage" else row.grant_sizes
            recs = sum(r for r, _, _ in sizes)
            if not sizes or not recs:
                continue
            raw = sum(b for _, b, _ in sizes)
            packed = [z for _, _, z in sizes]
            out.append(
                WireRow(
                    f"{kind}, {workload_name(row)}, {row.clients:,} clients",
                    len(sizes),
                    recs / len(sizes),
                    raw / recs,
                    None if min(packed) < 0 else sum(packed) / recs,
                )
            )
    return out


# -- report ----------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    mem = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
        for line in Path("/proc/meminfo").read_text().splitlines():
            if line.startswith("MemTotal"):
                mem = f"{int(line.split()[1]) / 2**20:.0f} GiB"
                break
    except OSError:
        pass
    try:
        clock = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        clocksource = clock.read_text().strip()
    except OSError:
        clocksource = "unknown"
    try:
        thp_path = Path("/sys/kernel/mm/transparent_hugepage/enabled")
        thp = thp_path.read_text().strip()
    except OSError:
        thp = "unknown"
    digest = hashlib.sha256()
    for pkg in ("limiter", "producer", "aggregator"):
        for f in sorted((ROOT / pkg).glob("*.py")):
            digest.update(f"{pkg}/{f.name}".encode() + b"\0" + f.read_bytes())
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "memory": mem,
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "numpy": np.__version__,
        "lz4": getattr(lz4, "__version__", "?") if lz4 else "not installed",
        "platform": platform.platform(),
        "clocksource": clocksource,
        "thp": thp,
        "sources_sha256": digest.hexdigest()[:12],
        "loadavg_start": loadavg(),
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M/s" if x >= 1e6 else f"{x / 1e3:.0f} k/s"


def fmt_ms(seconds: float) -> str:
    ms = seconds * 1e3
    return f"{ms:,.0f}" if ms >= 100 else f"{ms:.1f}" if ms >= 1 else f"{ms:.2f}"


def fmt_bytes(b: float) -> str:
    return f"{b / 2**30:.2f} GiB" if b >= 2**30 else f"{b / 2**20:.0f} MiB"


@dataclass
class Results:
    agg: list[AggRow]
    seen: list[FirstSeen]
    tick: TickResult
    req: list[ReqRow]
    wire_rows: list[WireRow]
    memory: int  # ticks of demand history
    keepalive: int  # ticks a pair gets grants after its last demand


def agg_stats(row: AggRow) -> dict[str, float]:
    return {
        "decode": row.median(lambda s: s.records / s.decode_s),
        "apply": row.median(lambda s: s.records / s.apply_s),
        "tick": row.median(lambda s: statistics.median(s.tick_s)),
        "grants": row.median(lambda s: statistics.median(s.grants_s)),
        "advance": row.median(lambda s: s.advance_s / len(s.tick_s)),
        "apply_round": row.median(lambda s: s.apply_s / len(s.tick_s)),
        "total": row.median(lambda s: s.records / s.total_s),
        "round_cpu": row.median(lambda s: s.total_s / len(s.tick_s)),
        "tick_share": row.median(lambda s: (sum(s.tick_s) + sum(s.grants_s)) / s.total_s),
        "records": row.median(lambda s: s.records / s.batches),
        "pairs": row.median(lambda s: s.pairs),
        "clients": row.median(lambda s: s.clients),
    }


METHOD = """\
Single process, one thread (plus the agent's threads where a row says so), no broker: every
message is built and read in memory, so these are CPU costs only. One run measures everything,
so ratios compare numbers taken minutes apart on the same machine.

- **Aggregator throughput.** One `PartitionState` as `Aggregator._new_partition` builds it for a
  policy of 1,000 tokens per 10 s with the default tick (100 ms) and lease ttl (1 s): a demand
  history of *memory* ticks, grants for a pair until *keepalive* ticks after its last demand,
  window buckets of 78 ms (both printed with the results). Client keys are random non-zero
  uint64 (what BLAKE2b keys look like). Every server sends one usage batch per *round* (100 ms
  of simulated aggregator clock, arrivals spread over the round); a batch aggregates a
  server's requests of the round, drawn uniformly or by Zipf (weight 1/rank) over the clients,
  as many draws as make a given number of distinct clients per batch on average; counts above
  3 tokens per client and round are reported as `rejected`. Low loads: four servers, ~1,000 or
  ~10,000 records per batch (40,000–400,000 records/s offered: the fixed cost per round
  shows). The target load, 1,000,000 records/s = 100,000 records per round: four servers ×
  ~25,000 records, and forty servers × ~2,500 (smaller batches, and each client at up to ten
  times as many (client, server) pairs); their *CPU/round* tells whether one process keeps up
  with that load (under 100 ms) and their *total* is the records/s it sustains. Batches are
  built with `wire.usage_records` + `wire.encode_usage` before timing. First four servers
  report every client once (*first seen*: an aggregator that just took the partition over;
  every key and (client, server) pair of those servers is inserted; the other 36 servers' pairs
  come with their first records). Each workload gets its own copy of that state, warmed once:
  its rounds older than the demand history but within the keepalive are applied at once and
  allocated by one tick (so that their pairs are kept alive, as in a steady state), then
  *memory* rounds with a tick each. Timed rounds continue from there, fresh batches every
  round: `wire.decode_usage` per batch and one `PartitionState.apply_many` per poll, as
  `Aggregator.handle_many` folds one poll's batches (confluent-kafka's poll returns when it has
  500 messages or the tick is due: a round's batches, 500 at a time), one `PartitionState.tick`
  per round, and its result split into one grant batch per server and encoded as
  `Aggregator.tick` does (*grants*). *total* = records ÷ (decode + apply + tick + grants).
  The low-load workloads of one key count, then its target-load ones, take turns in rotating
  order, a few timed rounds each per interleaved round; median of the interleaved rounds.
- **Tick at scale.** Clients with demand at 1–4 servers each (uniformly many, random servers);
  each (client, server) pair reports demand once per *memory* ticks, in a random tick of the
  cycle, so every pair is in every tick's demand history. After one cycle of untimed ticks,
  each timed tick gets its cycle slot's reports (untimed) and is timed; alternate ticks run a
  copy of `PartitionState.tick` with timers between its steps (checked against the real one on
  a small state every run; left out when it no longer matches). The kernel's share of a
  tick's CPU time (`os.times`) is mostly page faults on fresh temporaries. *advance*:
  `ChargeRing.advance` to the next round (clearing the buckets passed, which the round's first
  `apply` otherwise does), timed right after a tick as in the service loop, and back to back.
- **Request path.** bench_local.py's loop (10,000 ids `client-{i}`, blocks of 1,000 calls with a
  fresh `Request()`, timed chunks of 100, *chunk median*, per-call *p50*/*p99* with timer
  overhead subtracted), interleaved rounds, medians. Local mode: default `sliding_log` at
  bench_local's 10 per 10 s (mostly refusals at this call rate, as there) and `gcra` at
  1,000,000 per 100,000,000 s. Approximate mode at 1,000,000 per 100,000,000 s: each client's
  first call (*first seen*, an optimistic cold start) is followed by `drain_usage()` +
  `apply_grants()` installing a lease of 1,000,000 tokens for every client, so the timed calls
  take the lease path. Variants: no background thread; a thread calling `drain_usage()` every
  100 ms; `producer.Agent`'s reporter (drain + encode + send every 100 ms) and receiver on an
  in-process bus; empty leases (every call refused from the lease). *× gcra* / *× sliding_log*
  = local decisions/s ÷ contender decisions/s, same statistic (target for approximate: < 1.5×).
- **Bytes on the wire.** Encoded size ÷ records, raw and compressed with `lz4.frame.compress`
  (default, fast level) per message, about what confluent-kafka's `lz4` does to a batch of one
  message (Kafka's record batch adds ~70 bytes per message, < 0.1 byte per record here).
"""


def report(
    cfg: Config,
    command: str,
    facts: dict[str, str],
    res: Results,
    overhead: float,
    seconds: float,
) -> str:
    lines = [
        f"Command: `{command}` ({seconds:.0f} s wall, {time.strftime('%Y-%m-%d')}; "
        f"limiter/ producer/ aggregator/ *.py sha256 {facts['sources_sha256']}).",
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['memory']}, "
        f"{facts['platform']}; Python {facts['python']}, numpy {facts['numpy']}, lz4 "
        f"{facts['lz4']}; clocksource {facts['clocksource']}, transparent huge pages "
        f"{facts['thp']}; perf_counter_ns pair overhead {overhead:.0f} ns; load average "
        f"{facts['loadavg_start']} at start, {facts['loadavg_end']} at end.",
        "",
        f"**1. Aggregator throughput** (one usage batch per server and one tick per round; "
        f"demand history {res.memory} ticks, keepalive {res.keepalive} ticks; "
        f"{cfg.timed_rounds} timed rounds per workload per interleaved round, median of "
        f"{cfg.rounds} interleaved round(s)). *workload*: draws, servers × records per batch "
        f"(the last ones offer the target load, {TARGET * ROUND:,.0f} records per round); "
        "*draws*: requests per server and round; *records*: mean records per batch; "
        "*apply*: records ÷ `PartitionState.apply_many` time, including its `ChargeRing.advance` "
        "(timed on its own: *of which advance*, per round); "
        "*pairs*: (client, server) pairs allocated per tick (= grant records sent per tick); "
        "*CPU/round*: decode + apply + tick + grants per 100 ms round (over 100: this process "
        "cannot keep up with the load it is offered). Target: ≥ 1,000,000 records/s: "
        "*total* at a target-load workload, whose *CPU/round* is then under 100 ms.",
        "",
        "| workload | clients | draws | records | decode | apply | of which advance ms/round "
        "| tick ms | grants ms | pairs | clients in tick | total | CPU/round ms "
        "| tick + grants share |",
        "|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for fs in res.seen:
        lines.append(
            f"| first seen (every key and pair new) | {fs.clients:,} | – | "
            f"{wire.BATCH_RECORDS:,} | – | – | – | – | – | – | – | "
            f"{fmt_rate(fs.records / fs.seconds)} | – | – |"
        )
    for row in res.agg:
        a = agg_stats(row)
        lines.append(
            f"| {workload_name(row)} | {row.clients:,} | {row.requests:,} | "
            f"{a['records']:,.0f} | {fmt_rate(a['decode'])} | {fmt_rate(a['apply'])} | "
            f"{fmt_ms(a['advance'])} | {fmt_ms(a['tick'])} | {fmt_ms(a['grants'])} | "
            f"{a['pairs']:,.0f} | "
            f"{a['clients']:,.0f} | **{fmt_rate(a['total'])}** | {fmt_ms(a['round_cpu'])} | "
            f"{a['tick_share']:.0%} |"
        )
    t = res.tick
    whole = statistics.median(t.whole_s)
    huge = (
        f"; {t.ring_huge_pages:.0%} of the ring on transparent huge pages"
        if t.ring_huge_pages is not None
        else ""
    )
    lines += [
        "",
        f"**2. One tick with {t.clients:,} active clients** ({t.pairs:,} (client, server) "
        f"pairs, all with demand in the last {t.memory} ticks; ring of {t.ring_columns} "
        f"buckets per client{huge}; set up in {t.setup_s:.0f} s). Median of "
        f"{len(t.whole_s)} whole ticks"
        + (f" and of {len(t.parts)} ticks timed in parts" if t.parts else "")
        + ". The tick is due every 100 ms.",
        "",
        "| step | ms | share |",
        "|---|--:|--:|",
        f"| `PartitionState.tick` (whole; {t.kernel_share:.0%} of its CPU time in the kernel) "
        f"| **{fmt_ms(whole)}** | |",
    ]
    if t.parts:
        total_parts = sum(t.part(p) for p in PARTS)
        labels = {
            "advance": "ring advance (in the tick)",
            "demand": "this tick's demand: the batches' rows (merged only if a pair repeats)",
            "history": f"demand history of {t.memory} ticks: running per-pair sums in and out",
            "keepalive": f"pairs kept alive ({t.keepalive} ticks), and the idle ones among "
            "them (no demand in the history, NEED_FLOOR held): scans of every pair",
            "pairs": "per tick, client, need and server of the other pairs",
            "budget": "every client's budget (limit − `ChargeRing.used` − held)",
            "water_fill": "`water_fill_sparse` (idle pairs fetched for clients short of budget)",
            "update": "outstanding/held update (pairs granted tokens)",
            "rows": "pairs that get a row (demand, tokens, or an idle pair's refresh)",
            "result": "result: keys, servers, tokens of those rows",
        }
        for p in PARTS:
            lines.append(f"| {labels[p]} | {fmt_ms(t.part(p))} | {t.part(p) / total_parts:.0%} |")
        lines.append(f"| sum of the steps | {fmt_ms(total_parts)} | 100% |")
    per_round = ROUND / t.bucket_s
    lines += [
        f"| `ChargeRing.advance` per 100 ms round ({per_round:.2f} buckets of "
        f"{t.bucket_s * 1e3:.0f} ms cleared), right after a tick as in the service loop | "
        f"{fmt_ms(t.per_round_advance())} | |",
        f"| the same, back to back without a tick in between | "
        f"{fmt_ms(statistics.median(t.advance_warm_s) * per_round)} | |",
        f"| `PartitionState.compact` (every 100 ticks; nothing to drop) | "
        f"{fmt_ms(t.compact_s)} | |",
        "",
        f"State arrays at {t.clients:,} clients: {fmt_bytes(t.state_bytes)} "
        f"({t.state_bytes / t.clients:,.0f} B per client), of which the charge ring "
        f"{fmt_bytes(t.ring_bytes)} and the pair index {fmt_bytes(t.pair_index_bytes)}.",
        "",
        f"**3. Request path** ({cfg.request_clients:,} clients, {cfg.warmup:,} warm-up, "
        f"{cfg.calls:,} timed, {cfg.latency_calls:,} latency calls, median of {cfg.rounds} "
        "interleaved round(s)). *decisions/s*: whole loop; *chunk median*: median "
        f"{CHUNK}-call chunk; *× gcra*, *× sliding_log*: local ÷ contender, same statistic "
        "(target for approximate: < 1.5×); *drain ms*: CPU time (`time.thread_time`) of one "
        "`drain_usage()`, or of one agent report, in the background thread.",
        "",
        "| contender | policy | decisions/s | × gcra | chunk median | × gcra | × sliding_log "
        "| p50 ns | p99 ns | admitted | first seen | drains | drain ms |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    by = {r.contender: r for r in res.req}
    gcra = by["local, gcra"]
    slog = by["local, sliding_log (default)"]
    for r in res.req:
        rate, chunk = r.median("rate"), r.median("chunk_rate")
        drains = r.median("drains")
        lines.append(
            f"| {r.contender} | {r.policy} | {fmt_rate(rate)} | "
            f"{gcra.median('rate') / rate:.2f}× | {fmt_rate(chunk)} | "
            f"{gcra.median('chunk_rate') / chunk:.2f}× | "
            f"{slog.median('chunk_rate') / chunk:.2f}× | {r.median('p50'):.0f} | "
            f"{r.median('p99'):.0f} | {r.median('admitted'):.0%} | "
            f"{fmt_rate(r.median('insert_rate'))} | "
            + (f"{drains:.0f} | {r.median('drain_ms'):.2f} |" if drains else "– | – |")
        )
    lease = by["approximate, lease"]
    lines += [
        "",
        f"Agent-side bulk calls (main thread, no contention, {cfg.request_clients:,} clients, "
        f"median of the rounds): `drain_usage()` {lease.median('drain_ns'):,.0f} ns per client "
        f"with usage, `apply_grants()` {lease.median('grant_ns'):,.0f} ns per grant record.",
        "",
        "**4. Bytes on the wire** (encoded message ÷ records; *lz4*: `lz4.frame.compress` of "
        "each message; usage: the timed batches of table 1, grants: the grant batches of the "
        "last timed tick of each workload, one per server; the largest client count).",
        "",
        "| messages | batches | records per batch | raw B/record | lz4 B/record |",
        "|---|--:|--:|--:|--:|",
    ]
    for w in res.wire_rows:
        z = f"{w.lz4_per_record:.2f}" if w.lz4_per_record is not None else "lz4 not installed"
        lines.append(
            f"| {w.what} | {w.batches} | {w.records_per_batch:,.0f} | {w.raw_per_record:.2f} "
            f"| {z} |"
        )
    lines += ["", "### Reading (generated from the numbers above)", ""]
    lines += reading(res, cfg)
    return "\n".join(lines) + "\n"


def reading(res: Results, cfg: Config) -> list[str]:
    out: list[str] = []
    stats = [(row, agg_stats(row)) for row in res.agg]
    if stats:
        met = [f"{workload_name(r)} at {r.clients:,}" for r, a in stats if a["total"] >= TARGET]
        target = [(r, a) for r, a in stats if r.servers * r.batch >= TARGET * ROUND]
        worst_row, worst = min(stats, key=lambda x: x[1]["total"])
        best_row, best = max(stats, key=lambda x: x[1]["total"])
        over = [(r, a) for r, a in stats if a["round_cpu"] > ROUND]
        amplification = max(a["pairs"] / (r.servers * a["records"]) for r, a in stats)
        out.append(
            "- **Aggregator throughput (target ≥ 1M records/s).** "
            + (f"Met for {', '.join(met)}; " if met else "Met by no workload; ")
            + f"the range is {fmt_rate(worst['total'])} ({workload_name(worst_row)}, "
            f"{worst_row.clients:,} clients) to "
            f"{fmt_rate(best['total'])} ({workload_name(best_row)}, "
            f"{best_row.clients:,}). "
            + (
                "At the target load ("
                + f"{TARGET * ROUND:,.0f} records per 100 ms round): "
                + ", ".join(
                    f"{workload_name(r)} at {r.clients:,} clients "
                    f"{fmt_ms(a['round_cpu'])} ms of CPU per round "
                    + ("(keeps up)" if a["round_cpu"] <= ROUND else "(does not keep up)")
                    for r, a in target
                )
                + ". "
                if target
                else ""
            )
            + "Decoding is never the problem "
            f"(≥ {fmt_rate(min(a['decode'] for _, a in stats))}: a header and one copy of the "
            f"records); `apply` runs at {fmt_rate(min(a['apply'] for _, a in stats))}–"
            f"{fmt_rate(max(a['apply'] for _, a in stats))}, and its ring advance is "
            f"{min(a['advance'] / a['apply_round'] for _, a in stats):.0%}–"
            f"{max(a['advance'] / a['apply_round'] for _, a in stats):.0%} of it (clearing "
            "ring columns costs the same whatever the batch size); the tick and its grant batches "
            f"take {min(a['tick_share'] for _, a in stats):.0%}–"
            f"{max(a['tick_share'] for _, a in stats):.0%} of the CPU. A tick allocates every "
            f"pair with demand in the last {res.keepalive} ticks (the keepalive), not the "
            f"records of one round: up to {amplification:.0f}× the records a round brings "
            f"({workload_name(worst_row)} at {worst_row.clients:,}: "
            f"{worst_row.servers * worst['records']:,.0f} records per round, "
            f"{worst['pairs']:,.0f} pairs "
            "per tick, each also a grant record on the wire). "
            + (
                "Over 100 ms of CPU per 100 ms round, i.e. not keeping up with their own "
                "offered load: "
                + ", ".join(
                    f"{workload_name(r)} at {r.clients:,} ({fmt_ms(a['round_cpu'])} ms)"
                    for r, a in over
                )
                + "."
                if over
                else "Every workload fits its 100 ms round."
            )
        )
        for fs in res.seen:
            out.append(
                f"- **First seen** ({fs.clients:,} clients × {SERVERS} servers, every key new): "
                f"{fmt_rate(fs.records / fs.seconds)}, {fs.seconds:.1f} s to take over such a "
                "partition (key-index inserts with vectorised linear probing, and the charge "
                "ring growing by doubling into fresh memory)."
            )
    t = res.tick
    whole = statistics.median(t.whole_s)
    text = f"- **Tick at {t.clients:,} active clients: {fmt_ms(whole)} ms**, " + (
        f"{whole / ROUND:.1f}× the 100 ms tick interval: one aggregator process cannot "
        "allocate that many active clients at the configured cadence."
        if whole > ROUND
        else f"{whole / ROUND:.0%} of the 100 ms tick interval."
    )
    if t.parts:
        total_parts = sum(t.part(p) for p in PARTS)
        ranked = sorted(PARTS, key=t.part, reverse=True)
        text += (
            " By step: "
            + ", ".join(
                f"{p} {fmt_ms(t.part(p))} ms ({t.part(p) / total_parts:.0%})" for p in ranked[:4]
            )
            + "."
        )
    out.append(text)
    per_round = ROUND / t.bucket_s
    out.append(
        f"- **Ring maintenance.** `ChargeRing.advance` subtracts one bucket (a contiguous row "
        f"of the [{t.ring_columns} × clients] float64 array) from the running totals and "
        f"zeroes it, per bucket passed ({per_round:.2f} per round): "
        f"{fmt_ms(t.per_round_advance())} ms per 100 ms round at {t.clients:,} clients "
        f"right after a tick (caches and TLB cold), "
        f"{fmt_ms(statistics.median(t.advance_warm_s) * per_round)} ms back to back, whatever "
        f"the load. The ring is {t.ring_bytes / t.clients:,.0f} B per client "
        f"({fmt_bytes(t.ring_bytes)}) of the state's {t.state_bytes / t.clients:,.0f} B."
    )
    by = {r.contender: r for r in res.req}
    gcra = by["local, gcra"]
    slog = by["local, sliding_log (default)"].median("chunk_rate")
    lease = by["approximate, lease"]
    drain = by["approximate, lease + drain thread (100 ms)"]
    agent = by["approximate, lease + producer.Agent threads"]
    ratio = gcra.median("chunk_rate") / lease.median("chunk_rate")
    grant_row, grant_stats = (
        max(stats, key=lambda x: x[1]["pairs"]) if stats else (None, {"pairs": 0.0})
    )
    out.append(
        f"- **Request path (target: approximate < 1.5× local).** The lease path takes "
        f"{ratio:.2f}× local `gcra`'s time per call and "
        f"{slog / lease.median('chunk_rate'):.2f}× the default `sliding_log`'s (chunk "
        f"medians): {'met' if ratio < 1.5 else 'missed'}. Whole loops, which also pay for "
        f"what the background threads take from the GIL: the lease path alone "
        f"{gcra.median('rate') / lease.median('rate'):.2f}× `gcra`, with the drain thread "
        f"{gcra.median('rate') / drain.median('rate'):.2f}× "
        f"({drain.median('drain_ms'):.2f} ms of CPU per `drain_usage()` of "
        f"{cfg.request_clients:,} clients every 100 ms: "
        f"{drain.median('drain_ms') / (DRAIN_INTERVAL * 1e3):.1%} of a core), with the "
        f"agent's two threads {gcra.median('rate') / agent.median('rate'):.2f}× "
        f"({agent.median('drain_ms'):.2f} ms per report: drain, records, partition split, "
        f"encode, send). Grants cost the agent {lease.median('grant_ns'):,.0f} ns per record "
        "in `apply_grants()` (a Python loop under the GIL), and every tick sends each server "
        "a record for every pair it has kept alive"
        + (
            f": with the largest grant batches of table 1 ({workload_name(grant_row)} "
            f"at {grant_row.clients:,} clients, "
            f"{grant_stats['pairs'] / grant_row.servers:,.0f} records "
            f"per server per tick) that is "
            f"{grant_stats['pairs'] / grant_row.servers * lease.median('grant_ns') / 1e6:,.0f} "
            "ms of the "
            "receiver thread's GIL time per 100 ms tick."
            if grant_row is not None
            else "."
        )
    )
    usage = [w for w in res.wire_rows if w.what.startswith("usage")]
    grants = [w for w in res.wire_rows if w.what.startswith("grants")]
    if usage and grants:
        u_lz = [w.lz4_per_record for w in usage if w.lz4_per_record is not None]
        g_lz = [w.lz4_per_record for w in grants if w.lz4_per_record is not None]
        out.append(
            f"- **Wire.** A usage record is {min(w.raw_per_record for w in usage):.2f}–"
            f"{max(w.raw_per_record for w in usage):.2f} B raw"
            + (f", {min(u_lz):.1f}–{max(u_lz):.1f} B after lz4" if u_lz else "")
            + f"; a grant record {min(w.raw_per_record for w in grants):.2f}–"
            f"{max(w.raw_per_record for w in grants):.2f} B raw"
            + (f", {min(g_lz):.1f}–{max(g_lz):.1f} B after lz4" if g_lz else "")
            + ". The 8-byte random keys do not compress; the small counts do. Every pair kept "
            "alive gets a grant record at every tick (0 tokens included), so the grant stream "
            "is *pairs* × 10 records per second against 4 × *records* × 10 usage records "
            "per second (table 1)."
        )
    return out


def write_docs(text: str) -> None:
    block = f"{START_MARK}\n{text}{END_MARK}"
    if not DOC.exists():
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(f"# Benchmarks\n\n{block}\n")
        return
    doc = DOC.read_text()
    start, end = doc.find(START_MARK), doc.find(END_MARK)
    if start < 0 and end < 0:
        DOC.write_text(doc.rstrip("\n") + "\n\n" + block + "\n")
        return
    if start < 0 or end < start:
        raise SystemExit(f"{DOC}: markers {START_MARK} / {END_MARK} out of order")
    DOC.write_text(doc[:start] + block + doc[end + len(END_MARK) :])


def section(body: str) -> str:
    """The whole docs section: heading, commands, method, then the results of this run."""
    return (
        "## Distributed path, CPU cost: `benchmarks/bench_distributed.py`\n\n"
        "What the approximate mode costs in CPU: the aggregator per usage record and per tick, "
        "the request path with leases next to local mode, and the bytes per record on the "
        "wire.\n\n"
        "```sh\n"
        ".venv/bin/python benchmarks/bench_distributed.py               # full run (~4-5 min)\n"
        ".venv/bin/python benchmarks/bench_distributed.py --quick       # smoke run, < 30 s\n"
        ".venv/bin/python benchmarks/bench_distributed.py --write-docs  # full run, rewrites "
        "this section\n"
        "```\n\n"
        "Options: `--rounds N`, `--json FILE` (raw numbers of every round), `-q` (no progress "
        "on stderr). Tables go to stdout, progress to stderr.\n\n"
        "### Method\n\n" + METHOD + "\n### Results\n\n" + body
    )


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="short smoke run (< 30 s)")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite this section of {DOC}")
    p.add_argument("--rounds", type=int, help="interleaved rounds (median taken)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)

    if args.quick:
        cfg = Config(
            sizes=(100_000,),
            batches=(1_000,),
            dists=("uniform", "zipf"),
            loads=((4, 25_000),),
            warm_rounds=10,
            timed_rounds=3,
            rounds=1,
            tick_clients=100_000,
            tick_timed=4,
            calls=100_000,
            warmup=10_000,
            latency_calls=10_000,
        )
    else:
        cfg = Config(
            sizes=(100_000, 1_000_000),
            batches=(1_000, 10_000),
            dists=("uniform", "zipf"),
            loads=((4, 25_000), (40, 2_500)),
            warm_rounds=10,
            timed_rounds=3,
            rounds=3,
            tick_clients=1_000_000,
            tick_timed=6,
            calls=1_000_000,
            warmup=100_000,
            latency_calls=100_000,
        )
    if args.rounds:
        cfg.rounds = args.rounds

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    command = "python benchmarks/bench_distributed.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    facts = machine()
    log(f"{command}: {facts}")
    t0 = pc()
    overhead = timer_overhead_ns()
    req = request_path(cfg, overhead, log)
    log(f"  request path done at {pc() - t0:.0f} s")
    agg, seen, (memory, keepalive) = aggregator_throughput(cfg, log)
    log(f"  aggregator throughput done at {pc() - t0:.0f} s")
    tick = tick_at_scale(cfg, log)
    log(f"  tick at scale done at {pc() - t0:.0f} s")
    wire_rows = wire_sizes([r for r in agg if r.clients == max(cfg.sizes)])
    log(f"  wire sizes done at {pc() - t0:.0f} s")
    res = Results(agg, seen, tick, req, wire_rows, memory, keepalive)
    seconds = pc() - t0
    facts["loadavg_end"] = loadavg()
    text = report(cfg, command, facts, res, overhead, seconds)
    print(text)
    if args.json:
        raw: dict[str, Any] = {
            "machine": facts,
            "config": asdict(cfg),
            "aggregator": [asdict(r) for r in agg],
            "first_seen": [asdict(f) for f in seen],
            "tick": asdict(tick),
            "request": [asdict(r) for r in req],
            "wire": [asdict(w) for w in wire_rows],
        }
        args.json.write_text(json.dumps(raw, indent=1))
    if args.write_docs:
        write_docs(section(text))
        log(f"wrote {DOC}")
    n_threads = threading.active_count()
    if n_threads > 1:
        log(f"  note: {n_threads - 1} stray thread(s) still alive")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
