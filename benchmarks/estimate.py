"""Resource estimate for the approximate mode at a stated load (docs/scaling.md).

``python benchmarks/estimate.py`` prints Markdown tables: the load the stated traffic puts on the
usage and grant topics, the aggregator processes it needs (CPU and memory), the Kafka brokers and
partitions, and each app server's share. Defaults: 1,000,000 requests/s, 100,000,000 clients,
500 app servers, one policy of 100 per 60 s.

Where each figure comes from:

- **the code**: the tick, report and heartbeat intervals, the lease ttl, the demand history and
  keepalive (read from a real ``PartitionState`` built by ``Aggregator._new_partition``), the
  kept-alive pairs' refresh period (``memory // 2`` ticks, ``aggregator/partition.py``), the
  wire's record and header sizes (``producer.wire``: an empty batch is encoded to get the
  header), topic defaults (``aggregator.topics``);
- **measured here**: bytes per client and per (client, server) pair of the aggregator (a real
  ``PartitionState`` fed a sample of random keys through ``apply`` and ``tick``) and of an app
  server (a real approximate-mode ``RateLimiter`` and its ``drain_usage`` key map, traced with
  ``tracemalloc``);
- **docs/benchmarks.md** (its recorded run; options with those defaults): CPU costs per record,
  per pair and per decision, compressed bytes per record;
- **assumptions** (options, printed): active clients per window, routing, records per request,
  Kafka framing, broker capacity, the CPU share an aggregator may use.
"""

from __future__ import annotations

import argparse
import math
import sys
import time
import tracemalloc
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from aggregator.partition import PartitionState  # noqa: E402
from aggregator.service import Aggregator, AggregatorConfig  # noqa: E402
from aggregator.topics import (  # noqa: E402
    DEFAULT_GRANTS_PARTITIONS,
    DEFAULT_RETENTION_MS,
    DEFAULT_USAGE_PARTITIONS,
    RETENTION_MARGIN_MS,
)
from limiter import Policy, RateLimiter, Request  # noqa: E402
from limiter.table import MAX_LOAD as TABLE_MAX_LOAD  # noqa: E402
from limiter.table import ROW_GROWTH  # noqa: E402
from producer import wire  # noqa: E402
from producer.agent import DEFAULT_HEARTBEAT_INTERVAL, DEFAULT_REPORT_INTERVAL  # noqa: E402
from producer.transport import InProcessBus  # noqa: E402

#: ``KeyIndex.lookup_or_insert`` rebuilds the table once more than half of it is used.
KEYINDEX_MAX_LOAD = 0.5
GIB = 1 << 30
MB = 1e6


# -- measurements on the real data structures ----------------------------------------------------


@dataclass(frozen=True)
class AggregatorBytes:
    per_client: float  # dense: every array full
    per_pair: float
    per_history_entry: float  # one (pair, tokens) of one tick's demand
    sample_per_client: float  # as measured at the sample (arrays after their last doubling)
    sample_per_pair: float
    sample_clients: int
    sample_pairs: int
    memory_ticks: int
    keepalive_ticks: int
    ring_columns: int


def new_partition(config: AggregatorConfig) -> PartitionState:
    """A usage partition's state exactly as the aggregator builds it for ``config``."""
    return Aggregator(config, InProcessBus())._new_partition()


def _table_dense(index_keys: np.ndarray, index_slot_of: np.ndarray) -> float:
    """Bytes of a KeyIndex's hash table per key when it is as full as it gets."""
    return (index_keys.itemsize + index_slot_of.itemsize) / KEYINDEX_MAX_LOAD


def measure_aggregator(config: AggregatorConfig, clients: int, servers: int) -> AggregatorBytes:
    """Feed ``clients`` random keys, each reported by ``servers`` servers, through the real
    ``PartitionState.apply`` (batches of 5,000 records, a tick after each round) and read the
    sizes of its arrays."""
    state = new_partition(config)
    rng = np.random.default_rng(7)
    keys = rng.integers(1, np.iinfo(np.int64).max, size=clients, dtype=np.int64).astype(np.uint64)
    now = 1000.0
    step = 5000
    for start in range(0, clients, step):
        chunk = keys[start : start + step]
        for server in range(servers):
            ones = np.ones(chunk.size)
            zeros = np.zeros(chunk.size)
            records = wire.usage_records(chunk, ones, zeros, zeros, zeros)
            state.apply(records, server, now)
        state.tick(now)
        now += config.tick
    n, m = len(state.clients), len(state.pairs)
    c, p, ring = state.clients, state.pairs, state.ring
    client_arrays = (
        c.keys,
        c.slot_of,
        c.slot_keys,
        ring.charges,
        ring.total,
        state.held,
        state.last_active,
    )
    pair_arrays = (
        p.keys,
        p.slot_of,
        p.slot_keys,
        state.pair_client,
        state.pair_server,
        state.outstanding,
        state.seen,
    )
    row = (ring.charges.nbytes + ring.total.nbytes) / ring.rows
    per_client = _table_dense(c.keys, c.slot_of) + c.slot_keys.itemsize + row
    per_client += state.held.itemsize + state.last_active.itemsize
    per_pair = _table_dense(p.keys, p.slot_of) + p.slot_keys.itemsize
    per_pair += sum(a.itemsize for a in pair_arrays[3:])
    history = state._history  # (pairs, tokens) per tick, newest last
    entries = sum(a.size for a, _ in history)
    history_bytes = sum(a.nbytes + b.nbytes for a, b in history)
    return AggregatorBytes(
        per_client=per_client,
        per_pair=per_pair,
        per_history_entry=history_bytes / max(1, entries),
        sample_per_client=sum(a.nbytes for a in client_arrays) / n,
        sample_per_pair=sum(a.nbytes for a in pair_arrays) / m,
        sample_clients=n,
        sample_pairs=m,
        memory_ticks=history.maxlen or 1,
        keepalive_ticks=state.keepalive,
        ring_columns=ring.k,
    )


#: Bytes per slot of the limiter's index: an int64 key and an int32 row (limiter/table.py).
INDEX_SLOT = 12


@dataclass(frozen=True)
class ServerBytes:
    table_per_client: float  # memory_bytes() / len at the sample
    row: float  # bytes per client row (the state, without the index)
    traced_per_client: float  # tracemalloc, table + drain_usage's key map
    clients: int


def measure_server(policy: Policy, clients: int) -> ServerBytes:
    """An approximate-mode limiter that has seen ``clients`` clients and drained them once."""
    ids = [f"client-{i}" for i in range(clients)]
    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    limiter = RateLimiter(policy.limit, policy.window, mode="approximate")
    allow = limiter.allow_request
    for start in range(0, clients, 1000):
        request = Request()
        for cid in ids[start : start + 1000]:
            allow(cid, request)
    limiter.drain_usage()  # the agent's key map: stable key -> table hash, one per client
    traced = tracemalloc.get_traced_memory()[0] - before
    tracemalloc.stop()
    n = len(limiter)
    width = limiter.lease.width
    return ServerBytes(
        table_per_client=limiter.memory_bytes() / n,
        row=8 * width,
        traced_per_client=traced / n,
        clients=n,
    )


def header_bytes(server_id_bytes: int, aggregator_id_bytes: int) -> tuple[int, int]:
    """Encoded size of an empty usage batch and of an empty grant batch."""
    usage = wire.UsageBatch(
        "s" * server_id_bytes, 1, 1, 0.0, 0.1, 0, 0, np.empty(0, dtype=wire.USAGE_RECORD)
    )
    grants = wire.GrantBatch(
        "a" * aggregator_id_bytes,
        1,
        1,
        0.0,
        1.0,
        1,
        "s" * server_id_bytes,
        np.empty(0, dtype=wire.GRANT_RECORD),
    )
    return len(wire.encode_usage(usage)), len(wire.encode_grants(grants))


# -- the estimate -------------------------------------------------------------------------------


def si(x: float, unit: str = "") -> str:
    """3 significant digits with k/M/G/T."""
    for factor, prefix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "k")):
        if abs(x) >= factor:
            return f"{x / factor:.3g} {prefix}{unit}".rstrip()
    return f"{x:.3g} {unit}".rstrip()


def gib(x: float) -> str:
    return f"{x / GIB:.3g} GiB"


def next_pow2(n: float) -> int:
    return 1 << max(0, math.ceil(math.log2(max(1.0, n))))


def table(title: str, rows: Sequence[tuple[str, str, str]]) -> str:
    out = [f"**{title}**", "", "| quantity | value | from |", "|---|--:|---|"]
    out += [f"| {q} | {v} | {f} |" for q, v, f in rows]
    return "\n".join(out) + "\n"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    load = ap.add_argument_group("load")
    load.add_argument("--rps", type=float, default=1e6, help="requests per second, all servers")
    load.add_argument("--clients", type=float, default=1e8, help="distinct clients in total")
    load.add_argument("--servers", type=int, default=500, help="app servers")
    load.add_argument("--limit", type=int, default=100, help="the policy's limit (tokens)")
    load.add_argument("--window", type=float, default=60.0, help="the policy's window (s)")
    load.add_argument("--tick", type=float, default=None, help="aggregator tick (s)")
    load.add_argument(
        "--report-interval", type=float, default=DEFAULT_REPORT_INTERVAL, help="agent (s)"
    )
    a = ap.add_argument_group("assumptions")
    a.add_argument(
        "--active-fraction",
        type=float,
        default=0.1,
        help="share of all clients with at least one request in a window",
    )
    a.add_argument(
        "--routing",
        choices=("random", "sticky"),
        default="random",
        help="random: a client's requests go to any server; sticky: always the same one",
    )
    a.add_argument(
        "--requests-per-record",
        type=float,
        default=1.0,
        help="requests that share one usage record (same client, server and report interval)",
    )
    a.add_argument("--server-id-bytes", type=int, default=16)
    a.add_argument("--aggregator-id-bytes", type=int, default=24)
    a.add_argument(
        "--kafka-overhead", type=float, default=70.0, help="bytes of record-batch framing/message"
    )
    a.add_argument("--replication", type=int, default=3, help="replicas per partition")
    a.add_argument(
        "--broker-mb", type=float, default=200.0, help="MB/s one broker takes in, and out"
    )
    a.add_argument("--replicas-per-broker", type=int, default=4000, help="partition replicas")
    a.add_argument(
        "--cpu-target", type=float, default=0.5, help="share of one core an aggregator may use"
    )
    a.add_argument("--aggregator-gib", type=float, default=16.0, help="memory per aggregator")
    a.add_argument(
        "--grants-partitions", type=int, default=None, help="default: one per app server"
    )
    m = ap.add_argument_group("measured in docs/benchmarks.md (its recorded run)")
    m.add_argument("--decode-rate", type=float, default=21.66e6, help="usage records/s decoded")
    m.add_argument("--apply-rate", type=float, default=1.59e6, help="records/s through apply")
    m.add_argument("--tick-ms", type=float, default=67.9, help="one tick at --tick-pairs")
    m.add_argument(
        "--history-ms", type=float, default=1.2, help="of which the demand history's step"
    )
    m.add_argument("--tick-pairs", type=float, default=2_501_138)
    m.add_argument("--advance-ms", type=float, default=6.0, help="ring advance, 1M clients")
    m.add_argument("--grants-ms", type=float, default=7.1, help="grant batches of a tick...")
    m.add_argument("--grants-pairs", type=float, default=827_435, help="...of this many pairs")
    m.add_argument("--first-seen-rate", type=float, default=1.06e6, help="records/s, new keys")
    m.add_argument("--usage-lz4", type=float, default=10.5, help="bytes per usage record")
    m.add_argument("--grant-lz4", type=float, default=10.67, help="bytes per grant record")
    m.add_argument("--decision-ns", type=float, default=860.0, help="lease path, per call")
    m.add_argument("--drain-ns", type=float, default=212.0, help="drain_usage, per client")
    m.add_argument("--apply-grant-ns", type=float, default=1101.0, help="apply_grants, per record")
    s = ap.add_argument_group("sample sizes of the measurements")
    s.add_argument("--sample-clients", type=int, default=200_000, help="aggregator sample")
    s.add_argument("--sample-servers", type=int, default=2, help="servers per sample client")
    s.add_argument("--server-sample", type=int, default=100_000, help="app-server sample")
    return ap.parse_args(argv)


Row = tuple[str, str, str]


def estimate(args: argparse.Namespace) -> str:
    policy = Policy(args.limit, args.window, algorithm="gcra")
    if args.tick is None:
        config = AggregatorConfig(policy)
    else:  # server_timeout must exceed the lease ttl (10 ticks)
        config = AggregatorConfig(policy, tick=args.tick, server_timeout=max(3.0, 20 * args.tick))
    tick, report, heartbeat = config.tick, args.report_interval, DEFAULT_HEARTBEAT_INTERVAL
    started = time.perf_counter()
    agg = measure_aggregator(config, args.sample_clients, args.sample_servers)
    srv = measure_server(policy, args.server_sample)
    measured_s = time.perf_counter() - started
    usage_head, grant_head = header_bytes(args.server_id_bytes, args.aggregator_id_bytes)

    S: int = args.servers
    R: float = args.rps
    W = policy.window
    t_mem = agg.memory_ticks * tick  # demand history: these pairs get a grant every tick
    t_keep = agg.keepalive_ticks * tick  # a pair keeps a small lease this long after demand
    refresh = max(1, agg.memory_ticks // 2)  # ticks between a kept-alive pair's grants

    # -- clients, (client, server) pairs, records
    active = args.clients * args.active_fraction
    per_client = R * W / active  # requests per active client per window
    spread = S * (1 - (1 - 1 / S) ** per_client) if args.routing == "random" else 1.0
    pairs_keep = active * spread * min(1.0, t_keep / W)
    pairs_mem = min(R * t_mem, pairs_keep)
    usage_req = R / args.requests_per_record
    usage_rel = pairs_keep / t_keep  # a kept-alive lease's last tokens come back once
    usage = usage_req + usage_rel
    grants = (pairs_mem + (pairs_keep - pairs_mem) / refresh) / tick

    # -- aggregators: CPU (cores) and memory
    # the benchmark's tick had every pair in the demand history once (--tick-pairs entries)
    pair_ns = (args.tick_ms - args.history_ms) * 1e6 / args.tick_pairs
    entry_ns = args.history_ms * 1e6 / args.tick_pairs
    entries = usage_req * t_mem  # (pair, tokens) entries in the demand history
    grant_ns = args.grants_ms * 1e6 / args.grants_pairs
    cpu: list[tuple[str, float, str]] = [
        ("decode", usage / args.decode_rate, f"usage ÷ {si(args.decode_rate)}/s"),
        ("apply", usage / args.apply_rate, f"usage ÷ {si(args.apply_rate)}/s"),
        (
            "tick",
            (pairs_keep * pair_ns + entries * entry_ns) * 1e-9 / tick,
            f"(kept-alive pairs × {pair_ns:.0f} ns + history entries × {entry_ns:.0f} ns) ÷ tick",
        ),
        (
            "ring advance",
            active * args.advance_ms * 1e-9 / tick,
            f"active clients × {args.advance_ms:g} ns ÷ tick",
        ),
        ("grant batches", grants * grant_ns * 1e-9, f"grant records × {grant_ns:.1f} ns"),
    ]
    cpu_total = sum(v for _, v, _ in cpu)
    history = entries * agg.per_history_entry
    mem_dense = active * agg.per_client + pairs_keep * agg.per_pair + history
    mem_plan = 2 * (mem_dense - history) + history
    a_cpu = math.ceil(cpu_total / args.cpu_target)
    a_mem = math.ceil(mem_plan / (args.aggregator_gib * GIB))
    aggregators = max(1, a_cpu, a_mem)
    partitions = next_pow2(2 * aggregators)
    g_parts = args.grants_partitions or S

    # -- Kafka: usage batches per partition with records, heartbeats, grant batches
    per_report = usage / S * report  # records per server per report
    q = 1 - (1 - 1 / partitions) ** per_report  # a partition gets records in a report
    data_msgs = S * partitions * q / report
    beat_msgs = S * partitions * (1 - q) ** (heartbeat / report) / heartbeat
    usage_msgs = data_msgs + beat_msgs
    usage_bytes = usage_msgs * (usage_head + args.kafka_overhead) + usage * args.usage_lz4
    grant_msgs = aggregators * S / tick
    grant_bytes = grant_msgs * (grant_head + args.kafka_overhead) + grants * args.grant_lz4
    produced = usage_bytes + grant_bytes

    def grant_reads(g: int) -> float:
        """Bytes/s all servers read: each reads its whole grant partition."""
        return float(grant_bytes * (1 + (S - 1) / g))

    cluster_in = produced * args.replication
    cluster_out = produced * (args.replication - 1) + usage_bytes + grant_reads(g_parts)
    replicas = (partitions + g_parts) * args.replication
    brokers = max(
        args.replication,
        math.ceil(cluster_in / (args.broker_mb * MB)),
        math.ceil(cluster_out / (args.broker_mb * MB)),
        math.ceil(replicas / args.replicas_per_broker),
    )
    retention = DEFAULT_RETENTION_MS / 1000
    disk = produced * args.replication * retention
    shortest = (W * 1000 + RETENTION_MARGIN_MS) / 1000  # what `drl topics --limit` accepts
    disk_short = produced * args.replication * shortest

    # -- app servers
    leases = pairs_keep / S
    server_cpu: list[tuple[str, float, str]] = [
        ("decisions", R / S * args.decision_ns * 1e-9, f"rps ÷ servers × {args.decision_ns:g} ns"),
        (
            "drain_usage",
            leases * args.drain_ns * 1e-9 / report,
            f"leases × {args.drain_ns:g} ns ÷ report interval",
        ),
        (
            "apply_grants",
            grants / S * args.apply_grant_ns * 1e-9,
            f"grant records ÷ servers × {args.apply_grant_ns:g} ns",
        ),
    ]
    key_map = srv.traced_per_client - srv.table_per_client
    server_mem = leases * srv.traced_per_client
    # the table at its emptiest: index just doubled (load MAX_LOAD / 2), rows just grown
    worst = INDEX_SLOT / (TABLE_MAX_LOAD / 2) + srv.row * ROW_GROWTH
    server_mem_plan = leases * (worst + key_map)

    load: list[Row] = [
        (
            "requests/s; clients; app servers",
            f"{si(R)}; {si(args.clients)}; {S}",
            "--rps, --clients, --servers",
        ),
        ("policy", f"{policy.limit} per {W:g} s", "--limit, --window"),
        (
            "tick; report interval; heartbeat",
            f"{tick:g} s; {report:g} s; {heartbeat:g} s",
            "AggregatorConfig; producer.agent defaults",
        ),
        (
            "lease ttl; demand history; keepalive",
            f"{config.ttl:g} s; {agg.memory_ticks} ticks ({t_mem:g} s); "
            f"{agg.keepalive_ticks} ticks ({t_keep:g} s)",
            "Aggregator._new_partition",
        ),
        (
            "clients active in a window",
            f"{si(active)} ({args.active_fraction:.0%} of all)",
            "assumption: --active-fraction",
        ),
        ("requests per active client per window", f"{per_client:.3g}", "rps × window ÷ active"),
        ("servers per active client", f"{spread:.3g}", f"assumption: --routing {args.routing}"),
        (
            "pairs kept alive (client, server)",
            si(pairs_keep),
            "active × servers per client × min(1, keepalive ÷ window)",
        ),
        (
            f"pairs with demand in the last {t_mem:g} s",
            si(pairs_mem),
            "min(rps × history, kept alive)",
        ),
        (
            "usage records/s",
            si(usage),
            f"{si(usage_req)} requests ÷ --requests-per-record {args.requests_per_record:g} "
            f"+ {si(usage_rel)} releases (kept alive ÷ keepalive)",
        ),
        (
            "grant records/s",
            si(grants),
            f"(history pairs + other kept-alive pairs ÷ {refresh}) ÷ tick",
        ),
        (
            "hot key: most usage records/s of one client",
            si(S / report),
            "servers ÷ report interval, whatever its request rate",
        ),
        (
            "P(any two clients share a key)",
            f"{args.clients**2 / 2**65:.2g}",
            "n² ÷ 2^65 (limiter/keys.py)",
        ),
    ]
    aggregator: list[Row] = [
        (
            "bytes per tracked client (dense; sample)",
            f"{agg.per_client:.0f} B; {agg.sample_per_client:.0f} B",
            f"PartitionState arrays, {agg.ring_columns} ring columns; "
            f"sample of {si(agg.sample_clients)} clients",
        ),
        (
            "bytes per pair (dense; sample)",
            f"{agg.per_pair:.0f} B; {agg.sample_per_pair:.0f} B",
            f"sample of {si(agg.sample_pairs)} pairs",
        ),
        *((f"CPU: {k}", f"{v:.3g} cores", how) for k, v, how in cpu),
        ("CPU: total", f"{cpu_total:.3g} cores", ""),
        (
            "state, all aggregators (dense; planned)",
            f"{gib(mem_dense)}; {gib(mem_plan)}",
            "planned: 2 × dense (arrays grow by doubling)",
        ),
        (
            "**aggregator processes**",
            f"**{aggregators}**",
            f"max(CPU ÷ --cpu-target {args.cpu_target:g}: {a_cpu}, "
            f"planned memory ÷ {args.aggregator_gib:g} GiB: {a_mem})",
        ),
        ("memory per aggregator (planned)", gib(mem_plan / aggregators), ""),
        (
            "replaying one partition's window",
            f"{usage * W / partitions / args.first_seen_rate:.3g} s",
            f"usage × window ÷ partitions ÷ {si(args.first_seen_rate)}/s (first seen)",
        ),
    ]
    kafka: list[Row] = [
        (
            "**usage partitions**",
            f"**{partitions}**",
            f"power of two ≥ 2 × aggregators (topics default {DEFAULT_USAGE_PARTITIONS})",
        ),
        (
            "grant partitions",
            f"{g_parts}",
            f"--grants-partitions (topics default {DEFAULT_GRANTS_PARTITIONS})",
        ),
        (
            "usage batch: header; record raw, lz4",
            f"{usage_head} B; {wire.USAGE_RECORD.itemsize} B, {args.usage_lz4:g} B",
            "producer.wire; --usage-lz4",
        ),
        (
            "grant batch: header; record raw, lz4",
            f"{grant_head} B; {wire.GRANT_RECORD.itemsize} B, {args.grant_lz4:g} B",
            "producer.wire; --grant-lz4",
        ),
        (
            "usage records per server per report",
            f"{per_report:.3g}",
            "usage ÷ servers × report interval",
        ),
        (
            "usage messages/s (with records; heartbeats)",
            f"{si(usage_msgs)} ({si(data_msgs)}; {si(beat_msgs)})",
            "a batch per partition with records per report; else one per heartbeat",
        ),
        ("grant messages/s", si(grant_msgs), "aggregators × servers ÷ tick"),
        (
            "produced: usage; grants",
            f"{si(usage_bytes, 'B/s')}; {si(grant_bytes, 'B/s')}",
            f"messages × (header + {args.kafka_overhead:g} B) + records × lz4 bytes",
        ),
        (
            "broker traffic in; out (all brokers)",
            f"{si(cluster_in, 'B/s')}; {si(cluster_out, 'B/s')}",
            f"in: produced × {args.replication}; out: replication + aggregators' "
            "and servers' reads",
        ),
        ("partition replicas", f"{replicas}", f"(usage + grant partitions) × {args.replication}"),
        (
            "**brokers**",
            f"**{brokers}**",
            f"max({args.replication}, traffic ÷ {args.broker_mb:g} MB/s, "
            f"replicas ÷ {args.replicas_per_broker})",
        ),
        (
            "disk for the default retention",
            f"{si(disk, 'B')} ({si(disk / brokers, 'B')} per broker)",
            f"produced × {args.replication} × {retention / 3600:g} h (DEFAULT_RETENTION_MS)",
        ),
        (
            "disk for window + margin",
            f"{si(disk_short, 'B')} ({si(disk_short / brokers, 'B')} per broker)",
            f"produced × {args.replication} × {shortest / 3600:.3g} h (RETENTION_MARGIN_MS)",
        ),
    ]
    server: list[Row] = [
        ("leases held (clients tracked)", si(leases), "kept-alive pairs ÷ servers"),
        (
            "bytes per client (table; with key map)",
            f"{srv.table_per_client:.0f} B; {srv.traced_per_client:.0f} B",
            f"memory_bytes()/len; tracemalloc after drain_usage; {srv.row:.0f} B rows; "
            f"sample of {si(srv.clients)} clients",
        ),
        (
            "limiter memory (as sampled; table at its emptiest)",
            f"{si(server_mem, 'B')}; {si(server_mem_plan, 'B')}",
            "leases × bytes per client",
        ),
        *((f"CPU: {k}", f"{v:.3g} cores", how) for k, v, how in server_cpu),
        ("usage out", si(usage_bytes / S, "B/s"), "produced usage ÷ servers"),
        (
            f"grants in ({g_parts} grant partitions)",
            si(grant_reads(g_parts) / S, "B/s"),
            "its grant partition: its own + (servers − 1) ÷ partitions others'",
        ),
        (
            f"grants in ({DEFAULT_GRANTS_PARTITIONS} grant partitions)",
            si(grant_reads(DEFAULT_GRANTS_PARTITIONS) / S, "B/s"),
            "the same at the topics default",
        ),
    ]
    return "\n".join(
        (
            table("Load", load),
            table("Aggregators", aggregator),
            table("Kafka", kafka),
            table("Each app server", server),
            f"Measurements took {measured_s:.1f} s.",
        )
    )


def main(argv: Sequence[str] | None = None) -> int:
    print(estimate(parse_args(argv)))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
