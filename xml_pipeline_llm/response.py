"""What ``complete()`` returns."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any


@dataclass
class LLMResponse:
    """One model answer, in the same shape whichever provider gave it.

    ``usage`` has ``prompt_tokens``, ``completion_tokens`` and ``total_tokens``
    as the provider reported them; ``tool_calls`` are in OpenAI form;
    ``raw`` is LiteLLM's response object; ``cost_usd`` is None when LiteLLM's
    cost map has no price for the model.
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
