"""What a rate-limit decision says: :class:`Decision` and its :class:`Reason`."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Reason(enum.StrEnum):
    """Why a request was admitted or refused; compares equal to its string value."""

    OK = "ok"
    #: The client has used its allowance for now.
    LIMITED = "limited"
    #: The request's timestamp is older than ``max_request_age`` (a replay, or a long queue).
    STALE = "stale"
    #: The request's timestamp is later than now + ``max_clock_skew``.
    FUTURE = "future"
    #: The request costs more than any window ever allows: it can never be admitted.
    COST_EXCEEDS_LIMIT = "cost_exceeds_limit"
    #: ``max_clients`` reached and no idle client could be forgotten.
    CAPACITY = "capacity"
    #: The store that decides (strict mode's Redis) did not answer and the policy fails closed:
    #: an HTTP layer answers 503, not 429.
    UNAVAILABLE = "unavailable"


@dataclass(frozen=True, slots=True)
class Decision:
    """The outcome of one check; truthy when allowed.

    ``limit`` and ``remaining`` are in tokens and describe the most restrictive policy;
    ``reset_after`` is seconds until that policy is back to full allowance; ``retry_after`` is
    seconds until the same request could pass (0 when allowed, ``inf`` when it never can).
    """

    allowed: bool
    limit: int
    remaining: int
    reset_after: float
    retry_after: float
    reason: Reason

    def __bool__(self) -> bool:
        return self.allowed
