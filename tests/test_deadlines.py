"""Every call ends in time, from any thread, whatever the provider does.

Timeouts per try and idle timeouts of streams are enforced by the package's
own clock; ``deadline=`` bounds a whole request (waits, tries, backoff,
fallbacks); a wait that cannot end in time is refused at once; several threads
each running their own event loop share one router on every provider.
"""

from __future__ import annotations

import asyncio
import threading
import time
from typing import Any

import pytest
from conftest import MESSAGES, backend, make_router, until

from xml_pipeline_llm import (
    BackendError,
    BadRequestError,
    BudgetExceededError,
    DeadlineExceededError,
    LLMRouter,
    ProviderError,
    UsageEvent,
)
from xml_pipeline_llm.simulator import Fault, Simulator

MODELS = {"openai": "gpt-4o", "xai": "grok-4.1", "anthropic": "claude-sonnet-4-5", "ollama": "llama3"}


def events_of(router: LLMRouter) -> list[UsageEvent]:
    seen: list[UsageEvent] = []
    router.on_usage(seen.append)
    return seen


# ---------------------------------------------------------------- several threads, each its own loop


@pytest.mark.parametrize("provider", ["openai", "xai", "anthropic", "ollama"])
def test_threads_with_their_own_loops_share_one_router_on_every_provider(sim: Simulator, provider: str) -> None:
    name = f"loops-{provider}"
    sim.set_latency(name, 0.02, 0.005)
    r = make_router([backend(sim, provider, name, max_concurrent=8)], timeout=5, retries=0)
    model = MODELS[provider]
    errors: list[str] = []
    texts: list[str] = []

    def worker(i: int) -> None:
        async def one(j: int) -> None:
            msgs = [{"role": "user", "content": f"thread {i} call {j} says hi"}]
            try:
                if j % 2:
                    async with r.stream(model, msgs, agent_id=f"t{i}") as s:
                        texts.append("".join([d async for d in s]))
                else:
                    texts.append((await r.complete(model, msgs, agent_id=f"t{i}")).content)
            except Exception as exc:  # noqa: BLE001 - every failure is collected and shown
                errors.append(repr(exc)[:300])

        async def main() -> None:
            await asyncio.gather(*(one(j) for j in range(12)))

        asyncio.run(main())

    threads = [threading.Thread(target=worker, args=(i,)) for i in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(60)
    assert not any(t.is_alive() for t in threads), "a thread's calls hung"
    assert errors == []
    assert len(texts) == 36 and all(text.startswith(f"Hello from {name}") for text in texts)
    assert sum(r.get_agent_usage(f"t{i}").request_count for i in range(3)) == 36
    assert r.gate(name).in_flight == 0
    assert sim.stats(name).ok == 36


# ---------------------------------------------------------------- the try's own clock


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_stream_that_stalls_after_its_first_text_is_cut_at_the_idle_timeout(
        sim: Simulator, provider: str) -> None:
    name = f"stall-{provider}"
    r = make_router([backend(sim, provider, name)], timeout=30, stream_idle_timeout=0.5, retries=0)
    seen = events_of(r)
    sim.script(name, [Fault.stall(60)])
    got: list[str] = []
    started = time.monotonic()
    with pytest.raises(ProviderError) as info:
        async with r.stream(MODELS[provider], MESSAGES, agent_id="staller") as s:
            async for delta in s:
                got.append(delta)
    assert time.monotonic() - started < 20          # not the simulator's 60 s, nor the 30 s timeout
    assert got, "text was handed out before the stall"
    assert info.value.kind == "timeout" and "stream_idle_timeout" in str(info.value)
    assert r.gate(name).in_flight == 0               # the slot came back at once
    assert await until(lambda: any(e.outcome == "error:timeout" for e in seen))
    cut = next(e for e in seen if e.outcome == "error:timeout")
    assert cut.completion_tokens > 0                 # charged what was received
    assert r.get_agent_usage("staller").error_count == 1


async def test_a_stream_that_trickles_forever_ends_at_its_timeout(sim: Simulator) -> None:
    name = "trickle"
    sim.set_latency(name, 0.0, 0.3)                  # a chunk every 0.3 s: never idle, never done in time
    r = make_router([backend(sim, "openai", name)], timeout=1.0, retries=0)
    got: list[str] = []
    with pytest.raises(ProviderError) as info:
        async with r.stream("gpt-4o", [{"role": "user", "content": "one two three four five six"}]) as s:
            async for delta in s:
                got.append(delta)
    assert got and info.value.kind == "timeout" and "1s timeout" in str(info.value)
    assert r.gate(name).in_flight == 0


async def test_a_stream_stalling_before_any_text_is_retried(sim: Simulator) -> None:
    r = make_router([backend(sim, "anthropic", "stall-early-a"), backend(sim, "anthropic", "stall-early-b")],
                    timeout=60, stream_idle_timeout=0.5, retries=1)
    sim.script("stall-early-a", [Fault.timeout(120)])   # headers never come
    started = time.monotonic()
    async with r.stream("claude-sonnet-4-5", MESSAGES) as s:
        text = "".join([d async for d in s])
    assert time.monotonic() - started < 30       # cut by the idle timeout, not the 60 s timeout
    assert s.response is not None and s.response.backend == "stall-early-b" and text
    assert r.gate("stall-early-a").in_flight == 0


async def test_complete_is_bounded_by_our_clock_and_retried(sim: Simulator) -> None:
    r = make_router([backend(sim, "openai", "slow-a"), backend(sim, "openai", "slow-b")], retries=1)
    seen = events_of(r)
    sim.script("slow-a", [Fault.timeout(60)])
    resp = await r.complete("gpt-4o", MESSAGES, timeout=0.5)
    assert resp.backend == "slow-b"
    assert [e.outcome for e in seen] == ["retried:timeout", "ok"]


# ---------------------------------------------------------------- deadlines


async def test_a_deadline_bounds_the_wait_for_a_slot(sim: Simulator) -> None:
    name = "dl-slot"
    sim.set_latency(name, 2.0)
    r = make_router([backend(sim, "openai", name, max_concurrent=1)], budgets=[
        {"scope": "agent", "match": "*", "max_tokens": 100_000}])
    holder = asyncio.ensure_future(r.complete("gpt-4o", MESSAGES, agent_id="holder"))
    assert await until(lambda: r.gate(name).in_flight == 1)
    with pytest.raises(DeadlineExceededError) as info:
        await r.complete("gpt-4o", MESSAGES, agent_id="waiter", deadline=0.3)
    err = info.value
    assert isinstance(err, BackendError) and isinstance(err, TimeoutError)
    assert err.deadline == 0.3 and "dl-slot's limits" in err.waiting_for and "0.3s" in str(err)
    assert r.gate(name).queued == 0
    assert r.budget_status("agent", "waiter").reserved_tokens == 0
    await holder
    assert r.gate(name).in_flight == 0 and sim.stats(name).requests == 1


async def test_a_deadline_cuts_a_try_in_flight_and_records_it(sim: Simulator) -> None:
    name = "dl-flight"
    sim.set_latency(name, 5.0)
    r = make_router([backend(sim, "openai", name)], budgets=[{"scope": "agent", "match": "*", "max_tokens": 10_000}])
    seen = events_of(r)
    with pytest.raises(DeadlineExceededError) as info:
        await r.complete("gpt-4o", MESSAGES, agent_id="cut", deadline=0.4)
    assert "the answer from dl-flight" in info.value.waiting_for
    assert r.gate(name).in_flight == 0
    assert r.budget_status("agent", "cut").reserved_tokens == 0
    assert await until(lambda: [e.outcome for e in seen] == ["error:deadline"])
    assert r.get_agent_usage("cut").error_count == 1


async def test_a_deadline_spans_retries_and_backoff(sim: Simulator) -> None:
    name = "dl-retries"
    sim.script(name, [Fault.status(500)] * 50)
    r = make_router([backend(sim, "openai", name)], retries=40, retry_base_delay=0.1, retry_max_delay=0.2)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError):
        await r.complete("gpt-4o", MESSAGES, deadline=1.0)
    assert time.monotonic() - started < 10
    assert 1 < sim.stats(name).requests < 41
    assert r.gate(name).in_flight == 0


async def test_a_cooldown_longer_than_the_time_left_is_refused_at_once(sim: Simulator) -> None:
    name = "dl-cool"
    sim.script(name, [Fault.status(429, retry_after=30)])
    r = make_router([backend(sim, "openai", name)], retries=3, retry_max_delay=60)
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        await r.complete("gpt-4o", MESSAGES, deadline=5)
    assert time.monotonic() - started < 4              # refused, not held until the deadline
    assert "cannot be met" in str(info.value) and "cooldown of dl-cool" in info.value.waiting_for
    assert sim.stats(name).requests == 1


async def test_a_full_rpm_window_is_refused_at_once(sim: Simulator) -> None:
    name = "dl-rpm"
    r = make_router([backend(sim, "openai", name, rate_limit_rpm=1)], deadline=5)
    await r.complete("gpt-4o", MESSAGES)                 # the window is full for 60 s now
    started = time.monotonic()
    with pytest.raises(DeadlineExceededError) as info:
        await r.complete("gpt-4o", MESSAGES)             # llm.deadline: 5 s
    assert time.monotonic() - started < 4
    assert "cannot be met" in str(info.value)
    assert sim.stats(name).requests == 1 and r.gate(name).queued == 0


async def test_a_deadline_runs_until_a_stream_ends(sim: Simulator) -> None:
    name = "dl-stream"
    sim.set_latency(name, 0.0, 0.25)
    r = make_router([backend(sim, "openai", name)])
    seen = events_of(r)
    got: list[str] = []
    with pytest.raises(DeadlineExceededError):
        async with r.stream("gpt-4o", [{"role": "user", "content": "one two three four five"}],
                            deadline=0.9) as s:
            async for delta in s:
                got.append(delta)
    assert got and r.gate(name).in_flight == 0
    assert await until(lambda: any(e.outcome == "error:deadline" and e.completion_tokens > 0 for e in seen))


async def test_max_queue_wait_moves_an_alias_on_to_a_model_that_can_start(sim: Simulator) -> None:
    sim.set_latency("mq-busy", 2.0)
    r = make_router([backend(sim, "openai", "mq-busy", max_concurrent=1, supported_models=["busy-model"]),
                     backend(sim, "openai", "mq-free", supported_models=["free-model"])],
                    models={"team": ["busy-model", "free-model"]}, max_queue_wait=0.2)
    holder = asyncio.ensure_future(r.complete("busy-model", MESSAGES))
    assert await until(lambda: r.gate("mq-busy").in_flight == 1)
    started = time.monotonic()
    resp = await r.complete("team", MESSAGES)
    assert resp.backend == "mq-free" and time.monotonic() - started < 1.8
    assert r.gate("mq-busy").queued == 0
    await holder


# ---------------------------------------------------------------- arguments checked before sending


@pytest.mark.parametrize("kwargs, named", [
    ({"agent_id": 42}, "agent_id"),
    ({"thread_id": {"x": 1}}, "thread_id"),
    ({"max_tokens": -10000}, "max_tokens"),
    ({"max_tokens": 0}, "max_tokens"),
    ({"max_tokens": "100"}, "max_tokens"),
    ({"max_tokens": True}, "max_tokens"),
    ({"max_completion_tokens": 2.5}, "max_completion_tokens"),
    ({"n": 0}, "n="),
    ({"temperature": "hot"}, "temperature"),
    ({"top_p": True}, "top_p"),
    ({"deadline": 0}, "deadline"),
    ({"stream_idle_timeout": "1s"}, "stream_idle_timeout"),
])
async def test_bad_arguments_never_reach_the_provider_or_a_budget(sim: Simulator, kwargs: dict[str, Any],
                                                                    named: str) -> None:
    name = "badargs"
    sim.reset_stats(name)
    r = make_router([backend(sim, "openai", name)], budgets=[{"scope": "global", "max_tokens": 100}])
    for call in ("complete", "stream"):
        with pytest.raises(BadRequestError) as info:
            if call == "complete":
                await r.complete("gpt-4o", MESSAGES, **kwargs)
            else:
                async with r.stream("gpt-4o", MESSAGES, **kwargs) as s:
                    async for _ in s:
                        pass
        assert named in str(info.value) and "nothing was sent" in str(info.value)
    assert sim.stats(name).requests == 0
    status = r.budget_status("global", None)
    assert status.used_tokens == 0 and status.reserved_tokens == 0


async def test_n_choices_reserve_n_answers(sim: Simulator) -> None:
    r = make_router([backend(sim, "openai", "n-choices")], budgets=[{"scope": "global", "max_tokens": 100}])
    with pytest.raises(BudgetExceededError):
        await r.complete("gpt-4o", MESSAGES, max_tokens=40, n=3)      # 120 answer tokens at most
    assert sim.stats("n-choices").requests == 0
    resp = await r.complete("gpt-4o", MESSAGES, max_tokens=40)        # one answer fits
    assert resp.content


# ---------------------------------------------------------------- synchronous callers


def test_complete_sync_and_stream_sync_from_plain_code(sim: Simulator) -> None:
    from xml_pipeline_llm import complete_sync, stream_sync

    r = make_router([backend(sim, "anthropic", "sync-plain")])
    resp = complete_sync("claude-sonnet-4-5", MESSAGES, router=r, agent_id="sync")
    assert resp.content.startswith("Hello from sync-plain")
    with stream_sync("claude-sonnet-4-5", MESSAGES, router=r, agent_id="sync") as s:
        text = "".join(s)
    assert text == resp.content and s.response is not None and s.response.usage == resp.usage
    assert r.get_agent_usage("sync").request_count == 2
    with pytest.raises(BadRequestError):
        complete_sync("claude-sonnet-4-5", MESSAGES, router=r, max_tokens=-1)


async def test_complete_sync_works_inside_a_running_loop(sim: Simulator) -> None:
    from xml_pipeline_llm import complete_sync, stream_sync

    r = make_router([backend(sim, "openai", "sync-in-loop")])
    resp = complete_sync("gpt-4o", MESSAGES, router=r)          # this thread runs a loop: no error
    parts = list(stream_sync("gpt-4o", MESSAGES, router=r))
    assert resp.content == "".join(parts)


def test_a_sync_stream_left_early_is_recorded_and_gives_its_slot_back(sim: Simulator) -> None:
    from xml_pipeline_llm import stream_sync

    r = make_router([backend(sim, "openai", "sync-early")])
    s = stream_sync("gpt-4o", [{"role": "user", "content": "one two three four five"}], router=r, agent_id="e")
    first = next(iter(s))
    s.close()
    assert first and r.gate("sync-early").in_flight == 0
    assert r.get_agent_usage("e").request_count == 1
