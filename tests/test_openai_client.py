"""``openai_client()``: the gateway's handling in-process, under the OpenAI SDK and the OpenAI Agents SDK.

The process-wide router is configured against the session's simulator; the
client's transport hands each request to the gateway's handling with no
socket, so what it answers is what ``xml-pipeline-llm serve`` answers.
"""

from __future__ import annotations

import asyncio
import inspect
import json
from collections.abc import Iterator
from typing import Any

import openai
import pytest
from conftest import backend, until

import xml_pipeline_llm
from xml_pipeline_llm import configure_router, get_router, openai_client

MESSAGES = [{"role": "user", "content": "say hello in process please"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"input": {"type": "string"}}}}}]


@pytest.fixture
def router(sim: Any) -> Iterator[Any]:
    r = configure_router({"llm": {
        "retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 10,
        "models": {"quick": ["grok-4.1"]},
        "budgets": [{"scope": "agent", "match": "ip-*", "max_tokens": 1_000_000}],
        "backends": [backend(sim, "xai", "ip-x"), backend(sim, "openai", "ip-o", supported_models=["gpt-4o"])]}})
    yield r
    sim.set_latency("ip-x", 0.0)


async def test_a_wrong_config_is_a_500_naming_the_fix(monkeypatch: pytest.MonkeyPatch, tmp_path: Any) -> None:
    from xml_pipeline_llm.gateway.app import Gateway
    from xml_pipeline_llm.gateway.auth import Identity
    from xml_pipeline_llm.gateway.inprocess import BASE_URL, http_module, transport_class

    def no_config() -> Any:
        raise xml_pipeline_llm.ConfigError("no organism.yaml in /x: create one with an llm: block")

    hx = http_module(openai)
    transport = transport_class(hx)(Identity(), gw=Gateway(no_config))
    client = openai.AsyncOpenAI(api_key="x", base_url=BASE_URL, max_retries=0,
                                http_client=hx.AsyncClient(transport=transport, base_url=BASE_URL))
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="grok-4.1", messages=MESSAGES)
    assert "create one with an llm: block" in failed.value.message and "Traceback" not in failed.value.message


def test_exported_lazily_and_package_import_stays_free_of_openai() -> None:
    import subprocess
    import sys

    code = ("import sys, xml_pipeline_llm; assert 'openai' not in sys.modules and 'httpx' not in sys.modules; "
            "from xml_pipeline_llm import openai_client; assert callable(openai_client)")
    assert subprocess.run([sys.executable, "-c", code], capture_output=True).returncode == 0
    assert "openai_client" in xml_pipeline_llm.__all__


async def test_complete_stream_and_tools_are_the_gateways_answers(router: Any) -> None:
    client = openai_client(agent_id="ip-writer", thread_id="ip-thread", metadata={"org_id": "acme"})
    raw = await client.chat.completions.with_raw_response.create(model="quick", messages=MESSAGES, max_tokens=4)
    reply = raw.parse()
    assert reply.model == "grok-4.1" and reply.choices[0].message.content == "Hello from ip-x: say"
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 4
    assert raw.headers["x-xpl-backend"] == "ip-x" and raw.headers["x-xpl-attempts"] == "1"

    text = []
    usage = None
    async for chunk in await client.chat.completions.create(model="gpt-4o", messages=MESSAGES, stream=True,
                                                            stream_options={"include_usage": True}):
        text += [chunk.choices[0].delta.content or ""] if chunk.choices else []
        usage = chunk.usage or usage
    assert "".join(text) == "Hello from ip-o: say hello in process please"
    assert usage is not None and usage.completion_tokens == 8

    reply = await client.chat.completions.create(model="grok-4.1", messages=MESSAGES, tools=TOOLS)
    assert json.loads(reply.choices[0].message.tool_calls[0].function.arguments) == {
        "input": "say hello in process please"}

    totals = get_router().get_agent_usage("ip-writer")
    assert totals.request_count == 3
    assert get_router().get_all_usage(by="thread")["ip-thread"].request_count == 3
    assert get_router().get_all_usage(by="metadata.org_id")["acme"].request_count == 3

    with pytest.raises(openai.NotFoundError):
        await client.chat.completions.create(model="no-such-model", messages=MESSAGES)
    with pytest.raises(openai.PermissionDeniedError):         # the client's agent is fixed
        await client.chat.completions.create(model="grok-4.1", messages=MESSAGES,
                                             extra_headers={"X-Agent-Id": "someone-else"})
    models = {m.id for m in (await client.models.list()).data}
    assert {"quick", "grok-4.1", "gpt-4o"} <= models


async def test_a_cancelled_call_or_a_stream_closed_early_gives_everything_back(router: Any, sim: Any) -> None:
    client = openai_client(agent_id="ip-cancel")
    sim.set_latency("ip-x", 0.5, per_chunk=0.05)
    call = asyncio.ensure_future(client.chat.completions.create(model="grok-4.1", messages=MESSAGES,
                                                                max_tokens=40))
    assert await until(lambda: router.gate("ip-x").in_flight == 1)
    call.cancel()
    with pytest.raises(asyncio.CancelledError):
        await call
    assert await until(lambda: router.gate("ip-x").in_flight == 0)
    assert router.budget_status("agent", "ip-cancel").reserved_tokens == 0
    assert router.budget_status("agent", "ip-cancel").used_tokens == 0       # nothing charged

    stream = await client.chat.completions.create(model="grok-4.1", messages=MESSAGES, stream=True,
                                                  max_tokens=40)
    got = []
    async for chunk in stream:
        got += [chunk.choices[0].delta.content] if chunk.choices and chunk.choices[0].delta.content else []
        if len(got) == 2:
            break
    await stream.close()
    assert await until(lambda: router.gate("ip-x").in_flight == 0)
    status = router.budget_status("agent", "ip-cancel")
    assert status.reserved_tokens == 0 and status.used_tokens > 0          # charged what it received
    assert router.get_agent_usage("ip-cancel").completion_tokens >= 2


async def test_openai_agents_sdk_runs_two_agents_booked_to_each(router: Any) -> None:
    agents = pytest.importorskip("agents")
    agents.set_tracing_disabled(True)

    @agents.function_tool
    def lookup(input: str) -> str:
        """Look something up."""
        return f"found {input}"

    def make(name: str, tools: list[Any]) -> Any:
        model = agents.OpenAIChatCompletionsModel(model="grok-4.1", openai_client=openai_client(agent_id=name))
        return agents.Agent(name=name, instructions="Be brief.", model=model, tools=tools)

    researcher, writer = make("ip-researcher", [lookup]), make("ip-writer2", [])
    found, wrote = await asyncio.gather(agents.Runner.run(researcher, "find the answer"),
                                        agents.Runner.run(writer, "write one line"))
    assert found.final_output.startswith("Hello from ip-x")
    assert wrote.final_output == "Hello from ip-x: write one line"
    usage = get_router().get_all_usage()
    assert usage["ip-researcher"].request_count == 2       # a tool call, then the answer to its result
    assert usage["ip-writer2"].request_count == 1

    streamed = agents.Runner.run_streamed(writer, "stream one line")
    async for _ in streamed.stream_events():
        pass
    assert streamed.final_output == "Hello from ip-x: stream one line"
    assert get_router().get_agent_usage("ip-writer2").request_count == 2


async def test_pydantic_ai_runs_two_agents_booked_to_each(router: Any) -> None:
    pytest.importorskip("pydantic_ai")
    from pydantic_ai import Agent
    from pydantic_ai.models.openai import OpenAIChatModel
    from pydantic_ai.providers.openai import OpenAIProvider

    def make(name: str) -> Any:
        model = OpenAIChatModel("grok-4.1", provider=OpenAIProvider(openai_client=openai_client(agent_id=name)))
        return Agent(model, instructions="Be brief.")

    researcher, writer = make("pai-researcher"), make("pai-writer")

    @researcher.tool_plain
    def lookup(input: str) -> str:
        """Look something up."""
        return f"found {input}"

    found, wrote = await asyncio.gather(researcher.run("find the answer"), writer.run("write one line"))
    assert found.output.startswith("Hello from ip-x")
    assert wrote.output == "Hello from ip-x: write one line"
    usage = get_router().get_all_usage()
    assert usage["pai-researcher"].request_count == 2      # a tool call, then the answer to its result
    assert usage["pai-writer"].request_count == 1
    run_usage = wrote.usage() if inspect.ismethod(wrote.usage) else wrote.usage   # a method before PydanticAI 2
    assert run_usage.output_tokens == usage["pai-writer"].completion_tokens     # the router's count, passed on

    async with writer.run_stream("stream one line") as streamed:
        pieces = [piece async for piece in streamed.stream_text(delta=True, debounce_by=None)]
    assert "".join(pieces) == "Hello from ip-x: stream one line" and len(pieces) > 1
    assert get_router().get_agent_usage("pai-writer").request_count == 2
