"""The ``llm:`` block of organism.yaml, validated at load time.

Every mistake becomes one line of a ``ConfigError`` that names the place, what
was expected, what was found and the fix, so that a wrong config fails when the
organism starts, not at its first request hours later.

``schema.py`` holds the pydantic models, ``load.py`` finds and reads the block,
``validate.py`` checks it and resolves the backends, ``resolved.py`` is the
``RouterConfig`` the router reads (its backends are ``backends.ResolvedBackend``).
"""

from ..backends import ResolvedBackend
from ..env import CONFIG_ENV, REDIS_ENV, REDIS_SCHEMES
from ..errors import ConfigError
from .load import config_file, load_config, read_llm_block
from .resolved import RouterConfig, resolve_store
from .schema import (
    STRATEGIES,
    AgentConfig,
    BackendConfig,
    BudgetConfig,
    GatewayConfig,
    GatewayKeyConfig,
    LLMConfig,
    ModelPrice,
    TelemetryConfig,
)

__all__ = [
    "CONFIG_ENV", "REDIS_ENV", "REDIS_SCHEMES", "STRATEGIES",
    "AgentConfig", "BackendConfig", "BudgetConfig", "ConfigError", "GatewayConfig", "GatewayKeyConfig",
    "LLMConfig", "ModelPrice", "ResolvedBackend", "RouterConfig", "TelemetryConfig",
    "config_file", "load_config", "read_llm_block", "resolve_store",
]
