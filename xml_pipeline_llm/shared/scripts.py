"""The Lua scripts that keep the fleet's limits, cooldowns and rotation atomic in Redis.

Each runs on Redis server time (``TIME``), so the clocks of the processes do
not matter.  They are sent by EVALSHA, and by EVAL when Redis does not know
them yet (first use, or after a restart).
"""

from __future__ import annotations

import hashlib


class Script:
    """A Lua script, run by EVALSHA (loaded with EVAL when Redis does not know it yet)."""

    def __init__(self, src: str) -> None:
        self.src = src
        self.sha = hashlib.sha1(src.encode()).hexdigest()


_NOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function f(x) return string.format('%.17g', x) end
"""

# KEYS: bucket, slots.  ARGV: tokens, capacity (0: no bucket), refill per ms, max_concurrent,
# lease ms, lease id, waiter id, claim ms, when the waiter started waiting (server ms; '' on its
# first try).  Takes a slot and the tokens together or nothing.  A waiter whose tokens are not
# there claims them (amount, expiry) unless an older waiter holds the claim; others then only
# take tokens above the claimed amount, so the oldest waiter of the fleet is served first.
# Returns {ok, in flight, bucket level, ms until the tokens are there, server ms now}.
ENTER = Script(_NOW + """
local n = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local me = ARGV[7]
local since = tonumber(ARGV[9]) or now
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local count = redis.call('ZCARD', KEYS[2])
local slot_ok = count < tonumber(ARGV[4])
local tok_ok = true
local level = 0
local wait = 0
if cap > 0 then
  local h = redis.call('HMGET', KEYS[1], 'level', 'ts', 'cid', 'camt', 'cexp', 'csince')
  level = tonumber(h[1]) or cap
  local ts = tonumber(h[2]) or now
  if now > ts then level = math.min(cap, level + (now - ts) * rate) end
  local other = 0
  local mine = false
  if h[3] and (tonumber(h[5]) or 0) > now then
    if h[3] == me then
      mine = true
    elseif (tonumber(h[6]) or now) <= since then
      other = tonumber(h[4]) or 0
    end
  end
  if n > 0 and level - other < n then
    tok_ok = false
    wait = (n + other - level) / rate
  end
  if slot_ok and tok_ok then
    level = level - n
    if mine then redis.call('HDEL', KEYS[1], 'cid', 'camt', 'cexp', 'csince') end
  elseif mine or (not tok_ok and other == 0) then
    redis.call('HSET', KEYS[1], 'cid', me, 'camt', f(n), 'cexp', f(now + tonumber(ARGV[8])),
               'csince', f(since))
  end
  redis.call('HSET', KEYS[1], 'level', f(level), 'ts', f(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) / rate) + 60000)
end
if slot_ok and tok_ok then
  redis.call('ZADD', KEYS[2], now + lease, ARGV[6])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 2))
  return {1, count + 1, f(level), '0', f(now)}
end
return {0, count, f(level), f(wait), f(since)}
""")

# KEYS: bucket, slots.  ARGV: lease id ('' for none), tokens to give back (taken - used;
# negative charges the excess), capacity (0: no bucket), refill per ms.
# Returns {in flight, bucket level}.
LEAVE = Script(_NOW + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
local cap = tonumber(ARGV[3])
local level = 0
if cap > 0 then
  local rate = tonumber(ARGV[4])
  local h = redis.call('HMGET', KEYS[1], 'level', 'ts')
  level = tonumber(h[1]) or cap
  local ts = tonumber(h[2]) or now
  if now > ts then level = math.min(cap, level + (now - ts) * rate) end
  level = math.min(cap, level + tonumber(ARGV[2]))
  redis.call('HSET', KEYS[1], 'level', f(level), 'ts', f(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) / rate) + 60000)
end
return {redis.call('ZCARD', KEYS[2]), f(level)}
""")

# KEYS: slot sets.  ARGV: lease ms, 1 to re-add missing leases (else only extend), then one
# lease id per key.  Returns the positions (1-based) of the leases that were missing.
RENEW = Script(_NOW + """
local lease = tonumber(ARGV[1])
local missing = {}
for i, key in ipairs(KEYS) do
  if redis.call('ZSCORE', key, ARGV[i + 2]) then
    redis.call('ZADD', key, now + lease, ARGV[i + 2])
  else
    table.insert(missing, i)
    if ARGV[2] == '1' then redis.call('ZADD', key, now + lease, ARGV[i + 2]) end
  end
  redis.call('PEXPIRE', key, math.ceil(lease * 2))
end
return missing
""")

# KEYS: cooldown key.  ARGV: ms.  A longer cooldown already set wins.
COOL = Script("""
local ms = tonumber(ARGV[1])
if redis.call('PTTL', KEYS[1]) < ms then redis.call('SET', KEYS[1], '1', 'PX', ms) end
return 1
""")

# KEYS: rotation counter.  ARGV: ttl ms.  Returns 0, 1, 2, ...
ROTATE = Script("""
local v = redis.call('INCR', KEYS[1])
redis.call('PEXPIRE', KEYS[1], ARGV[1])
return v - 1
""")

# KEYS: the backend's start log (a sorted set of start ids scored by server ms).  ARGV: rate_limit_rpm,
# window ms, start id.  At most rate_limit_rpm starts in any window (a sliding-window log, the
# semantics of ``limits.StartWindow``).  Returns {ok, starts in the window, ms until one more may
# start (0 while there is room)}.
START = Script(_NOW + """
local limit = tonumber(ARGV[1])
local win = tonumber(ARGV[2])
redis.call('ZREMRANGEBYSCORE', KEYS[1], '-inf', now - win)
local count = redis.call('ZCARD', KEYS[1])
local ok = 0
if count < limit then
  redis.call('ZADD', KEYS[1], now, ARGV[3])
  redis.call('PEXPIRE', KEYS[1], math.ceil(win) + 1000)
  count = count + 1
  ok = 1
end
local wait = 0
if count >= limit then
  local oldest = redis.call('ZRANGE', KEYS[1], 0, 0, 'WITHSCORES')
  wait = math.max(0, tonumber(oldest[2]) + win - now)
end
return {ok, count, f(wait)}
""")
