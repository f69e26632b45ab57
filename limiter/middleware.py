"""HTTP rate limiting: ASGI and WSGI middleware, and a decorator for one handler.

Written against the raw ASGI and WSGI protocols: no web framework is imported, here or anywhere
in :mod:`limiter`. Works with Starlette/FastAPI (ASGI), Flask (WSGI) or any other app.

>>> from limiter import RateLimiter
>>> from limiter.middleware import RateLimitMiddleware, from_header
>>> async def app(scope, receive, send): ...
>>> app = RateLimitMiddleware(app, RateLimiter(100, 60), key=from_header("X-API-Key"))

Every judged request gets the ``RateLimit-Policy`` and ``RateLimit`` fields of
draft-ietf-httpapi-ratelimit-headers (structured-field form, drafts -08 to -11), optionally the
common ``X-RateLimit-*`` headers too; a refusal is ``429`` with ``Retry-After`` and a small JSON
body, ``503`` when the limiter answers :attr:`Reason.UNAVAILABLE`, and a client id that cannot be
determined or fails validation is ``400``. With ``breaker=`` (a circuit breaker in front of the
backend the app protects, e.g. ``agent.breaker("db")``: docs/adaptive.md), a request arriving
while the breaker refuses is ``503`` with ``Retry-After``, before the limiter spends a token.
See docs/middleware.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import inspect
import json
import math
import re
import threading
from collections.abc import Awaitable, Callable, Iterable, MutableMapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Final, ParamSpec, Protocol, TypeVar, cast

from .clientid import validate_client_id
from .decision import Decision, Reason

if TYPE_CHECKING:
    from wsgiref.types import StartResponse, WSGIApplication, WSGIEnvironment

__all__ = [
    "Breaker",
    "ClientKey",
    "Limiter",
    "RateLimitGate",
    "RateLimitMiddleware",
    "RateLimitOutcome",
    "RateLimitRefused",
    "WSGIRateLimitMiddleware",
    "current_rate_limit",
    "from_client_address",
    "from_header",
    "rate_limited",
]

#: The draft whose header syntax this module follows (the latest as of writing; the fields are
#: unchanged since -08).
DRAFT: Final = "draft-ietf-httpapi-ratelimit-headers-11"
#: Seconds of float rounding forgiven before rounding a duration up to whole seconds (epoch
#: times carry ~2.4e-7 s of rounding: 2.0000002 s is 2 s, not 3 s).
TIME_EPSILON: Final = 1e-6
#: Key of the :class:`RateLimitOutcome` in the ASGI ``scope["state"]`` (Starlette:
#: ``request.state.rate_limit``).
SCOPE_STATE_KEY: Final = "rate_limit"
#: Key of the :class:`RateLimitOutcome` in the WSGI environ (Flask: ``request.environ[...]``).
ENVIRON_KEY: Final = "limiter.rate_limit"

_STATUS_LINES: Final = {
    400: "400 Bad Request",
    429: "429 Too Many Requests",
    503: "503 Service Unavailable",
}
_TOKEN = re.compile(r"^[!#$%&'*+.^_`|~0-9A-Za-z-]+$")
_JSON: Final = ("Content-Type", "application/json")

P = ParamSpec("P")
R = TypeVar("R")

# -- the raw protocols ---------------------------------------------------------------------------

Scope = MutableMapping[str, Any]
Message = MutableMapping[str, Any]
Receive = Callable[[], Awaitable[Message]]
Send = Callable[[Message], Awaitable[None]]
ASGIApp = Callable[[Scope, Receive, Send], Awaitable[None]]
#: A user key function: the ASGI scope or WSGI environ in, the client id out (``None``: unknown).
KeyFunc = Callable[[Any], object]
#: A cost function: the ASGI scope or WSGI environ in, the request's cost in tokens out.
CostFunc = Callable[[Any], int]


class Breaker(Protocol):
    """What ``breaker=`` needs: :class:`producer.health.BreakerGate` qualifies."""

    def allow(self) -> bool: ...

    def retry_after(self) -> float: ...


class Limiter(Protocol):
    """What the middleware needs: :class:`~limiter.RateLimiter` and
    :class:`~limiter.StrictLimiter` both qualify. An optional ``policies`` attribute (a sequence
    of objects with ``limit`` and ``window``) gives ``RateLimit-Policy`` its window."""

    def check(self, client_id: str, *, cost: int = ...) -> Decision: ...


# -- where the client id comes from --------------------------------------------------------------


class ClientKey:
    """Where a request's client id comes from: :func:`from_header`, :func:`from_client_address`,
    or a user function (wrapped by the middleware). Raising :class:`ValueError` (or
    :class:`LookupError`) means the request carries no usable id: the answer is 400."""

    __slots__ = ()

    @property
    def source(self) -> str:
        """How error messages name this source."""
        return "the request"

    def from_scope(self, scope: Scope) -> object:
        """The client id of an ASGI request."""
        raise NotImplementedError

    def from_environ(self, environ: WSGIEnvironment) -> object:
        """The client id of a WSGI request."""
        raise NotImplementedError


class _HeaderKey(ClientKey):
    __slots__ = ("_asgi", "_wsgi", "name")

    def __init__(self, name: str) -> None:
        if not isinstance(name, str) or not _TOKEN.match(name):
            raise ValueError(f"not an HTTP header name: {name!r}")
        self.name = name
        self._asgi = name.lower().encode("ascii")
        upper = name.upper().replace("-", "_")
        self._wsgi = upper if upper in ("CONTENT_TYPE", "CONTENT_LENGTH") else "HTTP_" + upper

    @property
    def source(self) -> str:
        return f"the {self.name} header"

    def from_scope(self, scope: Scope) -> object:
        want = self._asgi
        for name, value in scope.get("headers", ()):
            if name == want or name.lower() == want:
                return self._found(value.decode("latin-1"))
        raise ValueError(f"missing {self.name} header")

    def from_environ(self, environ: WSGIEnvironment) -> object:
        value = environ.get(self._wsgi)
        if value is None:
            raise ValueError(f"missing {self.name} header")
        return self._found(value)

    def _found(self, value: str) -> str:
        value = value.strip()
        if not value:
            raise ValueError(f"empty {self.name} header")
        return value

    def __repr__(self) -> str:
        return f"from_header({self.name!r})"


class _AddressKey(ClientKey):
    __slots__ = ("trusted_proxies",)

    def __init__(self, trusted_proxies: int) -> None:
        if (
            isinstance(trusted_proxies, bool)
            or not isinstance(trusted_proxies, int)
            or trusted_proxies < 0
        ):
            raise ValueError(
                f"trusted_proxies must be a whole number >= 0, got {trusted_proxies!r}"
            )
        self.trusted_proxies = trusted_proxies

    @property
    def source(self) -> str:
        return "the client address"

    def _forwarded(self, values: Iterable[str]) -> str | None:
        """The address ``trusted_proxies`` hops from the right of X-Forwarded-For, if present."""
        n = self.trusted_proxies
        if not n:
            return None
        hops = [h.strip() for v in values for h in v.split(",")]
        hops = [h for h in hops if h]
        return hops[-n] if len(hops) >= n else None

    def from_scope(self, scope: Scope) -> object:
        if self.trusted_proxies:
            values = (
                v.decode("latin-1")
                for k, v in scope.get("headers", ())
                if k.lower() == b"x-forwarded-for"
            )
            address = self._forwarded(values)
            if address is not None:
                return address
        client = scope.get("client")
        if not client:
            raise ValueError("the client address is unknown (the server gave none)")
        return str(client[0])

    def from_environ(self, environ: WSGIEnvironment) -> object:
        if self.trusted_proxies:
            xff = environ.get("HTTP_X_FORWARDED_FOR")
            address = self._forwarded([xff] if xff else [])
            if address is not None:
                return address
        address = environ.get("REMOTE_ADDR")
        if not address:
            raise ValueError("the client address is unknown (no REMOTE_ADDR)")
        return str(address)

    def __repr__(self) -> str:
        return f"from_client_address(trusted_proxies={self.trusted_proxies})"


class _FuncKey(ClientKey):
    __slots__ = ("func",)

    def __init__(self, func: KeyFunc) -> None:
        self.func = func

    @property
    def source(self) -> str:
        return "the key function"

    def from_scope(self, scope: Scope) -> object:
        return self.func(scope)

    def from_environ(self, environ: WSGIEnvironment) -> object:
        return self.func(environ)

    def __repr__(self) -> str:
        return f"<key function {self.func!r}>"


def from_header(name: str) -> ClientKey:
    """The client id is the value of header ``name`` (e.g. ``"X-API-Key"``); missing or empty:
    400."""
    return _HeaderKey(name)


def from_client_address(*, trusted_proxies: int = 0) -> ClientKey:
    """The client id is the peer's IP address.

    Behind ``trusted_proxies`` reverse proxies that each append to ``X-Forwarded-For``, the
    address that many hops from the right of that header (the one your outermost proxy saw);
    the left part of the header is whatever the client sent, never trusted. With fewer hops
    than that in the header, the socket's peer address.
    """
    return _AddressKey(trusted_proxies)


# -- outcomes ------------------------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class RateLimitOutcome:
    """What the gate made of one request.

    ``status`` is ``None`` when the request goes on to the handler (allowed, or any outcome in
    shadow mode), else the status of the refusal sent instead (400, 429 or 503). ``headers`` are
    the fields to send with the response (for a refusal also ``Content-Type``), ``body`` the
    refusal's JSON (empty otherwise); ``decision`` is the limiter's (``None`` when no client id
    could be determined).
    """

    status: int | None
    headers: tuple[tuple[str, str], ...]
    body: bytes
    decision: Decision | None
    client_id: str | None

    @property
    def refused(self) -> bool:
        """True when the request was answered by the gate, not the handler."""
        return self.status is not None


class RateLimitRefused(Exception):
    """Raised by a :func:`rate_limited` handler instead of running it: turn it into a response
    with ``status``, ``headers`` (a list of name/value pairs, ``Content-Type`` included) and
    ``body`` (JSON bytes)."""

    def __init__(self, outcome: RateLimitOutcome) -> None:
        assert outcome.status is not None
        super().__init__(f"{outcome.status}: {outcome.body.decode('utf-8', 'replace')}")
        self.outcome = outcome
        self.status: int = outcome.status
        self.headers: list[tuple[str, str]] = list(outcome.headers)
        self.body: bytes = outcome.body
        self.decision: Decision | None = outcome.decision


_CURRENT: contextvars.ContextVar[RateLimitOutcome | None] = contextvars.ContextVar(
    "limiter_rate_limit", default=None
)


def current_rate_limit() -> RateLimitOutcome | None:
    """Inside a :func:`rate_limited` handler: its outcome (``headers`` to copy onto the
    response); ``None`` elsewhere."""
    return _CURRENT.get()


# -- the shared core -----------------------------------------------------------------------------


def _whole_seconds(seconds: float) -> int | None:
    """``seconds`` rounded up to whole seconds (>= 0); ``None`` when not finite."""
    if not math.isfinite(seconds):
        return None
    return max(0, math.ceil(seconds - TIME_EPSILON))


def _sf_string(value: str) -> str:
    """``value`` as a structured-field String (RFC 8941 section 3.3.3)."""
    if not isinstance(value, str) or not all(" " <= c <= "~" for c in value):
        raise ValueError(f"policy_name must be printable ASCII, got {value!r}")
    return '"' + value.replace("\\", "\\\\").replace('"', '\\"') + '"'


def _policy_windows(limiter: object) -> tuple[dict[int, int], int | None]:
    """``limit -> window`` (whole seconds, >= 1) of the limiter's policies, and the first one's.

    Two policies with the same limit: the longer window (the lower rate) is the more restrictive.
    """
    windows: dict[int, int] = {}
    first: int | None = None
    for p in getattr(limiter, "policies", None) or ():
        limit, window = getattr(p, "limit", None), getattr(p, "window", None)
        if isinstance(limit, bool) or not isinstance(limit, int):
            continue
        if isinstance(window, bool) or not isinstance(window, int | float):
            continue
        w = _whole_seconds(float(window))
        if w is None or window <= 0:
            continue
        w = max(1, w)  # the draft: a non-zero integer; sub-second windows are not expressible
        windows[limit] = max(windows.get(limit, 0), w)
        if first is None:
            first = w
    return windows, first


def _exempt_paths(paths: Iterable[str]) -> tuple[frozenset[str], tuple[str, ...]]:
    if isinstance(paths, str):
        raise ValueError("exempt_paths must be a collection of paths, not one string")
    exact: set[str] = set()
    prefixes: list[str] = []
    for p in paths:
        if not isinstance(p, str) or not p.startswith("/"):
            raise ValueError(f"exempt paths start with '/', got {p!r}")
        if p.endswith("*"):
            prefixes.append(p[:-1])
        else:
            exact.add(p)
    return frozenset(exact), tuple(prefixes)


def _key_error_message(exc: Exception) -> str:
    if isinstance(exc, KeyError) and exc.args:
        return f"could not determine the client id: {exc.args[0]!s} is missing"
    return str(exc) or f"could not determine the client id ({type(exc).__name__})"


class RateLimitGate:
    """Configuration, decision-to-response logic and counters shared by
    :class:`RateLimitMiddleware`, :class:`WSGIRateLimitMiddleware` and :func:`rate_limited`.

    Counters (whole numbers, updated under a lock, read any time; :meth:`stats` snapshots them):

    - ``requests``: HTTP requests seen (exempt ones included);
    - ``exempt``: requests on an exempt path, passed through unjudged;
    - ``allowed``: admitted by the limiter;
    - ``limited``: refused with 429; ``unavailable``: refused with 503 (``Reason.UNAVAILABLE``);
    - ``shadow_limited``: would have been refused (429 or 503) but shadow mode let them through;
    - ``invalid``: no usable client id: answered 400 (let through in shadow mode);
    - ``errors``: the key function, the cost function or the limiter raised something else
      (the exception propagates: the server answers 500);
    - ``broken``: refused by ``breaker`` (503; in shadow mode let through to the limiter).
    """

    COUNTERS: Final = (
        "requests",
        "exempt",
        "allowed",
        "limited",
        "unavailable",
        "shadow_limited",
        "invalid",
        "errors",
        "broken",
    )

    def __init__(
        self,
        limiter: Limiter,
        *,
        shadow: bool = False,
        x_ratelimit_headers: bool = False,
        exempt_paths: Iterable[str] = (),
        policy_name: str = "default",
        offload: bool = False,
        breaker: Breaker | None = None,
    ) -> None:
        if not callable(getattr(limiter, "check", None)):
            raise TypeError(f"limiter must have check(client_id, cost=...), got {limiter!r}")
        self.limiter = limiter
        self.shadow = bool(shadow)
        self.x_ratelimit_headers = bool(x_ratelimit_headers)
        self.offload = bool(offload)
        if breaker is not None and not callable(getattr(breaker, "allow", None)):
            raise TypeError(f"breaker must have allow() and retry_after(), got {breaker!r}")
        self.breaker = breaker
        self.policy_name = policy_name
        self._name = _sf_string(policy_name)
        self._windows, self._first_window = _policy_windows(limiter)
        self._policy_fields: dict[int, str] = {}
        self._exact, self._prefixes = _exempt_paths(exempt_paths)
        self._lock = threading.Lock()
        self.requests = 0
        self.exempt = 0
        self.allowed = 0
        self.limited = 0
        self.unavailable = 0
        self.shadow_limited = 0
        self.invalid = 0
        self.errors = 0
        self.broken = 0

    def stats(self) -> dict[str, int]:
        """A consistent snapshot of the counters."""
        with self._lock:
            return {name: getattr(self, name) for name in self.COUNTERS}

    def is_exempt(self, path: str) -> bool:
        """Whether ``path`` is never limited (exact match, or prefix for entries ending in
        ``*``)."""
        return path in self._exact or path.startswith(self._prefixes)

    # -- internals ----------------------------------------------------------------------------

    def _bump(self, name: str) -> None:
        with self._lock:
            setattr(self, name, getattr(self, name) + 1)

    def _resolve(
        self, source: str, get_id: Callable[[], object], get_cost: Callable[[], int] | None
    ) -> tuple[str, int] | RateLimitOutcome:
        """The client id and cost of a request, or the 400 outcome when it has no usable id."""
        try:
            raw = get_id()
        except (ValueError, LookupError) as exc:
            return self._invalid(_key_error_message(exc))
        except Exception:
            self._bump("errors")
            raise
        if raw is None:
            return self._invalid(f"no client id found in {source}")
        try:
            client_id = validate_client_id(raw)
        except ValueError as exc:
            return self._invalid(f"invalid client id from {source}: {exc}")
        if get_cost is None:
            return client_id, 1
        try:
            return client_id, get_cost()
        except Exception:
            self._bump("errors")
            raise

    def _open(self, client_id: str) -> RateLimitOutcome | None:
        """The 503 outcome when ``breaker`` refuses the request, else None."""
        breaker = self.breaker
        if breaker is None or breaker.allow():
            return None
        self._bump("broken")
        if self.shadow:
            return None
        retry = max(1, _whole_seconds(breaker.retry_after()) or 1)
        body = {"error": "backend_unavailable", "reason": "breaker_open", "retry_after": retry}
        headers = (("Retry-After", str(retry)), _JSON)
        return RateLimitOutcome(503, headers, json.dumps(body).encode(), None, client_id)

    def _judge(self, client_id: str, cost: int) -> RateLimitOutcome:
        """The breaker, then the limiter."""
        return self._open(client_id) or self._verdict(self._check(client_id, cost), client_id)

    async def _judge_async(self, client_id: str, cost: int) -> RateLimitOutcome:
        broken = self._open(client_id)
        if broken is not None:
            return broken
        return self._verdict(await self._check_async(client_id, cost), client_id)

    def _check(self, client_id: str, cost: int) -> Decision:
        try:
            return self.limiter.check(client_id, cost=cost)
        except Exception:
            self._bump("errors")
            raise

    async def _check_async(self, client_id: str, cost: int) -> Decision:
        if self.offload:
            return await asyncio.to_thread(self._check, client_id, cost)
        return self._check(client_id, cost)

    def _invalid(self, message: str) -> RateLimitOutcome:
        self._bump("invalid")
        if self.shadow:
            return RateLimitOutcome(None, (), b"", None, None)
        body = json.dumps({"error": "invalid_client_id", "message": message}).encode()
        return RateLimitOutcome(400, (_JSON,), body, None, None)

    def _policy_field(self, limit: int) -> str:
        field = self._policy_fields.get(limit)
        if field is None:
            w = self._windows.get(limit, self._first_window)
            field = f"{self._name};q={limit}" + ("" if w is None else f";w={w}")
            if len(self._policy_fields) < 64:  # limits are few; never grow without bound
                self._policy_fields[limit] = field
        return field

    def _fields(self, d: Decision, *, state: bool) -> list[tuple[str, str]]:
        limit = max(0, int(d.limit))
        fields = [("RateLimit-Policy", self._policy_field(limit))]
        if not state:
            return fields
        remaining = max(0, int(d.remaining))
        t = _whole_seconds(d.reset_after)
        fields.append(
            ("RateLimit", f"{self._name};r={remaining}" + ("" if t is None else f";t={t}"))
        )
        if self.x_ratelimit_headers:
            fields.append(("X-RateLimit-Limit", str(limit)))
            fields.append(("X-RateLimit-Remaining", str(remaining)))
            if t is not None:
                fields.append(("X-RateLimit-Reset", str(t)))
        return fields

    def _verdict(self, d: Decision, client_id: str) -> RateLimitOutcome:
        """The response for the limiter's decision ``d``."""
        if d.allowed:
            self._bump("allowed")
            return RateLimitOutcome(None, tuple(self._fields(d, state=True)), b"", d, client_id)
        unavailable = d.reason == Reason.UNAVAILABLE
        # Only a LIMITED refusal describes the client's state; the others (unavailable, cost
        # beyond any window, capacity, stale, future) carry placeholders: policy field only.
        fields = self._fields(d, state=d.reason == Reason.LIMITED)
        if self.shadow:
            self._bump("shadow_limited")
            return RateLimitOutcome(None, tuple(fields), b"", d, client_id)
        retry = _whole_seconds(d.retry_after)
        if retry is not None:
            retry = max(1, retry)
            fields.append(("Retry-After", str(retry)))
        fields.append(_JSON)
        body = {
            "error": "unavailable" if unavailable else "rate_limited",
            "reason": str(d.reason),
            "retry_after": retry,
        }
        self._bump("unavailable" if unavailable else "limited")
        status = 503 if unavailable else 429
        return RateLimitOutcome(status, tuple(fields), json.dumps(body).encode(), d, client_id)


def _as_key(key: ClientKey | KeyFunc | None) -> ClientKey:
    if key is None:
        return from_client_address()
    if isinstance(key, ClientKey):
        return key
    if isinstance(key, str) or not callable(key):
        raise TypeError(
            "key must be from_header(...), from_client_address(...) or a function of the "
            f"ASGI scope / WSGI environ, got {key!r}"
        )
    return _FuncKey(key)


def _as_cost(cost: CostFunc | int | None) -> CostFunc | None:
    if cost is None or cost == 1:
        return None
    if isinstance(cost, int) and not isinstance(cost, bool):
        if cost < 1:
            raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
        n = cost
        return lambda _: n
    if not callable(cost):
        raise TypeError(f"cost must be a whole number or a function, got {cost!r}")
    return cost


# -- ASGI ----------------------------------------------------------------------------------------


class RateLimitMiddleware(RateLimitGate):
    """ASGI middleware: judges every ``http`` request before ``app`` sees it.

    ``RateLimitMiddleware(app, limiter, key=from_header("X-API-Key"))``. Options:

    - ``key``: :func:`from_header`, :func:`from_client_address` (default) or a function of the
      ASGI scope returning the client id (``None``, :class:`ValueError` or :class:`LookupError`:
      400).
    - ``cost``: tokens per request, a whole number or a function of the scope (default 1).
    - ``shadow``: never refuse; decide, count (``shadow_limited``) and send the fields anyway.
    - ``x_ratelimit_headers``: also send ``X-RateLimit-Limit/Remaining/Reset``.
    - ``exempt_paths``: paths never judged (``"/healthz"``; ``"/static/*"`` for a prefix),
      matched against ``scope["path"]`` as the server gives it.
    - ``policy_name``: the policy identifier in the fields (default ``"default"``).
    - ``offload``: call ``limiter.check`` in a worker thread (``asyncio.to_thread``): for a
      limiter whose check blocks on the network (:class:`~limiter.StrictLimiter`). Needs asyncio.
    - ``breaker``: a circuit breaker (``allow()``, ``retry_after()``; e.g.
      ``agent.breaker("db")``) checked before the limiter: refused requests get 503 with
      ``Retry-After`` and spend no token (default: none).

    ``lifespan`` and ``websocket`` scopes pass through untouched. The outcome is put in
    ``scope["state"]["rate_limit"]`` (Starlette: ``request.state.rate_limit``).
    """

    def __init__(
        self,
        app: ASGIApp,
        limiter: Limiter,
        *,
        key: ClientKey | KeyFunc | None = None,
        cost: CostFunc | int | None = None,
        shadow: bool = False,
        x_ratelimit_headers: bool = False,
        exempt_paths: Iterable[str] = (),
        policy_name: str = "default",
        offload: bool = False,
        breaker: Breaker | None = None,
    ) -> None:
        super().__init__(
            limiter,
            shadow=shadow,
            x_ratelimit_headers=x_ratelimit_headers,
            exempt_paths=exempt_paths,
            policy_name=policy_name,
            offload=offload,
            breaker=breaker,
        )
        self.app = app
        self.key = _as_key(key)
        self.cost = _as_cost(cost)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        self._bump("requests")
        if self.is_exempt(scope.get("path", "")):
            self._bump("exempt")
            await self.app(scope, receive, send)
            return
        key, cost = self.key, self.cost
        resolved = self._resolve(
            key.source,
            lambda: key.from_scope(scope),
            None if cost is None else lambda: cost(scope),
        )
        if isinstance(resolved, RateLimitOutcome):
            outcome = resolved
        else:
            client_id, n = resolved
            outcome = await self._judge_async(client_id, n)
        state = scope.get("state")
        if state is None:
            scope["state"] = {SCOPE_STATE_KEY: outcome}
        elif isinstance(state, MutableMapping):
            state[SCOPE_STATE_KEY] = outcome
        if outcome.status is not None:
            await _send_refusal(send, outcome)
            return
        if not outcome.headers:
            await self.app(scope, receive, send)
            return
        extra = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers]

        async def send_with_fields(message: Message) -> None:
            if message["type"] == "http.response.start":
                message = dict(message)
                message["headers"] = [*message.get("headers", ()), *extra]
            await send(message)

        await self.app(scope, receive, send_with_fields)


async def _send_refusal(send: Send, outcome: RateLimitOutcome) -> None:
    headers = [(k.lower().encode("latin-1"), v.encode("latin-1")) for k, v in outcome.headers]
    headers.append((b"content-length", str(len(outcome.body)).encode()))
    await send({"type": "http.response.start", "status": outcome.status, "headers": headers})
    await send({"type": "http.response.body", "body": outcome.body, "more_body": False})


# -- WSGI ----------------------------------------------------------------------------------------


class WSGIRateLimitMiddleware(RateLimitGate):
    """WSGI middleware (Flask: ``app.wsgi_app = WSGIRateLimitMiddleware(app.wsgi_app, ...)``).

    The options of :class:`RateLimitMiddleware` (``breaker`` included) except ``offload``;
    ``key`` and ``cost`` functions take the WSGI environ, ``exempt_paths`` match ``PATH_INFO``.
    The outcome is put in ``environ["limiter.rate_limit"]``.
    """

    def __init__(
        self,
        app: WSGIApplication,
        limiter: Limiter,
        *,
        key: ClientKey | KeyFunc | None = None,
        cost: CostFunc | int | None = None,
        shadow: bool = False,
        x_ratelimit_headers: bool = False,
        exempt_paths: Iterable[str] = (),
        policy_name: str = "default",
        breaker: Breaker | None = None,
    ) -> None:
        super().__init__(
            limiter,
            shadow=shadow,
            x_ratelimit_headers=x_ratelimit_headers,
            exempt_paths=exempt_paths,
            policy_name=policy_name,
            breaker=breaker,
        )
        self.app = app
        self.key = _as_key(key)
        self.cost = _as_cost(cost)

    def __call__(self, environ: WSGIEnvironment, start_response: StartResponse) -> Iterable[bytes]:
        self._bump("requests")
        if self.is_exempt(environ.get("PATH_INFO", "")):
            self._bump("exempt")
            return self.app(environ, start_response)
        key, cost = self.key, self.cost
        resolved = self._resolve(
            key.source,
            lambda: key.from_environ(environ),
            None if cost is None else lambda: cost(environ),
        )
        if isinstance(resolved, RateLimitOutcome):
            outcome = resolved
        else:
            client_id, n = resolved
            outcome = self._judge(client_id, n)
        environ[ENVIRON_KEY] = outcome
        if outcome.status is not None:
            headers = [*outcome.headers, ("Content-Length", str(len(outcome.body)))]
            start_response(_STATUS_LINES[outcome.status], headers)
            return [outcome.body]
        if not outcome.headers:
            return self.app(environ, start_response)
        extra = list(outcome.headers)

        def start_with_fields(
            status: str, headers: list[tuple[str, str]], exc_info: Any = None
        ) -> Callable[[bytes], object]:
            return start_response(status, [*headers, *extra], exc_info)

        return self.app(environ, start_with_fields)


# -- the decorator -------------------------------------------------------------------------------


def rate_limited(
    limiter: Limiter,
    *,
    key: Callable[..., object],
    cost: int | Callable[..., int] = 1,
    shadow: bool = False,
    x_ratelimit_headers: bool = False,
    policy_name: str = "default",
    on_refused: Callable[[RateLimitRefused], Any] | None = None,
    offload: bool = False,
    breaker: Breaker | None = None,
) -> Callable[[Callable[P, R]], Callable[P, R]]:
    """Limit one handler, sync or async, in any framework.

    ``key`` (and ``cost``, if a function) is called with the handler's own arguments and returns
    the client id. A refused call does not run the handler: it raises :class:`RateLimitRefused`
    (status 429, 503 or 400, headers, JSON body), which the app turns into a response with one
    exception handler; or, with ``on_refused``, returns ``on_refused(exc)`` instead (awaited if
    awaitable, in an async handler). An admitted call runs the handler, within which
    :func:`current_rate_limit` gives the outcome (its ``headers`` to copy onto the response).
    ``shadow``, ``x_ratelimit_headers``, ``policy_name``, ``breaker`` and ``offload`` (async
    handlers) as for :class:`RateLimitMiddleware`. Counters: ``handler.rate_limit`` (a
    :class:`RateLimitGate`), shared by all the handlers one ``rate_limited(...)`` call decorates.
    """
    if not callable(key):
        raise TypeError(f"key must be a function of the handler's arguments, got {key!r}")
    if not callable(cost):
        if isinstance(cost, bool) or not isinstance(cost, int):
            raise TypeError(f"cost must be a whole number or a function, got {cost!r}")
        if cost < 1:
            raise ValueError(f"cost must be a whole number >= 1, got {cost!r}")
    gate = RateLimitGate(
        limiter,
        shadow=shadow,
        x_ratelimit_headers=x_ratelimit_headers,
        policy_name=policy_name,
        offload=offload,
        breaker=breaker,
    )

    def resolve(
        args: tuple[Any, ...], kwargs: dict[str, Any]
    ) -> tuple[str, int] | RateLimitOutcome:
        gate._bump("requests")
        get_cost = None if not callable(cost) else lambda: cost(*args, **kwargs)
        resolved = gate._resolve("the key function", lambda: key(*args, **kwargs), get_cost)
        if not isinstance(resolved, RateLimitOutcome) and not callable(cost):
            return resolved[0], cost
        return resolved

    def decorate(fn: Callable[P, R]) -> Callable[P, R]:
        if inspect.iscoroutinefunction(fn):

            @functools.wraps(fn)
            async def async_wrapper(*args: Any, **kwargs: Any) -> Any:
                resolved = resolve(args, kwargs)
                if isinstance(resolved, RateLimitOutcome):
                    outcome = resolved
                else:
                    outcome = await gate._judge_async(*resolved)
                if outcome.status is not None:
                    refused = RateLimitRefused(outcome)
                    if on_refused is None:
                        raise refused
                    answer = on_refused(refused)
                    return await answer if inspect.isawaitable(answer) else answer
                token = _CURRENT.set(outcome)
                try:
                    return await fn(*args, **kwargs)
                finally:
                    _CURRENT.reset(token)

            async_wrapper.rate_limit = gate  # type: ignore[attr-defined]
            return cast("Callable[P, R]", async_wrapper)

        @functools.wraps(fn)
        def wrapper(*args: P.args, **kwargs: P.kwargs) -> R:
            resolved = resolve(args, kwargs)
            outcome = resolved if isinstance(resolved, RateLimitOutcome) else gate._judge(*resolved)
            if outcome.status is not None:
                refused = RateLimitRefused(outcome)
                if on_refused is None:
                    raise refused
                return cast("R", on_refused(refused))
            token = _CURRENT.set(outcome)
            try:
                return fn(*args, **kwargs)
            finally:
                _CURRENT.reset(token)

        wrapper.rate_limit = gate  # type: ignore[attr-defined]
        return wrapper

    return decorate
