"""The circuit breakers of a fleet, in Redis (``circuit.py`` says what a breaker does).

One hash per backend (state, when it stays open, the probe's lease) and logs of
its tries and of its failed tries (ZSETs scored by time, counted with ZCARD, so a
try costs the same however many the window holds), all under the backend's hash
tag; the scripts run on Redis time, so one probe is let through for the whole fleet.
"""

from __future__ import annotations

import logging
import time
import uuid
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from ..circuit import CLOSED, HALF_OPEN, OPEN, PROBE_POLL, SERVER_SIDE, CircuitSettings, MemoryBreakers
from .connection import RedisDown
from .scripts import Script

if TYPE_CHECKING:
    from .state import RedisState

log = logging.getLogger("xml_pipeline_llm")

# KEYS: the breaker's hash, its log of tries, its log of failed tries (ZSETs).  ARGV: what happened (0 ok, 1 server-side
# failure), a unique member id, window ms, min_calls, failure_rate %, open_for ms.
# Returns {state (0 closed, 1 open, 2 half open), the change (0 none, 1 opened, 2 closed, 3 reopened),
# failures, tries}.
_RECORD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local failed = ARGV[1] == '1'
local win, minc, rate, openms = tonumber(ARGV[3]), tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local h = redis.call('HMGET', KEYS[1], 'st', 'until', 'probe')
local st = tonumber(h[1]) or 0
local untl = tonumber(h[2]) or 0
local probe = tonumber(h[3]) or 0
if st == 1 and now >= untl then st = 2; probe = 0 end
local ttl = math.ceil(win + openms) + 60000
if st == 2 and probe > 0 then
  if failed then
    redis.call('HSET', KEYS[1], 'st', 1, 'until', string.format('%.17g', now + openms), 'probe', 0)
    redis.call('PEXPIRE', KEYS[1], ttl)
    return {1, 3, 0, 0}
  end
  redis.call('HSET', KEYS[1], 'st', 0, 'probe', 0)
  redis.call('DEL', KEYS[2], KEYS[3])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {0, 2, 0, 0}
end
if st ~= 0 then return {st, 0, 0, 0} end
redis.call('ZADD', KEYS[2], now, ARGV[2])
if failed then redis.call('ZADD', KEYS[3], now, ARGV[2]) end
for i = 2, 3 do
  redis.call('ZREMRANGEBYSCORE', KEYS[i], '-inf', now - win)
  redis.call('PEXPIRE', KEYS[i], math.ceil(win) + 1000)
end
local n = redis.call('ZCARD', KEYS[2])
local bad = redis.call('ZCARD', KEYS[3])
if n >= minc and bad * 100 >= rate * n then
  redis.call('HSET', KEYS[1], 'st', 1, 'until', string.format('%.17g', now + openms), 'probe', 0)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('DEL', KEYS[2], KEYS[3])
  return {1, 1, bad, n}
end
return {0, 0, bad, n}
"""

# KEYS: the breaker's hash.  ARGV: 1 to take the probe if it is free, probe ttl ms.
# Returns {allowed (0/1), state (0/1/2), ms it stays out (open: until the end; probe out: its ttl left)}.
_ADMIT = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local h = redis.call('HMGET', KEYS[1], 'st', 'until', 'probe')
local st = tonumber(h[1]) or 0
local untl = tonumber(h[2]) or 0
local probe = tonumber(h[3]) or 0
if st == 0 then return {1, 0, 0} end
if st == 1 and now < untl then return {0, 1, string.format('%.17g', untl - now)} end
if st == 1 then
  st = 2; probe = 0
  redis.call('HSET', KEYS[1], 'st', 2, 'probe', 0)
end
if probe > now then return {0, 2, string.format('%.17g', probe - now)} end
if ARGV[1] == '1' then
  redis.call('HSET', KEYS[1], 'probe', string.format('%.17g', now + tonumber(ARGV[2])))
  return {1, 2, 0}
end
return {1, 2, 0}
"""

_STATES = (CLOSED, OPEN, HALF_OPEN)
READ_EVERY = 0.05      # how stale a fleet breaker's state may be when nothing happened here


class RedisBreakers:
    """The breakers shared by every process on the same Redis (``shared_state``)."""

    def __init__(self, conf: Mapping[str, CircuitSettings], state: RedisState,
                 probe_ttl: Mapping[str, float] | None = None) -> None:
        self.conf = {name: s for name, s in conf.items() if s.enabled}
        self.rs = state
        self.probe_ttl = dict(probe_ttl or {})
        self._record, self._admit = Script(_RECORD), Script(_ADMIT)
        self._seen: dict[str, tuple[float, str, float]] = {}      # backend: (monotonic, state, seconds out)
        self._local = MemoryBreakers(conf, probe_ttl)              # while Redis is away
        self._id = uuid.uuid4().hex[:10]
        self._n = 0

    def _keys(self, backend: str) -> list[str]:
        return [self.rs.key("circuit", backend), self.rs.key("circuit-log", backend),
                self.rs.key("circuit-bad", backend)]

    def _note(self, backend: str, code: int, ms: float) -> None:
        self._seen[backend] = (time.monotonic(), _STATES[code], ms / 1000.0)

    async def blocked(self, backends: Iterable[str]) -> dict[str, float]:
        out: dict[str, float] = {}
        now = time.monotonic()
        for name in backends:
            if name not in self.conf:
                continue
            seen = self._seen.get(name)
            if seen is None or now - seen[0] > READ_EVERY:
                try:
                    res = await self.rs.conn.eval(self._admit, self._keys(name)[:1], [0, 0])
                except RedisDown:
                    out.update(await self._local.blocked([name]))
                    continue
                self._note(name, int(res[1]), float(res[2]))
                seen = self._seen[name]
            when, st, left = seen
            left -= time.monotonic() - when
            if st == OPEN and left > 0:
                out[name] = left
            elif st == HALF_OPEN and left > 0:
                out[name] = min(PROBE_POLL, left)
        return out

    async def admit(self, backend: str) -> bool:
        if backend not in self.conf:
            return True
        seen = self._seen.get(backend)
        if seen is not None and seen[1] == CLOSED and time.monotonic() - seen[0] <= READ_EVERY:
            return True
        ttl = int(self.probe_ttl.get(backend, 60.0) * 1000)
        try:
            res = await self.rs.conn.eval(self._admit, self._keys(backend)[:1], [1, ttl])
        except RedisDown:
            return await self._local.admit(backend)
        self._note(backend, int(res[1]), float(res[2]))
        return int(res[0]) == 1

    def record(self, backend: str, kind: str | None) -> None:
        s = self.conf.get(backend)
        if s is None:
            return
        failed = kind in SERVER_SIDE
        self._n += 1
        args = [1 if failed else 0, f"{self._id}{self._n}", int(s.window * 1000), s.min_calls,
                repr(s.failure_rate), int(s.open_for * 1000)]

        def then(res: Any) -> None:
            code, change = int(res[0]), int(res[1])
            self._note(backend, code, s.open_for * 1000 if code == 1 else 0.0)
            if change == 1:
                log.warning("circuit of %s opens: %s of the last %s tries in %gs failed on the server's side "
                            "(the fleet's); no calls for %gs", backend, res[2], res[3], s.window, s.open_for)
            elif change == 2:
                log.warning("circuit of %s closes: the probe succeeded", backend)
            elif change == 3:
                log.warning("circuit of %s opens again: the probe failed (%s); no calls for %gs",
                            backend, kind, s.open_for)

        def lost() -> None:
            self._local.record(backend, kind)

        try:
            self.rs.conn.eval_soon(self._record, self._keys(backend), args, then, lost)
        except RuntimeError:
            lost()

    def state(self, backend: str) -> str:
        if backend not in self.conf:
            return CLOSED
        seen = self._seen.get(backend)
        if seen is None:
            return self._local.state(backend)
        when, st, left = seen
        if st == OPEN and left - (time.monotonic() - when) <= 0:
            return HALF_OPEN
        return st
