"""Cost that is right on agent workloads: prompt-cache reads and writes, reasoning tokens.

The simulator reports prompt-cache usage in each provider's real shape
(``Simulator.set_usage_details``); LiteLLM's real HTTP code parses it; the
router must carry it everywhere usage goes and price it at the model's own
cache prices, the same for ``complete()`` and ``stream()``.

Prices registered by one test never leak into another: ``llm.pricing`` is the
router's own, so tests that price models use names of their own anyway.
"""

from __future__ import annotations

import asyncio
import csv
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from conftest import MESSAGES, backend, make_router, old_ledger, until

import xml_pipeline_llm
from xml_pipeline_llm import BudgetExceededError, LLMRouter, load_config
from xml_pipeline_llm.stores import read_events

DETAILS = ("cached_tokens", "cache_write_tokens", "reasoning_tokens")
# A long system prompt: the part an agent loop resends on every step, read from the cache.
LONG = [{"role": "system", "content": "You are a careful research agent. " * 60},
        {"role": "user", "content": "summarise the findings so far"}]


def litellm_prices(key: str) -> dict[str, float]:
    """The per-token prices of a model in LiteLLM's cost map."""
    import litellm

    entry = litellm.model_cost[key]
    return {"input": entry["input_cost_per_token"], "output": entry["output_cost_per_token"],
            "read": entry.get("cache_read_input_token_cost", entry["input_cost_per_token"]),
            "write": entry.get("cache_creation_input_token_cost", entry["input_cost_per_token"])}


def by_hand(usage: dict[str, int], p: dict[str, float]) -> float:
    """A usage priced by hand: uncached input, cache reads, cache writes and output at their prices."""
    uncached = usage["prompt_tokens"] - usage["cached_tokens"] - usage["cache_write_tokens"]
    return (uncached * p["input"] + usage["cached_tokens"] * p["read"]
            + usage["cache_write_tokens"] * p["write"] + usage["completion_tokens"] * p["output"])


async def streamed(r: LLMRouter, model: str, messages: list[dict[str, Any]], **kw: Any) -> Any:
    s = r.stream(model, messages, **kw)
    _ = [d async for d in s]
    assert s.response is not None
    return s.response


# ------------------------------------------------------------ usage fields, both shapes, both paths

async def test_openai_shape_cached_and_reasoning_tokens_complete_and_stream(sim):
    sim.set_usage_details("pc-oa", cached=0.75, reasoning_tokens=9)
    r = make_router([backend(sim, "openai", "pc-oa")])
    sim.reset_stats("pc-oa")
    done = await r.complete("gpt-4o", LONG, agent_id="oa")
    st = sim.stats("pc-oa")
    assert done.usage["prompt_tokens"] == st.prompt_tokens            # every input token, cached or not
    assert done.usage["cached_tokens"] == st.cached_tokens == int(st.prompt_tokens * 0.75) > 0
    assert done.usage["cache_write_tokens"] == 0                      # OpenAI reports no cache writes
    assert done.usage["reasoning_tokens"] == 9 and done.usage["completion_tokens"] == st.completion_tokens
    assert done.usage["total_tokens"] == done.usage["prompt_tokens"] + done.usage["completion_tokens"]
    s = await streamed(r, "gpt-4o", LONG, agent_id="oa")
    assert s.usage == done.usage
    assert s.cost_usd == done.cost_usd                                 # exactly, not approximately
    await r.aclose()


async def test_anthropic_shape_cache_reads_and_writes_complete_and_stream(sim):
    sim.set_usage_details("pc-an", cached=0.5, cache_write=0.25)
    r = make_router([backend(sim, "anthropic", "pc-an")])
    sim.reset_stats("pc-an")
    done = await r.complete("claude-sonnet-4-5", LONG, agent_id="an")
    st = sim.stats("pc-an")
    # prompt_tokens counts input + cache read + cache write (Anthropic's input_tokens is the rest)
    assert done.usage["prompt_tokens"] == st.prompt_tokens
    assert done.usage["cached_tokens"] == st.cached_tokens == int(st.prompt_tokens * 0.5) > 0
    assert done.usage["cache_write_tokens"] == st.cache_write_tokens == int(st.prompt_tokens * 0.25) > 0
    assert done.usage["reasoning_tokens"] == 0
    s = await streamed(r, "claude-sonnet-4-5", LONG, agent_id="an")   # cache figures in message_start,
    assert s.usage == done.usage                                      # cumulative usage in message_delta
    assert s.cost_usd == done.cost_usd
    await r.aclose()


async def test_no_cache_reported_means_zeros_not_missing_keys(sim):
    r = make_router([backend(sim, "xai", "pc-none"), backend(sim, "ollama", "pc-ollama")])
    for resp in (await r.complete("grok-4.1", MESSAGES), await streamed(r, "grok-4.1", MESSAGES),
                 await r.complete("llama3", MESSAGES), await streamed(r, "llama3", MESSAGES)):
        assert {k: resp.usage[k] for k in DETAILS} == dict.fromkeys(DETAILS, 0)
    await r.aclose()


# ------------------------------------------------------------ cost: LiteLLM's prices, applied by hand

@pytest.mark.parametrize(("provider", "model", "key", "details"), [
    ("openai", "gpt-4o", "gpt-4o", {"cached": 0.8, "reasoning_tokens": 5}),
    ("anthropic", "claude-sonnet-4-5", "claude-sonnet-4-5", {"cached": 0.6, "cache_write": 0.3}),
])
async def test_cost_is_litellms_cache_prices_applied_by_hand(sim, provider, model, key, details):
    name = f"pc-cost-{provider}"
    sim.set_usage_details(name, **details)
    ledger_r = make_router([backend(sim, provider, name)])
    prices = litellm_prices(key)
    assert prices["read"] < prices["input"]                # the map prices cache reads lower
    done = await ledger_r.complete(model, LONG, agent_id="priced")
    s = await streamed(ledger_r, model, LONG, agent_id="priced")
    for resp in (done, s):
        assert resp.cost_usd == pytest.approx(by_hand(resp.usage, prices), rel=1e-9)
        uncached = by_hand({**resp.usage, "cached_tokens": 0, "cache_write_tokens": 0}, prices)
        assert resp.cost_usd != pytest.approx(uncached)     # what ignoring the cache would charge
    u = ledger_r.get_agent_usage("priced")
    assert u.cost_usd == pytest.approx(done.cost_usd + s.cost_usd)
    assert u.cached_tokens == done.usage["cached_tokens"] * 2
    await ledger_r.aclose()


# ------------------------------------------------------------ totals, CSVs, ledger

async def test_totals_csvs_and_ledger_carry_the_cache_and_reasoning_tokens(sim, tmp_path):
    db = tmp_path / "usage.db"
    sim.set_usage_details("pc-tot-oa", cached=0.5, reasoning_tokens=3)
    sim.set_usage_details("pc-tot-an", cached=0.5, cache_write=0.2)
    r = make_router([backend(sim, "openai", "pc-tot-oa"), backend(sim, "anthropic", "pc-tot-an")],
                    usage_store=f"sqlite:///{db}")
    answers = [await r.complete("gpt-4o", LONG, agent_id="a1", thread_id="t1"),
               await streamed(r, "claude-sonnet-4-5", LONG, agent_id="a1", thread_id="t2"),
               await r.complete("claude-sonnet-4-5", LONG, agent_id="a2", thread_id="t2")]
    want = {k: sum(a.usage[k] for a in answers) for k in DETAILS}
    assert all(want.values())
    for by in ("agent", "model", "backend", "thread"):
        totals = r.get_all_usage(by)
        assert {k: sum(getattr(t, k) for t in totals.values()) for k in DETAILS} == want, by
    a1 = r.get_agent_usage("a1")
    assert a1.cache_write_tokens == answers[1].usage["cache_write_tokens"]
    assert a1.reasoning_tokens == answers[0].usage["reasoning_tokens"] == 3

    r.export_usage_csv(tmp_path / "agent.csv", by="agent")
    rows = {x["agent_id"]: x for x in csv.DictReader((tmp_path / "agent.csv").open())}
    assert {k: int(rows["a1"][k]) for k in DETAILS} == {k: getattr(a1, k) for k in DETAILS}
    r.export_usage_csv(tmp_path / "event.csv", by="event")
    with (tmp_path / "event.csv").open() as fh:
        header = next(csv.reader(fh))
    documented = ["timestamp", "agent_id", "thread_id", "model", "backend", "provider", "prompt_tokens",
                  "completion_tokens", "total_tokens", "cost_usd", "latency_ms", "outcome"]
    assert header[:len(documented)] == documented and header[-1] == "metadata"
    events = list(csv.DictReader((tmp_path / "event.csv").open()))
    assert [{k: int(e[k]) for k in DETAILS} for e in events] == [{k: a.usage[k] for k in DETAILS}
                                                                 for a in answers]
    stored = list(read_events(db))
    assert [{k: getattr(e, k) for k in DETAILS} for e in stored] == [{k: a.usage[k] for k in DETAILS}
                                                                    for a in answers]
    assert [e.cost_usd for e in stored] == [a.cost_usd for a in answers]
    await r.aclose()


async def test_an_old_ledger_is_migrated_with_nothing_lost(sim, tmp_path):
    db = tmp_path / "old.db"
    old_ledger(db, "pc-old", (11, 7), 12.5)
    sim.set_usage_details("pc-old", cached=0.5)
    r = make_router([backend(sim, "xai", "pc-old")], usage_store=f"sqlite:///{db}")
    resp = await r.complete("grok-4.1", LONG, agent_id="new")
    await r.aclose()
    old, new = list(read_events(db))
    assert (old.agent_id, old.prompt_tokens, old.completion_tokens, old.latency_ms) == ("old", 11, 7, 12.5)
    assert {k: getattr(old, k) for k in DETAILS} == dict.fromkeys(DETAILS, 0)     # not reported back then
    assert new.cached_tokens == resp.usage["cached_tokens"] > 0


# ------------------------------------------------------------ llm.pricing cache prices

PC_PRICE = {"input_per_mtok": 4.0, "output_per_mtok": 20.0, "cached_input_per_mtok": 0.4,
            "cache_write_per_mtok": 5.0}


async def test_pricing_cache_read_and_write_prices(sim):
    sim.set_usage_details("pc-user", cached=0.5, cache_write=0.25)
    r = make_router([backend(sim, "anthropic", "pc-user")],
                    pricing={"claude-pcprice-*": PC_PRICE,
                             "claude-pcplain-1": {"input_per_mtok": 4.0, "output_per_mtok": 20.0}})
    per = {"input": 4e-6, "output": 20e-6, "read": 0.4e-6, "write": 5e-6}
    done = await r.complete("claude-pcprice-1", LONG)
    s = await streamed(r, "claude-pcprice-1", LONG)
    assert done.usage["cached_tokens"] > 0 and done.usage["cache_write_tokens"] > 0
    assert done.cost_usd == pytest.approx(by_hand(done.usage, per), rel=1e-9)
    assert s.cost_usd == done.cost_usd
    # without cache prices an entry bills cache reads and writes as ordinary input
    plain = await r.complete("claude-pcplain-1", LONG)
    assert plain.cost_usd == pytest.approx(plain.usage["prompt_tokens"] * 4e-6
                                           + plain.usage["completion_tokens"] * 20e-6, rel=1e-9)
    await r.aclose()


def test_cache_write_price_is_checked_like_the_others():
    with pytest.raises(xml_pipeline_llm.ConfigError, match="cache_write_per_mtok"):
        load_config({"llm": {"backends": [{"provider": "xai", "api_key_env": "TEST_XAI_KEY"}],
                             "pricing": {"grok-x": {"input_per_mtok": 1, "output_per_mtok": 1,
                                                    "cache_write_per_mtok": -1}}}})


# ------------------------------------------------------------ budgets: settle exactly, reserve the worst

async def test_budget_settles_the_cached_cost_and_reserves_every_input_token_at_its_dearest(sim):
    name = "pc-bud"
    sim.set_usage_details(name, cached=0.5, cache_write=0.25)
    r = make_router([backend(sim, "anthropic", name)], pricing={"claude-pcbud-1": PC_PRICE},
                    budgets=[{"scope": "agent", "match": "saver", "max_usd": 10.0, "max_tokens": 10**6}])
    resp = await r.complete("claude-pcbud-1", LONG, agent_id="saver", max_tokens=50)
    status = r.budget_status("agent", "saver")
    assert status is not None and status.used_usd == pytest.approx(resp.cost_usd)
    assert r.get_agent_usage("saver").cost_usd == pytest.approx(resp.cost_usd)

    sim.set_latency(name, 5)              # hold the next call in flight and look at what it reserved
    try:
        call = asyncio.ensure_future(r.complete("claude-pcbud-1", LONG, agent_id="saver", max_tokens=50))
        assert await until(lambda: r.budget_status("agent", "saver").reserved_tokens > 0)
        held = r.budget_status("agent", "saver")
        prompt = held.reserved_tokens - 50
        # a cache write (5.0) costs more than uncached input (4.0): the worst case for every input token
        assert held.reserved_usd == pytest.approx(prompt * 5e-6 + 50 * 20e-6, rel=1e-9)
        call.cancel()
        with pytest.raises(asyncio.CancelledError):
            await call
    finally:
        sim.set_latency(name, 0)
    await r.aclose()


def _router_config(sim: Any, name: str, price: dict[str, float], max_usd: float) -> dict[str, Any]:
    return {"llm": {"backends": [backend(sim, "xai", name)], "pricing": {"grok-pcswitch-1": price},
                    "budgets": [{"scope": "agent", "match": "switcher", "max_usd": max_usd}],
                    "retry_base_delay": 0.02, "timeout": 10}}


async def test_new_prices_apply_to_what_is_reserved_and_what_is_charged(sim):
    cheap = {"input_per_mtok": 1.0, "output_per_mtok": 1.0}
    dear = {"input_per_mtok": 1000.0, "output_per_mtok": 1000.0}
    # max_tokens=500 reserves about 0.0006 USD at the cheap price and 0.6 at the dear one
    first = xml_pipeline_llm.configure_router(_router_config(sim, "pc-switch", cheap, 0.1))
    a = await xml_pipeline_llm.complete("grok-pcswitch-1", MESSAGES, agent_id="switcher", max_tokens=500)
    assert a.cost_usd == pytest.approx(a.usage["total_tokens"] * 1e-6)

    second = xml_pipeline_llm.configure_router(_router_config(sim, "pc-switch", dear, 0.1))
    with pytest.raises(BudgetExceededError) as info:        # reserved at the new price: too dear
        await xml_pipeline_llm.complete("grok-pcswitch-1", MESSAGES, agent_id="switcher", max_tokens=500)
    assert info.value.unit == "usd"
    b = await xml_pipeline_llm.complete("grok-pcswitch-1", MESSAGES, agent_id="switcher", max_tokens=5)
    assert b.cost_usd == pytest.approx(b.usage["total_tokens"] * 1e-3)          # charged at the new price

    third = xml_pipeline_llm.configure_router(_router_config(sim, "pc-switch", cheap, 0.1))
    c = await xml_pipeline_llm.complete("grok-pcswitch-1", MESSAGES, agent_id="switcher", max_tokens=500)
    assert c.cost_usd == pytest.approx(c.usage["total_tokens"] * 1e-6)           # and back again
    # two routers alive at once keep their own prices
    again = await second.complete("grok-pcswitch-1", MESSAGES, max_tokens=5)
    assert again.cost_usd == pytest.approx(again.usage["total_tokens"] * 1e-3)
    for r in (first, second, third):
        await r.aclose()


# ------------------------------------------------------------ offline defaults at package import

def test_importing_the_package_sets_litellms_offline_defaults(tmp_path):
    code = ("import os, sys, xml_pipeline_llm\n"
            "print('litellm' in sys.modules)\n"
            "for k in ('LITELLM_LOCAL_MODEL_COST_MAP', 'LITELLM_OFFLINE_MODE',\n"
            "          'LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS', 'LITELLM_TELEMETRY'):\n"
            "    print(k, os.environ.get(k))\n")
    env = {k: v for k, v in os.environ.items() if not k.startswith("LITELLM_")}
    env["LITELLM_TELEMETRY"] = "True"          # the user's own choice is kept
    env["PYTHONPATH"] = str(Path(__file__).resolve().parents[1])
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=env, cwd=tmp_path,
                       timeout=60)
    assert p.returncode == 0, p.stderr
    lines = p.stdout.split("\n")
    assert lines[0] == "False"                  # still cheap: LiteLLM is not imported
    assert lines[1:5] == ["LITELLM_LOCAL_MODEL_COST_MAP True", "LITELLM_OFFLINE_MODE true",
                          "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS True", "LITELLM_TELEMETRY True"]
