"""A separate process for the strict-mode tests and measurements.

``hammer``: several threads hammer one client of a :class:`StrictLimiter` from ``--start`` (epoch
seconds, so that several processes start together) for ``--duration`` seconds, then print one JSON
object: the Redis server times (integer microseconds) of every admitted request, and counts.

``bench``: per-decision latency of strict mode (both algorithms) against the local
``RateLimiter``, one thread, then strict throughput with several threads; prints a table.

    .venv/bin/python tests/strict/strict_worker.py bench --url redis://127.0.0.1:36379/0
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import threading
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from limiter import RateLimiter, StrictLimiter


def hammer(args: argparse.Namespace) -> None:
    limiter = StrictLimiter(
        args.url,
        args.rate,
        algorithm=args.algorithm,
        key_prefix=args.prefix,
        timeout_ms=1000,
        failure_mode="fail_closed",
    )
    admitted: list[int] = []
    counts = {"refused": 0, "without_redis": 0, "decisions": 0}
    lock = threading.Lock()
    deadline = args.start + args.duration

    def run() -> None:
        mine: list[int] = []
        refused = without = n = 0
        while time.time() < args.start:
            time.sleep(0.0005)
        while time.time() < deadline:
            decision, server_time = limiter.check_with_server_time(args.client)
            n += 1
            if server_time is None:
                without += 1
            elif decision.allowed:
                mine.append(round(server_time * 1_000_000))
            else:
                refused += 1
        with lock:
            admitted.extend(mine)
            counts["refused"] += refused
            counts["without_redis"] += without
            counts["decisions"] += n

    threads = [threading.Thread(target=run) for _ in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    limiter.close()
    print(json.dumps({"pid": os.getpid(), "admitted": sorted(admitted), **counts}))


def _percentiles(samples: list[float]) -> tuple[float, float, float]:
    samples.sort()
    n = len(samples)
    return (
        samples[n // 2] * 1e6,
        samples[min(n - 1, int(n * 0.99))] * 1e6,
        statistics.fmean(samples) * 1e6,
    )


def bench(args: argparse.Namespace) -> None:
    prefix = f"drl-bench:{uuid.uuid4().hex[:8]}:"
    rows: list[tuple[str, float, float, float]] = []
    n = args.n

    local = RateLimiter(policies="1000000/second; 100000000/hour", algorithm="gcra")
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        local.check(f"client-{i % 1000}")
        samples.append(time.perf_counter() - t0)
    rows.append(("local RateLimiter.check (gcra, 2 policies)", *_percentiles(samples)))

    for algorithm in ("gcra", "sliding_window"):
        strict = StrictLimiter(
            args.url, "1000000/second; 100000000/hour", algorithm=algorithm, key_prefix=prefix
        )
        strict.check("warm-up")
        samples = []
        for i in range(n):
            t0 = time.perf_counter()
            strict.check(f"client-{i % 1000}")
            samples.append(time.perf_counter() - t0)
        rows.append((f"StrictLimiter.check ({algorithm}, 2 policies)", *_percentiles(samples)))
        strict.close()

    dead = StrictLimiter(
        "redis://127.0.0.1:1/0", "10/second", failure_mode="fail_open_bounded", breaker_cooldown=60
    )
    for _ in range(10):
        dead.check("x")  # opens the breaker (connection refused)
    samples = []
    for i in range(n):
        t0 = time.perf_counter()
        dead.check(f"client-{i % 1000}")
        samples.append(time.perf_counter() - t0)
    rows.append(("StrictLimiter.check, breaker open (fallback)", *_percentiles(samples)))

    print(f"{'decision':<48} {'p50 us':>9} {'p99 us':>9} {'mean us':>9}")
    for name, p50, p99, mean in rows:
        print(f"{name:<48} {p50:9.1f} {p99:9.1f} {mean:9.1f}")

    strict = StrictLimiter(args.url, "1000000/second", algorithm="gcra", key_prefix=prefix)
    done = [0] * args.threads
    stop = time.perf_counter() + 2.0

    def run(k: int) -> None:
        i = 0
        while time.perf_counter() < stop:
            strict.check(f"client-{k}-{i % 100}")
            i += 1
        done[k] = i

    threads = [threading.Thread(target=run, args=(k,)) for k in range(args.threads)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    print(f"strict gcra throughput, {args.threads} threads, one process: {sum(done) / 2.0:,.0f}/s")
    keys = list(strict._redis.scan_iter(match=prefix + "*", count=1000))
    if keys:
        strict._redis.delete(*keys)
    strict.close()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    h = sub.add_parser("hammer")
    h.add_argument("--url", required=True)
    h.add_argument("--prefix", required=True)
    h.add_argument("--client", required=True)
    h.add_argument("--algorithm", required=True)
    h.add_argument("--rate", required=True)
    h.add_argument("--threads", type=int, default=4)
    h.add_argument("--start", type=float, required=True)
    h.add_argument("--duration", type=float, required=True)
    b = sub.add_parser("bench")
    b.add_argument("--url", required=True)
    b.add_argument("-n", type=int, default=20000)
    b.add_argument("--threads", type=int, default=8)
    args = parser.parse_args()
    hammer(args) if args.command == "hammer" else bench(args)


if __name__ == "__main__":
    main()
