"""``stream()``: text deltas as they arrive, then the whole response.

The stream is opened with the same tries as ``complete()`` (a 429 or 5xx
before the first byte fails over like any call).  The backend's concurrency
slot and token reservation are held until the stream ends, and usage is
recorded exactly once when it ends: read to the end, closed early with
``aclose()`` / ``async with``, or dropped and garbage-collected.
"""

from __future__ import annotations

import time
from typing import TYPE_CHECKING, Any

from . import _litellm
from .errors import ProviderError
from .response import LLMResponse

if TYPE_CHECKING:
    from .config import ResolvedBackend
    from .options import CallOptions
    from .router import LLMRouter, Request


class LLMStream:
    """Async iterator of text deltas; ``response`` is the final LLMResponse once it ends."""

    def __init__(self, router: LLMRouter, model: str, messages: list[dict[str, Any]],
                 agent_id: str | None, thread_id: str | None, metadata: dict[str, Any] | None,
                 kwargs: dict[str, Any], options: CallOptions) -> None:
        self._router = router
        self._args = (model, messages, agent_id, thread_id, metadata, kwargs, options)
        self._req: Request | None = None
        self._backend: ResolvedBackend | None = None
        self._wrapper: Any = None
        self._taken = 0.0
        self._start = 0.0
        self._chunks: list[Any] = []
        self._pending: list[Any] = []     # read ahead while opening, not yet given out
        self._ended = False
        self._text: list[str] = []
        self._done = False
        self.response: LLMResponse | None = None

    def __aiter__(self) -> LLMStream:
        return self

    async def __aenter__(self) -> LLMStream:
        return self

    async def __aexit__(self, *exc: object) -> None:
        await self.aclose()

    async def _open(self) -> None:
        self._req = await self._router._request(*self._args)
        (self._backend, self._wrapper, self._pending, self._ended, self._taken,
         self._start) = await self._router._open_stream(self._req)

    async def __anext__(self) -> str:
        if self._done:
            raise StopAsyncIteration
        if self._wrapper is None:
            await self._open()
        while True:
            try:
                chunk = await self._next_chunk()
            except StopAsyncIteration:
                await self._finish("ok")
                raise
            except Exception as exc:
                await self._finish("error:stream")
                raise ProviderError(f"{self._req.model if self._req else ''}: the stream from "
                                    f"{self._backend.name if self._backend else '?'} broke: {exc}",
                                    status_code=getattr(exc, "status_code", None)) from exc
            self._chunks.append(chunk)
            delta = _delta_text(chunk)
            if delta:
                self._text.append(delta)
                return delta

    async def _next_chunk(self) -> Any:
        if self._pending:
            return self._pending.pop(0)
        if self._ended:
            raise StopAsyncIteration
        return await self._wrapper.__anext__()

    async def aclose(self) -> None:
        """Stop reading: closes the provider stream and records what was used so far."""
        if self._wrapper is None or self._done:
            self._done = True
            return
        close = getattr(self._wrapper, "aclose", None)
        await self._finish("ok")
        if close is not None:
            try:
                await close()
            except Exception:
                pass

    def __del__(self) -> None:
        if self._wrapper is not None and not self._done and self._router is not None:
            try:
                self._settle("ok", wait=False)
            except Exception:
                pass

    async def _finish(self, outcome: str) -> None:
        event = self._settle(outcome, wait=True)
        if event is not None:
            await self._router._ledger.record(event)

    def _settle(self, outcome: str, wait: bool) -> Any:
        """Build the response, free the gate and make the usage event (once)."""
        if self._done:
            return None
        self._done = True
        assert self._req is not None and self._backend is not None
        latency = (time.perf_counter() - self._start) * 1000
        resp = self._build_response(latency)
        self.response = resp
        self._router.gate(self._backend.name).leave(self._taken, resp.usage["total_tokens"])
        event = self._router._event(self._req, self._backend, resp.usage, resp.cost_usd, latency,
                                    outcome, _stream_call_id(self._wrapper))
        if not wait:
            self._router._ledger.record_nowait(event)
            return None
        return event

    def _build_response(self, latency: float) -> LLMResponse:
        req, backend = self._req, self._backend
        assert req is not None and backend is not None
        usage = next((_litellm.usage_of(c) for c in reversed(self._chunks)
                      if getattr(c, "usage", None) and _litellm.usage_of(c)["total_tokens"]), None)
        if usage is None:   # abandoned before the provider reported usage: count what we got
            prompt = req.estimate if req.estimate is not None else \
                _litellm.token_estimate(req.model, req.messages)
            completion = _litellm.load().token_counter(model=req.model, text="".join(self._text)) \
                if self._text else 0
            usage = {"prompt_tokens": prompt, "completion_tokens": completion,
                     "total_tokens": prompt + completion}
        cost = _litellm.cost(req.model, backend.provider.litellm_prefix,
                             usage["prompt_tokens"], usage["completion_tokens"])
        finish = next((c.choices[0].finish_reason for c in reversed(self._chunks)
                       if getattr(c, "choices", None) and c.choices[0].finish_reason), "")
        model = _litellm.strip_route(next((c.model for c in self._chunks if getattr(c, "model", None)),
                                          req.model))
        return LLMResponse(content="".join(self._text), model=model, usage=usage,
                           finish_reason=finish or "", raw=self._chunks, backend=backend.name,
                           cost_usd=cost, latency_ms=latency, tool_calls=_tool_calls(self._chunks))


class EmptyStreamError(Exception):
    """The stream ended before any content: LiteLLM's answer to a malformed stream body."""

    kind = "bad_response"


async def first_chunks(wrapper: Any) -> tuple[list[Any], bool]:
    """Read a new stream up to its first content; returns the chunks and whether it ended.

    LiteLLM turns some malformed stream bodies into one empty chunk and a
    normal end; an empty stream is therefore treated as a failed try.
    """
    chunks: list[Any] = []
    while True:
        try:
            chunk = await wrapper.__anext__()
        except StopAsyncIteration:
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
