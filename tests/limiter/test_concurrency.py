"""Thread safety in local mode, and waiting for an allowance with ``acquire``/``acquire_async``."""

from __future__ import annotations

import asyncio
import random
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable, Iterator

import pytest
from reference import make_model

from limiter import AcquireTimeout, RateLimiter, RateLimitExceeded, Reason, Request
from limiter.algorithms import TIME_EPSILON

ALGOS = ("sliding_log", "token_bucket", "gcra", "fixed_window", "sliding_window")
BUCKETS = ("token_bucket", "gcra")


class Clock:
    def __init__(self, now: float = 0.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture(autouse=True)
def fast_thread_switching() -> Iterator[None]:
    """Switch threads as often as possible, to interleave decisions finely."""
    old = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)
    try:
        yield
    finally:
        sys.setswitchinterval(old)


def run_threads(n: int, target: Callable[[int], None]) -> None:
    barrier = threading.Barrier(n)
    errors: list[BaseException] = []

    def body(k: int) -> None:
        try:
            barrier.wait()
            target(k)
        except BaseException as e:  # surfaced below
            errors.append(e)

    threads = [threading.Thread(target=body, args=(k,)) for k in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not any(t.is_alive() for t in threads)
    assert not errors, errors


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algorithm", ALGOS)
def test_threads_hammering_one_client_admit_exactly_the_allowance(algorithm: str) -> None:
    # dyadic rates (0.25 s per token): float-exact, so only concurrency can make a difference
    # (the GCRA rounding bug at full bursts is pinned in test_algorithms_properties.py)
    limit, burst = 64, (80 if algorithm in BUCKETS else None)
    cap = burst or limit
    clock = Clock(1_000.0)
    lim = RateLimiter(limit, 16, algorithm=algorithm, burst=burst, clock=clock)
    admitted = Counter[int]()

    def hammer(k: int) -> None:
        n = 0
        for j in range(150):
            if j % 2:
                n += lim.check("hot").allowed
            else:
                n += lim.allow_request("hot", Request(clock.now))
        admitted[k] = n

    run_threads(16, hammer)
    assert sum(admitted.values()) == cap
    assert not lim.check("hot").allowed
    assert len(lim) == 1


@pytest.mark.timeout(60)
@pytest.mark.parametrize("algorithm", ALGOS)
def test_threads_with_mixed_costs_never_overdraw(algorithm: str) -> None:
    limit, burst = 64, (96 if algorithm in BUCKETS else None)  # dyadic, as above
    cap = burst or limit
    lim = RateLimiter(limit, 16, algorithm=algorithm, burst=burst, clock=Clock(1_000.0))
    tokens = Counter[int]()

    def hammer(k: int) -> None:
        rng = random.Random(k)
        for _ in range(100):
            c = rng.choice([1, 2, 3, 5])
            if lim.check("hot", cost=c).allowed:
                tokens[k] += c

    run_threads(16, hammer)
    taken = sum(tokens.values())
    assert taken <= cap
    # whatever is left can still be taken one token at a time, and no more
    left = 0
    while lim.check("hot").allowed:
        left += 1
        assert left <= cap
    assert taken + left == cap


@pytest.mark.timeout(60)
@pytest.mark.parametrize(("algorithm", "shards"), [(a, 16) for a in ALGOS] + [("sliding_log", 1)])
def test_many_threads_many_clients_no_lost_updates(algorithm: str, shards: int) -> None:
    limit = 5
    clients = [f"client-{j}" for j in range(200)]
    clock = Clock(1_000.0)
    lim = RateLimiter(limit, 10, algorithm=algorithm, clock=clock, shards=shards)
    per_thread: list[Counter[str]] = [Counter() for _ in range(8)]
    requests: Counter[str] = Counter()
    plan = []
    for k in range(8):
        rng = random.Random(k)
        order = [c for c in clients for _ in range(rng.randint(0, 2))]
        rng.shuffle(order)
        plan.append(order)
        requests.update(order)

    def work(k: int) -> None:
        got = per_thread[k]
        for cid in plan[k]:
            got[cid] += lim.check(cid).allowed

    run_threads(8, work)
    admitted = sum(per_thread, Counter())
    # the same requests, one at a time
    sequential = RateLimiter(limit, 10, algorithm=algorithm, clock=clock, shards=shards)
    expected = Counter()
    for order in plan:
        for cid in order:
            expected[cid] += sequential.check(cid).allowed
    assert +admitted == +expected
    assert all(admitted[c] == min(requests[c], limit) for c in clients)
    assert len(lim) == len(sequential) == sum(1 for c in clients if requests[c])


# -- acquire ----------------------------------------------------------------------------------


class SleepingClock(Clock):
    """A clock that ``sleep`` advances: acquire's waits are instant and recorded."""

    def __init__(self, now: float = 0.0) -> None:
        super().__init__(now)
        self.slept: list[float] = []

    def sleep(self, seconds: float) -> None:
        assert seconds > 0
        self.slept.append(seconds)
        self.now += seconds


@pytest.mark.parametrize("algorithm", ALGOS)
def test_acquire_waits_until_the_model_allows(algorithm: str) -> None:
    """Each acquire returns at a time the reference model admits it, and no more than a
    millisecond after the earliest such time."""
    clock = SleepingClock(100.0)
    lim = RateLimiter(5, 1, algorithm=algorithm, clock=clock, sleep=clock.sleep)
    model = make_model(algorithm, 5, 1.0)
    previous = clock.now
    for k in range(17):
        cost = 2 if k % 4 == 3 else 1
        d = lim.acquire("c", cost=cost)
        assert d.allowed and d.reason == Reason.OK
        t = clock.now
        # GCRA compares times with TIME_EPSILON of slack: it may admit that much early
        slack = TIME_EPSILON * 5 / 1.0 if algorithm == "gcra" else 0.0
        assert model.margin(t, cost) >= -1e-9 - slack, (k, t)
        earlier = t - 1e-3
        if earlier > previous:
            assert model.margin(earlier, cost) < 0, (k, t)
        model.record(t, cost)
        previous = t
    assert clock.now > 100.0


@pytest.mark.parametrize("algorithm", BUCKETS)
def test_acquire_total_wait_for_a_bucket(algorithm: str) -> None:
    clock = SleepingClock(0.0)
    lim = RateLimiter(5, 1, algorithm=algorithm, clock=clock, sleep=clock.sleep)
    for _ in range(5):
        lim.acquire("c")
    assert clock.slept == []
    for _ in range(5):
        lim.acquire("c")
    # 5 more tokens at 5 per second: 1 s in all (each wait 0.2 s, plus float crumbs)
    assert sum(clock.slept) == pytest.approx(1.0, abs=1e-3)
    assert clock.now == pytest.approx(1.0, abs=1e-3)


def test_acquire_timeout_consumes_nothing() -> None:
    clock = SleepingClock(50.0)
    lim = RateLimiter(1, 10, clock=clock, sleep=clock.sleep)
    lim.acquire("c")
    before = lim.peek("c")
    with pytest.raises(AcquireTimeout) as info:
        lim.acquire("c", timeout=5.0)
    assert clock.slept == []  # gave up at once: the wait (10 s) is beyond the timeout
    assert isinstance(info.value, RateLimitExceeded)
    assert isinstance(info.value, TimeoutError)
    assert info.value.client_id == "c"
    assert info.value.decision.reason == Reason.LIMITED
    assert info.value.decision.retry_after == pytest.approx(10.0)
    assert lim.peek("c") == before
    # a long enough timeout waits the 10 s
    d = lim.acquire("c", timeout=15.0)
    assert d.allowed
    assert sum(clock.slept) == pytest.approx(10.0, abs=1e-3)


@pytest.mark.parametrize("algorithm", ALGOS)
def test_acquire_cost_above_the_limit_raises_at_once(algorithm: str) -> None:
    clock = SleepingClock(0.0)
    lim = RateLimiter(3, 1, algorithm=algorithm, clock=clock, sleep=clock.sleep)
    with pytest.raises(RateLimitExceeded) as info:
        lim.acquire("c", cost=4, timeout=100.0)
    assert type(info.value) is RateLimitExceeded
    assert info.value.decision.reason == Reason.COST_EXCEEDS_LIMIT
    assert "can never be granted" in str(info.value)
    assert clock.slept == []
    assert len(lim) == 0
    with pytest.raises(RateLimitExceeded) as info:
        asyncio.run(lim.acquire_async("c", cost=4))
    assert type(info.value) is RateLimitExceeded


# -- acquire_async, real clock ------------------------------------------------------------------


@pytest.mark.timeout(30)
@pytest.mark.parametrize("algorithm", BUCKETS)
def test_acquire_async_waits_with_the_real_clock(algorithm: str) -> None:
    lim = RateLimiter(5, 0.5, algorithm=algorithm)  # one token per 0.1 s

    async def main() -> tuple[float, float, int]:
        ticks = 0
        stop = asyncio.Event()

        async def ticker() -> None:
            nonlocal ticks
            while not stop.is_set():
                await asyncio.sleep(0.005)
                ticks += 1

        tick_task = asyncio.create_task(ticker())
        start = time.monotonic()
        for _ in range(5):
            await lim.acquire_async("c")
        burst = time.monotonic() - start
        await asyncio.sleep(0)
        ticks = 0
        t0 = time.monotonic()
        d = await lim.acquire_async("c")
        sixth = time.monotonic() - t0
        stop.set()
        await tick_task
        assert d.allowed
        return burst, sixth, ticks

    burst, sixth, ticks = asyncio.run(main())
    assert burst < 0.09
    assert 0.09 - burst <= sixth < 1.0
    assert ticks >= 3  # the event loop kept running while acquire_async waited


@pytest.mark.timeout(30)
def test_acquire_async_many_tasks() -> None:
    lim = RateLimiter(5, 0.5, algorithm="token_bucket")

    async def main() -> float:
        t0 = time.monotonic()
        results = await asyncio.gather(*(lim.acquire_async("c") for _ in range(8)))
        assert all(r.allowed for r in results)
        return time.monotonic() - t0

    elapsed = asyncio.run(main())
    # 5 at once, then 3 more at 10 per second
    assert 0.25 <= elapsed < 2.0


@pytest.mark.timeout(30)
def test_acquire_async_timeout_consumes_nothing() -> None:
    lim = RateLimiter(2, 5.0, algorithm="sliding_log")

    async def main() -> None:
        await lim.acquire_async("c")
        await lim.acquire_async("c")
        at = time.time()
        before = lim.peek("c", now=at)
        t0 = time.monotonic()
        with pytest.raises(AcquireTimeout) as info:
            await lim.acquire_async("c", timeout=0.05)
        assert time.monotonic() - t0 < 0.04  # refused at once: it would wait ~5 s
        assert info.value.decision.reason == Reason.LIMITED
        assert lim.peek("c", now=at) == before
        assert not before.allowed

    asyncio.run(main())
