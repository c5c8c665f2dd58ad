"""Validating the ``llm:`` block: every mistake one line naming the place, what was expected and the fix."""

from __future__ import annotations

import difflib
import importlib.util
import json
import logging
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

from pydantic import SecretStr, ValidationError

from ..backends import ResolvedBackend
from ..env import REDIS_ENV, REDIS_SCHEMES
from ..errors import ConfigError, ModelNotFoundError
from ..providers import BUILTIN, LITELLM_PROVIDERS, Provider, lookup, matches
from ..redact import redact_url
from ..routing import Routes
from ..strategies import is_strategy
from .cache import cache_problems
from .guards import guard_problems
from .messages import describe
from .resolved import RouterConfig
from .schema import (
    _ENV_NAME,
    BUDGET_SCOPES,
    BUDGET_WINDOWS,
    EXPECTED,
    MISSING_KEYS,
    REDIS_EXPECTED,
    STRATEGIES,
    BackendConfig,
    BudgetConfig,
    GatewayConfig,
    LLMConfig,
    TelemetryConfig,
)

log = logging.getLogger("xml_pipeline_llm")

# ------------------------------------------------------------- validation

def validate_block(block: Mapping[str, Any], source: str, base: Path | None) -> RouterConfig:
    block = dict(block)
    custom = block.pop("strategy") if is_strategy(block.get("strategy")) else None
    if isinstance(block.get("strategy"), str):
        block["strategy"] = block["strategy"].strip().lower().replace("_", "-")
    try:
        raw = LLMConfig.model_validate(block)
    except ValidationError as exc:
        found = list(dict.fromkeys(describe(e, block) for e in exc.errors()))
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
    problems += cache_problems(raw.cache, raw.shared_state or os.environ.get(REDIS_ENV))
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
