"""The provider table: how a ``provider:`` name in organism.yaml maps onto LiteLLM.

A provider entry says which LiteLLM model prefix to use, which models it serves
when the backend lists none (its *model rule*), which environment variable holds
its key by default, and how its ``base_url`` is written for LiteLLM.  Providers
that LiteLLM knows but this table does not are still usable: they get their own
name as prefix and must list ``supported_models``.
"""

from __future__ import annotations

from dataclasses import dataclass
from fnmatch import fnmatchcase


@dataclass(frozen=True)
class Provider:
    name: str
    litellm_prefix: str
    model_rule: tuple[str, ...] = ()   # shell patterns; empty = none built in
    key_env: str | None = None         # default api_key_env
    keyless: bool = False              # local servers that need no key
    catch_all: bool = False            # serves any model when no list is given
    strip_v1: bool = False             # LiteLLM appends /v1/... itself

    def normalise_base_url(self, url: str) -> str:
        """Accept a base URL as the provider documents it and write it as LiteLLM wants it.

        Anthropic documents ``https://api.anthropic.com/v1`` but LiteLLM appends
        ``/v1/messages`` itself; Ollama's root is used with ``/api/chat``.
        OpenAI-compatible URLs keep their ``/v1``.
        """
        url = url.rstrip("/")
        if self.strip_v1 and url.endswith("/v1"):
            url = url[: -len("/v1")]
        if self.name == "ollama" and url.endswith("/api"):
            url = url[: -len("/api")]
        return url


BUILTIN: dict[str, Provider] = {
    p.name: p
    for p in (
        Provider("xai", "xai", ("grok-*",), "XAI_API_KEY"),
        Provider("anthropic", "anthropic", ("claude-*",), "ANTHROPIC_API_KEY", strip_v1=True),
        Provider("openai", "openai", ("gpt-*", "o1*", "o3*", "o4*", "chatgpt-*"), "OPENAI_API_KEY"),
        # ollama_chat/ is LiteLLM's path to Ollama's /api/chat (tools, system prompts).
        Provider("ollama", "ollama_chat", (), None, keyless=True, catch_all=True, strip_v1=True),
    )
}

# Local servers that LiteLLM reaches without a key.
KEYLESS = frozenset({"ollama", "ollama_chat", "lm_studio", "llamafile", "hosted_vllm", "vllm",
                     "xinference", "oobabooga", "docker_model_runner", "lemonade"})

# Provider names LiteLLM 1.110 accepts as a model prefix (litellm.provider_list).
# Kept here so that validating a config does not import LiteLLM (seconds);
# tests/test_providers.py checks it against the installed LiteLLM.
LITELLM_PROVIDERS = frozenset("""
a2a_agent ai21 ai21_chat aiml aiohttp_openai amazon_nova anthropic anthropic_text apertis azure
azure_ai azure_text baseten bedrock bedrock_mantle bytez cerebras chatgpt chutes clarifai cloudflare
codestral cohere cohere_chat cometapi compactifai cortecs custom custom_openai dashscope databricks
datarobot deepinfra deepseek docker_model_runner empower featherless_ai fireworks_ai friendliai
galadriel gemini gigachat github github_copilot gradient_ai groq heroku hosted_vllm huggingface
hyperbolic inception lambda_ai lemonade llamafile lm_studio maritalk meta_llama minimax mistral
moonshot morph nebius nlp_cloud novita nscale nvidia_nim oci ollama ollama_chat oobabooga openai
openai_like openrouter ovhcloud perplexity petals predibase replicate sagemaker sagemaker_chat
sambanova snowflake together_ai triton v0 vercel_ai_gateway vertex_ai vllm volcengine watsonx
xai xinference zai
""".split())


def lookup(name: str) -> Provider | None:
    """The table entry for ``name``, or a generic one for any other LiteLLM provider."""
    if name in BUILTIN:
        return BUILTIN[name]
    if name in LITELLM_PROVIDERS:
        return Provider(name, name, keyless=name in KEYLESS)
    return None


def matches(model: str, patterns: tuple[str, ...]) -> bool:
    """True when ``model`` equals or shell-matches one of ``patterns`` (case-insensitive)."""
    m = model.lower()
    return any(fnmatchcase(m, p.lower()) for p in patterns)
