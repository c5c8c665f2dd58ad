"""Strategies and the try loop, through LiteLLM's HTTP path to the simulator.

Delays are tens of milliseconds and bounds are generous, so the tests hold on
a loaded 2-core CI machine; timing figures live in benchmarks/.
"""

from __future__ import annotations

import asyncio
import time

import pytest
from conftest import MESSAGES, backend, make_router

from xml_pipeline_llm import BadRequestError, NoBackendError, ProviderError, RateLimitError
from xml_pipeline_llm.retry import backoff, parse_retry_after
from xml_pipeline_llm.simulator import Fault


def served(router, n: int = 1) -> list[str]:
    return [e.backend for e in router.usage_events() if e.outcome == "ok"][-n:]


async def test_failover_prefers_lowest_priority_then_file_order(sim):
    r = make_router([backend(sim, "xai", "fo-a", priority=2), backend(sim, "xai", "fo-b", priority=1),
                     backend(sim, "xai", "fo-c", priority=1)])
    for _ in range(3):
        resp = await r.complete("grok-4.1", MESSAGES)
        assert resp.backend == "fo-b"
    assert sim.stats("fo-a").requests == 0 and sim.stats("fo-c").requests == 0


async def test_failover_moves_on_at_once_while_a_healthy_backend_remains(sim):
    # A long backoff would show up as a long request: the second try must not wait for it.
    r = make_router([backend(sim, "xai", "fn-a"), backend(sim, "xai", "fn-b")],
                    retry_base_delay=5, retry_max_delay=30)
    sim.script("fn-a", [Fault.status(503)])
    start = time.monotonic()
    resp = await r.complete("grok-4.1", MESSAGES)
    assert resp.backend == "fn-b"
    assert time.monotonic() - start < 2.5
    assert [e.outcome for e in r.usage_events()] == ["retried:503", "ok"]


async def test_retry_after_keeps_later_requests_off_the_backend(sim):
    r = make_router([backend(sim, "xai", "ra-a"), backend(sim, "xai", "ra-b")], retry_max_delay=60)
    sim.script("ra-a", [Fault.status(429, retry_after=30)])
    first = await r.complete("grok-4.1", MESSAGES)
    assert first.backend == "ra-b"
    later = await asyncio.gather(*(r.complete("grok-4.1", MESSAGES) for _ in range(5)))
    assert {resp.backend for resp in later} == {"ra-b"}
    assert sim.stats("ra-a").requests == 1
    assert set(await r.cooldowns()) == {"ra-a"} and 25 < (await r.cooldowns())["ra-a"] <= 30


async def test_single_backend_waits_for_retry_after(sim):
    r = make_router([backend(sim, "xai", "rw-a")], retry_max_delay=5)
    sim.script("rw-a", [Fault.status(429, retry_after=0.4)])
    start = time.monotonic()
    resp = await r.complete("grok-4.1", MESSAGES)
    elapsed = time.monotonic() - start
    assert resp.backend == "rw-a" and sim.stats("rw-a").requests == 2
    assert 0.35 <= elapsed < 4


@pytest.mark.parametrize("fault", [Fault.status(429, retry_after_ms=400),
                                   Fault.status(429, retry_after_date=2.0)])
async def test_retry_after_ms_and_http_date_are_honoured(sim, fault):
    name = f"rf-{fault.retry_after_ms or 'date'}"
    r = make_router([backend(sim, "xai", name)], retry_max_delay=5)
    sim.script(name, [fault])
    start = time.monotonic()
    await r.complete("grok-4.1", MESSAGES)
    assert time.monotonic() - start >= 0.3   # HTTP-dates have 1 s resolution: >= ~1 s - rounding


async def test_retry_after_is_capped_by_retry_max_delay(sim):
    r = make_router([backend(sim, "xai", "rc-a")], retry_base_delay=0.05, retry_max_delay=0.3)
    sim.script("rc-a", [Fault.status(429, retry_after=30)])
    start = time.monotonic()
    await r.complete("grok-4.1", MESSAGES)
    assert 0.25 <= time.monotonic() - start < 4


def test_retry_after_parsing():
    assert parse_retry_after(None, "7") == 7.0
    assert parse_retry_after("1500", "7") == 1.5
    assert parse_retry_after(None, "Wed, 21 Oct 2015 07:28:00 GMT", now=1445412470.0) == 10.0
    assert parse_retry_after(None, "soon") is None
    assert parse_retry_after(None, "-3") == 0.0


def test_backoff_is_exponential_with_half_jitter_and_capped():
    assert backoff(0, 1.0, 60, rand=lambda: 0.0) == 0.5
    assert backoff(0, 1.0, 60, rand=lambda: 1.0) == 1.0
    assert backoff(3, 1.0, 60, rand=lambda: 1.0) == 8.0
    assert backoff(3, 1.0, 60, rand=lambda: 0.0) == 4.0
    assert backoff(10, 1.0, 60, rand=lambda: 1.0) == 60.0
    assert backoff(200, 1.0, 60, rand=lambda: 0.0) == 30.0


async def test_gaps_between_tries_follow_the_jittered_backoff(sim):
    r = make_router([backend(sim, "xai", "bo-a")], retries=3, retry_base_delay=0.1, retry_max_delay=10)
    sim.script("bo-a", [Fault.status(500)] * 3)
    await r.complete("grok-4.1", MESSAGES)
    events = r.usage_events()
    assert [e.outcome for e in events] == ["retried:500"] * 3 + ["ok"]
    for k in range(3):
        # a try's event is stamped when it ends; the next one started latency_ms earlier than its end
        gap = (events[k + 1].timestamp - events[k + 1].latency_ms / 1000) - events[k].timestamp
        d = 0.1 * 2 ** k
        assert d / 2 - 0.02 <= gap <= d + 0.5, (k, gap)


async def test_exhausted_retries_raise_with_every_try_listed(sim):
    r = make_router([backend(sim, "xai", "ex-a"), backend(sim, "xai", "ex-b")], retries=2)
    sim.script("ex-a", [Fault.status(500)] * 5)
    sim.script("ex-b", [Fault.status(502)] * 5)
    with pytest.raises(ProviderError) as info:
        await r.complete("grok-4.1", MESSAGES, agent_id="unlucky")
    err = info.value
    assert len(err.attempts) == 3
    assert [a.backend for a in err.attempts][:2] == ["ex-a", "ex-b"]
    assert "ex-a: server_error 500" in str(err) and "ex-b: server_error 502" in str(err)
    assert getattr(err.__cause__, "status_code", None) in (500, 502)
    assert sim.stats("ex-a").requests + sim.stats("ex-b").requests == 3
    usage = r.get_agent_usage("unlucky")
    assert (usage.error_count, usage.request_count, usage.total_tokens) == (1, 0, 0)
    sim.reset("ex-a"), sim.reset("ex-b")


async def test_rate_limit_error_carries_retry_after(sim):
    r = make_router([backend(sim, "xai", "rl-a")], retries=1, retry_max_delay=0.2)
    sim.script("rl-a", [Fault.status(429, retry_after=0.1)] * 2)
    with pytest.raises(RateLimitError) as info:
        await r.complete("grok-4.1", MESSAGES)
    assert info.value.retry_after == pytest.approx(0.1)


async def test_bad_request_is_not_retried_anywhere(sim):
    r = make_router([backend(sim, "xai", "br-a"), backend(sim, "xai", "br-b")])
    sim.script("br-a", [Fault.status(400)])
    with pytest.raises(BadRequestError):
        await r.complete("grok-4.1", MESSAGES)
    assert sim.stats("br-a").requests == 1 and sim.stats("br-b").requests == 0


@pytest.mark.parametrize("code", [401, 403, 404])
async def test_backend_specific_failure_moves_on_without_cooldown(sim, code):
    a, b = f"mv{code}-a", f"mv{code}-b"
    r = make_router([backend(sim, "xai", a), backend(sim, "xai", b)], retry_base_delay=5, retry_max_delay=30)
    sim.script(a, [Fault.status(code)])
    start = time.monotonic()
    assert (await r.complete("grok-4.1", MESSAGES)).backend == b
    assert time.monotonic() - start < 2.5
    assert a not in await r.cooldowns()
    assert (await r.complete("grok-4.1", MESSAGES)).backend == a   # not cooling: preferred again


async def test_all_backends_unauthorised_is_a_no_backend_error_after_one_try_each(sim):
    r = make_router([backend(sim, "xai", "au-a"), backend(sim, "xai", "au-b")], retries=5)
    sim.script("au-a", [Fault.status(401)])
    sim.script("au-b", [Fault.status(401)])
    with pytest.raises(NoBackendError) as info:
        await r.complete("grok-4.1", MESSAGES)
    assert len(info.value.attempts) == 2
    assert sim.stats("au-a").requests == 1 and sim.stats("au-b").requests == 1


@pytest.mark.parametrize("fault", [Fault.malformed(), Fault.drop(), Fault.missing_fields()],
                         ids=["malformed", "drop", "missing"])
async def test_broken_responses_are_retried(sim, fault):
    name = f"bk-{fault.kind}"
    r = make_router([backend(sim, "xai", name)], retries=2)
    sim.script(name, [fault])
    resp = await r.complete("grok-4.1", MESSAGES)
    assert resp.content and sim.stats(name).requests == 2


async def test_timeouts_are_retried(sim):
    r = make_router([backend(sim, "openai", "to-a", timeout=0.5), backend(sim, "openai", "to-b")])
    sim.script("to-a", [Fault.timeout(3)])
    resp = await r.complete("gpt-4o", MESSAGES)
    assert resp.backend == "to-b"
    assert r.usage_events()[0].outcome == "retried:timeout"


async def test_refused_connection_is_an_unreachable_backend_and_fails_over(sim):
    import socket
    with socket.socket() as s:          # a port nobody listens on
        s.bind(("127.0.0.1", 0))
        dead = s.getsockname()[1]
    r = make_router([backend(sim, "openai", "cr-a", base_url=f"http://127.0.0.1:{dead}/v1"),
                     backend(sim, "openai", "cr-b")])
    resp = await r.complete("gpt-4o", MESSAGES)
    assert resp.backend == "cr-b"
    assert [e.outcome for e in r.usage_events()] == ["retried:unreachable", "ok"]


async def test_litellm_retries_are_off(sim):
    r = make_router([backend(sim, "openai", "lo-a")], retries=0)
    sim.script("lo-a", [Fault.status(500)] * 3)
    with pytest.raises(ProviderError):
        await r.complete("gpt-4o", MESSAGES)
    assert sim.stats("lo-a").requests == 1
    sim.reset("lo-a")


async def test_round_robin_is_exact_and_per_model(sim):
    names = ["rr-a", "rr-b", "rr-c"]
    r = make_router([backend(sim, "xai", n, supported_models=["grok-*", "other-*"]) for n in names],
                    strategy="round_robin")
    await asyncio.gather(*(r.complete("grok-4.1", MESSAGES) for _ in range(30)))
    assert [sim.stats(n).requests for n in names] == [10, 10, 10]
    seq = [(await r.complete("other-1", MESSAGES)).backend for _ in range(3)]
    assert seq == names    # its own rotation, starting at the first backend


async def test_round_robin_skips_a_cooling_backend(sim):
    names = ["rs-a", "rs-b"]
    r = make_router([backend(sim, "xai", n) for n in names], strategy="round-robin", retry_max_delay=30)
    sim.script("rs-a", [Fault.status(429, retry_after=30)])
    results = [(await r.complete("grok-4.1", MESSAGES)).backend for _ in range(4)]
    assert results == ["rs-b"] * 4 and sim.stats("rs-a").requests == 1


async def test_least_loaded_spreads_a_burst_by_capacity(sim):
    r = make_router([backend(sim, "xai", "ll-a", max_concurrent=2), backend(sim, "xai", "ll-b", max_concurrent=6)],
                    strategy="least-loaded")
    sim.set_latency("ll-a", 0.2), sim.set_latency("ll-b", 0.2)
    await asyncio.gather(*(r.complete("grok-4.1", MESSAGES) for _ in range(16)))
    a, b = sim.stats("ll-a"), sim.stats("ll-b")
    assert a.requests + b.requests == 16
    assert a.peak_in_flight <= 2 and b.peak_in_flight <= 6
    assert 2 <= a.requests <= 6 and b.requests >= 10   # 1:3 capacity -> about 4:12
    # idle: ties go to priority then file order
    assert (await r.complete("grok-4.1", MESSAGES)).backend == "ll-a"
    sim.set_latency("ll-a", 0), sim.set_latency("ll-b", 0)
