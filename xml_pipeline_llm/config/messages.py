"""How a mistake in the ``llm:`` block is said: the place (``llm.backends[1].rate_limit_tpm``), what
was expected, what was found, and a did-you-mean for an unknown key."""

from __future__ import annotations

import difflib
import json
from collections.abc import Mapping
from typing import Any

from pydantic import BaseModel, SecretStr

from ..circuit import CircuitConfig
from ..redact import redact_mapping
from .cache import CacheConfig, cache_place
from .guards import DegradeConfig, GuardsConfig
from .schema import (
    EXPECTED,
    AgentConfig,
    BackendConfig,
    BudgetConfig,
    GatewayConfig,
    GatewayKeyConfig,
    LLMConfig,
    ModelPrice,
    TelemetryConfig,
)


def describe(err: Mapping[str, Any], block: Mapping[str, Any]) -> str:
    """One pydantic error as ``llm.backends[1].rate_limit_tpm: expected ..., got ...``."""
    loc = [p for p in err["loc"] if not (isinstance(p, str) and p.startswith(("function-", "list[")))]
    path, field = (_place(loc) if loc[:1] != ["cache"] else cache_place(loc)) if "circuit" not in loc \
        else _circuit_place(loc)     # llm.circuit, a backend's
    if err["type"] == "extra_forbidden":
        return _unknown_key(path, str(loc[-1]), loc)
    if err["type"] == "missing":
        return f"{path}: required key missing; expected {EXPECTED.get(field, 'a value')}"
    if field == "backends" and err["type"] in ("too_short", "list_type"):
        return f"llm.backends: expected a non-empty list of backends, got {show(err.get('input'))}"
    if field in ("secret_str", "api_key"):   # never echo what might be a key
        return f"{path}: expected {EXPECTED['api_key']}, got a {type(err.get('input')).__name__}"
    return f"{path}: expected {EXPECTED.get(field, err['msg'])}, got {show(err.get('input'))}"


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


def _circuit_place(loc: list[Any]) -> tuple[str, str]:
    """``llm.backends[0].circuit.window`` and its EXPECTED key (``circuit.window``)."""
    names = [p for p in loc if isinstance(p, str)]
    path = "llm" + "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in loc)
    return path, "circuit" if names[-1] == "circuit" else f"circuit.{names[-1]}"


def _unknown_key(path: str, key: str, loc: list[Any]) -> str:
    model: type[BaseModel] = (
        ModelPrice if loc[:1] == ["pricing"] else BackendConfig if loc[:1] == ["backends"]
        else BudgetConfig if loc[:1] == ["budgets"] else AgentConfig if loc[:1] == ["agents"]
        else TelemetryConfig if loc[:1] == ["telemetry"]
        else GatewayKeyConfig if loc[:2] == ["gateway", "keys"]
        else GatewayConfig if loc[:1] == ["gateway"] else GuardsConfig if loc[:1] == ["guards"]
        else CacheConfig if loc[:1] == ["cache"] else LLMConfig)
    if loc[:1] == ["budgets"] and "degrade" in loc[:-1]:
        model = DegradeConfig
    if "circuit" in loc[:-1]:
        model = CircuitConfig
    valid = list(model.model_fields)
    hint = difflib.get_close_matches(key, valid, n=1, cutoff=0.6)
    did = f'did you mean "{hint[0]}"? ' if hint else ""
    return f"{path}: unknown key; {did}valid keys are {', '.join(valid)}"


def show(value: Any) -> str:
    """A found value for an error message (YAML-ish, never a secret: keys are not echoed)."""
    if isinstance(value, SecretStr):
        return "a secret"
    value = redact_mapping(value)
    try:
        text = json.dumps(value)
    except (TypeError, ValueError):
        text = repr(value)
    return text if len(text) <= 60 else text[:57] + "..."
