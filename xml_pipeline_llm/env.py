"""Names the package reads from its surroundings: environment variables and Redis URL schemes.

A leaf module without pydantic, so the CLI and the stores can use them cheaply.
"""

#: the organism file when none is given (else ./organism.yaml)
CONFIG_ENV = "XML_PIPELINE_LLM_CONFIG"
#: the shared state's Redis URL when ``llm.shared_state`` is not set
REDIS_ENV = "XML_PIPELINE_LLM_REDIS_URL"
#: what names a Redis server: one (TLS with rediss://, a socket with unix://) or a Redis Cluster
REDIS_SCHEMES = ("redis://", "rediss://", "unix://", "redis+cluster://", "rediss+cluster://")

#: LiteLLM's run-time fetches (cost map, Anthropic beta headers) and telemetry, off unless the user
#: chose otherwise.  Set on import, so a program that imports LiteLLM itself afterwards fetches nothing.
OFFLINE_DEFAULTS = {
    "LITELLM_LOCAL_MODEL_COST_MAP": "True",
    "LITELLM_OFFLINE_MODE": "true",
    "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True",
    "LITELLM_TELEMETRY": "False",
}
