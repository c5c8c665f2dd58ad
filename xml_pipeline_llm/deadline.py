"""How long a request may still take: its deadline, kept by the package's own clock.

    deadline = Deadline(30.0)                 # deadline= of the call, else llm.deadline (None: none)
    async with deadline.bound():              # the request's waits and tries, all together
        ...
    deadline.refuse_if(wait, "the cooldown of xai-main")   # a wait that cannot end in time: refused now

Every bound here is an ``asyncio`` timeout on the running loop, not a
setting handed to LiteLLM or its HTTP client, so no provider or library can
hold a call past it.  Times are ``time.monotonic()`` seconds; ``at(...)``
turns one into the running loop's clock.
"""

from __future__ import annotations

import asyncio
import time
from typing import Any

from .errors import DeadlineExceededError


def loop_time(when: float | None) -> float | None:
    """A ``time.monotonic()`` instant on the running loop's clock (what ``asyncio.timeout_at`` takes)."""
    if when is None:
        return None
    return asyncio.get_running_loop().time() + (when - time.monotonic())


def timeout_at(when: float | None) -> asyncio.Timeout:
    """``asyncio.timeout_at`` for a ``time.monotonic()`` instant (None: no bound)."""
    return asyncio.timeout_at(loop_time(when))


class Deadline:
    """A request's allowance in seconds from its start (``seconds`` None: no deadline).

    ``waiting_for`` says what the request is doing now (set by whoever makes it
    wait), so that the error names it.
    """

    __slots__ = ("seconds", "at", "waiting_for")

    def __init__(self, seconds: float | None) -> None:
        self.seconds = seconds
        self.at = None if seconds is None else time.monotonic() + seconds
        self.waiting_for = "the request to start"

    def left(self) -> float | None:
        """Seconds left (never below 0); None without a deadline."""
        return None if self.at is None else max(0.0, self.at - time.monotonic())

    def expired(self) -> bool:
        return self.at is not None and time.monotonic() >= self.at

    def bound(self) -> asyncio.Timeout:
        """A timeout for what runs inside it; ``error()`` is what to raise when it fired."""
        return timeout_at(self.at)

    def error(self, name: str, attempts: Any = None, why: str = "") -> DeadlineExceededError:
        """The error of a request whose deadline passed (or cannot be met: ``why``)."""
        assert self.seconds is not None
        what = why or f"it passed while waiting for {self.waiting_for}"
        return DeadlineExceededError(
            f"{name}: the request's deadline of {self.seconds:g}s {'cannot be met: ' if why else ''}{what}; "
            f"nothing of it is left in flight or reserved. Raise deadline= (or llm.deadline), or lower the load",
            attempts, deadline=self.seconds, waiting_for=self.waiting_for)

    def refuse_if(self, wait: float, what: str, name: str, attempts: Any = None) -> None:
        """Raise at once when a wait of ``wait`` seconds for ``what`` cannot end before the deadline."""
        self.waiting_for = what
        left = self.left()
        if left is not None and wait > left:
            raise self.error(name, attempts, f"waiting {wait:.1f}s for {what} would end after the "
                                             f"{left:.1f}s left")


NO_DEADLINE = Deadline(None)
