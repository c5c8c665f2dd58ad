"""Per-backend limits: a token bucket for ``rate_limit_tpm``, a start window for
``rate_limit_rpm`` and exact concurrency slots.

Waiters are served in the fair order of ``fairness.py`` (priorities, then
fair shares by tokens across agents, then arrival order within an agent), and
the waiter at the head is never overtaken, so a large request cannot be starved
by a stream of small ones; ``max_concurrent`` is exact because a freed slot is
handed straight to the next waiter instead of being raced for.  The start
window of ``rate_limit_rpm`` is first come, first served among calls that already hold a slot.

Neither holds an asyncio primitive: futures are made on the loop of the task
that waits, and a waiter is woken on its own loop (``call_soon_threadsafe``
when the waker runs elsewhere), so one router serves any number of event
loops, one after another (``asyncio.run`` twice, pytest-asyncio's per-test
loops, Jupyter) or at once in several threads.  Their counts change under a
``threading.Lock``, so the limits stay exact across threads too.

Cancellation: a waiter that is cancelled (or timed out) gives back what it
was handed: a slot handed to it just as it was cancelled goes on to the next
waiter, and tokens it had taken go back into the bucket.

Requests per minute (``StartWindow``): a sliding-window log of
start times, at most ``rate_limit_rpm`` starts in any 60 s.  Not
``aiolimiter.AsyncLimiter``, the usual choice, for three reasons:
an ``AsyncLimiter`` belongs to one event loop (reused from another it warns
and drops that loop's waiters) and is not thread-safe, so a router serving
several loops would need one per loop, and N limiters each allowing the full
rate let N times the limit start; one limiter cannot serve several loops
without the cross-loop waking done here anyway.  Second, it is a leaky bucket:
a burst of ``rpm`` at once and then ``rpm / 60`` per second, so up to twice the
limit can start within one 60 s window, where the limit means "at most that many
in any 60 s"; the fleet-wide Redis limiter (a ZSET of start times in
``shared/scripts.py``) keeps exactly this window, and in memory the semantics
must be the same.  Third, waiters would not be served in arrival order across
loops.  The window here shares the token bucket's machinery (one lock,
futures on the waiter's own loop, ``wake``), so it is exact across threads and
loops, first-come first-served and cancellation-safe.

These are the in-memory implementations of the state interface in
``state.py``; a Redis implementation offers the same methods.
"""

from __future__ import annotations

import asyncio
import threading
import time
from dataclasses import dataclass

from .fairness import NO_TURN, FairQueue, Turn, Waiter
from .waiters import nap, wake
from .windows import Cap, StartWindow


@dataclass(frozen=True)
class Reservation:
    """What a gate's ``enter`` gave a try: the tokens taken from the bucket, and its slot's lease.

    ``lease`` names the slot held in Redis (None: a slot of this process).
    """

    tokens: float = 0.0
    lease: str | None = None
    quota: float = 0.0      # tokens taken from the provider's reported quota (``Cap``), 0: none
    seq: int = 0            # the call's number at its gate (the provider's readings name it)


NO_TOKENS = Reservation()


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

    def __init__(self, capacity: float, period: float = 60.0, aging: float = 30.0) -> None:
        self.capacity = float(capacity)
        self.rate = self.capacity / period
        self._tokens = self.capacity
        self._stamp = time.monotonic()
        self._waiters = FairQueue(aging)
        self._lock = threading.Lock()

    @property
    def tokens(self) -> float:
        """Tokens available now (negative after an over-charge)."""
        with self._lock:
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

    async def acquire(self, amount: float, turn: Turn = NO_TURN) -> float:
        """Take ``min(amount, capacity)`` tokens, waiting in fair order; returns what was taken."""
        amount = min(float(amount), self.capacity)
        me = Waiter(turn)
        with self._lock:
            if not self._waiters and self._try_take(amount):
                return amount
            self._waiters.push(me)
        loop = asyncio.get_running_loop()
        taken = False
        try:
            while True:
                with self._lock:
                    head = self._waiters.peek() is me
                    if head and self._try_take(amount):
                        taken = True
                        return amount
                    fut = me.fut = loop.create_future()
                    delay = (amount - self._tokens) / self.rate if head else None
                await nap(loop, fut, delay)
        finally:        # taken, cancelled or timed out: the next in line may go now
            with self._lock:
                (self._waiters.served if taken else self._waiters.remove)(me)
                nxt = self._waiters.peek()
            wake(nxt.fut if nxt else None)

    def min_wait(self, amount: float) -> float:
        """Seconds at least until ``amount`` tokens are there (0: now; waiters ahead add to it)."""
        with self._lock:
            self._refill()
            return max(0.0, (min(float(amount), self.capacity) - self._tokens) / self.rate)

    def settle(self, taken: float, used: float) -> None:
        """Refund ``taken - used`` (or charge the excess) once the real usage is known."""
        with self._lock:
            self._refill()
            self._tokens = min(self.capacity, self._tokens + taken - used)
            nxt = self._waiters.peek()
        wake(nxt.fut if nxt else None)


class Slots:
    """At most ``limit`` holders at once; waiters are served in arrival order.

    A released slot is handed directly to the oldest waiter, so no newcomer can
    slip in between and the count never exceeds ``limit``, not even by one.
    """

    def __init__(self, limit: int, aging: float = 30.0) -> None:
        self.limit = limit
        self.in_use = 0
        self._waiters = FairQueue(aging)
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def acquire(self, turn: Turn = NO_TURN) -> None:
        with self._lock:
            if self.in_use < self.limit and not self._waiters:
                self.in_use += 1
                return
            me = Waiter(turn)
            me.fut = asyncio.get_running_loop().create_future()
            self._waiters.push(me)
        try:
            await me.fut      # the releaser counted us in before waking us
        except BaseException:
            with self._lock:
                handed = me.granted
                if not handed:
                    self._waiters.remove(me)
            if handed:
                self.release()   # handed a slot just as we were cancelled: pass it on
            raise

    def release(self) -> None:
        """Give the slot to the oldest waiter whose loop still runs, or free it."""
        with self._lock:
            while True:
                w = self._waiters.pop()
                if w is None:
                    self.in_use -= 1
                    return
                assert w.fut is not None
                if not w.fut.get_loop().is_closed():
                    w.granted = True
                    break
        wake(w.fut)


class Gate:
    """A backend's limits together: its token bucket and start window (if any) and its slots.

    ``load`` is what least-loaded compares: calls in flight plus calls waiting
    for this backend, relative to ``max_concurrent``.
    ``has_capacity`` says whether a call could start now as far as
    ``rate_limit_rpm`` goes (the strategies prefer backends that can).
    """

    def __init__(self, max_concurrent: int, tpm: int | None, rpm: int | None = None,
                 aging: float = 30.0) -> None:
        self.slots = Slots(max_concurrent, aging)
        self.bucket = TokenBucket(tpm, aging=aging) if tpm else None
        self.window = StartWindow(rpm) if rpm else None
        self.token_cap = Cap()      # the provider's reported quota (``pacing.py``), until its reset
        self.request_cap = Cap()
        self.paced = False          # the provider has reported a token quota: calls count their tokens
        self._seq = 0               # calls numbered, for the provider's readings (``Cap``)
        self.queued = 0
        self._lock = threading.Lock()

    @property
    def has_capacity(self) -> bool:
        """False while ``rate_limit_rpm`` starts were made in the last 60 s (or others wait for one),
        or while the provider said no request is left until its reset."""
        return (self.window is None or self.window.has_room) and self.request_cap.has_room()

    @property
    def in_flight(self) -> int:
        return self.slots.in_use

    def min_wait(self, tokens: int) -> float:
        """Seconds at least before a call of ``tokens`` could start: the bucket's refill and the
        start window's next room (slots are freed by calls ending, which no clock predicts)."""
        wait = self.bucket.min_wait(tokens) if self.bucket is not None else 0.0
        wait = max(wait, self.token_cap.min_wait(tokens), self.request_cap.min_wait(1.0))
        return max(wait, self.window.min_wait()) if self.window is not None else wait

    def pace(self, tokens: tuple[float, float] | None, requests: tuple[float, float] | None,
             seq: int = 0) -> None:
        """What the provider says is left (units, seconds until its reset) of tokens and requests,
        in the answer to call ``seq`` (``Reservation.seq``)."""
        if tokens is not None:
            self.paced = True
            self.token_cap.limit(*tokens, seq)
        if requests is not None:
            self.request_cap.limit(*requests, seq)

    @property
    def load(self) -> float:
        return (self.slots.in_use + self.queued) / self.slots.limit

    async def enter(self, tokens: int, turn: Turn = NO_TURN) -> Reservation:
        """Wait for tokens, then for a slot (in fair order), then for a start; returns what was taken (for ``leave``).

        The start (``rate_limit_rpm``) comes last, with the slot held, so that it
        is recorded when the call really starts: a start taken before waiting for
        a slot would be counted too early, and the window would then let more
        than the limit start within 60 s.
        """
        with self._lock:
            self.queued += 1
        taken = 0.0
        quota = 0.0
        slot = False
        with self._lock:
            self._seq += 1
            seq = self._seq
        try:
            if self.bucket is not None:
                taken = await self.bucket.acquire(tokens, turn)
            await self.slots.acquire(turn)
            slot = True
            quota = await self.token_cap.acquire(seq, float(tokens))     # the provider's quota, if it holds
            await self.request_cap.acquire(seq, 1.0)
            if self.window is not None:
                await self.window.acquire()
        except BaseException:
            if slot:
                self.slots.release()
            if self.bucket is not None and taken:
                self.bucket.settle(taken, 0)
            self.token_cap.settle(seq, quota, 0)
            self.request_cap.settle(seq, 0.0, 0)
            raise
        finally:
            with self._lock:
                self.queued -= 1
        return Reservation(taken, None, quota, seq)

    def leave(self, reservation: Reservation, used: int) -> None:
        """Free the slot and settle the reservation against the tokens really used."""
        self.slots.release()
        if self.bucket is not None:
            self.bucket.settle(reservation.tokens, used)
        self.token_cap.settle(reservation.seq, reservation.quota, used)
        self.request_cap.settle(reservation.seq, 0.0, 0)
