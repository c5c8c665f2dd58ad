"""The response cache (``llm.cache``): exact-match, opt-in, scoped, single-flight, exactly accounted.

Every call goes through LiteLLM's real HTTP code to the simulator; the Redis
tests use a real redis-server, the cross-process test real subprocesses.
"""

from __future__ import annotations

import asyncio
import csv
import json
import logging
import os
import shutil
import sqlite3
import subprocess
import sys
import textwrap
import threading
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_KEYS, MESSAGES, backend, make_router, until

from xml_pipeline_llm import BadRequestError, ConfigError, ProviderError, load_config
from xml_pipeline_llm.simulator import Fault

REDIS_SERVER = shutil.which("redis-server")
needs_redis = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"),
                                 reason="redis-server is not installed")
PRICING = {"grok-4.1": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}


def cached_router(sim: Any, name: str, cache: dict[str, Any] | None = None, **llm: Any) -> Any:
    return make_router([backend(sim, "xai", name, **llm.pop("backend_extra", {}))],
                       cache={"store": "memory", **(cache or {})}, pricing=PRICING, **llm)


def ask(text: str) -> list[dict[str, Any]]:
    return [{"role": "user", "content": text}]


# ------------------------------------------------------------------ the rule

async def test_deterministic_requests_are_answered_once_and_the_hit_is_accounted(sim: Any) -> None:
    r = cached_router(sim, "ca-rule")
    first = await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    second = await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    assert sim.stats("ca-rule").requests == 1
    assert not first.cache_hit and second.cache_hit
    assert second.content == first.content and second.usage == first.usage and second.model == first.model
    assert second.cost_usd == 0.0 and first.cost_usd and second.attempts == 0
    u = r.get_agent_usage("a")
    assert u.request_count == 1 and u.cache_hits == 1 and u.saved_usd == pytest.approx(first.cost_usd)
    assert u.total_tokens == first.usage["total_tokens"] and u.cost_usd == pytest.approx(first.cost_usd)
    hit = r.usage_events()[-1]
    assert hit.outcome == "cache_hit" and hit.saved_usd == pytest.approx(first.cost_usd)
    assert hit.total_tokens == 0 and hit.agent_id == "a" and hit.requested_model == "grok-4.1"
    # a seed is deterministic too; key order of the parameters does not matter
    await r.complete("grok-4.1", ask("seeded"), agent_id="a", seed=7, top_p=1.0)
    again = await r.complete("grok-4.1", ask("seeded"), agent_id="a", top_p=1.0, seed=7)
    assert again.cache_hit and sim.stats("ca-rule").requests == 2


async def test_what_is_not_cached_and_the_per_call_options(sim: Any) -> None:
    r = cached_router(sim, "ca-opts")
    for _ in range(2):                                  # not deterministic: never cached
        assert not (await r.complete("grok-4.1", ask("warm"), agent_id="a", temperature=0.7)).cache_hit
    assert sim.stats("ca-opts").requests == 2
    for _ in range(2):                                  # cache=True: cached all the same
        last = await r.complete("grok-4.1", ask("warm"), agent_id="a", temperature=0.7, cache=True)
    assert last.cache_hit and sim.stats("ca-opts").requests == 3
    await r.complete("grok-4.1", ask("cold"), agent_id="a", temperature=0)
    skipped = await r.complete("grok-4.1", ask("cold"), agent_id="a", temperature=0, cache=False)
    assert not skipped.cache_hit and sim.stats("ca-opts").requests == 5    # cache=False does not read
    await r.complete("grok-4.1", ask("never"), agent_id="a", temperature=0, cache=False)
    assert not (await r.complete("grok-4.1", ask("never"), agent_id="a", temperature=0, cache=False)).cache_hit
    assert not (await r.complete("grok-4.1", ask("never"), agent_id="a", temperature=0)).cache_hit   # nor write
    assert sim.stats("ca-opts").requests == 8
    # another parameter, another key
    await r.complete("grok-4.1", ask("cold"), agent_id="a", temperature=0, max_tokens=50)
    assert sim.stats("ca-opts").requests == 9
    for bad, why in (({"cache": "yes"}, "cache=: expected True or False"),
                     ({"cache_ttl": -1}, "cache_ttl=: expected a positive number")):
        with pytest.raises(BadRequestError, match=why):
            await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0, **bad)
    assert sim.stats("ca-opts").requests == 9


async def test_scopes_keep_agents_apart_and_an_alias_is_its_own_key(sim: Any) -> None:
    r = cached_router(sim, "ca-scope", models={"quick": ["grok-4.1"]})
    a = await r.complete("grok-4.1", MESSAGES, agent_id="A", temperature=0)
    b = await r.complete("grok-4.1", MESSAGES, agent_id="B", temperature=0)
    assert not a.cache_hit and not b.cache_hit and sim.stats("ca-scope").requests == 2
    assert (await r.complete("grok-4.1", MESSAGES, agent_id="B", temperature=0)).cache_hit
    for _ in range(2):                    # no agent_id under scope agent: never cached
        assert not (await r.complete("grok-4.1", MESSAGES, temperature=0)).cache_hit
    assert not (await r.complete("quick", MESSAGES, agent_id="A", temperature=0)).cache_hit
    assert sim.stats("ca-scope").requests == 5
    assert r.get_agent_usage("A").cache_hits == 0 and r.get_agent_usage("B").cache_hits == 1

    g = cached_router(sim, "ca-global", {"scope": "global"})
    await g.complete("grok-4.1", MESSAGES, agent_id="A", temperature=0)
    assert (await g.complete("grok-4.1", MESSAGES, agent_id="B", temperature=0)).cache_hit
    assert (await g.complete("grok-4.1", MESSAGES, temperature=0)).cache_hit
    m = cached_router(sim, "ca-meta", {"scope": "metadata.org"})
    await m.complete("grok-4.1", MESSAGES, agent_id="A", metadata={"org": "x"}, temperature=0)
    assert (await m.complete("grok-4.1", MESSAGES, agent_id="B", metadata={"org": "x"}, temperature=0)).cache_hit
    assert not (await m.complete("grok-4.1", MESSAGES, agent_id="A", metadata={"org": "y"}, temperature=0)).cache_hit
    t = cached_router(sim, "ca-thread", {"scope": "thread"})
    await t.complete("grok-4.1", MESSAGES, agent_id="A", thread_id="t1", temperature=0)
    assert (await t.complete("grok-4.1", MESSAGES, agent_id="B", thread_id="t1", temperature=0)).cache_hit
    assert not (await t.complete("grok-4.1", MESSAGES, agent_id="A", thread_id="t2", temperature=0)).cache_hit


async def test_ttl_and_least_recently_used_eviction(sim: Any) -> None:
    r = cached_router(sim, "ca-ttl", {"ttl": "1h"})
    await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0, cache_ttl=0.3)
    assert (await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)).cache_hit

    async def expired() -> bool:
        return not (await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)).cache_hit

    deadline = time.monotonic() + 10
    while not await expired():
        assert time.monotonic() < deadline, "the entry never expired"
        await asyncio.sleep(0.05)
    # cache_ttl= also bounds the age of an answer taken: this one is fresh, a tiny bound refuses it
    await r.complete("grok-4.1", ask("age"), agent_id="a", temperature=0)
    await asyncio.sleep(0.05)
    assert not (await r.complete("grok-4.1", ask("age"), agent_id="a", temperature=0, cache_ttl=0.01)).cache_hit

    lru = cached_router(sim, "ca-lru", {"max_entries": 2})
    for text in ("one", "two"):
        await lru.complete("grok-4.1", ask(text), agent_id="a", temperature=0)
    assert (await lru.complete("grok-4.1", ask("one"), agent_id="a", temperature=0)).cache_hit   # one is newest
    await lru.complete("grok-4.1", ask("three"), agent_id="a", temperature=0)                   # two goes
    assert (await lru.complete("grok-4.1", ask("one"), agent_id="a", temperature=0)).cache_hit
    assert not (await lru.complete("grok-4.1", ask("two"), agent_id="a", temperature=0)).cache_hit
    assert sim.stats("ca-lru").requests == 4


async def test_errors_and_truncated_answers_are_not_cached(sim: Any) -> None:
    r = cached_router(sim, "ca-err")
    sim.script("ca-err", [Fault.status(500)])
    with pytest.raises(ProviderError):
        await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0, retries=0)
    ok = await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    assert not ok.cache_hit and sim.stats("ca-err").requests == 2
    for _ in range(2):
        cut = await r.complete("grok-4.1", ask("a longer question for the test"), agent_id="a",
                               temperature=0, max_tokens=2)
        assert cut.finish_reason == "length" and not cut.cache_hit
    assert sim.stats("ca-err").requests == 4


async def test_a_hit_uses_no_budget_and_no_slot(sim: Any) -> None:
    r = cached_router(sim, "ca-budget", budgets=[{"scope": "agent", "match": "payer", "max_usd": 100.0}],
                      backend_extra={"max_concurrent": 1})
    first = await r.complete("grok-4.1", MESSAGES, agent_id="payer", temperature=0)
    spent = [b.used_usd for b in r.budgets()]
    sim.set_latency("ca-budget", 1.0)
    try:
        slow = asyncio.ensure_future(r.complete("grok-4.1", ask("slow"), agent_id="payer"))
        assert await until(lambda: r.gate("ca-budget").in_flight == 1)
        hit = await asyncio.wait_for(r.complete("grok-4.1", MESSAGES, agent_id="payer", temperature=0), 0.5)
        assert hit.cache_hit and not slow.done()      # answered while the only slot is held
        assert [b.used_usd for b in r.budgets()] == spent
        await slow
    finally:
        sim.set_latency("ca-budget", 0.0)
    assert first.cost_usd and r.get_agent_usage("payer").request_count == 2


async def test_streams_are_stored_and_hits_replayed_as_deltas(sim: Any) -> None:
    r = cached_router(sim, "ca-stream")
    s = r.stream("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    text = "".join([d async for d in s])
    assert s.response is not None and not s.response.cache_hit and sim.stats("ca-stream").requests == 1
    replay = r.stream("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    deltas = [d async for d in replay]
    assert replay.response is not None and replay.response.cache_hit and "".join(deltas) == text
    assert len(deltas) >= 2 and replay.attempts == 0 and replay.backend == "ca-stream"
    assert (await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)).cache_hit
    assert sim.stats("ca-stream").requests == 1
    # a stream closed early is not stored
    early = r.stream("grok-4.1", ask("closed early please now"), agent_id="a", temperature=0)
    async for _ in early:
        break
    await early.aclose()
    assert not (await r.complete("grok-4.1", ask("closed early please now"), agent_id="a", temperature=0)).cache_hit
    assert r.get_agent_usage("a").cache_hits == 2


async def test_twenty_identical_requests_at_once_make_one_provider_call(sim: Any) -> None:
    r = cached_router(sim, "ca-flight")
    sim.set_latency("ca-flight", 0.3)
    try:
        out = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
                                     for _ in range(20)))
    finally:
        sim.set_latency("ca-flight", 0.0)
    assert sim.stats("ca-flight").requests == 1
    assert sum(not o.cache_hit for o in out) == 1 and len({o.content for o in out}) == 1
    u = r.get_agent_usage("a")
    assert u.request_count == 1 and u.cache_hits == 19


def test_single_flight_across_threads_with_their_own_loops(sim: Any) -> None:
    r = cached_router(sim, "ca-threads")
    sim.set_latency("ca-threads", 0.3)
    results: list[Any] = []

    def worker() -> None:
        async def five() -> list[Any]:
            return list(await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
                                               for _ in range(5))))
        results.extend(asyncio.run(five()))

    threads = [threading.Thread(target=worker) for _ in range(4)]
    try:
        for t in threads:
            t.start()
        for t in threads:
            t.join(30)
    finally:
        sim.set_latency("ca-threads", 0.0)
    assert len(results) == 20 and sim.stats("ca-threads").requests == 1
    assert r.get_agent_usage("a").cache_hits == 19


async def test_when_the_call_others_wait_on_fails_each_goes_to_the_provider(sim: Any) -> None:
    r = cached_router(sim, "ca-fail")
    sim.script("ca-fail", [Fault.status(400)])
    sim.set_latency("ca-fail", 0.2)
    try:
        out = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0, retries=0)
                                     for _ in range(4)), return_exceptions=True)
    finally:
        sim.set_latency("ca-fail", 0.0)
    assert sum(isinstance(o, Exception) for o in out) == 1
    assert all(o.content for o in out if not isinstance(o, Exception))
    assert sim.stats("ca-fail").requests >= 2


# ------------------------------------------------------------------ stores

async def test_a_sqlite_cache_survives_a_restart_and_totals_reach_the_ledger(sim: Any, tmp_path: Path) -> None:
    cache = {"store": f"sqlite:///{tmp_path}/cache.db"}
    r = cached_router(sim, "ca-sqlite", cache, usage_store=f"sqlite:///{tmp_path}/usage.db")
    first = await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    await r.aclose()
    again = cached_router(sim, "ca-sqlite", cache, usage_store=f"sqlite:///{tmp_path}/usage.db")
    hit = await again.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
    assert hit.cache_hit and hit.content == first.content and sim.stats("ca-sqlite").requests == 1
    await again.aclose()
    with sqlite3.connect(tmp_path / "usage.db") as db:
        rows = db.execute("SELECT outcome, saved_usd, total_tokens FROM usage_events ORDER BY id").fetchall()
    db.close()
    assert rows[-1][0] == "cache_hit" and rows[-1][1] == pytest.approx(first.cost_usd) and rows[-1][2] == 0
    again.export_usage_csv(str(tmp_path / "agents.csv"))
    with open(tmp_path / "agents.csv") as fh:
        row = next(csv.DictReader(fh))
    assert row["cache_hits"] == "1" and float(row["saved_usd"]) == pytest.approx(first.cost_usd)


async def test_a_corrupt_sqlite_cache_at_start_never_fails_a_call(sim: Any, tmp_path: Path,
                                                                  caplog: pytest.LogCaptureFixture) -> None:
    path = tmp_path / "cache.db"
    path.write_bytes(b"this is not a database" * 100)
    caplog.set_level(logging.WARNING, logger="xml_pipeline_llm")
    r = cached_router(sim, "ca-corrupt", {"store": f"sqlite:///{path}"})
    for _ in range(3):
        resp = await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
        assert resp.content and not resp.cache_hit
    assert sim.stats("ca-corrupt").requests == 3
    warnings = [m for m in caplog.messages if "response cache" in m]
    assert len(warnings) == 1 and "cache.db" in warnings[0]


def test_the_cache_block_is_validated_like_every_key(sim: Any) -> None:
    base = [backend(sim, "xai", "ca-cfg")]
    for cache, why in (({"ttl": "soon"}, "llm.cache.ttl: expected a duration"),
                       ({"scope": "team"}, "llm.cache.scope: expected global, agent, thread or metadata"),
                       ({"store": "postgres://x"}, "llm.cache.store: expected memory, sqlite"),
                       ({"store": "redis"}, "set llm.shared_state"),
                       ({"max_entries": 0}, "llm.cache.max_entries: expected a positive integer"),
                       ({"size": 3}, "llm.cache.size: unknown key")):
        with pytest.raises(ConfigError, match=why.replace(".", r"\.")):
            load_config({"llm": {"cache": cache, "backends": base}})
    assert load_config({"llm": {"cache": {"ttl": "90s"}, "backends": base}}).cache is not None
    assert load_config({"llm": {"backends": base}}).cache is None


async def test_the_gateway_answers_a_hit_with_its_header(sim: Any) -> None:
    from xml_pipeline_llm import configure_router, openai_client

    configure_router({"llm": {"cache": {}, "backends": [backend(sim, "xai", "ca-gw")]}})
    client = openai_client(agent_id="gw")
    body = {"model": "grok-4.1", "messages": MESSAGES, "temperature": 0}
    first = await client.chat.completions.with_raw_response.create(**body)
    second = await client.chat.completions.with_raw_response.create(**body)
    assert "x-xpl-cache" not in first.headers and second.headers["x-xpl-cache"] == "hit"
    assert second.parse().choices[0].message.content == first.parse().choices[0].message.content
    skipped = await client.chat.completions.with_raw_response.create(**body, extra_body={"cache": False})
    assert "x-xpl-cache" not in skipped.headers and sim.stats("ca-gw").requests == 2
    streamed = await client.chat.completions.with_raw_response.create(**body, stream=True)
    assert streamed.headers["x-xpl-cache"] == "hit"
    text = "".join([c.choices[0].delta.content or "" async for c in streamed.parse() if c.choices])
    assert text == first.parse().choices[0].message.content and sim.stats("ca-gw").requests == 2


# ------------------------------------------------------------------ Redis

def redis_server() -> Any:
    """A throw-away redis-server (the suite's own, from test_redis)."""
    from test_redis import RedisServer

    return RedisServer()


def redis_cached(sim: Any, url: str, prefix: str, name: str) -> Any:
    return make_router([backend(sim, "xai", name)], shared_state=url, redis_prefix=prefix,
                       cache={"store": "redis"}, pricing=PRICING)


@needs_redis
async def test_redis_cache_is_shared_and_totals_count_hits(sim: Any) -> None:
    server = redis_server().start()
    try:
        p = f"c{uuid.uuid4().hex[:8]}"
        one, two = redis_cached(sim, server.url, p, "ca-rshare"), redis_cached(sim, server.url, p, "ca-rshare")
        first = await one.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
        hit = await two.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
        assert hit.cache_hit and sim.stats("ca-rshare").requests == 1
        u = one.get_agent_usage("a")       # the fleet's totals, in Redis
        assert u.request_count == 1 and u.cache_hits == 1 and u.saved_usd == pytest.approx(first.cost_usd)
        assert u.cost_usd == pytest.approx(first.cost_usd)
        for r in (one, two):
            await r.aclose()
    finally:
        server.stop()


@needs_redis
async def test_redis_stopped_mid_run_calls_are_still_answered(sim: Any, caplog: pytest.LogCaptureFixture) -> None:
    server = redis_server().start()
    try:
        r = redis_cached(sim, server.url, f"c{uuid.uuid4().hex[:8]}", "ca-rdown")
        caplog.set_level(logging.WARNING, logger="xml_pipeline_llm")
        await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)
        assert (await r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0)).cache_hit
        server.stop()
        for i in range(4):
            resp = await asyncio.wait_for(r.complete("grok-4.1", ask(f"down {i % 2}"), agent_id="a",
                                                     temperature=0), 30)
            assert resp.content and not resp.cache_hit
        assert sim.stats("ca-rdown").requests == 5
        assert len([m for m in caplog.messages if "response cache" in m]) == 1
    finally:
        server.stop()


CHILD = textwrap.dedent(r'''
    import asyncio, json, sys, time
    from xml_pipeline_llm import LLMRouter, load_config
    llm, start_at, n = json.loads(sys.argv[1]), float(sys.argv[2]), int(sys.argv[3])
    r = LLMRouter(load_config({"llm": llm}))
    r.warm_up()
    async def main():
        await asyncio.sleep(max(0.0, start_at - time.time()))
        msgs = [{"role": "user", "content": "the same question from two processes"}]
        out = await asyncio.gather(*(r.complete("grok-4.1", msgs, agent_id="a", temperature=0) for _ in range(n)))
        print(json.dumps([o.cache_hit for o in out]))
        await r.aclose()
    asyncio.run(main())
''')


@needs_redis
def test_single_flight_across_two_processes_on_redis(sim: Any) -> None:
    server = redis_server().start()
    try:
        llm = {"shared_state": server.url, "redis_prefix": f"c{uuid.uuid4().hex[:8]}", "cache": {"store": "redis"},
               "timeout": 30, "backends": [backend(sim, "xai", "ca-procs")]}
        sim.set_latency("ca-procs", 1.0)
        env = {**os.environ, **FAKE_KEYS, "PYTHONPATH": str(Path(__file__).parent.parent)}
        start_at = time.time() + 12        # both have imported LiteLLM by then (2 busy cores)
        procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(llm), str(start_at), "10"],
                                  stdout=subprocess.PIPE, stderr=subprocess.PIPE, env=env, text=True)
                 for _ in range(2)]
        outs = [p.communicate(timeout=90) for p in procs]
        assert all(p.returncode == 0 for p in procs), [o[1][-2000:] for o in outs]
        hits = [h for out, _ in outs for h in json.loads(out.strip().splitlines()[-1])]
        assert len(hits) == 20 and sum(not h for h in hits) == 1
        assert sim.stats("ca-procs").requests == 1
    finally:
        sim.set_latency("ca-procs", 0.0)
        server.stop()


async def test_the_live_view_does_not_count_hits_as_errors_or_tries(sim: Any) -> None:
    from xml_pipeline_llm.snapshot import snapshot

    r = cached_router(sim, "ca-live")
    for _ in range(3):
        await r.complete("grok-4.1", MESSAGES, agent_id="viewer", temperature=0)
    snap = await snapshot(r)
    assert not snap.errors and snap.agents[0].requests_per_min == 1 and snap.agents[0].errors_per_min == 0


async def test_calls_wait_for_an_identical_stream_and_go_alone_when_it_is_closed_early(sim: Any) -> None:
    r = cached_router(sim, "ca-sflight")
    sim.set_latency("ca-sflight", 0.3)
    try:
        leader = r.stream("grok-4.1", MESSAGES, agent_id="a", temperature=0)
        first = await leader.next_chunk()           # the stream leads: the provider call is open
        waiting = [asyncio.ensure_future(r.complete("grok-4.1", MESSAGES, agent_id="a", temperature=0))
                   for _ in range(3)]
        await asyncio.sleep(0.05)
        assert first is not None and not any(w.done() for w in waiting)
        text = "".join([d async for d in leader])
        out = await asyncio.gather(*waiting)
        assert all(o.cache_hit for o in out) and sim.stats("ca-sflight").requests == 1
        assert out[0].content.endswith(text)
        # a stream closed early answers nobody: the calls waiting on it go to the provider
        cut = r.stream("grok-4.1", ask("closed before its end"), agent_id="a", temperature=0)
        await cut.next_chunk()
        waiting = [asyncio.ensure_future(r.complete("grok-4.1", ask("closed before its end"), agent_id="a",
                                                    temperature=0)) for _ in range(2)]
        await asyncio.sleep(0.05)
        await cut.aclose()
        out = await asyncio.wait_for(asyncio.gather(*waiting), 30)
        assert all(o.content for o in out) and sim.stats("ca-sflight").requests >= 2 + 1
    finally:
        sim.set_latency("ca-sflight", 0.0)


async def test_the_guards_check_a_call_before_the_cache_answers_it(sim: Any) -> None:
    from xml_pipeline_llm import BlockedError, LoopDetectedError

    r = cached_router(sim, "ca-guards", guards={"repeat_limit": 2, "repeat_window": "10m"})
    first = await r.complete("grok-4.1", MESSAGES, agent_id="a", thread_id="t", temperature=0)
    second = await r.complete("grok-4.1", MESSAGES, agent_id="a", thread_id="t", temperature=0)
    assert not first.cache_hit and second.cache_hit
    with pytest.raises(LoopDetectedError):          # a loop answered from the cache is still a loop
        await r.complete("grok-4.1", MESSAGES, agent_id="a", thread_id="t", temperature=0)
    await r.block(agent="a", reason="runaway")
    with pytest.raises(BlockedError):               # a blocked agent gets no cached answer either
        await r.complete("grok-4.1", MESSAGES, agent_id="a", thread_id="other", temperature=0)
    with pytest.raises(BlockedError):
        async with r.stream("grok-4.1", MESSAGES, agent_id="a", thread_id="other", temperature=0) as s:
            async for _ in s:
                pass
    await r.unblock(agent="a")
    s = r.stream("grok-4.1", MESSAGES, agent_id="a", thread_id="again", temperature=0)
    assert "".join([d async for d in s]) == first.content and s.response is not None and s.response.cache_hit
    assert sim.stats("ca-guards").requests == 1
    assert [e.outcome for e in r.usage_events()].count("refused:blocked") == 2
