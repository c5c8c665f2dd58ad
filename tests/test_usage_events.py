"""Usage events: on_usage callbacks and metadata on events, in stores and as a grouping key."""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import sqlite3
import subprocess
import sys
import threading

import pytest
from conftest import MESSAGES, backend, make_router, old_ledger, until
from test_redis import redis_server  # noqa: F401  (the session's throw-away redis-server)

from xml_pipeline_llm import BadRequestError, LLMRouter, load_config
from xml_pipeline_llm.simulator import Fault
from xml_pipeline_llm.stores import read_events
from xml_pipeline_llm.usage import AgentUsage, UsageEvent, group_events

ORGS = ["acme", "globex", "initech"]


def hand_totals(events: list[UsageEvent], key: str) -> dict[str, AgentUsage]:
    """Totals per value of metadata ``key`` computed by hand (not with the package's grouping)."""
    out: dict[str, AgentUsage] = {}
    for e in events:
        value = e.metadata.get(key)
        name = "(none)" if value is None else value if isinstance(value, str) else json.dumps(value)
        u = out.setdefault(name, AgentUsage())
        u.prompt_tokens += e.prompt_tokens
        u.completion_tokens += e.completion_tokens
        u.total_tokens += e.total_tokens
        u.request_count += e.outcome == "ok"
        u.error_count += e.outcome.startswith("error:")
        u.unpriced_requests += e.outcome == "ok" and e.cost_usd is None
        if e.cost_usd is not None:
            u.cost_usd = (u.cost_usd or 0.0) + e.cost_usd
    return out


# ------------------------------------------------------------------ on_usage

async def test_on_usage_sees_every_event_of_a_concurrent_burst_exactly_once(sim, caplog):
    sim.script("ue-burst-a", [Fault.status(500)] * 10 + [Fault.status(429, retry_after=0.05)] * 5)
    r = make_router([backend(sim, "xai", "ue-burst-a", max_concurrent=8),
                     backend(sim, "xai", "ue-burst-b", max_concurrent=8)], strategy="round-robin", retries=5)
    seen: list[UsageEvent] = []
    seen_async: list[UsageEvent] = []
    threads: set[int] = set()

    def sync_cb(event: UsageEvent) -> None:
        seen.append(event)
        threads.add(threading.get_ident())

    async def async_cb(event: UsageEvent) -> None:
        await asyncio.sleep(0)
        seen_async.append(event)

    def raising_cb(event: UsageEvent) -> None:
        raise RuntimeError("callback bug")

    r.on_usage(raising_cb)
    r.on_usage(sync_cb)
    r.on_usage(async_cb)
    caplog.set_level(logging.ERROR, logger="xml_pipeline_llm")
    results = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, agent_id=f"a{i % 5}") for i in range(100)))
    assert all(res.content for res in results)          # the raising callback changed nothing
    events = r.usage_events()
    assert await until(lambda: len(seen_async) == len(events))
    assert sum(e.outcome.startswith("retried:") for e in events) >= 10       # retried tries are events too
    assert sum(e.outcome == "ok" for e in events) == 100
    assert [id(e) for e in seen] == [id(e) for e in events]                # each once, in order, after counting
    assert sorted(map(id, seen_async)) == sorted(map(id, events))
    assert r.get_all_usage()["a0"].request_count == 20
    raised = [rec for rec in caplog.records if "raising_cb" in rec.getMessage()]
    assert len(raised) == 1 and "at most once a minute" in raised[0].getMessage()   # rate-limited
    await r.aclose()


async def test_a_callback_sees_the_event_already_in_the_totals_and_can_unsubscribe(sim):
    r = make_router([backend(sim, "xai", "ue-unsub")])
    totals_at_callback: list[int] = []
    stop = r.on_usage(lambda e: totals_at_callback.append(r.get_agent_usage("u").total_tokens))
    first = await r.complete("grok-4.1", MESSAGES, agent_id="u")
    assert totals_at_callback == [first.usage["total_tokens"]]
    stop()
    await r.complete("grok-4.1", MESSAGES, agent_id="u")
    assert len(totals_at_callback) == 1
    stop()          # twice is harmless
    with pytest.raises(TypeError, match="on_usage"):
        r.on_usage("not a function")  # type: ignore[arg-type]
    await r.aclose()


async def test_stream_events_reach_callbacks_too(sim):
    r = make_router([backend(sim, "xai", "ue-stream")])
    seen: list[UsageEvent] = []
    r.on_usage(seen.append)
    s = r.stream("grok-4.1", MESSAGES, agent_id="s", metadata={"org_id": "acme"})
    async for _ in s:
        pass
    assert len(seen) == 1 and seen[0].metadata == {"org_id": "acme"} and seen[0].total_tokens > 0
    await r.aclose()


# ------------------------------------------------------------------ metadata

@pytest.mark.parametrize("metadata, fix", [
    ({"org_id": ["a"]}, r"metadata\['org_id'\]: expected a string, number or true/false, got list"),
    ({"org_id": None}, r"metadata\['org_id'\]: expected a string, number or true/false"),
    ({1: "x"}, "metadata=: keys must be strings"),
    ("org=acme", "metadata=: expected a dict"),
])
async def test_bad_metadata_is_refused_before_sending(sim, metadata, fix):
    r = make_router([backend(sim, "xai", "ue-badmeta")])
    with pytest.raises(BadRequestError, match=fix):
        await r.complete("grok-4.1", MESSAGES, metadata=metadata)
    with pytest.raises(BadRequestError, match=fix):
        r.stream("grok-4.1", MESSAGES, metadata=metadata)
    assert r.usage_events() == [] and sim.stats("ue-badmeta").requests == 0
    await r.aclose()


async def test_metadata_grouping_equals_a_hand_computation(sim, tmp_path):
    sim.script("ue-meta-a", [Fault.status(503), Fault.status(429, retry_after=0.05)])
    r = make_router([backend(sim, "xai", "ue-meta-a"), backend(sim, "xai", "ue-meta-b")],
                    telemetry={"group_by_metadata": ["org_id"]},
                    pricing={"grok-meta-priced": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}})
    calls = []
    for i in range(30):
        meta: dict = {"org_id": ORGS[i % 3], "team": i % 2 == 0, "n": i % 4}
        if i % 7 == 0:
            meta = {"team": True}                            # no org_id: counted under (none)
        calls.append(r.complete("grok-meta-priced", MESSAGES, agent_id=f"a{i % 4}", metadata=meta, max_tokens=50 + i))
    await asyncio.gather(*calls)
    events = r.usage_events()
    assert any(e.outcome.startswith("retried:") for e in events)
    assert {e.metadata.get("org_id") for e in events} == {*ORGS, None}
    declared = r.get_all_usage(by="metadata.org_id")
    assert declared == hand_totals(events, "org_id") and "(none)" in declared
    assert r.get_all_usage(by="metadata.team") == hand_totals(events, "team")   # undeclared: from the events
    assert set(r.get_all_usage(by="metadata.team")) == {"true", "false"}
    assert r.get_all_usage(by="metadata.n") == hand_totals(events, "n")
    # grouped CSV: the key column is named by the grouping
    assert r.export_usage_csv(tmp_path / "org.csv", by="metadata.org_id") == len(declared)
    rows = list(csv.DictReader((tmp_path / "org.csv").open()))
    assert list(rows[0])[0] == "metadata.org_id"
    assert {row["metadata.org_id"]: int(row["total_tokens"]) for row in rows} == \
        {k: v.total_tokens for k, v in declared.items()}
    # event CSV: metadata is the last column, JSON
    r.export_usage_csv(tmp_path / "events.csv", by="event")
    with (tmp_path / "events.csv").open() as fh:
        header, *lines = list(csv.reader(fh))
    assert header[-1] == "metadata"
    assert [json.loads(line[-1]) for line in lines] == [dict(e.metadata) for e in events]
    with pytest.raises(ValueError, match=r"metadata.<key>"):
        r.get_all_usage(by="metadata.")
    # a declared key's totals are kept as events arrive: one more call shows at once
    extra = await r.complete("grok-meta-priced", MESSAGES, metadata={"org_id": "acme"}, max_tokens=5)
    acme = r.get_all_usage(by="metadata.org_id")["acme"]
    assert acme.request_count == declared["acme"].request_count + 1
    assert acme.total_tokens == declared["acme"].total_tokens + extra.usage["total_tokens"]
    await r.aclose()


async def test_metadata_is_kept_in_the_sqlite_ledger_and_the_cli_groups_by_it(sim, tmp_path):
    db = tmp_path / "usage.db"
    r = make_router([backend(sim, "xai", "ue-sqlite")], usage_store=f"sqlite:///{db}")
    for i in range(6):
        await r.complete("grok-4.1", MESSAGES, agent_id="x", metadata={"org_id": ORGS[i % 3], "rank": i})
    await r.complete("grok-4.1", MESSAGES, agent_id="x")
    await r.aclose()
    stored = list(read_events(db))
    assert [dict(e.metadata) for e in stored] == [{"org_id": ORGS[i % 3], "rank": i} for i in range(6)] + [{}]
    assert group_events(stored, "metadata.org_id") == hand_totals(stored, "org_id")
    out = subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", "usage", "--store", f"sqlite:///{db}",
                          "--by", "metadata.org_id", "--csv", "-"], capture_output=True, text=True, timeout=60)
    assert out.returncode == 0, out.stderr
    rows = list(csv.DictReader(out.stdout.splitlines()))
    assert {row["metadata.org_id"]: int(row["request_count"]) for row in rows} == \
        {"acme": 2, "globex": 2, "initech": 2, "(none)": 1}
    bad = subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", "usage", "--store", f"sqlite:///{db}",
                          "--by", "org"], capture_output=True, text=True, timeout=60)
    assert bad.returncode != 0 and "metadata.KEY" in bad.stderr




async def test_an_old_ledger_without_the_metadata_column_opens_and_is_migrated(sim, tmp_path):
    db = tmp_path / "old.db"
    old_ledger(db, "ue-old", (10, 5), 12.5)
    (old,) = list(read_events(db))                     # readable before any migration
    assert (old.agent_id, old.total_tokens, old.metadata) == ("old", 15, {})
    r = make_router([backend(sim, "xai", "ue-old")], usage_store=f"sqlite:///{db}")
    await r.complete("grok-4.1", MESSAGES, agent_id="new", metadata={"org_id": "acme"})
    await r.aclose()
    columns = [row[1] for row in sqlite3.connect(db).execute("PRAGMA table_info(usage_events)")]
    assert columns[-1] == "metadata"
    events = list(read_events(db))
    assert [(e.agent_id, dict(e.metadata)) for e in events] == [("old", {}), ("new", {"org_id": "acme"})]


# ------------------------------------------------------------------ Redis

async def test_fleet_totals_by_a_declared_metadata_key(sim, redis_server):  # noqa: F811
    import uuid

    from xml_pipeline_llm.stores import open_store

    p = f"t{uuid.uuid4().hex[:8]}"
    block = {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 20, "shared_state": redis_server.url,
             "redis_prefix": p, "telemetry": {"group_by_metadata": ["org_id"]},
             "backends": [backend(sim, "xai", "ue-redis")]}
    one, two = LLMRouter(load_config({"llm": block})), LLMRouter(load_config({"llm": block}))
    for i in range(12):
        await (one if i % 2 else two).complete("grok-4.1", MESSAGES, agent_id="r",
                                               metadata={"org_id": ORGS[i % 3], "team": "t"})
    events = one.usage_events() + two.usage_events()
    expected = hand_totals(events, "org_id")
    assert one.get_all_usage(by="metadata.org_id") == expected == two.get_all_usage(by="metadata.org_id")
    store = open_store(redis_server.url, p)                 # what the CLI reads
    assert store.totals("metadata.org_id") == expected
    assert {dict(e.metadata)["org_id"] for e in store.events()} == set(ORGS)
    # undeclared: this process's own events only (documented)
    assert one.get_all_usage(by="metadata.team") == hand_totals(one.usage_events(), "team")
    one.reset_agent_usage()
    assert store.totals("metadata.org_id") == {}
    await store.close()
    await one.aclose()
    await two.aclose()


def test_telemetry_config_mistakes_are_config_errors():
    from xml_pipeline_llm import ConfigError

    base = {"backends": [{"provider": "ollama"}]}
    with pytest.raises(ConfigError, match=r"llm.telemetry.group_by_metadata\[0\]: expected a metadata key"):
        load_config({**base, "telemetry": {"group_by_metadata": ["metadata.org_id"]}})
    with pytest.raises(ConfigError, match=r'llm.telemetry.promethus_port: unknown key; did you mean "prometheus_port"'):
        load_config({**base, "telemetry": {"promethus_port": 9464}})
    with pytest.raises(ConfigError, match=r"llm.telemetry.prometheus_port: expected a port number"):
        load_config({**base, "telemetry": {"prometheus_port": "high"}})
    with pytest.raises(ConfigError, match="otel is false"):
        load_config({**base, "telemetry": {"otel": False, "prometheus_port": 9464}})
