"""Per-backend limits: a token bucket for ``rate_limit_tpm`` and exact concurrency slots.

Both are strictly first-come first-served: a waiter is never overtaken, so a
large request cannot be starved by a stream of small ones, and ``max_concurrent``
is exact because a freed slot is handed straight to the next waiter instead of
being raced for (contract C6).

Neither holds an asyncio primitive: futures are made on the loop of the task
that waits, so one router serves any number of event loops one after another
(``asyncio.run`` twice, pytest-asyncio's per-test loops, Jupyter).

These are the in-memory implementations of the state interface in
``state.py``; a Redis implementation offers the same methods.
"""

from __future__ import annotations

import asyncio
import time
from collections import deque


def _wake(fut: asyncio.Future[None] | None) -> None:
    if fut is not None and not fut.done():
        fut.set_result(None)


class TokenBucket:
    """A token bucket of ``capacity`` tokens refilled at ``capacity / period`` per second.

    ``acquire(n)`` takes ``min(n, capacity)`` tokens, waiting in arrival order
    until they are there; a request larger than the bucket waits for a full
    bucket.  ``settle(taken, used)`` then refunds or charges the difference
    against what the call really used; a charge can take the level below zero,
    which later callers pay for by waiting.  The bucket starts full.

    Why not aiolimiter: it cannot refund or charge after the fact, it serves
    the smallest waiter first (starving large requests), and refuses amounts
    above its capacity.
    """

    def __init__(self, capacity: float, period: float = 60.0) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / period
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._waiters: deque[list[asyncio.Future[None] | None]] = deque()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative after an over-charge)."""
        self._refill()
        return self._tokens

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def _refill(self) -> None:
        now = time.monotonic()
        self._tokens = min(self.capacity, self._tokens + (now - self._stamp) * self.rate)
        self._stamp = now

    def _try_take(self, amount: float) -> bool:
        self._refill()
        if self._tokens >= amount:
            self._tokens -= amount
            return True
        return False

    async def acquire(self, amount: float) -> float:
        """Take ``min(amount, capacity)`` tokens, waiting first-come first-served; returns what was taken."""
        amount = min(float(amount), self.capacity)
        if not self._waiters and self._try_take(amount):
            return amount
        slot: list[asyncio.Future[None] | None] = [None]
        self._waiters.append(slot)
        try:
            while not (self._waiters[0] is slot and self._try_take(amount)):
                await self._sleep(slot, amount)
        finally:
            self._waiters.remove(slot)
            if self._waiters:
                _wake(self._waiters[0][0])
        return amount

    async def _sleep(self, slot: list[asyncio.Future[None] | None], amount: float) -> None:
        """Wait to be woken; the head of the queue also wakes itself when its tokens are due."""
        loop = asyncio.get_running_loop()
        fut = slot[0] = loop.create_future()
        handle = None
        if self._waiters[0] is slot:
            handle = loop.call_later(max(0.0, (amount - self._tokens) / self.rate), _wake, fut)
        try:
            await fut
        finally:
            if handle is not None:
                handle.cancel()

    def settle(self, taken: float, used: float) -> None:
        """Refund ``taken - used`` (or charge the excess) once the real usage is known."""
        self._refill()
        self._tokens = min(self.capacity, self._tokens + taken - used)
        if self._waiters:
            _wake(self._waiters[0][0])


class Slots:
    """At most ``limit`` holders at once; waiters are served in arrival order.

    A released slot is handed directly to the oldest waiter, so no newcomer can
    slip in between and the count never exceeds ``limit``, not even by one.
    """

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self) -> None:
        if self.in_use < self.limit and not self._waiters:
            self.in_use += 1
            return
        fut = asyncio.get_running_loop().create_future()
        self._waiters.append(fut)
        try:
            await fut      # the releaser counted us in before waking us
        except BaseException:
            if fut.done() and not fut.cancelled():
                self.release()   # handed a slot just as we were cancelled: pass it on
            else:
                self._waiters.remove(fut)
            raise

    def release(self) -> None:
        """Give the slot to the oldest live waiter, or free it."""
        while self._waiters:
            fut = self._waiters.popleft()
            if not fut.done() and not fut.get_loop().is_closed():
                fut.set_result(None)
                return
        self.in_use -= 1


class Gate:
    """A backend's limits together: its token bucket (if any) and its slots.

    ``load`` is what least-loaded compares: calls in flight plus calls waiting
    for this backend, relative to ``max_concurrent`` (contract C4, C6).
    """

    def __init__(self, max_concurrent: int, tpm: int | None) -> None:
        self.slots = Slots(max_concurrent)
        self.bucket = TokenBucket(tpm) if tpm else None
        self.queued = 0

    @property
    def in_flight(self) -> int:
        return self.slots.in_use

    @property
    def load(self) -> float:
        return (self.slots.in_use + self.queued) / self.slots.limit

    async def enter(self, tokens: int) -> float:
        """Wait for tokens, then for a slot; returns the tokens taken (to settle later)."""
        self.queued += 1
        taken = 0.0
        try:
            if self.bucket is not None:
                taken = await self.bucket.acquire(tokens)
            await self.slots.acquire()
        except BaseException:
            if self.bucket is not None and taken:
                self.bucket.settle(taken, 0)
            raise
        finally:
            self.queued -= 1
        return taken

    def leave(self, taken: float, used: int) -> None:
        """Free the slot and settle the reservation against the tokens really used."""
        self.slots.release()
        if self.bucket is not None:
            self.bucket.settle(taken, used)
