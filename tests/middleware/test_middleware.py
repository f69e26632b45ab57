"""The HTTP rate-limit middleware through real servers and a real HTTP client.

uvicorn (ASGI) and werkzeug's threaded ``make_server`` (WSGI) run in background threads on free
127.0.0.1 ports; httpx talks to them. The two module servers serve a switchable app, so that each
test installs its own middleware (and limiter) without starting a server; the Starlette, Flask and
decorator tests start their own. Limiters run on a settable clock where exact header values are
asserted, on the real clock where a client really waits ``Retry-After``. The 503 tests use a stub
of the limiter interface (check() returning ``Reason.UNAVAILABLE``); servers and client are real.
"""

from __future__ import annotations

import contextlib
import json
import math
import socket
import threading
import time
from collections.abc import Callable, Iterator, MutableMapping
from dataclasses import dataclass, field
from typing import Any, Literal

import httpx
import pytest
import uvicorn
from flask import Flask
from flask import request as flask_request
from starlette.applications import Starlette
from starlette.middleware import Middleware
from starlette.requests import Request
from starlette.responses import JSONResponse, PlainTextResponse, Response
from starlette.routing import Route
from werkzeug.serving import make_server

from limiter import Decision, Policy, RateLimiter, Reason
from limiter.middleware import (
    RateLimitGate,
    RateLimitMiddleware,
    RateLimitRefused,
    WSGIRateLimitMiddleware,
    current_rate_limit,
    from_client_address,
    from_header,
    rate_limited,
)

pytestmark = pytest.mark.timeout(30)

API_KEY = from_header("X-API-Key")
T0 = 1_000_000.0  # exact in binary, as are the quarter-second steps below


class Clock:
    """A settable clock for the limiter: time moves only when a test moves it."""

    def __init__(self, t: float = T0) -> None:
        self.t = t

    def __call__(self) -> float:
        return self.t

    def advance(self, seconds: float) -> None:
        self.t += seconds


@dataclass
class Stub:
    """A stub of the limiter interface: check() answers ``decision`` and records its calls."""

    decision: Decision
    policies: tuple[Policy, ...] = ()
    calls: list[tuple[str, int]] = field(default_factory=list)

    def check(self, client_id: str, *, cost: int = 1) -> Decision:
        self.calls.append((client_id, cost))
        return self.decision


class Broken:
    def check(self, client_id: str, *, cost: int = 1) -> Decision:
        raise RuntimeError("limiter bug")


# -- the apps behind the middleware -----------------------------------------------------------


async def hello_asgi(scope: MutableMapping[str, Any], receive: Any, send: Any) -> None:
    assert scope["type"] == "http"
    body = f"hello {scope['path']}".encode()
    headers = [(b"content-type", b"text/plain"), (b"x-app", b"1")]
    await send({"type": "http.response.start", "status": 200, "headers": headers})
    await send({"type": "http.response.body", "body": body})


def hello_wsgi(environ: dict[str, Any], start_response: Any) -> list[bytes]:
    start_response("200 OK", [("Content-Type", "text/plain"), ("X-App", "1")])
    return [f"hello {environ['PATH_INFO']}".encode()]


class AsgiSwitch:
    app: Any = None

    async def __call__(self, scope: Any, receive: Any, send: Any) -> None:
        await self.app(scope, receive, send)


class WsgiSwitch:
    app: Any = None

    def __call__(self, environ: Any, start_response: Any) -> Any:
        return self.app(environ, start_response)


# -- servers ----------------------------------------------------------------------------------


@contextlib.contextmanager
def serve_asgi(app: Any, *, lifespan: Literal["on", "off"] = "off") -> Iterator[str]:
    """uvicorn in a thread on a free port; stopped (and joined) on exit."""
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = uvicorn.Config(app, lifespan=lifespan, log_level="warning", access_log=False)
    server = uvicorn.Server(config)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    deadline = time.monotonic() + 10
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "uvicorn did not start"
        time.sleep(0.01)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.should_exit = True
        thread.join(10)
        sock.close()
        assert not thread.is_alive(), "uvicorn did not stop"


@contextlib.contextmanager
def serve_wsgi(app: Any) -> Iterator[str]:
    """werkzeug's threaded WSGI server in a thread on a free port; shut down on exit."""
    server = make_server("127.0.0.1", 0, app, threaded=True)
    thread = threading.Thread(target=server.serve_forever, kwargs={"poll_interval": 0.05})
    thread.daemon = True
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()
        thread.join(10)
        assert not thread.is_alive(), "the WSGI server did not stop"


@contextlib.contextmanager
def client(url: str) -> Iterator[httpx.Client]:
    with httpx.Client(base_url=url, timeout=5.0) as c:
        yield c


@pytest.fixture(scope="module")
def asgi_server() -> Iterator[tuple[AsgiSwitch, str]]:
    switch = AsgiSwitch()
    with serve_asgi(switch) as url:
        yield switch, url


@pytest.fixture(scope="module")
def wsgi_server() -> Iterator[tuple[WsgiSwitch, str]]:
    switch = WsgiSwitch()
    with serve_wsgi(switch) as url:
        yield switch, url


@dataclass
class Site:
    """One of the two module servers, ready for a test to mount its middleware."""

    flavor: str
    switch: AsgiSwitch | WsgiSwitch
    http: httpx.Client

    def mount(self, limiter: Any, **options: Any) -> RateLimitGate:
        mw: RateLimitGate
        if self.flavor == "asgi":
            mw = RateLimitMiddleware(hello_asgi, limiter, **options)
        else:
            mw = WSGIRateLimitMiddleware(hello_wsgi, limiter, **options)
        self.switch.app = mw
        return mw

    def get(self, path: str, key: str | None = None, **kwargs: Any) -> httpx.Response:
        headers = kwargs.pop("headers", {})
        if key is not None:
            headers["X-API-Key"] = key
        return self.http.get(path, headers=headers, **kwargs)


@pytest.fixture(params=["asgi", "wsgi"])
def site(
    request: pytest.FixtureRequest,
    asgi_server: tuple[AsgiSwitch, str],
    wsgi_server: tuple[WsgiSwitch, str],
) -> Iterator[Site]:
    switch, url = asgi_server if request.param == "asgi" else wsgi_server
    with client(url) as http:
        yield Site(request.param, switch, http)
    switch.app = None


def body(r: httpx.Response) -> Any:
    assert r.headers["content-type"] == "application/json"
    return json.loads(r.content)


def no_rate_fields(r: httpx.Response) -> bool:
    names = ("ratelimit", "ratelimit-policy", "retry-after", "x-ratelimit-limit")
    return not any(n in r.headers for n in names)


# -- the middleware on both servers -----------------------------------------------------------


def test_exhausting_the_limit_gives_429_with_retry_after_and_matching_fields(site: Site) -> None:
    clock = Clock()
    limiter = RateLimiter(3, 2, clock=clock)
    mw = site.mount(limiter, key=API_KEY)
    for remaining in (2, 1, 0):
        r = site.get("/api", "alice")
        assert r.status_code == 200
        assert r.text == "hello /api" and r.headers["x-app"] == "1"  # the app's own response
        state = limiter.peek("alice")  # the clock has not moved: what the limiter holds now
        assert state.remaining == remaining
        assert r.headers["ratelimit"] == f'"default";r={remaining};t={math.ceil(state.reset_after)}'
        assert r.headers["ratelimit"] == f'"default";r={remaining};t=2'
        assert r.headers["ratelimit-policy"] == '"default";q=3;w=2'
        assert "retry-after" not in r.headers and "x-ratelimit-limit" not in r.headers
        clock.advance(0.25)
    # At T0 + 0.75: the oldest request (T0) leaves the 2 s window at T0 + 2, in 1.25 s.
    r = site.get("/api", "alice")
    assert r.status_code == 429
    assert r.headers["retry-after"] == "2"  # 1.25 s rounded up
    assert body(r) == {"error": "rate_limited", "reason": "limited", "retry_after": 2}
    assert r.headers["ratelimit"] == '"default";r=0;t=2'  # 1.75 s rounded up
    assert r.headers["ratelimit-policy"] == '"default";q=3;w=2'
    clock.t = T0 + 2.0
    r = site.get("/api", "alice")
    assert r.status_code == 200 and r.headers["ratelimit"] == '"default";r=0;t=2'
    assert mw.stats() == {
        "requests": 5,
        "exempt": 0,
        "allowed": 4,
        "limited": 1,
        "unavailable": 0,
        "shadow_limited": 0,
        "invalid": 0,
        "errors": 0,
        "broken": 0,
    }


def test_waiting_retry_after_on_the_real_clock_is_enough(site: Site) -> None:
    limiter = RateLimiter(2, 1)
    site.mount(limiter, key=API_KEY)
    assert [site.get("/api", "carol").status_code for _ in range(2)] == [200, 200]
    r = site.get("/api", "carol")
    assert r.status_code == 429
    retry_after = int(r.headers["retry-after"])
    assert retry_after == 1 == body(r)["retry_after"]
    time.sleep(retry_after)
    assert site.get("/api", "carol").status_code == 200


def test_x_ratelimit_headers_only_when_enabled(site: Site) -> None:
    clock = Clock()
    site.mount(RateLimiter(2, 5, clock=clock), key=API_KEY, x_ratelimit_headers=True)
    r = site.get("/api", "dave")
    assert (r.headers["x-ratelimit-limit"], r.headers["x-ratelimit-remaining"]) == ("2", "1")
    assert r.headers["x-ratelimit-reset"] == "5"
    assert r.headers["ratelimit"] == '"default";r=1;t=5'  # the IETF fields as well
    clock.advance(1.5)
    site.get("/api", "dave")
    r = site.get("/api", "dave")
    assert r.status_code == 429
    assert r.headers["x-ratelimit-remaining"] == "0" and r.headers["x-ratelimit-reset"] == "5"
    assert r.headers["ratelimit"] == '"default";r=0;t=5'  # until both requests have left
    assert r.headers["retry-after"] == "4"  # 3.5 s until the first request leaves the window
    site.mount(RateLimiter(2, 5, clock=clock), key=API_KEY)
    r = site.get("/api", "dave")
    assert r.status_code == 200 and "ratelimit" in r.headers
    assert not any(name.startswith("x-ratelimit") for name in r.headers)


def test_shadow_mode_never_refuses_but_counts(site: Site) -> None:
    clock = Clock()
    limiter = RateLimiter(2, 60, clock=clock)
    mw = site.mount(limiter, key=API_KEY, shadow=True)
    answers = [site.get("/api", "erin") for _ in range(5)]
    assert [r.status_code for r in answers] == [200] * 5
    assert all(r.text == "hello /api" for r in answers)
    assert [r.headers["ratelimit"] for r in answers] == [
        '"default";r=1;t=60',
        *['"default";r=0;t=60'] * 4,
    ]
    assert all("retry-after" not in r.headers for r in answers)
    assert (mw.allowed, mw.limited, mw.shadow_limited) == (2, 0, 3)
    # Refusals consume nothing: the limiter holds what enforcement would have left.
    assert limiter.peek("erin").remaining == 0
    clock.advance(60)
    assert limiter.peek("erin").allowed
    # A request without a usable id is let through too, and counted.
    r = site.get("/api")
    assert r.status_code == 200 and no_rate_fields(r)
    assert mw.invalid == 1


def test_client_ids_are_independent(site: Site) -> None:
    site.mount(RateLimiter(2, 60, clock=Clock()), key=API_KEY)
    assert [site.get("/api", "frank").status_code for _ in range(3)] == [200, 200, 429]
    r = site.get("/api", "grace")
    assert r.status_code == 200 and r.headers["ratelimit"] == '"default";r=1;t=60'
    assert site.get("/api", "frank").status_code == 429


def test_default_key_is_the_client_address(site: Site) -> None:
    limiter = RateLimiter(2, 60, clock=Clock())
    site.mount(limiter)
    # Different API keys, one address: one client.
    assert [site.get("/api", k).status_code for k in ("a", "b", "c")] == [200, 200, 429]
    assert limiter.peek("127.0.0.1").remaining == 0


def test_forwarded_address_behind_one_trusted_proxy(site: Site) -> None:
    limiter = RateLimiter(1, 60, clock=Clock())
    site.mount(limiter, key=from_client_address(trusted_proxies=1))
    spoofed = {"X-Forwarded-For": "1.1.1.1, 203.0.113.7"}  # the client wrote 1.1.1.1
    assert site.get("/api", headers=spoofed).status_code == 200
    assert site.get("/api", headers={"X-Forwarded-For": "9.9.9.9, 203.0.113.7"}).status_code == 429
    assert site.get("/api", headers={"X-Forwarded-For": "203.0.113.8"}).status_code == 200
    assert site.get("/api").status_code == 200  # no header: the socket's address
    assert limiter.peek("203.0.113.7").remaining == 0
    assert limiter.peek("127.0.0.1").remaining == 0


def test_exempt_paths_are_never_limited(site: Site) -> None:
    mw = site.mount(
        RateLimiter(1, 60, clock=Clock()), key=API_KEY, exempt_paths=["/healthz", "/static/*"]
    )
    assert site.get("/api", "heidi").status_code == 200
    assert site.get("/api", "heidi").status_code == 429
    for path in ("/healthz", "/static/app.js", "/static/css/x.css"):
        for _ in range(3):
            r = site.get(path, "heidi")
            assert r.status_code == 200 and r.text == f"hello {path}" and no_rate_fields(r)
    r = site.get("/healthz")  # no client id needed either
    assert r.status_code == 200
    assert site.get("/healthz/deep", "heidi").status_code == 429  # exact match only
    assert (mw.requests, mw.exempt, mw.limited) == (13, 10, 2)


def test_bad_client_id_is_400_never_500(site: Site) -> None:
    limiter = RateLimiter(5, 60, clock=Clock())
    mw = site.mount(limiter, key=API_KEY)
    r = site.get("/api")
    assert r.status_code == 400
    assert body(r) == {"error": "invalid_client_id", "message": "missing X-API-Key header"}
    assert no_rate_fields(r)
    r = site.get("/api", "")
    assert r.status_code == 400 and body(r)["message"] == "empty X-API-Key header"
    r = site.get("/api", "k" * 300)
    assert r.status_code == 400
    assert body(r)["message"] == (
        "invalid client id from the X-API-Key header: "
        "client_id is 300 characters long; the maximum is 256"
    )
    assert site.get("/api", "k" * 256).status_code == 200
    assert (mw.invalid, mw.errors, mw.allowed) == (3, 0, 1)
    # User key functions: None, or a missing item, is a 400 too.
    site.mount(limiter, key=lambda request: None)
    r = site.get("/api")
    assert r.status_code == 400 and body(r)["message"] == "no client id found in the key function"
    missing: dict[str, str] = {}
    site.mount(limiter, key=lambda request: missing["tenant"])
    r = site.get("/api")
    assert r.status_code == 400
    assert body(r)["message"] == "could not determine the client id: tenant is missing"


def test_unavailable_is_503(site: Site) -> None:
    stub = Stub(Decision(False, 5, 0, 0.0, 2.5, Reason.UNAVAILABLE), (Policy(5, 10),))
    mw = site.mount(stub, key=API_KEY, x_ratelimit_headers=True)
    r = site.get("/api", "ivan")
    assert r.status_code == 503
    assert r.headers["retry-after"] == "3"
    assert body(r) == {"error": "unavailable", "reason": "unavailable", "retry_after": 3}
    assert r.headers["ratelimit-policy"] == '"default";q=5;w=10'
    # The limiter could not say what the client has left: no RateLimit, no X-RateLimit-*.
    assert "ratelimit" not in r.headers and "x-ratelimit-remaining" not in r.headers
    assert (mw.unavailable, mw.limited) == (1, 0)
    assert stub.calls == [("ivan", 1)]
    mw = site.mount(stub, key=API_KEY, shadow=True)
    r = site.get("/api", "ivan")
    assert r.status_code == 200 and r.text == "hello /api"
    assert (mw.shadow_limited, mw.unavailable) == (1, 0)


def test_policy_window_follows_the_policy_the_decision_names(site: Site) -> None:
    clock = Clock()
    limiter = RateLimiter(policies=[Policy(5, 2), Policy(6, 10)], clock=clock)
    site.mount(limiter, key=API_KEY)
    for _ in range(5):
        r = site.get("/api", "judy")
    assert r.headers["ratelimit-policy"] == '"default";q=5;w=2'  # 0 of 5 left in 2 s
    assert r.headers["ratelimit"] == '"default";r=0;t=2'
    clock.advance(2.5)
    r = site.get("/api", "judy")  # 5 of 5 per 2 s, but 0 of 6 per 10 s now
    assert r.status_code == 200
    assert r.headers["ratelimit-policy"] == '"default";q=6;w=10'
    assert r.headers["ratelimit"] == '"default";r=0;t=10'
    # A limiter without policies: the policy has no window; a custom policy name.
    site.mount(Stub(Decision(True, 7, 6, 0.4, 0.0, Reason.OK)), key=API_KEY, policy_name="api")
    r = site.get("/api", "judy")
    assert r.headers["ratelimit-policy"] == '"api";q=7'
    assert r.headers["ratelimit"] == '"api";r=6;t=1'


def test_cost(site: Site) -> None:
    clock = Clock()
    site.mount(RateLimiter(5, 60, clock=clock), key=API_KEY, cost=2)
    assert [site.get("/api", "ken").headers.get("ratelimit") for _ in range(2)] == [
        '"default";r=3;t=60',
        '"default";r=1;t=60',
    ]
    assert site.get("/api", "ken").status_code == 429  # 2 needed, 1 left
    stub = Stub(Decision(True, 9, 8, 1.0, 0.0, Reason.OK))

    def cost(request: Any) -> int:  # the ASGI scope or the WSGI environ
        return 3 if (request.get("path") or request.get("PATH_INFO")) == "/export" else 1

    site.mount(stub, key=API_KEY, cost=cost)
    site.get("/export", "ken")
    site.get("/api", "ken")
    assert stub.calls == [("ken", 3), ("ken", 1)]
    # A cost beyond what any window allows can never pass: 429 without Retry-After, and no
    # RateLimit field (the decision says nothing about the client's state).
    site.mount(RateLimiter(5, 60, clock=clock), key=API_KEY, cost=6)
    r = site.get("/api", "liz")
    assert r.status_code == 429 and "retry-after" not in r.headers
    assert body(r) == {"error": "rate_limited", "reason": "cost_exceeds_limit", "retry_after": None}
    assert r.headers["ratelimit-policy"] == '"default";q=5;w=60' and "ratelimit" not in r.headers


def test_limiter_failures_are_counted_as_errors(site: Site) -> None:
    mw = site.mount(Broken(), key=API_KEY)
    r = site.get("/api", "leo")
    assert r.status_code == 500  # the server's own answer to an app that raised
    assert (mw.requests, mw.errors, mw.allowed) == (1, 1, 0)


# -- frameworks -------------------------------------------------------------------------------


def test_starlette_app_with_the_middleware_and_lifespan() -> None:
    started: list[bool] = []

    @contextlib.asynccontextmanager
    async def lifespan(app: Starlette) -> Any:
        started.append(True)
        yield

    async def items(request: Request) -> JSONResponse:
        outcome = request.state.rate_limit
        return JSONResponse({"client": outcome.client_id, "left": outcome.decision.remaining})

    async def healthz(request: Request) -> PlainTextResponse:
        return PlainTextResponse("ok")

    app = Starlette(
        routes=[Route("/items", items), Route("/healthz", healthz)],
        middleware=[
            Middleware(
                RateLimitMiddleware,
                limiter=RateLimiter(2, 30, clock=Clock()),
                key=API_KEY,
                exempt_paths=["/healthz"],
            )
        ],
        lifespan=lifespan,
    )
    with serve_asgi(app, lifespan="on") as url, client(url) as http:
        assert started == [True]  # the lifespan scope went through the middleware
        h = {"X-API-Key": "mallory"}
        r = http.get("/items", headers=h)
        assert r.json() == {"client": "mallory", "left": 1}
        assert r.headers["ratelimit"] == '"default";r=1;t=30'
        http.get("/items", headers=h)
        r = http.get("/items", headers=h)
        assert r.status_code == 429 and r.json()["error"] == "rate_limited"
        assert http.get("/healthz", headers=h).text == "ok"
        r = http.get("/nowhere", headers={"X-API-Key": "nina"})  # the app's 404, judged too
        assert r.status_code == 404 and r.headers["ratelimit"] == '"default";r=1;t=30'


def test_flask_app_with_the_wsgi_middleware() -> None:
    app = Flask(__name__)

    @app.get("/items")
    def items() -> Any:
        outcome = flask_request.environ["limiter.rate_limit"]
        return {"client": outcome.client_id, "left": outcome.decision.remaining}

    mw = WSGIRateLimitMiddleware(app.wsgi_app, RateLimiter(2, 30, clock=Clock()), key=API_KEY)
    app.wsgi_app = mw  # type: ignore[method-assign]
    with serve_wsgi(app) as url, client(url) as http:
        h = {"X-API-Key": "oscar"}
        r = http.get("/items", headers=h)
        assert r.json() == {"client": "oscar", "left": 1}
        assert r.headers["ratelimit"] == '"default";r=1;t=30'
        http.get("/items", headers=h)
        r = http.get("/items", headers=h)
        assert r.status_code == 429 and r.headers["retry-after"] == "30"
        assert r.json() == {"error": "rate_limited", "reason": "limited", "retry_after": 30}
    assert (mw.allowed, mw.limited) == (2, 1)


def test_decorator_on_a_sync_flask_view() -> None:
    clock = Clock()
    limiter = RateLimiter(2, 10, clock=clock)
    app = Flask(__name__)

    @app.errorhandler(RateLimitRefused)
    def refused(exc: RateLimitRefused) -> Any:
        return exc.body, exc.status, exc.headers

    @app.get("/search")
    @rate_limited(limiter, key=lambda: flask_request.headers.get("X-API-Key"))
    def search() -> Any:
        outcome = current_rate_limit()
        assert outcome is not None
        return "results", 200, list(outcome.headers)

    @app.get("/export")
    @rate_limited(
        limiter,
        key=lambda: flask_request.headers.get("X-API-Key"),
        cost=lambda: 2,
        on_refused=lambda exc: ({"custom": exc.status}, exc.status),
    )
    def export() -> Any:
        return "exported"

    with serve_wsgi(app) as url, client(url) as http:
        h = {"X-API-Key": "peggy"}
        r = http.get("/search", headers=h)
        assert r.status_code == 200 and r.text == "results"
        assert r.headers["ratelimit"] == '"default";r=1;t=10'
        assert r.headers["ratelimit-policy"] == '"default";q=2;w=10'
        clock.advance(2.5)
        assert http.get("/search", headers=h).headers["ratelimit"] == '"default";r=0;t=10'
        r = http.get("/search", headers=h)
        assert r.status_code == 429 and r.headers["retry-after"] == "8"  # 7.5 s rounded up
        assert r.json() == {"error": "rate_limited", "reason": "limited", "retry_after": 8}
        r = http.get("/search")
        assert r.status_code == 400
        assert r.json()["message"] == "no client id found in the key function"
        r = http.get("/export", headers={"X-API-Key": "quinn"})
        assert r.status_code == 200 and r.text == "exported"
        r = http.get("/export", headers={"X-API-Key": "quinn"})
        assert r.status_code == 429 and r.json() == {"custom": 429}
    gate: RateLimitGate = search.rate_limit  # type: ignore[attr-defined]
    assert (gate.requests, gate.allowed, gate.limited, gate.invalid) == (4, 2, 1, 1)
    assert current_rate_limit() is None


def test_decorator_on_an_async_starlette_endpoint() -> None:
    limiter = RateLimiter(2, 10, clock=Clock())

    async def items(request: Request) -> PlainTextResponse:
        outcome = current_rate_limit()
        assert outcome is not None
        return PlainTextResponse(f"items for {outcome.client_id}", headers=dict(outcome.headers))

    async def on_refused(request: Request, exc: Exception) -> Response:
        assert isinstance(exc, RateLimitRefused)
        return Response(exc.body, exc.status, headers=dict(exc.headers))

    def key(request: Request) -> str | None:
        return request.headers.get("x-api-key")

    limited_items = rate_limited(limiter, key=key)(items)
    offloaded_items = rate_limited(limiter, key=key, offload=True, policy_name="bulk")(items)
    app = Starlette(
        routes=[Route("/items", limited_items), Route("/bulk", offloaded_items)],
        exception_handlers={RateLimitRefused: on_refused},
    )
    with serve_asgi(app) as url, client(url) as http:
        h = {"X-API-Key": "rupert"}
        r = http.get("/items", headers=h)
        assert r.status_code == 200 and r.text == "items for rupert"
        assert r.headers["ratelimit"] == '"default";r=1;t=10'
        assert http.get("/items", headers=h).status_code == 200
        r = http.get("/items", headers=h)
        assert r.status_code == 429 and r.headers["retry-after"] == "10"
        assert r.json() == {"error": "rate_limited", "reason": "limited", "retry_after": 10}
        assert r.headers["ratelimit-policy"] == '"default";q=2;w=10'
        r = http.get("/bulk", headers={"X-API-Key": "sybil"})  # check() in a worker thread
        assert r.status_code == 200 and r.headers["ratelimit"] == '"bulk";r=1;t=10'
        assert http.get("/bulk").status_code == 400
    gate: RateLimitGate = limited_items.rate_limit  # type: ignore[attr-defined]
    assert (gate.requests, gate.allowed, gate.limited) == (3, 2, 1)


# -- construction -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("make", "error"),
    [
        (lambda: from_header("X API Key"), ValueError),
        (lambda: from_client_address(trusted_proxies=-1), ValueError),
        (lambda: RateLimitMiddleware(hello_asgi, object()), TypeError),  # type: ignore[arg-type]
        (lambda: RateLimitMiddleware(hello_asgi, Broken(), key="X-API-Key"), TypeError),  # type: ignore[arg-type]
        (lambda: RateLimitMiddleware(hello_asgi, Broken(), cost=0), ValueError),
        (lambda: RateLimitMiddleware(hello_asgi, Broken(), exempt_paths="/healthz"), ValueError),
        (lambda: RateLimitMiddleware(hello_asgi, Broken(), exempt_paths=["healthz"]), ValueError),
        (lambda: RateLimitMiddleware(hello_asgi, Broken(), policy_name="caf\u00e9"), ValueError),
        (lambda: rate_limited(Broken(), key="alice"), TypeError),  # type: ignore[arg-type]
        (lambda: rate_limited(Broken(), key=lambda: "a", cost=0), ValueError),
        (lambda: rate_limited(Broken(), key=lambda: "a", cost=1.5), TypeError),  # type: ignore[arg-type]
    ],
)
def test_bad_configuration_fails_at_construction(make: Callable[[], object], error: type) -> None:
    with pytest.raises(error):
        make()


# -- a circuit breaker in front of the backend ------------------------------------------------


class Gate:
    """A breaker stub: refuses while ``open``; ``retry_after`` seconds until it half-opens."""

    def __init__(self) -> None:
        self.open = False
        self.retry = 2.4

    def allow(self) -> bool:
        return not self.open

    def retry_after(self) -> float:
        return self.retry


def test_an_open_breaker_answers_503_before_the_limiter_spends_a_token(site: Site) -> None:
    limiter = RateLimiter(3, 2, clock=Clock())
    gate = Gate()
    mw = site.mount(limiter, key=API_KEY, breaker=gate)
    assert site.get("/api", "alice").status_code == 200
    gate.open = True
    r = site.get("/api", "alice")
    assert r.status_code == 503 and r.headers["retry-after"] == "3"
    assert body(r) == {"error": "backend_unavailable", "reason": "breaker_open", "retry_after": 3}
    assert limiter.peek("alice").remaining == 2  # no token spent on the refusal
    gate.open = False
    assert site.get("/api", "alice").status_code == 200
    assert mw.stats()["broken"] == 1 and mw.stats()["allowed"] == 2


def test_shadow_mode_counts_the_breaker_and_lets_the_request_through(site: Site) -> None:
    gate = Gate()
    gate.open = True
    mw = site.mount(RateLimiter(3, 2), key=API_KEY, breaker=gate, shadow=True)
    assert site.get("/api", "alice").status_code == 200
    assert mw.stats()["broken"] == 1


def test_the_decorator_takes_a_breaker() -> None:
    gate = Gate()
    gate.open = True

    @rate_limited(RateLimiter(3, 2), key=lambda: "alice", breaker=gate)
    def handler() -> str:
        return "ok"

    with pytest.raises(RateLimitRefused) as e:
        handler()
    assert e.value.status == 503
    gate.open = False
    assert handler() == "ok"
