"""Per-backend limits: exact concurrency, the token bucket, cancellation."""

from __future__ import annotations

import asyncio
import time

from conftest import MESSAGES, backend, make_router, until

from xml_pipeline_llm.limits import Slots, TokenBucket
from xml_pipeline_llm.reservation import prompt_tokens
from xml_pipeline_llm.simulator import Fault


async def test_peak_in_flight_equals_max_concurrent_under_a_burst(sim):
    r = make_router([backend(sim, "xai", "mc-a", max_concurrent=5)])
    sim.set_latency("mc-a", 0.1)
    seen = []

    async def watch():
        while True:
            seen.append(r.gate("mc-a").in_flight)
            await asyncio.sleep(0.005)

    watcher = asyncio.ensure_future(watch())
    await asyncio.gather(*(r.complete("grok-4.1", MESSAGES) for _ in range(30)))
    watcher.cancel()
    assert sim.stats("mc-a").peak_in_flight == 5
    assert max(seen) == 5
    assert r.gate("mc-a").in_flight == 0 and r.gate("mc-a").queued == 0
    sim.set_latency("mc-a", 0)


async def test_slots_serve_waiters_in_arrival_order():
    slots = Slots(1)
    order: list[int] = []
    await slots.acquire()

    async def worker(i: int) -> None:
        await slots.acquire()
        order.append(i)
        await asyncio.sleep(0)
        slots.release()

    tasks = [asyncio.ensure_future(worker(i)) for i in range(5)]
    await asyncio.sleep(0.01)
    assert slots.waiting == 5
    slots.release()
    await asyncio.gather(*tasks)
    assert order == [0, 1, 2, 3, 4] and slots.in_use == 0


async def test_cancelled_waiter_gives_its_place_back():
    slots = Slots(1)
    await slots.acquire()
    waiter = asyncio.ensure_future(slots.acquire())
    await asyncio.sleep(0.01)
    waiter.cancel()
    await asyncio.sleep(0.01)
    assert slots.waiting == 0
    slots.release()
    assert slots.in_use == 0


async def test_bucket_starts_full_then_waits_for_refill():
    bucket = TokenBucket(100, period=1.0)      # 100 tokens per second
    start = time.monotonic()
    assert await bucket.acquire(100) == 100
    assert time.monotonic() - start < 0.5      # no wait (an empty bucket would take 1 s)
    await bucket.acquire(30)                   # 0.3 s of refill
    assert 0.2 <= time.monotonic() - start < 1.5


async def test_bucket_refunds_unused_reservation_and_charges_excess():
    bucket = TokenBucket(100, period=60.0)     # refills too slowly to matter here
    await bucket.acquire(100)
    bucket.settle(100, 20)                     # used 20 of the 100 reserved
    assert 79 <= bucket.tokens <= 81
    await asyncio.wait_for(bucket.acquire(80), 0.5)
    bucket.settle(80, 120)                     # used 40 more than reserved
    assert -41 <= bucket.tokens <= -39


async def test_request_larger_than_the_bucket_waits_for_a_full_bucket():
    bucket = TokenBucket(50, period=0.5)       # 100 tokens per second
    await bucket.acquire(40)
    start = time.monotonic()
    taken = await asyncio.wait_for(bucket.acquire(500), 3)
    assert taken == 50                         # a full bucket, not a hang or an error
    assert 0.3 <= time.monotonic() - start < 2


async def test_bucket_is_first_come_first_served():
    bucket = TokenBucket(100, period=1.0)
    await bucket.acquire(100)
    order: list[str] = []

    async def take(tag: str, n: int) -> None:
        await bucket.acquire(n)
        order.append(tag)

    big = asyncio.ensure_future(take("big", 80))
    await asyncio.sleep(0.01)
    small = [asyncio.ensure_future(take(f"s{i}", 5)) for i in range(3)]
    await asyncio.gather(big, *small)
    assert order[0] == "big"                   # small ones could not slip past


async def test_bucket_holds_a_burst_back_and_refunds(sim):
    # a reservation is LiteLLM's prompt estimate + max_tokens; the bucket holds two of them
    reservation = prompt_tokens("grok-4.1", MESSAGES) + 40
    r = make_router([backend(sim, "xai", "tb-a", rate_limit_tpm=2 * reservation + 5)])
    sim.set_latency("tb-a", 0.3)
    start = time.monotonic()
    await asyncio.gather(*(r.complete("grok-4.1", MESSAGES, max_tokens=40) for _ in range(3)))
    elapsed = time.monotonic() - start
    assert sim.stats("tb-a").peak_in_flight == 2     # the third waited for tokens
    # it got them from the first two calls' refunds (each used ~24 of ~60), not from the
    # slow refill of ~2 tokens/s, which would have taken ~25 s
    assert elapsed < 5
    sim.set_latency("tb-a", 0)


async def test_cancelling_running_and_waiting_requests_releases_everything(sim):
    r = make_router([backend(sim, "xai", "cx-a", max_concurrent=2, rate_limit_tpm=100000)])
    sim.set_latency("cx-a", 2.0)
    tasks = [asyncio.ensure_future(r.complete("grok-4.1", MESSAGES, max_tokens=10)) for _ in range(3)]
    gate = r.gate("cx-a")
    assert await until(lambda: gate.in_flight == 2 and gate.queued == 1, timeout=1.8)
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.in_flight == 0 and gate.queued == 0
    assert gate.bucket.tokens > 100000 - 5          # reservations returned
    sim.set_latency("cx-a", 0)
    resp = await asyncio.wait_for(r.complete("grok-4.1", MESSAGES), 5)
    assert resp.backend == "cx-a"


async def test_a_waiting_request_counts_as_load(sim):
    r = make_router([backend(sim, "xai", "wl-a", max_concurrent=1)], strategy="least-loaded")
    sim.set_latency("wl-a", 0.5)
    tasks = [asyncio.ensure_future(r.complete("grok-4.1", MESSAGES)) for _ in range(3)]
    # 1 in flight + 2 queued, over 1 slot (while the first call is still running)
    assert await until(lambda: r.gate("wl-a").load == 3.0, timeout=0.45)
    await asyncio.gather(*tasks)
    sim.set_latency("wl-a", 0)


async def test_failed_try_releases_its_slot(sim):
    r = make_router([backend(sim, "xai", "fr-a", max_concurrent=1, rate_limit_tpm=6000)])
    sim.script("fr-a", [Fault.status(500)])
    await r.complete("grok-4.1", MESSAGES)
    assert r.gate("fr-a").in_flight == 0
