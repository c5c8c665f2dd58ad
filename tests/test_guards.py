"""Guards against runaway agents: loops, call caps per thread, the kill switch, degrade instead of stop."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import FAKE_KEYS, MESSAGES, backend, make_router, until

from xml_pipeline_llm import (
    BackendError,
    BlockedError,
    BudgetExceededError,
    CallLimitError,
    ConfigError,
    LoopDetectedError,
)


def _outcomes(r, thread=None):
    return [e.outcome for e in r.usage_events() if thread is None or e.thread_id == thread]


# ------------------------------------------------------------------ loops

async def test_a_thread_repeating_one_request_is_stopped_at_exactly_repeat_limit_plus_one(sim):
    r = make_router([backend(sim, "xai", "gl-a")], guards={"repeat_limit": 3, "repeat_window": "10m"})
    sim.reset_stats("gl-a")
    for _ in range(3):
        await r.complete("grok-4.1", MESSAGES, agent_id="looper", thread_id="t1", max_tokens=5)
    with pytest.raises(LoopDetectedError) as info:
        await r.complete("grok-4.1", MESSAGES, agent_id="looper", thread_id="t1", max_tokens=5)
    e = info.value
    assert isinstance(e, BackendError)
    assert (e.thread_id, e.agent_id, e.count, e.window) == ("t1", "looper", 4, 600.0)
    assert "nothing was sent" in str(e) and "repeat_limit" in str(e)
    assert sim.stats("gl-a").requests == 3                      # the refused one never reached the provider
    with pytest.raises(LoopDetectedError):                      # and it stays refused (it counted for nothing)
        await r.complete("grok-4.1", MESSAGES, agent_id="looper", thread_id="t1", max_tokens=5)
    # other threads, other requests of the same thread, and calls without a thread are not affected
    await r.complete("grok-4.1", MESSAGES, agent_id="looper", thread_id="t2", max_tokens=5)
    await r.complete("grok-4.1", MESSAGES, agent_id="looper", thread_id="t1", max_tokens=6)
    await r.complete("grok-4.1", [*MESSAGES, {"role": "user", "content": "and more"}], agent_id="looper",
                     thread_id="t1", max_tokens=5)
    for _ in range(5):
        await r.complete("grok-4.1", MESSAGES, agent_id="looper", max_tokens=5)
    assert sim.stats("gl-a").requests == 11
    assert _outcomes(r, "t1").count("refused:loop") == 2
    refused = [e for e in r.usage_events() if e.outcome == "refused:loop"][0]
    assert (refused.total_tokens, refused.backend, refused.requested_model) == (0, "", "grok-4.1")
    u = r.get_agent_usage("looper")
    assert (u.request_count, u.error_count) == (11, 2)          # refusals are visible as errors, not requests
    r.end_thread("t1")                                          # forgets the loop window
    await r.complete("grok-4.1", MESSAGES, agent_id="looper", thread_id="t1", max_tokens=5)
    await r.aclose()


async def test_key_order_in_messages_and_parameters_does_not_make_a_request_new(sim):
    r = make_router([backend(sim, "xai", "gl-k")], guards={"repeat_limit": 2, "repeat_window": 60})
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {}}}}]
    await r.complete("grok-4.1", [{"role": "user", "content": "hi"}], thread_id="k", max_tokens=5,
                     temperature=0.5, tools=tools)
    await r.complete("grok-4.1", [{"content": "hi", "role": "user"}], thread_id="k", temperature=0.5,
                     max_tokens=5, tools=[{"function": {"parameters": {"properties": {}, "type": "object"},
                                                        "name": "f"}, "type": "function"}])
    with pytest.raises(LoopDetectedError):
        await r.complete("grok-4.1", [{"role": "user", "content": "hi"}], thread_id="k", max_tokens=5,
                         tools=tools, temperature=0.5)
    await r.complete("grok-4.1", [{"role": "user", "content": "hi"}], thread_id="k", max_tokens=5,
                     tools=tools, temperature=0.6)           # one parameter differs: another request
    await r.aclose()


async def test_fifty_concurrent_identical_requests_in_one_thread_admit_exactly_repeat_limit(sim):
    r = make_router([backend(sim, "xai", "gl-c", max_concurrent=50)],
                    guards={"repeat_limit": 7, "repeat_window": "1h"})
    sim.reset_stats("gl-c")
    sim.set_latency("gl-c", 0.05)
    try:
        res = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, thread_id="burst", max_tokens=5)
                                     for _ in range(50)), return_exceptions=True)
    finally:
        sim.set_latency("gl-c", 0)
    ok = [x for x in res if not isinstance(x, BaseException)]
    assert len(ok) == 7 and all(isinstance(x, LoopDetectedError) for x in res if x not in ok)
    assert sim.stats("gl-c").requests == 7
    await r.aclose()


async def test_a_loop_window_ends(sim):
    r = make_router([backend(sim, "xai", "gl-w")], guards={"repeat_limit": 1, "repeat_window": "500ms"})
    await r.complete("grok-4.1", MESSAGES, thread_id="w", max_tokens=5)
    with pytest.raises(LoopDetectedError):
        await r.complete("grok-4.1", MESSAGES, thread_id="w", max_tokens=5)

    async def again() -> bool:
        try:
            await r.complete("grok-4.1", MESSAGES, thread_id="w", max_tokens=5)
        except LoopDetectedError:
            return False
        return True

    deadline = time.monotonic() + 10
    while not await again():
        assert time.monotonic() < deadline
        await asyncio.sleep(0.1)
    await r.aclose()


# ------------------------------------------------------------------ call caps

async def test_call_caps_are_exact_under_concurrency_and_end_thread_resets_them(sim):
    r = make_router([backend(sim, "xai", "gc-a", max_concurrent=40)], guards={"max_calls_per_thread": 12})
    sim.reset_stats("gc-a")
    sim.set_latency("gc-a", 0.03)
    try:
        res = await asyncio.gather(*(r.complete("grok-4.1", [{"role": "user", "content": f"step {i}"}],
                                                agent_id="a", thread_id="cap", max_tokens=5)
                                     for i in range(40)), return_exceptions=True)
    finally:
        sim.set_latency("gc-a", 0)
    refused = [x for x in res if isinstance(x, CallLimitError)]
    assert len(refused) == 28 and sum(not isinstance(x, BaseException) for x in res) == 12
    assert (refused[0].thread_id, refused[0].limit) == ("cap", 12)
    assert sim.stats("gc-a").requests == 12
    assert _outcomes(r).count("refused:call_limit") == 28
    await r.complete("grok-4.1", MESSAGES, thread_id="other", max_tokens=5)    # its own count
    assert r.end_thread("cap") is None          # no budget: None, and the count is forgotten
    await r.complete("grok-4.1", MESSAGES, thread_id="cap", max_tokens=5)
    await r.aclose()


async def test_a_call_cap_counts_requests_not_tries(sim):
    from xml_pipeline_llm.simulator import Fault

    r = make_router([backend(sim, "xai", "gc-t")], guards={"max_calls_per_thread": 2}, retries=3)
    sim.reset_stats("gc-t")
    sim.script("gc-t", [Fault.status(500), Fault.status(500)])
    await r.complete("grok-4.1", MESSAGES, thread_id="tries", max_tokens=5)     # three tries, one request
    await r.complete("grok-4.1", MESSAGES, thread_id="tries", max_tokens=5)
    with pytest.raises(CallLimitError):
        await r.complete("grok-4.1", MESSAGES, thread_id="tries", max_tokens=5)
    assert sim.stats("gc-t").requests == 4
    await r.aclose()


def test_guard_config_mistakes_name_the_place_and_the_fix(sim):
    cases = [({"repeat_limit": 0}, "llm.guards.repeat_limit"),
             ({"repeat_limit": 3, "repeat_window": "ten minutes"}, "llm.guards.repeat_window: expected a duration"),
             ({"repeat_limit": 3, "repeat_window": -5}, "llm.guards.repeat_window"),
             ({"repeat_window": "10m"}, "set without repeat_limit"),
             ({"max_calls": 3}, 'did you mean "max_calls_per_thread"'),
             ({"max_calls_per_thread": "many"}, "llm.guards.max_calls_per_thread: expected a positive integer")]
    for guards, expected in cases:
        with pytest.raises(ConfigError, match=expected):
            make_router([backend(sim, "xai", "gx-a")], guards=guards)
    budget = {"scope": "agent", "max_tokens": 100}
    for degrade, expected in [({"at": 80, "to": "no-such-model"}, 'degrade.to: no backend serves model "no-such'),
                              ({"at": 100, "to": "grok-3"}, r"llm.budgets\[0\].degrade.at"),
                              ({"at": 80, "too": "grok-3"}, 'did you mean "to"')]:
        with pytest.raises(ConfigError, match=expected):
            make_router([backend(sim, "xai", "gx-a")], budgets=[{**budget, "degrade": degrade}])
    make_router([backend(sim, "xai", "gx-a")], models={"cheap": ["grok-3"]},
                budgets=[{**budget, "degrade": {"at": 80, "to": "cheap"}}])          # an alias is fine


# ------------------------------------------------------------------ kill switch

async def test_block_refuses_before_sending_unblock_lifts_it_and_calls_in_flight_finish(sim):
    r = make_router([backend(sim, "xai", "gk-a")])
    sim.reset_stats("gk-a")
    sim.set_latency("gk-a", 0.3)
    try:
        flying = asyncio.ensure_future(r.complete("grok-4.1", MESSAGES, agent_id="rogue", max_tokens=5))
        assert await until(lambda: r.gate("gk-a").in_flight == 1)
        await r.block(agent="rogue", reason="spamming the search tool")
        assert (await flying).content                       # in flight: finishes
    finally:
        sim.set_latency("gk-a", 0)
    with pytest.raises(BlockedError) as info:
        await r.complete("grok-4.1", MESSAGES, agent_id="rogue", max_tokens=5)
    assert info.value.reason == "spamming the search tool" and "unblock --agent rogue" in str(info.value)
    with pytest.raises(BlockedError):
        async with r.stream("grok-4.1", MESSAGES, agent_id="rogue", max_tokens=5) as s:
            _ = [d async for d in s]
    await r.complete("grok-4.1", MESSAGES, agent_id="good", max_tokens=5)
    assert sim.stats("gk-a").requests == 2
    # thread and metadata blocks: all given fields must match
    await r.block(thread="t-bad", metadata={"org": "acme"}, reason="runaway")
    await r.complete("grok-4.1", MESSAGES, agent_id="good", thread_id="t-bad", max_tokens=5)
    with pytest.raises(BlockedError):
        await r.complete("grok-4.1", MESSAGES, agent_id="good", thread_id="t-bad", metadata={"org": "acme"})
    listed = await r.blocked()
    assert [(b.agent, b.thread, dict(b.metadata), b.reason) for b in listed] == [
        ("rogue", None, {}, "spamming the search tool"), (None, "t-bad", {"org": "acme"}, "runaway")]
    assert await r.unblock(agent="rogue") and not await r.unblock(agent="rogue")
    await r.complete("grok-4.1", MESSAGES, agent_id="rogue", max_tokens=5)
    assert _outcomes(r).count("refused:blocked") == 3
    with pytest.raises(ValueError, match="name what to block"):
        await r.block(reason="everything")
    await r.aclose()


def test_a_block_survives_a_restart_with_a_sqlite_ledger_and_the_cli_manages_it(sim, tmp_path):
    db = tmp_path / "usage.db"
    cfg = tmp_path / "organism.yaml"
    block = {"usage_store": f"sqlite:///{db}", "timeout": 10, "backends": [backend(sim, "xai", "gk-s")]}
    cfg.write_text(json.dumps({"llm": block}))

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", *args, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **FAKE_KEYS})

    code = textwrap.dedent(f"""
        import asyncio
        from xml_pipeline_llm import LLMRouter, load_config
        r = LLMRouter(load_config({str(cfg)!r}))
        async def go():
            await r.block(agent="crasher", reason="crash loop")
            await r.aclose()
        asyncio.run(go())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60,
                          env={**os.environ, **FAKE_KEYS})
    assert proc.returncode == 0, proc.stderr[-2000:]
    listed = cli("blocked")
    assert listed.returncode == 0 and "crasher" in listed.stdout and "crash loop" in listed.stdout, listed
    from xml_pipeline_llm import LLMRouter, load_config

    r = LLMRouter(load_config(str(cfg)))                    # a restart: the block is still there

    async def go() -> None:
        with pytest.raises(BlockedError, match="crash loop"):
            await r.complete("grok-4.1", MESSAGES, agent_id="crasher", max_tokens=5)
        done = cli("block", "--agent", "other", "--reason", "by hand")
        assert done.returncode == 0, done.stderr
        assert await _until_refused(r, "other", True)             # reaches a running process
        gone = cli("unblock", "--agent", "crasher")
        assert gone.returncode == 0, gone.stderr
        assert await _until_refused(r, "crasher", False)
        await r.aclose()

    asyncio.run(go())
    bad = cli("block", "--reason", "x")
    assert bad.returncode == 1 and "error:" in bad.stderr and "Traceback" not in bad.stderr


async def _until_refused(r, agent: str, refused: bool, timeout: float = 5.0) -> bool:
    """Call as ``agent`` until its calls are refused (``refused``) or served again; whether that happened."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        try:
            await r.complete("grok-4.1", MESSAGES, agent_id=agent, max_tokens=5)
            if not refused:
                return True
        except BlockedError:
            if refused:
                return True
        await asyncio.sleep(0.05)
    return False


# ------------------------------------------------------------------ degrade

async def test_a_budget_degrades_to_the_cheap_model_at_its_percent_fires_once_and_still_refuses_at_100(sim):
    from xml_pipeline_llm.reservation import prompt_tokens

    per_call = prompt_tokens("grok-4.1", MESSAGES) + 10
    r = make_router([backend(sim, "xai", "gd-a")], models={"cheap": ["grok-3-mini"]},
                    budgets=[{"scope": "agent", "match": "researcher", "max_tokens": 10 * per_call,
                              "warn_at": [90], "degrade": {"at": 50, "to": "cheap"}}])
    events = []
    r.on_budget(events.append)
    models = []
    while True:
        try:
            resp = await r.complete("grok-4.1", MESSAGES, agent_id="researcher", max_tokens=10)
        except BudgetExceededError:
            break
        models.append(resp.model)
        assert len(models) < 40
    status = r.budget_status("agent", "researcher")
    first_cheap = models.index(next(m for m in models if "mini" in m))
    spent_before = sum(e.total_tokens for e in r.usage_events()[:first_cheap])
    assert spent_before * 100 >= 50 * status.limit_tokens                   # switched once 50% was spent ...
    spent_one_less = sum(e.total_tokens for e in r.usage_events()[:first_cheap - 1])
    assert spent_one_less * 100 < 50 * status.limit_tokens                  # ... and not before
    assert all("mini" in m for m in models[first_cheap:]) and all("mini" not in m for m in models[:first_cheap])
    events_seen = [(e.severity, e.percent) for e in events]
    assert events_seen.count(("degraded", 50)) == 1
    assert events_seen.index(("degraded", 50)) < events_seen.index(("critical", 90))
    cheap = [e for e in r.usage_events() if e.model == "grok-3-mini"]
    assert cheap and all(e.requested_model == "cheap" for e in cheap)
    await r.complete("grok-4.1", MESSAGES, agent_id="writer", max_tokens=10)   # not under that budget
    assert r.usage_events()[-1].model == "grok-4.1"
    await r.aclose()


# ------------------------------------------------------------------ gateway

def test_the_gateway_maps_guard_errors_to_429_and_403():
    from xml_pipeline_llm.gateway.errors import from_exception

    loop = from_exception(LoopDetectedError("loop", "t", "a", 6, 600.0), "r1")
    cap = from_exception(CallLimitError("cap", "t", 200), "r2")
    blocked = from_exception(BlockedError("blocked", "why"), "r3")
    assert (loop.status, loop.code) == (429, "loop_detected")
    assert (cap.status, cap.code) == (429, "call_limit_exceeded")
    assert (blocked.status, blocked.code) == (403, "blocked")


# ------------------------------------------------------------------ with shared_state (Redis)

redis_only = pytest.mark.skipif(__import__("shutil").which("redis-server") is None and not os.environ.get("CI"),
                                reason="redis-server is not installed")


@pytest.fixture(scope="module")
def redis_url():
    from test_redis import RedisServer

    server = RedisServer().start()
    yield server.url
    server.stop()


def _shared(url: str, prefix: str, backends, **extra):
    return make_router(backends, shared_state=url, redis_prefix=prefix, **extra)


def _prefix() -> str:
    import uuid

    return f"g{uuid.uuid4().hex[:8]}"


@redis_only
async def test_fleet_loops_and_call_caps_are_exact_across_routers(sim, redis_url):
    p = _prefix()
    guards = {"repeat_limit": 5, "repeat_window": "10m", "max_calls_per_thread": 9}
    a = _shared(redis_url, p, [backend(sim, "xai", "gr-a", max_concurrent=60)], guards=guards)
    b = _shared(redis_url, p, [backend(sim, "xai", "gr-a", max_concurrent=60)], guards=guards)
    sim.reset_stats("gr-a")
    res = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, thread_id="fleet", max_tokens=5)
                                 for r in (a, b) for _ in range(25)), return_exceptions=True)
    assert sum(not isinstance(x, BaseException) for x in res) == 5
    assert all(isinstance(x, LoopDetectedError) for x in res if isinstance(x, BaseException))
    res = await asyncio.gather(*(r.complete("grok-4.1", [{"role": "user", "content": f"q{i}"}], thread_id="fleet",
                                            max_tokens=5) for i, r in enumerate([a, b] * 10)), return_exceptions=True)
    assert sum(not isinstance(x, BaseException) for x in res) == 4          # 9 calls in all, 5 made already
    assert all(isinstance(x, CallLimitError) for x in res if isinstance(x, BaseException))
    assert sim.stats("gr-a").requests == 9
    b.end_thread("fleet")                                                   # forgotten fleet-wide
    await a.complete("grok-4.1", MESSAGES, thread_id="fleet", max_tokens=5)
    await a.aclose()
    await b.aclose()


@redis_only
def test_a_block_in_one_process_stops_the_agent_in_another_and_survives_a_restart(sim, redis_url, tmp_path):
    p = _prefix()
    block = {"shared_state": redis_url, "redis_prefix": p, "timeout": 10, "backends": [backend(sim, "xai", "gr-k")]}
    cfg = tmp_path / "organism.yaml"
    cfg.write_text(json.dumps({"llm": block}))
    code = textwrap.dedent(f"""
        import asyncio, sys, time
        from xml_pipeline_llm import LLMRouter, load_config
        r = LLMRouter(load_config({str(cfg)!r}))
        async def go():
            await r.block(agent="swarm-7", reason="burning money")
            print(time.time(), flush=True)
            await r.aclose()
        asyncio.run(go())
    """)
    from xml_pipeline_llm import LLMRouter, load_config

    r = LLMRouter(load_config(str(cfg)))

    async def go() -> None:
        await r.complete("grok-4.1", MESSAGES, agent_id="swarm-7", max_tokens=5)
        proc = await asyncio.create_subprocess_exec(sys.executable, "-c", code, stdout=subprocess.PIPE,
                                                    stderr=subprocess.PIPE, env={**os.environ, **FAKE_KEYS})
        out, err = await proc.communicate()
        assert proc.returncode == 0, err.decode()[-2000:]
        blocked_at = float(out.decode().split()[-1])
        while True:                                  # the agent keeps calling until it is stopped
            try:
                await r.complete("grok-4.1", MESSAGES, agent_id="swarm-7", max_tokens=5)
            except BlockedError as exc:
                assert exc.reason == "burning money"
                break
            assert time.time() - blocked_at < 5
            await asyncio.sleep(0.02)
        await r.complete("grok-4.1", MESSAGES, agent_id="someone-else", max_tokens=5)
        await r.aclose()

    asyncio.run(go())
    again = LLMRouter(load_config(str(cfg)))         # a restart: still blocked

    async def restarted() -> None:
        with pytest.raises(BlockedError):
            await again.complete("grok-4.1", MESSAGES, agent_id="swarm-7", max_tokens=5)
        assert [b.agent for b in await again.blocked()] == ["swarm-7"]
        await again.aclose()

    asyncio.run(restarted())

    def cli(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", *args, "-c", str(cfg)],
                              capture_output=True, text=True, timeout=60, env={**os.environ, **FAKE_KEYS})

    listed = cli("blocked")
    assert listed.returncode == 0 and "swarm-7" in listed.stdout and "burning money" in listed.stdout, listed
    assert cli("unblock", "--agent", "swarm-7").returncode == 0
    assert "nothing is blocked" in cli("blocked").stdout
    last = LLMRouter(load_config(str(cfg)))

    async def lifted() -> None:
        await last.complete("grok-4.1", MESSAGES, agent_id="swarm-7", max_tokens=5)
        await last.aclose()

    asyncio.run(lifted())


@redis_only
async def test_a_fleet_budget_degrades_and_fires_once(sim, redis_url):
    from xml_pipeline_llm.reservation import prompt_tokens

    per_call = prompt_tokens("grok-4.1", MESSAGES) + 10
    p = _prefix()
    rules = [{"scope": "agent", "max_tokens": 8 * per_call, "degrade": {"at": 50, "to": "grok-3-mini"}}]
    a = _shared(redis_url, p, [backend(sim, "xai", "gr-d")], budgets=rules)
    b = _shared(redis_url, p, [backend(sim, "xai", "gr-d")], budgets=rules)
    events = []
    a.on_budget(events.append)
    b.on_budget(events.append)
    models = []
    for i in range(12):
        try:
            models.append((await (a, b)[i % 2].complete("grok-4.1", MESSAGES, agent_id="fleet-r",
                                                        max_tokens=10)).model)
        except BudgetExceededError:
            break
        await asyncio.sleep(0.3)               # the other router reads the fleet's spend every half second
    assert "grok-4.1" in models[0] and "mini" in models[-1]
    assert [(e.severity, e.percent) for e in events].count(("degraded", 50)) == 1
    await a.aclose()
    await b.aclose()
