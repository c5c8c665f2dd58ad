"""The ``llm:`` block's schema: the pydantic models and the text of what each key expects."""

from __future__ import annotations

import logging
import re
from typing import Annotated

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, SecretStr

from ..circuit import EXPECTED as CIRCUIT_EXPECTED
from ..circuit import CircuitConfig, circuit_block
from ..strategies import STRATEGY_NAMES
from .cache import EXPECTED as CACHE_EXPECTED
from .cache import CacheConfig
from .guards import EXPECTED as GUARDS_EXPECTED
from .guards import DegradeConfig, GuardsConfig

log = logging.getLogger("xml_pipeline_llm")

STRATEGIES = STRATEGY_NAMES
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
REDIS_EXPECTED = ("redis://host:port/db, rediss://host:port/db (TLS), redis+cluster://host:port "
                  "(a Redis Cluster) or rediss+cluster://host:port")


class BackendConfig(BaseModel):
    """One ``llm.backends[i]`` entry, as written (key resolution happens in ``LLMConfig``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    provider: str
    name: str | None = None
    api_key_env: str | None = None
    api_key: SecretStr | None = None
    base_url: str | None = None
    priority: int = 1
    rate_limit_tpm: int | None = Field(default=None, gt=0)
    rate_limit_rpm: int | None = Field(default=None, gt=0)
    max_concurrent: int = Field(default=20, gt=0)
    supported_models: list[str] | None = None
    timeout: float | None = Field(default=None, gt=0)
    drop_params: bool | None = None
    circuit: Annotated[CircuitConfig | None, BeforeValidator(circuit_block)] = None


class ModelPrice(BaseModel):
    """One ``llm.pricing`` entry: USD per million tokens, handed to LiteLLM's cost map."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    input_per_mtok: float = Field(ge=0)
    output_per_mtok: float = Field(ge=0)
    cached_input_per_mtok: float | None = Field(default=None, ge=0)     # cache reads; default: the input price
    cache_write_per_mtok: float | None = Field(default=None, ge=0)      # cache writes; default: the input price


MISSING_KEYS = ("error", "skip")
BUDGET_SCOPES = ("agent", "thread", "global", "metadata.<key>")
BUDGET_WINDOWS = ("none", "1h", "1d", "7d", "30d")


class AgentConfig(BaseModel):
    """One ``llm.agents`` entry: the agent's share when backends are saturated (fairness.py)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    weight: float = Field(default=1.0, gt=0)


class BudgetConfig(BaseModel):
    """One ``llm.budgets[i]`` entry: a spending limit for the agents, threads or tenants it matches."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    scope: str
    match: str = "*"
    max_tokens: int | None = Field(default=None, gt=0)
    max_usd: float | None = Field(default=None, gt=0)
    window: str = "none"
    warn_at: list[int] = Field(default_factory=lambda: [75, 90, 95])
    degrade: DegradeConfig | None = None      # from at% of the limit, its calls go to model `to` (guards/)


class TelemetryConfig(BaseModel):
    """``llm.telemetry``: OpenTelemetry spans and metrics, Prometheus, metadata totals."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    otel: bool = True                       # active when opentelemetry-api is importable
    capture_content: bool = False           # message text in spans
    prometheus_port: int | None = Field(default=None, ge=0, le=65535)
    prometheus_host: str = "127.0.0.1"
    group_by_metadata: list[str] = Field(default_factory=list)


class GatewayKeyConfig(BaseModel):
    """One ``llm.gateway.keys[i]`` entry: a virtual key of the HTTP gateway and what calls under it are."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    key_env: str | None = None
    key_sha256: str | None = None
    agent: str = "*"
    metadata: dict[str, str | int | float | bool] = Field(default_factory=dict)
    models: list[str] | None = None
    admin: bool = False


class GatewayConfig(BaseModel):
    """``llm.gateway``: the OpenAI-compatible HTTP gateway (``xml-pipeline-llm serve``)."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    host: str = "127.0.0.1"
    port: int = Field(default=4000, ge=0, le=65535)
    keys: list[GatewayKeyConfig] = Field(default_factory=list)
    max_body_mb: float = Field(default=32, gt=0)


class LLMConfig(BaseModel):
    """The whole ``llm:`` block."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    strategy: str = "failover"
    retries: int = Field(default=3, ge=0)
    retry_base_delay: float = Field(default=1.0, gt=0)
    retry_max_delay: float = Field(default=60.0, gt=0)
    timeout: float = Field(default=120.0, gt=0)
    stream_idle_timeout: float | None = Field(default=None, gt=0)
    deadline: float | None = Field(default=None, gt=0)
    max_queue_wait: float | None = Field(default=None, ge=0)
    default_max_tokens: int = Field(default=1024, gt=0)
    drop_params: bool = False
    usage_store: str | None = None
    shared_state: str | None = None
    redis_prefix: str = "xpl"
    pricing: dict[str, ModelPrice] = Field(default_factory=dict)
    missing_keys: str = "error"
    budgets: list[BudgetConfig] = Field(default_factory=list)
    agents: dict[str, AgentConfig] = Field(default_factory=dict)
    priority_aging: float = Field(default=30.0, gt=0)
    max_tokens_per_thread: int | None = Field(default=None, gt=0)
    models: dict[str, list[str]] = Field(default_factory=dict)
    telemetry: TelemetryConfig = Field(default_factory=TelemetryConfig)
    gateway: GatewayConfig = Field(default_factory=GatewayConfig)
    guards: GuardsConfig = Field(default_factory=GuardsConfig)     # loops, call caps per thread (guards/)
    cache: CacheConfig | None = None        # the response cache (cache/); off unless configured
    circuit: Annotated[CircuitConfig, BeforeValidator(circuit_block)] = Field(default_factory=CircuitConfig)
    backends: list[BackendConfig] = Field(min_length=1)


# What each field expects, in words, for error messages.
EXPECTED = {
    "provider": "a provider name such as xai, anthropic, openai, ollama, groq",
    "name": "a backend name (letters, digits, '.', '_' or '-')",
    "api_key_env": "the name of an environment variable, such as XAI_API_KEY",
    "api_key": "a string (better: api_key_env naming an environment variable)",
    "base_url": "a URL such as http://localhost:11434",
    "priority": "an integer (lower is preferred)",
    "rate_limit_tpm": "a positive integer",
    "rate_limit_rpm": "a positive integer (provider calls that may start in any 60 s)",
    "max_concurrent": "a positive integer",
    "supported_models": "a list of model names or patterns, such as [llama3, mistral*]",
    "timeout": "a positive number of seconds",
    "stream_idle_timeout": "a positive number of seconds a stream may go without a chunk (default: timeout)",
    "deadline": "a positive number of seconds a whole request may take (default: none)",
    "max_queue_wait": "a number of seconds >= 0 an alias or fallbacks request waits for a saturated model",
    "drop_params": "true or false",
    "strategy": "one of failover, round-robin, least-loaded, lowest-latency (or, from code, a strategy object)",
    "retries": "a whole number >= 0",
    "retry_base_delay": "a positive number of seconds",
    "retry_max_delay": "a positive number of seconds",
    "default_max_tokens": "a positive integer",
    "usage_store": "memory or sqlite:///path/usage.db",
    "shared_state": "redis://host:port/db (or rediss://, redis+cluster://, rediss+cluster://)",
    "redis_prefix": "a string without { or }",
    "pricing": 'a mapping of model names or patterns to prices, such as '
               '{"grok-4.1": {input_per_mtok: 3.0, output_per_mtok: 15.0}}',
    "price": "a mapping with input_per_mtok and output_per_mtok (and optionally cached_input_per_mtok, "
             "cache_write_per_mtok)",
    "input_per_mtok": "a number >= 0 of USD per million input tokens",
    "output_per_mtok": "a number >= 0 of USD per million output tokens",
    "cached_input_per_mtok": "a number >= 0 of USD per million cached input tokens",
    "cache_write_per_mtok": "a number >= 0 of USD per million input tokens written to the prompt cache",
    "missing_keys": "error or skip",
    "agents": "a mapping of agent ids to {weight: N}, such as {researcher: {weight: 3}}",
    "weight": "a positive number (the agent's share of a saturated backend; default 1)",
    "priority_aging": "a positive number of seconds after which a waiting low-priority call is served as normal",
    "budgets": "a list of budgets such as [{scope: agent, match: researcher, max_usd: 2.5, window: 1d}]",
    "max_tokens_per_thread": "a positive integer (a lifetime token budget for every thread)",
    "scope": "agent, thread, global or metadata.<key> (such as metadata.org_id)",
    "match": "an agent id, thread id or metadata value, or a shell pattern such as research-*",
    "max_tokens": "a positive integer",
    "max_usd": "a positive number of US dollars",
    "window": "none (a lifetime budget), 1h, 1d, 7d or 30d",
    "warn_at": "a list of percentages from 1 to 100, such as [75, 90, 95]",
    "models": "a mapping of alias names to lists of models, such as {smart: [grok-4.1, claude-sonnet-4]}",
    "alias": "a non-empty list of model names, tried in this order, such as [grok-4.1, claude-sonnet-4]",
    "alias_member": "a model name such as claude-sonnet-4",
    "telemetry": "a mapping with otel, capture_content, prometheus_port, prometheus_host, group_by_metadata",
    "otel": "true or false (false: no OpenTelemetry spans or metrics even when it is installed)",
    "capture_content": "true or false (true: message text in spans)",
    "prometheus_port": "a port number 0-65535 for /metrics (0: any free port)",
    "prometheus_host": "an address to bind /metrics to, such as 127.0.0.1 (the default) or 0.0.0.0",
    "group_by_metadata": "a list of metadata keys, such as [org_id]",
    "backends": "a non-empty list of backends",
    "gateway": "a mapping with host, port, keys, max_body_mb",
    "gateway.host": "an address to bind, such as 127.0.0.1 (the default) or 0.0.0.0",
    "gateway.port": "a port number 0-65535 (default 4000; 0: any free port)",
    "gateway.keys": "a list of virtual keys such as [{key_env: TEAM_KEY, agent: researcher}]",
    "gateway.max_body_mb": "a positive number of megabytes (the largest request body; default 32)",
    "gateway.key_env": "the name of an environment variable holding the key, such as TEAM_KEY",
    "gateway.key_sha256": "the SHA-256 of the key as 64 hexadecimal digits",
    "gateway.agent": 'an agent id, or "*" to let the caller name it (X-Agent-Id or the body\'s user)',
    "gateway.metadata": "a mapping of metadata keys to strings, numbers or true/false, such as {org_id: acme}",
    "gateway.models": 'a list of model names, aliases or patterns, such as ["grok-*", smart]',
    "gateway.admin": "true or false (true: may read /v1/usage, /v1/budgets and /metrics)",
    **GUARDS_EXPECTED,
    **CACHE_EXPECTED,
    **CIRCUIT_EXPECTED,
}

