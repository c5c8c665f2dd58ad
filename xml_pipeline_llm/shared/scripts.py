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

# KEYS: bucket, slots, start log, cooldown, the provider's quota (one backend's, one hash tag).
# ARGV: tokens, capacity (0: no bucket), refill per ms, max_concurrent, lease ms, lease id, waiter
# id, claim ms, when the waiter started waiting (server ms; '' on its first try), rate_limit_rpm
# (0: none), window ms, tokens to take from the provider's quota (what QUOTA set, until its reset).
# Admission in one step: a slot, the tokens and (with rate_limit_rpm) a start in the window are
# taken together or none is, so a start is logged when the call really starts (at most
# rate_limit_rpm in any window, the semantics of ``limits.StartWindow``).  A waiter whose tokens
# are not there claims them (amount, expiry) unless an older waiter holds the claim; others then
# only take tokens above the claimed amount, so the oldest waiter of the fleet is served first.
# Returns {ok, in flight, bucket level, ms until the tokens are there, server ms the waiter started,
# ms until the window has room for one more start (0: room), ms the backend still cools down,
# tokens taken from the provider's quota, the call's number (for QUOTA and LEAVE; 0: not admitted)}.
# An admitted call is counted as running in the quota hash ('p<number>': tokens and an expiry).
ENTER = Script(_NOW + """
local n = tonumber(ARGV[1])
local cap = tonumber(ARGV[2])
local rate = tonumber(ARGV[3])
local lease = tonumber(ARGV[5])
local me = ARGV[7]
local since = tonumber(ARGV[9]) or now
local rpm = tonumber(ARGV[10])
local win = tonumber(ARGV[11])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now)
local count = redis.call('ZCARD', KEYS[2])
local ok = count < tonumber(ARGV[4])
local starts = 0
if rpm > 0 then
  redis.call('ZREMRANGEBYSCORE', KEYS[3], '-inf', now - win)
  starts = redis.call('ZCARD', KEYS[3])
  ok = ok and starts < rpm
end
local qn = tonumber(ARGV[12]) or 0
local q = redis.call('HMGET', KEYS[5], 'tl', 'tu', 'rl', 'ru')
local qtu, qru = tonumber(q[2]) or 0, tonumber(q[4]) or 0
local qwait = 0
if qtu > now and (tonumber(q[1]) or 0) < qn then qwait = qtu - now end
if qru > now and (tonumber(q[3]) or 0) < 1 then qwait = math.max(qwait, qru - now) end
ok = ok and qwait == 0
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
  if ok and tok_ok then
    level = level - n
    if mine then redis.call('HDEL', KEYS[1], 'cid', 'camt', 'cexp', 'csince') end
  elseif mine or (not tok_ok and other == 0) then
    redis.call('HSET', KEYS[1], 'cid', me, 'camt', f(n), 'cexp', f(now + tonumber(ARGV[8])),
               'csince', f(since))
  end
  redis.call('HSET', KEYS[1], 'level', f(level), 'ts', f(now))
  redis.call('PEXPIRE', KEYS[1], math.ceil((cap - level) / rate) + 60000)
end
ok = ok and tok_ok
local qtake = 0
local seq = 0
if ok then
  seq = redis.call('HINCRBY', KEYS[5], 'sq', 1)
  redis.call('HSET', KEYS[5], 'p' .. seq, f(qn) .. ':' .. f(now + 600000))
  if redis.call('PTTL', KEYS[5]) < 600000 then redis.call('PEXPIRE', KEYS[5], 600000) end
  if qtu > now then
    redis.call('HINCRBYFLOAT', KEYS[5], 'tl', -qn)
    qtake = qn
  end
  if qru > now then redis.call('HINCRBYFLOAT', KEYS[5], 'rl', -1) end
  redis.call('ZADD', KEYS[2], now + lease, ARGV[6])
  redis.call('PEXPIRE', KEYS[2], math.ceil(lease * 2))
  count = count + 1
  if rpm > 0 then
    redis.call('ZADD', KEYS[3], now, ARGV[6])
    redis.call('PEXPIRE', KEYS[3], math.ceil(win) + 1000)
    starts = starts + 1
  end
  since = now
end
local full = 0
if rpm > 0 and starts >= rpm then
  local oldest = redis.call('ZRANGE', KEYS[3], 0, 0, 'WITHSCORES')
  full = math.max(0, tonumber(oldest[2]) + win - now)
end
local cool = math.max(0, redis.call('PTTL', KEYS[4]))
return {ok and 1 or 0, count, f(level), f(ok and 0 or math.max(wait, qwait)), f(since), f(full), cool,
        f(qtake), seq}
""")

# KEYS: bucket, slots, the provider's quota.  ARGV: lease id ('' for none), tokens to give back
# (taken - used; negative charges the excess), capacity (0: no bucket), refill per ms, tokens to
# give back to the provider's quota, the call's number (ENTER's; given back only if no lower
# reading has counted the call since, as the provider saw it).
# Returns {in flight, bucket level}.
LEAVE = Script(_NOW + """
if ARGV[1] ~= '' then redis.call('ZREM', KEYS[2], ARGV[1]) end
local qback = tonumber(ARGV[5]) or 0
local seq = tonumber(ARGV[6]) or 0
if KEYS[3] and seq > 0 then redis.call('HDEL', KEYS[3], 'p' .. seq) end
if qback ~= 0 and KEYS[3] then
  local q = redis.call('HMGET', KEYS[3], 'tl', 'tu', 'ct')
  if (tonumber(q[2]) or 0) > now and seq > (tonumber(q[3]) or 0) then
    redis.call('HSET', KEYS[3], 'tl', f(math.max(0, (tonumber(q[1]) or 0) + qback)))
  end
end
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

# KEYS: the provider's quota of one backend.  ARGV: tokens left ('' for no reading), ms until
# their reset, requests left ('' for none), ms until theirs, the number of the call whose answer
# said so.  The calls started after that one (still running) are not in the provider's figures:
# what they take is deducted.  A reading after the last reset sets what is left until the new
# reset; one before it can only lower it.  'ct': the calls up to this number are counted (LEAVE).
QUOTA = Script(_NOW + """
local seq = tonumber(ARGV[5]) or 0
local ptok, preq = 0, 0
local all = redis.call('HGETALL', KEYS[1])
for i = 1, #all, 2 do
  local k = all[i]
  if string.sub(k, 1, 1) == 'p' then
    local n = tonumber(string.sub(k, 2))
    local amt, exp = string.match(all[i + 1], '([^:]+):([^:]+)')
    if tonumber(exp) < now then
      redis.call('HDEL', KEYS[1], k)
    elseif n > seq then
      ptok = ptok + tonumber(amt)
      preq = preq + 1
    end
  end
end
local function apply(lf, uf, left, ms, pending, counts)
  if left == '' then return end
  left = math.max(0, tonumber(left) - pending)
  local untl = now + tonumber(ms)
  if untl <= now then return end
  local h = redis.call('HMGET', KEYS[1], lf, uf, 'ct')
  local cur, cu = tonumber(h[1]), tonumber(h[2]) or 0
  if cu <= now then
    redis.call('HSET', KEYS[1], lf, f(left), uf, f(untl))
    if counts then redis.call('HSET', KEYS[1], 'ct', seq) end
  elseif left < (cur or 0) then
    -- others took cur - left since the last reading: twice as much again is held back (limits.Cap)
    left = math.max(0, 3 * left - 2 * cur)
    redis.call('HSET', KEYS[1], lf, f(left), uf, f(math.max(cu, untl)))
    if counts then redis.call('HSET', KEYS[1], 'ct', math.max(seq, tonumber(h[3]) or 0)) end
  end
end
apply('tl', 'tu', ARGV[1], ARGV[2], ptok, true)
apply('rl', 'ru', ARGV[3], ARGV[4], preq, false)
local h = redis.call('HMGET', KEYS[1], 'tu', 'ru')
local last = math.max(tonumber(h[1]) or 0, tonumber(h[2]) or 0)
if last > now and redis.call('PTTL', KEYS[1]) < last - now + 1000 then
  redis.call('PEXPIRE', KEYS[1], math.ceil(last - now) + 1000)
end
return 1
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
