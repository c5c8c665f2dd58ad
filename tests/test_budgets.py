"""Budgets: reserve the worst case before sending, settle after, never exceed."""

from __future__ import annotations

import asyncio
import json
import subprocess
import sys
import textwrap
import time

import pytest
from conftest import MESSAGES, backend, make_router, until

from xml_pipeline_llm import BudgetExceededError, ConfigError, ProviderError
from xml_pipeline_llm.reservation import prompt_tokens
from xml_pipeline_llm.simulator import Fault

WORST = prompt_tokens("grok-4.1", MESSAGES) + 20        # prompt estimate + max_tokens=20


async def test_a_burst_never_spends_more_than_the_budget_and_sends_only_what_fits(sim):
    budget = 50 * WORST
    r = make_router([backend(sim, "xai", "bu-a")],
                    budgets=[{"scope": "agent", "match": "greedy", "max_tokens": budget}])
    sim.reset_stats("bu-a")
    sim.set_latency("bu-a", 0.05)
    try:
        results = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, agent_id="greedy", max_tokens=20)
                                         for _ in range(200)), return_exceptions=True)
    finally:
        sim.set_latency("bu-a", 0)
    ok = [x for x in results if not isinstance(x, BaseException)]
    refused = [x for x in results if isinstance(x, BudgetExceededError)]
    assert len(ok) + len(refused) == 200
    stats = sim.stats("bu-a")
    assert stats.requests == len(ok) >= 50           # exactly the calls that fit were sent
    assert stats.prompt_tokens + stats.completion_tokens <= budget
    e = refused[0]
    assert (e.scope, e.key, e.unit, e.limit) == ("agent", "greedy", "tokens", budget)
    assert e.resets_at is None and "nothing was sent" in str(e)
    status = r.budget_status("agent", "greedy")
    assert status.used_tokens == stats.prompt_tokens + stats.completion_tokens
    assert status.reserved_tokens == 0
    assert r.get_agent_usage("greedy").request_count == len(ok)   # refusals are not calls


async def test_a_thread_budget_refuses_the_second_call_and_end_thread_forgets_it(sim):
    r = make_router([backend(sim, "xai", "bt-a")], max_tokens_per_thread=WORST + 5)
    sim.reset_stats("bt-a")
    await r.complete("grok-4.1", MESSAGES, thread_id="t-1", max_tokens=20)
    with pytest.raises(BudgetExceededError) as info:
        await r.complete("grok-4.1", MESSAGES, thread_id="t-1", max_tokens=20)
    assert info.value.scope == "thread" and info.value.key == "t-1"
    assert sim.stats("bt-a").requests == 1
    final = r.end_thread("t-1")
    assert final is not None and final.used_tokens > 0 and final.limit_tokens == WORST + 5
    assert r.end_thread("t-1") is None
    await r.complete("grok-4.1", MESSAGES, thread_id="t-2", max_tokens=20)   # another thread: its own


async def test_a_window_rolls_over_on_its_utc_boundary(sim):
    from xml_pipeline_llm import LLMRouter, load_config

    now = [1_767_225_600.0 + 3600 * 5 + 10]          # 2026-01-01 05:00:10 UTC
    config = load_config({"llm": {"budgets": [{"scope": "agent", "max_tokens": WORST + 5, "window": "1h"}],
                                  "backends": [backend(sim, "xai", "bw-a")]}})
    r = LLMRouter(config, clock=lambda: now[0])
    await r.complete("grok-4.1", MESSAGES, agent_id="hourly", max_tokens=20)
    with pytest.raises(BudgetExceededError) as info:
        await r.complete("grok-4.1", MESSAGES, agent_id="hourly", max_tokens=20)
    assert info.value.resets_at == 1_767_225_600.0 + 3600 * 6
    now[0] += 3589                                   # 05:59:59: still the same window
    with pytest.raises(BudgetExceededError):
        await r.complete("grok-4.1", MESSAGES, agent_id="hourly", max_tokens=20)
    now[0] += 1                                      # 06:00:00: a new window
    assert (await r.complete("grok-4.1", MESSAGES, agent_id="hourly", max_tokens=20)).content
    status = r.budget_status("agent", "hourly")
    assert status.resets_at == 1_767_225_600.0 + 3600 * 7 and status.window == "1h"


async def test_failed_and_cancelled_calls_give_their_reservation_back(sim):
    r = make_router([backend(sim, "xai", "bc-a")], retries=0,
                    budgets=[{"scope": "agent", "max_tokens": 2 * WORST}])
    sim.script("bc-a", [Fault.status(500)] * 5)
    for _ in range(5):                               # five failures would leak 5 reservations
        with pytest.raises(ProviderError):
            await r.complete("grok-4.1", MESSAGES, agent_id="unlucky", max_tokens=20)
    sim.set_latency("bc-a", 5)
    try:
        tasks = [asyncio.ensure_future(r.complete("grok-4.1", MESSAGES, agent_id="unlucky", max_tokens=20))
                 for _ in range(2)]
        assert await until(lambda: r.gate("bc-a").in_flight == 2)
        assert r.budget_status("agent", "unlucky").reserved_tokens == 2 * WORST
        for t in tasks:
            t.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        sim.set_latency("bc-a", 0)
    status = r.budget_status("agent", "unlucky")
    assert (status.used_tokens, status.reserved_tokens) == (0, 0)
    await r.complete("grok-4.1", MESSAGES, agent_id="unlucky", max_tokens=20)
    await r.complete("grok-4.1", MESSAGES, agent_id="unlucky", max_tokens=20)


async def test_thresholds_fire_once_each_in_order_under_concurrency(sim, caplog):
    r = make_router([backend(sim, "xai", "be-a")])
    r.set_budget("global", None, max_tokens=40 * WORST, warn_at=[75, 90, 95])
    events = []
    r.on_budget(events.append)
    results = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, max_tokens=20) for _ in range(60)),
                                   return_exceptions=True)
    assert any(isinstance(x, BudgetExceededError) for x in results) or len(results) == 60
    for _ in range(200):                             # spend up to the end of the budget
        try:
            await r.complete("grok-4.1", MESSAGES, max_tokens=20)
        except BudgetExceededError:
            break
    percents = [e.percent for e in events]
    assert percents[:3] == [75, 90, 95] and len(percents) == len(set(percents))
    assert [e.severity for e in events[:3]] == ["warning", "critical", "final"]
    assert all(e.used * 100 >= e.percent * e.limit for e in events)
    assert all(e.scope == "global" and e.key is None and e.unit == "tokens" for e in events)
    assert sum("budget global" in m for m in caplog.messages) == len(events)


async def test_a_dollar_budget_refuses_a_model_without_a_price(sim):
    r = make_router([backend(sim, "xai", "bp-a", supported_models=["unpriced-*"])],
                    budgets=[{"scope": "agent", "max_usd": 1.0}])
    with pytest.raises(BudgetExceededError) as info:
        await r.complete("unpriced-1", MESSAGES, agent_id="a")
    assert "llm.pricing" in str(info.value) and info.value.unit == "usd"
    assert sim.stats("bp-a").requests == 0


async def test_a_dollar_budget_reserves_the_priced_worst_case(sim):
    pricing = {"budget-model": {"input_per_mtok": 1_000_000.0, "output_per_mtok": 1_000_000.0}}   # $1/token
    r = make_router([backend(sim, "openai", "bd-a", supported_models=["budget-model"])], pricing=pricing,
                    budgets=[{"scope": "agent", "match": "payer", "max_usd": 60.0}])
    worst = prompt_tokens("budget-model", MESSAGES) + 10
    resp = await r.complete("budget-model", MESSAGES, agent_id="payer", max_tokens=10)
    status = r.budget_status("agent", "payer")
    assert status.used_usd == pytest.approx(resp.cost_usd) and status.limit_usd == 60.0
    if resp.cost_usd + worst > 60:
        with pytest.raises(BudgetExceededError):
            await r.complete("budget-model", MESSAGES, agent_id="payer", max_tokens=10)
    assert r.budget_status("agent", "someone-else") is None          # the rule matches payer only


async def test_a_budget_set_at_run_time_wins_over_the_config_rule(sim):
    r = make_router([backend(sim, "xai", "bq-a")], budgets=[{"scope": "agent", "max_tokens": 1}])
    with pytest.raises(BudgetExceededError):
        await r.complete("grok-4.1", MESSAGES, agent_id="vip", max_tokens=20)
    r.set_budget("agent", "vip", max_tokens=10 * WORST)
    await r.complete("grok-4.1", MESSAGES, agent_id="vip", max_tokens=20)
    r.reset_budget("agent", "vip")
    assert r.budget_status("agent", "vip").used_tokens == 0
    assert {(b.scope, b.key) for b in r.budgets()} >= {("agent", "vip")}
    with pytest.raises(ValueError, match="scope"):
        r.set_budget("tenant", "x", max_tokens=5)
    with pytest.raises(ValueError, match="max_tokens"):
        r.set_budget("agent", "x", max_tokens=-5)


def test_budget_config_mistakes_name_the_place_and_the_fix(sim):
    cases = [({"scope": "agnt", "max_usd": 1}, "llm.budgets[0].scope"),
             ({"scope": "metadata.", "max_usd": 1}, "metadata.org_id"),
             ({"scope": "agent", "window": "2d", "max_usd": 1}, "llm.budgets[0].window"),
             ({"scope": "agent"}, "set max_tokens, max_usd or both"),
             ({"scope": "agent", "max_tokens": -1}, "llm.budgets[0].max_tokens"),
             ({"scope": "agent", "max_usd": 1, "warn_at": [0, 150]}, "outside 1..100"),
             ({"scope": "agent", "max_usd": 1, "windw": "1d"}, 'did you mean "window"')]
    for entry, expected in cases:
        with pytest.raises(ConfigError, match=expected.replace("[", r"\[").replace("]", r"\]")):
            make_router([backend(sim, "xai", "bx-a")], budgets=[entry])


def test_a_restarted_process_does_not_get_a_fresh_budget(sim, tmp_path):
    db = tmp_path / "usage.db"
    config = {"llm": {"usage_store": f"sqlite:///{db}", "timeout": 10,
                      "budgets": [{"scope": "agent", "max_tokens": 4 * WORST, "window": "1d"},
                                  {"scope": "metadata.org", "max_tokens": 4 * WORST, "window": "1d"},
                                  {"scope": "metadata.tier", "max_tokens": 4 * WORST}],
                      "backends": [backend(sim, "xai", "bs-a")]}}
    code = textwrap.dedent(f"""
        import asyncio, json
        from xml_pipeline_llm import LLMRouter, load_config
        r = LLMRouter(load_config(json.loads({json.dumps(json.dumps(config))})))
        async def go():
            for meta in ({{"org": "acme", "tier": 2}}, {{"org": "acme"}}, {{"org": "other_co"}}):
                await r.complete("grok-4.1", {MESSAGES!r}, agent_id="restarter", max_tokens=20, metadata=meta)
            await r.aclose()
        asyncio.run(go())
    """)
    proc = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert proc.returncode == 0, proc.stderr[-2000:]
    from xml_pipeline_llm import LLMRouter, load_config

    r = LLMRouter(load_config(config))
    status = r.budget_status("agent", "restarter")
    assert 0 < status.used_tokens <= 3 * WORST            # what the first process spent
    assert status.remaining_tokens == 4 * WORST - status.used_tokens
    each = status.used_tokens // 3                          # the three calls are alike
    assert r.budget_status("metadata.org", "acme").used_tokens == 2 * each
    assert r.budget_status("metadata.org", "other_co").used_tokens == each
    assert r.budget_status("metadata.tier", "2").used_tokens == each
    assert r.budget_status("metadata.org", "nobody").used_tokens == 0


async def test_budgets_cost_nothing_when_none_is_set(sim):
    r = make_router([backend(sim, "xai", "bn-a")])
    start = time.monotonic()
    assert (await r.complete("grok-4.1", MESSAGES)).content and r.budgets() == []
    assert time.monotonic() - start < 10


async def test_a_stream_holds_its_reservation_until_it_ends_and_is_charged_what_it_used(sim):
    r = make_router([backend(sim, "xai", "bsm-a")], budgets=[{"scope": "thread", "max_tokens": 10 * WORST}])
    s = r.stream("grok-4.1", MESSAGES, thread_id="streamed", max_tokens=20)
    async for _ in s:
        break                                            # content arrived: the try is held
    assert r.budget_status("thread", "streamed").reserved_tokens == WORST
    await s.aclose()                                     # closed early: charged what it used
    status = r.budget_status("thread", "streamed")
    assert status.reserved_tokens == 0 and status.used_tokens == s.response.usage["total_tokens"] > 0
    full = r.stream("grok-4.1", MESSAGES, thread_id="streamed", max_tokens=20)
    async for _ in full:
        pass
    after = r.budget_status("thread", "streamed")
    assert after.used_tokens == status.used_tokens + full.response.usage["total_tokens"]
    assert after.reserved_tokens == 0
