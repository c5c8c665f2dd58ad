"""Requests per minute shared by a fleet: one window in Redis for every process.

A throw-away redis-server (as in test_redis.py) and two real worker
processes, each with its own router on the same backend and Redis prefix:
together they start at most ``rate_limit_rpm`` calls, however many each asks for.
"""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from conftest import FAKE_KEYS, MESSAGES, backend, until
from test_redis import REDIS_SERVER, RedisServer

from xml_pipeline_llm import LLMRouter, load_config

pytestmark = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"),
                                reason="redis-server is not installed (apt-get install redis-server)")

WORKER = r'''
import asyncio, json, sys, time
from xml_pipeline_llm import LLMRouter, load_config

llm, k, start_at, wait = json.loads(sys.argv[1]), int(sys.argv[2]), float(sys.argv[3]), float(sys.argv[4])
MESSAGES = [{"role": "user", "content": "hello"}]

async def main():
    r = LLMRouter(load_config({"llm": llm}))
    r.warm_up()                            # LiteLLM loaded before the start signal
    await asyncio.sleep(max(0.0, start_at - time.time()))
    tasks = [asyncio.ensure_future(r.complete("grok-4.1", MESSAGES)) for _ in range(k)]
    deadline = time.monotonic() + wait
    while time.monotonic() < deadline and not all(t.done() for t in tasks):
        await asyncio.sleep(0.05)
    done = sum(1 for t in tasks if t.done() and not t.cancelled() and t.exception() is None)
    print(json.dumps({"done": done}), flush=True)

asyncio.run(main())
'''


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if REDIS_SERVER is None:
        pytest.fail("CI=true but redis-server is not installed")
    server = RedisServer().start()
    yield server.url
    server.stop()


def block(url: str, prefix: str, entry: dict) -> dict:
    return {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 20, "shared_state": url,
            "redis_prefix": prefix, "backends": [entry]}


def test_two_processes_on_one_rpm_limit_start_at_most_the_limit_together(sim, redis_url):
    llm = block(redis_url, f"rpm{uuid.uuid4().hex[:6]}", backend(sim, "xai", "rpm-fleet", rate_limit_rpm=5))
    env = {**os.environ, **FAKE_KEYS, "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true",
           "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True"}
    start_at = time.time() + 20            # both have imported LiteLLM by then
    procs = [subprocess.Popen([sys.executable, "-c", WORKER, json.dumps(llm), "6", str(start_at), "4"],
                              stdout=subprocess.PIPE, env=env, cwd=str(Path(__file__).parent), text=True)
             for _ in range(2)]
    outs = []
    for p in procs:
        out, _ = p.communicate(timeout=120)
        assert p.returncode == 0
        outs.append(json.loads(out.strip().splitlines()[-1]))
    assert sum(o["done"] for o in outs) == 5          # 12 asked for, 5 may start in the minute
    assert sim.stats("rpm-fleet").requests == 5


async def test_the_fleet_window_makes_a_backend_busy_for_the_strategy(sim, redis_url):
    prefix = f"rpm{uuid.uuid4().hex[:6]}"
    llm = block(redis_url, prefix, backend(sim, "xai", "rpm-fl-a", rate_limit_rpm=2))
    llm["backends"].append(backend(sim, "xai", "rpm-fl-b", priority=2))
    r = LLMRouter(load_config({"llm": llm}))
    got = [(await r.complete("grok-4.1", MESSAGES)).backend for _ in range(5)]
    assert got[:2] == ["rpm-fl-a", "rpm-fl-a"] and set(got[2:]) == {"rpm-fl-b"}
    other = LLMRouter(load_config({"llm": llm}))      # another router (a process) sees a's window full
    gate = other.gate("rpm-fl-a")
    task = asyncio.ensure_future(gate.enter(0))
    assert await until(lambda: not gate.has_capacity)
    task.cancel()
    await asyncio.gather(task, return_exceptions=True)
    assert await until(lambda: gate.in_flight == 0)
    await r.aclose()
    await other.aclose()


async def test_the_fleet_event_log_keeps_requested_model(sim, redis_url):
    from xml_pipeline_llm.stores import open_store

    prefix = f"rq{uuid.uuid4().hex[:6]}"
    llm = block(redis_url, prefix, backend(sim, "xai", "rq-x"))
    llm["backends"].append(backend(sim, "anthropic", "rq-a"))
    llm["models"] = {"smart": ["grok-4.1", "claude-sonnet-4"]}
    r = LLMRouter(load_config({"llm": llm}))
    await r.complete("smart", MESSAGES)
    await r.aclose()
    store = open_store(redis_url, prefix)
    assert await until(lambda: len(list(store.events())) == 1)
    [event] = list(store.events())
    assert (event.model, event.requested_model) == ("grok-4.1", "smart")
