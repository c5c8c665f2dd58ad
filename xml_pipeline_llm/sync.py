"""``complete_sync()`` and ``stream_sync()``: the router from synchronous code.

    from xml_pipeline_llm import complete_sync, stream_sync
    response = complete_sync("grok-4.1", messages, agent_id="researcher")
    with stream_sync("claude-sonnet-4", messages) as s:
        for delta in s:
            print(delta, end="")
    print(s.response.usage)

The calls run on one event loop of the package's own, in a daemon thread
started on first use, so they work the same whether or not the calling thread
already runs an event loop (a script, a web framework's worker thread, a
Jupyter cell, LangChain's ``invoke``), and every synchronous caller of the
process shares that loop's connections.  The calling thread waits for the
answer; interrupting the wait (Ctrl-C) cancels the call, which gives back
its slot, tokens and budget reservation.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import Coroutine, Iterator
from typing import TYPE_CHECKING, Any, TypeVar

from . import get_router

if TYPE_CHECKING:
    from .response import LLMResponse
    from .router import LLMRouter
    from .streaming import LLMStream

T = TypeVar("T")

_loop: asyncio.AbstractEventLoop | None = None
_lock = threading.Lock()


def _runner() -> asyncio.AbstractEventLoop:
    """The package's own loop for synchronous callers, running in a daemon thread (started once)."""
    global _loop
    loop = _loop
    if loop is None or loop.is_closed():
        with _lock:
            if _loop is None or _loop.is_closed():
                _loop = asyncio.new_event_loop()
                threading.Thread(target=_loop.run_forever, name="xml-pipeline-llm-sync", daemon=True).start()
            loop = _loop
    return loop


def run(coro: Coroutine[Any, Any, T]) -> T:
    """Run ``coro`` on the package's loop and wait for its result in this thread."""
    future = asyncio.run_coroutine_threadsafe(coro, _runner())
    try:
        return future.result()
    except BaseException:
        future.cancel()      # interrupted (KeyboardInterrupt, ...): the call is cancelled and gives all back
        raise


def complete_sync(model: str, messages: list[dict[str, Any]], *, router: LLMRouter | None = None,
                  **kwargs: Any) -> LLMResponse:
    """``complete()`` for synchronous code: the same arguments, the same ``LLMResponse`` and errors."""
    r = router or get_router()
    return run(r.complete(model, messages, **kwargs))


def stream_sync(model: str, messages: list[dict[str, Any]], *, router: LLMRouter | None = None,
                **kwargs: Any) -> SyncStream:
    """``stream()`` for synchronous code: an iterator of text deltas whose ``.response`` is set at the end."""
    r = router or get_router()
    return SyncStream(r.stream(model, messages, **kwargs))


class SyncStream:
    """An iterator of text deltas over an ``LLMStream`` on the package's loop; ``response`` at the end.

    Leave it early with ``close()`` (or a ``with`` block): the provider stream
    is closed and what was used so far is recorded, as for ``stream()``.
    """

    def __init__(self, stream: LLMStream) -> None:
        self._stream = stream

    @property
    def response(self) -> LLMResponse | None:
        return self._stream.response

    def __iter__(self) -> Iterator[str]:
        return self

    def __next__(self) -> str:
        try:
            return run(self._stream.__anext__())
        except StopAsyncIteration:
            raise StopIteration from None

    def close(self) -> None:
        run(self._stream.aclose())

    def __enter__(self) -> SyncStream:
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
