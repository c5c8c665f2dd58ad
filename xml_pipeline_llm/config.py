"""The ``llm:`` block of organism.yaml, validated at load time.

Every mistake becomes one line of a ``ConfigError`` that names the place, what
was expected, what was found and the fix, so that a wrong config fails when the
organism starts, not at its first request hours later.
"""

from __future__ import annotations

import difflib
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import yaml
from pydantic import BaseModel, ConfigDict, Field, SecretStr, ValidationError

from .errors import ConfigError
from .guards import EXPECTED as GUARDS_EXPECTED
from .guards import DegradeConfig, GuardsConfig, guard_problems
from .providers import BUILTIN, LITELLM_PROVIDERS, Provider, lookup
from .redact import redact_mapping, redact_url
from .strategies import STRATEGY_NAMES, Strategy, is_strategy

log = logging.getLogger("xml_pipeline_llm")

STRATEGIES = STRATEGY_NAMES
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*")
CONFIG_ENV = "XML_PIPELINE_LLM_CONFIG"
# what names a Redis server: one (TLS with rediss://, a socket with unix://) or a Redis Cluster
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")
REDIS_EXPECTED = ("redis://host:port/db, rediss://host:port/db (TLS), redis+cluster://host:port "
                  "(a Redis Cluster) or rediss+cluster://host:port")
REDIS_ENV = "XML_PIPELINE_LLM_REDIS_URL"


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
    degrade: DegradeConfig | None = None      # from at% of the limit, its calls go to model `to` (guards.py)


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
    guards: GuardsConfig = Field(default_factory=GuardsConfig)     # loops, call caps per thread (guards.py)
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
    "strategy": "one of failover, round-robin, least-loaded (or, from code, a strategy object)",
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
}


class ResolvedBackend:
    """A backend ready for the router: validated settings plus its resolved key.

    The key is held as a ``SecretStr`` so that no repr, log line or traceback
    can show it.
    """

    __slots__ = ("name", "provider", "index", "priority", "base_url", "api_key", "key_source",
                 "rate_limit_tpm", "rate_limit_rpm", "max_concurrent", "models", "timeout", "drop_params")

    def __init__(self, cfg: BackendConfig, index: int, provider: Provider,
                 api_key: SecretStr | None, key_source: str, timeout: float,
                 drop_params: bool = False) -> None:
        self.name: str = cfg.name or cfg.provider
        self.provider = provider
        self.index = index
        self.priority = cfg.priority
        self.base_url = provider.normalise_base_url(cfg.base_url) if cfg.base_url else None
        self.api_key = api_key
        self.key_source = key_source
        self.rate_limit_tpm = cfg.rate_limit_tpm
        self.rate_limit_rpm = cfg.rate_limit_rpm
        self.max_concurrent = cfg.max_concurrent
        self.models: tuple[str, ...] = tuple(cfg.supported_models or ())
        self.timeout = cfg.timeout or timeout
        self.drop_params = drop_params if cfg.drop_params is None else cfg.drop_params

    @property
    def catch_all(self) -> bool:
        """Serves any model: an ollama-like backend with no model list."""
        return self.provider.catch_all and not self.models

    @property
    def model_rule(self) -> tuple[str, ...]:
        return self.models or self.provider.model_rule

    def describe_models(self) -> str:
        return "any model" if self.catch_all else ", ".join(self.model_rule)

    def __repr__(self) -> str:
        return (f"ResolvedBackend(name={self.name!r}, provider={self.provider.name!r}, "
                f"key={self.key_source!r})")


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

    def __repr__(self) -> str:
        return f"RouterConfig(strategy={self.strategy!r}, backends={self.backends!r})"


# ---------------------------------------------------------------- loading

def load_config(source: str | os.PathLike[str] | Mapping[str, Any] | None = None) -> RouterConfig:
    """Load and validate the ``llm:`` block.

    ``source`` is a path to an organism file, the parsed dict of a whole
    organism file, just the ``llm:`` mapping, or None for ``$XML_PIPELINE_LLM_CONFIG``
    or ``./organism.yaml``.  ``.env`` (in the working directory and beside the
    file) is loaded first; real environment variables win.
    """
    if isinstance(source, Mapping):
        _load_dotenv(None)
        return _validate(_llm_block(source, "the given mapping"), "<dict>", None)
    path = config_file(source)
    _load_dotenv(path.parent)
    return _validate(_llm_block(_read_yaml(path), str(path)), str(path), path.parent)


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


def read_llm_block(source: str | os.PathLike[str] | None = None) -> dict[str, Any]:
    """The raw ``llm:`` mapping of an organism file, not validated (found as load_config finds it).

    For tools that adjust a block before validating it, such as
    ``xml-pipeline-llm complete --simulate`` pointing every backend at the simulator.
    """
    path = config_file(source)
    return dict(_llm_block(_read_yaml(path), str(path)))


def config_file(source: str | os.PathLike[str] | None = None) -> Path:
    """The organism file ``load_config`` reads: ``source``, else ``$XML_PIPELINE_LLM_CONFIG``, else ./organism.yaml."""
    if source is None:
        env = os.environ.get(CONFIG_ENV)
        source = env or "organism.yaml"
        if not env and not Path(source).exists():
            raise ConfigError(
                f"no organism.yaml in {Path.cwd()}: create one with an llm: block "
                f"(xml-pipeline-llm init writes a commented one), or set {CONFIG_ENV} to its path")
    path = Path(source)
    if not path.is_file():
        raise ConfigError(f"{path}: no such file; give the path of an organism.yaml with an llm: block")
    return path


def _load_dotenv(directory: Path | None) -> None:
    from dotenv import load_dotenv

    load_dotenv(Path.cwd() / ".env", override=False)
    if directory is not None and directory.resolve() != Path.cwd().resolve():
        load_dotenv(directory / ".env", override=False)


def _read_yaml(path: Path) -> Any:
    try:
        return yaml.safe_load(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" line {mark.line + 1}, column {mark.column + 1}" if mark else ""
        problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
        raise ConfigError(f"{path}:{where}: malformed YAML: {problem}; "
                          f"check the indentation and quoting there") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise ConfigError(f"{path}: cannot read: {exc}") from None


def _llm_block(doc: Any, where: str) -> Mapping[str, Any]:
    if not isinstance(doc, Mapping):
        raise ConfigError(f"{where}: expected a mapping with an llm: block, got {_show(doc)}")
    if "llm" in doc:
        block = doc["llm"]
        if not isinstance(block, Mapping):
            raise ConfigError(f"llm: expected a mapping with backends:, got {_show(block)}")
        return block
    if "backends" in doc:
        return doc
    raise ConfigError(f"{where}: no llm: block; add one with at least one backend "
                      f"(xml-pipeline-llm init writes a commented organism.yaml)")


# ------------------------------------------------------------- validation

def _validate(block: Mapping[str, Any], source: str, base: Path | None) -> RouterConfig:
    block = dict(block)
    custom = block.pop("strategy") if is_strategy(block.get("strategy")) else None
    if isinstance(block.get("strategy"), str):
        block["strategy"] = block["strategy"].strip().lower().replace("_", "-")
    try:
        raw = LLMConfig.model_validate(block)
    except ValidationError as exc:
        found = list(dict.fromkeys(_describe(e, block) for e in exc.errors()))
        raise ConfigError("\n".join(found + _unvalidated_problems(block))) from None
    problems: list[str] = []
    skipped: list[tuple[str, str, str]] = []
    backends = _resolve_backends(raw, problems, skipped)
    problems += _check_block(raw)
    if backends and not problems:
        problems += _check_models(raw.models, backends, [(n, f"{v} not set") for _, n, v in skipped])
        problems += guard_problems(raw.guards, raw.budgets, raw.models, backends,
                                   [(n, f"{v} not set") for _, n, v in skipped])
    if skipped and not backends and not problems:
        missing = ", ".join(f"{var} for {name}" for _, name, var in skipped)
        problems.append(f"llm.missing_keys: skip left no backend, none has its key set ({missing}); "
                        f"export one of these variables or add it to .env")
    if problems:
        raise ConfigError("\n".join(problems))
    for where, name, var in skipped:
        log.warning("%s (%s): skipped, environment variable %s is not set (llm.missing_keys: skip); "
                    "export it or add %s=... to .env to use this backend", where, name, var, var)
    config = RouterConfig(raw, backends, source, [(name, f"{var} not set") for _, name, var in skipped], base)
    if custom is not None:
        config.strategy, config.strategy_object = type(custom).__name__, custom
    return config


def _unvalidated_problems(block: Mapping[str, Any]) -> list[str]:
    """Mistakes found without a validated model, so they are reported beside type errors."""
    problems = []
    strategy = block.get("strategy")
    if isinstance(strategy, str) and strategy not in STRATEGIES:
        problems.append(_unknown_strategy(strategy))
    backends = block.get("backends")
    for i, entry in enumerate(backends if isinstance(backends, list) else []):
        provider = entry.get("provider") if isinstance(entry, Mapping) else None
        if isinstance(provider, str) and lookup(provider) is None:
            problems.append(_unknown_provider(f"llm.backends[{i}]", provider))
    return problems


def _unknown_strategy(strategy: str) -> str:
    return f'llm.strategy: unknown strategy "{strategy}"; expected one of {", ".join(STRATEGIES)}'


def _check_block(raw: LLMConfig) -> list[str]:
    problems = []
    if raw.strategy not in STRATEGIES:
        problems.append(_unknown_strategy(raw.strategy))
    if raw.retry_max_delay < raw.retry_base_delay:
        problems.append(f"llm.retry_max_delay: {raw.retry_max_delay} is below retry_base_delay "
                        f"{raw.retry_base_delay}; raise retry_max_delay or lower retry_base_delay")
    if raw.usage_store and not (raw.usage_store == "memory" or raw.usage_store.startswith("sqlite:///")):
        problems.append(f'llm.usage_store: expected memory or sqlite:///path/usage.db, got "{raw.usage_store}"')
    if raw.shared_state and not raw.shared_state.startswith(REDIS_SCHEMES):
        problems.append(f'llm.shared_state: expected {REDIS_EXPECTED}, got "{redact_url(raw.shared_state)}"')
    if raw.missing_keys not in MISSING_KEYS:
        problems.append(f'llm.missing_keys: expected error (the default: a backend whose key is not set '
                        f'is a config error) or skip (run without it), got "{raw.missing_keys}"')
    problems += _budget_problems(raw.budgets)
    problems += _check_telemetry(raw.telemetry)
    problems += _check_gateway(raw.gateway)
    for key in raw.pricing:
        if not key.strip():
            problems.append('llm.pricing: an empty model name; use a model name such as "grok-4.1" '
                            'or a pattern such as "grok-*"')
    if "{" in raw.redis_prefix or "}" in raw.redis_prefix:
        problems.append(f'llm.redis_prefix: "{raw.redis_prefix}" holds {{ or }}, which would change the '
                        f"Redis Cluster hash tags of the keys; use letters, digits, '.', '_', '-' or ':'")
    return problems


def _budget_problems(budgets: list[BudgetConfig]) -> list[str]:
    problems = []
    for i, b in enumerate(budgets):
        where = f"llm.budgets[{i}]"
        if b.scope not in ("agent", "thread", "global") and not (
                b.scope.startswith("metadata.") and b.scope[len("metadata."):].strip()):
            hint = " (name the key: metadata.org_id)" if b.scope.startswith("metadata") else ""
            problems.append(f'{where}.scope: unknown scope "{b.scope}"{hint}; expected one of '
                            f"{', '.join(BUDGET_SCOPES)}")
        if b.window not in BUDGET_WINDOWS:
            problems.append(f'{where}.window: unknown window "{b.window}"; expected one of '
                            f"{', '.join(BUDGET_WINDOWS)}")
        if b.max_tokens is None and b.max_usd is None:
            problems.append(f"{where}: no limit; set max_tokens, max_usd or both")
        bad = [p for p in b.warn_at if not 1 <= p <= 100]
        if bad:
            problems.append(f"{where}.warn_at: {bad} outside 1..100; use percentages such as [75, 90, 95]")
        if b.scope == "global" and b.match != "*":
            problems.append(f"{where}.match: a global budget matches every call; remove match")
    return problems


def _check_models(models: Mapping[str, list[str]], backends: list[ResolvedBackend],
                  skipped: list[tuple[str, str]]) -> list[str]:
    """``llm.models``: each alias a new name standing for models that some backend serves."""
    from .errors import ModelNotFoundError
    from .routing import Routes

    routes = Routes(backends, skipped)
    problems = []
    for alias, members in models.items():
        where = f'llm.models["{alias}"]'
        if not alias.strip():
            problems.append('llm.models: an empty alias name; use a name such as "smart"')
            continue
        shadowed = [b.name for b in backends if not b.catch_all and _serves(b, alias)]
        if shadowed:
            problems.append(f'{where}: the alias "{alias}" is a model that {", ".join(shadowed)} serves by '
                            f"its model rule, so the alias would hide it; rename the alias to a name no "
                            f"backend serves, such as smart or fast")
        if not members:
            problems.append(f"{where}: empty list; expected {EXPECTED['alias']}")
        for j, member in enumerate(members):
            problems += _member_problem(f"{where}[{j}]", alias, member, members[:j], models, routes,
                                        ModelNotFoundError)
    return problems


def _serves(b: ResolvedBackend, model: str) -> bool:
    from .providers import matches

    return matches(model, b.model_rule)


def _member_problem(where: str, alias: str, member: str, before: list[str], models: Mapping[str, Any],
                    routes: Any, not_found: type[Exception]) -> list[str]:
    if not member.strip():
        return [f"{where}: an empty model name; expected {EXPECTED['alias_member']}"]
    if member == alias:
        return [f'{where}: the alias "{alias}" names itself; list the models it stands for']
    if member in models:
        return [f'{where}: "{member}" is another alias, and aliases do not nest; list its models '
                f"({', '.join(models[member])}) here instead"]
    if member in before:
        return [f'{where}: "{member}" is listed twice; remove the second one']
    try:
        routes.route(member)
    except not_found:
        return [f'{where}: no backend serves model "{member}"; add it to a backend\'s supported_models '
                f"or remove it from the alias"]
    return []


def _check_telemetry(t: TelemetryConfig) -> list[str]:
    import importlib.util

    problems = []
    for i, key in enumerate(t.group_by_metadata):
        if not key.strip() or key.startswith("metadata."):
            problems.append(f"llm.telemetry.group_by_metadata[{i}]: expected a metadata key such as org_id "
                            f"(without metadata.), got {json.dumps(key)}")
    if t.prometheus_port is not None:
        if not t.otel:
            problems.append("llm.telemetry.prometheus_port: set while llm.telemetry.otel is false; remove "
                            "one of them (the Prometheus endpoint serves the OpenTelemetry metrics)")
        elif importlib.util.find_spec("opentelemetry") is None or \
                importlib.util.find_spec("prometheus_client") is None:
            problems.append("llm.telemetry.prometheus_port: needs OpenTelemetry and its Prometheus exporter; "
                            "pip install 'xml-pipeline-llm[otel]', or remove prometheus_port")
    if not t.prometheus_host.strip():
        problems.append('llm.telemetry.prometheus_host: expected an address such as 127.0.0.1, got ""')
    return problems


def _check_gateway(g: GatewayConfig) -> list[str]:
    """``llm.gateway``: each key named once (key_env or key_sha256), well formed.

    Whether a ``key_env`` variable is set is checked when the gateway starts
    (``xml-pipeline-llm serve``), not here: programs that only call the router
    with the same file need not hold the gateway's keys.
    """
    problems = []
    if not g.host.strip():
        problems.append('llm.gateway.host: expected an address such as 127.0.0.1, got ""')
    for i, k in enumerate(g.keys):
        where = f"llm.gateway.keys[{i}]"
        if (k.key_env is None) == (k.key_sha256 is None):
            problems.append(f"{where}: expected exactly one of key_env (an environment variable holding the "
                            f"key) or key_sha256 (the key's SHA-256 in hex)")
        if k.key_env is not None and not _ENV_NAME.fullmatch(k.key_env):
            problems.append(f"{where}.key_env: expected the name of an environment variable, such as TEAM_KEY, "
                            f"got a value that is not one; if it is the key itself, put it in .env as a "
                            f"variable and name that variable here")
        if k.key_sha256 is not None and not re.fullmatch(r"[0-9a-fA-F]{64}", k.key_sha256):
            problems.append(f"{where}.key_sha256: expected 64 hexadecimal digits (the output of "
                            f"`printf %s \"$KEY\" | sha256sum`), got {len(k.key_sha256)} characters")
        if not k.agent.strip():
            problems.append(f'{where}.agent: expected an agent id or "*", got ""')
        if k.models is not None and (not k.models or not all(m.strip() for m in k.models)):
            problems.append(f"{where}.models: expected a non-empty list of model names, aliases or patterns "
                            f"(remove the key to allow every model)")
    return problems


def _resolve_backends(raw: LLMConfig, problems: list[str],
                      skipped: list[tuple[str, str, str]]) -> list[ResolvedBackend]:
    """The backends ready for the router; with ``missing_keys: skip`` those without a key go to
    ``skipped`` as (place, name, variable)."""
    out: list[ResolvedBackend] = []
    seen: dict[str, int] = {}
    for i, cfg in enumerate(raw.backends):
        where = f"llm.backends[{i}]"
        provider = lookup(cfg.provider)
        if provider is None:
            problems.append(_unknown_provider(where, cfg.provider))
            continue
        name = cfg.name or cfg.provider
        if not name.replace("-", "").replace("_", "").replace(".", "").isalnum():
            problems.append(f'{where}.name: expected letters, digits, ".", "_" or "-", got "{name}"')
        if name in seen:
            problems.append(f'{where}.name: duplicate backend name "{name}" (also llm.backends[{seen[name]}]); '
                            f"give each backend of the same provider its own name")
        seen[name] = i
        if not provider.model_rule and not provider.catch_all and not cfg.supported_models:
            problems.append(f"{where}.supported_models: required for provider {cfg.provider}, which has "
                            f"no built-in model rule; list the models it serves, e.g. [llama-3.3-70b]")
        if cfg.supported_models is not None and not cfg.supported_models:
            problems.append(f"{where}.supported_models: empty list; list at least one model or remove the key")
        if cfg.base_url is not None:
            _check_base_url(f"{where}.base_url", cfg.base_url, problems)
        missing: list[str] = []
        key, key_source = _resolve_key(where, cfg, provider, missing)
        if missing and raw.missing_keys == "skip" and key_source.endswith("(not set)"):
            skipped.append((where, name, key_source.split()[0]))
            continue
        problems += missing
        out.append(ResolvedBackend(cfg, i, provider, key, key_source, raw.timeout, raw.drop_params))
    return out


def _check_base_url(where: str, url: str, problems: list[str]) -> None:
    """An http(s) URL with a host and no credentials, caught here rather than at the first call."""

    try:
        parts = urlsplit(url)
        _ = parts.port                                 # raises ValueError on a bad port
    except ValueError as exc:
        problems.append(f'{where}: "{redact_url(url)}" is not a valid URL ({exc}); '
                        f"expected a URL such as http://localhost:11434")
        return
    if parts.scheme not in ("http", "https") or not parts.hostname:
        problems.append(f'{where}: expected an http:// or https:// URL with a host, such as '
                        f'http://localhost:11434, got "{redact_url(url)}"')
    elif parts.username is not None or parts.password is not None:
        problems.append(f'{where}: "{redact_url(url)}" holds a user name or password, which the '
                        f"provider's HTTP client does not send; remove it from the URL and put the "
                        f"provider's key in an environment variable named by api_key_env")


def _resolve_key(where: str, cfg: BackendConfig, provider: Provider,
                 problems: list[str]) -> tuple[SecretStr | None, str]:
    """Find the backend's key without ever putting its value in a message."""
    if cfg.api_key is not None:
        log.warning("%s.api_key: a key written in the config file; prefer api_key_env "
                    "naming an environment variable (or .env entry)", where)
        return cfg.api_key, "api_key (inline)"
    if cfg.api_key_env is not None and not _ENV_NAME.fullmatch(cfg.api_key_env):
        # Most often the key itself pasted here: never echo it.
        problems.append(f"{where}.api_key_env: expected the name of an environment variable, such as "
                        f"XAI_API_KEY, got a value that is not one; if it is the key itself, put it in "
                        f".env as a variable and name that variable here")
        return None, "api_key_env (invalid)"
    var = cfg.api_key_env or provider.key_env
    if var is None:
        return None, "none needed" if provider.keyless else "LiteLLM default"
    value = os.environ.get(var)
    if value:
        return SecretStr(value), f"{var} (set)"
    if cfg.api_key_env is None and (cfg.base_url or provider.keyless):
        return None, "none"   # an OpenAI-compatible local server needs no key
    if provider.keyless:
        return None, f"{var} (not set)"
    problems.append(f"{where}.api_key_env: environment variable {var} is not set; "
                    f"export it or add {var}=... to .env (or set llm.missing_keys: skip to run "
                    f"without the backends that have no key)")
    return None, f"{var} (not set)"


def _unknown_provider(where: str, name: str) -> str:
    hint = difflib.get_close_matches(name, [*BUILTIN, *LITELLM_PROVIDERS], n=1)
    did = f'; did you mean "{hint[0]}"?' if hint else ""
    return (f'{where}.provider: unknown provider "{name}"{did} '
            f"Use xai, anthropic, openai, ollama or any LiteLLM provider name (groq, mistral, gemini, ...)")


def _describe(err: Mapping[str, Any], block: Mapping[str, Any]) -> str:
    """One pydantic error as ``llm.backends[1].rate_limit_tpm: expected ..., got ...``."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[")))]
    path, field = _place(loc)
    if err["type"] == "extra_forbidden":
        return _unknown_key(path, str(loc[-1]), loc)
    if err["type"] == "missing":
        return f"{path}: required key missing; expected {EXPECTED.get(field, 'a value')}"
    if field == "backends" and err["type"] in ("too_short", "list_type"):
        return f"llm.backends: expected a non-empty list of backends, got {_show(err.get('input'))}"
    if field in ("secret_str", "api_key"):   # never echo what might be a key
        return f"{path}: expected {EXPECTED['api_key']}, got a {type(err.get('input')).__name__}"
    return f"{path}: expected {EXPECTED.get(field, err['msg'])}, got {_show(err.get('input'))}"


def _place(loc: list[Any]) -> tuple[str, str]:
    """``llm.pricing["grok-4.1"].input_per_mtok`` and the field whose EXPECTED text applies."""
    if loc[:1] == ["gateway"]:
        if "metadata" in loc:          # a metadata value: drop the union member tags (str, int, ...)
            loc = loc[:loc.index("metadata") + 2]
        names = [p for p in loc if isinstance(p, str)]
        return ("llm" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc),
                "gateway.metadata" if "metadata" in names else f"gateway.{names[-1]}")
    keyed = len(loc) >= 2 and loc[0] in ("pricing", "models")     # mappings keyed by model or alias
    path = "llm" + "".join(f'["{p}"]' if keyed and i == 1 else f"[{p}]" if isinstance(p, int) else f".{p}"
                           for i, p in enumerate(loc))
    if keyed and loc[0] == "models":
        return path, "alias" if len(loc) == 2 else "alias_member"
    if keyed and len(loc) == 2:
        return path, "price"
    return path, next((p for p in reversed(loc) if isinstance(p, str)), "")


def _unknown_key(path: str, key: str, loc: list[Any]) -> str:
    model: type[BaseModel] = (ModelPrice if loc[:1] == ["pricing"] else BackendConfig if loc[:1] == ["backends"]
             else BudgetConfig if loc[:1] == ["budgets"] else AgentConfig if loc[:1] == ["agents"]
             else TelemetryConfig if loc[:1] == ["telemetry"]
             else GatewayKeyConfig if loc[:2] == ["gateway", "keys"]
             else GatewayConfig if loc[:1] == ["gateway"] else GuardsConfig if loc[:1] == ["guards"]
             else LLMConfig)
    if loc[:1] == ["budgets"] and "degrade" in loc[:-1]:
        model = DegradeConfig
    valid = list(model.model_fields)
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    did = f'did you mean "{hint[0]}"? ' if hint else ""
    return f"{path}: unknown key; {did}valid keys are {', '.join(valid)}"


def _show(value: Any) -> str:
    """A found value for an error message (YAML-ish, never a secret: keys are not echoed)."""
    if isinstance(value, SecretStr):
        return "a secret"
    value = redact_mapping(value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
