"""The provider simulator, checked against LiteLLM's real HTTP code (no mocks).

Besides guarding the simulator, these tests document what each provider
failure becomes once LiteLLM has mapped it - see FAULT_OUTCOMES below - which
is what the router's retry/fallback logic has to classify.
"""

from __future__ import annotations

import asyncio
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

# Must be set before litellm is imported, or it fetches its cost map / beta headers from the internet.
os.environ.setdefault("LITELLM_LOCAL_MODEL_COST_MAP", "True")
os.environ.setdefault("LITELLM_OFFLINE_MODE", "true")
os.environ.setdefault("LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS", "True")

import aiohttp  # noqa: E402
import litellm  # noqa: E402
import pytest  # noqa: E402

from xml_pipeline_llm.simulator import Fault, Simulator, run_simulator  # noqa: E402

litellm.suppress_debug_info = True

REPO = Path(__file__).resolve().parents[1]
KEY = "sk-test-fake"
MESSAGES = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "Say hello to the whole world please"},
]
# Token rule: words of each message + 3 per message (+ words of a top-level system).
OPENAI_PROMPT = (3 + 3) + (3 + 7)  # system and user are both messages: 16
ANTHROPIC_PROMPT = 3 + (3 + 7)  # system is top-level, one message: 13
CONTENT = "Hello from {b}: Say hello to the whole"
COMPLETION = 8
TOOLS = [{"type": "function", "function": {
    "name": "lookup", "description": "Look something up",
    "parameters": {"type": "object", "properties": {"input": {"type": "string"}}, "required": ["input"]}}}]
TOOL_ARGS = {"input": "Say hello to the whole world please"}

# provider label -> (litellm model, simulator format)
PROVIDERS = {
    "openai": ("openai/gpt-4o", "openai"),
    "xai": ("xai/grok-4.1", "xai"),
    "anthropic": ("anthropic/claude-sonnet-4", "anthropic"),
    "ollama": ("ollama_chat/llama3", "ollama"),
}


@pytest.fixture(scope="module")
def sim():
    with run_simulator() as simulator:
        yield simulator


@pytest.fixture(autouse=True)
def _fresh(sim):
    sim.reset()
    yield


async def call(sim, provider: str, backend: str, **kwargs):
    """One litellm.acompletion against the simulator, retries off."""
    model, fmt = PROVIDERS[provider]
    params = {"messages": MESSAGES, "api_key": KEY, "num_retries": 0, "max_retries": 0, **kwargs}
    return await litellm.acompletion(model=model, api_base=sim.base_url(backend, fmt), **params)


async def collect(stream) -> list:
    return [chunk async for chunk in stream]


def joined_content(chunks) -> str:
    return "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)


def final_usage(chunks):
    usages = [c.usage for c in chunks if getattr(c, "usage", None) is not None]
    return usages[-1] if usages else None


# ---------------------------------------------------------------- happy paths per provider


@pytest.mark.asyncio
@pytest.mark.parametrize("provider", ["openai", "xai", "ollama"])
async def test_json_reply_and_exact_usage(sim, provider):
    backend = f"{provider}-json"
    resp = await call(sim, provider, backend)
    assert resp.choices[0].message.content == CONTENT.format(b=backend)
    assert resp.choices[0].finish_reason == "stop"
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (OPENAI_PROMPT, COMPLETION)
    stats = sim.stats(backend)
    assert (stats.requests, stats.ok, stats.in_flight) == (1, 1, 0)
    assert (stats.prompt_tokens, stats.completion_tokens) == (OPENAI_PROMPT, COMPLETION)
    assert stats.last_request.headers["authorization"] == f"Bearer {KEY}"


@pytest.mark.asyncio
async def test_wire_paths_per_provider(sim):
    expected = {"openai": "/b/w-openai/v1/chat/completions", "xai": "/b/w-xai/v1/chat/completions",
                "anthropic": "/b/w-anthropic/v1/messages", "ollama": "/b/w-ollama/api/chat"}
    for provider, path in expected.items():
        await call(sim, provider, f"w-{provider}")
        assert sim.stats(f"w-{provider}").last_request.path == path
    # LiteLLM's ollama_chat sends options and an explicit stream flag; it did not call /api/show here.
    assert sim.stats("w-ollama").last_request.json["stream"] is False


@pytest.mark.asyncio
async def test_anthropic_json_system_top_level_and_key_header(sim):
    resp = await call(sim, "anthropic", "an")
    assert resp.choices[0].message.content == CONTENT.format(b="an")
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens) == (ANTHROPIC_PROMPT, COMPLETION)
    req = sim.stats("an").last_request
    assert req.headers["x-api-key"] == KEY
    assert "anthropic-version" in req.headers
    assert req.json["system"] == [{"type": "text", "text": "You are terse."}]
    assert all(m["role"] != "system" for m in req.json["messages"])
    assert "max_tokens" in req.json  # LiteLLM fills the model's maximum when unset


@pytest.mark.asyncio
@pytest.mark.parametrize("provider", ["openai", "xai", "anthropic", "ollama"])
async def test_stream_with_include_usage(sim, provider):
    backend = f"{provider}-stream"
    chunks = await collect(await call(sim, provider, backend, stream=True,
                                      stream_options={"include_usage": True}))
    assert joined_content(chunks) == CONTENT.format(b=backend)
    prompt = ANTHROPIC_PROMPT if provider == "anthropic" else OPENAI_PROMPT
    usage = final_usage(chunks)
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (prompt, COMPLETION)
    stats = sim.stats(backend)
    assert (stats.ok, stats.completion_tokens, stats.completion_tokens_generated) == (1, COMPLETION, COMPLETION)


@pytest.mark.asyncio
async def test_openai_stream_without_stream_options(sim):
    chunks = await collect(await call(sim, "openai", "oa-nousage", stream=True))
    assert joined_content(chunks) == CONTENT.format(b="oa-nousage")
    # LiteLLM does not add stream_options itself, and then reports no usage in the chunks.
    assert "stream_options" not in sim.stats("oa-nousage").last_request.json
    assert final_usage(chunks) is None
    stats = sim.stats("oa-nousage")
    assert (stats.completion_tokens, stats.completion_tokens_generated, stats.prompt_tokens) == (0, COMPLETION, 0)


async def raw_sse(url: str, body: dict) -> list[dict]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        assert resp.headers["Content-Type"].startswith("text/event-stream")
        text = await resp.text()
    events = [line[len("data: "):] for line in text.split("\n") if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return [json.loads(e) for e in events[:-1]]


@pytest.mark.asyncio
async def test_openai_usage_chunk_only_with_include_usage_on_the_wire(sim):
    url = sim.base_url("raw", "openai") + "/chat/completions"
    body = {"model": "gpt-4o", "messages": MESSAGES, "stream": True}
    plain = await raw_sse(url, body)
    assert all(c.get("usage") is None and c["choices"] for c in plain)
    with_usage = await raw_sse(url, {**body, "stream_options": {"include_usage": True}})
    usage_chunks = [c for c in with_usage if c["usage"] is not None]
    assert len(usage_chunks) == 1 and usage_chunks[0] is with_usage[-1]
    assert usage_chunks[0]["choices"] == []
    assert usage_chunks[0]["usage"]["total_tokens"] == OPENAI_PROMPT + COMPLETION
    deltas = [c["choices"][0]["delta"].get("content") or "" for c in plain]
    assert len([d for d in deltas if d]) == COMPLETION  # one delta per word


@pytest.mark.asyncio
async def test_max_tokens_truncates_words(sim):
    for provider in ("openai", "anthropic", "ollama"):
        resp = await call(sim, provider, "mt", max_tokens=3)
        assert resp.choices[0].message.content == "Hello from mt:"
        assert resp.choices[0].finish_reason == "length"
        assert resp.usage.completion_tokens == 3
    assert sim.stats("mt").last_request.json["options"]["num_predict"] == 3


# ---------------------------------------------------------------- tool calls


@pytest.mark.asyncio
@pytest.mark.parametrize("provider", ["openai", "xai", "anthropic", "ollama"])
async def test_tool_call_json(sim, provider):
    resp = await call(sim, provider, f"tool-{provider}", tools=TOOLS)
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls"
    (tool_call,) = choice.message.tool_calls
    assert tool_call.type == "function" and tool_call.function.name == "lookup"
    assert json.loads(tool_call.function.arguments) == TOOL_ARGS
    assert tool_call.id


@pytest.mark.asyncio
@pytest.mark.parametrize("provider", ["openai", "anthropic", "ollama"])
async def test_tool_call_stream(sim, provider):
    chunks = await collect(await call(sim, provider, f"tstream-{provider}", tools=TOOLS, stream=True))
    deltas = [tc for c in chunks if c.choices for tc in (c.choices[0].delta.tool_calls or [])]
    assert deltas[0].function.name == "lookup" and deltas[0].id
    assert json.loads("".join(d.function.arguments or "" for d in deltas)) == TOOL_ARGS
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "tool_calls"


@pytest.mark.asyncio
async def test_tool_choice_none_and_tool_result_answer_in_text(sim):
    resp = await call(sim, "openai", "tnone", tools=TOOLS, tool_choice="none")
    assert resp.choices[0].message.tool_calls is None
    assert resp.choices[0].message.content.startswith("Hello from tnone:")
    follow_up = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [
            {"id": "call_1", "type": "function", "function": {"name": "lookup", "arguments": "{}"}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "42"},
    ]
    resp = await call(sim, "anthropic", "tresult", tools=TOOLS, messages=follow_up)
    assert resp.choices[0].finish_reason == "stop" and resp.choices[0].message.content


# ---------------------------------------------------------------- faults through LiteLLM

# What each simulated failure becomes after LiteLLM's error mapping (litellm 1.110.2, num_retries=0,
# max_retries=0). Every class is in litellm.exceptions; status is exc.status_code.
#   status faults (all four providers, JSON and stream): 400 BadRequestError, 401 AuthenticationError,
#     404 NotFoundError, 408 Timeout, 429 RateLimitError, 500 InternalServerError,
#     503 ServiceUnavailableError - each with that status_code; 529 -> APIError(529) for
#     openai/xai/ollama but InternalServerError(500) for anthropic (overloaded is not kept apart).
#   Retry-After / retry-after-ms: verbatim in exc.litellm_response_headers (an httpx.Headers).
#   drop: openai/xai/anthropic InternalServerError(500) ("Connection error." / "Server disconnected"),
#     ollama APIConnectionError(500).
#   timeout (timeout=0.5 vs Fault.timeout(3)): Timeout(408) for all, after ~0.5 s.
#   malformed JSON body: openai InternalServerError(500), xai APIError(status_code=200!),
#     anthropic/ollama APIConnectionError(500).
#   missing fields: openai InternalServerError(500), xai APIError(500),
#     anthropic/ollama APIConnectionError(500).
#   Streams: malformed -> openai MidStreamFallbackError(500); xai/anthropic/ollama raise NOTHING and
#     yield one empty chunk with finish_reason "stop" (the router must treat an empty stream as a
#     failure). missing fields -> openai/anthropic MidStreamFallbackError(500), ollama
#     BadRequestError(400), xai nothing (one empty chunk).
FAULT_OUTCOMES = [
    # (provider, fault id, expected class name, expected status_code)
    ("openai", "500", "InternalServerError", 500),
    ("openai", "401", "AuthenticationError", 401),
    ("openai", "404", "NotFoundError", 404),
    ("openai", "503", "ServiceUnavailableError", 503),
    ("openai", "529", "APIError", 529),
    ("openai", "malformed", "InternalServerError", 500),
    ("openai", "missing", "InternalServerError", 500),
    ("openai", "drop", "InternalServerError", 500),
    ("openai", "timeout", "Timeout", 408),
    ("xai", "500", "InternalServerError", 500),
    ("xai", "malformed", "APIError", 200),
    ("xai", "drop", "InternalServerError", 500),
    ("anthropic", "500", "InternalServerError", 500),
    ("anthropic", "401", "AuthenticationError", 401),
    ("anthropic", "404", "NotFoundError", 404),
    ("anthropic", "529", "InternalServerError", 500),
    ("anthropic", "malformed", "APIConnectionError", 500),
    ("anthropic", "missing", "APIConnectionError", 500),
    ("anthropic", "drop", "InternalServerError", 500),
    ("anthropic", "timeout", "Timeout", 408),
    ("ollama", "500", "InternalServerError", 500),
    ("ollama", "401", "AuthenticationError", 401),
    ("ollama", "malformed", "APIConnectionError", 500),
    ("ollama", "missing", "APIConnectionError", 500),
    ("ollama", "drop", "APIConnectionError", 500),
    ("ollama", "timeout", "Timeout", 408),
]
FAULTS = {
    "401": Fault.status(401), "404": Fault.status(404), "500": Fault.status(500),
    "503": Fault.status(503), "529": Fault.status(529),
    "malformed": Fault.malformed(), "missing": Fault.missing_fields(), "drop": Fault.drop(),
    "timeout": Fault.timeout(3),
}


@pytest.mark.asyncio
@pytest.mark.parametrize(("provider", "fault", "cls", "status"), FAULT_OUTCOMES)
async def test_fault_becomes_litellm_exception(sim, provider, fault, cls, status):
    backend = f"f-{provider}-{fault}"
    sim.script(backend, [FAULTS[fault]])
    started = time.monotonic()
    with pytest.raises(Exception) as info:
        await call(sim, provider, backend, timeout=0.5)
    assert type(info.value).__name__ == cls
    assert getattr(info.value, "status_code", None) == status
    assert time.monotonic() - started < 2.5
    stats = sim.stats(backend)
    assert (stats.requests, stats.faulted, stats.prompt_tokens) == (1, 1, 0)


@pytest.mark.asyncio
@pytest.mark.parametrize("provider", ["openai", "xai", "anthropic", "ollama"])
async def test_429_retry_after_visible(sim, provider):
    backend = f"rl-{provider}"
    sim.script(backend, [Fault.status(429, retry_after=7), Fault.status(429, retry_after_ms=1500)])
    with pytest.raises(litellm.RateLimitError) as info:
        await call(sim, provider, backend)
    assert info.value.status_code == 429
    assert info.value.litellm_response_headers["retry-after"] == "7"
    with pytest.raises(litellm.RateLimitError) as info:
        await call(sim, provider, backend, stream=True)
    assert info.value.litellm_response_headers["retry-after-ms"] == "1500"
    resp = await call(sim, provider, backend)  # script exhausted: back to normal
    assert resp.choices[0].message.content.startswith(f"Hello from {backend}")
    stats = sim.stats(backend)
    assert (stats.requests, stats.faulted, stats.ok) == (3, 2, 1)


@pytest.mark.asyncio
async def test_retry_after_http_date_and_anthropic_error_body(sim):
    sim.script("date", [Fault.status(429, retry_after_date=30)])
    url = sim.base_url("date", "anthropic") + "/v1/messages"
    async with aiohttp.ClientSession() as session, session.post(url, json={"messages": []}) as resp:
        assert resp.status == 429
        assert resp.headers["Retry-After"].endswith(" GMT")
        body = await resp.json()
    assert body["type"] == "error" and body["error"]["type"] == "rate_limit_error"


@pytest.mark.asyncio
async def test_require_key(sim):
    sim.require_key("locked", "right-key")
    for provider in ("openai", "anthropic"):
        with pytest.raises(litellm.AuthenticationError):
            await call(sim, provider, "locked")
        resp = await call(sim, provider, "locked", api_key="right-key")
        assert resp.choices[0].message.content


# ---------------------------------------------------------------- concurrency, rates, stats


@pytest.mark.asyncio
async def test_peak_in_flight_counts_concurrent_requests(sim):
    sim.set_latency("busy", 0.1)
    results = await asyncio.gather(*(call(sim, "openai", "busy") for _ in range(10)))
    assert len(results) == 10
    stats = sim.stats("busy")
    assert (stats.requests, stats.ok, stats.peak_in_flight, stats.in_flight) == (10, 10, 10, 0)
    assert sim.total_stats().peak_in_flight >= 10


async def raw_status(url: str, body: dict) -> int:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        await resp.read()
        return resp.status


@pytest.mark.asyncio
async def test_fault_rate_is_seeded_and_all_backends_default(sim):
    body = {"model": "m", "messages": MESSAGES}
    url = sim.base_url("rate", "openai") + "/chat/completions"
    sim.set_fault_rate("rate", 0.5, [Fault.status(503)], seed=7)
    first = [await raw_status(url, body) for _ in range(12)]
    sim.set_fault_rate("rate", 0.5, [Fault.status(503)], seed=7)
    assert [await raw_status(url, body) for _ in range(12)] == first
    assert set(first) == {200, 503}
    sim.set_fault_rate("*", 1.0, [Fault.status(500)])  # every backend without its own rate
    assert await raw_status(sim.base_url("other", "openai") + "/chat/completions", body) == 500
    assert await raw_status(sim.url + "/api/chat", {**body, "stream": False}) == 500


@pytest.mark.asyncio
async def test_unprefixed_paths_serve_default_and_side_endpoints(sim):
    body = {"model": "m", "messages": MESSAGES, "stream": False}
    assert await raw_status(sim.url + "/v1/chat/completions", body) == 200
    assert await raw_status(sim.url + "/api/chat", body) == 200
    assert sim.stats("default").ok == 2
    async with aiohttp.ClientSession() as session:
        async with session.get(sim.base_url("x", "openai") + "/models") as resp:
            assert (await resp.json())["data"][0]["object"] == "model"
        async with session.get(sim.base_url("x", "ollama") + "/api/tags") as resp:
            assert (await resp.json())["models"]
        async with session.post(sim.base_url("x", "ollama") + "/api/show", json={"name": "llama3"}) as resp:
            assert "context_length" in json.dumps(await resp.json())
    assert sim.stats("x").requests == 0  # side endpoints are not counted


@pytest.mark.asyncio
async def test_stats_reset_and_totals(sim):
    await call(sim, "openai", "s1")
    await call(sim, "anthropic", "s2")
    total = sim.total_stats()
    assert (total.requests, total.ok) == (2, 2)
    assert total.prompt_tokens == OPENAI_PROMPT + ANTHROPIC_PROMPT
    assert total.last_request.path == "/b/s2/v1/messages"
    sim.reset_stats("s1")
    assert sim.stats("s1").requests == 0 and sim.stats("s2").requests == 1
    sim.reset_stats()
    assert sim.total_stats().requests == 0


@pytest.mark.asyncio
async def test_async_simulator_on_the_tests_own_loop():
    async with Simulator() as own:
        own.script("b", [Fault.status(500)])
        assert await raw_status(own.base_url("b") + "/chat/completions", {"messages": MESSAGES}) == 500
        assert await raw_status(own.base_url("b") + "/chat/completions", {"messages": MESSAGES}) == 200
    assert own.stats("b").requests == 2


def test_foreground_cli_prints_urls_and_stops_on_sigint():
    env = {**os.environ, "PYTHONPATH": str(REPO) + os.pathsep + os.environ.get("PYTHONPATH", "")}
    proc = subprocess.Popen([sys.executable, "-m", "xml_pipeline_llm.simulator", "--port", "0"],
                            cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = [proc.stdout.readline() for _ in range(4)]
        assert lines[0].startswith("provider simulator listening on http://127.0.0.1:")
        assert lines[1].split()[-1].endswith("/b/default/v1")
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 0
    assert "Traceback" not in err


# ---------------------------------------------------------------- prompt-cache and reasoning usage

# Required fields of the published schemas (specs/anthropic.openapi.json: Usage, MessageDeltaUsage).
ANTHROPIC_USAGE = {"cache_creation", "cache_creation_input_tokens", "cache_read_input_tokens", "inference_geo",
                   "input_tokens", "output_tokens", "server_tool_use", "service_tier"}
ANTHROPIC_DELTA_USAGE = {"cache_creation_input_tokens", "cache_read_input_tokens", "input_tokens",
                         "output_tokens", "server_tool_use"}
LONG = [{"role": "user", "content": "word " * 100}]      # 103 prompt tokens


async def raw_json(url: str, body: dict, headers: dict | None = None) -> dict:
    async with aiohttp.ClientSession() as session, session.post(url, json=body, headers=headers) as resp:
        return await resp.json()


async def raw_events(url: str, body: dict) -> list[tuple[str, dict]]:
    async with aiohttp.ClientSession() as session, session.post(url, json=body) as resp:
        text = await resp.text()
    out = []
    for block in text.strip().split("\n\n"):
        lines = dict(line.split(": ", 1) for line in block.split("\n"))
        out.append((lines["event"], json.loads(lines["data"])))
    return out


@pytest.mark.asyncio
async def test_openai_cached_and_reasoning_tokens_on_the_wire(sim):
    sim.set_usage_details("raw-pc", cached=0.5, reasoning_tokens=6)
    url = sim.base_url("raw-pc", "openai") + "/chat/completions"
    body = {"model": "gpt-4o", "messages": LONG}
    usage = (await raw_json(url, body))["usage"]
    assert usage["prompt_tokens"] == 103 and usage["prompt_tokens_details"]["cached_tokens"] == 51
    assert usage["completion_tokens_details"]["reasoning_tokens"] == 6
    assert usage["completion_tokens"] == 3 + 5 + 6        # "Hello from raw-pc:" + 5 words + reasoning
    assert usage["total_tokens"] == usage["prompt_tokens"] + usage["completion_tokens"]
    chunks = await raw_sse(url, {**body, "stream": True, "stream_options": {"include_usage": True}})
    assert chunks[-1]["usage"] == usage
    st = sim.stats("raw-pc")
    assert (st.cached_tokens, st.cache_write_tokens, st.reasoning_tokens) == (102, 0, 12)


@pytest.mark.asyncio
async def test_anthropic_cache_reads_and_writes_on_the_wire(sim):
    sim.set_usage_details("raw-an", cached=0.5, cache_write=0.25)
    url = sim.base_url("raw-an", "anthropic") + "/v1/messages"
    body = {"model": "claude-sonnet-4-5", "max_tokens": 50, "messages": LONG}
    usage = (await raw_json(url, body))["usage"]
    assert set(usage) >= ANTHROPIC_USAGE
    # input_tokens is the uncached rest: total input = input + cache reads + cache writes
    assert (usage["input_tokens"], usage["cache_read_input_tokens"], usage["cache_creation_input_tokens"]) \
        == (103 - 51 - 25, 51, 25)
    assert usage["cache_creation"] == {"ephemeral_5m_input_tokens": 25, "ephemeral_1h_input_tokens": 0}
    events = await raw_events(url, {**body, "stream": True})
    names = [name for name, _ in events]
    assert names[0] == "message_start" and names[-2:] == ["message_delta", "message_stop"]
    start = events[0][1]["message"]["usage"]
    assert set(start) >= ANTHROPIC_USAGE and start["cache_read_input_tokens"] == 51
    assert start["cache_creation_input_tokens"] == 25 and start["input_tokens"] == 27
    delta = events[-2][1]["usage"]                   # cumulative, as the API sends it
    assert set(delta) >= ANTHROPIC_DELTA_USAGE
    assert {k: delta[k] for k in ANTHROPIC_DELTA_USAGE - {"server_tool_use"}} == \
        {k: usage[k] for k in ANTHROPIC_DELTA_USAGE - {"server_tool_use"}}


@pytest.mark.asyncio
@pytest.mark.parametrize("stream", [False, True])
async def test_litellm_reads_the_cache_figures_of_both_shapes(sim, stream):
    sim.set_usage_details("*", cached=0.5, cache_write=0.25, reasoning_tokens=3)   # every backend
    kwargs = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    results = {}
    for provider in ("openai", "anthropic", "ollama"):
        resp = await call(sim, provider, f"lt-{provider}", messages=LONG, **kwargs)
        results[provider] = final_usage(await collect(resp)) if stream else resp.usage
    oa, an, ol = results["openai"], results["anthropic"], results["ollama"]
    assert oa.prompt_tokens == 103 and oa.prompt_tokens_details.cached_tokens == 51
    assert oa.completion_tokens_details.reasoning_tokens == 3
    # LiteLLM counts every Anthropic input token in prompt_tokens
    assert an.prompt_tokens == 103 and an.prompt_tokens_details.cached_tokens == 51
    assert an.cache_creation_input_tokens == 25 and an.cache_read_input_tokens == 51
    assert ol.prompt_tokens == 103 and not (ol.prompt_tokens_details and ol.prompt_tokens_details.cached_tokens)


def test_usage_details_are_checked():
    with run_simulator() as own:
        with pytest.raises(ValueError, match="shares of the prompt"):
            own.set_usage_details("b", cached=0.8, cache_write=0.3)
        with pytest.raises(ValueError, match="reasoning_tokens"):
            own.set_usage_details("b", reasoning_tokens=-1)
