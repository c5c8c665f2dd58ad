"""Run-time backend records: a configured backend with its key resolved, as the router uses it.

Plain classes (no pydantic): routing, strategies and the request path import them
without the config schema.
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from .providers import Provider

if TYPE_CHECKING:
    from pydantic import SecretStr

    from .config.schema import BackendConfig


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

