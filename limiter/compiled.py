"""The optional compiled request path: ``limiter/_requestpath.c``, built at install time.

``RateLimiter.allow_request`` is a compiled ``Decider`` when the extension is built, the limiter
has one policy whose cost-1 step the pure-Python closure writes out (the five local algorithms
and the lease) and no cold start waits; otherwise it is the closure itself. Both decide alike:
the Decider runs the closure's steps with the same float arithmetic and calls back into Python
for the rest (inserts, ``consume()``), and ``tests/limiter/test_request_path.py`` holds both to
``consume()``. A build without a C compiler installs without the extension (pure Python).

Set ``DRL_PURE_PYTHON=1`` in the environment to use the closure even when the extension is
built (read when a limiter is constructed).
"""

from __future__ import annotations

import os
from collections.abc import Callable
from types import ModuleType

from .request import Request

#: The environment variable that turns the compiled path off (any value but "" and "0").
PURE_PYTHON_ENV = "DRL_PURE_PYTHON"

try:
    from . import _requestpath

    _module: ModuleType | None = _requestpath
except ImportError:  # built without a C compiler
    _module = None


def built() -> bool:
    """True when the extension is importable."""
    return _module is not None


def enabled() -> bool:
    """True when limiters constructed now use the compiled path (built, not turned off)."""
    return _module is not None and os.environ.get(PURE_PYTHON_ENV, "") in ("", "0")


def decider(**fields: object) -> Callable[[str, Request], bool] | None:
    """A compiled ``allow_request`` (``_requestpath.Decider(**fields)``), or None when the
    compiled path is off."""
    if not enabled():
        return None
    assert _module is not None
    return _module.Decider(**fields)  # type: ignore[no-any-return]
