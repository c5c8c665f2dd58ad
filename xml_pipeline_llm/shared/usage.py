"""Usage totals in Redis: what the whole fleet spent, per agent, model, backend and thread.

Keys (``<p>`` is ``redis_prefix``):

* ``<p>:usage:{<p>}:<group>:<key>`` - a hash of ``prompt_tokens``, ``completion_tokens``,
  ``total_tokens``, ``request_count``, ``error_count``, ``unpriced_requests``,
  ``cached_tokens``, ``cache_write_tokens``, ``reasoning_tokens``, ``cache_hits`` (HINCRBY; a
  field never added reads back as 0) and ``cost_usd`` (HINCRBYFLOAT, only by priced calls: a key with no
  priced call has no ``cost_usd`` field and reads back as None, never 0) and ``saved_usd``
  (HINCRBYFLOAT, by response-cache hits of priced answers), for
  group ``agent``, ``model``, ``backend`` and ``thread``;
* ``<p>:usage:{<p>}:<group>`` - the set of keys seen in that group;
* ``<p>:usage:{<p>}:events`` - a stream of the newest events (about 100,000), one
  entry per provider call (one field ``e``: the event as JSON; entries written
  before 0.3 have a field per event field, and read back alike), for
  ``by="event"`` exports and the CLI.

One Lua script adds an event to all of them at once, so totals are exact
however many processes write.  They share the hash tag ``{<p>}``, so on a Redis
Cluster all of a prefix's usage lives on one slot (one node): the script needs
its nine keys together.  ``append`` is awaited before ``complete()``
returns (read-your-writes); ``append_nowait`` (LiteLLM callbacks, stream
finalisers) goes through a background thread, and a read first waits for what
this process queued.  Totals do not expire: they are the fleet's spend.
Reads (``get``, ``totals``) use a sync client, because ``get_agent_usage`` is a
sync API; they return None while Redis is unreachable, and the ledger then
answers from this process's own totals.
"""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from typing import Any, TypeVar

from ..usage import (
    CACHE_HIT,
    COUNT_COLUMNS,
    EVENT_FIELDS,
    GROUPS,
    NO_AGENT,
    AgentUsage,
    UsageEvent,
    group_key,
    metadata_from,
)
from .connection import Conn, RedisDown, log
from .scripts import Script
from .worker import Job

MAX_EVENTS = 100_000
T = TypeVar("T")

_EVENT_FIELDS = EVENT_FIELDS
_INT_FIELDS = COUNT_COLUMNS

# KEYS: n total hashes, n index sets, the event stream (n = 4 groups + the declared metadata
# keys).  ARGV: the n group keys, prompt, completion, total, requests, errors, unpriced, cost
# ('' when unknown), cached, cache write, reasoning, cache hits, saved ('' when none), stream length,
# event field pairs.
ADD = Script("""
local n = (#KEYS - 1) / 2
local function add(h, field, v) if v ~= '0' then redis.call('HINCRBY', h, field, v) end end
for i = 1, n do
  local h = KEYS[i]
  redis.call('HINCRBY', h, 'request_count', ARGV[n + 4])      -- even 0: the totals hash exists
  add(h, 'prompt_tokens', ARGV[n + 1])
  add(h, 'completion_tokens', ARGV[n + 2])
  add(h, 'total_tokens', ARGV[n + 3])
  add(h, 'error_count', ARGV[n + 5])
  add(h, 'unpriced_requests', ARGV[n + 6])
  if ARGV[n + 7] ~= '' then redis.call('HINCRBYFLOAT', h, 'cost_usd', ARGV[n + 7]) end
  add(h, 'cached_tokens', ARGV[n + 8])
  add(h, 'cache_write_tokens', ARGV[n + 9])
  add(h, 'reasoning_tokens', ARGV[n + 10])
  add(h, 'cache_hits', ARGV[n + 11])
  if ARGV[n + 12] ~= '' then redis.call('HINCRBYFLOAT', h, 'saved_usd', ARGV[n + 12]) end
  redis.call('SADD', KEYS[i + n], ARGV[i])
end
if tonumber(ARGV[n + 13]) > 0 then
  redis.call('XADD', KEYS[2 * n + 1], 'MAXLEN', '~', ARGV[n + 13], '*', unpack(ARGV, n + 14))
end
return 1
""")


# No KEYS (a single server only: version 0.1 ran on no cluster).  ARGV: prefix, how many keys per
# group to move, the groups.  Moves totals kept under 0.1's names (``<p>:usage:<group>:<key>``,
# index ``<p>:usage:<group>``) into today's: added, then deleted, in one step, so however many
# processes run it (an old one still writing meanwhile) nothing is counted twice or lost.
# Returns how many totals it moved (0: nothing left).
MOVE_OLD = Script("""
local p, batch, moved = ARGV[1], tonumber(ARGV[2]), 0
for g = 3, #ARGV do
  local old_index = p .. ':usage:' .. ARGV[g]
  local new_index = p .. ':usage:{' .. p .. '}:' .. ARGV[g]
  for _, name in ipairs(redis.call('SPOP', old_index, batch)) do
    local old, new = old_index .. ':' .. name, new_index .. ':' .. name
    local h = redis.call('HGETALL', old)
    for i = 1, #h, 2 do
      if h[i] == 'cost_usd' then
        redis.call('HINCRBYFLOAT', new, h[i], h[i + 1])
      else
        redis.call('HINCRBY', new, h[i], h[i + 1])
      end
    end
    redis.call('HINCRBY', new, 'request_count', 0)
    redis.call('SADD', new_index, name)
    redis.call('DEL', old)
    moved = moved + 1
  end
end
return moved
""")


class RedisUsageStore:
    """Fleet-wide usage totals (and recent events) in Redis; the ledger reads its totals here."""

    shared_totals = True

    def __init__(self, url: str, prefix: str = "xpl", *, conn: Conn | None = None,
                 max_events: int = MAX_EVENTS, check: bool = True) -> None:
        self.prefix = prefix
        self._base = f"{prefix}:usage:{{{prefix}}}"      # one hash tag: one cluster slot for all of it
        self.max_events = max_events
        self.ident = (url, prefix)
        self.groups: tuple[str, ...] = tuple(GROUPS)     # plus llm.telemetry.group_by_metadata keys
        self._own = conn is None
        self.conn = conn if conn is not None else Conn(url, place="usage store")
        if check:
            if self._own:
                self.conn.check()
            self._move_old_totals()

    def _move_old_totals(self) -> None:
        """Totals written under version 0.1's key names are moved to today's (once there are none, a no-op)."""
        if self.conn.cluster:
            return
        moved = 0
        try:
            while True:
                step = int(self.conn.sync_call(lambda c: c.eval(MOVE_OLD.src, 0, self.prefix, 500, *GROUPS)))
                if not step:
                    break
                moved += step
        except RedisDown:
            return
        if moved:
            log.info("usage store: moved %d usage totals of %s from the key names of version 0.1 "
                     "(%s:usage:<group>:<key>) to %s:<group>:<key>", moved, self.conn.shown, self.prefix,
                     self._base)

    def __repr__(self) -> str:
        return f"RedisUsageStore({self.conn.shown!r}, prefix={self.prefix!r})"

    def _hash(self, group: str, key: str) -> str:
        return f"{self._base}:{group}:{key}"

    def _index(self, group: str) -> str:
        return f"{self._base}:{group}"

    def declare_groups(self, metadata_groups: tuple[str, ...]) -> None:
        """Keep fleet totals per value of these ``metadata.<key>`` groups too (added by the same script)."""
        self.groups = tuple(dict.fromkeys((*GROUPS, *metadata_groups)))

    def _job(self, event: UsageEvent) -> Job:
        names = [group_key(event, g) for g in self.groups]
        keys = [self._hash(g, k) for g, k in zip(self.groups, names)]
        keys += [self._index(g) for g in self.groups]
        keys.append(f"{self._base}:events")
        ok = event.succeeded
        err = event.ended_in_error
        unpriced = ok and event.cost_usd is None
        hit = event.outcome == CACHE_HIT          # a response-cache hit: counted in cache_hits and saved_usd only
        cost = "" if event.cost_usd is None or hit else repr(event.cost_usd)
        saved = repr(event.saved_usd) if hit and event.saved_usd else ""
        args = [*names, event.prompt_tokens, event.completion_tokens, event.total_tokens, int(ok), int(err),
                int(unpriced), cost, event.cached_tokens, event.cache_write_tokens, event.reasoning_tokens,
                int(hit), saved, self.max_events, "e", _event_json(event)]
        return Job(ADD, keys, args, "usage")

    # ---------------------------------------------------------- writes

    async def append(self, event: UsageEvent) -> None:
        """Add ``event`` to the fleet's totals; done when this returns (kept for later if Redis is away)."""
        job = self._job(event)
        try:
            await self.conn.eval(ADD, job.keys, job.args)
        except RedisDown:
            self.conn.worker.park(job)

    def append_nowait(self, event: UsageEvent) -> None:
        """Add ``event`` from a callback or finaliser (written by the background thread)."""
        self.conn.worker.submit(self._job(event))

    def flush(self) -> None:
        self.conn.worker.flush(5.0)

    async def close(self) -> None:
        if self._own:
            await self.conn.aclose()
        else:
            import asyncio

            await asyncio.get_running_loop().run_in_executor(None, self.conn.worker.flush, 5.0)

    # ---------------------------------------------------------- reads (sync)

    def _read(self, fn: Callable[[Any], T]) -> T | None:
        if not self.conn.health.usable():
            return None
        self.conn.worker.drain(2.0)
        try:
            return self.conn.sync_call(fn)
        except RedisDown:
            return None

    def get(self, by: str, key: str | None) -> AgentUsage | None:
        """Fleet totals for one key (zeros if unseen); None while Redis is unreachable."""
        found = self._read(lambda c: c.hgetall(self._hash(by, key or NO_AGENT)))
        return None if found is None else _usage(found)

    def totals(self, by: str = "agent") -> dict[str, AgentUsage] | None:
        """Fleet totals per key of ``by``; None while Redis is unreachable."""
        def read(c: Any) -> dict[str, AgentUsage]:
            names = sorted(c.smembers(self._index(by)))
            pipe = c.pipeline(transaction=False)
            for name in names:
                pipe.hgetall(self._hash(by, name))
            return {n: _usage(h) for n, h in zip(names, pipe.execute()) if h}

        return self._read(read)

    def reset(self, agent_id: str | None = None) -> bool:
        """Forget one agent's fleet totals, or all totals (the event stream is kept)."""
        def go(c: Any) -> bool:
            pipe = c.pipeline(transaction=True)
            if agent_id is not None:
                pipe.delete(self._hash("agent", agent_id))
                pipe.srem(self._index("agent"), agent_id)
            else:
                for group in self.groups:
                    for name in c.smembers(self._index(group)):
                        pipe.delete(self._hash(group, name))
                    pipe.delete(self._index(group))
            pipe.execute()
            return True

        return bool(self._read(go))

    def events(self, since: float | None = None) -> Iterator[UsageEvent]:
        """The newest events kept in Redis (oldest first), optionally since a UNIX time."""
        start = f"{int(since * 1000)}-0" if since is not None else "-"
        key = f"{self._base}:events"
        def page(since_id: str) -> Callable[[Any], list[Any]]:
            return lambda c: c.xrange(key, min=since_id, max="+", count=1000)

        while True:
            batch = self.conn.sync_call(page(start))
            for _, fields in batch:
                yield _event(fields)
            if len(batch) < 1000:
                return
            ms, seq = batch[-1][0].split("-")
            start = f"{ms}-{int(seq) + 1}"


def _usage(h: dict[str, str]) -> AgentUsage:
    """A totals hash as AgentUsage; no ``cost_usd`` field (no priced call) is None, not 0."""
    cost = h.get("cost_usd")
    return AgentUsage(**{k: int(h.get(k) or 0) for k in _INT_FIELDS},
                      cost_usd=None if cost in (None, "") else float(cost),
                      saved_usd=float(h.get("saved_usd") or 0.0))


def _event_json(event: UsageEvent) -> str:
    found = {name: getattr(event, name) for name in _EVENT_FIELDS}
    found["metadata"] = dict(event.metadata)
    return json.dumps(found, separators=(",", ":"))


def _event(f: dict[str, str]) -> UsageEvent:
    if "e" in f:
        found = json.loads(f["e"])
        return UsageEvent(**{k: v for k, v in found.items() if k in _EVENT_FIELDS})

    def num(name: str, kind: Any) -> Any:
        raw = f.get(name, "")
        return kind(raw) if raw != "" else (None if name == "cost_usd" else kind(0))

    return UsageEvent(timestamp=num("timestamp", float), agent_id=f.get("agent_id", ""),
                      thread_id=f.get("thread_id", ""), model=f.get("model", ""),
                      backend=f.get("backend", ""), provider=f.get("provider", ""),
                      prompt_tokens=num("prompt_tokens", int), completion_tokens=num("completion_tokens", int),
                      total_tokens=num("total_tokens", int), cost_usd=num("cost_usd", float),
                      latency_ms=num("latency_ms", float), outcome=f.get("outcome", ""),
                      requested_model=f.get("requested_model", ""), call_id=f.get("call_id", ""),
                      metadata=metadata_from(f.get("metadata")))
