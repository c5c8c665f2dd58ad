"""Shared fixtures: one provider simulator for the session, routers built against it.

Every test goes through LiteLLM's real HTTP code to the simulator on
127.0.0.1; nothing of LiteLLM or of the package is mocked.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from typing import Any

import pytest

# LiteLLM must never reach the network from the tests (contract C1).
for _k, _v in {"LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true",
               "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True"}.items():
    os.environ.setdefault(_k, _v)

from xml_pipeline_llm import LLMRouter, load_config  # noqa: E402
from xml_pipeline_llm.simulator import Simulator, run_simulator  # noqa: E402

FAKE_KEYS = {"TEST_XAI_KEY": "xai-test-0000secret1111", "TEST_ANTHROPIC_KEY": "sk-ant-test-2222secret3333",
             "TEST_OPENAI_KEY": "sk-test-4444secret5555"}


@pytest.fixture(scope="session")
def sim() -> Iterator[Simulator]:
    with run_simulator() as server:
        yield server


@pytest.fixture(autouse=True)
def _fake_keys(monkeypatch: pytest.MonkeyPatch) -> None:
    for k, v in FAKE_KEYS.items():
        monkeypatch.setenv(k, v)


def backend(sim: Simulator, provider: str, name: str, **extra: Any) -> dict[str, Any]:
    """A backend entry pointing at the simulator (each test should use its own names)."""
    keys = {"xai": "TEST_XAI_KEY", "anthropic": "TEST_ANTHROPIC_KEY", "openai": "TEST_OPENAI_KEY"}
    entry: dict[str, Any] = {"provider": provider, "name": name,
                             "base_url": sim.base_url(name, provider)}
    if provider in keys:
        entry["api_key_env"] = keys[provider]
    entry.update(extra)
    return entry


def make_router(backends: list[dict[str, Any]], **llm: Any) -> LLMRouter:
    """A fresh router for one test: small retry delays unless the test says otherwise."""
    block = {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 10, **llm,
             "backends": backends}
    return LLMRouter(load_config({"llm": block}))


MESSAGES = [{"role": "system", "content": "You are terse."},
            {"role": "user", "content": "say hello to the test suite please"}]
