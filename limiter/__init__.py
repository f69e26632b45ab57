"""The embedded limiter: local rate-limit decisions in microseconds.

>>> from limiter import RateLimiter, Request
>>> limiter = RateLimiter(100, 60)          # 100 requests per client per minute, exact
>>> limiter.allow_request("alice", Request())
True
"""

from .algorithms import ALGORITHMS
from .clientid import MAX_CLIENT_ID_LENGTH
from .config import (
    ConfigurationService,
    RateLimitConfiguration,
    StaticConfigurationService,
)
from .config_redis import RedisConfigurationService
from .configured import ConfiguredLimiter
from .decision import Decision, Reason
from .errors import AcquireTimeout, RateLimitExceeded
from .rate import DEFAULT_ALGORITHM, Policy, parse_rate, parse_rates
from .ratelimiter import (
    DEFAULT_MAX_CLIENTS,
    DEFAULT_MAX_CLOCK_SKEW,
    DEFAULT_MAX_REQUEST_AGE,
    RateLimiter,
)
from .request import Request
from .strict import StrictLimiter

__all__ = [
    "ALGORITHMS",
    "DEFAULT_ALGORITHM",
    "DEFAULT_MAX_CLIENTS",
    "DEFAULT_MAX_CLOCK_SKEW",
    "DEFAULT_MAX_REQUEST_AGE",
    "MAX_CLIENT_ID_LENGTH",
    "AcquireTimeout",
    "ConfigurationService",
    "ConfiguredLimiter",
    "Decision",
    "Policy",
    "RateLimitConfiguration",
    "RateLimitExceeded",
    "RateLimiter",
    "Reason",
    "RedisConfigurationService",
    "Request",
    "StaticConfigurationService",
    "StrictLimiter",
    "parse_rate",
    "parse_rates",
]
