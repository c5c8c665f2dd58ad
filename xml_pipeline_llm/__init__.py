"""xml-pipeline-llm: one model-agnostic call for language models, over LiteLLM.

    from xml_pipeline_llm import complete
    response = await complete("grok-4.1", messages, agent_id="researcher")

The ``llm:`` block of organism.yaml names the backends; the router picks the
backend serving the model, balances load, retries by the rules, holds each
backend to its limits and accounts every token per agent.
"""

from __future__ import annotations

import os
import threading
from collections.abc import Mapping
from os import PathLike
from typing import TYPE_CHECKING, Any

from .env import OFFLINE_DEFAULTS
from .errors import (
    BackendError,
    BadRequestError,
    BlockedError,
    CallLimitError,
    ConfigError,
    DeadlineExceededError,
    LoopDetectedError,
    ModelNotFoundError,
    NoBackendError,
    ProviderError,
    RateLimitError,
)
from .response import LLMResponse
from .usage import AgentUsage, UsageEvent

for _key, _value in OFFLINE_DEFAULTS.items():
    os.environ.setdefault(_key, _value)

if TYPE_CHECKING:
    from .budgets import BudgetEvent, BudgetExceededError, BudgetStatus
    from .config import RouterConfig
    from .gateway.inprocess import openai_client
    from .router import LLMRouter
    from .state import BackendGate, SharedUsage, State
    from .strategies import Strategy
    from .streaming import LLMStream
    from .sync import SyncStream, complete_sync, stream_sync

# Imported on first use: pydantic, YAML and tenacity cost more than the rest of
# the package together, and LiteLLM (seconds) is only imported by a first call.
_LAZY = {"load_config": "config", "RouterConfig": "config", "LLMRouter": "router",
         "LLMStream": "streaming", "BudgetExceededError": "budgets", "BudgetStatus": "budgets",
         "BudgetEvent": "budgets", "complete_sync": "sync", "stream_sync": "sync", "SyncStream": "sync",
         "openai_client": "gateway.inprocess",
         # the extension points: your own strategy (``strategy=``) and state (``LLMRouter(state=...)``)
         "Strategy": "strategies", "State": "state", "BackendGate": "state", "SharedUsage": "state"}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'xml_pipeline_llm' has no attribute {name!r}")
    from importlib import import_module

    value = getattr(import_module(f".{module}", __name__), name)
    globals()[name] = value
    return value

__version__ = "0.1.0"

__all__ = [
    "AgentUsage",
    "BackendError",
    "BackendGate",
    "BadRequestError",
    "BlockedError",
    "BudgetEvent",
    "BudgetExceededError",
    "BudgetStatus",
    "CallLimitError",
    "ConfigError",
    "DeadlineExceededError",
    "LLMResponse",
    "LLMRouter",
    "LLMStream",
    "LoopDetectedError",
    "ModelNotFoundError",
    "NoBackendError",
    "ProviderError",
    "RateLimitError",
    "RouterConfig",
    "SharedUsage",
    "State",
    "Strategy",
    "SyncStream",
    "UsageEvent",
    "complete",
    "complete_sync",
    "configure_router",
    "get_router",
    "load_config",
    "openai_client",
    "stream",
    "stream_sync",
]

_router: LLMRouter | None = None
_lock = threading.Lock()


def configure_router(config: str | PathLike[str] | Mapping[str, Any] | RouterConfig) -> LLMRouter:
    """Replace the process-wide router.

    ``config`` is a path to an organism file, the parsed dict of a whole
    organism file, just the ``llm:`` mapping, or a loaded ``RouterConfig``.
    The old router's store is flushed and closed; the new one starts with
    empty in-memory usage.
    """
    global _router
    from .config import RouterConfig, load_config
    from .router import LLMRouter

    cfg = config if isinstance(config, RouterConfig) else load_config(config)
    new = LLMRouter(cfg)
    with _lock:
        old, _router = _router, new
    if old is not None:
        old.close()
    return new


def get_router() -> LLMRouter:
    """The process-wide router, configured from organism.yaml (or $XML_PIPELINE_LLM_CONFIG) on first use."""
    router = _router
    if router is None:
        from .config import load_config
        from .router import LLMRouter

        with _lock:
            if _router is None:
                globals()["_router"] = LLMRouter(load_config())
            router = _router
    assert router is not None
    return router


async def complete(model: str, messages: list[dict[str, Any]], *, agent_id: str | None = None,
                   thread_id: str | None = None, metadata: dict[str, Any] | None = None,
                   **kwargs: Any) -> LLMResponse:
    """A chat completion from whichever backend serves ``model``.

    Extra keyword arguments (temperature, max_tokens, tools, tool_choice, ...)
    go to the provider in OpenAI form.  Raises a ``BackendError`` subclass
    when the request cannot be served.
    """
    return await get_router().complete(model, messages, agent_id=agent_id, thread_id=thread_id,
                                       metadata=metadata, **kwargs)


def stream(model: str, messages: list[dict[str, Any]], *, agent_id: str | None = None,
           thread_id: str | None = None, metadata: dict[str, Any] | None = None,
           **kwargs: Any) -> LLMStream:
    """Like ``complete`` but yields text deltas; ``.response`` holds the LLMResponse at the end.

        async with stream("claude-sonnet-4", messages) as s:
            async for delta in s:
                print(delta, end="")
        print(s.response.usage)
    """
    return get_router().stream(model, messages, agent_id=agent_id, thread_id=thread_id,
                               metadata=metadata, **kwargs)
