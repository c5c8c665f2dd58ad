"""What ``complete()`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LLMResponse:
    """One model answer, in the same shape whichever provider gave it.

    ``usage`` has ``prompt_tokens`` (every input token, cached or not),
    ``completion_tokens`` and ``total_tokens`` as the provider reported them,
    and ``cached_tokens`` (input read from the prompt cache),
    ``cache_write_tokens`` (input written to it) and ``reasoning_tokens`` (of the
    completion), 0 when the provider reports none; ``tool_calls`` are in OpenAI
    form; ``raw`` is LiteLLM's response object (a stream's: its chunks);
    ``cost_usd`` prices that usage (cache reads and writes at their own prices),
    None when the model has no price (LiteLLM's cost map or ``llm.pricing``).
    """

    content: str
    model: str
    usage: dict[str, int]
    finish_reason: str
    raw: Any = field(default=None, repr=False)
    backend: str = ""
    cost_usd: float | None = None
    latency_ms: float = 0.0
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    #: provider calls this request made, the one that answered included (retries and failovers add one each)
    attempts: int = 1
    #: answered from the response cache (``llm.cache``): no provider call, ``cost_usd`` 0.0, ``attempts`` 0,
    #: ``usage`` the original answer's
    cache_hit: bool = False
