"""The aggregator's operations endpoint: ``/healthz``, ``/readyz`` and ``/metrics``.

A small threaded HTTP server (standard library) beside the service loop; it never touches the
usage or tick paths. ``/healthz`` and ``/readyz`` answer 200 or 503 with a one-line JSON body
that says why; ``/metrics`` is the Prometheus exposition of a dedicated registry (text format,
or OpenMetrics when the scraper asks for it; gzip when accepted). Requests are not logged.
"""

from __future__ import annotations

import gzip
import json
import logging
import socket
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

from prometheus_client import CollectorRegistry
from prometheus_client.exposition import choose_encoder

log = logging.getLogger(__name__)

#: ``(ok, details)``: 200 with the details as JSON when ok, else 503.
Check = Callable[[], tuple[bool, dict[str, Any]]]

#: Default bind address and port of ``drl aggregator run``.
DEFAULT_HOST = "127.0.0.1"
DEFAULT_PORT = 9464


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    registry: CollectorRegistry
    checks: dict[str, Check]


class _Server6(_Server):
    address_family = socket.AF_INET6


class _Handler(BaseHTTPRequestHandler):
    server: _Server
    protocol_version = "HTTP/1.1"

    def do_GET(self) -> None:
        self._serve(body=True)

    def do_HEAD(self) -> None:
        self._serve(body=False)

    def _serve(self, *, body: bool) -> None:
        path = self.path.split("?", 1)[0].rstrip("/") or "/"
        try:
            if path == "/metrics":
                encoder, content_type = choose_encoder(self.headers.get("Accept", ""))
                self._reply(200, content_type, encoder(self.server.registry), body)
                return
            check = self.server.checks.get(path)
            if check is None:
                paths = sorted([*self.server.checks, "/metrics"])
                self._json(404, {"error": "not found", "paths": paths}, body)
                return
            ok, details = check()
            self._json(200 if ok else 503, details, body)
        except Exception as e:  # a failing collector must not kill the server
            log.exception("http: %s failed", path)
            self._json(500, {"error": f"{type(e).__name__}: {e}"}, body)

    def _json(self, code: int, payload: dict[str, Any], body: bool) -> None:
        data = (json.dumps(payload, default=str, sort_keys=True) + "\n").encode()
        self._reply(code, "application/json", data, body)

    def _reply(self, code: int, content_type: str, data: bytes, body: bool) -> None:
        if "gzip" in self.headers.get("Accept-Encoding", "") and len(data) > 1024:
            data = gzip.compress(data, compresslevel=5)
            gzipped = True
        else:
            gzipped = False
        self.send_response(code)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(data)))
        self.send_header("Cache-Control", "no-store")
        if gzipped:
            self.send_header("Content-Encoding", "gzip")
        self.end_headers()
        if body:
            self.wfile.write(data)

    def log_message(self, format: str, *args: Any) -> None:
        pass  # no per-request logs


class OpsServer:
    """Serves ``/healthz``, ``/readyz`` (the two checks) and ``/metrics`` (``registry``).

    Binds in the constructor (``OSError`` if the address is taken); :meth:`start` serves from a
    daemon thread; :meth:`close` stops. Port 0 picks a free port (see :attr:`port`).
    """

    def __init__(
        self,
        host: str,
        port: int,
        registry: CollectorRegistry,
        *,
        health: Check,
        ready: Check,
    ) -> None:
        # an IPv6 address such as "::" needs an IPv6 socket
        self._server = (_Server6 if ":" in host else _Server)((host, port), _Handler)
        self._server.registry = registry
        self._server.checks = {"/healthz": health, "/readyz": ready}
        self._thread: threading.Thread | None = None

    @property
    def host(self) -> str:
        return str(self._server.server_address[0])

    @property
    def port(self) -> int:
        return int(self._server.server_address[1])

    def start(self) -> OpsServer:
        self._thread = threading.Thread(
            target=self._server.serve_forever,
            kwargs={"poll_interval": 0.2},
            name="drl-http",
            daemon=True,
        )
        self._thread.start()
        return self

    def close(self) -> None:
        if self._thread is not None:
            self._server.shutdown()
            self._thread.join(5)
            self._thread = None
        self._server.server_close()
