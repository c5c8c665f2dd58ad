"""Requests per minute and provider quotas: a sliding window of starts, and a cap until a time.

``StartWindow`` holds ``rate_limit_rpm``: at most that many starts in any 60 s.
``Cap`` holds what the provider's rate-limit headers say is left until their
reset (``pacing.py`` reads them).  ``limits.Gate`` uses both.
"""

from __future__ import annotations

import asyncio
import threading
import time
from collections import deque

from .fairness import NO_TURN, Waiter
from .waiters import nap, wake


class StartWindow:
    """At most ``limit`` starts in any ``period`` seconds: a sliding-window log of start times.

    ``acquire()`` records a start now, or waits (first-come first-served) until
    the oldest start in the window is ``period`` seconds old.  A start is never
    given back: every provider call counts, whatever its outcome.
    """

    def __init__(self, limit: int, period: float = 60.0) -> None:
        self.limit = limit
        self.period = float(period)
        self._starts: deque[float] = deque()
        self._waiters: deque[Waiter] = deque()
        self._lock = threading.Lock()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    @property
    def started(self) -> int:
        """Starts within the last ``period`` seconds."""
        with self._lock:
            self._expire(time.monotonic())
            return len(self._starts)

    @property
    def has_room(self) -> bool:
        """Whether a start could be made now without waiting."""
        with self._lock:
            self._expire(time.monotonic())
            return not self._waiters and len(self._starts) < self.limit

    def min_wait(self) -> float:
        """Seconds at least until a newcomer could start (after the waiters ahead of it)."""
        with self._lock:
            now = time.monotonic()
            self._expire(now)
            j = len(self._starts) + len(self._waiters) - self.limit    # starts that must expire first, -1
            if j < 0:
                return 0.0
            return self._starts[j] + self.period - now if j < len(self._starts) else self.period

    def _expire(self, now: float) -> None:
        edge = now - self.period
        while self._starts and self._starts[0] <= edge:
            self._starts.popleft()

    def _try_start(self) -> bool:
        now = time.monotonic()
        self._expire(now)
        if len(self._starts) < self.limit:
            self._starts.append(now)
            return True
        return False

    async def acquire(self) -> None:
        """Record one start, waiting in arrival order while the window is full."""
        me = Waiter(NO_TURN)
        with self._lock:
            if not self._waiters and self._try_start():
                return
            self._waiters.append(me)
        loop = asyncio.get_running_loop()
        try:
            while True:
                with self._lock:
                    head = self._waiters[0] is me
                    if head and self._try_start():
                        return
                    fut = me.fut = loop.create_future()
                    delay = self._starts[0] + self.period - time.monotonic() if head else None
                await nap(loop, fut, delay)
        finally:        # started, cancelled or timed out: the next in line may go now
            with self._lock:
                self._waiters.remove(me)
                nxt = self._waiters[0].fut if self._waiters else None
            wake(nxt)


class Cap:
    """What the provider says is left until a time: ``left`` units until ``until`` (``time.monotonic()``).

    Every call of the backend is numbered by its gate (``seq``) and counted
    here while it runs.  ``limit(left, seconds, seq)`` applies the reading that
    came with the answer to call ``seq`` (``pacing.py``): the calls started
    after that one are not in the provider's figure yet, so what they take is
    deducted from it.  A first reading, or one after the last reset, sets the
    cap; a newer reading before the reset can only lower what is left (the later
    reset holds), and when it shows that others sharing the quota took some since
    the last one, twice as much again is held back for what they take meanwhile.
    Once the reset has passed the cap is lifted until the next reading.
    ``acquire`` takes units while the cap holds, waiting while too few are left
    (until the reset, or until units come back); ``settle`` gives back what a
    call did not use, unless a lower reading has counted it since, as the
    provider saw it.
    """

    def __init__(self) -> None:
        self.left = 0.0
        self.until = 0.0
        self.counted = 0        # the calls up to this number are in the provider's last figure
        self._running: dict[int, float] = {}    # calls running: seq -> units
        self._futs: list[asyncio.Future[None]] = []
        self._lock = threading.Lock()

    def active(self, now: float | None = None) -> bool:
        return self.until > (time.monotonic() if now is None else now)

    def limit(self, left: float, seconds: float, seq: int = 0) -> None:
        """Hold to ``left`` units for ``seconds`` (the reading that came with call ``seq``)."""
        now = time.monotonic()
        until = now + max(0.0, seconds)
        if until <= now:
            return
        with self._lock:
            left = max(0.0, left - sum(u for q, u in self._running.items() if q > seq))
            if not self.active(now):
                self.left, self.until, self.counted = left, until, seq
            elif left < self.left:      # a newer reading only lowers what is left
                # others took ``self.left - left`` since the last reading: twice as much again is held
                # back, for what they take before the next one reaches the provider
                left = max(0.0, 3 * left - 2 * self.left)
                self.left, self.until, self.counted = left, max(self.until, until), max(self.counted, seq)
            futs, self._futs = self._futs, []
        for fut in futs:
            wake(fut)

    def min_wait(self, amount: float) -> float:
        """Seconds at least until ``amount`` units could be taken (0: now, or no cap)."""
        with self._lock:
            now = time.monotonic()
            return self.until - now if self.active(now) and self.left < amount else 0.0

    def has_room(self, amount: float = 1.0) -> bool:
        return self.min_wait(amount) == 0.0

    async def acquire(self, seq: int, amount: float) -> float:
        """Count call ``seq`` of ``amount`` units, taking them while the cap holds (waiting while too
        few are left); what was taken from the cap, for ``settle``."""
        loop = asyncio.get_running_loop()
        while True:
            with self._lock:
                now = time.monotonic()
                if not self.active(now) or self.left >= amount:
                    self._running[seq] = amount
                    if not self.active(now):
                        return 0.0
                    self.left -= amount
                    return amount
                fut = loop.create_future()
                self._futs.append(fut)
                delay = self.until - now
            try:
                await nap(loop, fut, delay)
            finally:
                with self._lock:
                    if fut in self._futs:
                        self._futs.remove(fut)

    def settle(self, seq: int, taken: float, used: float) -> None:
        """Call ``seq`` ended having used ``used`` units: give back ``taken - used`` (or charge the
        excess) unless the provider's figure counted it since."""
        with self._lock:
            self._running.pop(seq, None)
            if not taken or seq <= self.counted or not self.active():
                return
            self.left = max(0.0, self.left + taken - used)
            futs, self._futs = self._futs, []
        for fut in futs:
            wake(fut)
