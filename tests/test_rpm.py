"""Requests per minute: the start window, its place in the gate, and the strategies.

The window's own tests use a short period (the class takes one) so that "at
most N starts in any period" is checked over several windows in seconds; the
router's tests use the real 60 s window and check what starts at once and
what waits.  Exact figures over minutes are in benchmarks/bench_rpm.py.
"""

from __future__ import annotations

import asyncio
import threading
import time

import pytest
from conftest import MESSAGES, backend, make_router, until

from xml_pipeline_llm import ConfigError, load_config
from xml_pipeline_llm.limits import StartWindow


def most_in_any(times: list[float], period: float) -> int:
    """The largest number of ``times`` within any half-open window of ``period`` seconds."""
    times = sorted(times)
    best, j = 0, 0
    for i, t in enumerate(times):
        while times[j] <= t - period:
            j += 1
        best = max(best, i - j + 1)
    return best


async def test_a_window_lets_its_limit_start_at_once_and_the_rest_as_starts_leave_it():
    w = StartWindow(30, period=2.0)        # 30 "per minute", a minute being 2 s here
    start = time.monotonic()
    times: list[float] = []

    async def one() -> None:
        await w.acquire()
        times.append(time.monotonic())

    await asyncio.wait_for(asyncio.gather(*(one() for _ in range(90))), 30)
    rel = [t - start for t in times]
    assert sum(1 for t in rel if t < 0.5) == 30       # the first window's worth at once
    assert max(rel) >= 4.0 - 0.05                      # 90 at 30 a window: two more windows
    assert most_in_any(times, 2.0 - 0.01) <= 30


async def test_a_cancelled_waiter_takes_no_start_and_the_next_one_goes():
    w = StartWindow(1, period=0.5)
    await w.acquire()
    waiter = asyncio.ensure_future(w.acquire())
    second = asyncio.ensure_future(w.acquire())
    await asyncio.sleep(0)
    waiter.cancel()
    start = time.monotonic()
    await asyncio.wait_for(second, 5)
    assert time.monotonic() - start < 2 and w.waiting == 0 and w.started == 1


def test_one_window_is_exact_across_threads_with_loops_of_their_own():
    w = StartWindow(6, period=1.0)
    times: list[float] = []
    lock = threading.Lock()

    def worker() -> None:
        async def run() -> None:
            for _ in range(6):
                await w.acquire()
                with lock:
                    times.append(time.monotonic())
        asyncio.run(run())

    threads = [threading.Thread(target=worker) for _ in range(3)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    assert len(times) == 18 and most_in_any(times, 1.0 - 0.01) <= 6
    assert max(times) - min(times) >= 2.0 - 0.05


async def test_a_backend_starts_at_most_its_rpm_and_the_rest_wait_holding_nothing_else(sim):
    r = make_router([backend(sim, "xai", "rpm-one", rate_limit_rpm=4, rate_limit_tpm=100_000)])
    gate = r.gate("rpm-one")
    tasks = [asyncio.ensure_future(r.complete("grok-4.1", MESSAGES)) for _ in range(6)]
    assert await until(lambda: sum(t.done() for t in tasks) == 4)
    assert await until(lambda: gate.queued == 2)
    assert sim.stats("rpm-one").requests == 4 and not gate.has_capacity
    for t in tasks:
        t.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)
    assert gate.queued == 0 and gate.in_flight == 0            # the waiters gave their slots back
    assert gate.bucket is not None and await until(lambda: gate.bucket.tokens > 99_000)
    assert sim.stats("rpm-one").requests == 4


@pytest.mark.parametrize("strategy", ["failover", "least-loaded", "round-robin"])
async def test_a_backend_out_of_rpm_headroom_is_busy_and_the_next_one_is_filled(sim, strategy):
    a, b = f"rpm-fill-a-{strategy}", f"rpm-fill-b-{strategy}"
    r = make_router([backend(sim, "xai", a, rate_limit_rpm=3), backend(sim, "xai", b, priority=2)],
                    strategy=strategy)
    start = time.monotonic()
    first = [(await r.complete("grok-4.1", MESSAGES)).backend for _ in range(6)]
    burst = await asyncio.wait_for(asyncio.gather(*(r.complete("grok-4.1", MESSAGES) for _ in range(6))), 20)
    assert time.monotonic() - start < 15                       # nobody waited for a's window
    assert first.count(a) <= 3 and all(resp.backend == b for resp in burst)
    assert sim.stats(a).requests <= 3


async def test_every_try_counts_against_the_rpm(sim):
    from xml_pipeline_llm.simulator import Fault

    r = make_router([backend(sim, "xai", "rpm-tries-a", rate_limit_rpm=2), backend(sim, "xai", "rpm-tries-b")])
    sim.script("rpm-tries-a", [Fault.status(500)])
    resp = await r.complete("grok-4.1", MESSAGES)      # a: 500 (a start), b answers
    assert resp.backend == "rpm-tries-b"
    assert (await r.complete("grok-4.1", MESSAGES, retries=0)).backend in ("rpm-tries-a", "rpm-tries-b")
    assert r.gate("rpm-tries-a").window.started == sim.stats("rpm-tries-a").requests


def test_rate_limit_rpm_must_be_a_positive_integer(sim):
    for bad in (0, -3, "fast", 2.5):
        with pytest.raises(ConfigError) as err:
            load_config({"llm": {"backends": [backend(sim, "xai", "rpm-cfg", rate_limit_rpm=bad)]}})
        assert "llm.backends[0].rate_limit_rpm: expected a positive integer" in str(err.value)
