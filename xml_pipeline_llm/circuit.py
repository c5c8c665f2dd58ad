"""A circuit breaker per backend: stop calling a backend that fails, then probe it.

Settings (``llm.circuit``, and ``circuit:`` on a backend for its own)::

    circuit: {failure_rate: 50, min_calls: 10, window: 30s, open_for: 30s}

When at least ``min_calls`` tries ended within the last ``window`` and at least
``failure_rate`` percent of them failed on the server's side (5xx, timeout,
unreachable, connection, a bad response; never a 4xx or a 429), the backend
opens: no call goes to it for ``open_for``.  Then it is half open: exactly one
call (the probe) is let through, while the others still see it open; the
probe's success closes it, its failure opens it again.  Every try that reached
the backend counts in ``min_calls`` and in the rate's denominator.
``circuit: false`` (or ``enabled: false``) turns it off.

The request loop sees an open backend as one cooling down (``Breakers.blocked``)
and asks ``admit`` before a try; ``record`` hears how every try ended.
``MemoryBreakers`` keeps this per process; ``RedisBreakers`` shares it through
the router's Redis state (``shared_state``), atomically (Lua, Redis time).
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections import deque
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Protocol

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

if TYPE_CHECKING:
    from .config import RouterConfig
    from .shared.state import RedisState

log = logging.getLogger("xml_pipeline_llm")

#: the error kinds (``retry.KINDS``) that count as the backend's own failure
SERVER_SIDE = frozenset({"server_error", "timeout", "unreachable", "connection", "bad_response"})
CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"
PROBE_POLL = 0.25       # seconds a request waiting on a probe looks again


def seconds(value: Any) -> Any:
    """A duration as seconds: a number, or a string such as ``30s``, ``2m``, ``1m30s``, ``500ms``."""
    from .pacing import parse_duration

    if isinstance(value, bool):
        return value            # refused by the float check, with the usual message
    if isinstance(value, str):
        parsed = parse_duration(value)
        if parsed is None:
            raise ValueError(f"not a duration: {value!r}")
        return parsed
    return value


Duration = Annotated[float, BeforeValidator(seconds), Field(gt=0)]


class CircuitConfig(BaseModel):
    """``llm.circuit`` or a backend's ``circuit:`` (a backend's keys override the ``llm`` ones)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    enabled: bool = True
    failure_rate: float = Field(default=50.0, gt=0, le=100)
    min_calls: int = Field(default=10, gt=0)
    window: Duration = 30.0
    open_for: Duration = 30.0


def circuit_block(value: Any) -> Any:
    """``circuit: false`` is ``{enabled: false}``, ``circuit: true`` the defaults."""
    return {"enabled": value} if isinstance(value, bool) else value


EXPECTED = {
    "circuit": "a mapping with failure_rate, min_calls, window, open_for (or false to turn it off)",
    "circuit.enabled": "true or false",
    "circuit.failure_rate": "a percentage above 0 and at most 100, such as 50",
    "circuit.min_calls": "a positive integer (tries in the window before the rate counts)",
    "circuit.window": "a positive duration: seconds, or a string such as 30s or 2m",
    "circuit.open_for": "a positive duration: seconds, or a string such as 30s or 2m",
}


@dataclass(frozen=True)
class CircuitSettings:
    enabled: bool = True
    failure_rate: float = 50.0
    min_calls: int = 10
    window: float = 30.0
    open_for: float = 30.0

    def describe(self) -> str:
        if not self.enabled:
            return "circuit off"
        return (f"circuit opens at {self.failure_rate:g}% server errors of >= {self.min_calls} tries in "
                f"{self.window:g}s, for {self.open_for:g}s")


def settings(config: RouterConfig) -> dict[str, CircuitSettings]:
    """Each backend's circuit settings: ``llm.circuit`` with its own ``circuit:`` keys over them."""
    raw = config.raw
    top = getattr(raw, "circuit", None) or CircuitConfig()
    out: dict[str, CircuitSettings] = {}
    for b in config.backends:
        merged = top.model_dump()
        own = getattr(raw.backends[b.index], "circuit", None) if b.index < len(raw.backends) else None
        if own is not None:
            merged.update({k: getattr(own, k) for k in own.model_fields_set})
        out[b.name] = CircuitSettings(**merged)
    return out


class Breakers(Protocol):
    """The breakers of a router's backends (in memory or in Redis)."""

    async def blocked(self, backends: Iterable[str]) -> dict[str, float]: ...
    async def admit(self, backend: str) -> bool: ...
    def record(self, backend: str, kind: str | None) -> None: ...
    def state(self, backend: str) -> str: ...


@dataclass
class _Breaker:
    settings: CircuitSettings
    state: str = CLOSED
    open_until: float = 0.0
    probe_until: float = 0.0
    probe_ttl: float = 60.0

    def __post_init__(self) -> None:
        self.calls: deque[tuple[float, bool]] = deque()


class MemoryBreakers:
    """The breakers of this process (no shared state)."""

    def __init__(self, conf: Mapping[str, CircuitSettings], probe_ttl: Mapping[str, float] | None = None) -> None:
        self._b = {name: _Breaker(s, probe_ttl=(probe_ttl or {}).get(name, 60.0))
                   for name, s in conf.items() if s.enabled}
        self._lock = threading.Lock()

    def _advance(self, b: _Breaker, now: float) -> None:
        if b.state == OPEN and now >= b.open_until:
            b.state, b.probe_until = HALF_OPEN, 0.0

    async def blocked(self, backends: Iterable[str]) -> dict[str, float]:
        """Seconds each open backend stays out (a half-open one whose probe is out: a short while)."""
        out: dict[str, float] = {}
        now = time.monotonic()
        with self._lock:
            for name in backends:
                b = self._b.get(name)
                if b is None:
                    continue
                self._advance(b, now)
                if b.state == OPEN:
                    out[name] = b.open_until - now
                elif b.state == HALF_OPEN and b.probe_until > now:
                    out[name] = min(PROBE_POLL, b.probe_until - now)
        return out

    async def admit(self, backend: str) -> bool:
        """Whether a try may go to ``backend`` now (half open: the first asker gets the probe)."""
        now = time.monotonic()
        with self._lock:
            b = self._b.get(backend)
            if b is None:
                return True
            self._advance(b, now)
            if b.state == CLOSED:
                return True
            if b.state == HALF_OPEN and b.probe_until <= now:
                b.probe_until = now + b.probe_ttl
                return True
            return False

    def record(self, backend: str, kind: str | None) -> None:
        """A try on ``backend`` ended: ``kind`` None for success, else its error kind."""
        now = time.monotonic()
        failed = kind in SERVER_SIDE
        with self._lock:
            b = self._b.get(backend)
            if b is None:
                return
            self._advance(b, now)
            s = b.settings
            if b.state == HALF_OPEN and b.probe_until > 0:
                if failed:
                    b.state, b.open_until = OPEN, now + s.open_for
                    log.warning("circuit of %s opens again: the probe failed (%s); no calls for %gs",
                                backend, kind, s.open_for)
                else:
                    b.state = CLOSED
                    b.calls.clear()
                    log.warning("circuit of %s closes: the probe succeeded", backend)
                return
            if b.state != CLOSED:
                return
            b.calls.append((now, failed))
            edge = now - s.window
            while b.calls and b.calls[0][0] <= edge:
                b.calls.popleft()
            n = len(b.calls)
            bad = sum(1 for _, f in b.calls if f)
            if n >= s.min_calls and bad * 100 >= s.failure_rate * n:
                b.state, b.open_until = OPEN, now + s.open_for
                b.calls.clear()
                log.warning("circuit of %s opens: %d of the last %d tries in %gs failed on the server's "
                            "side; no calls for %gs", backend, bad, n, s.window, s.open_for)

    def state(self, backend: str) -> str:
        with self._lock:
            b = self._b.get(backend)
            if b is None:
                return CLOSED
            self._advance(b, time.monotonic())
            return b.state


# ------------------------------------------------------------------ fleet-wide (Redis)

# KEYS: the breaker's hash, its log of tries (ZSET).  ARGV: what happened (0 ok, 1 server-side
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
  redis.call('DEL', KEYS[2])
  redis.call('PEXPIRE', KEYS[1], ttl)
  return {0, 2, 0, 0}
end
if st ~= 0 then return {st, 0, 0, 0} end
redis.call('ZADD', KEYS[2], now, ARGV[2] .. ':' .. ARGV[1])
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', now - win)
redis.call('PEXPIRE', KEYS[2], math.ceil(win) + 1000)
local all = redis.call('ZRANGE', KEYS[2], 0, -1)
local bad = 0
for _, m in ipairs(all) do if string.sub(m, -2) == ':1' then bad = bad + 1 end end
local n = #all
if n >= minc and bad * 100 >= rate * n then
  redis.call('HSET', KEYS[1], 'st', 1, 'until', string.format('%.17g', now + openms), 'probe', 0)
  redis.call('PEXPIRE', KEYS[1], ttl)
  redis.call('DEL', KEYS[2])
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
        from .shared.scripts import Script

        self.conf = {name: s for name, s in conf.items() if s.enabled}
        self.rs = state
        self.probe_ttl = dict(probe_ttl or {})
        self._record, self._admit = Script(_RECORD), Script(_ADMIT)
        self._seen: dict[str, tuple[float, str, float]] = {}      # backend: (monotonic, state, seconds out)
        self._local = MemoryBreakers(conf, probe_ttl)              # while Redis is away
        self._id = uuid.uuid4().hex[:10]
        self._n = 0

    def _keys(self, backend: str) -> list[str]:
        return [self.rs.key("circuit", backend), self.rs.key("circuit-log", backend)]

    def _note(self, backend: str, code: int, ms: float) -> None:
        self._seen[backend] = (time.monotonic(), _STATES[code], ms / 1000.0)

    async def blocked(self, backends: Iterable[str]) -> dict[str, float]:
        from .shared.connection import RedisDown

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
        from .shared.connection import RedisDown

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


def make_breakers(config: RouterConfig, state: Any) -> Breakers:
    """The router's breakers: in Redis with ``shared_state``, else in this process."""
    conf = settings(config)
    ttl = {b.name: b.timeout + 5.0 for b in config.backends}
    if getattr(state, "conn", None) is not None and hasattr(state, "key"):
        return RedisBreakers(conf, state, ttl)
    return MemoryBreakers(conf, ttl)
