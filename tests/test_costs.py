"""Costs: LiteLLM's cost map, ``llm.pricing`` through LiteLLM's own machinery, and an
unknown cost that stays unknown (None, an empty CSV cell, ``-``) everywhere.

``llm.pricing`` is each router's own; the tests still price model names of their own
(``grok-*`` names the simulator's xai backends answer to), never one another test uses.
"""

from __future__ import annotations

import csv
import logging
import os
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import MESSAGES, backend, make_router

from xml_pipeline_llm import AgentUsage

CLI = [sys.executable, "-m", "xml_pipeline_llm.cli"]
PRICE = {"input_per_mtok": 3.0, "output_per_mtok": 15.0}


def expected_cost(prompt_tokens: int, completion_tokens: int, price: dict[str, float] = PRICE) -> float:
    return prompt_tokens * price["input_per_mtok"] / 1e6 + completion_tokens * price["output_per_mtok"] / 1e6


def read_csv(path: Path) -> list[dict[str, str]]:
    with open(path, newline="") as fh:
        return list(csv.DictReader(fh))


async def test_unpriced_model_is_unknown_everywhere(sim, tmp_path):
    ledger = tmp_path / "usage.db"
    r = make_router([backend(sim, "xai", "cost-none")], usage_store=f"sqlite:///{ledger}")
    resp = await r.complete("grok-nopricetest-1", MESSAGES, agent_id="free?", thread_id="t")
    assert resp.cost_usd is None
    u = r.get_agent_usage("free?")
    assert (u.cost_usd, u.unpriced_requests, u.request_count) == (None, 1, 1)
    for by in ("model", "backend", "thread"):
        assert all(t.cost_usd is None for t in r.get_all_usage(by).values())
    r.export_usage_csv(tmp_path / "agent.csv", by="agent")
    (row,) = read_csv(tmp_path / "agent.csv")
    assert (row["cost_usd"], row["unpriced_requests"], row["request_count"]) == ("", "1", "1")
    r.export_usage_csv(tmp_path / "event.csv", by="event")
    assert [e["cost_usd"] for e in read_csv(tmp_path / "event.csv")] == [""]
    await r.aclose()

    # the SQLite ledger, read back by the CLI: "-" in the table, empty cells in its CSV
    p = subprocess.run([*CLI, "usage", "--store", f"sqlite:///{ledger}"], capture_output=True, text=True,
                       timeout=60, env=cli_env())
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines()[1:] if line.strip()}
    assert rows["free?"][6] == "-" and rows["total"][6] == "-", p.stdout
    assert rows["free?"][7] == "1"                        # the Unpriced column
    p = subprocess.run([*CLI, "usage", "--store", str(ledger), "--csv", "-"], capture_output=True, text=True,
                       timeout=60, env=cli_env())
    (row,) = list(csv.DictReader(p.stdout.splitlines()))
    assert (row["cost_usd"], row["unpriced_requests"]) == ("", "1")


def cli_env() -> dict[str, str]:
    return {**{k: v for k, v in os.environ.items() if k != "XML_PIPELINE_LLM_CONFIG"}, "COLUMNS": "80"}


async def test_pricing_prices_calls_through_litellm(sim, tmp_path):
    names = ("price-x", "price-oa")
    r = make_router([backend(sim, "xai", names[0]), backend(sim, "openai", names[1])],
                    pricing={"grok-pricetest-*": PRICE,                      # a pattern
                             "gpt-4.1-nano": {"input_per_mtok": 7.0, "output_per_mtok": 11.0}})   # overrides the map
    for n in names:
        sim.reset_stats(n)
    first = await r.complete("grok-pricetest-a", MESSAGES, agent_id="payer", max_tokens=5)
    second = await r.complete("grok-pricetest-a", MESSAGES, agent_id="payer")
    s = r.stream("grok-pricetest-b", MESSAGES, agent_id="payer")
    _ = [d async for d in s]
    st = sim.stats(names[0])
    assert first.cost_usd == pytest.approx(expected_cost(first.usage["prompt_tokens"],
                                                         first.usage["completion_tokens"]))
    assert second.cost_usd == pytest.approx(expected_cost(second.usage["prompt_tokens"],
                                                          second.usage["completion_tokens"]))
    assert s.response is not None and s.response.cost_usd is not None
    u = r.get_agent_usage("payer")
    assert u.cost_usd == pytest.approx(expected_cost(st.prompt_tokens, st.completion_tokens))
    assert u.unpriced_requests == 0 and u.request_count == 3

    nano = await r.complete("gpt-4.1-nano", MESSAGES, agent_id="nano")
    ost = sim.stats(names[1])
    assert nano.cost_usd == pytest.approx(expected_cost(ost.prompt_tokens, ost.completion_tokens,
                                                        {"input_per_mtok": 7.0, "output_per_mtok": 11.0}))

    r.export_usage_csv(tmp_path / "agent.csv", by="agent")
    rows = {x["agent_id"]: x for x in read_csv(tmp_path / "agent.csv")}
    assert float(rows["payer"]["cost_usd"]) == pytest.approx(u.cost_usd)
    r.export_usage_csv(tmp_path / "model.csv", by="model")
    models = {x["model"]: x for x in read_csv(tmp_path / "model.csv")}
    assert float(models["gpt-4.1-nano"]["cost_usd"]) == pytest.approx(nano.cost_usd)
    await r.aclose()


async def test_first_call_of_an_unpriced_model_warns_once(sim, caplog):
    r = make_router([backend(sim, "xai", "cost-warn")])
    caplog.set_level(logging.WARNING, logger="xml_pipeline_llm")
    for _ in range(3):
        await r.complete("grok-warnpricetest-1", MESSAGES)
    s = r.stream("grok-warnpricetest-1", MESSAGES)
    _ = [d async for d in s]
    warnings = [rec.getMessage() for rec in caplog.records if rec.levelno == logging.WARNING]
    assert len(warnings) == 1, warnings
    assert "grok-warnpricetest-1" in warnings[0] and "llm.pricing" in warnings[0]
    await r.aclose()


async def test_agent_with_priced_and_unpriced_calls_sums_the_priced_ones(sim):
    r = make_router([backend(sim, "xai", "cost-mixed")],
                    pricing={"grok-mixpricetest-paid": PRICE,
                             "grok-mixpricetest-free": {"input_per_mtok": 0, "output_per_mtok": 0}})
    free = await r.complete("grok-mixpricetest-free", MESSAGES, agent_id="local")
    assert free.cost_usd == 0.0 and r.get_agent_usage("local").cost_usd == 0.0     # priced free, not unknown
    assert r.get_agent_usage("local").unpriced_requests == 0
    paid = [await r.complete("grok-mixpricetest-paid", MESSAGES, agent_id="mixed") for _ in range(2)]
    unpaid = [await r.complete("grok-mixpricetest-unknown", MESSAGES, agent_id="mixed") for _ in range(3)]
    assert all(x.cost_usd is None for x in unpaid)
    u = r.get_agent_usage("mixed")
    assert u.cost_usd == pytest.approx(sum(x.cost_usd for x in paid))
    assert (u.request_count, u.unpriced_requests) == (5, 3)
    by_model = r.get_all_usage("model")
    assert by_model["grok-mixpricetest-unknown"].cost_usd is None
    assert by_model["grok-mixpricetest-paid"].unpriced_requests == 0
    assert r.get_agent_usage("never-seen") == AgentUsage()
    assert AgentUsage().cost_usd is None and AgentUsage().unpriced_requests == 0
    await r.aclose()


def test_merging_totals_keeps_an_unknown_cost_unknown():
    total = AgentUsage()
    total.merge(AgentUsage(request_count=2, unpriced_requests=2))
    assert total.cost_usd is None and total.unpriced_requests == 2
    total.merge(AgentUsage(request_count=1, cost_usd=0.25))
    total.merge(AgentUsage(request_count=1, cost_usd=0.0))      # priced and free: 0.0, not unknown
    assert (total.cost_usd, total.request_count, total.unpriced_requests) == (0.25, 4, 2)


async def test_an_unknown_by_is_a_value_error_listing_the_valid_ones(sim, tmp_path):
    r = make_router([backend(sim, "xai", "cost-by")])
    with pytest.raises(ValueError, match="agent, model, backend, thread") as info:
        r.get_all_usage(by="bogus")
    assert "'bogus'" in str(info.value)
    with pytest.raises(ValueError, match="agent, model, backend, thread, event"):
        r.export_usage_csv(str(tmp_path / "x.csv"), by="bogus")
    await r.aclose()
