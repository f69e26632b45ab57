"""The workload of ``drl demo`` and the two ways it is offered.

- :func:`multipliers` and :func:`make_schedule`: a Zipf-tailed population of clients, a few hot
  ones at 2x-5x their limit, Poisson arrivals, each request sent to a server drawn at random
  (the shape of ``tests/cluster/harness.py``).
- :func:`run_http`: a real HTTP load generator (asyncio + httpx, keep-alive connections, a fixed
  pool of connections per server), open loop: each request is sent at its scheduled time (or
  as soon as a connection is free when the servers fall behind; the lag is measured).
- :func:`run_direct`: the same schedule offered straight to in-process limiters (the embedded
  mode: no HTTP).

Both fill a :class:`RequestLog`: per request the scheduled time, client, server, when it was
sent, when the server decided, the status (200 or 429; 0 never sent, -1 failed) and the
server's decision latency.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import numpy as np

if TYPE_CHECKING:
    from limiter import RateLimiter

#: Offered load of the hot clients, as multiples of their limit.
HOT = (5.0, 4.0, 3.0, 2.5, 2.0)
#: Status recorded for a request that was never sent / that failed (no HTTP status).
NOT_SENT, FAILED = 0, -1


def multipliers(n_clients: int) -> np.ndarray:
    """Offered load per client as a multiple of its limit: five hot clients at 5x..2x, then a
    Zipf tail (1.5x * 5/i for the i-th client)."""
    hot = np.array(HOT)
    i = np.arange(hot.size, n_clients, dtype=np.float64)
    return np.concatenate((hot, 1.5 * hot.size / i))[:n_clients]


@dataclass
class Schedule:
    """Every request of a run, sorted by time: seconds from the start, client, server."""

    times: np.ndarray
    clients: np.ndarray
    servers: np.ndarray

    def __len__(self) -> int:
        return int(self.times.size)


def make_schedule(
    seed: int, mult: np.ndarray, rate_unit: float, duration: float, servers: int
) -> Schedule:
    """Poisson arrivals per client at ``mult * rate_unit`` per second for ``duration`` seconds,
    each request to a server drawn uniformly."""
    rng = np.random.default_rng(seed)
    times, clients = [], []
    for c, m in enumerate(mult):
        n = rng.poisson(m * rate_unit * duration)
        times.append(rng.uniform(0.0, duration, n))
        clients.append(np.full(n, c, dtype=np.int64))
    t = np.concatenate(times) if times else np.zeros(0)
    cl = np.concatenate(clients) if clients else np.zeros(0, dtype=np.int64)
    order = np.argsort(t, kind="stable")
    t, cl = t[order], cl[order]
    return Schedule(t, cl, rng.integers(0, servers, t.size))


@dataclass
class RequestLog:
    """What happened to each scheduled request (index-aligned with the :class:`Schedule`).

    Times are epoch seconds (``time.time()``; every process of the demo runs on this machine).
    """

    schedule: Schedule
    start_at: float
    sent_at: np.ndarray = field(init=False)
    done_at: np.ndarray = field(init=False)
    decided_at: np.ndarray = field(init=False)
    decision_ns: np.ndarray = field(init=False)
    status: np.ndarray = field(init=False)

    def __post_init__(self) -> None:
        n = len(self.schedule)
        self.sent_at = np.full(n, np.nan)
        self.done_at = np.full(n, np.nan)
        self.decided_at = np.full(n, np.nan)
        self.decision_ns = np.full(n, -1, dtype=np.int64)
        self.status = np.zeros(n, dtype=np.int16)

    def save(self, path: str) -> None:
        np.savez_compressed(
            path,
            start_at=np.array(self.start_at),
            scheduled=self.schedule.times,
            client=self.schedule.clients,
            server=self.schedule.servers,
            sent_at=self.sent_at,
            done_at=self.done_at,
            decided_at=self.decided_at,
            decision_ns=self.decision_ns,
            status=self.status,
        )


@dataclass
class Progress:
    """Counters a progress line reads while a run goes on (plain ints, one writer thread)."""

    sent: int = 0
    done: int = 0
    limited: int = 0
    errors: int = 0
    last_error: str = ""


# -- HTTP ----------------------------------------------------------------------------------------

#: The HTTP clients :func:`run_http` can use.
HTTP_CLIENTS = ("raw", "httpx")


class _Recorder:
    """Writes one request's outcome into the log and the progress counters."""

    __slots__ = ("log", "prog")

    def __init__(self, log: RequestLog, prog: Progress) -> None:
        self.log = log
        self.prog = prog

    def sent(self, i: int) -> None:
        self.log.sent_at[i] = time.time()
        self.prog.sent += 1

    def answered(
        self, i: int, status: int, decided_at: str | None, decision_ns: str | None
    ) -> None:
        log, prog = self.log, self.prog
        log.done_at[i] = time.time()
        log.status[i] = status
        prog.done += 1
        if status == 429:
            prog.limited += 1
        if decided_at is not None:
            log.decided_at[i] = float(decided_at)
            log.decision_ns[i] = int(decision_ns) if decision_ns is not None else -1

    def failed(self, i: int, exc: BaseException) -> None:
        self.log.done_at[i] = time.time()
        self.log.status[i] = FAILED
        self.prog.errors += 1
        self.prog.last_error = f"{type(exc).__name__}: {exc}"


async def _httpx_worker(
    url: str,
    queue: asyncio.Queue[int | None],
    headers: Sequence[dict[str, str]],
    clients: np.ndarray,
    rec: _Recorder,
) -> None:
    """One keep-alive connection through httpx."""
    import httpx

    limits = httpx.Limits(max_connections=1, max_keepalive_connections=1)
    async with httpx.AsyncClient(
        base_url=url, limits=limits, timeout=httpx.Timeout(10.0, pool=None)
    ) as client:
        while (i := await queue.get()) is not None:
            rec.sent(i)
            try:
                r = await client.get("/", headers=headers[clients[i]])
                await r.aread()
            except httpx.HTTPError as exc:
                rec.failed(i, exc)
                continue
            rec.answered(
                i,
                r.status_code,
                r.headers.get("x-drl-decided-at"),
                r.headers.get("x-drl-decision-ns"),
            )


async def _raw_worker(
    url: str,
    queue: asyncio.Queue[int | None],
    requests: Sequence[bytes],
    clients: np.ndarray,
    rec: _Recorder,
) -> None:
    """One keep-alive HTTP/1.1 connection on asyncio streams: ``GET /``, read the status line,
    the header fields and a ``Content-Length`` body. A tenth of httpx's CPU per request, which
    is what lets a small machine offer the load and serve it at the same time."""
    host, _, port = url.rpartition("//")[2].partition(":")
    reader: asyncio.StreamReader | None = None
    writer: asyncio.StreamWriter | None = None
    try:
        while (i := await queue.get()) is not None:
            rec.sent(i)
            try:
                if writer is None or reader is None:
                    reader, writer = await asyncio.open_connection(host, int(port))
                writer.write(requests[clients[i]])
                head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10.0)
                lines = head.decode("latin-1").split("\r\n")
                status = int(lines[0].split(" ", 2)[1])
                length, at, ns, close = 0, None, None, False
                for line in lines[1:]:
                    name, _, value = line.partition(":")
                    name = name.lower()
                    if name == "content-length":
                        length = int(value)
                    elif name == "x-drl-decided-at":
                        at = value.strip()
                    elif name == "x-drl-decision-ns":
                        ns = value.strip()
                    elif name == "connection" and value.strip().lower() == "close":
                        close = True
                if length:
                    await reader.readexactly(length)
            except (
                OSError,
                asyncio.IncompleteReadError,
                asyncio.LimitOverrunError,
                TimeoutError,
                ValueError,
                IndexError,
            ) as exc:
                rec.failed(i, exc)
                if writer is not None:
                    writer.close()
                reader = writer = None
                continue
            rec.answered(i, status, at, ns)
            if close:
                writer.close()
                reader = writer = None
    finally:
        if writer is not None:
            writer.close()


async def run_http(
    schedule: Schedule,
    urls: Sequence[str],
    client_ids: Sequence[str],
    start_at: float,
    *,
    connections: int = 16,
    grace: float = 10.0,
    progress: Progress | None = None,
    header: str = "X-API-Key",
    client: str = "raw",
) -> RequestLog:
    """Offer ``schedule`` over HTTP: request ``i`` is ``GET /`` with ``header: client_ids[c]``
    to ``urls[server]`` (``http://host:port``) at ``start_at + times[i]``, over ``connections``
    keep-alive connections per server (each one worker taking the server's requests in order
    from a queue). ``client``: ``raw`` (a minimal HTTP/1.1 client on asyncio streams) or
    ``httpx``. Requests still queued ``grace`` seconds after the schedule ends are abandoned
    (status :data:`NOT_SENT`)."""
    if client not in HTTP_CLIENTS:
        raise ValueError(f"unknown HTTP client {client!r}; choose one of {', '.join(HTTP_CLIENTS)}")
    log = RequestLog(schedule, start_at)
    rec = _Recorder(log, progress if progress is not None else Progress())
    times, clients, servers = schedule.times, schedule.clients, schedule.servers
    queues: list[asyncio.Queue[int | None]] = [asyncio.Queue() for _ in urls]
    headers = [{header: cid} for cid in client_ids]
    workers = []
    for s, url in enumerate(urls):
        hostport = url.rpartition("//")[2]
        requests = [
            f"GET / HTTP/1.1\r\nHost: {hostport}\r\n{header}: {cid}\r\n\r\n".encode()
            for cid in client_ids
        ]
        for _ in range(connections):
            if client == "httpx":
                job = _httpx_worker(url, queues[s], headers, clients, rec)
            else:
                job = _raw_worker(url, queues[s], requests, clients, rec)
            workers.append(asyncio.create_task(job))
    try:
        i, n = 0, len(schedule)
        while i < n:
            now = time.time() - start_at
            if times[i] > now:
                await asyncio.sleep(min(times[i] - now, 0.05))
                continue
            j = int(np.searchsorted(times, now, side="right"))
            for k in range(i, j):
                queues[servers[k]].put_nowait(k)
            i = j
        for q in queues:
            for _ in range(connections):
                q.put_nowait(None)
        end = start_at + (float(times[-1]) if n else 0.0) + grace
        await asyncio.wait(workers, timeout=max(0.1, end - time.time()))
    finally:
        for t in workers:
            t.cancel()
        await asyncio.gather(*workers, return_exceptions=True)
    return log


# -- in process (embedded) -----------------------------------------------------------------------


def run_direct(
    schedule: Schedule,
    limiters: Sequence[RateLimiter],
    client_ids: Sequence[str],
    start_at: float,
    *,
    progress: Progress | None = None,
    stop: Callable[[], bool] | None = None,
) -> RequestLog:
    """Offer ``schedule`` straight to ``limiters`` (``limiters[server].check(client_id)``) at the
    scheduled times, from this thread; the decision latency is that ``check`` call."""
    log = RequestLog(schedule, start_at)
    prog = progress if progress is not None else Progress()
    times, clients, servers = schedule.times, schedule.clients, schedule.servers
    checks = [lim.check for lim in limiters]
    i, n = 0, len(schedule)
    perf = time.perf_counter_ns
    while i < n:
        if stop is not None and stop():
            break
        now = time.time() - start_at
        if times[i] > now:
            time.sleep(min(times[i] - now, 0.002))
            continue
        j = int(np.searchsorted(times, now, side="right"))
        for k in range(i, j):
            at = time.time()
            t0 = perf()
            allowed = checks[servers[k]](client_ids[clients[k]]).allowed
            dt = perf() - t0
            log.sent_at[k] = at
            log.decided_at[k] = at
            log.done_at[k] = at
            log.decision_ns[k] = dt
            log.status[k] = 200 if allowed else 429
            prog.sent += 1
            prog.done += 1
            if not allowed:
                prog.limited += 1
        i = j
    return log
