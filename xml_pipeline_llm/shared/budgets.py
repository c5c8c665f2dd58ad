"""Budgets for a fleet: one spend per budget across every process, kept atomic in Redis.

Keys (``<p>`` is ``redis_prefix``; every budget key carries the one hash tag
``{<p>:budgets}``, so a script that reserves in several budgets at once never
crosses Redis Cluster slots):

* ``<p>:{<p>:budgets}:b:<scope>:<key>`` - a hash: ``win`` (the window's start,
  server time), ``used_t``/``used_u`` (settled tokens and dollars in that
  window), ``res_t``/``res_u`` (held by calls in flight) and one ``h:<id>``
  field per hold;
* ``<p>:{<p>:budgets}:h:<scope>:<key>`` - the holds, scored by when their lease
  ends: a process that dies holding a reservation gives it back when the lease
  (``HOLD_LEASE_MS``) runs out.

One script reserves in every applicable budget or in none (``RESERVE``), one
settles (``SETTLE``), both on Redis server time, rolling a window that ended.
Windowed keys expire a lease after their window ends.  While Redis is away the
process falls back to its own in-memory budgets (as the limits do).
"""

from __future__ import annotations

import asyncio
import logging
import math
import uuid
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from typing import Any

from ..budgets.accounting import Budgets
from ..budgets.rules import (
    MONDAY,
    WINDOW_SECONDS,
    Account,
    BudgetEvent,
    BudgetKey,
    BudgetStatus,
    Hold,
    Limit,
    Unit,
    check_fits,
    severity,
)
from .connection import Conn, RedisDown
from .scripts import Script
from .worker import Job

log = logging.getLogger("xml_pipeline_llm")

HOLD_LEASE_MS = 600_000      # a reservation a dead process held comes back after 10 minutes

_WINDOW = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
local function f(x) return string.format('%.17g', x) end
local function roll(b, secs, off)
  local ws = 0
  if secs > 0 then ws = math.floor((now - off) / secs) * secs + off end
  local win = tonumber(redis.call('HGET', b, 'win') or '-1')
  if win ~= ws then
    redis.call('HSET', b, 'win', f(ws), 'used_t', 0, 'used_u', 0)
    redis.call('HDEL', b, 'x_tokens', 'x_usd')
  end
  if secs > 0 then redis.call('PEXPIRE', b, math.ceil(ws + secs - now) + ARGV[3]) end
  return ws
end
local function unhold(b, h, id)
  local amt = redis.call('HGET', b, 'h:' .. id)
  if amt then
    local tk, us = string.match(amt, '([^ ]+) ([^ ]+)')
    redis.call('HINCRBYFLOAT', b, 'res_t', -tonumber(tk))
    redis.call('HINCRBYFLOAT', b, 'res_u', -tonumber(us))
    redis.call('HDEL', b, 'h:' .. id)
  end
  redis.call('ZREM', h, id)
end
local function purge(b, h)
  for _, id in ipairs(redis.call('ZRANGEBYSCORE', h, '-inf', now)) do unhold(b, h, id) end
end
"""

# KEYS: budget hash, holds zset, per budget.  ARGV: n, hold id, lease ms, tokens, usd (-1: no price),
# then per budget: max tokens (-1: none), max usd (-1: none), window ms (0: none), window offset ms.
# Returns {1, window starts...} or {0, index, unit, limit, used, reserved, window start, exhausted}: exhausted
# is 1 for the first refusal of that budget and unit in its window (x_<unit> marks it fleet-wide), else 0.
# A call refused because its model has no price ('unpriced') marks nothing.
RESERVE = Script(_WINDOW + """
local n, id, lease = tonumber(ARGV[1]), ARGV[2], tonumber(ARGV[3])
local tokens, usd = tonumber(ARGV[4]), tonumber(ARGV[5])
local starts = {}
for i = 1, n do
  local b, h, a = KEYS[2 * i - 1], KEYS[2 * i], 5 + 4 * (i - 1)
  local max_t, max_u = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  starts[i] = roll(b, tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4]))
  purge(b, h)
  local v = redis.call('HMGET', b, 'used_t', 'used_u', 'res_t', 'res_u')
  local ut, uu, rt, ru = tonumber(v[1] or 0), tonumber(v[2] or 0), tonumber(v[3] or 0), tonumber(v[4] or 0)
  if max_t >= 0 and ut + rt + tokens > max_t then
    return {0, i, 'tokens', f(max_t), f(ut), f(rt), f(starts[i]), redis.call('HSETNX', b, 'x_tokens', 1)}
  end
  if max_u >= 0 and usd < 0 then return {0, i, 'unpriced', f(max_u), f(uu), f(ru), f(starts[i]), 0} end
  if max_u >= 0 and uu + ru + usd > max_u then
    return {0, i, 'usd', f(max_u), f(uu), f(ru), f(starts[i]), redis.call('HSETNX', b, 'x_usd', 1)}
  end
end
for i = 1, n do
  local b, h = KEYS[2 * i - 1], KEYS[2 * i]
  redis.call('HINCRBYFLOAT', b, 'res_t', tokens)
  redis.call('HINCRBYFLOAT', b, 'res_u', math.max(usd, 0))
  redis.call('HSET', b, 'h:' .. id, f(tokens) .. ' ' .. f(math.max(usd, 0)))
  redis.call('ZADD', h, now + lease, id)
  redis.call('PEXPIRE', h, lease * 2)
end
local out = {1}
for i = 1, n do out[i + 1] = f(starts[i]) end
return out
""")

# KEYS: as RESERVE.  ARGV: n, hold id, lease ms, tokens used, usd used, then per budget: window ms, offset ms,
# max tokens (-1: none), max usd (-1: none).  Gives the hold back and charges what was used.  Returns per
# budget {tokens before, after, usd before, after, exhausted tokens, exhausted usd}: 1 when this charge
# reached the limit and no exhausted event was fired for it in this window yet (x_<unit> marks it).
SETTLE = Script(_WINDOW + """
local n, id = tonumber(ARGV[1]), ARGV[2]
local tokens, usd = tonumber(ARGV[4]), tonumber(ARGV[5])
local out = {}
for i = 1, n do
  local b, h, a = KEYS[2 * i - 1], KEYS[2 * i], 5 + 4 * (i - 1)
  unhold(b, h, id)
  roll(b, tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]))
  local max_t, max_u = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local bt, bu = tonumber(redis.call('HGET', b, 'used_t') or 0), tonumber(redis.call('HGET', b, 'used_u') or 0)
  redis.call('HINCRBYFLOAT', b, 'used_t', tokens)
  redis.call('HINCRBYFLOAT', b, 'used_u', usd)
  local xt, xu = 0, 0
  if max_t > 0 and bt + tokens >= max_t then xt = redis.call('HSETNX', b, 'x_tokens', 1) end
  if max_u > 0 and bu + usd >= max_u then xu = redis.call('HSETNX', b, 'x_usd', 1) end
  out[i] = {f(bt), f(bt + tokens), f(bu), f(bu + usd), xt, xu}
end
return out
""")


@dataclass
class FleetHold(Hold):
    """A hold in Redis: the budgets it is in, and its id there."""

    keys: list[BudgetKey] | None = None
    limits: list[Limit] | None = None
    hold_id: str = ""


def _window_args(limit: Limit) -> list[Any]:
    seconds = WINDOW_SECONDS[limit.window]
    return [0 if seconds is None else seconds * 1000, MONDAY * 1000 if limit.window == "7d" else 0]


class RedisBudgets(Budgets):
    """``Budgets`` whose spend is the fleet's, in Redis (limits are each process's own config)."""

    def __init__(self, conn: Conn, prefix: str, rules: Iterable[Any], clock: Callable[[], float]) -> None:
        super().__init__(rules, clock)
        self.conn = conn
        self.tag = f"{prefix}:{{{prefix}:budgets}}"

    def _keys(self, scope: str, key: str | None) -> list[str]:
        name = f"{scope}:{'' if key is None else key}"
        return [f"{self.tag}:b:{name}", f"{self.tag}:h:{name}"]

    async def reserve(self, keys: Iterable[BudgetKey], tokens: int, usd: float | None, model: str) -> Hold | None:
        found = [(k, limit) for k in keys if (limit := self._limit(*k)) is not None]
        if not found:
            return None
        hold_id = uuid.uuid4().hex
        rkeys, args = [], [len(found), hold_id, HOLD_LEASE_MS, tokens, -1 if usd is None else usd]
        for (scope, key), limit in found:
            rkeys += self._keys(scope, key)
            args += [-1 if limit.max_tokens is None else limit.max_tokens,
                     -1 if limit.max_usd is None else limit.max_usd, *_window_args(limit)]
        hold = FleetHold([], tokens, usd or 0.0, [k for k, _ in found], [lim for _, lim in found], hold_id)

        def undo(res: Any) -> None:             # cancelled, and it went through all the same: give it back
            if int(res[0]) == 1:
                self.settle(hold, 0, 0.0)

        try:
            res = await self.conn.eval(RESERVE, rkeys, args, undo)
        except RedisDown:
            return await super().reserve(keys, tokens, usd, model)
        if int(res[0]) != 1:
            self._refuse(found[int(res[1]) - 1], res, tokens, usd, model)
        return hold

    def _refuse(self, found: tuple[BudgetKey, Limit], res: list[Any], tokens: int, usd: float | None,
                model: str) -> None:
        (scope, key), limit = found
        acct = Account(scope, key, limit, start=float(res[6]) / 1000 if WINDOW_SECONDS[limit.window] else None)
        unit: Unit = "tokens" if res[2] == "tokens" else "usd"
        if unit == "tokens":
            acct.used_tokens, acct.reserved_tokens = int(float(res[4])), int(float(res[5]))
        else:
            acct.used_usd, acct.reserved_usd = float(res[4]), float(res[5])
        if res[2] != "unpriced" and len(res) > 7 and int(res[7]) == 1:   # the first refusal in this window
            self._fire([BudgetEvent(scope, key, 100, float(res[4]), float(res[3]), unit, "exhausted")])
        check_fits(acct, tokens, usd, model)
        raise AssertionError("a refused reservation passed the local check")    # pragma: no cover

    def settle(self, hold: Hold, tokens: int, usd: float | None) -> None:
        if not isinstance(hold, FleetHold):
            super().settle(hold, tokens, usd)
            return
        assert hold.keys is not None and hold.limits is not None
        rkeys: list[str] = []
        args: list[Any] = [len(hold.keys), hold.hold_id, HOLD_LEASE_MS, tokens, usd or 0.0]
        for (scope, key), limit in zip(hold.keys, hold.limits):
            rkeys += self._keys(scope, key)
            args += [*_window_args(limit), -1 if limit.max_tokens is None else limit.max_tokens,
                     -1 if limit.max_usd is None else limit.max_usd]
        job = Job(SETTLE, rkeys, args, "release", math.inf)
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            self.conn.worker.submit(job)
            return

        def then(res: Any) -> None:
            assert hold.keys is not None and hold.limits is not None
            events: list[BudgetEvent] = []
            for (scope, key), limit, row in zip(hold.keys, hold.limits, res):
                before_t, after_t, before_u, after_u = (float(x) for x in row[:4])
                events += _crossed((scope, key), limit, "tokens", before_t, after_t, int(row[4]) == 1)
                events += _crossed((scope, key), limit, "usd", before_u, after_u, int(row[5]) == 1)
            self._fire(events)

        self.conn.eval_soon(SETTLE, rkeys, args, then, lambda: self.conn.worker.submit(job))

    def status(self, scope: str, key: str | None) -> BudgetStatus | None:
        limit = self._limit(scope, key)
        if limit is None:
            return None
        b = self._keys(scope, key)[0]
        try:
            h = self.conn.sync_call(lambda c: c.hgetall(b))
        except RedisDown:
            return super().status(scope, key)
        acct = Account(scope, key, limit, start=None)
        seconds = WINDOW_SECONDS[limit.window]
        now_ms = self._clock() * 1000
        if seconds is not None:
            off = MONDAY * 1000 if limit.window == "7d" else 0
            acct.start = ((now_ms - off) // (seconds * 1000) * seconds * 1000 + off) / 1000
        if h and (seconds is None or float(h.get("win", -1)) / 1000 == acct.start):
            acct.used_tokens, acct.used_usd = int(float(h.get("used_t", 0))), float(h.get("used_u", 0))
        if h:
            acct.reserved_tokens = max(0, int(float(h.get("res_t", 0))))
            acct.reserved_usd = max(0.0, float(h.get("res_u", 0)))
        return acct.status()

    def all(self) -> list[BudgetStatus]:
        local = {(s.scope, s.key) for s in super().all()}
        out = [self.status(scope, key) for scope, key in sorted(local, key=str)]
        return [s for s in out if s is not None]

    def reset(self, scope: str, key: str | None) -> None:
        super().reset(scope, key)
        b = self._keys(scope, key)[0]
        try:
            self.conn.sync_call(lambda c: c.pipeline().hset(b, mapping={"used_t": 0, "used_u": 0})
                                .hdel(b, "x_tokens", "x_usd").execute())
        except RedisDown:
            pass

    def forget(self, scope: str, key: str | None) -> BudgetStatus | None:
        final = self.status(scope, key)
        super().forget(scope, key)
        try:
            self.conn.sync_call(lambda c: c.delete(*self._keys(scope, key)))
        except RedisDown:
            pass
        return final


def _crossed(bkey: BudgetKey, limit: Limit, unit: Unit, before: float, after: float,
             exhausted: bool) -> list[BudgetEvent]:
    """The ``warn_at`` thresholds one charge crossed, in order, then ``exhausted`` when the script says
    this charge is the first in the window to reach the limit (a refusal may have fired it already)."""
    cap = limit.max_tokens if unit == "tokens" else limit.max_usd
    if not cap:
        return []
    marks = [(p, severity(p)) for p in sorted(set(limit.warn_at) - {100})]
    if limit.degrade_at is not None:      # degrade: {at: P}: fired by the one charge that reaches it
        marks = sorted([*marks, (limit.degrade_at, "degraded")], key=lambda m: (m[0], m[1] != "degraded"))
    out = [BudgetEvent(bkey[0], bkey[1], p, after, cap, unit, sev)
           for p, sev in marks if before * 100 < p * cap <= after * 100]
    if exhausted:
        out.append(BudgetEvent(bkey[0], bkey[1], 100, after, cap, unit, "exhausted"))
    return out
