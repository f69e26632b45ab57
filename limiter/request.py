"""The seed API's request: stamped with the wall clock when created."""

from __future__ import annotations

import math
import time


class Request:
    """A request to rate-limit, decided at ``timestamp`` (seconds since the epoch by default).

    A non-finite or non-numeric timestamp is refused with :class:`ValueError`.
    """

    __slots__ = ("timestamp",)

    def __init__(self, timestamp: float | None = None) -> None:
        if timestamp is None:
            self.timestamp: float = time.time()
            return
        if isinstance(timestamp, bool) or not isinstance(timestamp, int | float):
            raise ValueError(f"timestamp must be a number of seconds, got {timestamp!r}")
        if not math.isfinite(timestamp):
            raise ValueError(f"timestamp must be finite, got {timestamp!r}")
        self.timestamp = float(timestamp)

    def __repr__(self) -> str:
        return f"Request(timestamp={self.timestamp!r})"
