"""``on_usage`` listeners: callbacks called with every counted event, their failures contained."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from .events import UsageEvent

log = logging.getLogger("xml_pipeline_llm")


Listener = Callable[[UsageEvent], Any]
_REPORT_EVERY = 60.0    # seconds between log lines about one failing on_usage callback


@dataclass(eq=False)
class _Subscriber:
    callback: Listener
    loop: asyncio.AbstractEventLoop | None      # running where on_usage was called (async callbacks)
    reported_at: float = float("-inf")
    suppressed: int = 0


class Listeners:
    """``on_usage`` callbacks, called with every event once it is counted.

    A callback's exception (or its coroutine's) is contained: logged at most once a
    minute per callback and never seen by the call or the other callbacks.  A
    callback that returns an awaitable (a coroutine function) has it scheduled on
    the loop running where the event is recorded; an event recorded outside any
    loop (a stream garbage-collected in a plain thread) goes to the loop that was
    running where ``on_usage`` was called, if it still runs, else the callback
    skips it with a WARNING (at most once a minute).
    """

    def __init__(self) -> None:
        self._subs: tuple[_Subscriber, ...] = ()
        self._lock = threading.Lock()
        self._tasks: set[Any] = set()

    def __bool__(self) -> bool:
        return bool(self._subs)

    def add(self, callback: Listener) -> Callable[[], None]:
        """Call ``callback(event)`` for every event from now on; returns a function that stops it."""
        if not callable(callback):
            raise TypeError(f"on_usage: expected a function taking a UsageEvent, got {type(callback).__name__}")
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        sub = _Subscriber(callback, loop)
        with self._lock:
            self._subs = (*self._subs, sub)

        def unsubscribe() -> None:
            with self._lock:
                self._subs = tuple(s for s in self._subs if s is not sub)

        return unsubscribe

    def notify(self, event: UsageEvent) -> None:
        for sub in self._subs:
            try:
                result = sub.callback(event)
                if inspect.isawaitable(result):
                    self._schedule(sub, result)
            except Exception as exc:
                self._report(sub, exc)

    def _schedule(self, sub: _Subscriber, awaitable: Any) -> None:
        try:
            loop: asyncio.AbstractEventLoop | None = asyncio.get_running_loop()
        except RuntimeError:
            loop = None
        if loop is not None:
            task = asyncio.ensure_future(awaitable)
            self._tasks.add(task)
            task.add_done_callback(lambda t: self._done(sub, t))
        elif sub.loop is not None and sub.loop.is_running():
            fut = asyncio.run_coroutine_threadsafe(awaitable, sub.loop)
            fut.add_done_callback(lambda f: self._done(sub, f))
        else:
            if inspect.iscoroutine(awaitable):
                awaitable.close()
            self._report(sub, None)

    def _done(self, sub: _Subscriber, fut: Any) -> None:
        self._tasks.discard(fut)
        if not fut.cancelled() and fut.exception() is not None:
            self._report(sub, fut.exception())

    def _report(self, sub: _Subscriber, exc: BaseException | None) -> None:
        now = time.monotonic()
        if now - sub.reported_at < _REPORT_EVERY:
            sub.suppressed += 1
            return
        sub.reported_at, suppressed, sub.suppressed = now, sub.suppressed, 0
        name = getattr(sub.callback, "__qualname__", None) or repr(sub.callback)
        more = f" ({suppressed} more since the last report)" if suppressed else ""
        if exc is None:
            log.warning("on_usage callback %s: an event was recorded outside any running event loop and "
                        "the loop it was registered on is gone, so this coroutine callback skipped it%s; "
                        "register a plain function to see every event", name, more)
            return
        log.error("on_usage callback %s raised %s: %s%s; the call and the other callbacks are not affected "
                  "(logged at most once a minute)", name, type(exc).__name__, exc, more,
                  exc_info=(type(exc), exc, exc.__traceback__))
