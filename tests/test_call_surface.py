"""What a caller passes on every call: per-call options, refusals before sending,
unsupported parameters, call shapes, error kinds, threads and cancellation."""

from __future__ import annotations

import asyncio
import json
import random
import socket
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import MESSAGES, backend, make_router

from xml_pipeline_llm import BadRequestError, NoBackendError, ProviderError
from xml_pipeline_llm.limits import Slots
from xml_pipeline_llm.simulator import Fault


def _outcomes(r) -> list[str]:
    return [e.outcome for e in r.usage_events()]


# ------------------------------------------------------------ per-call options

async def test_per_call_timeout_is_shorter_than_the_configured_one(sim):
    r = make_router([backend(sim, "openai", "pt-a"), backend(sim, "openai", "pt-b")], timeout=30)
    sim.script("pt-a", [Fault.timeout(5)])       # pt-a would answer after 5 s, well within 30 s
    resp = await r.complete("gpt-4o", MESSAGES, timeout=0.5)
    assert resp.backend == "pt-b"                 # so pt-a's try was cut at 0.5 s: the 30 s did not apply
    assert _outcomes(r) == ["retried:timeout", "ok"]


async def test_per_call_timeout_can_be_longer_than_the_configured_one(sim):
    r = make_router([backend(sim, "openai", "pl-a", timeout=0.3)], retries=0)
    sim.set_latency("pl-a", 0.8)
    try:
        with pytest.raises(ProviderError):
            await r.complete("gpt-4o", MESSAGES)
        resp = await r.complete("gpt-4o", MESSAGES, timeout=10)
        assert resp.content and resp.backend == "pl-a"
    finally:
        sim.set_latency("pl-a", 0)


@pytest.mark.parametrize("name", ["retries", "num_retries", "max_retries"])
async def test_per_call_retries_and_their_synonyms_bound_the_tries(sim, name):
    b = f"pr-{name}"
    r = make_router([backend(sim, "openai", b)], retries=0)
    sim.script(b, [Fault.status(500)] * 2)
    resp = await r.complete("gpt-4o", MESSAGES, **{name: 2})
    assert resp.content
    assert sim.stats(b).requests == 3
    assert _outcomes(r) == ["retried:500", "retried:500", "ok"]


async def test_no_litellm_retry_runs_whatever_is_set(sim):
    """LiteLLM's global num_retries and a caller's max_retries never make LiteLLM retry."""
    import litellm as lt

    r = make_router([backend(sim, "openai", "nl-a")], retries=3)
    sim.script("nl-a", [Fault.status(500)] * 3)
    old = lt.num_retries
    lt.num_retries = 5
    try:
        with pytest.raises(ProviderError) as info:
            await r.complete("gpt-4o", MESSAGES, max_retries=0)
    finally:
        lt.num_retries = old
    assert sim.stats("nl-a").requests == 1     # one try, no hidden ones
    assert len(info.value.attempts) == 1 and _outcomes(r) == ["error:500"]
    sim.reset("nl-a")


async def test_conflicting_retry_synonyms_are_refused(sim):
    r = make_router([backend(sim, "openai", "cs-a")])
    with pytest.raises(BadRequestError, match="retries=1, num_retries=2"):
        await r.complete("gpt-4o", MESSAGES, retries=1, num_retries=2)
    with pytest.raises(BadRequestError, match="timeout=: expected a positive number"):
        await r.complete("gpt-4o", MESSAGES, timeout=-1)
    assert sim.stats("cs-a").requests == 0


@pytest.mark.parametrize("arg,value,fix", [
    ("api_key", "sk-test-bypass00000000", "api_key_env"),
    ("api_base", "http://127.0.0.1:9/v1", "base_url"),
    ("base_url", "http://127.0.0.1:9/v1", "base_url"),
    ("custom_llm_provider", "openai", "provider"),
    ("stream", True, "stream("),
])
async def test_arguments_that_bypass_the_config_are_refused_before_sending(sim, arg, value, fix):
    r = make_router([backend(sim, "openai", "by-a")])
    with pytest.raises(BadRequestError) as info:
        await r.complete("gpt-4o", MESSAGES, agent_id="bypass", **{arg: value})
    text = str(info.value)
    assert f"{arg}" in text and fix in text and "nothing was sent" in text
    assert "bypass00000000" not in text
    assert sim.stats("by-a").requests == 0
    assert r.get_agent_usage("bypass").error_count == 0 and r.usage_events() == []


async def test_stream_false_on_complete_is_accepted(sim):
    r = make_router([backend(sim, "openai", "sf-a")])
    resp = await r.complete("gpt-4o", MESSAGES, stream=False)
    assert resp.content


# ------------------------------------------------------------ unsupported parameters

async def test_an_unsupported_parameter_moves_on_to_a_backend_that_takes_it(sim):
    r = make_router([backend(sim, "anthropic", "up-anth", supported_models=["shared-1"]),
                     backend(sim, "openai", "up-oai", supported_models=["shared-1"])])
    resp = await r.complete("shared-1", MESSAGES, seed=7)
    assert resp.backend == "up-oai"
    assert sim.stats("up-anth").requests == 0            # nothing was sent there
    assert sim.stats("up-oai").last_request.json["seed"] == 7
    assert _outcomes(r) == ["ok"]                          # not a provider call, not a try
    assert await r.cooldowns() == {}                       # and no cooldown


async def test_no_backend_taking_a_parameter_says_nothing_was_sent_and_the_fix(sim):
    r = make_router([backend(sim, "anthropic", "un-anth")])
    with pytest.raises(BadRequestError) as info:
        await r.complete("claude-sonnet-4", MESSAGES, seed=7, agent_id="un")
    text = str(info.value)
    for part in ("nothing was sent", "un-anth", "anthropic", "seed", "drop_params"):
        assert part in text, (part, text)
    assert sim.stats("un-anth").requests == 0 and await r.cooldowns() == {}
    assert r.usage_events() == []


@pytest.mark.parametrize("where", ["call", "llm", "backend"])
async def test_drop_params_has_litellm_drop_the_parameter(sim, where):
    name = f"dp-{where}"
    extra = {"drop_params": True} if where == "backend" else {}
    llm = {"drop_params": True} if where == "llm" else {}
    r = make_router([backend(sim, "anthropic", name, **extra)], **llm)
    kwargs = {"drop_params": True} if where == "call" else {}
    resp = await r.complete("claude-sonnet-4", MESSAGES, seed=7, **kwargs)
    assert resp.content and resp.backend == name
    sent = sim.stats(name).last_request.json
    assert "seed" not in sent and "drop_params" not in sent


# ------------------------------------------------------------ call shapes

@pytest.mark.parametrize("model,messages,where", [
    (123, MESSAGES, "model"),
    (None, MESSAGES, "model"),
    ("", MESSAGES, "model"),
    ("grok-4.1", [], "messages"),
    ("grok-4.1", "hello", "messages"),
    ("grok-4.1", ["hi"], "messages[0]"),
    ("grok-4.1", [{"content": "hi"}], "messages[0].role"),
    ("grok-4.1", [{"role": "user", "content": 12345}], "messages[0].content"),
    ("grok-4.1", [MESSAGES[0], {"role": "user", "content": [1]}], "messages[1].content[0]"),
    ("grok-4.1", [{"role": "user"}], "messages[0].content"),
])
async def test_malformed_calls_are_refused_before_sending(sim, model, messages, where):
    r = make_router([backend(sim, "xai", "sh-a", rate_limit_tpm=10_000)])
    with pytest.raises(BadRequestError) as info:
        await r.complete(model, messages)
    assert str(info.value).startswith(where) and "nothing was sent" in str(info.value)
    assert sim.stats("sh-a").requests == 0 and await r.cooldowns() == {}
    with pytest.raises(BadRequestError):
        r.stream(model, messages)          # stream() checks at once too


async def test_an_assistant_turn_with_only_tool_calls_is_accepted(sim):
    r = make_router([backend(sim, "openai", "tc-a")])
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    messages = [{"role": "user", "content": "go"},
                {"role": "assistant", "content": None, "tool_calls": [call]},
                {"role": "tool", "tool_call_id": "call_1", "content": "done"}]
    assert (await r.complete("gpt-4o", messages)).content


# ------------------------------------------------------------ error kinds

def _dead_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


async def test_an_unreachable_backend_is_named_so_not_a_failing_provider(sim):
    r = make_router([backend(sim, "openai", "ur-a", base_url=f"http://127.0.0.1:{_dead_port()}/v1")],
                    retries=1)
    with pytest.raises(ProviderError) as info:
        await r.complete("gpt-4o", MESSAGES)
    assert [a.kind for a in info.value.attempts] == ["unreachable", "unreachable"]
    assert all(a.status is None for a in info.value.attempts)
    assert "could not be reached" in str(info.value) and "500" not in str(info.value)


async def test_every_backend_turning_the_request_away_is_a_no_backend_error(sim):
    r = make_router([backend(sim, "xai", "nb-a"), backend(sim, "xai", "nb-b")], retries=5)
    sim.script("nb-a", [Fault.status(401)])
    sim.script("nb-b", [Fault.status(404)])
    with pytest.raises(NoBackendError) as info:
        await r.complete("grok-4.1", MESSAGES)
    assert [(a.backend, a.kind) for a in info.value.attempts] == [("nb-a", "auth"), ("nb-b", "not_found")]


# ------------------------------------------------------------ cancellation

async def test_waiters_cancelled_as_a_slot_is_handed_over_raise_only_cancelled_error():
    slots = Slots(1)
    await slots.acquire()
    waiters = [asyncio.ensure_future(slots.acquire()) for _ in range(3)]
    await asyncio.sleep(0)                       # all three queue
    slots.release()                              # handed to the first waiter ...
    waiters[0].cancel()                          # ... which is cancelled in the same iteration,
    waiters[1].cancel()                          # and so is the next in line
    results = await asyncio.gather(*waiters, return_exceptions=True)
    assert isinstance(results[0], asyncio.CancelledError)
    assert isinstance(results[1], asyncio.CancelledError)
    assert results[2] is None                    # the slot went on to the third
    assert slots.in_use == 1 and slots.waiting == 0
    slots.release()
    assert slots.in_use == 0


async def test_a_storm_of_cancelled_and_timed_out_calls_gives_every_slot_and_token_back(sim):
    r = make_router([backend(sim, "xai", "cx-a", max_concurrent=2, rate_limit_tpm=100_000)])
    sim.set_latency("cx-a", 0.02)
    rng = random.Random(7)
    try:
        for _ in range(3):
            async def one() -> str:
                try:
                    await asyncio.wait_for(r.complete("grok-4.1", MESSAGES, max_tokens=50),
                                           timeout=rng.uniform(0.005, 0.15))
                    return "ok"
                except asyncio.TimeoutError:
                    return "timeout"

            results = await asyncio.gather(*(one() for _ in range(40)))
            assert set(results) <= {"ok", "timeout"}
        gate = r.gate("cx-a")
        deadline = time.monotonic() + 10
        while (gate.in_flight or gate.queued) and time.monotonic() < deadline:
            await asyncio.sleep(0.02)
        assert gate.in_flight == 0 and gate.queued == 0
        assert gate.bucket is not None
        while gate.bucket.tokens < 100_000 - 1 and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        # every reservation came back (or was settled against tokens really used, then refilled)
        assert gate.bucket.tokens >= 100_000 - 1
        resp = await asyncio.wait_for(r.complete("grok-4.1", MESSAGES), timeout=10)
        assert resp.content
    finally:
        sim.set_latency("cx-a", 0)


# ------------------------------------------------------------ threads with loops of their own

def test_threads_with_their_own_loops_share_the_process_router_exactly(sim, tmp_path):
    """8 threads x 20 calls on max_concurrent 4: no hang, exact limit and totals, nothing at ERROR."""
    config = {"llm": {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 10,
                      "backends": [backend(sim, "xai", "th-a", max_concurrent=4)]}}
    path = tmp_path / "organism.json"
    path.write_text(json.dumps(config))
    sim.set_latency("th-a", 0.02)
    code = textwrap.dedent(f"""
        import asyncio, json, logging, threading, sys
        logging.basicConfig(level=logging.WARNING)
        from xml_pipeline_llm import complete, configure_router, get_router
        configure_router(json.load(open({str(path)!r})))
        messages = {MESSAGES!r}
        def work(i):
            async def calls():
                for _ in range(20):
                    await complete("grok-4.1", messages, agent_id=f"t{{i}}")
            asyncio.run(calls())
        threads = [threading.Thread(target=work, args=(i,)) for i in range(8)]
        for t in threads: t.start()
        for t in threads: t.join(90)
        alive = sum(t.is_alive() for t in threads)
        usage = get_router().get_all_usage()
        print(json.dumps({{"alive": alive,
                          "requests": sum(u.request_count for u in usage.values()),
                          "tokens": sum(u.total_tokens for u in usage.values()),
                          "in_flight": get_router().gate("th-a").in_flight}}))
        sys.stdout.flush()
    """)
    sim.reset_stats("th-a")
    try:
        proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=150,
                              env={**__import__("os").environ})
    finally:
        sim.set_latency("th-a", 0)
    assert proc.returncode == 0, proc.stderr[-3000:]
    out = json.loads(proc.stdout.strip().splitlines()[-1])
    stats = sim.stats("th-a")
    assert out["alive"] == 0
    assert out["requests"] == 160 == stats.requests
    assert out["tokens"] == stats.prompt_tokens + stats.completion_tokens
    assert stats.peak_in_flight <= 4 and out["in_flight"] == 0
    for bad in ("ERROR", "Traceback", "never retrieved", "LoggingWorker", "different event loop"):
        assert bad not in proc.stderr, proc.stderr[-3000:]
