"""The validated ``llm:`` block with its backends resolved: ``RouterConfig``, what the router reads."""

from __future__ import annotations

import os
from pathlib import Path

from ..backends import ResolvedBackend
from ..env import REDIS_ENV
from ..strategies import Strategy
from .schema import (
    BudgetConfig,
    LLMConfig,
    ModelPrice,
)


class RouterConfig:
    """The validated ``llm:`` block with its backends resolved, as the router uses it."""

    def __init__(self, raw: LLMConfig, backends: list[ResolvedBackend], source: str,
                 skipped: list[tuple[str, str]] | None = None, base: Path | None = None) -> None:
        self.raw = raw
        self.backends = backends
        self.source = source
        #: backends dropped by ``missing_keys: skip``: (name, reason such as "XAI_API_KEY not set")
        self.skipped: list[tuple[str, str]] = list(skipped or [])
        #: ``llm.pricing``: model name or shell pattern -> price (registered with LiteLLM on first use)
        self.pricing: dict[str, ModelPrice] = dict(raw.pricing)
        #: ``llm.models``: alias -> the models it stands for, tried in this order
        self.models: dict[str, tuple[str, ...]] = {k: tuple(v) for k, v in raw.models.items()}
        self.strategy = raw.strategy
        #: a strategy object given as ``strategy:`` (``configure_router``), else None
        self.strategy_object: Strategy | None = None
        self.retries = raw.retries
        self.retry_base_delay = raw.retry_base_delay
        self.retry_max_delay = raw.retry_max_delay
        self.timeout = raw.timeout
        #: seconds a stream may go without a chunk (None: the try's timeout)
        self.stream_idle_timeout = raw.stream_idle_timeout
        #: seconds a whole request may take, waits and tries and models together (None: no deadline)
        self.deadline = raw.deadline
        #: seconds an alias or fallbacks request waits for a saturated model before moving on (None: no cap)
        self.max_queue_wait = raw.max_queue_wait
        self.default_max_tokens = raw.default_max_tokens
        self.usage_store = resolve_store(raw.usage_store, base)
        self.shared_state = raw.shared_state or os.environ.get(REDIS_ENV) or None
        self.redis_prefix = raw.redis_prefix
        #: ``llm.agents``: agent id -> weight for fair shares (others: 1)
        self.weights: dict[str, float] = {name: a.weight for name, a in raw.agents.items()}
        self.priority_aging = raw.priority_aging
        #: ``llm.budgets`` with ``max_tokens_per_thread`` as a thread budget of its own (first)
        self.budgets: list[BudgetConfig] = list(raw.budgets)
        if raw.max_tokens_per_thread is not None:
            self.budgets.insert(0, BudgetConfig(scope="thread", max_tokens=raw.max_tokens_per_thread))
        #: ``llm.telemetry`` (OpenTelemetry, Prometheus, metadata totals; ``telemetry.py``)
        self.telemetry = raw.telemetry
        #: ``llm.gateway``: the HTTP gateway's address, virtual keys and body limit (``gateway/``)
        self.gateway = raw.gateway
        #: ``llm.cache``: the response cache (``cache/``; None: off), its sqlite path resolved like usage_store's
        self.cache = raw.cache if raw.cache is None else raw.cache.model_copy(
            update={"store": resolve_store(raw.cache.store, base)})

    def __repr__(self) -> str:
        return f"RouterConfig(strategy={self.strategy!r}, backends={self.backends!r})"

def resolve_store(url: str | None, base: Path | None) -> str | None:
    """``url`` with a relative ``sqlite:///`` path made relative to ``base`` (the config file's directory).

    So the same organism file run from any directory writes one ledger, the one
    ``xml-pipeline-llm usage -c FILE`` reads; a config given as a dict (no file)
    keeps paths relative to the working directory.
    """
    if base is None or not url or not url.startswith("sqlite:///"):
        return url
    path = Path(url[len("sqlite:///"):]).expanduser()
    return url if path.is_absolute() else f"sqlite:///{(base / path).resolve()}"

