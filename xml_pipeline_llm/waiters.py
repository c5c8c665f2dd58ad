"""How a waiter of a limit sleeps and is woken: on its own event loop, from any thread.

Futures are made on the loop of the task that waits, and a waiter is woken on
that loop (``call_soon_threadsafe`` when the waker runs elsewhere), so one
limit serves any number of event loops at once.
"""

from __future__ import annotations

import asyncio


def resolve(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)


async def nap(loop: asyncio.AbstractEventLoop, fut: asyncio.Future[None], delay: float | None) -> None:
    """Wait until woken, or (the head of a queue, ``delay`` not None) until its turn is due."""
    handle = loop.call_later(max(0.0, delay), resolve, fut) if delay is not None else None
    try:
        await fut
    finally:
        if handle is not None:
            handle.cancel()


def wake(fut: asyncio.Future[None] | None) -> None:
    """Resolve ``fut`` on its own loop, from any thread (a closed loop's future is left alone)."""
    if fut is None or fut.done():
        return
    loop = fut.get_loop()
    try:
        running: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
    except RuntimeError:
        running = None
    if running is loop:
        fut.set_result(None)
    elif not loop.is_closed():
        try:
            loop.call_soon_threadsafe(resolve, fut)
        except RuntimeError:     # closed meanwhile: nobody waits there any more
            pass
