"""Token and cost accounting, streams and the SQLite ledger."""

from __future__ import annotations

import asyncio
import csv
import gc
import os
import signal
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time

import pytest
from conftest import MESSAGES, backend, make_router, until

from xml_pipeline_llm import ConfigError, ProviderError
from xml_pipeline_llm.simulator import Fault
from xml_pipeline_llm.stores import read_events

AGENTS = [f"agent-{i}" for i in range(12)]


async def test_totals_are_exact_after_a_concurrent_burst(sim, success_callbacks):
    names = ["ex-xai", "ex-openai", "ex-anthropic"]
    r = make_router([backend(sim, "xai", names[0], supported_models=["shared-*"]),
                     backend(sim, "openai", names[1], supported_models=["shared-*"]),
                     backend(sim, "anthropic", names[2], supported_models=["shared-*"])],
                    strategy="round-robin")
    for n in names:
        sim.reset_stats(n)

    async def call(i: int):
        msgs = [{"role": "user", "content": "word " * (i % 17 + 1)}]
        return await r.complete("shared-model", msgs, agent_id=AGENTS[i % len(AGENTS)], max_tokens=i % 9 + 1)

    responses = await asyncio.gather(*(call(i) for i in range(360)))
    stats = [sim.stats(n) for n in names]
    totals = r.get_all_usage()
    assert sum(t.request_count for t in totals.values()) == 360
    assert sum(t.prompt_tokens for t in totals.values()) == sum(s.prompt_tokens for s in stats)
    assert sum(t.completion_tokens for t in totals.values()) == sum(s.completion_tokens for s in stats)
    for agent in AGENTS:
        mine = [x for i, x in enumerate(responses) if AGENTS[i % len(AGENTS)] == agent]
        u = r.get_agent_usage(agent)
        assert u.total_tokens == sum(x.usage["total_tokens"] for x in mine)
        assert u.request_count == len(mine) and u.error_count == 0
    by_backend = r.get_all_usage("backend")
    assert {n: by_backend[n].request_count for n in names} == {n: 120 for n in names}
    assert await until(lambda: success_callbacks.count >= 360)   # LiteLLM's late callbacks ran:
    assert r.get_all_usage() == totals              # nothing was counted twice


async def test_usage_is_visible_when_complete_returns(sim):
    r = make_router([backend(sim, "xai", "ryw")])
    resp = await r.complete("grok-4.1", MESSAGES, agent_id="reader", thread_id="t-9")
    u = r.get_agent_usage("reader")
    assert (u.prompt_tokens, u.completion_tokens, u.request_count) == (
        resp.usage["prompt_tokens"], resp.usage["completion_tokens"], 1)
    assert r.get_all_usage("thread")["t-9"].total_tokens == resp.usage["total_tokens"]
    assert r.get_agent_usage("never-seen") == type(u)()


async def test_failed_tries_are_events_and_failed_requests_count_as_errors(sim):
    r = make_router([backend(sim, "xai", "fail-a")], retries=1)
    sim.script("fail-a", [Fault.status(500), Fault.status(503)])
    with pytest.raises(ProviderError):
        await r.complete("grok-4.1", MESSAGES, agent_id="failing")
    u = r.get_agent_usage("failing")
    assert (u.error_count, u.request_count, u.total_tokens) == (1, 0, 0)
    assert [e.outcome for e in r.usage_events()] == ["retried:500", "error:503"]


async def test_cost_from_the_cost_map_and_none_when_unpriced(sim):
    r = make_router([backend(sim, "openai", "cost-oa"), backend(sim, "xai", "cost-x")])
    priced = await r.complete("gpt-4o", MESSAGES, agent_id="c")
    unpriced = await r.complete("grok-4.1", MESSAGES, agent_id="c")
    assert priced.cost_usd and priced.cost_usd > 0
    assert unpriced.cost_usd is None
    costs = [e.cost_usd for e in r.usage_events()]
    assert costs[0] == pytest.approx(priced.cost_usd) and costs[1] is None
    assert r.get_agent_usage("c").cost_usd == pytest.approx(priced.cost_usd)


def reset_all(r):
    r.reset_agent_usage()
    assert r.get_all_usage() == {}


async def test_reset_one_agent_or_all(sim):
    r = make_router([backend(sim, "xai", "reset-a")])
    await r.complete("grok-4.1", MESSAGES, agent_id="a")
    await r.complete("grok-4.1", MESSAGES, agent_id="b")
    r.reset_agent_usage("a")
    assert r.get_agent_usage("a").request_count == 0 and r.get_agent_usage("b").request_count == 1
    reset_all(r)


STREAM_PROVIDERS = [("openai", "gpt-4o"), ("xai", "grok-4.1"), ("anthropic", "claude-sonnet-4"),
                    ("ollama", "llama3")]


@pytest.mark.parametrize("provider,model", STREAM_PROVIDERS)
async def test_stream_read_to_the_end(sim, provider, model, success_callbacks):
    name = f"st-{provider}"
    r = make_router([backend(sim, provider, name)])
    sim.reset_stats(name)
    s = r.stream(model, MESSAGES, agent_id="streamer")
    deltas = [d async for d in s]
    assert len(deltas) > 1
    resp = s.response
    assert resp.content == "".join(deltas) and resp.backend == name
    st = sim.stats(name)
    assert resp.usage["completion_tokens"] == st.completion_tokens_generated
    assert resp.usage["prompt_tokens"] == st.prompt_tokens
    u = r.get_agent_usage("streamer")
    assert (u.total_tokens, u.request_count) == (resp.usage["total_tokens"], 1)
    assert r.gate(name).in_flight == 0
    assert await until(lambda: success_callbacks.count >= 1)
    assert r.get_agent_usage("streamer").request_count == 1   # the callback did not add it again


@pytest.mark.parametrize("provider,model", STREAM_PROVIDERS)
async def test_stream_closed_early_is_recorded_once(sim, provider, model):
    name = f"se-{provider}"
    r = make_router([backend(sim, provider, name)])
    async with r.stream(model, MESSAGES, agent_id="quitter") as s:
        async for _ in s:
            break
    assert s.response is not None and s.response.usage["total_tokens"] > 0
    u = r.get_agent_usage("quitter")
    assert u.request_count == 1 and u.total_tokens == s.response.usage["total_tokens"]
    assert r.gate(name).in_flight == 0


async def test_stream_dropped_without_close_is_recorded_when_collected(sim):
    r = make_router([backend(sim, "openai", "sd-oa")])

    async def read_one():
        async for _ in r.stream("gpt-4o", MESSAGES, agent_id="dropper"):
            break

    await read_one()
    gc.collect()
    assert r.get_agent_usage("dropper").request_count == 1
    assert r.gate("sd-oa").in_flight == 0


async def test_stream_fails_over_before_the_first_byte(sim):
    r = make_router([backend(sim, "openai", "sf-a"), backend(sim, "openai", "sf-b")])
    sim.script("sf-a", [Fault.status(429, retry_after=5)])
    s = r.stream("gpt-4o", MESSAGES)
    text = "".join([d async for d in s])
    assert s.response.backend == "sf-b" and text


async def test_stream_tool_calls_are_assembled(sim):
    r = make_router([backend(sim, "openai", "stc-oa")])
    schema = {"type": "object", "properties": {"input": {"type": "string"}}}
    tools = [{"type": "function", "function": {"name": "lookup", "description": "d", "parameters": schema}}]
    s = r.stream("gpt-4o", MESSAGES, tools=tools)
    async for _ in s:
        pass
    calls = s.response.tool_calls
    assert calls and calls[0]["function"]["name"] == "lookup"
    assert '"input"' in calls[0]["function"]["arguments"]


async def test_csv_exports_parse_back(sim, tmp_path):
    r = make_router([backend(sim, "openai", "csv-oa"), backend(sim, "xai", "csv-x")])
    await r.complete("gpt-4o", MESSAGES, agent_id="alice", thread_id="t1")
    await r.complete("grok-4.1", MESSAGES, agent_id="bob", thread_id="t2")
    await r.complete("gpt-4o", MESSAGES, agent_id="alice", thread_id="t2")
    keys = {"agent": "agent_id", "model": "model", "backend": "backend", "thread": "thread_id"}
    for by, key in keys.items():
        path = tmp_path / f"{by}.csv"
        r.export_usage_csv(path, by=by)
        rows = list(csv.DictReader(path.open()))
        assert list(rows[0]) == [key, "prompt_tokens", "completion_tokens", "total_tokens",
                                 "request_count", "error_count", "cost_usd", "unpriced_requests",
                                 "cached_tokens", "cache_write_tokens", "reasoning_tokens", "cache_hits",
                                 "saved_usd"]
        assert sum(int(x["request_count"]) for x in rows) == 3
        totals = r.get_all_usage(by)
        for row in rows:
            assert int(row["total_tokens"]) == totals[row[key]].total_tokens
            assert len(row["cost_usd"]) < 16              # no float noise
    agents = {x["agent_id"]: x for x in csv.DictReader((tmp_path / "agent.csv").open())}
    assert float(agents["alice"]["cost_usd"]) == pytest.approx(r.get_agent_usage("alice").cost_usd)
    assert agents["alice"]["unpriced_requests"] == "0"
    assert (agents["bob"]["cost_usd"], agents["bob"]["unpriced_requests"]) == ("", "1")   # grok-4.1: no price
    r.export_usage_csv(tmp_path / "event.csv", by="event")
    events = list(csv.DictReader((tmp_path / "event.csv").open()))
    assert list(events[0]) == ["timestamp", "agent_id", "thread_id", "model", "backend", "provider",
                               "prompt_tokens", "completion_tokens", "total_tokens", "cost_usd",
                               "latency_ms", "outcome", "requested_model",
                               "cached_tokens", "cache_write_tokens", "reasoning_tokens", "saved_usd", "metadata"]
    assert [e["agent_id"] for e in events] == ["alice", "bob", "alice"]
    assert all(e["requested_model"] == e["model"] for e in events)     # plain calls: the model asked for
    assert events[0]["timestamp"].endswith("Z") and events[1]["cost_usd"] == ""


async def test_sqlite_ledger_keeps_every_call(sim, tmp_path):
    db = tmp_path / "usage.db"
    r = make_router([backend(sim, "xai", "sq-a")], usage_store=f"sqlite:///{db}")
    await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, agent_id=f"a{i % 3}") for i in range(20)))
    events = list(read_events(db))              # already committed: no close needed
    assert len(events) == 20
    assert sum(e.total_tokens for e in events) == sum(t.total_tokens for t in r.get_all_usage().values())
    await r.aclose()


async def test_sqlite_ledger_opened_while_another_process_holds_its_write_lock(sim, tmp_path):
    """Two processes opening a new ledger at once: the later one waits for the lock, no error."""
    db = tmp_path / "opened-at-once.db"
    other = sqlite3.connect(db, isolation_level=None, check_same_thread=False)
    other.execute("BEGIN IMMEDIATE")        # its write lock, taken before the file is in WAL mode
    release = threading.Timer(0.3, other.execute, ("COMMIT",))
    release.start()
    try:
        r = make_router([backend(sim, "xai", "sq-lock")], usage_store=f"sqlite:///{db}")
    finally:
        release.join()
        other.close()
    await r.complete("grok-4.1", MESSAGES, agent_id="second")
    assert [e.agent_id for e in read_events(db)] == ["second"]
    await r.aclose()


async def test_sqlite_ledger_that_cannot_be_written_keeps_the_rows_and_fails_no_call(sim, tmp_path, caplog):
    db = tmp_path / "broken.db"
    r = make_router([backend(sim, "xai", "sq-broken")], usage_store=f"sqlite:///{db}")
    await r.complete("grok-4.1", MESSAGES, agent_id="before")
    other = sqlite3.connect(db)             # someone damages the ledger while the process runs
    other.execute("DROP TABLE usage_events")
    other.commit()
    other.close()
    with caplog.at_level("WARNING", logger="xml_pipeline_llm"):
        resp = await r.complete("grok-4.1", MESSAGES, agent_id="during")   # no sqlite3 error here
        assert resp.usage["total_tokens"] > 0
        assert any(rec.levelname == "ERROR" and str(db) in rec.getMessage()
                   and "retried every 1s" in rec.getMessage() for rec in caplog.records), caplog.text
        deadline = time.monotonic() + 20      # the kept row is written once the table is back
        while time.monotonic() < deadline and not _ledger_has_rows(db):
            await asyncio.sleep(0.1)
    assert [e.agent_id for e in read_events(db)] == ["during"]
    assert any("writable again" in rec.getMessage() for rec in caplog.records), caplog.text
    await r.aclose()


def _ledger_has_rows(db) -> bool:
    try:
        return next(read_events(db), None) is not None
    except ConfigError:         # the table is not there (yet)
        return False


def test_sqlite_ledger_survives_sigkill_right_after_a_call(sim, tmp_path):
    db = tmp_path / "killed.db"
    script = textwrap.dedent(f"""
        import asyncio, os, sys
        from xml_pipeline_llm import LLMRouter, load_config
        cfg = {{"llm": {{"usage_store": "sqlite:///{db}", "backends": [
            {{"provider": "openai", "name": "kill-oa", "base_url": "{sim.base_url('kill-oa', 'openai')}"}}]}}}}
        r = LLMRouter(load_config(cfg))
        async def main():
            for i in range(3):
                await r.complete("gpt-4o", [{{"role": "user", "content": "hi"}}], agent_id="victim")
            print("returned", flush=True)
            await asyncio.sleep(60)
        asyncio.run(main())
    """)
    proc = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True,
                            env={**os.environ, "OPENAI_API_KEY": "sk-not-used"})
    try:
        assert proc.stdout.readline().strip() == "returned"
        proc.send_signal(signal.SIGKILL)
        proc.wait(timeout=10)
    finally:
        if proc.poll() is None:
            proc.kill()
    events = list(read_events(db))
    assert [e.agent_id for e in events] == ["victim"] * 3
    assert all(e.outcome == "ok" and e.total_tokens > 0 for e in events)


@pytest.mark.parametrize("provider,model", STREAM_PROVIDERS)
@pytest.mark.parametrize("fault", [Fault.malformed(), Fault.status(500), Fault.drop()],
                         ids=["malformed", "500", "drop"])
async def test_broken_stream_before_content_is_a_failed_try(sim, provider, model, fault):
    name = f"sb-{provider}-{fault.kind}{fault.code or ''}"
    r = make_router([backend(sim, provider, name)], retries=2)
    sim.script(name, [fault])
    s = r.stream(model, MESSAGES, agent_id="retrier")
    text = "".join([d async for d in s])
    assert text.startswith("Hello from") and sim.stats(name).requests == 2
    outcomes = [e.outcome for e in r.usage_events()]
    assert outcomes[0].startswith("retried:") and outcomes[-1] == "ok"
    assert r.get_agent_usage("retrier").request_count == 1
    assert r.gate(name).in_flight == 0
