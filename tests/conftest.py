"""Shared fixtures: one provider simulator for the session, routers built against it.

Every test goes through LiteLLM's real HTTP code to the simulator on
127.0.0.1; nothing of LiteLLM or of the package is mocked.
"""

from __future__ import annotations

import asyncio
import os
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

# LiteLLM must never reach the network from the tests.
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


async def until(condition: Callable[[], bool], timeout: float = 10.0, interval: float = 0.01) -> bool:
    """Poll ``condition`` until it holds or ``timeout`` seconds pass; whether it held."""
    deadline = time.monotonic() + timeout
    while not condition():
        if time.monotonic() >= deadline:
            return False
        await asyncio.sleep(interval)
    return True


class SuccessCallbacks:
    """Counts LiteLLM's success callbacks with a CustomLogger of the test suite's own.

    It is registered once, after the package's own callback (LiteLLM copies its
    callback lists on first use, so a logger added later may not be called for
    every kind of call); LiteLLM runs the callbacks of one call in list order,
    so once this one has seen a call, the package's callback for it has run too.
    ``count`` is the number seen since this object was made.
    """

    _seen = 0
    _registered = False

    def __init__(self, sim: Simulator) -> None:
        if not SuccessCallbacks._registered:
            # the package imports LiteLLM and registers its callback first
            make_router([backend(sim, "openai", "cb-warm-up")]).warm_up()
            import litellm
            from litellm.integrations.custom_logger import CustomLogger

            class Counter(CustomLogger):  # type: ignore[misc]
                async def async_log_success_event(self, kwargs: Any, response_obj: Any,
                                                  start_time: Any, end_time: Any) -> None:
                    SuccessCallbacks._seen += 1

            litellm.callbacks = [*litellm.callbacks, Counter()]
            SuccessCallbacks._registered = True
        self._start = SuccessCallbacks._seen

    @property
    def count(self) -> int:
        return SuccessCallbacks._seen - self._start


@pytest.fixture
def success_callbacks(sim: Simulator) -> SuccessCallbacks:
    return SuccessCallbacks(sim)


# A usage ledger as the first versions wrote it (no requested_model, no metadata column), one row.
OLD_LEDGER = """
CREATE TABLE usage_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL, agent_id TEXT, thread_id TEXT, model TEXT, backend TEXT,
    provider TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER,
    cost_usd REAL, latency_ms REAL, outcome TEXT, call_id TEXT
);
INSERT INTO usage_events (timestamp, agent_id, thread_id, model, backend, provider, prompt_tokens,
    completion_tokens, total_tokens, cost_usd, latency_ms, outcome, call_id)
    VALUES (1700000000.0, 'old', '', 'grok-4.1', ?, 'xai', ?, ?, ?, NULL, ?, 'ok', 'c-old');
"""


def old_ledger(path: Any, backend: str, tokens: tuple[int, int], latency_ms: float) -> None:
    """Write ``OLD_LEDGER`` at ``path`` with one event of ``backend`` (prompt, completion tokens)."""
    import sqlite3

    create, insert = OLD_LEDGER.split("INSERT", 1)
    with sqlite3.connect(path) as conn:
        conn.executescript(create)
        conn.execute("INSERT " + insert.strip().rstrip(";"),
                     (backend, tokens[0], tokens[1], sum(tokens), latency_ms))
    conn.close()
