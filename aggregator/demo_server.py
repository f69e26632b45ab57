"""One app server of ``drl demo``, as its own process: uvicorn serving a tiny ASGI app behind
:class:`limiter.middleware.RateLimitMiddleware`, whose limiter is approximate mode through
:func:`producer.connect` (the agent streams usage to Kafka and installs the aggregator's leases).

    python -m aggregator.demo_server --bootstrap HOST:PORT --server-id demo-srv-0 \\
        --usage-topic U --grants-topic G --limit 200 --window 10 \\
        --ready-file ready.json --stats-file stats.json

It binds 127.0.0.1 on a free port (``--port 0``), writes ``{"port": ..., "pid": ...}`` to
``--ready-file`` once it serves, and on SIGTERM or SIGINT stops serving, stops the agent (the
last usage batch is flushed) and writes its counters and decision latencies to
``--stats-file``.

Every judged response carries two extra headers, so that the load generator can record what the
server decided and when: ``X-DRL-Decided-At`` (the server's ``time.time()`` when
``limiter.check`` started, seconds) and ``X-DRL-Decision-Ns`` (how long that ``check`` took,
nanoseconds: the decision latency, without HTTP parsing or the network).
"""

from __future__ import annotations

import argparse
import asyncio
import contextvars
import dataclasses
import json
import logging
import os
import signal
import socket
import sys
import time
from array import array
from pathlib import Path
from typing import Any

import numpy as np

from limiter import Decision, RateLimiter
from limiter.lease import LeaseOptions
from limiter.middleware import Message, RateLimitMiddleware, Receive, Scope, Send, from_header

#: Response header: the server's wall clock when ``limiter.check`` started (seconds).
DECIDED_AT = b"x-drl-decided-at"
#: Response header: how long ``limiter.check`` took (nanoseconds).
DECISION_NS = b"x-drl-decision-ns"
#: The header the client id comes from.
CLIENT_HEADER = "X-API-Key"

_BODY = b'{"ok":true}'
# [decided at (epoch s), check duration (ns)] of the request being handled, set by the timed
# limiter and read by the outer wrapper when the response starts (same asyncio task).
_TIMING: contextvars.ContextVar[list[float] | None] = contextvars.ContextVar(
    "drl_demo_timing", default=None
)


class TimedLimiter:
    """Wraps a limiter's ``check``: times every call and hands the figures to the response."""

    def __init__(self, limiter: RateLimiter) -> None:
        self.limiter = limiter
        self.policies = limiter.policies  # the middleware reads the window from here
        self.samples_ns: array[int] = array("q")

    def check(self, client_id: str, *, cost: int = 1) -> Decision:
        at = time.time()
        t0 = time.perf_counter_ns()
        decision = self.limiter.check(client_id, cost=cost)
        dt = time.perf_counter_ns() - t0
        self.samples_ns.append(dt)
        holder = _TIMING.get()
        if holder is not None:
            holder[0] = at
            holder[1] = dt
        return decision


async def hello(scope: Scope, receive: Receive, send: Send) -> None:
    """The app behind the limiter: a constant small JSON answer."""
    await send(
        {
            "type": "http.response.start",
            "status": 200,
            "headers": [
                (b"content-type", b"application/json"),
                (b"content-length", str(len(_BODY)).encode()),
            ],
        }
    )
    await send({"type": "http.response.body", "body": _BODY, "more_body": False})


class WithTiming:
    """Outermost ASGI layer: adds the decision headers to the response the middleware (429) or
    the app (200) starts."""

    def __init__(self, app: RateLimitMiddleware) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        holder = [0.0, 0.0]
        token = _TIMING.set(holder)

        async def send_timed(message: Message) -> None:
            if message["type"] == "http.response.start" and holder[0]:
                message = dict(message)
                message["headers"] = [
                    *message.get("headers", ()),
                    (DECIDED_AT, f"{holder[0]:.6f}".encode()),
                    (DECISION_NS, str(int(holder[1])).encode()),
                ]
            await send(message)

        try:
            await self.app(scope, receive, send_timed)
        finally:
            _TIMING.reset(token)


def percentiles_us(samples_ns: array[int] | np.ndarray) -> dict[str, float]:
    """p50/p99/max of nanosecond samples, in microseconds (zeros when there are none)."""
    a = np.asarray(samples_ns, dtype=np.float64) / 1000.0
    if a.size == 0:
        return {"p50": 0.0, "p99": 0.0, "max": 0.0, "count": 0}
    return {
        "p50": float(np.percentile(a, 50)),
        "p99": float(np.percentile(a, 99)),
        "max": float(a.max()),
        "count": int(a.size),
    }


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m aggregator.demo_server", description=__doc__)
    p.add_argument("--bootstrap", required=True, help="Kafka bootstrap servers")
    p.add_argument("--server-id", required=True)
    p.add_argument("--usage-topic", required=True)
    p.add_argument("--grants-topic", required=True)
    p.add_argument("--limit", type=int, required=True, help="requests per window per client")
    p.add_argument("--window", type=float, required=True, help="window, seconds")
    p.add_argument("--expected-servers", type=int, default=1)
    p.add_argument("--cold-start-allowance", type=float, default=0.01)
    p.add_argument("--host", default="127.0.0.1")
    p.add_argument("--port", type=int, default=0, help="0: a free port")
    p.add_argument("--ready-file", required=True, help='written as {"port", "pid"} when serving')
    p.add_argument("--stats-file", required=True, help="counters and latencies, at exit")
    return p.parse_args(argv)


async def serve(args: argparse.Namespace) -> int:
    import uvicorn

    from producer import connect

    limiter, agent = connect(
        args.limit,
        args.window,
        bootstrap=args.bootstrap,
        server_id=args.server_id,
        usage_topic=args.usage_topic,
        grants_topic=args.grants_topic,
        lease_options=LeaseOptions(
            cold_start_allowance=args.cold_start_allowance,
            expected_servers=args.expected_servers,
        ),
    )
    timed = TimedLimiter(limiter)
    middleware = RateLimitMiddleware(
        hello, timed, key=from_header(CLIENT_HEADER), exempt_paths=["/healthz"]
    )
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind((args.host, args.port))
    sock.listen(2048)
    config = uvicorn.Config(
        WithTiming(middleware),
        log_level="warning",
        access_log=False,
        lifespan="off",
        timeout_keep_alive=120,
        timeout_graceful_shutdown=5,
    )
    server = uvicorn.Server(config)
    started = time.monotonic()
    task = asyncio.create_task(server.serve(sockets=[sock]))
    try:
        while not server.started:
            if task.done():
                break
            await asyncio.sleep(0.02)
        if server.started:
            ready = Path(args.ready_file)
            tmp = ready.with_suffix(".tmp")
            tmp.write_text(json.dumps({"port": sock.getsockname()[1], "pid": os.getpid()}))
            tmp.replace(ready)
        await task
    finally:
        agent.stop()
        stats: dict[str, Any] = {
            "server_id": args.server_id,
            "uptime_seconds": time.monotonic() - started,
            "middleware": middleware.stats(),
            "agent": dataclasses.asdict(agent.stats),
            "decision_us": percentiles_us(timed.samples_ns),
        }
        Path(args.stats_file).write_text(json.dumps(stats))
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    logging.basicConfig(level=logging.WARNING, format="%(asctime)s %(levelname)s %(message)s")
    # uvicorn turns SIGTERM/SIGINT into a graceful stop and re-raises the signal once it has
    # stopped: a handler here makes that re-raise harmless, so the agent flush and the stats
    # file below still happen.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    return asyncio.run(serve(args))


if __name__ == "__main__":
    sys.exit(main())
