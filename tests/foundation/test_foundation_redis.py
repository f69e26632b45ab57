"""Redis basics the project relies on: SET/GET and Lua through SCRIPT LOAD + EVALSHA."""

from __future__ import annotations

import pytest
import redis

pytestmark = pytest.mark.integration

# Atomic "take up to N tokens" shape, like the strict-mode scripts.
TAKE_LUA = """
local have = tonumber(redis.call('GET', KEYS[1]) or ARGV[2])
local want = tonumber(ARGV[1])
if have >= want then
  redis.call('SET', KEYS[1], have - want)
  return {1, have - want}
end
return {0, have}
"""


def test_set_get(redis_client: redis.Redis, redis_prefix: str) -> None:
    key = redis_prefix + "greeting"
    assert redis_client.set(key, b"hello")
    assert redis_client.get(key) == b"hello"


def test_lua_script_load_evalsha(redis_client: redis.Redis, redis_prefix: str) -> None:
    key = redis_prefix + "bucket"
    sha = redis_client.script_load(TAKE_LUA)
    assert redis_client.script_exists(sha) == [True]
    assert redis_client.evalsha(sha, 1, key, 3, 5) == [1, 2]
    assert redis_client.evalsha(sha, 1, key, 2, 5) == [1, 0]
    assert redis_client.evalsha(sha, 1, key, 1, 5) == [0, 0]
