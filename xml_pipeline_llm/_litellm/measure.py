"""What LiteLLM knows of a call: token counts, context windows, costs, usage, the response."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from ..response import LLMResponse
from .load import load


def text_tokens(model: str, text: str) -> int:
    """LiteLLM's count of the tokens in ``text`` (a stream's answer abandoned before its usage came)."""
    return int(load().token_counter(model=model, text=text)) if text else 0


def token_estimate(model: str, messages: list[dict[str, Any]], tools: Any = None) -> int:
    """LiteLLM's count of the prompt tokens (used to reserve rate-limit tokens)."""
    lt = load()
    try:
        return int(lt.token_counter(model=model, messages=messages, tools=tools))
    except Exception:   # an odd message shape must not fail the call: count characters
        return sum(len(str(m.get("content") or "")) for m in messages) // 3 + 3 * len(messages)


_WINDOWS: dict[tuple[str, str], int | None] = {}


def context_window(model: str, provider: str) -> int | None:
    """The model's input window in tokens from LiteLLM's model info (``max_input_tokens``, else
    ``max_tokens``); None for a model LiteLLM does not know (no check).  Asked once per pair."""
    key = (model, provider)
    if key in _WINDOWS:
        return _WINDOWS[key]
    window: int | None = None
    try:
        info = load().get_model_info(model, custom_llm_provider=provider)
    except Exception:       # not mapped (or LiteLLM could not say): no check
        info = None
    if info:
        value = info.get("max_input_tokens") or info.get("max_tokens")
        window = int(value) if isinstance(value, (int, float)) and value > 0 else None
    _WINDOWS[key] = window
    return window


def in_cost_map(model: str, provider: str) -> bool:
    """Whether LiteLLM's cost map prices ``model`` called on ``provider``.

    LiteLLM answers 0.0 for some unknown models (a generalised fallback), and an
    entry of the bare name may belong to another provider than the one called
    (``claude-*`` through an OpenAI-compatible gateway), so the map must have a
    non-zero price and LiteLLM must be able to apply it on this provider.
    """
    lt = load()
    entries = [lt.model_cost.get(model), lt.model_cost.get(f"{provider}/{model}")]
    if not any(e and (e.get("input_cost_per_token") or e.get("output_cost_per_token")) for e in entries):
        return False
    try:
        p, c = lt.cost_per_token(model=model, custom_llm_provider=provider,
                                 prompt_tokens=1000, completion_tokens=1000)
    except Exception:
        return False
    return bool(p + c > 0)


def usage_cost(model: str, provider: str, usage: Any, info: Mapping[str, Any] | None = None) -> float:
    """LiteLLM's price of ``usage`` (its own ``Usage``, or a mapping of our usage fields) on ``model``.

    ``info``: the model's price as LiteLLM model info, used instead of the cost map's.
    """
    lt = load()
    if usage is None or isinstance(usage, Mapping):
        usage = litellm_usage(usage or {})
    p, c = lt.cost_per_token(model=model, custom_llm_provider=provider, usage_object=usage,
                             requested_model_info_override=dict(info) if info is not None else None)
    return float(p + c)


def litellm_usage(usage: Mapping[str, int]) -> Any:
    """Our usage fields as LiteLLM's ``Usage`` (cache reads, cache writes and reasoning in its details)."""
    p = int(usage.get("prompt_tokens", 0))
    c = int(usage.get("completion_tokens", 0))
    cached, write = int(usage.get("cached_tokens", 0)), int(usage.get("cache_write_tokens", 0))
    reasoning = int(usage.get("reasoning_tokens", 0))
    extra: dict[str, Any] = {}
    if cached or write:
        extra["prompt_tokens_details"] = {"cached_tokens": cached, "cache_creation_tokens": write}
        extra["cache_read_input_tokens"] = cached
        extra["cache_creation_input_tokens"] = write
    if reasoning:
        extra["completion_tokens_details"] = {"reasoning_tokens": reasoning}
    return load().Usage(prompt_tokens=p, completion_tokens=c,
                        total_tokens=int(usage.get("total_tokens", 0)) or p + c, **extra)


def _count(obj: Any, name: str) -> int:
    value = obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)
    return int(value) if isinstance(value, (int, float)) else 0


def usage_of(resp: Any) -> dict[str, int]:
    """The usage of a response (or stream chunk): token counts, cache reads and writes, reasoning.

    ``prompt_tokens`` counts every input token (LiteLLM adds Anthropic's cache
    reads and writes to its ``input_tokens``); ``cached_tokens`` is OpenAI/xAI
    ``prompt_tokens_details.cached_tokens`` or Anthropic ``cache_read_input_tokens``,
    ``cache_write_tokens`` Anthropic ``cache_creation_input_tokens``,
    ``reasoning_tokens`` ``completion_tokens_details.reasoning_tokens``; 0 when not reported.
    """
    usage = getattr(resp, "usage", None)
    p = _count(usage, "prompt_tokens")
    c = _count(usage, "completion_tokens")
    t = _count(usage, "total_tokens") or (p + c)
    prompt_details = getattr(usage, "prompt_tokens_details", None)
    cached = _count(prompt_details, "cached_tokens") or _count(usage, "cache_read_input_tokens")
    write = _count(usage, "cache_creation_input_tokens") or _count(prompt_details, "cache_creation_tokens")
    reasoning = _count(getattr(usage, "completion_tokens_details", None), "reasoning_tokens")
    return {"prompt_tokens": p, "completion_tokens": c, "total_tokens": t, "cached_tokens": cached,
            "cache_write_tokens": write, "reasoning_tokens": reasoning}


def to_response(resp: Any, backend: str, latency_ms: float, cost_usd: float | None) -> LLMResponse:
    """LiteLLM's ModelResponse as our LLMResponse."""
    choice = resp.choices[0]
    message = choice.message
    calls = [tc.model_dump() if hasattr(tc, "model_dump") else dict(tc)
             for tc in (getattr(message, "tool_calls", None) or [])]
    return LLMResponse(
        content=message.content or "",
        model=strip_route(resp.model or ""),
        usage=usage_of(resp),
        finish_reason=choice.finish_reason or "",
        raw=resp,
        backend=backend,
        cost_usd=cost_usd,
        latency_ms=latency_ms,
        tool_calls=calls,
    )


_ROUTES = ("ollama_chat/", "ollama/")


def strip_route(model: str) -> str:
    """The model name as the provider knows it: LiteLLM reports Ollama's as ``ollama_chat/llama3``."""
    for route in _ROUTES:
        if model.startswith(route):
            return model[len(route):]
    return model


def call_id(resp: Any) -> str:
    hidden = getattr(resp, "_hidden_params", None) or {}
    return str(hidden.get("litellm_call_id") or getattr(resp, "id", "") or "")
