"""``stream()``: text deltas as they arrive, then the whole response.

The stream is opened with the same tries as ``complete()`` (a 429 or 5xx
before the first byte fails over like any call).  The backend's concurrency
slot and token reservation are held until the stream ends, and usage is
recorded exactly once when it ends: read to the end, closed early with
``aclose()`` / ``async with``, or dropped and garbage-collected.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from . import _litellm
from .deadline import timeout_at
from .errors import EmptyStreamError, ProviderError, StreamCut, TryTimedOut
from .response import LLMResponse
from .usage import OK

if TYPE_CHECKING:
    from .lifecycle import OpenStream


class LLMStream:
    """Async iterator of text deltas; ``response`` is the final LLMResponse once it ends."""

    def __init__(self, open_stream: Callable[[], Awaitable[OpenStream]]) -> None:
        self._open_stream = open_stream
        self._opened: OpenStream | None = None
        self._chunks: list[Any] = []
        self._pending: list[Any] = []     # read ahead while opening, not yet given out
        self._text: list[str] = []
        self._done = False
        self.response: LLMResponse | None = None

    def __aiter__(self) -> LLMStream:
        return self

    async def __aenter__(self) -> LLMStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def __anext__(self) -> str:
        while True:
            delta = _delta_text(await self.next_chunk())
            if delta:
                return delta

    async def next_chunk(self) -> Any:
        """The provider's next chunk (LiteLLM's ``ModelResponseStream``, OpenAI's chunk form) rather than
        the next text delta: role, tool-call fragments and finish reasons included.  Raises
        ``StopAsyncIteration`` at the end; the accounting is the same as when reading text deltas."""
        if self._done:
            raise StopAsyncIteration
        if self._opened is None:
            self._opened = await self._open_stream()
            self._pending = list(self._opened.first)
        try:
            chunk = await self._next_chunk()
        except StopAsyncIteration:
            await self._finish(OK)
            await close_quietly(self._opened.wrapper)    # ended by the router (see _litellm.streams): still open
            raise
        except StreamCut as cut:     # no chunk in time: cut, charged what came, slot back at once
            await self._finish("error:deadline" if cut.why == "deadline" else "error:timeout")
            await close_quietly(self._opened.wrapper)
            raise self._opened.try_.cut_error(cut.why) from None
        except Exception as exc:
            await self._finish("error:stream")
            t = self._opened.try_
            raise ProviderError(f"{t.req.model}: the stream from {t.backend.name} broke: {exc}",
                                status_code=getattr(exc, "status_code", None)) from exc
        self._chunks.append(chunk)
        delta = _delta_text(chunk)
        if delta:
            self._text.append(delta)
        return chunk

    @property
    def backend(self) -> str:
        """The backend serving the stream once it is open ("" before)."""
        return self._opened.try_.backend.name if self._opened is not None else ""

    @property
    def attempts(self) -> int:
        """Provider calls made to open the stream, this one included (0 before it is open)."""
        return len(self._opened.try_.req.attempts) + 1 if self._opened is not None else 0

    async def _next_chunk(self) -> Any:
        assert self._opened is not None
        if self._pending:
            return self._pending.pop(0)
        if self._opened.ended:
            raise StopAsyncIteration
        t = self._opened.try_
        when, why = t.next_chunk_by()
        started = time.monotonic()
        try:
            async with timeout_at(when) as bound:
                return await self._opened.wrapper.__anext__()
        except _litellm.ProviderEnded:          # the provider's stream is over: its last chunks
            self._opened.ended = True
            self._pending = _litellm.ending(self._opened.wrapper)
            return self._pending.pop(0)
        except TimeoutError:
            if not bound.expired():
                raise
            raise StreamCut(why) from None
        finally:
            t.waited += time.monotonic() - started

    async def aclose(self) -> None:
        """Stop reading: closes the provider stream and records what was used so far."""
        if self._opened is None or self._done:
            self._done = True
            return
        await self._finish(OK)
        await close_quietly(self._opened.wrapper)

    def __del__(self) -> None:
        if self._opened is not None and not self._done:
            try:
                event = self._settle(OK)
                if event is not None:
                    self._opened.try_.services.ledger.record_nowait(event)
            except Exception:
                pass

    async def _finish(self, outcome: str) -> None:
        event = self._settle(outcome)
        if event is not None:
            assert self._opened is not None
            await self._opened.try_.services.ledger.record(event)

    def _settle(self, outcome: str) -> Any:
        """Build the response and end the try (release, settle); its usage event (once)."""
        if self._done or self._opened is None:
            return None
        self._done = True
        t = self._opened.try_
        self.response = self._build_response(t.latency_ms)
        return t.finish(self.response, outcome, _stream_call_id(self._opened.wrapper))

    def _build_response(self, latency: float) -> LLMResponse:
        """The final response: the usage the provider reported last (cache and reasoning details
        included), priced like ``complete()`` prices the same answer."""
        assert self._opened is not None
        t = self._opened.try_
        req, backend = t.req, t.backend
        last = next((c for c in reversed(self._chunks)
                     if getattr(c, "usage", None) and _litellm.usage_of(c)["total_tokens"]), None)
        if last is not None:
            usage = _litellm.usage_of(last)
        else:   # abandoned before the provider reported usage: count what we got
            prompt = req.prompt_estimate()
            completion = _litellm.text_tokens(req.model, "".join(self._text))
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion, "cached_tokens": 0, "cache_write_tokens": 0,
                     "reasoning_tokens": 0}
        cost = t.services.pricing.cost(req.model, backend.provider.litellm_prefix,
                                       last.usage if last is not None else usage)
        finish = next((c.choices[0].finish_reason for c in reversed(self._chunks)
                       if getattr(c, "choices", None) and c.choices[0].finish_reason), "")
        model = _litellm.strip_route(next((c.model for c in self._chunks if getattr(c, "model", None)),
                                          req.model))
        return LLMResponse(content="".join(self._text), model=model, usage=usage,
                           finish_reason=finish or "", raw=self._chunks, backend=backend.name,
                           cost_usd=cost, latency_ms=latency, tool_calls=_tool_calls(self._chunks),
                           attempts=len(req.attempts) + 1)


async def close_quietly(wrapper: Any) -> None:
    """Close LiteLLM's stream wrapper, ignoring what a broken stream raises on close."""
    close = getattr(wrapper, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


async def first_chunks(wrapper: Any, idle: float) -> tuple[list[Any], bool]:
    """Read a new stream up to its first content; returns the chunks and whether it ended.

    LiteLLM turns some malformed stream bodies into one empty chunk and a
    normal end; an empty stream is therefore treated as a failed try.  A chunk
    that takes longer than ``idle`` seconds fails the try as a timeout.
    """
    chunks: list[Any] = []
    while True:
        try:
            async with asyncio.timeout(idle) as bound:
                chunk = await wrapper.__anext__()
        except TimeoutError:
            if not bound.expired():
                raise
            raise TryTimedOut(f"no chunk for {idle:g}s (stream_idle_timeout)") from None
        except (StopAsyncIteration, _litellm.ProviderEnded) as end:
            if isinstance(end, _litellm.ProviderEnded):
                chunks.extend(_litellm.ending(wrapper))
            if not any(_delta_text(c) or _has_tool_call(c) for c in chunks):
                raise EmptyStreamError("the stream ended without any content") from None
            return chunks, True
        chunks.append(chunk)
        if _delta_text(chunk) or _has_tool_call(chunk):
            return chunks, False


def _has_tool_call(chunk: Any) -> bool:
    choices = getattr(chunk, "choices", None)
    delta = getattr(choices[0], "delta", None) if choices else None
    return bool(getattr(delta, "tool_calls", None))


def _delta_text(chunk: Any) -> str:
    choices = getattr(chunk, "choices", None)
    if not choices:
        return ""
    delta = getattr(choices[0], "delta", None)
    return (getattr(delta, "content", None) or "") if delta is not None else ""


def _tool_calls(chunks: list[Any]) -> list[dict[str, Any]]:
    """Assemble streamed tool-call fragments into OpenAI-form tool calls."""
    calls: dict[int, dict[str, Any]] = {}
    for chunk in chunks:
        for choice in getattr(chunk, "choices", None) or []:
            for tc in getattr(getattr(choice, "delta", None), "tool_calls", None) or []:
                slot = calls.setdefault(getattr(tc, "index", 0) or 0,
                                        {"id": None, "type": "function",
                                         "function": {"name": "", "arguments": ""}})
                slot["id"] = slot["id"] or getattr(tc, "id", None)
                fn = getattr(tc, "function", None)
                if fn is not None:
                    slot["function"]["name"] += getattr(fn, "name", None) or ""
                    slot["function"]["arguments"] += getattr(fn, "arguments", None) or ""
    return [calls[i] for i in sorted(calls)]


def _stream_call_id(wrapper: Any) -> str:
    logging_obj = getattr(wrapper, "logging_obj", None)
    return str(getattr(logging_obj, "litellm_call_id", "") or "")
