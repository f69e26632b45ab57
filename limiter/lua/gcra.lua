-- Strict mode, GCRA: every policy of one client decided together, all or nothing, on the
-- Redis server's clock. Shipped as package data of limiter (limiter/strict.py loads it with
-- SCRIPT LOAD and runs it with EVALSHA).
--
-- KEYS[i]   the theoretical arrival time (TAT) of policy i: a string, whole microseconds since
--           the epoch on the Redis clock; it expires (PX) when the TAT passes, i.e. when the
--           client is back to full allowance, so idle clients leave nothing behind
-- ARGV[1]   '1': consume when every policy allows; '0': peek (writes nothing)
-- ARGV[2]   cost in tokens (the caller has checked 1 <= cost <= every burst)
-- ARGV[3]   unused here (the sliding-window script's nonce: both scripts take the same ARGV)
-- ARGV[2+2i], ARGV[3+2i]
--           emission interval T and tolerance tau = burst * T of policy i, whole microseconds
--
-- A request of cost c conforms to policy i when max(TAT, now) + c*T - now <= tau; it is admitted
-- only when it conforms to every policy, and then every TAT becomes max(TAT, now) + c*T.
-- Returns {allowed (1|0), now (us), then per policy: remaining (tokens), reset_after (us),
-- retry_after (us)}; integers only (Redis truncates Lua numbers in replies).

if redis.replicate_commands then
  -- Redis 3.2 - 4: replicate the effects, not the script (TIME is not deterministic).
  -- A no-op on Redis 5 and later.
  redis.replicate_commands()
end

local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000000 + tonumber(t[2])
local consume = ARGV[1] == '1'
local cost = tonumber(ARGV[2])
local n = #KEYS

local tats = {}
local allowed = 1
for i = 1, n do
  local interval = tonumber(ARGV[2 + 2 * i])
  local tolerance = tonumber(ARGV[3 + 2 * i])
  local tat = tonumber(redis.call('GET', KEYS[i]) or 0) or 0
  if tat < now then
    tat = now
  end
  tats[i] = tat
  if tat + cost * interval - now > tolerance then
    allowed = 0
  end
end

local out = {allowed, now}
for i = 1, n do
  local interval = tonumber(ARGV[2 + 2 * i])
  local tolerance = tonumber(ARGV[3 + 2 * i])
  local tat = tats[i]
  local new_tat = tat + cost * interval
  local retry = 0
  if allowed == 1 then
    if consume then
      redis.call('SET', KEYS[i], string.format('%.0f', new_tat), 'PX', math.ceil((new_tat - now) / 1000))
      tat = new_tat
    end
  elseif new_tat - now > tolerance then
    retry = new_tat - tolerance - now
  end
  local backlog = tat - now
  local remaining = math.floor((tolerance - backlog) / interval)
  if remaining < 0 then
    remaining = 0
  end
  out[#out + 1] = remaining
  out[#out + 1] = backlog
  out[#out + 1] = retry
end
return out
