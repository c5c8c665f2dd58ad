"""A stream's end, without LiteLLM's end-of-stream work.

When the provider's stream ends, LiteLLM's stream wrapper spends its next
reads assembling the whole response (``stream_chunk_builder``, in a thread,
twice), pricing it several times, deep-copying it for its cache and running
its success callbacks: about 7 ms of CPU, half of a short stream, here.  The
router needs none of it, since it prices and records the usage itself.

``tap`` puts a pass-through in front of the provider's stream, inside the
wrapper.  When that stream ends cleanly, having sent a finish reason and its
usage, the pass-through raises ``ProviderEnded`` instead of
``StopAsyncIteration``.  ``ProviderEnded`` is a ``BaseException``, like a
cancellation, so it goes through LiteLLM's wrapper untouched and reaches the
reader.  ``ending`` then gives the two chunks LiteLLM would have handed out:
its finish-reason chunk, and a usage chunk.  The usage is totalled by
LiteLLM's own per-chunk totalling, the one ``stream_chunk_builder`` uses, so
Anthropic's split input and output counts and the cache counts come out the
same.

Any other end (no finish reason, no usage reported, an error) goes on to
LiteLLM's usual handling: it reports it, or counts the tokens.  So does every
stream while LiteLLM has success callbacks other than the package's own (a
user's ``litellm.callbacks`` or ``litellm.success_callback``): those are run
for a stream only at its end, and they must see it.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from .load import load, only_ours


class ProviderEnded(BaseException):  # noqa: N818 (a signal, like StopAsyncIteration; not an error)
    """The provider's stream ended with a finish reason and usage; read the end with ``ending``."""


def tap(wrapper: Any) -> None:
    """Put the pass-through in front of a new stream wrapper's provider stream (now, or when it is fetched).

    Not when LiteLLM has success callbacks of anyone else's: they run at the stream's end.
    """
    if not only_ours(load()):
        return
    stream = getattr(wrapper, "completion_stream", None)
    if stream is not None:
        wrapper.completion_stream = _Tap(stream, wrapper)
        return
    make_call = getattr(wrapper, "make_call", None)
    if callable(make_call):            # the stream is opened on the first read (Anthropic, for one)
        async def tapped(*args: Any, **kwargs: Any) -> Any:
            return _Tap(await make_call(*args, **kwargs), wrapper)
        wrapper.make_call = tapped


def ending(wrapper: Any) -> list[Any]:
    """After ``ProviderEnded``: LiteLLM's finish-reason chunk (unless it gave it already), then a usage chunk."""
    load()
    from litellm.litellm_core_utils.streaming_chunk_builder_utils import ChunkProcessor

    # LiteLLM hands out the finish reason when the stream ends, unless it already has (tool calls)
    done = getattr(wrapper, "sent_last_chunk", False) is True
    finish = [] if done else [wrapper.finish_reason_handler()]
    processor = ChunkProcessor(list(wrapper.chunks), None)
    usage = processor.calculate_usage(chunks=processor.chunks, model=str(getattr(wrapper, "model", "") or ""),
                                      completion_output=str(getattr(wrapper, "response_uptil_now", "") or ""))
    last = wrapper.model_response_creator()
    last.choices = []
    last.usage = usage
    return [*finish, last]


def _ends_cleanly(wrapper: Any) -> bool:
    """Whether the provider sent a finish reason and reported usage (what ``ending`` needs)."""
    finished = (getattr(wrapper, "received_finish_reason", None) is not None
                or getattr(wrapper, "intermittent_finish_reason", None) is not None)
    return finished and any(getattr(c, "usage", None) is not None for c in getattr(wrapper, "chunks", ()))


class _Tap:
    """The provider's stream as LiteLLM reads it, with a clean end raised as ``ProviderEnded``."""

    def __init__(self, stream: Any, wrapper: Any) -> None:
        self._stream = stream
        self._wrapper = wrapper
        self._it: AsyncIterator[Any] | None = None

    def __aiter__(self) -> _Tap:
        return self

    async def __anext__(self) -> Any:
        if self._it is None:
            self._it = self._stream.__aiter__()
        try:
            return await self._it.__anext__()
        except StopAsyncIteration:
            if _ends_cleanly(self._wrapper):
                raise ProviderEnded from None
            raise

    async def aclose(self) -> None:
        close = getattr(self._stream, "aclose", None) or getattr(self._stream, "close", None)
        if close is not None:
            result = close()
            if result is not None:
                await result

    def __getattr__(self, name: str) -> Any:        # anything else LiteLLM reads off the provider's stream
        return getattr(self._stream, name)
