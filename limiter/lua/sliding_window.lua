-- Strict mode, exact sliding window: every policy of one client decided together, all or
-- nothing, on the Redis server's clock. Shipped as package data of limiter (limiter/strict.py
-- loads it with SCRIPT LOAD and runs it with EVALSHA).
--
-- KEYS[i]   a sorted set per policy: one member per admitted token, scored with its admission
--           time in whole microseconds since the epoch on the Redis clock; it expires (PEXPIRE)
--           one window after the newest admission, so idle clients leave nothing behind
-- ARGV[1]   '1': consume when every policy allows; '0': peek (writes nothing)
-- ARGV[2]   cost in tokens (the caller has checked 1 <= cost <= every limit)
-- ARGV[3]   a nonce unique to this call: members are '<nonce>:<j>', j = 1..cost, so two
--           admissions never collide even within one microsecond
-- ARGV[2+2i], ARGV[3+2i]
--           window W (whole microseconds) and limit L (tokens) of policy i
--
-- The window ending now is (now - W, now]. A request of cost c is admitted when, for every
-- policy, the tokens admitted in that window plus c are at most L: so any interval of length W
-- holds at most L admitted tokens, exactly. Returns {allowed (1|0), now (us), then per policy:
-- remaining (tokens), reset_after (us), retry_after (us)}; integers only.

if redis.replicate_commands then
  -- Redis 3.2 - 4: replicate the effects, not the script (TIME is not deterministic).
  -- A no-op on Redis 5 and later.
  redis.replicate_commands()
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local consume = ARGV[1] == '1'
local cost = tonumber(ARGV[2])
local nonce = ARGV[3]
local n = #KEYS

local counts = {}
local allowed = 1
for i = 1, n do
  local window = tonumber(ARGV[2 + 2 * i])
  local limit = tonumber(ARGV[3 + 2 * i])
  local start = string.format('%.0f', now - window)
  local count
  if consume then
    -- Forget what has left the window (scores <= now - W): it can never count again.
    redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', start)
    count = redis.call('ZCARD', KEYS[i])
  else
    count = redis.call('ZCOUNT', KEYS[i], '(' .. start, '+inf')
  end
  counts[i] = count
  if count + cost > limit then
    allowed = 0
  end
end

local score = string.format('%.0f', now)
local out = {allowed, now}
for i = 1, n do
  local key = KEYS[i]
  local window = tonumber(ARGV[2 + 2 * i])
  local limit = tonumber(ARGV[3 + 2 * i])
  local count = counts[i]
  if allowed == 1 and consume then
    local args = {}
    for j = 1, cost do
      args[#args + 1] = score
      args[#args + 1] = nonce .. ':' .. j
      if #args >= 1000 or j == cost then
        redis.call('ZADD', key, unpack(args))
        args = {}
      end
    end
    redis.call('PEXPIRE', key, math.ceil(window / 1000) + 1)
    count = count + cost
  end
  local remaining = limit - count
  if remaining < 0 then
    remaining = 0
  end
  local reset = 0
  if count > 0 then
    local newest = redis.call('ZRANGE', key, -1, -1, 'WITHSCORES')
    reset = tonumber(newest[2]) + window - now
    if reset < 0 then
      reset = 0
    end
  end
  local retry = 0
  if allowed == 0 and count + cost > limit then
    -- The request fits once the (count + cost - L)-th oldest token in the window has left it.
    local start = '(' .. string.format('%.0f', now - window)
    local oldest = redis.call('ZRANGEBYSCORE', key, start, '+inf', 'WITHSCORES', 'LIMIT',
      count + cost - limit - 1, 1)
    retry = tonumber(oldest[2]) + window - now
    if retry < 0 then
      retry = 0
    end
  end
  out[#out + 1] = remaining
  out[#out + 1] = reset
  out[#out + 1] = retry
end
return out
