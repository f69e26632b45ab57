"""Exceptions of the limiter."""

from __future__ import annotations

from .decision import Decision


class RateLimitExceeded(Exception):
    """``acquire`` could not be granted; nothing was consumed. ``decision`` says why."""

    def __init__(self, client_id: str, decision: Decision, message: str) -> None:
        super().__init__(message)
        self.client_id = client_id
        self.decision = decision


class AcquireTimeout(RateLimitExceeded, TimeoutError):
    """``acquire`` would have had to wait longer than its ``timeout``; nothing was consumed."""
