"""The router's snapshot: agents, backends, the last minute, budgets and errors (real router + simulator)."""

from __future__ import annotations

import asyncio
import json

import pytest
from conftest import MESSAGES, backend, make_router, until

from xml_pipeline_llm import BudgetExceededError
from xml_pipeline_llm.simulator import Fault
from xml_pipeline_llm.snapshot import Snapshot, snapshot


async def test_snapshot_counts_agents_backends_budgets_and_errors(sim):
    router = make_router([backend(sim, "xai", "snap-a", max_concurrent=3),
                          backend(sim, "xai", "snap-b", max_concurrent=2)],
                         retries=2, retry_max_delay=60,
                         budgets=[{"scope": "agent", "match": "writer", "max_tokens": 100_000}],
                         pricing={"grok-4.1": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}})
    try:
        await router.complete("grok-4.1", MESSAGES, agent_id="early")     # before the first snapshot: seeded
        first = await snapshot(router)
        assert [a.agent for a in first.agents] == ["early"]
        assert first.agents[0].requests_per_min == 1 and first.agents[0].tokens_per_min > 0
        sim.script("snap-a", [Fault.status(429, retry_after=30)])
        for _ in range(3):
            await router.complete("grok-4.1", MESSAGES, agent_id="writer", max_tokens=50)
        await asyncio.gather(*(router.complete("grok-4.1", MESSAGES, agent_id="reader") for _ in range(5)))
        snap = await snapshot(router)
        rows = {a.agent: a for a in snap.agents}
        assert rows["reader"].requests_per_min == 5 and rows["writer"].requests_per_min == 3
        assert rows["writer"].budget_percent is not None and 0 < rows["writer"].budget_percent < 100
        assert rows["reader"].budget_percent is None
        assert rows["writer"].total_tokens == router.get_agent_usage("writer").total_tokens
        assert rows["reader"].spend_usd == pytest.approx(router.get_agent_usage("reader").cost_usd)
        assert rows["reader"].usd_per_min == pytest.approx(rows["reader"].spend_usd)
        assert snap.agents[0].agent == "reader"          # sorted by spend: 5 calls before 3
        assert sum(a.requests_per_min for a in snap.agents) == 9
        backends = {b.backend: b for b in snap.backends}
        assert set(backends) == {"snap-a", "snap-b"}
        assert backends["snap-a"].max_concurrent == 3 and backends["snap-a"].in_flight == 0
        assert backends["snap-a"].circuit == "closed" and backends["snap-a"].provider == "xai"
        assert sum(b.requests_per_min for b in snap.backends) == 10      # 9 requests + 1 retried try
        assert backends["snap-a"].errors_per_min == 1 and backends["snap-a"].cooling_down > 0
        assert [(e.backend, e.outcome, e.agent) for e in snap.errors] == [("snap-a", "retried:429",
                                                                           "writer")]
        budget = next(b for b in snap.budgets if b.key == "writer")
        assert budget.scope == "agent" and budget.limit_tokens == 100_000 and budget.used_tokens > 0
        again = Snapshot.from_json(snap.to_json())
        assert again == snap and isinstance(json.loads(snap.to_json())["agents"], list)
    finally:
        await router.aclose()


async def test_the_window_follows_calls_as_they_land_and_a_refusal_is_an_error_row(sim):
    router = make_router([backend(sim, "xai", "snap-c")],
                         budgets=[{"scope": "agent", "match": "tight", "max_tokens": 10}])
    try:
        assert (await snapshot(router)).empty
        await router.complete("grok-4.1", MESSAGES, agent_id="one")
        assert await until(lambda: True)
        snap = await snapshot(router)
        assert not snap.empty and snap.agents[0].agent == "one"
        with pytest.raises(BudgetExceededError):
            await router.complete("grok-4.1", MESSAGES, agent_id="tight", max_tokens=50)
        snap = await snapshot(router)
        tight = next(b for b in snap.budgets if b.key == "tight")
        assert tight.limit_tokens == 10
    finally:
        await router.aclose()


def test_from_json_names_what_is_wrong():
    with pytest.raises(ValueError, match="not a snapshot"):
        Snapshot.from_json("[1, 2]")
    with pytest.raises(ValueError, match="not a snapshot"):
        Snapshot.from_json("{}")
