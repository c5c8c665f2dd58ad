"""``stream()`` through the response cache: a hit replayed as deltas, a provider stream stored at its end."""

from __future__ import annotations

import asyncio
import time
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from ..response import LLMResponse
from ..streaming import LLMStream

if TYPE_CHECKING:
    from .serve import Plan
    from .stores import Entry


class CachedStream(LLMStream):
    """``stream()`` through the cache: a hit is replayed as a stream of deltas; a provider stream read
    to its end is stored (and handed to the identical calls waiting for it)."""

    def __init__(self, plan: Plan, open_stream: Callable[[], LLMStream]) -> None:
        super().__init__(_unused)
        self._plan = plan
        self._make = open_stream
        self._inner: LLMStream | None = None
        self._replay: list[Any] | None = None
        self._leads = False
        self._over = False

    async def next_chunk(self) -> Any:
        if self._inner is None and self._replay is None:
            if self._over:
                raise StopAsyncIteration
            started = time.monotonic()
            if self._plan.before is not None:
                await self._plan.before()
            got = await self._plan.cache.obtain(self._plan)
            if isinstance(got, bool):
                self._leads, self._inner = got, self._make()
            else:
                self.response = await self._plan.cache.hit(self._plan, got, started)
                self._replay = _chunks(got)
        if self._replay is not None:
            if not self._replay:
                self._over = True
                raise StopAsyncIteration
            return self._replay.pop(0)
        assert self._inner is not None
        try:
            return await self._inner.next_chunk()
        except StopAsyncIteration:
            await self._end(self._inner.response)
            raise
        except BaseException:
            await self._end(None)
            raise

    async def _end(self, resp: LLMResponse | None) -> None:
        if self._over:
            return
        self._over = True
        self.response = resp
        if self._leads or resp is not None:
            await asyncio.shield(self._plan.cache.answered(self._plan, resp))

    @property
    def backend(self) -> str:
        if self._inner is not None:
            return self._inner.backend
        return self.response.backend if self.response is not None else ""

    @property
    def attempts(self) -> int:
        return self._inner.attempts if self._inner is not None else 0

    async def aclose(self) -> None:
        if self._inner is not None:
            await self._inner.aclose()
            if not self._over:          # closed before its end: an incomplete answer, not stored
                self.response = self._inner.response
                self._over = True
                if self._leads:
                    await self._plan.cache.answered(self._plan, None)
        self._over = True
        self._replay = []

    def __del__(self) -> None:
        if self._leads and not self._over:
            self._plan.cache.abandoned(self._plan)


async def _unused() -> Any:
    raise AssertionError("a cached stream opens its provider stream itself")


class _Obj:
    """A chunk part in OpenAI's form for a replayed stream (attributes, as LiteLLM's chunks have)."""

    def __init__(self, **kw: Any) -> None:
        self.__dict__.update(kw)


_PIECE = 24     # characters per replayed delta


def _chunks(entry: Entry) -> list[Any]:
    """A cached answer as stream chunks: its text in small deltas, its tool calls, its finish reason."""
    out = []
    text = entry.content
    for i in range(0, len(text), _PIECE):
        delta = _Obj(role="assistant" if i == 0 else None, content=text[i:i + _PIECE], tool_calls=None)
        out.append(_Obj(model=entry.model, choices=[_Obj(index=0, delta=delta, finish_reason=None)], usage=None))
    if entry.tool_calls:
        calls = [_Obj(index=i, id=tc.get("id"), type="function",
                      function=_Obj(name=tc.get("function", {}).get("name"),
                                    arguments=tc.get("function", {}).get("arguments")))
                 for i, tc in enumerate(entry.tool_calls)]
        out.append(_Obj(model=entry.model, choices=[_Obj(index=0, delta=_Obj(role=None, content=None,
                                                                            tool_calls=calls),
                                                         finish_reason=None)], usage=None))
    out.append(_Obj(model=entry.model, choices=[_Obj(index=0, delta=_Obj(role=None, content=None, tool_calls=None),
                                                     finish_reason=entry.finish_reason or "stop")], usage=None))
    return out
