"""The public API: names, cheap import, configure_router, any event loop."""

from __future__ import annotations

import asyncio
import dataclasses
import inspect
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
from conftest import MESSAGES, backend, make_router

import xml_pipeline_llm
from xml_pipeline_llm import (
    AgentUsage,
    BackendError,
    BadRequestError,
    ConfigError,
    LLMResponse,
    ModelNotFoundError,
    ProviderError,
    RateLimitError,
    complete,
    configure_router,
    get_router,
    stream,
)

REPO = Path(__file__).resolve().parents[1]
C1_NAMES = ["complete", "stream", "get_router", "configure_router", "load_config", "LLMResponse",
            "AgentUsage", "BackendError", "ModelNotFoundError", "BadRequestError", "RateLimitError",
            "ProviderError", "ConfigError"]


def run_python(code: str, timeout: float = 60, env: dict[str, str] | None = None) -> str:
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=REPO, capture_output=True,
                          text=True, timeout=timeout, env={**os.environ, **(env or {})})
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


# ------------------------------------------------------------ import cost and names

def test_import_is_cheap_and_does_not_import_litellm():
    out = run_python("""
        import sys, time
        start = time.perf_counter()
        import xml_pipeline_llm
        took = time.perf_counter() - start
        print(took, 'litellm' in sys.modules)
    """, timeout=30)
    took, imported = out.split()
    assert imported == "False", "import xml_pipeline_llm must not import LiteLLM"
    assert float(took) < 1.0, f"import xml_pipeline_llm took {took}s"


def test_loading_a_config_does_not_import_litellm():
    out = run_python("""
        import sys
        from xml_pipeline_llm import LLMRouter, load_config
        cfg = load_config({"llm": {"backends": [{"provider": "ollama"}]}})
        LLMRouter(cfg).route("llama3")
        print('litellm' in sys.modules)
    """, timeout=30)
    assert out.strip() == "False"


def test_public_names_exist_and_are_exported():
    for name in C1_NAMES:
        assert hasattr(xml_pipeline_llm, name), name
        assert name in xml_pipeline_llm.__all__, name
    for name in xml_pipeline_llm.__all__:
        assert hasattr(xml_pipeline_llm, name), f"__all__ lists missing {name}"


def test_extension_points_are_exported_lazily():
    """``Strategy`` and the state Protocols come from the package, without importing their modules early."""
    out = run_python("""
        import sys
        import xml_pipeline_llm
        early = [m for m in ('xml_pipeline_llm.state', 'xml_pipeline_llm.strategies') if m in sys.modules]
        from xml_pipeline_llm import BackendGate, SharedUsage, State, Strategy
        import xml_pipeline_llm.state as state, xml_pipeline_llm.strategies as strategies
        same = (State is state.State and BackendGate is state.BackendGate and SharedUsage is state.SharedUsage
                and Strategy is strategies.Strategy)
        listed = all(n in xml_pipeline_llm.__all__ for n in ("Strategy", "State", "BackendGate", "SharedUsage"))
        print(early, same, listed)
    """, timeout=30)
    assert out.split() == ["[]", "True", "True"], out


def test_public_shapes():
    assert inspect.iscoroutinefunction(complete)
    params = inspect.signature(complete).parameters
    assert list(params)[:2] == ["model", "messages"]
    for kw in ("agent_id", "thread_id", "metadata"):
        assert params[kw].kind is inspect.Parameter.KEYWORD_ONLY and params[kw].default is None
    assert any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values())
    assert inspect.signature(stream).parameters.keys() == params.keys()
    assert dataclasses.is_dataclass(LLMResponse)
    fields = {f.name for f in dataclasses.fields(LLMResponse)}
    assert {"content", "model", "usage", "finish_reason", "raw", "backend", "cost_usd", "latency_ms",
            "tool_calls"} <= fields
    assert LLMResponse("x", "m", {}, "stop").tool_calls == []
    usage = {f.name for f in dataclasses.fields(AgentUsage)} if dataclasses.is_dataclass(AgentUsage) \
        else set(vars(AgentUsage()))
    assert {"prompt_tokens", "completion_tokens", "total_tokens", "request_count", "error_count",
            "cost_usd"} <= usage
    for sub in (ModelNotFoundError, BadRequestError, RateLimitError, ProviderError):
        assert issubclass(sub, BackendError)
    assert issubclass(BackendError, Exception) and not issubclass(BackendError, ConfigError)


# ------------------------------------------------------------ configure_router

def _block(sim, name: str) -> dict:
    return {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "backends": [backend(sim, "xai", name)]}


async def test_configure_router_accepts_path_organism_and_llm_mapping(sim, tmp_path):
    import yaml

    path = tmp_path / "organism.yaml"
    path.write_text(yaml.safe_dump({"name": "o", "llm": _block(sim, "cf-path")}))
    sources = [("cf-path", path), ("cf-path", str(path)),
               ("cf-organism", {"name": "o", "agents": ["a"], "llm": _block(sim, "cf-organism")}),
               ("cf-llm", _block(sim, "cf-llm"))]
    previous = None
    for expected, source in sources:
        router = configure_router(source)
        assert get_router() is router and router is not previous
        resp = await complete("grok-4.1", MESSAGES, agent_id="cfg")
        assert resp.backend == expected
        assert get_router().get_agent_usage("cfg").request_count == 1   # fresh usage per router
        previous = router


async def test_configure_router_replaces_and_starts_empty(sim):
    first = configure_router({"llm": _block(sim, "cr-first")})
    await complete("grok-4.1", MESSAGES, agent_id="greeter")
    assert first.get_agent_usage("greeter").request_count == 1
    second = configure_router(_block(sim, "cr-second"))
    assert get_router() is second is not first
    usage = second.get_agent_usage("greeter")
    assert (usage.request_count, usage.total_tokens) == (0, 0)
    assert (await complete("grok-4.1", MESSAGES)).backend == "cr-second"
    assert sim.stats("cr-first").requests == 1


def test_configure_router_with_a_bad_config_keeps_the_old_router(sim):
    good = configure_router(_block(sim, "cr-keep"))
    with pytest.raises(ConfigError):
        configure_router({"backends": []})
    assert get_router() is good


# ------------------------------------------------------------ event loops

SCRIPT = """
import asyncio, json, os
from xml_pipeline_llm import complete, configure_router
from xml_pipeline_llm.simulator import run_simulator

MODELS = {"xai": "grok-4.1", "openai": "gpt-4o", "anthropic": "claude-sonnet-4", "ollama": "llama3"}
KEYS = {"xai": "TEST_XAI_KEY", "openai": "TEST_OPENAI_KEY", "anthropic": "TEST_ANTHROPIC_KEY"}
messages = [{"role": "user", "content": "hello there"}]

async def all_providers():
    return [(await complete(m, messages)).backend for m in MODELS.values()]

with run_simulator() as sim:
    backends = []
    for provider in MODELS:
        b = {"provider": provider, "name": "loop-" + provider, "base_url": sim.base_url("loop-" + provider, provider)}
        if provider in KEYS:
            b["api_key_env"] = KEYS[provider]
        backends.append(b)
    configure_router({"llm": {"timeout": 10, "retries": 0, "backends": backends}})
    first = asyncio.run(all_providers())
    second = asyncio.run(all_providers())
    third = asyncio.run(all_providers())
    print(json.dumps({"runs": [first, second, third],
                      "requests": {p: sim.stats("loop-" + p).requests for p in MODELS}}))
"""


def test_router_works_across_several_asyncio_runs():
    out = run_python(SCRIPT, timeout=90, env={"TEST_XAI_KEY": "k1", "TEST_OPENAI_KEY": "k2",
                                             "TEST_ANTHROPIC_KEY": "k3"})
    result = json.loads(out.strip().splitlines()[-1])
    expected = ["loop-xai", "loop-openai", "loop-anthropic", "loop-ollama"]
    assert result["runs"] == [expected] * 3
    # One try each: no request needed a retry because of a dead loop's connection.
    assert result["requests"] == {"xai": 3, "openai": 3, "anthropic": 3, "ollama": 3}


_SHARED: dict = {}
_SHARED_MODELS = {"xai": "grok-4.1", "openai": "gpt-4o", "anthropic": "claude-sonnet-4", "ollama": "llama3"}


def _shared_router(sim):
    if "router" not in _SHARED:
        _SHARED["router"] = make_router([backend(sim, p, f"shared-{p}") for p in _SHARED_MODELS], retries=0)
    return _SHARED["router"]


async def _all_through_shared(sim) -> None:
    router = _shared_router(sim)
    for provider, model in _SHARED_MODELS.items():
        resp = await router.complete(model, MESSAGES)
        assert resp.backend == f"shared-{provider}"
    _SHARED.setdefault("loops", []).append(id(asyncio.get_running_loop()))


async def test_shared_router_in_a_first_pytest_loop(sim):
    await _all_through_shared(sim)


async def test_shared_router_in_a_second_pytest_loop(sim):
    if not _SHARED.get("loops"):
        pytest.skip("needs test_shared_router_in_a_first_pytest_loop to run first")
    await _all_through_shared(sim)
    loops = _SHARED["loops"]
    assert len(loops) == 2 and loops[0] != loops[1], "expected pytest-asyncio to give each test its own loop"
    for provider in _SHARED_MODELS:
        assert sim.stats(f"shared-{provider}").requests == 2


# ------------------------------------------------------------ no stray network traffic

NO_STRAY = """
import asyncio, json, socket, threading
from xml_pipeline_llm import LLMRouter, load_config
from xml_pipeline_llm.simulator import run_simulator

# A listener standing in for any server the configuration does not name.
stray = socket.socket(); stray.bind(("127.0.0.1", 0)); stray.listen(16)
hits = []
def accept():
    while True:
        conn, _ = stray.accept(); hits.append(1); conn.close()
threading.Thread(target=accept, daemon=True).start()
import os
os.environ["OLLAMA_API_BASE"] = "http://127.0.0.1:%d" % stray.getsockname()[1]

with run_simulator() as sim:
    router = LLMRouter(load_config({"llm": {"retries": 0, "timeout": 10, "backends": [
        {"provider": "ollama", "name": "ns-ollama", "base_url": sim.base_url("ns-ollama", "ollama")}]}}))
    resp = asyncio.run(router.complete("llama3", [{"role": "user", "content": "hi"}]))
    print(json.dumps({"backend": resp.backend, "stray": len(hits)}))
"""


def test_no_request_to_a_server_the_config_does_not_name():
    out = run_python(NO_STRAY, timeout=60)
    result = json.loads(out.strip().splitlines()[-1])
    assert result["backend"] == "ns-ollama"
    assert result["stray"] == 0


async def test_the_config_is_a_litellm_router_model_list(sim):
    """The llm: block as a LiteLLM Router model list: a real Router over it reaches the backends."""
    r = make_router([backend(sim, "anthropic", "ml-ant"), backend(sim, "xai", "ml-xai")])
    llm = r.litellm_router()
    deployments = llm.registry().all() if hasattr(llm, "registry") else llm.model_list   # LiteLLM >= 1.110
    assert [d["model_name"] for d in deployments] == ["ml-ant/*", "ml-xai/*"]
    for name, model in [("ml-ant", "claude-sonnet-4-5"), ("ml-xai", "grok-4.1")]:
        resp = await llm.acompletion(model=f"{name}/{model}", messages=MESSAGES, max_tokens=16)
        assert resp.choices[0].message.content and sim.stats(name).requests == 1
