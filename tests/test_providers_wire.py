"""Each provider's wire path: through the router and LiteLLM's real
HTTP code to the simulator, checking what arrived on the wire and what came back.
"""

from __future__ import annotations

import json

import pytest
from conftest import FAKE_KEYS, MESSAGES, backend, make_router

from xml_pipeline_llm import LLMResponse

USER_TEXT = MESSAGES[-1]["content"]
SYSTEM_TEXT = MESSAGES[0]["content"]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "d", "parameters": {
    "type": "object", "properties": {"input": {"type": "string"}}}}}]

# provider -> (model, path the simulator must see, auth header, expected value)
WIRE = {
    "xai": ("grok-4.1", "/v1/chat/completions", "authorization", f"Bearer {FAKE_KEYS['TEST_XAI_KEY']}"),
    "openai": ("gpt-4o", "/v1/chat/completions", "authorization", f"Bearer {FAKE_KEYS['TEST_OPENAI_KEY']}"),
    "anthropic": ("claude-sonnet-4", "/v1/messages", "x-api-key", FAKE_KEYS["TEST_ANTHROPIC_KEY"]),
    "ollama": ("llama3", "/api/chat", None, None),
}


def system_text(system) -> str:
    """Anthropic's top-level system: a string or a list of text blocks."""
    if isinstance(system, str):
        return system
    return "".join(block["text"] for block in system)


async def call(sim, provider: str, name: str, **kwargs) -> tuple[LLMResponse, object]:
    router = make_router([backend(sim, provider, name)])
    resp = await router.complete(WIRE[provider][0], MESSAGES, **kwargs)
    return resp, sim.stats(name).last_request


@pytest.mark.parametrize("provider", list(WIRE))
async def test_path_auth_and_model_on_the_wire(sim, provider):
    name = f"wire-{provider}"
    model, path, header, value = WIRE[provider]
    resp, req = await call(sim, provider, name)
    assert req.method == "POST"
    assert req.path == f"/b/{name}{path}"
    if header is not None:
        assert req.headers[header] == value
    else:
        assert "authorization" not in req.headers and "x-api-key" not in req.headers
    if provider == "anthropic":
        assert "authorization" not in req.headers            # the key goes in x-api-key only
        assert req.headers.get("anthropic-version")
    assert req.json["model"] == model                         # no provider prefix, no backend name
    assert name not in json.dumps(req.json)
    assert sim.stats(name).requests == 1
    assert resp.backend == name


async def test_anthropic_system_prompt_is_top_level(sim):
    _, req = await call(sim, "anthropic", "wire-ant-system")
    body = req.json
    assert system_text(body["system"]) == SYSTEM_TEXT
    assert all(m["role"] != "system" for m in body["messages"])
    assert len(body["messages"]) == 1 and body["messages"][0]["role"] == "user"
    assert SYSTEM_TEXT not in json.dumps(body["messages"])


@pytest.mark.parametrize("provider", ["xai", "openai", "ollama"])
async def test_openai_style_providers_keep_the_system_message(sim, provider):
    _, req = await call(sim, provider, f"wire-sys-{provider}")
    assert [m["role"] for m in req.json["messages"]] == ["system", "user"]
    assert req.json["messages"][0]["content"] == SYSTEM_TEXT


async def test_openai_extra_kwargs_pass_through(sim):
    resp, req = await call(sim, "openai", "wire-kw-oai", temperature=0.3, max_tokens=3, stop=["zz"],
                           seed=7, top_p=0.9)
    body = req.json
    assert (body["temperature"], body["max_tokens"], body["stop"], body["seed"], body["top_p"]) == \
        (0.3, 3, ["zz"], 7, 0.9)
    # The simulator honours max_tokens: the limit really reached the provider.
    assert resp.usage["completion_tokens"] == 3 and resp.finish_reason == "length"


async def test_xai_extra_kwargs_pass_through(sim):
    # No `stop` here: LiteLLM knows grok-4 models reject it and raises UnsupportedParamsError (a 400).
    resp, req = await call(sim, "xai", "wire-kw-xai", temperature=0.3, max_tokens=3, seed=7, top_p=0.9)
    body = req.json
    assert (body["temperature"], body["max_tokens"], body["seed"], body["top_p"]) == (0.3, 3, 7, 0.9)
    assert resp.usage["completion_tokens"] == 3 and resp.finish_reason == "length"


async def test_anthropic_extra_kwargs_are_translated(sim):
    resp, req = await call(sim, "anthropic", "wire-kw-ant", temperature=0.3, max_tokens=3, stop=["zz"])
    body = req.json
    assert (body["temperature"], body["max_tokens"], body["stop_sequences"]) == (0.3, 3, ["zz"])
    assert resp.usage["completion_tokens"] == 3 and resp.finish_reason == "length"


async def test_ollama_extra_kwargs_are_translated(sim):
    resp, req = await call(sim, "ollama", "wire-kw-oll", temperature=0.3, max_tokens=3, stop=["zz"], seed=7)
    opts = req.json["options"]
    assert (opts["temperature"], opts["num_predict"], opts["stop"], opts["seed"]) == (0.3, 3, ["zz"], 7)
    assert resp.usage["completion_tokens"] == 3 and resp.finish_reason == "length"


@pytest.mark.parametrize("provider", list(WIRE))
async def test_llm_response_fields(sim, provider):
    name = f"wire-resp-{provider}"
    resp, _ = await call(sim, provider, name)
    stats = sim.stats(name)
    assert isinstance(resp, LLMResponse)
    assert resp.content == f"Hello from {name}: {' '.join(USER_TEXT.split()[:5])}"
    assert resp.usage == {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                          "total_tokens": stats.prompt_tokens + stats.completion_tokens,
                          "cached_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0}
    assert resp.usage["prompt_tokens"] > 0 and resp.usage["completion_tokens"] > 0
    assert all(type(v) is int for v in resp.usage.values())
    assert resp.finish_reason == "stop"
    assert resp.backend == name
    assert resp.latency_ms > 0
    assert resp.tool_calls == []
    assert resp.raw is not None
    if provider != "ollama":   # see test_ollama_response_model_has_no_litellm_prefix
        assert resp.model == WIRE[provider][0]


async def test_ollama_response_model_has_no_litellm_prefix(sim):
    resp, _ = await call(sim, "ollama", "wire-model-oll")
    assert resp.model == "llama3"


async def test_cost_is_none_for_an_unpriced_model_and_positive_for_a_priced_one(sim):
    router = make_router([backend(sim, "xai", "wire-cost-xai"), backend(sim, "openai", "wire-cost-oai")])
    grok = await router.complete("grok-4.1", MESSAGES)
    assert grok.cost_usd is None
    gpt = await router.complete("gpt-4o", MESSAGES)
    assert isinstance(gpt.cost_usd, float) and gpt.cost_usd > 0
    # gpt-4o's price in LiteLLM's map is in the order of dollars per million tokens.
    assert gpt.cost_usd < gpt.usage["total_tokens"] * 1e-4


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_tool_calls_come_back_in_openai_form(sim, provider):
    name = f"wire-tools-{provider}"
    router = make_router([backend(sim, provider, name)])
    model = WIRE[provider][0]
    resp = await router.complete(model, MESSAGES, tools=TOOLS)
    body = sim.stats(name).last_request.json
    if provider == "anthropic":
        assert [t["name"] for t in body["tools"]] == ["lookup"]
        assert body["tools"][0]["input_schema"]["properties"] == {"input": {"type": "string"}}
    else:
        assert body["tools"] == TOOLS
    assert resp.finish_reason == "tool_calls"
    assert len(resp.tool_calls) == 1
    call_ = resp.tool_calls[0]
    assert call_["type"] == "function" and isinstance(call_["id"], str) and call_["id"]
    assert call_["function"]["name"] == "lookup"
    assert json.loads(call_["function"]["arguments"]) == {"input": USER_TEXT}
    json.dumps(resp.tool_calls)   # plain data, not SDK objects

    # The agent loop's next turn: the tool result goes back in OpenAI form and is answered in text.
    follow = [*MESSAGES,
              {"role": "assistant", "content": None, "tool_calls": [
                  {"id": call_["id"], "type": "function", "function": call_["function"]}]},
              {"role": "tool", "tool_call_id": call_["id"], "content": "forty two"}]
    answer = await router.complete(model, follow, tools=TOOLS)
    assert answer.tool_calls == [] and answer.finish_reason == "stop" and answer.content
    sent = sim.stats(name).last_request.json["messages"]
    if provider == "anthropic":
        blocks = [b for m in sent for b in (m["content"] if isinstance(m["content"], list) else [])]
        assert any(b.get("type") == "tool_result" and b.get("tool_use_id") == call_["id"] for b in blocks)
    else:
        assert sent[-1] == {"role": "tool", "tool_call_id": call_["id"], "content": "forty two"}


async def test_openai_compatible_server_by_config(sim, monkeypatch):
    monkeypatch.delenv("OPENAI_API_KEY", raising=False)
    name = "wire-compat"
    router = make_router([{"provider": "openai", "name": name, "base_url": sim.base_url(name, "openai"),
                           "supported_models": ["my-local-model"]}])
    resp = await router.complete("my-local-model", MESSAGES, temperature=0.1)
    req = sim.stats(name).last_request
    assert req.path == f"/b/{name}/v1/chat/completions"
    assert req.json["model"] == "my-local-model" and req.json["temperature"] == 0.1
    for key in FAKE_KEYS.values():
        assert key not in json.dumps(req.headers)
    assert resp.backend == name and resp.content.startswith(f"Hello from {name}")
    assert resp.cost_usd is None


async def test_provider_not_built_in_works_by_config_alone(sim, monkeypatch):
    # LiteLLM's groq path posts to <api_base>/chat/completions, so the simulator's /v1 base works.
    monkeypatch.setenv("TEST_GROQ_KEY", "gsk-test-6666secret7777")
    name = "wire-groq"
    router = make_router([{"provider": "groq", "name": name, "api_key_env": "TEST_GROQ_KEY",
                           "base_url": sim.base_url(name, "openai"), "supported_models": ["llama-3.3-70b"]}])
    resp = await router.complete("llama-3.3-70b", MESSAGES, max_tokens=4)
    req = sim.stats(name).last_request
    assert req.path == f"/b/{name}/v1/chat/completions"
    assert req.headers["authorization"] == "Bearer gsk-test-6666secret7777"
    assert req.json["model"] == "llama-3.3-70b" and req.json["max_tokens"] == 4
    assert resp.backend == name and resp.usage["completion_tokens"] == 4


async def test_anthropic_base_url_with_v1_reaches_v1_messages(sim):
    name = "wire-ant-v1"
    router = make_router([backend(sim, "anthropic", name, base_url=sim.base_url(name, "anthropic") + "/v1")])
    resp = await router.complete("claude-sonnet-4", MESSAGES)
    assert sim.stats(name).last_request.path == f"/b/{name}/v1/messages"
    assert resp.backend == name


async def test_provider_prefix_in_the_request_is_not_sent(sim):
    name = "wire-prefix"
    router = make_router([backend(sim, "anthropic", name)])
    resp = await router.complete("anthropic/claude-sonnet-4", MESSAGES)
    assert sim.stats(name).last_request.json["model"] == "claude-sonnet-4"
    assert resp.model == "claude-sonnet-4"


async def test_the_configured_key_is_the_one_the_provider_accepts(sim):
    names = {"xai": "wire-key-xai", "anthropic": "wire-key-ant", "openai": "wire-key-oai"}
    keys = {"xai": "TEST_XAI_KEY", "anthropic": "TEST_ANTHROPIC_KEY", "openai": "TEST_OPENAI_KEY"}
    router = make_router([backend(sim, p, n) for p, n in names.items()])
    try:
        for provider, name in names.items():
            sim.require_key(name, FAKE_KEYS[keys[provider]])
            resp = await router.complete(WIRE[provider][0], MESSAGES)
            assert resp.backend == name
            assert sim.stats(name).ok == 1
    finally:
        for name in names.values():
            sim.require_key(name, None)
