"""Fallbacks across models: the chain of models a request may be served by.

A request names a model, an alias of ``llm.models`` (``smart: [grok-4.1,
claude-sonnet-4]``) or either with ``fallbacks=[...]``; ``build_chain`` turns
that into ``Step``s, one per model in order (an alias in ``fallbacks=`` counts
as its models; a model named twice is tried once).  Before anything is sent,
``check_windows`` takes out each model whose context window (LiteLLM's model
info) is smaller than the prompt, so a prompt is never sent to a model too
small for it.

``choose`` picks the backend for each try, over the whole chain:

1. the first model (in chain order) with a backend that is ready (not cooling
   down) and has not failed a try of this request: the strategy picks among
   those, preferring the ones that can start now (``has_capacity``: not out of
   ``rate_limit_rpm`` headroom);
2. else the first model with a ready backend that failed before (the usual
   retry of a backend whose cooldown is over);
3. else every backend of every model left cools down: sleep until the first
   cooldown ends.

So when every backend of the first model has failed, been dropped or is
cooling down, the next model is tried at once; the tries of all models
together are bounded by ``retries + 1`` (``Request.exhausted``).
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import _litellm
from .errors import BadRequestError, ModelNotFoundError
from .request import Request, Step
from .retry import Cooldowns, until_ready

if TYPE_CHECKING:
    from .backends import ResolvedBackend
    from .routing import Routes
    from .state import BackendGate
    from .strategies import Strategy

log = logging.getLogger("xml_pipeline_llm")

# Per-message overhead LiteLLM's token count adds (role, separators, reply priming), generously.
_MESSAGE_OVERHEAD = 16


def build_chain(routes: Routes, models: Mapping[str, Sequence[str]], model: str,
                fallbacks: Sequence[str] = ()) -> list[Step]:
    """The models to try for ``model`` (a model or an alias) and then ``fallbacks``, in order.

    An unknown ``model`` is a ``ModelNotFoundError`` (as for any call); an
    unknown name in ``fallbacks`` a ``BadRequestError`` naming it; nothing is sent.
    """
    names = list(models.get(model, (model,)))
    for i, name in enumerate(fallbacks):
        expanded = models.get(name, (name,))
        for member in expanded:
            try:
                routes.route(member)
            except ModelNotFoundError as exc:
                raise BadRequestError(f"fallbacks[{i}]: {exc} (nothing was sent)") from None
        names += expanded
    steps: list[Step] = []
    seen: set[str] = set()
    for name in names:
        if name not in seen:
            seen.add(name)
            bare, candidates = routes.route(name)
            steps.append(Step(bare, candidates))
    return steps


def check_windows(req: Request) -> None:
    """Skip each model whose context window is below the prompt estimate; none left: BadRequestError.

    The prompt is counted (LiteLLM's token counter, once per request) only when
    a cheap upper bound does not already show that it fits.
    """
    bound: int | None = -1
    for step in req.chain:
        window = _window(step)
        if window is None:
            continue
        if bound == -1:
            bound = _upper_bound(req.messages, req.kwargs.get("tools"))
        if bound is not None and bound <= window:
            continue
        if req.estimate is None:
            req.estimate = _litellm.token_estimate(req.model, req.messages, req.kwargs.get("tools"))
        if req.estimate > window:
            step.skipped = (f"the prompt (about {req.estimate:,} tokens) is larger than its "
                            f"{window:,}-token context window (LiteLLM model info)")
            log.info("%s: %s skipped, %s", req.name, step.model, step.skipped)
    live = req.live()
    if not live:
        raise BadRequestError(f"{req.name}: no model can take the prompt, so nothing was sent"
                              f"{req.skipped_models()}; shorten the prompt or name a model with a "
                              f"larger context window")
    if live[0][0] != req.step:
        req.use(live[0][0])


def _window(step: Step) -> int | None:
    for prefix in dict.fromkeys(b.provider.litellm_prefix for b in step.candidates):
        window = _litellm.context_window(step.model, prefix)
        if window is not None:
            return window
    return None


def _upper_bound(messages: list[dict[str, Any]], tools: Any) -> int | None:
    """At most this many prompt tokens (a token is at least one byte), or None when unsure (images)."""
    total = 16 + (len(repr(tools).encode()) if tools else 0)
    for m in messages:
        total += _MESSAGE_OVERHEAD + sum(len(str(m.get(k) or "").encode()) for k in ("role", "name"))
        content = m.get("content")
        if isinstance(content, str):
            total += len(content.encode())
        elif isinstance(content, list):
            for part in content:
                if not isinstance(part, Mapping) or part.get("type") != "text":
                    return None
                total += len(str(part.get("text") or "").encode())
        elif content is not None:
            return None
        if m.get("tool_calls") or m.get("function_call"):
            total += len(repr(m.get("tool_calls") or m.get("function_call")).encode())
    return total


async def choose(req: Request, cooldowns: Cooldowns, strategy: Strategy, gates: Mapping[str, BackendGate],
                 on_wait: Callable[[Request, float], None] | None = None) -> ResolvedBackend:
    """The backend for the next try (see the module's rules); sleeps only while every backend cools.

    ``on_wait(req, seconds)`` hears of each such sleep (telemetry).
    """
    while True:
        live = req.live()
        if not live:
            raise req.final_error() from req.last_exc
        remaining = req.remaining()
        cooling = await cooldowns(b.name for b in remaining)
        chosen = _pick(req, live, cooling, strategy, gates)
        if chosen is not None:
            return chosen
        wait = until_ready(cooling, remaining)
        if req.deadline.at is not None:
            req.deadline.refuse_if(wait, f"the cooldown of {', '.join(b.name for b in remaining)}",
                                   req.name, req.attempts)
        log.debug("%s: every backend cools down; waiting %.2fs", req.name, wait)
        if on_wait is not None:
            on_wait(req, wait)
        await asyncio.sleep(wait)


def _pick(req: Request, live: list[tuple[int, Step]], cooling: Mapping[str, float], strategy: Strategy,
          gates: Mapping[str, BackendGate]) -> ResolvedBackend | None:
    for fresh_only in (True, False):
        for i, step in live:
            ready = [b for b in step.pool()
                     if b.name not in cooling and not (fresh_only and b.name in step.failed)]
            if not ready:
                continue
            if i != req.step:
                log.info("%s: moving on to model %s", req.name, step.model)
                req.use(i)
            able = [b for b in ready if gates[b.name].has_capacity]
            chosen = strategy.pick(able or ready, step.candidates, req.turn, lambda b: gates[b.name].load)
            log.debug("%s: try %d -> %s/%s (ready %s; cooling %s)", req.name, len(req.attempts) + 1,
                      step.model, chosen.name, [b.name for b in able or ready], sorted(cooling))
            return chosen
    return None
