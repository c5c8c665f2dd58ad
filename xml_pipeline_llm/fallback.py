"""Fallbacks across models: the chain of models a request may be served by.

A request names a model, an alias of ``llm.models`` (``smart: [grok-4.1,
claude-sonnet-4]``) or either with ``fallbacks=[...]``; ``build_chain`` turns
that into ``Step``s, one per model in order (an alias in ``fallbacks=`` counts
as its models; a model named twice is tried once).  Before anything is sent,
``too_small`` names each model whose context window (LiteLLM's model
info) is smaller than the prompt, so a prompt is never sent to a model too
small for it.

Which model and backend take each try is ``selection.py``'s; when the
request moves on to the next model is the request loop's (``router.py``):
when every backend of a model has failed, been dropped or is cooling down,
or the model is saturated past ``llm.max_queue_wait``.  The tries of all
models together are bounded by ``retries + 1`` (``Request.exhausted``).
"""

from __future__ import annotations

import logging
from collections.abc import Mapping, Sequence
from typing import TYPE_CHECKING, Any

from . import _litellm
from .errors import BadRequestError, ModelNotFoundError
from .request import Request, Step

if TYPE_CHECKING:
    from .routing import Routes

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


def too_small(req: Request) -> list[tuple[int, str]]:
    """The models of the chain whose context window is below the prompt estimate: (place, why).

    The prompt is counted (LiteLLM's token counter, once per request) only when
    a cheap upper bound does not already show that it fits.
    """
    out: list[tuple[int, str]] = []
    bound: int | None = -1
    for i, step in enumerate(req.chain):
        window = _window(step)
        if window is None:
            continue
        if bound == -1:
            bound = _upper_bound(req.messages, req.kwargs.get("tools"))
        if bound is not None and bound <= window:
            continue
        estimate = req.prompt_estimate()
        if estimate > window:
            why = (f"the prompt (about {estimate:,} tokens) is larger than its "
                   f"{window:,}-token context window (LiteLLM model info)")
            log.info("%s: %s skipped, %s", req.name, step.model, why)
            out.append((i, why))
    return out


def none_fits(req: Request) -> BadRequestError:
    """The error of a request whose every model is too small for its prompt."""
    return BadRequestError(f"{req.name}: no model can take the prompt, so nothing was sent"
                           f"{req.skipped_models()}; shorten the prompt or name a model with a "
                           f"larger context window")


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
