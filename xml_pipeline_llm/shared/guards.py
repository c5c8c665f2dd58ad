"""The Lua scripts of the guards (``guards.py``) with ``shared_state``: exact across every process.

A thread's keys share one hash tag (``{<p>:g:<thread>}``) and the kill switch's
keys another (``{<p>:guards}``), so no script crosses Redis Cluster slots.
"""

from __future__ import annotations

from .scripts import Script

# KEYS: the thread's call count, its loop log (zset: member <digest><id>, score server ms), its counts per
# digest (hash).  ARGV: max calls (-1: none), repeat limit (-1: none), window ms, digest, id, idle ttl ms.
# A refused request counts towards nothing.  Returns {0, calls, same requests in the window} (admitted),
# {1, same requests in the window with this one} (a loop) or {2, calls} (the call cap).
GUARD = Script("""
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + math.floor(tonumber(t[2]) / 1000)
local maxc, lim, win = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local h, id, ttl = ARGV[4], ARGV[5], tonumber(ARGV[6])
local n = 0
if maxc >= 0 then
  n = tonumber(redis.call('GET', KEYS[1]) or '0')
  if n >= maxc then return {2, n} end
end
local c = 0
if lim >= 0 then
  local old = redis.call('ZRANGEBYSCORE', KEYS[2], '-inf', now - win)
  for _, m in ipairs(old) do
    local d = string.sub(m, 1, 64)
    if redis.call('HINCRBY', KEYS[3], d, -1) <= 0 then redis.call('HDEL', KEYS[3], d) end
  end
  if #old > 0 then redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - win) end
  c = tonumber(redis.call('HGET', KEYS[3], h) or '0')
  if c >= lim then return {1, c + 1} end
  redis.call('ZADD', KEYS[2], now, h .. id)
  redis.call('HINCRBY', KEYS[3], h, 1)
  redis.call('PEXPIRE', KEYS[2], win)
  redis.call('PEXPIRE', KEYS[3], win)
end
if maxc >= 0 then
  redis.call('INCR', KEYS[1])
  redis.call('PEXPIRE', KEYS[1], ttl)
end
return {0, n + 1, c + 1}
""")

# KEYS: as GUARD.  ARGV: digest ('' for none), member, 1 to take back the call count.  Takes back one
# admission (a request refused by the kill switch after it was counted, or cancelled).
UNDO = Script("""
if ARGV[1] ~= '' and redis.call('ZREM', KEYS[2], ARGV[2]) == 1 then
  if redis.call('HINCRBY', KEYS[3], ARGV[1], -1) <= 0 then redis.call('HDEL', KEYS[3], ARGV[1]) end
end
if ARGV[3] == '1' and tonumber(redis.call('GET', KEYS[1]) or '0') > 0 then redis.call('DECR', KEYS[1]) end
return 1
""")

# KEYS: blocks (hash target -> block JSON), version.  ARGV: the version known ('' for none).
# Returns {version} when it is the one known, else {version, target, block, target, block, ...}.
READ = Script("""
local v = redis.call('GET', KEYS[2]) or '0'
if v == ARGV[1] then return {v} end
local out = {v}
for _, x in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = x end
return out
""")

# KEYS: as READ.  ARGV: add|remove, target, block JSON.  Returns {changed, version, target, block, ...}.
SET = Script("""
local changed = 0
if ARGV[1] == 'add' then
  redis.call('HSET', KEYS[1], ARGV[2], ARGV[3])
  changed = 1
else
  changed = redis.call('HDEL', KEYS[1], ARGV[2])
end
local v = redis.call('GET', KEYS[2]) or '0'
if changed == 1 then v = tostring(redis.call('INCR', KEYS[2])) end
local out = {changed, v}
for _, x in ipairs(redis.call('HGETALL', KEYS[1])) do out[#out + 1] = x end
return out
""")
