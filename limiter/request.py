"""The seed API's request: stamped with the wall clock when created."""

from __future__ import annotations

import time


class Request:
    """A request to rate-limit, decided at ``timestamp`` (seconds since the epoch by default)."""

    __slots__ = ("timestamp",)

    def __init__(self, timestamp: float | None = None) -> None:
        self.timestamp: float = time.time() if timestamp is None else float(timestamp)

    def __repr__(self) -> str:
        return f"Request(timestamp={self.timestamp!r})"
