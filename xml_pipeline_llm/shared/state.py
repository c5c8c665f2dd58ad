"""Shared state in Redis: one quota, one set of cooldowns and one rotation for a fleet.

``shared_state: redis://host:port/db`` (or ``$XML_PIPELINE_LLM_REDIS_URL``) makes
every process using the same Redis and ``redis_prefix`` share:

* the token bucket of each rate-limited backend (hash ``<p>:{<backend>}:bucket``),
  kept by Lua scripts on Redis server time, so N processes share one
  ``rate_limit_tpm`` instead of using N times it;
* the concurrency slots of each backend (sorted set ``<p>:{<backend>}:slots``:
  one member per call in flight, scored by its lease expiry).  A process
  renews the leases it holds every ``lease / 3`` seconds from a background
  thread; the slots of a process that dies (SIGKILL included) come back when
  their lease runs out (10 s by default, ``$XML_PIPELINE_LLM_REDIS_LEASE``);
* the starts of each backend with ``rate_limit_rpm`` (sorted set ``<p>:{<backend>}:rpm``:
  one member per provider call started in the last 60 s, scored by Redis server
  time): at most that many start in any 60 s across the fleet.  A waiter polls
  again when the oldest start leaves the window;
* cooldowns (``<p>:{<backend>}:cool``, a key that expires when the cooldown ends;
  a longer cooldown is never shortened).  Every admission's answer carries its
  backend's; the others are read when what this process knows of them is
  older than 50 ms;
* the round-robin position per model (``<p>:rr:<model>``, an INCR counter that
  expires after a week unused);
* the usage totals (``shared/usage.py``).

A backend's keys share the hash tag ``{<backend>}``, so on a Redis Cluster they
live on one node and a script may touch them together.  Admission is one
script, ``ENTER``: the slot, the tokens and the start are taken together or not
at all, and the answer brings the backend's cooldown.  No script or command
touches keys of two tags at once.  What a call asks of Redis in one loop tick
(with budgets, their reservation, which ``lifecycle.Try`` starts alongside)
goes out in one pipeline (``connection.py``): one round trip to admit a call,
one to finish it (release, budget settlement, usage increments).

A call asks Redis at once while no call of this process waits for that
backend.  Once the limits refuse, this process's waiters queue in the fair
order of ``fairness.py`` (priorities, fair shares by tokens, arrival) and one
of them at a time, the first in that order, polls Redis, as in memory.
Across processes there is no strict FIFO: a freed slot goes to whichever
process asks first (waiters poll with a backoff from 2 to 50 ms, and
a process's own release wakes its waiter at once).  For tokens, the oldest
waiter of the fleet whose tokens are not there yet *claims* them (for two
seconds at a time, renewed while it waits): other processes then only take
tokens above the claimed amount, so a large request is never starved by a
stream of small ones from elsewhere.

If Redis goes away while running, calls go on with this process's own
in-memory limits, cooldowns and rotation (a ``MemoryState``), with a WARNING at
most once a minute; Redis is tried again every second and shared state resumes
when it answers.  Usage recorded meanwhile is written to Redis when it is back.

redis.asyncio clients are bound to the event loop that made them, so one
client (with its own small connection pool) is kept per running loop; a
router thus works across ``asyncio.run()`` calls and per-test loops.
"""

from __future__ import annotations

import asyncio
import math
import os
import time
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from ..budgets import Budgets, Clock, Restore
from ..errors import ConfigError
from ..state import MemoryState
from .budgets import RedisBudgets
from .connection import DEFAULT_LEASE, Conn, RedisDown
from .gate import RedisGate
from .scripts import COOL, LEAVE, ROTATE
from .usage import RedisUsageStore
from .worker import Job

if TYPE_CHECKING:
    from ..config import BudgetConfig

LEASE_ENV = "XML_PIPELINE_LLM_REDIS_LEASE"
ROTATION_TTL_MS = 7 * 24 * 3600 * 1000
COOLDOWN_READ_EVERY = 0.05   # how stale the fleet's cooldowns may be (this process's own: never)


class RedisState:
    """The state interface of ``MemoryState``, shared through Redis by every process using it."""

    def __init__(self, url: str, prefix: str = "xpl", *, lease: float | None = None,
                 renew_every: float | None = None, probe_interval: float = 1.0,
                 poll_max: float = 0.05, check: bool = True, priority_aging: float = 30.0) -> None:
        if lease is None:
            lease = _lease_from_env()
        self.prefix = prefix
        self.priority_aging = priority_aging
        self.poll_max = poll_max
        self.conn = Conn(url, lease=lease, renew_every=renew_every, probe=probe_interval)
        if check:
            self.conn.check()
        self._local = MemoryState(priority_aging)
        self._gates: dict[str, RedisGate] = {}
        self._cool_seen: dict[str, tuple[float, float]] = {}   # backend: (monotonic when, seconds left)
        self.usage = RedisUsageStore(url, prefix, conn=self.conn, check=check)

    def __repr__(self) -> str:
        return f"RedisState({self.conn.shown!r}, prefix={self.prefix!r})"

    def key(self, kind: str, name: str) -> str:
        """``<p>:rr:<model>``, or a backend's ``<p>:{<backend>}:<kind>`` (one hash tag per backend)."""
        if kind == "rr":
            return f"{self.prefix}:rr:{name}"
        return f"{self.prefix}:{{{name}}}:{kind}"

    def gate(self, backend: str, max_concurrent: int, tpm: int | None, rpm: int | None = None) -> RedisGate:
        gate = self._gates.get(backend)
        if gate is None:
            gate = self._gates[backend] = RedisGate(self, backend, max_concurrent, tpm, rpm)
        return gate

    def release_later(self, gate: RedisGate, lease: str, delta: float) -> None:
        """Give back a lease (and settle tokens) without blocking: on this loop, else in the thread."""
        args = [lease, repr(delta), repr(gate.capacity), repr(gate.rate_ms)]
        job = Job(LEAVE, gate.keys, args, "release", time.monotonic() + self.conn.lease)
        try:
            loop = asyncio.get_running_loop()
        except RuntimeError:
            loop = None

        def lost() -> None:          # Redis away, or no loop to send on: the thread does it (or keeps it)
            self.conn.worker.submit(job)
            gate.kick()

        if loop is None or loop.is_closed():
            lost()
            return

        def then(res: Any) -> None:
            gate.fleet, gate.level = int(res[0]), float(res[1])
            gate.kick()

        self.conn.eval_soon(LEAVE, gate.keys, args, then, lost)

    def saw_cooldown(self, backend: str, seconds: float) -> None:
        """What Redis said of a backend's cooldown just now (ENTER's answer, or a read)."""
        self._cool_seen[backend] = (time.monotonic(), seconds)

    async def cooldowns(self, backends: Iterable[str]) -> dict[str, float]:
        """Seconds each backend still cools down: this process's own, and the fleet's from Redis.

        What this process heard of a backend's cooldown (from its last admission
        there, or a read) counts for ``COOLDOWN_READ_EVERY`` seconds; the backends
        heard of longer ago are read, together.  A Retry-After seen elsewhere is
        thus honoured at most that much later; this process's own count at once.
        """
        names = list(backends)
        out = await self._local.cooldowns(names)
        now = time.monotonic()
        seen = self._cool_seen
        stale = [n for n in names if n not in seen or now - seen[n][0] > COOLDOWN_READ_EVERY]
        if stale:
            try:
                ttls = await self.conn.commands(*(("PTTL", self.key("cool", n)) for n in stale))
            except RedisDown:
                return out
            for name, ttl in zip(stale, ttls):
                self.saw_cooldown(name, max(0, int(ttl or 0)) / 1000.0)
            now = time.monotonic()
        for name in names:
            when, left = seen[name] if name in seen else (now, 0.0)
            left -= now - when
            if left > 0:
                out[name] = max(out.get(name, 0.0), left)
        return out

    async def cool_down(self, backend: str, seconds: float) -> None:
        await self._local.cool_down(backend, seconds)
        ms = max(1, math.ceil(seconds * 1000))
        try:
            await self.conn.eval(COOL, [self.key("cool", backend)], [ms])
        except RedisDown:
            pass

    async def next_turn(self, model: str) -> int:
        try:
            return int(await self.conn.eval(ROTATE, [self.key("rr", model)], [ROTATION_TTL_MS]))
        except RedisDown:
            return await self._local.next_turn(model)

    def budgets(self, rules: Iterable[BudgetConfig], clock: Clock, restore: Restore | None) -> Budgets:
        """The fleet's budgets: one spend per budget in Redis, atomic across processes."""
        return RedisBudgets(self.conn, self.prefix, rules, clock)

    async def close(self) -> None:
        """Close this loop's connections and write what usage is still queued."""
        await self.conn.drain()
        await self.conn.aclose()


def _lease_from_env() -> float:
    raw = os.environ.get(LEASE_ENV)
    if not raw:
        return DEFAULT_LEASE
    try:
        value = float(raw)
        if value > 0:
            return value
    except ValueError:
        pass
    raise ConfigError(f'${LEASE_ENV}: expected a positive number of seconds, got "{raw}"')
