"""Policies and the one parser of rate strings such as ``"100/minute"`` or ``"10 per 5 minutes"``.

A :class:`Policy` says: at most ``limit`` tokens (requests, or cost units) per ``window`` seconds,
with an optional ``burst`` (bucket capacity, for the token bucket and GCRA) and an algorithm.
"""

from __future__ import annotations

import math
import re
from dataclasses import dataclass

#: The algorithm names :class:`Policy` accepts; ``limiter.algorithms.ALGORITHMS`` implements each.
ALGORITHM_NAMES = (
    "sliding_log",
    "token_bucket",
    "gcra",
    "fixed_window",
    "sliding_window",
)

#: Used when a policy names no algorithm: the only exact one (never more than ``limit`` in any
#: interval of ``window`` seconds).
DEFAULT_ALGORITHM = "sliding_log"

#: Largest ``limit`` the sliding log accepts: its memory is 8 bytes per token per client.
MAX_SLIDING_LOG_LIMIT = 4096

_UNITS: dict[str, float] = {
    "ms": 0.001,
    "millisecond": 0.001,
    "s": 1.0,
    "sec": 1.0,
    "second": 1.0,
    "m": 60.0,
    "min": 60.0,
    "minute": 60.0,
    "h": 3600.0,
    "hour": 3600.0,
    "d": 86400.0,
    "day": 86400.0,
}

_RATE = re.compile(
    r"""^\s*(?P<limit>\d+)\s*(?:/|per)\s*(?P<count>\d+(?:\.\d+)?)?\s*(?P<unit>[a-z]+)\s*$""",
    re.IGNORECASE,
)


def _finite_positive(name: str, value: object) -> float:
    if isinstance(value, bool) or not isinstance(value, int | float):
        raise ValueError(f"{name} must be a number, got {type(value).__name__}")
    v = float(value)
    if math.isnan(v) or math.isinf(v):
        raise ValueError(f"{name} must be finite, got {value!r}")
    if v <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return v


def _positive_int(name: str, value: object) -> int:
    if isinstance(value, bool) or not isinstance(value, int):
        if isinstance(value, float) and value.is_integer():
            value = int(value)
        else:
            raise ValueError(f"{name} must be a whole number, got {value!r}")
    if value <= 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


@dataclass(frozen=True, slots=True)
class Policy:
    """At most ``limit`` tokens per ``window`` seconds.

    ``burst`` is the bucket capacity in tokens for ``token_bucket`` and ``gcra`` (default:
    ``limit``) and must be ``None`` for the window algorithms, which have no separate burst.
    """

    limit: int
    window: float
    burst: int | None = None
    algorithm: str = DEFAULT_ALGORITHM

    def __post_init__(self) -> None:
        object.__setattr__(self, "limit", _positive_int("limit", self.limit))
        object.__setattr__(self, "window", _finite_positive("window", self.window))
        if self.algorithm not in ALGORITHM_NAMES:
            raise ValueError(
                f"unknown algorithm {self.algorithm!r}; choose one of {', '.join(ALGORITHM_NAMES)}"
            )
        if self.burst is not None:
            object.__setattr__(self, "burst", _positive_int("burst", self.burst))
            if self.algorithm not in ("token_bucket", "gcra"):
                raise ValueError(
                    f"burst applies to token_bucket and gcra only, not {self.algorithm!r}"
                )
        if self.algorithm == "sliding_log" and self.limit > MAX_SLIDING_LOG_LIMIT:
            raise ValueError(
                f"sliding_log keeps one timestamp per token: limit {self.limit} is above its "
                f"maximum {MAX_SLIDING_LOG_LIMIT}; choose sliding_window or gcra for large limits"
            )

    @property
    def capacity(self) -> int:
        """Most tokens one request may cost under this policy."""
        return self.burst if self.burst is not None else self.limit

    def __str__(self) -> str:
        return f"{self.limit}/{_format_window(self.window)}"


def _format_window(window: float) -> str:
    for unit, seconds in (("day", 86400.0), ("hour", 3600.0), ("minute", 60.0), ("second", 1.0)):
        if window == seconds:
            return unit
        n = window / seconds
        if n >= 1 and n.is_integer():
            return f"{int(n)} {unit}s"
    return f"{window:g} seconds"


def parse_rate(text: str, *, algorithm: str = DEFAULT_ALGORITHM) -> Policy:
    """Parse one rate such as ``"10/second"``, ``"100/minute"``, ``"10 per 5 minutes"``."""
    if not isinstance(text, str):
        raise ValueError(f"rate must be a string, got {type(text).__name__}")
    m = _RATE.match(text)
    if m is None:
        raise ValueError(
            f"malformed rate {text!r}: expected '<limit>/<unit>' or '<limit> per <n> <unit>', "
            f"for example '100/minute' or '10 per 5 seconds'"
        )
    unit = m.group("unit").lower()
    seconds = _UNITS.get(unit)
    if seconds is None and unit.endswith("s") and len(unit) > 3:  # plural of a long name
        seconds = _UNITS.get(unit[:-1])
    if seconds is None:
        raise ValueError(
            f"malformed rate {text!r}: unknown unit {unit!r} (use ms, second, minute, hour or day)"
        )
    count = float(m.group("count")) if m.group("count") else 1.0
    if count <= 0:
        raise ValueError(f"malformed rate {text!r}: the window must be > 0")
    return Policy(limit=int(m.group("limit")), window=count * seconds, algorithm=algorithm)


def parse_rates(text: str, *, algorithm: str = DEFAULT_ALGORITHM) -> tuple[Policy, ...]:
    """Parse several rates joined by ``;`` (``"10/second; 1000/hour"``): all of them apply."""
    if not isinstance(text, str):
        raise ValueError(f"rates must be a string, got {type(text).__name__}")
    parts = [p for p in text.split(";") if p.strip()]
    if not parts:
        raise ValueError("no rate given: expected for example '100/minute' or '10/s; 1000/h'")
    return tuple(parse_rate(p, algorithm=algorithm) for p in parts)
