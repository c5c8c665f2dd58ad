"""The Lua scripts of the guards (``guards.py``) with ``shared_state``: exact across every process.

A thread's keys share one hash tag (``{<p>:g:<thread>}``) and the kill switch's
keys another (``{<p>:guards}``), so no script crosses Redis Cluster slots.
"""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Awaitable
from typing import TYPE_CHECKING, Any

from ..shared.connection import Conn, RedisDown
from ..shared.scripts import Script
from ..shared.worker import Job
from .blocks import REFRESH_EVERY, Block, BlockList
from .counter import THREAD_IDLE_TTL, Counter, Verdict

if TYPE_CHECKING:
    from ..config.guards import GuardsConfig

log = logging.getLogger("xml_pipeline_llm")

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


class FleetCounter:
    """Call counts and loop windows per thread in Redis: one script per request, exact across processes.

    Keys of a thread (one hash tag, so the script never crosses cluster slots):
    ``<p>:{<p>:g:<thread>}:calls`` (its call count; forgotten a week after its last
    call), ``...:log`` (a sorted set of the requests within the window: member
    ``<digest><id>``, scored by Redis server time) and ``...:seen`` (a hash: digest ->
    how many of them are in the window).
    """

    def __init__(self, conn: Conn, prefix: str, cfg: GuardsConfig) -> None:
        self.conn = conn
        self.prefix = prefix
        self.max_calls = -1 if cfg.max_calls_per_thread is None else cfg.max_calls_per_thread
        self.limit = -1 if cfg.repeat_limit is None else cfg.repeat_limit
        self.window_ms = int(cfg.window_seconds * 1000)

    def keys(self, thread: str) -> list[str]:
        base = f"{self.prefix}:{{{self.prefix}:g:{thread}}}"
        return [f"{base}:calls", f"{base}:log", f"{base}:seen"]

    def check(self, thread: str, digest: str, local: Counter) -> asyncio.Future[Verdict]:
        """Issue the check now (it goes to Redis with this loop's next batch: the admission's)."""
        return asyncio.ensure_future(self._check(thread, digest, local))

    async def _check(self, thread: str, digest: str, local: Counter) -> Verdict:
        member = uuid.uuid4().hex[:16]
        keys = self.keys(thread)
        args = [self.max_calls, self.limit if digest else -1, self.window_ms, digest, member,
                THREAD_IDLE_TTL * 1000]

        def undo(res: Any) -> None:            # cancelled, and it went through all the same: take it back
            if int(res[0]) == 0:
                self.undo(thread, Verdict("", 0, digest + member))

        try:
            res = await self.conn.eval(GUARD, keys, args, undo)
        except RedisDown:
            return local.check(thread, digest)
        kind = {0: "", 1: "loop", 2: "call_limit"}[int(res[0])]
        return Verdict(kind, int(res[1]), digest + member if not kind else "")

    def undo(self, thread: str, verdict: Verdict) -> None:
        token = verdict.token
        args = [token[:64], token, 1 if self.max_calls >= 0 else 0]
        self.conn.worker.submit(_job(UNDO, self.keys(thread), args))

    def forget(self, thread: str) -> None:
        try:
            self.conn.sync_call(lambda c: c.delete(*self.keys(thread)))
        except RedisDown:
            log.warning("guards: Redis does not answer; thread %r's call count and loop window stay there", thread)


def _job(script: Script, keys: list[str], args: list[Any]) -> Job:
    return Job(script, keys, args, "release", time.monotonic() + 60.0)


class RedisBlocks(BlockList):
    """Blocks in Redis: a hash (``<p>:{<p>:guards}:blocks``, target -> block) and a version counter
    (``...:version``) bumped at each change.  A process re-reads the version at most every half second,
    in a script riding along a request's admission, and the blocks only when it changed."""

    def __init__(self, conn: Conn, prefix: str) -> None:
        super().__init__()
        self.conn = conn
        base = f"{prefix}:{{{prefix}:guards}}"
        self.keys = [f"{base}:blocks", f"{base}:version"]
        self.version = ""
        self._fresh_until = 0.0
        self._reading: asyncio.Future[None] | None = None
        self._loop: asyncio.AbstractEventLoop | None = None

    def refresh(self) -> Awaitable[None] | None:
        reading = self._reading
        if reading is not None and not reading.done() and self._loop is asyncio.get_running_loop():
            return reading
        if time.monotonic() < self._fresh_until:
            return None
        self._loop = asyncio.get_running_loop()
        self._reading = asyncio.ensure_future(self._read())
        return self._reading

    async def _read(self) -> None:
        try:
            res = await self.conn.eval(READ, self.keys, [self.version])
        except RedisDown:
            self._fresh_until = time.monotonic() + REFRESH_EVERY
            return
        self._apply(res)

    def _apply(self, res: list[Any]) -> None:
        self._fresh_until = time.monotonic() + REFRESH_EVERY
        version = str(res[0])
        if version == self.version and len(res) == 1:
            return
        pairs = res[1:]
        self.entries = {str(pairs[i]): Block.from_json(str(pairs[i + 1])) for i in range(0, len(pairs) - 1, 2)}
        self.version = version

    async def add(self, block: Block) -> None:
        self._apply((await self.conn.eval(SET, self.keys, ["add", block.target, block.to_json()]))[1:])

    async def remove(self, target: str) -> bool:
        res = await self.conn.eval(SET, self.keys, ["remove", target, ""])
        self._apply(res[1:])
        return int(res[0]) == 1

    async def list(self) -> list[Block]:
        self._apply(await self.conn.eval(READ, self.keys, [""]))
        return await super().list()
