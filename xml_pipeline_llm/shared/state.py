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
import random
import threading
import time
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any, NamedTuple

if TYPE_CHECKING:
    from ..config import BudgetConfig

from ..budgets import Budgets, Clock, Restore
from ..errors import ConfigError
from ..fairness import NO_TURN, FairQueue, Turn, Waiter
from ..limits import Reservation
from ..limits import wake as _wake
from ..state import MemoryState
from .connection import DEFAULT_LEASE, Conn, RedisDown
from .scripts import COOL, ENTER, LEAVE, QUOTA, ROTATE
from .worker import Job

LEASE_ENV = "XML_PIPELINE_LLM_REDIS_LEASE"
ROTATION_TTL_MS = 7 * 24 * 3600 * 1000
CLAIM_TTL_MS = 2000          # a waiting request's claim on a bucket, renewed while it waits
COOLDOWN_READ_EVERY = 0.05   # how stale the fleet's cooldowns may be (this process's own: never)
TOKEN_POLL_MAX = 0.25        # longest nap between bucket polls (refunds elsewhere are seen this fast)
RPM_WINDOW_MS = 60_000       # rate_limit_rpm: starts in any 60 s
START_POLL_MAX = 1.0         # longest nap between start-window polls


class Answer(NamedTuple):
    """What ``ENTER`` said."""

    ok: bool
    in_flight: int          # the fleet's calls in flight on the backend
    level: float            # tokens in the bucket
    token_wait: float       # seconds until the tokens are there
    since: str              # server ms the waiter started waiting (its claim's age)
    full_for: float         # seconds until the start window has room (0: room now)
    cooling: float          # seconds the backend still cools down
    quota: float = 0.0      # tokens taken from the provider's reported quota
    seq: int = 0            # the call's number (the provider's readings name it)


class RedisGate:
    """A backend's limits held in Redis, with the interface of ``limits.Gate``.

    ``in_flight`` is the fleet-wide count from the last Redis answer (at least
    this process's own calls); ``queued`` counts this process's waiters.
    """

    def __init__(self, state: RedisState, backend: str, max_concurrent: int, tpm: int | None,
                 rpm: int | None = None) -> None:
        self.state = state
        self.backend = backend
        self.limit = max_concurrent
        self.capacity = float(tpm) if tpm else 0.0
        self.rate_ms = self.capacity / 60_000.0
        self.quota_key = state.key("quota", backend)
        self.keys = [state.key("bucket", backend), state.key("slots", backend), self.quota_key]   # LEAVE's
        self.enter_keys = [*self.keys[:2], state.key("rpm", backend), state.key("cool", backend), self.quota_key]
        self.rpm = rpm
        self.paced = False                # a token quota reported by the provider (here or elsewhere)
        self.full_until = 0.0             # monotonic time the fleet's window was last seen full until
        self.local = state._local.gate(backend, max_concurrent, tpm, rpm)   # used while Redis is away
        self.queued = 0
        self.held = 0
        self.fleet = 0
        self.level = self.capacity
        self._waiters = FairQueue(state.priority_aging)
        self._asking: Waiter | None = None
        self._lock = threading.Lock()
        self._kick: asyncio.Future[None] | None = None
        self._id = uuid.uuid4().hex[:12]
        # ENTER's arguments after the lease id that never change for this gate
        self._enter_const = (repr(self.capacity), repr(self.rate_ms), max_concurrent,
                             int(state.conn.lease * 1000))

    @property
    def in_flight(self) -> int:
        return max(self.held, self.fleet) + self.local.slots.in_use

    @property
    def load(self) -> float:
        return (self.in_flight + self.queued) / self.limit

    @property
    def has_capacity(self) -> bool:
        """As far as this process knows (the last ENTER answer): the fleet's start window has room."""
        if not self.rpm:
            return True
        if not self.state.conn.health.usable():
            return self.local.has_capacity
        return time.monotonic() >= self.full_until

    def min_wait(self, tokens: int) -> float:
        """As far as the last Redis answer tells: seconds at least before a call of ``tokens`` could start."""
        if not self.state.conn.health.usable():
            return self.local.min_wait(tokens)
        wait = max(0.0, self.full_until - time.monotonic()) if self.rpm else 0.0
        if self.capacity:
            wait = max(wait, (min(float(tokens), self.capacity) - self.level) / (self.rate_ms * 1000.0))
        return wait

    async def enter(self, tokens: int, turn: Turn = NO_TURN) -> Reservation:
        """Wait for a slot, the tokens and a start (fleet-wide, together); the reservation for ``leave``."""
        self.queued += 1
        try:
            if self.state.conn.health.usable():
                try:
                    return await self._enter_shared(tokens, turn)
                except RedisDown:
                    pass
            return await self.local.enter(tokens, turn)
        finally:
            self.queued -= 1

    async def _enter_shared(self, tokens: int, turn: Turn) -> Reservation:
        amount = min(float(tokens), self.capacity) if self.capacity else 0.0
        if not self._waiters:       # nobody of this process is held back: ask Redis at once
            lease = _new_lease()
            answer = await self._try_enter(amount, lease, "", tokens)
            if answer.ok:
                return self._admitted(amount, lease, answer)
        loop = asyncio.get_running_loop()
        me = Waiter(turn)
        me.fut = loop.create_future()
        with self._lock:                       # held back: one waiter of this process asks Redis at a
            self._waiters.push(me)             # time, the first in fair order (fairness.py)
            go = self._asking is None and self._waiters.peek() is me
            if go:
                self._asking = me
        served = False
        try:
            if not go:
                await me.fut                   # the waiter asking before us hands over when done
            backoff = 0.002
            since = ""                          # server time of our first try, for the claim
            while True:
                if not self.state.conn.health.usable():
                    raise RedisDown()
                lease = _new_lease()
                answer = await self._try_enter(amount, lease, since, tokens)
                if answer.ok:
                    served = True
                    return self._admitted(amount, lease, answer)
                since = answer.since
                if answer.token_wait > 0 or answer.full_for > 0:   # waiting for time to pass
                    nap = max(min(answer.token_wait, TOKEN_POLL_MAX), min(answer.full_for, START_POLL_MAX))
                else:                                              # for a slot: freed elsewhere, or kicked
                    nap, backoff = backoff, min(backoff * 2, self.state.poll_max)
                await self._nap(loop, nap * random.uniform(0.8, 1.2))
        finally:
            with self._lock:
                (self._waiters.served if served else self._waiters.remove)(me)
                nxt = None
                if self._asking is me or self._asking is None:
                    nxt = self._asking = self._waiters.peek()
            _wake(nxt.fut if nxt is not None else None)

    def _admitted(self, amount: float, lease: str, answer: Answer) -> Reservation:
        self.held += 1
        self.state.conn.worker.hold(lease, self.keys[1])
        return Reservation(amount, lease, answer.quota, answer.seq)

    async def _try_enter(self, amount: float, lease: str, since: str, tokens: int) -> Answer:
        args = [repr(amount), *self._enter_const, lease, self._id, CLAIM_TTL_MS, since,
                self.rpm or 0, RPM_WINDOW_MS, tokens]

        def undo(res: Any) -> None:             # cancelled, and it went through all the same: give it back
            if int(res[0]) == 1:
                self.state.release_later(self, lease, amount, float(res[7]), int(res[8]))

        res = await self.state.conn.eval(ENTER, self.enter_keys, args, undo)
        answer = Answer(int(res[0]) == 1, int(res[1]), float(res[2]), float(res[3]) / 1000.0, str(res[4]),
                        float(res[5]) / 1000.0, int(res[6]) / 1000.0, float(res[7]), int(res[8]))
        self.fleet, self.level = answer.in_flight, answer.level
        self.paced = self.paced or answer.quota > 0
        self.full_until = time.monotonic() + answer.full_for
        self.state.saw_cooldown(self.backend, answer.cooling)
        return answer

    async def _nap(self, loop: asyncio.AbstractEventLoop, seconds: float) -> None:
        """Sleep until it is time to ask Redis again, or until this process frees a slot."""
        fut: asyncio.Future[None] = loop.create_future()
        self._kick = fut
        handle = loop.call_later(seconds, _wake, fut)
        try:
            await fut
        finally:
            handle.cancel()
            if self._kick is fut:
                self._kick = None

    def kick(self) -> None:
        """Wake the waiting head of this process (after a slot or tokens came back)."""
        fut = self._kick
        if fut is None or fut.done():
            return
        try:
            fut_loop = fut.get_loop()
            try:
                running = asyncio.get_running_loop()
            except RuntimeError:
                running = None
            if running is fut_loop:
                _wake(fut)
            elif not fut_loop.is_closed():
                fut_loop.call_soon_threadsafe(_wake, fut)
        except RuntimeError:
            pass

    def leave(self, reservation: Reservation, used: int) -> None:
        """Free the slot and settle the tokens; the Redis side runs in the background."""
        lease = reservation.lease
        if lease is None:
            self.local.leave(reservation, used)
            return
        self.state.conn.worker.drop(lease)
        self.held = max(0, self.held - 1)
        self.fleet = max(0, self.fleet - 1)
        self.state.release_later(self, lease, reservation.tokens - used if self.capacity else 0.0,
                                 reservation.quota - used if reservation.quota else 0.0, reservation.seq)

    def pace(self, tokens: tuple[float, float] | None, requests: tuple[float, float] | None,
             seq: int = 0) -> None:
        """What the provider says is left (units, seconds until its reset): held fleet-wide in Redis."""
        self.local.pace(tokens, requests)          # what holds while Redis is away (its own calls: none)
        self.paced = self.paced or tokens is not None
        args = ["" if tokens is None else repr(tokens[0]), 0 if tokens is None else int(tokens[1] * 1000),
                "" if requests is None else repr(requests[0]), 0 if requests is None else int(requests[1] * 1000),
                seq]
        try:
            asyncio.get_running_loop()
        except RuntimeError:
            return
        self.state.conn.eval_soon(QUOTA, [self.quota_key], args, lambda res: self.kick(), lambda: None)


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
        from .usage import RedisUsageStore

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

    def release_later(self, gate: RedisGate, lease: str, delta: float, quota: float = 0.0, seq: int = 0) -> None:
        """Give back a lease (and settle tokens) without blocking: on this loop, else in the thread."""
        args = [lease, repr(delta), repr(gate.capacity), repr(gate.rate_ms), repr(quota), seq]
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
        from .budgets import RedisBudgets

        return RedisBudgets(self.conn, self.prefix, rules, clock)

    async def close(self) -> None:
        """Close this loop's connections and write what usage is still queued."""
        await self.conn.drain()
        await self.conn.aclose()


def _new_lease() -> str:
    """A slot lease's id, unique across the fleet (the process id keeps forked children apart)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:16]}"


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
