"""How many tokens a try reserves in its backend's bucket before it is sent.

The reservation is the request's worst case: LiteLLM's count of the prompt
tokens (made once per request) plus ``max_tokens`` (or ``max_completion_tokens``,
else ``llm.default_max_tokens``).  After the call the gate settles it against
the tokens the provider reported: the difference is refunded, or the excess
charged.  A backend without ``rate_limit_tpm`` reserves nothing and counts nothing.
Budgets (``budgets/``) reserve the same worst case, and its price in dollars.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from . import _litellm

if TYPE_CHECKING:
    from .backends import ResolvedBackend
    from .pricing import Pricing
    from .request import Request


def prompt_tokens(model: str, messages: list[dict[str, Any]], tools: Any = None) -> int:
    """LiteLLM's count of a prompt's tokens: what a try reserves for its prompt (``max_tokens`` on top).

    Loads LiteLLM (and the model's tokenizer) on first use.
    """
    return _litellm.token_estimate(model, messages, tools)


def worst_case(req: Request, default_max_tokens: int) -> tuple[int, int]:
    """(prompt tokens, the most the answer may take): LiteLLM's count of the prompt, made once per request."""
    return req.prompt_estimate(), most_out(req.kwargs, default_max_tokens)


def most_out(kwargs: dict[str, Any], default_max_tokens: int) -> int:
    """The most tokens the answer may take: ``max_tokens`` (or ``max_completion_tokens``, else the
    default) for each of its ``n`` choices; the call's arguments were checked to be positive ints."""
    out = kwargs.get("max_tokens") or kwargs.get("max_completion_tokens") or default_max_tokens
    return int(out) * int(kwargs.get("n") or 1)


def tokens_to_reserve(req: Request, backend: ResolvedBackend, default_max_tokens: int) -> int:
    """Prompt estimate + the most the answer may take, for a rate-limited backend; else 0."""
    if backend.rate_limit_tpm is None:
        return 0
    return sum(worst_case(req, default_max_tokens))


def fair_cost(req: Request, reserved: int, default_max_tokens: int) -> float:
    """A try's size in the fair order of waiters: its reservation, else a cheap estimate (no tokenizer)."""
    if reserved:
        return float(reserved)
    prompt = req.estimate if req.estimate is not None else sum(
        len(str(m.get("content") or "")) for m in req.messages) // 4
    return float(prompt + most_out(req.kwargs, default_max_tokens))


def worst_cost(req: Request, backend: ResolvedBackend, default_max_tokens: int,
               pricing: Pricing) -> float | None:
    """The most a try may cost at the router's prices (budgets in dollars): every prompt token
    uncached, at the dearest input price; None: no price."""
    prompt, out = worst_case(req, default_max_tokens)
    return pricing.worst_cost(req.model, backend.provider.litellm_prefix, prompt, out)
