"""A stream's end read by the router, and by LiteLLM when someone else listens to LiteLLM.

When a provider's stream ends with a finish reason and its usage, the router
ends it itself: LiteLLM would otherwise assemble, price and log the whole
response again, about half of a short stream's CPU (benchmarks/bench_gateway.py).
While LiteLLM has success callbacks other than the package's own, LiteLLM
ends every stream as before, so that those callbacks see it.  Both ways must
give the caller the same chunks, text, tool calls, usage and cost.

Each way runs in a process of its own: LiteLLM's callback lists are process-wide.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import textwrap
from typing import Any

from conftest import backend

SCRIPT = textwrap.dedent("""
    import asyncio, json, sys
    from xml_pipeline_llm import LLMRouter, load_config

    config, cases = json.loads(sys.argv[1]), json.loads(sys.argv[2])

    async def run(r):
        out = []
        for model, kw in cases:
            s = r.stream(model, [{"role": "user", "content": "say hello to the stream end please"}], **kw)
            finishes = []
            while True:
                try:
                    chunk = await s.next_chunk()
                except StopAsyncIteration:
                    break
                finishes += [c.finish_reason for c in chunk.choices or [] if c.finish_reason]
            resp = s.response
            out.append({"content": resp.content, "usage": resp.usage, "cost": resp.cost_usd,
                        "finish": resp.finish_reason, "finishes": finishes,     # call ids differ per call
                        "tool_calls": [{**tc, "id": bool(tc["id"])} for tc in resp.tool_calls]})
        return out

    async def main():
        seen = []
        if sys.argv[3] == "with-a-callback":     # a user's own LiteLLM logger, set up at start
            import litellm
            from litellm.integrations.custom_logger import CustomLogger

            class Mine(CustomLogger):
                async def async_log_success_event(self, kwargs, response_obj, start_time, end_time):
                    seen.append(bool(kwargs.get("stream")))

            litellm.callbacks = [Mine()]
        r = LLMRouter(load_config(config))
        out = await run(r)
        for _ in range(500):                # LiteLLM runs its callbacks after the stream ends
            if len(seen) >= len(cases) or sys.argv[3] != "with-a-callback":
                break
            await asyncio.sleep(0.01)
        usage = r.get_agent_usage("ender")
        print(json.dumps({"streams": out, "seen": seen, "requests": usage.request_count,
                          "tokens": usage.total_tokens}))

    asyncio.run(main())
""")

TOOLS = [{"type": "function", "function": {"name": "lookup", "parameters": {
    "type": "object", "properties": {"input": {"type": "string"}}}}}]


def test_the_router_and_litellm_end_a_stream_alike(sim: Any) -> None:
    sim.set_usage_details("se-oa", cached=0.5, reasoning_tokens=3)
    sim.set_usage_details("se-an", cached=0.5, cache_write=0.25)
    config = {"llm": {"timeout": 10, "backends": [
        backend(sim, "openai", "se-oa", supported_models=["gpt-4o"]),
        backend(sim, "anthropic", "se-an"), backend(sim, "xai", "se-x"), backend(sim, "ollama", "se-ol")]}}
    cases: list[tuple[str, dict[str, Any]]] = [
        ("gpt-4o", {}), ("claude-sonnet-4-5", {}), ("grok-4.1", {}), ("llama3", {}),
        ("grok-4.1", {"tools": TOOLS}), ("claude-sonnet-4-5", {"tools": TOOLS}),
        ("gpt-4o", {"max_tokens": 2})]
    cases = [(m, {**kw, "agent_id": "ender"}) for m, kw in cases]
    runs = {}
    for how in ("alone", "with-a-callback"):
        proc = subprocess.run([sys.executable, "-c", SCRIPT, json.dumps(config), json.dumps(cases), how],
                              capture_output=True, text=True, timeout=120, env={**os.environ})
        assert proc.returncode == 0, proc.stderr[-3000:]
        runs[how] = json.loads(proc.stdout.strip().splitlines()[-1])
    alone, heard = runs["alone"], runs["with-a-callback"]
    assert alone["streams"] == heard["streams"]
    for case, got in zip(cases, alone["streams"]):
        assert got["usage"]["prompt_tokens"] > 0 and got["usage"]["completion_tokens"] > 0, case
        assert got["finishes"] == [got["finish"]], case        # one finish reason, as OpenAI sends
    oa, an, _, _, x_tool, an_tool, short = alone["streams"]
    assert oa["usage"]["cached_tokens"] > 0 and oa["usage"]["reasoning_tokens"] == 3
    assert an["usage"]["cached_tokens"] > 0 and an["usage"]["cache_write_tokens"] > 0
    assert x_tool["finish"] == an_tool["finish"] == "tool_calls" and x_tool["tool_calls"][0]["function"]["name"]
    assert short["finish"] == "length"
    assert heard["seen"] == [True] * len(cases)       # the user's LiteLLM callback saw every stream
    for run in (alone, heard):
        assert run["requests"] == len(cases)
        assert run["tokens"] == sum(got["usage"]["total_tokens"] for got in run["streams"])
