"""Fair shares and priorities when a backend is saturated, through the real path."""

from __future__ import annotations

import asyncio
import random
from collections import Counter

import pytest
from conftest import MESSAGES, backend, make_router, until

from xml_pipeline_llm import BadRequestError, ConfigError


async def _drain(r, name: str) -> None:
    gate = r.gate(name)
    assert await until(lambda: gate.in_flight == 0 and gate.queued == 0, timeout=30)


async def test_a_single_request_does_not_wait_behind_a_greedy_agents_queue(sim):
    r = make_router([backend(sim, "xai", "fa-a", max_concurrent=2)])
    sim.set_latency("fa-a", 0.1)
    done: Counter[str] = Counter()

    async def call(agent: str) -> None:
        await r.complete("grok-4.1", MESSAGES, agent_id=agent)
        done[agent] += 1

    try:
        greedy = [asyncio.ensure_future(call("planner")) for _ in range(100)]
        assert await until(lambda: r.gate("fa-a").queued >= 90)
        waits = []
        for _ in range(5):                    # the reviewer sends one at a time
            before = done["planner"]
            await call("reviewer")
            waits.append(done["planner"] - before)   # greedy calls finished meanwhile: slot turnovers
        assert max(waits) <= 6, waits              # FIFO would be ~100 turnovers for the first one
        assert done["planner"] < 60                # and the greedy queue was still there
        await asyncio.gather(*greedy)
    finally:
        sim.set_latency("fa-a", 0)
    await _drain(r, "fa-a")


async def test_weights_share_a_saturated_backend_three_to_one(sim):
    r = make_router([backend(sim, "xai", "fw-a", max_concurrent=2)],
                    agents={"researcher": {"weight": 3}})
    sim.set_latency("fw-a", 0.01)
    order: list[str] = []

    async def call(agent: str) -> None:
        resp = await r.complete("grok-4.1", MESSAGES, agent_id=agent, max_tokens=20)
        order.append(agent)
        assert resp.content

    try:
        await asyncio.gather(*(call(a) for _ in range(300) for a in ("researcher", "writer")))
    finally:
        sim.set_latency("fw-a", 0)
    first = Counter(order[10:250])                 # while both agents are backlogged
    assert first["researcher"] / first["writer"] == pytest.approx(3.0, rel=0.10), first
    await _drain(r, "fw-a")


async def test_large_and_small_requests_get_equal_tokens_and_the_large_one_is_served(sim):
    # a token bucket: each waiter's share is its reservation (prompt estimate + max_tokens)
    r = make_router([backend(sim, "xai", "fs-a", max_concurrent=1, rate_limit_tpm=100_000)])
    sim.set_latency("fs-a", 0.005)
    order: list[str] = []

    async def call(agent: str, max_tokens: int) -> None:
        await r.complete("grok-4.1", MESSAGES, agent_id=agent, max_tokens=max_tokens)
        order.append(agent)

    try:
        calls = [call("big", 400) for _ in range(40)] + [call("small", 20) for _ in range(400)]
        random.Random(3).shuffle(calls)
        await asyncio.gather(*calls)
    finally:
        sim.set_latency("fs-a", 0)
    from xml_pipeline_llm.reservation import prompt_tokens

    prompt = prompt_tokens("grok-4.1", MESSAGES)
    window = Counter(order[20:300])               # both backlogged: tokens (reserved) per agent
    big, small = window["big"] * (prompt + 400), window["small"] * (prompt + 20)
    assert window["big"] >= 5                      # the large requests are served, not starved
    assert big / small == pytest.approx(1.0, rel=0.10), window
    await _drain(r, "fs-a")


async def test_high_priority_overtakes_and_low_priority_ages_into_normal(sim):
    r = make_router([backend(sim, "xai", "fp-a", max_concurrent=1)], priority_aging=0.5)
    sim.set_latency("fp-a", 0.05)
    order: list[str] = []

    async def call(tag: str, agent: str, priority: str = "normal") -> None:
        await r.complete("grok-4.1", MESSAGES, agent_id=agent, priority=priority)
        order.append(tag)

    try:
        flood = [asyncio.ensure_future(call("n", f"agent-{i % 3}")) for i in range(60)]
        assert await until(lambda: r.gate("fp-a").queued >= 50)
        await call("high", "vip", "high")
        assert order.index("high") <= 2, order     # overtook every queued normal request
        low = asyncio.ensure_future(call("low", "background", "low"))
        await low                                  # served once it waited priority_aging
        assert order.count("n") < 60               # before the flood was over
        await asyncio.gather(*flood)
    finally:
        sim.set_latency("fp-a", 0)
    await _drain(r, "fp-a")


async def test_cancelling_fair_waiters_at_random_leaves_every_slot_and_token(sim):
    r = make_router([backend(sim, "xai", "fc-a", max_concurrent=2, rate_limit_tpm=50_000)],
                    agents={"a": {"weight": 2}})
    sim.set_latency("fc-a", 0.01)
    rng = random.Random(5)

    async def one(i: int) -> None:
        agent = ("a", "b", "c")[i % 3]
        try:
            await asyncio.wait_for(r.complete("grok-4.1", MESSAGES, agent_id=agent, max_tokens=20,
                                              priority=("high", "normal", "low")[i % 3]),
                                   timeout=rng.uniform(0.01, 0.3))
        except asyncio.TimeoutError:
            pass

    try:
        await asyncio.gather(*(one(i) for i in range(150)))
    finally:
        sim.set_latency("fc-a", 0)
    await _drain(r, "fc-a")
    gate = r.gate("fc-a")
    assert await until(lambda: gate.bucket.tokens >= 50_000 - 1, timeout=30)
    assert (await r.complete("grok-4.1", MESSAGES)).content


def test_agent_weights_and_priorities_are_validated(sim):
    with pytest.raises(ConfigError, match=r"llm.agents.researcher.weight"):
        make_router([backend(sim, "xai", "fv-a")], agents={"researcher": {"weight": 0}})
    with pytest.raises(ConfigError, match='did you mean "weight"'):
        make_router([backend(sim, "xai", "fv-a")], agents={"researcher": {"wieght": 2}})
    with pytest.raises(ConfigError, match="llm.priority_aging"):
        make_router([backend(sim, "xai", "fv-a")], priority_aging=-1)


async def test_an_unknown_priority_is_refused_before_sending(sim):
    r = make_router([backend(sim, "xai", "fu-a")])
    with pytest.raises(BadRequestError, match="priority=: expected one of high, normal, low"):
        await r.complete("grok-4.1", MESSAGES, priority="urgent")
    assert sim.stats("fu-a").requests == 0
