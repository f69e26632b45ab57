"""The two request paths: ``allow_request`` compiled (limiter/_requestpath.c) or the pure-Python
closure, chosen when a limiter is constructed (``DRL_PURE_PYTHON``, limiter/compiled.py)."""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator

import pytest

from limiter import RateLimiter, compiled

PATHS = ("compiled", "python")


@contextlib.contextmanager
def request_path(path: str) -> Iterator[None]:
    """Limiters constructed inside use ``path`` (the compiled one must be built)."""
    if path == "compiled" and not compiled.built():
        pytest.fail("the compiled request path is not built (make test builds it)")
    old = os.environ.get(compiled.PURE_PYTHON_ENV)
    os.environ[compiled.PURE_PYTHON_ENV] = "1" if path == "python" else "0"
    try:
        yield
    finally:
        if old is None:
            del os.environ[compiled.PURE_PYTHON_ENV]
        else:
            os.environ[compiled.PURE_PYTHON_ENV] = old


def uses(limiter: RateLimiter, path: str) -> bool:
    """True when ``limiter.allow_request`` is ``path``'s."""
    is_compiled = type(limiter.allow_request).__name__ == "Decider"
    return is_compiled == (path == "compiled")
