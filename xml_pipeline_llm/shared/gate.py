"""One backend's limits shared through Redis: ``RedisGate`` (slots, token bucket, start window).

Admission is one script, ``ENTER``: the slot, the tokens and the start are taken
together or not at all, and the answer brings the backend's cooldown.  This
process's waiters queue in the fair order of ``fairness.py``; the first of them
polls Redis (see ``state.py`` for the whole picture).
"""


from __future__ import annotations

import asyncio
import os
import random
import threading
import time
import uuid
from typing import TYPE_CHECKING, Any, NamedTuple

from ..fairness import NO_TURN, FairQueue, Turn, Waiter
from ..limits import Reservation
from ..waiters import wake as _wake
from .connection import RedisDown
from .scripts import ENTER, QUOTA

if TYPE_CHECKING:
    from .state import RedisState

CLAIM_TTL_MS = 2000          # a waiting request's claim on a bucket, renewed while it waits
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
            lease = new_lease()
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
                lease = new_lease()
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
        """What the provider says is left (units, seconds until its reset) in the answer to call
        ``seq``: held fleet-wide in Redis (``scripts.QUOTA``)."""
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


def new_lease() -> str:
    """A slot lease's id, unique across the fleet (the process id keeps forked children apart)."""
    return f"{os.getpid()}-{uuid.uuid4().hex[:16]}"

