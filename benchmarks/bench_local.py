"""Benchmark of the embedded ``RateLimiter`` against a CPython floor and the ``limits`` library.

``python benchmarks/bench_local.py`` runs the full benchmark (~9 min on 2 cores) and prints Markdown
tables; ``--quick`` is a smoke run (< 30 s); ``--write-docs`` also rewrites the results section
of ``docs/benchmarks.md`` (between ``<!-- bench_local:start -->`` and
``<!-- bench_local:end -->``). Single-threaded; see docs/benchmarks.md for the method.

Every contender is driven by the same loop: client ids are pre-generated strings
``f"client-{i}"``, the call sequence is drawn uniformly at random (seeded) before timing and
split into blocks of ``BLOCK`` calls, and a fresh ``Request()`` is built at the start of every
block for every contender (whether it uses it or not), so that timestamps stay within the
limiter's default ``max_request_age`` and the loop overhead is the same for all. Each block is
timed in chunks of ``CHUNK`` calls.
"""

from __future__ import annotations

import argparse
import gc
import hashlib
import json
import os
import platform
import statistics
import sys
import threading
import time
import tracemalloc
from collections.abc import Callable, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Literal

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from limiter import RateLimiter, Request, compiled  # noqa: E402

try:  # benchmark-only peer, never a runtime dependency of the limiter
    import limits
    import limits.storage
    import limits.strategies
except ImportError:  # pragma: no cover - reported in the output
    limits = None  # type: ignore[assignment, unused-ignore]

DOC = ROOT / "docs" / "benchmarks.md"
START_MARK = "<!-- bench_local:start -->"
END_MARK = "<!-- bench_local:end -->"

#: Calls per block; a new ``Request()`` is stamped at the start of each block.
BLOCK = 1000
#: Calls per timed chunk of a block (two ``perf_counter_ns()`` per chunk: < 0.5 ns per call).
CHUNK = 100
#: A block: ``BLOCK // CHUNK`` chunks of client ids.
Blocks = list[list[list[str]]]
#: The small-limit policy (sliding log, and ``limits``' moving window): 10 per 10 s.
SMALL = (10, 10)
#: The large-limit policy: 1,000,000 per 100,000,000 s. Never exhausted during a run (every call
#: takes the admit path) and slow enough to refill (0.01 token/s: one request keeps a client
#: busy for 100 s) that no tracked client turns idle, and so reclaimable, during a run: the
#: client table keeps its full size and timed calls never insert.
LARGE = (1_000_000, 100_000_000)
ALGORITHMS = ("sliding_log", "token_bucket", "gcra", "fixed_window", "sliding_window")
#: Algorithms also measured on the pure-Python request path (DRL_PURE_PYTHON=1).
PURE_PYTHON_ROWS = ("sliding_log", "gcra")

Shape = Literal["req", "one", "item"]
Call = Callable[..., object]


# -- contenders -------------------------------------------------------------------------------


@dataclass
class Built:
    """A contender ready to be called: ``call(cid, req)``, ``call(cid)`` or ``call(item, cid)``."""

    call: Call
    shape: Shape
    item: object = None
    tracked: Callable[[], int] | None = None
    table_bytes: Callable[[], int] | None = None
    close: Callable[[], None] = lambda: None


@dataclass(frozen=True)
class Contender:
    name: str
    policy: str
    build: Callable[[bool], Built]  # argument: True for the memory run (long windows)


def make_floor(limit: int, window: float) -> tuple[Callable[[str, Request], bool], dict[str, Any]]:
    """The CPython floor: a plain function over a dict of client id -> [tokens, last]."""
    buckets: dict[str, list[float]] = {}
    capacity = float(limit)
    rate = limit / window

    def allow(cid: str, req: Request) -> bool:
        now = req.timestamp
        b = buckets.get(cid)
        if b is None:
            buckets[cid] = [capacity - 1.0, now]
            return True
        tokens = b[0] + (now - b[1]) * rate
        if tokens > capacity:
            tokens = capacity
        b[1] = now
        if tokens < 1.0:
            b[0] = tokens
            return False
        b[0] = tokens - 1.0
        return True

    return allow, buckets


def _floor(memory: bool) -> Built:
    allow, buckets = make_floor(*LARGE)
    return Built(allow, "req", tracked=buckets.__len__)


def pure_python_limiter(*args: Any, **options: Any) -> RateLimiter:
    """A ``RateLimiter`` on the pure-Python request path (the closure), built or not."""
    old = os.environ.get(compiled.PURE_PYTHON_ENV)
    os.environ[compiled.PURE_PYTHON_ENV] = "1"
    try:
        return RateLimiter(*args, **options)
    finally:
        if old is None:
            del os.environ[compiled.PURE_PYTHON_ENV]
        else:
            os.environ[compiled.PURE_PYTHON_ENV] = old


def _limiter(
    algorithm: str, *, check: bool = False, metrics: bool = False, pure: bool = False
) -> Callable[[bool], Built]:
    def build(memory: bool) -> Built:
        limit, window = SMALL if algorithm == "sliding_log" else LARGE
        if memory and algorithm == "sliding_log":
            window = 3600  # nothing turns idle while 1M clients are inserted
        make = pure_python_limiter if pure else RateLimiter
        rl = make(limit, window, algorithm=algorithm, metrics=metrics)
        if check:
            return Built(rl.check, "one", tracked=rl.__len__, table_bytes=rl.memory_bytes)
        return Built(rl.allow_request, "req", tracked=rl.__len__, table_bytes=rl.memory_bytes)

    return build


def _limits(strategy: str) -> Callable[[bool], Built]:
    def build(memory: bool) -> Built:
        assert limits is not None
        storage = limits.storage.MemoryStorage()
        if strategy == "moving_window":
            amount, seconds = SMALL
            if memory:
                seconds = 3600
            strat: limits.strategies.RateLimiter = limits.strategies.MovingWindowRateLimiter(
                storage
            )
        else:
            amount, seconds = LARGE
            strat = limits.strategies.SlidingWindowCounterRateLimiter(storage)
        item = limits.RateLimitItemPerSecond(amount, seconds)

        def close() -> None:
            # MemoryStorage re-arms a 10 ms threading.Timer (sweeping every key) on each hit.
            storage.timer.cancel()
            if storage.timer.is_alive():
                storage.timer.join()

        def tracked() -> int:
            return len(storage.events) if strategy == "moving_window" else len(storage.storage)

        return Built(strat.hit, "item", item=item, tracked=tracked, close=close)

    return build


def contenders() -> list[Contender]:
    s_lim, s_win = SMALL
    l_lim, l_win = LARGE
    small = f"{s_lim} per {s_win} s"
    large = f"{l_lim:,} per {l_win:,} s"
    out = [Contender("floor: dict + plain function (token bucket)", large, _floor)]
    path = "compiled" if compiled.enabled() else "pure Python: the extension is not built"
    for algo in ALGORITHMS:
        policy = small if algo == "sliding_log" else large
        out.append(Contender(f"allow_request, {algo} ({path})", policy, _limiter(algo)))
    for algo in PURE_PYTHON_ROWS:
        policy = small if algo == "sliding_log" else large
        name = f"allow_request, {algo} (pure Python)"
        out.append(Contender(name, policy, _limiter(algo, pure=True)))
    out.append(Contender("check() -> Decision, gcra", large, _limiter("gcra", check=True)))
    out.append(
        Contender("allow_request, gcra, metrics=True", large, _limiter("gcra", metrics=True))
    )
    if limits is not None:
        out.append(Contender("limits MovingWindow (memory)", small, _limits("moving_window")))
        out.append(Contender("limits SlidingWindowCounter (memory)", large, _limits("swc")))
    return out


# -- the loops: identical for every contender but for the call's arguments ---------------------


def run_blocks(built: Built, blocks: Blocks) -> tuple[int, list[int]]:
    """Run every call. Returns elapsed ns of the whole loop and of each chunk.

    The median chunk is robust to the preemptions a busy machine inflicts on the whole loop.
    """
    f, item = built.call, built.item
    pc = time.perf_counter_ns
    per_chunk: list[int] = []
    app = per_chunk.append
    if built.shape == "req":
        t0 = pc()
        for block in blocks:
            req = Request()
            for chunk in block:
                tc = pc()
                for cid in chunk:
                    f(cid, req)
                app(pc() - tc)
        return pc() - t0, per_chunk
    if built.shape == "one":
        t0 = pc()
        for block in blocks:
            req = Request()  # same loop work as the other shapes
            for chunk in block:
                tc = pc()
                for cid in chunk:
                    f(cid)
                app(pc() - tc)
        return pc() - t0, per_chunk
    t0 = pc()
    for block in blocks:
        req = Request()
        for chunk in block:
            tc = pc()
            for cid in chunk:
                f(item, cid)
            app(pc() - tc)
    return pc() - t0, per_chunk


def calls_in(blocks: Blocks) -> int:
    return sum(len(chunk) for block in blocks for chunk in block)


def chunk_median_rate(blocks: Blocks, per_chunk: Sequence[int]) -> float:
    """Decisions/s of the median chunk."""
    sizes = [len(chunk) for block in blocks for chunk in block]
    return float(1e9 / np.median([ns / k for k, ns in zip(sizes, per_chunk, strict=True)]))


def time_calls(built: Built, blocks: Blocks) -> tuple[list[int], int]:
    """Per-call ``perf_counter_ns`` differences (timer overhead included) and calls admitted."""
    f, item = built.call, built.item
    pc = time.perf_counter_ns
    out: list[int] = []
    app = out.append
    ok = 0
    for block in blocks:
        req = Request()
        for chunk in block:
            if built.shape == "req":
                for cid in chunk:
                    t0 = pc()
                    r = f(cid, req)
                    t1 = pc()
                    app(t1 - t0)
                    if r:
                        ok += 1
            elif built.shape == "one":
                for cid in chunk:
                    t0 = pc()
                    r = f(cid)
                    t1 = pc()
                    app(t1 - t0)
                    if r:
                        ok += 1
            else:
                for cid in chunk:
                    t0 = pc()
                    r = f(item, cid)
                    t1 = pc()
                    app(t1 - t0)
                    if r:
                        ok += 1
    return out, ok


def timer_overhead_ns(samples: int = 200_000) -> float:
    """Median of back-to-back ``perf_counter_ns()`` pairs: subtracted from per-call latencies."""
    pc = time.perf_counter_ns
    d = []
    for _ in range(samples):
        t0 = pc()
        t1 = pc()
        d.append(t1 - t0)
    return float(statistics.median(d))


# -- the throughput / latency run ---------------------------------------------------------------


@dataclass
class Config:
    sizes: tuple[int, ...]
    calls: dict[int, int]  # per client count: most timed calls (decisions/s)
    warmup: dict[int, int]  # untimed calls after inserting the clients
    latency_calls: dict[int, int]  # individually timed calls (p50/p99)
    rounds: int
    memory_clients: int
    breakdown_calls: int
    #: Slow contenders get fewer timed calls: as many as the warm-up says fit in this many
    #: seconds, but at least ``min_calls`` (a prefix of the same call sequence).
    budget_s: float = 1.5
    min_calls: int = 200_000
    seed: int = 20240607


@dataclass
class Sample:
    calls: int  # timed calls
    rate: float  # decisions/s over the whole timed loop
    chunk_rate: float  # decisions/s of the median chunk of the timed loop
    p50: float  # ns, timer overhead subtracted
    p99: float
    admitted: float  # fraction admitted during the latency pass
    insert_rate: float  # first-seen decisions/s while inserting the n clients
    tracked: int  # clients tracked after the run


@dataclass
class Row:
    contender: str
    policy: str
    clients: int
    samples: list[Sample] = field(default_factory=list)

    def median(self, attr: str) -> float:
        return float(statistics.median(getattr(s, attr) for s in self.samples))


def blocks_of(ids: list[str], idx: np.ndarray) -> Blocks:
    seq = [ids[i] for i in idx.tolist()]
    return [
        [seq[c : c + CHUNK] for c in range(b, min(b + BLOCK, len(seq)), CHUNK)]
        for b in range(0, len(seq), BLOCK)
    ]


def run_one(
    cfg: Config,
    c: Contender,
    insert: Blocks,
    warm: Blocks,
    timed: Blocks,
    lat: Blocks,
    overhead: float,
) -> Sample:
    built = c.build(False)
    try:
        gc.collect()
        t_ins, _ = run_blocks(built, insert)
        t_warm, _ = run_blocks(built, warm)
        per_call = t_warm / 1e9 / calls_in(warm)
        want = max(cfg.min_calls, int(cfg.budget_s / per_call))
        timed = timed[: -(-want // BLOCK)]
        gc.collect()
        elapsed, per_chunk = run_blocks(built, timed)
        n = calls_in(timed)
        lats, ok = time_calls(built, lat)
        arr = np.asarray(lats, dtype=np.float64) - overhead
        tracked = built.tracked() if built.tracked else -1
        return Sample(
            calls=n,
            rate=n / (elapsed / 1e9),
            chunk_rate=chunk_median_rate(timed, per_chunk),
            p50=float(np.percentile(arr, 50)),
            p99=float(np.percentile(arr, 99)),
            admitted=ok / len(lats),
            insert_rate=calls_in(insert) / (t_ins / 1e9),
            tracked=tracked,
        )
    finally:
        built.close()
        del built
        gc.collect()


def throughput(
    cfg: Config, cs: list[Contender], overhead: float, log: Callable[[str], None]
) -> list[Row]:
    rng = np.random.default_rng(cfg.seed)
    rows: list[Row] = []
    for n in cfg.sizes:
        ids = [f"client-{i}" for i in range(n)]
        insert = blocks_of(ids, rng.permutation(n))
        warm = blocks_of(ids, rng.integers(0, n, cfg.warmup[n]))
        timed = blocks_of(ids, rng.integers(0, n, cfg.calls[n]))
        lat = blocks_of(ids, rng.integers(0, n, cfg.latency_calls[n]))
        by_name = {c.name: Row(c.name, c.policy, n) for c in cs}
        for r in range(cfg.rounds):
            order = cs[r % len(cs) :] + cs[: r % len(cs)]  # rotate: spread drift over contenders
            for c in order:
                t0 = time.perf_counter()
                s = run_one(cfg, c, insert, warm, timed, lat, overhead)
                by_name[c.name].samples.append(s)
                log(
                    f"  n={n:>9,} round {r + 1}/{cfg.rounds} {c.name:<45} "
                    f"{s.rate / 1e6:6.3f} M/s (chunk median {s.chunk_rate / 1e6:6.3f}, "
                    f"{s.calls:,} calls)  "
                    f"p50 {s.p50:7.0f} ns  p99 {s.p99:7.0f} ns  "
                    f"admitted {s.admitted:6.1%}  ({time.perf_counter() - t0:.1f} s)"
                )
        rows.extend(by_name.values())
        del ids, insert, warm, timed, lat
        gc.collect()
    return rows


# -- memory -------------------------------------------------------------------------------------


@dataclass
class MemRow:
    contender: str
    policy: str
    clients: int
    traced_per_client: float  # (traced after - traced before) / clients
    peak_per_client: float  # (traced peak - traced before) / clients
    tracked: int
    table_per_client: float | None  # RateLimiter.memory_bytes() / len(limiter)


def memory(cfg: Config, cs: list[Contender], log: Callable[[str], None]) -> list[MemRow]:
    n = cfg.memory_clients
    ids = [f"client-{i}" for i in range(n)]  # allocated before tracing, for everybody
    insert = blocks_of(ids, np.random.default_rng(cfg.seed + 1).permutation(n))
    out: list[MemRow] = []
    for c in cs:
        if c.name.startswith("check()") or "metrics" in c.name or "(pure Python)" in c.name:
            continue  # the same table as the compiled allow_request row
        t0 = time.perf_counter()
        gc.collect()
        tracemalloc.start()
        before = tracemalloc.get_traced_memory()[0]
        built = c.build(True)
        run_blocks(built, insert)
        built.close()  # stops limits' sweeper thread before reading
        gc.collect()
        after, peak = tracemalloc.get_traced_memory()
        tracemalloc.stop()
        tracked = built.tracked() if built.tracked else -1
        table = built.table_bytes() / tracked if built.table_bytes and tracked > 0 else None
        policy = c.policy
        if c.name.endswith("sliding_log") or "MovingWindow" in c.name:
            policy = f"{SMALL[0]} per 3600 s"
        row = MemRow(c.name, policy, n, (after - before) / n, (peak - before) / n, tracked, table)
        out.append(row)
        log(
            f"  memory {c.name:<45} {row.traced_per_client:7.1f} B/client "
            f"(peak {row.peak_per_client:7.1f}), tracked {tracked:,}  "
            f"({time.perf_counter() - t0:.1f} s)"
        )
        del built
        gc.collect()
    return out


# -- where the time goes in allow_request ------------------------------------------------------


class _Steps:
    """``allow_request`` cut short after each step, on a real limiter's table (reads internals).

    Each method repeats the first lines of ``RateLimiter.allow_request`` up to a point; the
    differences between consecutive steps are what each step costs.
    """

    __slots__ = ("_clock", "_max_age", "_max_skew", "_shard_mask", "_shards")

    def __init__(self, rl: RateLimiter) -> None:
        self._clock = rl._clock
        self._max_age = rl._max_age
        self._max_skew = rl._max_skew
        self._shards = rl._shards
        self._shard_mask = rl._shard_mask

    def call_only(self, client_id: str, request: Request) -> bool:
        return True

    def checks(self, client_id: str, request: Request) -> bool:
        if type(client_id) is not str or not 0 < len(client_id) <= 256:
            raise ValueError(client_id)
        now = request.timestamp
        t = self._clock()
        return not (now < t - self._max_age or now > t + self._max_skew)

    def home(self, client_id: str, request: Request) -> bool:
        if type(client_id) is not str or not 0 < len(client_id) <= 256:
            raise ValueError(client_id)
        now = request.timestamp
        t = self._clock()
        if now < t - self._max_age or now > t + self._max_skew:
            return False
        h = hash(client_id) or 1
        shard = self._shards[h & self._shard_mask]
        kv = shard.kv
        mask = shard.mask
        i = (h >> shard.shift) & mask
        return kv[i] == h  # not in its home slot: stop here

    def probe(self, client_id: str, request: Request) -> bool:
        if type(client_id) is not str or not 0 < len(client_id) <= 256:
            raise ValueError(client_id)
        now = request.timestamp
        t = self._clock()
        if now < t - self._max_age or now > t + self._max_skew:
            return False
        h = hash(client_id) or 1
        shard = self._shards[h & self._shard_mask]
        kv = shard.kv
        mask = shard.mask
        i = (h >> shard.shift) & mask
        k = kv[i]
        while k != h:
            if not k:
                return shard.insert(h, now) >= 0
            i = (i + 1) & mask
            k = kv[i]
        return True

    def locked(self, client_id: str, request: Request) -> bool:
        if type(client_id) is not str or not 0 < len(client_id) <= 256:
            raise ValueError(client_id)
        now = request.timestamp
        t = self._clock()
        if now < t - self._max_age or now > t + self._max_skew:
            return False
        h = hash(client_id) or 1
        shard = self._shards[h & self._shard_mask]
        lock = shard.lock
        lock.acquire()
        try:
            kv = shard.kv
            mask = shard.mask
            i = (h >> shard.shift) & mask
            k = kv[i]
            while k != h:
                if not k:
                    return shard.insert(h, now) >= 0
                i = (i + 1) & mask
                k = kv[i]
            return True
        finally:
            lock.release()

    def displaced(self, ids: Sequence[str]) -> float:
        """Share of ``ids`` not in their home slot (their look-up calls ``Shard.insert``)."""
        away = 0
        for cid in ids:
            h = hash(cid) or 1
            shard = self._shards[h & self._shard_mask]
            away += shard.kv[(h >> shard.shift) & shard.mask] != h
        return away / len(ids)


@dataclass
class Step:
    step: str
    ns: float  # median ns per call (whole loop / calls)
    vs: int | None = None  # index of the step this one adds to


@dataclass
class Breakdown:
    what: str
    steps: list[Step]


def breakdown(cfg: Config, log: Callable[[str], None]) -> Breakdown:
    n = min(cfg.sizes)
    ids = [f"client-{i}" for i in range(n)]
    rng = np.random.default_rng(cfg.seed + 2)
    timed = blocks_of(ids, rng.integers(0, n, cfg.breakdown_calls))
    allow, _ = make_floor(*LARGE)
    rl = pure_python_limiter(*LARGE, algorithm="gcra")
    run_blocks(Built(allow, "req"), blocks_of(ids, rng.permutation(n)))
    run_blocks(Built(rl.allow_request, "req"), blocks_of(ids, rng.permutation(n)))
    cut = _Steps(rl)
    away = cut.displaced(ids)

    def nothing(client_id: str, request: Request) -> bool:
        return True

    variants: list[tuple[str, Call, int | None]] = [
        ("plain function returning True: loop + call", nothing, None),
        ("floor: dict + plain function (token bucket)", allow, 0),
        ("method returning True", cut.call_only, 0),
        ("+ client id check, request.timestamp, clock(), age/skew checks", cut.checks, 2),
        ("+ hash(), shard select, home slot index, int64 memoryview read", cut.home, 3),
        (
            f"+ linear probe for the {away:.0%} of clients not in their home slot",
            cut.probe,
            4,
        ),
        ("+ shard lock acquire/release (try/finally)", cut.locked, 5),
        ("+ the gcra step and the rest = allow_request (pure Python)", rl.allow_request, 6),
    ]
    times: list[list[float]] = [[] for _ in variants]
    for r in range(cfg.rounds):
        order = list(range(len(variants)))
        for k in order[r % len(order) :] + order[: r % len(order)]:
            b = Built(variants[k][1], "req")
            run_blocks(b, timed[: max(1, len(timed) // 10)])  # warm-up
            times[k].append(1e9 / chunk_median_rate(timed, run_blocks(b, timed)[1]))
    out = [
        Step(name, float(statistics.median(t)), vs)
        for (name, _, vs), t in zip(variants, times, strict=True)
    ]
    for st in out:
        log(f"  breakdown {st.step:<75} {st.ns:7.1f} ns/call")
    return Breakdown(
        f"the pure-Python closure, gcra, {LARGE[0]:,} per {LARGE[1]:,} s, {n:,} clients", out
    )


# -- report -------------------------------------------------------------------------------------


def machine() -> dict[str, str]:
    cpu = "unknown"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    try:
        clock = Path("/sys/devices/system/clocksource/clocksource0/current_clocksource")
        clocksource = clock.read_text().strip()
    except OSError:
        clocksource = "unknown"
    digest = hashlib.sha256()
    for f in sorted((ROOT / "limiter").glob("*.py")):
        digest.update(f.name.encode() + b"\0" + f.read_bytes())
    return {
        "cpu": cpu,
        "cores": str(os.cpu_count()),
        "python": f"{platform.python_version()} ({platform.python_implementation()})",
        "numpy": np.__version__,
        "limits": getattr(limits, "__version__", "?") if limits else "not installed",
        "platform": platform.platform(),
        "clocksource": clocksource,
        "limiter_sha256": digest.hexdigest()[:12],
        "loadavg_start": loadavg(),
    }


def loadavg() -> str:
    try:
        return " ".join(f"{x:.2f}" for x in os.getloadavg())
    except OSError:
        return "unknown"


def fmt_count(x: float) -> str:
    return f"{x / 1e6:g}M" if x >= 1e6 else f"{x / 1e3:g}k"


def fmt_rate(x: float) -> str:
    return f"{x / 1e6:.2f} M/s" if x >= 1e6 else f"{x / 1e3:.0f} k/s"


def report(
    cfg: Config,
    command: str,
    facts: dict[str, str],
    rows: list[Row],
    mem: list[MemRow],
    cuts: Breakdown | None,
    overhead: float,
    seconds: float,
) -> str:
    per_size = "; ".join(
        f"{n:,} clients: {cfg.warmup[n]:,} warm-up, up to {cfg.calls[n]:,} timed, "
        f"{cfg.latency_calls[n]:,} latency calls"
        for n in cfg.sizes
    )
    lines = [
        f"Command: `{command}` ({seconds:.0f} s wall, {time.strftime('%Y-%m-%d')}; "
        f"limiter/*.py sha256 {facts['limiter_sha256']}).",
        "",
        f"Machine: {facts['cpu']}, {facts['cores']} cores, {facts['platform']}; "
        f"Python {facts['python']}, numpy {facts['numpy']}, limits {facts['limits']}; "
        f"clocksource {facts['clocksource']}, perf_counter_ns pair overhead {overhead:.0f} ns; "
        f"load average {facts['loadavg_start']} at start, {facts['loadavg_end']} at end.",
        "",
        f"Median of {cfg.rounds} interleaved round(s) ({per_size}; *timed*: the timed calls, "
        f"fewer for contenders too slow to do them all in {cfg.budget_s:g} s, at least "
        f"{cfg.min_calls:,}). *decisions/s*: timed calls ÷ time of the whole loop; *vs floor*: "
        "floor decisions/s ÷ contender decisions/s, same run (target for `allow_request`: "
        f"≤ 4×); *chunk median*: the same from the median {CHUNK}-call chunk of the timed loop "
        "(robust to preemption by other processes); *p50*/*p99*: individually timed calls, "
        "timer overhead subtracted; *admitted*: share of the latency calls admitted; "
        "*first seen*: decisions/s while each client is inserted once.",
        "",
        "| contender | policy | clients | timed | decisions/s | vs floor | chunk median "
        "| vs floor | p50 ns | p99 ns | admitted | first seen |",
        "|---|---|--:|--:|--:|--:|--:|--:|--:|--:|--:|--:|",
    ]
    for n in cfg.sizes:
        at_n = [r for r in rows if r.clients == n]
        floor_row = next(r for r in at_n if r.contender.startswith("floor"))
        floor, floor_c = floor_row.median("rate"), floor_row.median("chunk_rate")
        for r in at_n:
            rate, rate_c = r.median("rate"), r.median("chunk_rate")
            lines.append(
                f"| {r.contender} | {r.policy} | {n:,} | {fmt_count(r.median('calls'))} | "
                f"{fmt_rate(rate)} | "
                f"{floor / rate:.2f}× | {fmt_rate(rate_c)} | {floor_c / rate_c:.2f}× | "
                f"{r.median('p50'):.0f} | {r.median('p99'):.0f} | "
                f"{r.median('admitted'):.0%} | {fmt_rate(r.median('insert_rate'))} |"
            )
    lines += [
        "",
        f"Memory per tracked client after inserting {cfg.memory_clients:,} clients "
        "(tracemalloc: traced after − traced before, ÷ clients; id strings allocated before "
        "tracing; *peak* includes the transient old + new arrays of a table doubling). "
        "Target: < 100 bytes per tracked client.",
        "",
        "| contender | policy | tracked | traced B/client | peak B/client | memory_bytes()/len |",
        "|---|---|--:|--:|--:|--:|",
    ]
    for m in mem:
        table = f"{m.table_per_client:.1f}" if m.table_per_client is not None else "–"
        lines.append(
            f"| {m.contender} | {m.policy} | {m.tracked:,} | {m.traced_per_client:.1f} | "
            f"{m.peak_per_client:.1f} | {table} |"
        )
    if cuts is not None:
        lines += [
            "",
            f"Where the time goes in `allow_request` ({cuts.what}): the same loop over cumulative "
            f"cuts of its code; ns per call of the median {CHUNK}-call chunk (loop overhead "
            "included), median of the rounds; *step* = this line − the line it adds to.",
            "",
            "| variant | ns/call | step |",
            "|---|--:|--:|",
        ]
        for st in cuts.steps:
            step = "" if st.vs is None else f"{st.ns - cuts.steps[st.vs].ns:+.0f}"
            lines.append(f"| {st.step} | {st.ns:.0f} | {step} |")
    return "\n".join(lines) + "\n"


def write_docs(text: str) -> None:
    block = f"{START_MARK}\n{text}{END_MARK}"
    if not DOC.exists():
        DOC.parent.mkdir(parents=True, exist_ok=True)
        DOC.write_text(f"# Benchmarks\n\n{block}\n")
        return
    doc = DOC.read_text()
    start, end = doc.find(START_MARK), doc.find(END_MARK)
    if start < 0 or end < start:
        raise SystemExit(f"{DOC}: markers {START_MARK} / {END_MARK} not found")
    DOC.write_text(doc[:start] + block + doc[end + len(END_MARK) :])


def main(argv: Sequence[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0] if __doc__ else None)
    p.add_argument("--quick", action="store_true", help="short smoke run (< 30 s)")
    p.add_argument("--write-docs", action="store_true", help=f"rewrite the results in {DOC}")
    p.add_argument("--rounds", type=int, help="interleaved rounds (median taken)")
    p.add_argument("--json", type=Path, help="also write the raw results here")
    p.add_argument("--no-breakdown", action="store_true", help="skip the allow_request cuts")
    p.add_argument("-q", "--quiet", action="store_true", help="no progress on stderr")
    args = p.parse_args(argv)

    if args.quick:
        cfg = Config(
            sizes=(10_000, 50_000),
            calls={10_000: 100_000, 50_000: 100_000},
            warmup={10_000: 10_000, 50_000: 10_000},
            latency_calls={10_000: 10_000, 50_000: 10_000},
            rounds=1,
            memory_clients=50_000,
            breakdown_calls=200_000,
            min_calls=100_000,
        )
    else:
        cfg = Config(
            sizes=(10_000, 1_000_000),
            calls={10_000: 1_000_000, 1_000_000: 500_000},
            warmup={10_000: 100_000, 1_000_000: 50_000},
            latency_calls={10_000: 100_000, 1_000_000: 50_000},
            rounds=3,
            memory_clients=1_000_000,
            breakdown_calls=1_000_000,
        )
    if args.rounds:
        cfg.rounds = args.rounds

    def log(msg: str) -> None:
        if not args.quiet:
            print(msg, file=sys.stderr, flush=True)

    command = "python benchmarks/bench_local.py" + "".join(
        f" {a}" for a in (argv if argv is not None else sys.argv[1:])
    )
    facts = machine()
    log(f"{command}: {facts}")
    if limits is None:
        log("  limits is not installed: pip install 'limits>=3.13' to compare against it")
    t0 = time.perf_counter()
    cs = contenders()
    overhead = timer_overhead_ns()
    rows = throughput(cfg, cs, overhead, log)
    log(f"  throughput done at {time.perf_counter() - t0:.0f} s")
    mem = memory(cfg, cs, log)
    log(f"  memory done at {time.perf_counter() - t0:.0f} s")
    cuts = None
    if not args.no_breakdown:
        try:
            cuts = breakdown(cfg, log)
        except (AttributeError, TypeError) as e:  # the limiter's internals changed
            log(f"  breakdown skipped: {e!r}")
    seconds = time.perf_counter() - t0
    facts["loadavg_end"] = loadavg()
    text = report(cfg, command, facts, rows, mem, cuts, overhead, seconds)
    print(text)
    if args.json:
        args.json.write_text(
            json.dumps(
                {
                    "machine": facts,
                    "config": asdict(cfg),
                    "rows": [asdict(r) for r in rows],
                    "memory": [asdict(m) for m in mem],
                    "breakdown": asdict(cuts) if cuts else None,
                },
                indent=1,
            )
        )
    if args.write_docs:
        write_docs(text)
        log(f"wrote {DOC}")
    n_threads = threading.active_count()
    if n_threads > 1:
        log(f"  note: {n_threads - 1} stray thread(s) still alive")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
