"""Provider-aware limits and backend health: pacing by the quota the provider reports, the circuit
breaker, the lowest-latency strategy.  Real path: LiteLLM's HTTP code against the simulator (which
enforces a quota and reports it in the providers' headers), a real redis-server, real processes."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import textwrap
import time
import uuid
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from conftest import MESSAGES, backend, make_router, until
from test_telemetry import otel  # noqa: F401  (the OpenTelemetry test reader, a fixture)

from xml_pipeline_llm import BackendError, ConfigError, LLMRouter, load_config
from xml_pipeline_llm.pacing import parse_duration, parse_reset, read
from xml_pipeline_llm.reservation import prompt_tokens
from xml_pipeline_llm.simulator import Fault
from xml_pipeline_llm.simulator.quota import go_duration

# ------------------------------------------------------------------ reading the headers


@pytest.mark.parametrize(("text", "seconds"), [
    ("6m0s", 360.0), ("1m30.5s", 90.5), ("20ms", 0.02), ("1.5s", 1.5), ("0s", 0.0), ("2h0m0s", 7200.0),
    ("7.66s", 7.66), ("17", 17.0), ("250us", 0.00025)])
def test_openai_resets_are_durations_in_every_form(text, seconds):
    assert parse_duration(text) == pytest.approx(seconds)
    assert parse_reset(text) == pytest.approx(seconds)


def test_anthropic_resets_are_rfc3339_times():
    now = time.time()
    at = datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=42.5)
    for text in (at.isoformat().replace("+00:00", "Z"), at.isoformat(),
                 at.astimezone(timezone(timedelta(hours=2))).isoformat()):
        assert parse_reset(text, now) == pytest.approx(42.5, abs=1e-3)
    assert parse_reset("2001-01-01T00:00:00Z", now) == 0.0          # past: already whole again
    for bad in ("soon", "1m30", "2026-12-06T08:00:00", ""):          # no zone, no unit: not read
        assert parse_reset(bad, now) is None


def test_simulator_durations_read_back():
    for seconds in (0.02, 0.5, 1.5, 59.25, 90.5, 360.0, 3725.0):
        assert parse_duration(go_duration(seconds)) == pytest.approx(seconds, abs=1e-3)


def test_readings_of_both_providers():
    openai = read({"x-ratelimit-remaining-requests": "59", "x-ratelimit-reset-requests": "1s",
                   "x-ratelimit-remaining-tokens": "149000", "x-ratelimit-reset-tokens": "6m0s"})
    assert openai.requests == (59.0, 1.0) and openai.tokens == (149000.0, 360.0)
    now = time.time()
    at = (datetime.fromtimestamp(now, timezone.utc) + timedelta(seconds=30)).isoformat().replace("+00:00", "Z")
    anthropic = read({"anthropic-ratelimit-requests-remaining": "40", "anthropic-ratelimit-requests-reset": at,
                      "anthropic-ratelimit-input-tokens-remaining": "9000",
                      "anthropic-ratelimit-input-tokens-reset": at,
                      "anthropic-ratelimit-output-tokens-remaining": "2000",
                      "anthropic-ratelimit-output-tokens-reset": at}, now)
    assert anthropic.requests == (40.0, pytest.approx(30, abs=1e-3))
    assert anthropic.tokens == (2000.0, pytest.approx(30, abs=1e-3))     # the tightest token figure
    assert not read({"x-ratelimit-remaining-tokens": "10"})               # no reset: nothing to hold to
    assert not read({"content-type": "application/json"})


# ------------------------------------------------------------------ pacing by the provider's quota


async def _drive(router: LLMRouter, model: str, workers: int, until_t: float) -> int:
    """Call ``model`` from ``workers`` tasks until ``until_t``; the calls that failed."""
    failed = 0

    async def worker() -> None:
        nonlocal failed
        while time.monotonic() < until_t:
            try:
                await router.complete(model, MESSAGES, max_tokens=10)
            except BackendError:
                failed += 1

    await asyncio.gather(*(worker() for _ in range(workers)))
    return failed


def _shares(stats: Any, skip: int, upto: int | None = None) -> tuple[float, float]:
    """(share of tries answered 429, share of the quota the neighbour left that was used) over the
    finished windows after the first ``skip`` (up to window ``upto``)."""
    windows = stats.done[skip:upto]
    assert windows, "no finished window to measure"
    tries = sum(w.requests + w.limited for w in windows)
    limited = sum(w.limited for w in windows)
    if stats.tokens is not None:
        used = sum(w.tokens for w in windows) / sum(stats.tokens - w.neighbour_tokens for w in windows)
    else:
        used = sum(w.requests for w in windows) / sum(stats.requests - w.neighbour_requests for w in windows)
    return limited / tries, used


@pytest.mark.parametrize("provider", ["openai", "anthropic"])
async def test_a_shared_quota_is_used_without_a_429_storm(sim, provider):
    name = f"quota-{provider}-{uuid.uuid4().hex[:6]}"
    model = "gpt-4o" if provider == "openai" else "claude-sonnet-4"
    router = make_router([backend(sim, provider, name, max_concurrent=12)], retries=0)   # no limit configured
    sim.set_latency(name, 0.05)
    prompt_tokens(model, MESSAGES)                             # the tokenizer loaded
    sim.set_quota(name, tokens=1200, requests=1000, window=2.0, neighbour=0.3)
    await router.complete(model, MESSAGES, max_tokens=10)
    await _drive(router, model, 12, time.monotonic() + 16.2)     # 7 windows measured: not one window's luck
    stats = sim.quota_stats(name)
    limited, used = _shares(stats, skip=1)
    assert limited <= 0.03, f"{limited:.1%} of the tries were answered 429: {stats}"
    assert used >= 0.85, f"only {used:.0%} of the quota the neighbour left was used: {stats}"


async def test_without_pacing_the_same_load_meets_429s(sim):
    """The comparison the test above stands against: the same load, pacing cut off, meets 429s."""
    name = f"quota-off-{uuid.uuid4().hex[:6]}"
    router = make_router([backend(sim, "openai", name, max_concurrent=12)], retries=0)
    router.health.pacer.gates = {}           # what a router that ignores the headers does
    sim.set_latency(name, 0.05)
    await router.complete("gpt-4o", MESSAGES, max_tokens=10)
    sim.set_quota(name, tokens=1200, requests=1000, window=2.0, neighbour=0.3)
    await _drive(router, "gpt-4o", 12, time.monotonic() + 6.2)
    limited, _ = _shares(sim.quota_stats(name), skip=1)
    assert limited > 0.05


async def test_a_backend_without_limits_waits_for_the_reset_the_provider_names(sim):
    name = f"quota-wait-{uuid.uuid4().hex[:6]}"
    router = make_router([backend(sim, "xai", name)], retries=0)
    await router.complete("grok-4", MESSAGES, max_tokens=10)
    sim.set_quota(name, requests=2, window=1.5)
    for _ in range(2):
        await router.complete("grok-4", MESSAGES, max_tokens=10)   # the second answer says: none left
    assert not router.gate(name).has_capacity
    resp = await router.complete("grok-4", MESSAGES, max_tokens=10)   # waits for the window to reset
    assert resp.content.startswith("Hello from")
    stats = sim.quota_stats(name)
    assert sum(w.limited for w in stats.windows) == 0
    assert [w.requests for w in stats.windows][:2] == [2, 1]


async def test_headers_never_raise_a_configured_limit(sim):
    name = f"quota-cfg-{uuid.uuid4().hex[:6]}"
    router = make_router([backend(sim, "openai", name, rate_limit_rpm=3, rate_limit_tpm=2000)], retries=0)
    sim.set_quota(name, requests=100_000, tokens=10_000_000, window=60)   # far more than configured
    await asyncio.gather(*(router.complete("gpt-4o", MESSAGES, max_tokens=10) for _ in range(3)))
    fourth = asyncio.ensure_future(router.complete("gpt-4o", MESSAGES, max_tokens=10))
    await asyncio.sleep(0.5)
    assert not fourth.done()                   # the configured 3 per minute still hold
    assert sim.stats(name).requests == 3
    assert router.gate(name).bucket.tokens <= 2000     # type: ignore[attr-defined]
    fourth.cancel()


async def test_a_newer_reading_only_lowers_what_is_left(sim):
    from xml_pipeline_llm.limits import Cap

    cap = Cap()
    cap.limit(100, 5.0)
    cap.limit(300, 5.0)       # higher, before the reset: ignored
    assert cap.left == 100
    cap.limit(80, 5.0)
    assert cap.left < 80
    cap.limit(1000, 0.0)      # a reset already past: no reading
    assert cap.left < 80 and cap.active()
    cap.until = time.monotonic() - 0.01          # the reset passed: the cap is lifted ...
    assert cap.min_wait(10_000) == 0.0
    cap.limit(500, 5.0)                          # ... until the next reading sets it anew
    assert cap.left == 500


# ------------------------------------------------------------------ circuit breaker


def _breaker_router(sim: Any, a: str, b: str, **circuit: Any) -> LLMRouter:
    settings = {"failure_rate": 50, "min_calls": 4, "window": "30s", "open_for": 0.6, **circuit}
    return make_router([backend(sim, "xai", a, circuit=settings),
                        backend(sim, "xai", b, priority=2, circuit=False)],
                       retries=1, retry_base_delay=0.001, retry_max_delay=0.002)


async def test_the_breaker_opens_at_the_rate_and_count_and_probes_once(sim, caplog):
    a, b = f"cb-a-{uuid.uuid4().hex[:6]}", f"cb-b-{uuid.uuid4().hex[:6]}"
    router = _breaker_router(sim, a, b)
    sim.script(a, [Fault.status(500), Fault.status(503)])     # 2 of 3 tries so far: fewer than min_calls
    for _ in range(3):
        await router.complete("grok-4", MESSAGES)
    assert router.circuit(a) == "closed"
    sim.script(a, [Fault.status(502)])                        # 3 of 4 failed (75% >= 50%) at 4 tries
    caplog.set_level("WARNING", logger="xml_pipeline_llm")
    await router.complete("grok-4", MESSAGES)
    assert router.circuit(a) == "open"
    assert any("circuit of " + a + " opens" in r.getMessage() for r in caplog.records)
    before = sim.stats(a).requests
    for _ in range(5):
        resp = await router.complete("grok-4", MESSAGES)
        assert resp.backend == b
    assert sim.stats(a).requests == before                   # nothing goes to an open backend
    assert await until(lambda: router.circuit(a) == "half_open", 5)
    sim.set_latency(a, 0.4)
    results = await asyncio.gather(*(router.complete("grok-4", MESSAGES) for _ in range(6)))
    assert sim.stats(a).requests == before + 1               # exactly one probe
    assert sorted(r.backend for r in results).count(a) == 1
    assert router.circuit(a) == "closed"                     # the probe succeeded
    assert any("circuit of " + a + " closes" in r.getMessage() for r in caplog.records)


async def test_a_failed_probe_opens_it_again(sim):
    a, b = f"cb-a-{uuid.uuid4().hex[:6]}", f"cb-b-{uuid.uuid4().hex[:6]}"
    router = _breaker_router(sim, a, b, min_calls=2)
    sim.script(a, [Fault.status(500), Fault.status(500)])
    await router.complete("grok-4", MESSAGES)                  # a 500, then b
    await router.complete("grok-4", MESSAGES)                  # a 500: 2 of 2
    assert router.circuit(a) == "open"
    assert await until(lambda: router.circuit(a) == "half_open", 5)
    sim.script(a, [Fault.status(503)])
    resp = await router.complete("grok-4", MESSAGES)            # the probe fails; b answers
    assert resp.backend == b
    assert router.circuit(a) == "open"
    n = sim.stats(a).requests
    await router.complete("grok-4", MESSAGES)
    assert sim.stats(a).requests == n


async def test_4xx_and_429_never_open_it(sim):
    a, b = f"cb-a-{uuid.uuid4().hex[:6]}", f"cb-b-{uuid.uuid4().hex[:6]}"
    router = _breaker_router(sim, a, b, min_calls=3)
    sim.script(a, [Fault.status(429, retry_after=0.001)] * 4 + [Fault.status(404)] * 3 + [Fault.status(401)] * 3)
    for _ in range(10):
        await router.complete("grok-4", MESSAGES)
        await asyncio.sleep(0.005)       # past the 429's cooldown
    assert sim.stats(a).faulted == 10
    assert router.circuit(a) == "closed"


async def test_below_the_rate_it_stays_closed(sim):
    a, b = f"cb-a-{uuid.uuid4().hex[:6]}", f"cb-b-{uuid.uuid4().hex[:6]}"
    router = _breaker_router(sim, a, b, min_calls=10)
    for i in range(12):
        if i in (0, 3, 7):
            sim.script(a, [Fault.status(500)])
        await router.complete("grok-4", MESSAGES)
        await asyncio.sleep(0.005)       # past the 500's cooldown
    assert router.circuit(a) == "closed"      # 3 of 12 failed: 25% < 50%


def test_circuit_settings_are_validated_and_shown_by_check(sim, tmp_path):
    with pytest.raises(ConfigError) as err:
        load_config({"llm": {"circuit": {"window": "soon", "open_for": -1},
                             "backends": [{"provider": "ollama", "circuit": {"failure_rate": 0}}]}})
    text = str(err.value)
    assert "llm.circuit.window: expected a positive duration" in text
    assert "llm.circuit.open_for" in text and "llm.backends[0].circuit.failure_rate" in text
    cfg = tmp_path / "organism.yaml"
    cfg.write_text(textwrap.dedent(f"""\
        llm:
          circuit: {{min_calls: 5, window: 2m}}
          backends:
            - {{provider: ollama, name: local, base_url: "{sim.base_url('chk', 'ollama')}",
                circuit: {{open_for: 45s}}}}
            - {{provider: ollama, name: other, base_url: "{sim.base_url('chk2', 'ollama')}", circuit: false}}
        """))
    out = subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", "check", "--config", str(cfg)],
                         capture_output=True, text=True, timeout=120,
                         env={**os.environ, "PYTHONPATH": os.getcwd()})
    assert "circuit opens at 50% server errors of >= 5 tries in 120s, for 45s" in out.stdout + out.stderr
    assert "circuit off" in out.stdout + out.stderr


# ------------------------------------------------------------------ lowest latency


async def test_lowest_latency_follows_the_faster_backend_and_moves_when_they_swap(sim):
    fast, slow = f"ll-a-{uuid.uuid4().hex[:6]}", f"ll-b-{uuid.uuid4().hex[:6]}"
    router = make_router([backend(sim, "xai", fast), backend(sim, "xai", slow)], strategy="lowest-latency")
    sim.set_latency(fast, 0.01)
    sim.set_latency(slow, 0.15)
    first = [(await router.complete("grok-4", MESSAGES)).backend for _ in range(30)]
    assert first[5:].count(fast) >= 20
    sim.set_latency(fast, 0.3)
    sim.set_latency(slow, 0.01)
    second = [(await router.complete("grok-4", MESSAGES)).backend for _ in range(40)]
    assert second[-15:].count(slow) >= 12, second


async def test_lowest_latency_measures_streams_to_their_first_token(sim):
    a, b = f"ll-s-{uuid.uuid4().hex[:6]}", f"ll-t-{uuid.uuid4().hex[:6]}"
    router = make_router([backend(sim, "xai", a), backend(sim, "xai", b)], strategy="lowest-latency")
    sim.set_latency(a, 0.0, per_chunk=0.03)     # a quick first token, a long stream
    sim.set_latency(b, 0.12)                    # a slow first token
    used = []
    for _ in range(12):
        s = router.stream("grok-4", MESSAGES)
        async for _ in s:
            pass
        used.append(s.response.backend)
    assert used[2:].count(a) >= 8, used


# ------------------------------------------------------------------ fleet-wide (Redis, 2 processes)

CHILD = r'''
import asyncio, json, os, sys, time
from xml_pipeline_llm import BackendError, LLMRouter, load_config
block = json.loads(sys.argv[1])
MESSAGES = json.loads(sys.argv[2])
async def main():
    router = LLMRouter(load_config({"llm": block}))
    await router.complete("gpt-4o", MESSAGES, max_tokens=10)
    print("ready", flush=True)
    sys.stdin.readline()
    stop = time.monotonic() + float(sys.argv[3])
    failed = 0
    async def worker():
        nonlocal failed
        while time.monotonic() < stop:
            try:
                await router.complete("gpt-4o", MESSAGES, max_tokens=10)
            except BackendError:
                failed += 1
    await asyncio.gather(*(worker() for _ in range(6)))
    await router.aclose()
    print(json.dumps({"failed": failed}), flush=True)
asyncio.run(main())
'''


def test_two_processes_on_redis_share_what_the_provider_says_is_left(sim):
    from test_redis import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    name = f"quota-fleet-{uuid.uuid4().hex[:6]}"
    block = {"shared_state": server.url, "redis_prefix": f"t{uuid.uuid4().hex[:6]}", "retries": 0,
             "retry_base_delay": 0.02, "retry_max_delay": 0.2,
             "backends": [backend(sim, "openai", name, max_concurrent=12)]}
    env = {**os.environ, "PYTHONPATH": os.getcwd()}
    procs = [subprocess.Popen([sys.executable, "-c", CHILD, json.dumps(block), json.dumps(MESSAGES), "8.2"],
                              stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True, env=env,
                              start_new_session=True) for _ in range(2)]
    try:
        for p in procs:
            assert p.stdout is not None and p.stdout.readline().strip() == "ready"
        sim.set_latency(name, 0.05)
        sim.set_quota(name, tokens=1200, requests=1000, window=2.0, neighbour=0.3)
        for p in procs:
            assert p.stdin is not None
            p.stdin.write("go\n")
            p.stdin.flush()
        for p in procs:
            out, _ = p.communicate(timeout=120)
            assert p.returncode == 0
            json.loads(out.strip().splitlines()[-1])
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
        server.stop()
    stats = sim.quota_stats(name)
    limited, used = _shares(stats, skip=1, upto=4)       # the windows the load covered from start to end
    assert limited <= 0.04, f"{limited:.1%} of the tries were answered 429: {stats}"
    assert used >= 0.8, f"only {used:.0%} of the quota the neighbour left was used: {stats}"


async def test_the_breaker_is_the_fleets_with_redis(sim):
    from test_redis import REDIS_SERVER, RedisServer

    if REDIS_SERVER is None:
        pytest.skip("redis-server is not installed")
    server = RedisServer().start()
    a, b = f"cbr-a-{uuid.uuid4().hex[:6]}", f"cbr-b-{uuid.uuid4().hex[:6]}"
    prefix = f"t{uuid.uuid4().hex[:6]}"
    circuit = {"failure_rate": 50, "min_calls": 4, "window": "30s", "open_for": 0.8}

    def router() -> LLMRouter:
        return make_router([backend(sim, "xai", a, circuit=circuit), backend(sim, "xai", b, priority=2)],
                           retries=1, retry_base_delay=0.001, retry_max_delay=0.002,
                           shared_state=server.url, redis_prefix=prefix)

    one, two = router(), router()
    try:
        sim.script(a, [Fault.status(500)] * 2)
        for r in (one, two, one, two):            # 2 failures and 2 successes, from two routers: 50% of 4
            await r.complete("grok-4", MESSAGES)
        assert await until(lambda: one.circuit(a) == "open" or two.circuit(a) == "open", 2)
        await asyncio.sleep(0.06)                 # what a process heard of the fleet's breaker counts 0.05 s
        n = sim.stats(a).requests
        for r in (one, two, one, two):
            assert (await r.complete("grok-4", MESSAGES)).backend == b
        assert sim.stats(a).requests == n         # open for the whole fleet
        assert two.circuit(a) in ("open", "half_open")
        await asyncio.sleep(0.85)
        sim.set_latency(a, 0.4)
        results = await asyncio.gather(*(r.complete("grok-4", MESSAGES) for r in (one, two) * 3))
        assert sim.stats(a).requests == n + 1     # one probe for the fleet
        assert [x.backend for x in results].count(a) == 1
        await asyncio.sleep(0.06)
        sim.set_latency(a, 0.0)
        for r in (one, two):                      # closed for the whole fleet
            assert (await r.complete("grok-4", MESSAGES)).backend == a
            assert r.circuit(a) == "closed"
    finally:
        await one.aclose()
        await two.aclose()
        server.stop()


async def test_an_open_circuit_shows_in_telemetry_and_the_live_view(sim, otel):  # noqa: F811
    from xml_pipeline_llm.snapshot import snapshot

    a, b = f"cbt-a-{uuid.uuid4().hex[:6]}", f"cbt-b-{uuid.uuid4().hex[:6]}"
    router = _breaker_router(sim, a, b, min_calls=2)
    sim.script(a, [Fault.status(500), Fault.status(500)])
    await router.complete("grok-4", MESSAGES)
    await router.complete("grok-4", MESSAGES)
    assert router.circuit(a) == "open"
    rows = {r.backend: r for r in (await snapshot(router)).backends}
    assert rows[a].circuit == "open" and rows[b].circuit == "closed"
    gauges = {p.attributes["xpl.backend"]: p.value for p in otel.points("xpl.backend.circuit_open", {a, b})}
    assert gauges == {a: 1, b: 0}
    await router.aclose()
