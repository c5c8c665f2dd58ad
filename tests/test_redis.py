"""Shared state in Redis: several processes, one quota, one set of cooldowns, one usage ledger.

A real redis-server (the Debian package; .ci/run installs it) runs on a free
port for the session.  The multi-process tests use real processes: one
"zygote" subprocess imports LiteLLM once (seconds) and forks the workers, each
a separate process with its own router, talking JSON lines to this test over
a socket; the provider simulator runs here and the workers call its base_url.
Delays are short and bounds generous so the file holds on a loaded 2-core CI
machine.
"""

from __future__ import annotations

import asyncio
import json
import logging
import os
import shutil
import signal
import socket
import subprocess
import sys
import textwrap
import time
import uuid
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_KEYS, MESSAGES, backend, until

from xml_pipeline_llm import ConfigError, LLMRouter, load_config
from xml_pipeline_llm.simulator import Fault

REDIS_SERVER = shutil.which("redis-server")
# Skipped only where redis-server is missing; under CI (.ci/run installs it) that is an error.
pytestmark = pytest.mark.skipif(REDIS_SERVER is None and not os.environ.get("CI"),
                                reason="redis-server is not installed (apt-get install redis-server; "
                                "CI's .ci/run does this)")

LEASE = 1.5     # seconds: the workers' concurrency lease (renewed every LEASE / 3)


# ------------------------------------------------------------------ redis-server

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


class RedisServer:
    """A throw-away redis-server on 127.0.0.1 (no persistence)."""

    def __init__(self, port: int | None = None) -> None:
        self.port = port or _free_port()
        self.proc: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        return f"redis://127.0.0.1:{self.port}/0"

    def start(self) -> RedisServer:
        assert REDIS_SERVER is not None
        self.proc = subprocess.Popen([REDIS_SERVER, "--port", str(self.port), "--bind", "127.0.0.1",
                                      "--save", "", "--appendonly", "no"],
                                     stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                with socket.create_connection(("127.0.0.1", self.port), timeout=0.2) as s:
                    s.sendall(b"PING\r\n")
                    if s.recv(16).startswith(b"+PONG"):
                        return self
            except OSError:
                time.sleep(0.05)
        raise RuntimeError(f"redis-server did not start on port {self.port}")

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            self.proc.wait(10)
        self.proc = None

    def client(self) -> Any:
        import redis

        return redis.Redis(port=self.port, decode_responses=True)


@pytest.fixture(scope="session")
def redis_server() -> Iterator[RedisServer]:
    if REDIS_SERVER is None:
        pytest.fail("CI=true but redis-server is not installed: .ci/run must apt-get install redis-server")
    server = RedisServer().start()
    yield server
    server.stop()


# ------------------------------------------------------------------ worker processes

ZYGOTE = r'''
import asyncio, json, os, signal, socket, sys, time
from dataclasses import asdict
from xml_pipeline_llm import LLMRouter, load_config
from xml_pipeline_llm.reservation import prompt_tokens

MESSAGES = json.loads(sys.argv[3])
# Warm up before forking (LiteLLM, its router, the tokenizer), so each worker's first call is quick.
LLMRouter(load_config({"llm": {"backends": [{"provider": "xai", "api_key_env": "TEST_XAI_KEY",
                                             "base_url": "http://127.0.0.1:9/v1"}]}})).warm_up()
import litellm.router  # noqa: F401  (the expensive part, before forking)
prompt_tokens("grok-4.1", MESSAGES)

async def run(r, cmd):
    delay = cmd.get("start_at", 0) - time.time()
    if delay > 0:
        await asyncio.sleep(delay)
    n, until = cmd.get("n"), cmd.get("until")
    agents = cmd.get("agents") or [None]
    todo = iter(range(n if n else 10**9))
    out = {"ok": 0, "errors": [], "backends": {}, "tokens": 0, "start": time.time()}

    async def loop():
        for i in todo:
            if until and time.time() >= until:
                return
            try:
                resp = await r.complete(cmd["model"], MESSAGES, agent_id=agents[i % len(agents)],
                                        thread_id=f"t{i % 2}", max_tokens=cmd.get("max_tokens", 10))
            except Exception as exc:
                out["errors"].append(repr(exc)[:300])
                continue
            out["ok"] += 1
            out["tokens"] += resp.usage["total_tokens"]
            out["backends"][resp.backend] = out["backends"].get(resp.backend, 0) + 1

    await asyncio.gather(*(loop() for _ in range(cmd.get("conc", 1))))
    out["end"] = time.time()
    return out

async def hold(r, cmd, reply):
    gate = r.gate(cmd["backend"])
    tasks = [asyncio.ensure_future(r.complete(cmd["model"], MESSAGES)) for _ in range(cmd["k"])]
    while gate.held < cmd["k"]:
        await asyncio.sleep(0.01)
    reply({"held": gate.held})
    await asyncio.gather(*tasks, return_exceptions=True)
    return {"done": True}

def child(port):
    sock = socket.create_connection(("127.0.0.1", port))
    f = sock.makefile("rw")
    def reply(obj):
        f.write(json.dumps(obj) + "\n")
        f.flush()
    reply({"pid": os.getpid()})
    routers = {}
    while True:
        try:
            line = f.readline()
        except OSError:
            line = ""
        if not line:
            os._exit(0)
        cmd = json.loads(line)
        try:
            key = json.dumps(cmd["llm"], sort_keys=True)
            if key not in routers:
                routers[key] = LLMRouter(load_config({"llm": cmd["llm"]}))
            r = routers[key]
            if cmd["op"] == "run":
                reply(asyncio.run(run(r, cmd)))
            elif cmd["op"] == "usage":
                reply({k: asdict(v) for k, v in r.get_all_usage(cmd.get("by", "agent")).items()})
            elif cmd["op"] == "hold":
                reply(asyncio.run(hold(r, cmd, reply)))
        except Exception as exc:
            reply({"error": repr(exc)})

signal.signal(signal.SIGCHLD, signal.SIG_IGN)
port, count = int(sys.argv[1]), int(sys.argv[2])
for _ in range(count):
    if os.fork() == 0:
        child(port)
for _ in sys.stdin:
    pass
'''


class Worker:
    def __init__(self, conn: socket.socket) -> None:
        self.sock = conn
        self.file = conn.makefile("rw")
        self.pid = self.read()["pid"]

    def send(self, cmd: dict[str, Any]) -> None:
        self.file.write(json.dumps(cmd) + "\n")
        self.file.flush()

    def read(self) -> dict[str, Any]:
        line = self.file.readline()
        assert line, "worker process went away"
        out = json.loads(line)
        assert "error" not in out, out["error"]
        return out


class Fleet:
    """Worker processes forked from one zygote that imported LiteLLM once."""

    def __init__(self, count: int, stderr: Any = None) -> None:
        self.listener = socket.socket()
        self.listener.bind(("127.0.0.1", 0))
        self.listener.listen(count)
        self.listener.settimeout(120)
        env = {**os.environ, **FAKE_KEYS, "XML_PIPELINE_LLM_REDIS_LEASE": str(LEASE),
               "LITELLM_LOCAL_MODEL_COST_MAP": "True", "LITELLM_OFFLINE_MODE": "true",
               "LITELLM_LOCAL_ANTHROPIC_BETA_HEADERS": "True"}
        env.pop("XML_PIPELINE_LLM_REDIS_URL", None)
        self.count = count
        self.zygote = subprocess.Popen([sys.executable, "-c", ZYGOTE, str(self.listener.getsockname()[1]),
                                        str(count), json.dumps(MESSAGES)],
                                       stdin=subprocess.PIPE, stderr=stderr, env=env,
                                       cwd=str(Path(__file__).parent))
        self._workers: list[Worker] = []

    def workers(self, sim: Any, redis_server: Any) -> list[Worker]:
        if len(self._workers) < self.count:
            while len(self._workers) < self.count:
                conn, _ = self.listener.accept()
                conn.settimeout(120)
                self._workers.append(Worker(conn))
            # one call each, so that first-call costs fall outside the measured runs
            block = llm_block(redis_server.url, "warm", [backend(sim, "xai", "rdx-mp-warm")])
            self.ask([(w, {"op": "run", "llm": block, "model": "grok-4.1", "n": 2, "conc": 2})
                      for w in self._workers])
        return self._workers

    def ask(self, pairs: list[tuple[Worker, dict[str, Any]]]) -> list[dict[str, Any]]:
        """Send each worker its command, then collect the answers (the workers run in parallel)."""
        for w, cmd in pairs:
            w.send(cmd)
        return [w.read() for w, _ in pairs]

    def close(self) -> None:
        for w in self._workers:
            w.sock.close()            # a worker exits when its socket closes
        if self.zygote.stdin:
            self.zygote.stdin.close()
        self.zygote.wait(10)
        self.listener.close()


@pytest.fixture(scope="module", autouse=True)
def fleet(redis_server: RedisServer) -> Iterator[Fleet]:
    """Four workers plus one to be killed; started first so the import overlaps the in-process tests."""
    f = Fleet(5)
    yield f
    f.close()


def llm_block(url: str, prefix: str, backends: list[dict[str, Any]], **extra: Any) -> dict[str, Any]:
    return {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 20, "shared_state": url,
            "redis_prefix": prefix, **extra, "backends": backends}


def shared_router(url: str, prefix: str, backends: list[dict[str, Any]], **extra: Any) -> LLMRouter:
    return LLMRouter(load_config({"llm": llm_block(url, prefix, backends, **extra)}))


def prefix() -> str:
    return f"t{uuid.uuid4().hex[:8]}"


# ------------------------------------------------------------------ in one process

def test_unreachable_redis_is_a_config_error_naming_the_url_without_its_password(sim):
    port = _free_port()
    url = f"redis://:hunter2-not-shown@127.0.0.1:{port}/0"
    with pytest.raises(ConfigError) as err:
        shared_router(url, "x", [backend(sim, "xai", "rd-down")])
    text = str(err.value)
    assert f"127.0.0.1:{port}" in text and "***" in text and "hunter2" not in text
    assert "llm.shared_state" in text and "redis-server" in text


def test_make_state_picks_redis_from_the_config_or_the_environment(sim, redis_server, monkeypatch):
    from xml_pipeline_llm.shared.state import RedisState
    from xml_pipeline_llm.state import MemoryState
    from xml_pipeline_llm.stores import make_state

    plain = load_config({"llm": {"backends": [backend(sim, "xai", "rdx-ms-a")]}})
    assert isinstance(make_state(plain), MemoryState)
    monkeypatch.setenv("XML_PIPELINE_LLM_REDIS_URL", redis_server.url)
    from_env = load_config({"llm": {"backends": [backend(sim, "xai", "rdx-ms-a")], "redis_prefix": "envp"}})
    state = make_state(from_env)
    assert isinstance(state, RedisState) and state.prefix == "envp"


def test_router_works_across_event_loops(sim, redis_server):
    p = prefix()
    r = shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-rl-a", max_concurrent=2, rate_limit_tpm=100_000)])

    async def four() -> list[Any]:
        return await asyncio.wait_for(
            asyncio.gather(*(r.complete("grok-4.1", MESSAGES, agent_id="loops") for _ in range(4))), 30)

    for _ in range(3):   # a fresh loop each time: the Redis client must follow
        assert len(asyncio.run(four())) == 4
    assert r.get_agent_usage("loops").request_count == 12
    asyncio.run(r.aclose())


async def test_token_bucket_semantics_in_redis(redis_server):
    from xml_pipeline_llm.shared.state import RedisState

    state = RedisState(redis_server.url, prefix(), lease=5)
    gate = state.gate("tb", 10, 6000)      # 100 tokens a second
    start = time.monotonic()
    full = await gate.enter(6000)          # the bucket starts full
    assert full.tokens == 6000 and time.monotonic() - start < 2     # an empty one: 60 s
    gate.leave(full, 6000)
    start = time.monotonic()
    t = await gate.enter(100)              # empty: about one second of refill
    assert 0.6 < time.monotonic() - start < 3.0
    gate.leave(t, 0)                       # refund all of it
    assert await until(lambda: gate.level >= 90)
    start = time.monotonic()
    t = await gate.enter(100)              # the refund is there at once
    assert time.monotonic() - start < 0.6          # without it: about a second
    gate.leave(t, 400)                     # charge 300 more than reserved: the level goes negative
    assert await until(lambda: gate.level < -200), gate.level
    await state.close()


async def test_request_larger_than_the_bucket_waits_for_a_full_bucket(redis_server):
    from xml_pipeline_llm.shared.state import RedisState

    state = RedisState(redis_server.url, prefix(), lease=5)
    gate = state.gate("big", 10, 60_000)     # 1000 tokens a second
    first = await gate.enter(1000)
    gate.leave(first, 1000)
    start = time.monotonic()
    big = await asyncio.wait_for(gate.enter(10**6), 10)   # takes the whole bucket, no hang, no failure
    assert big.tokens == 60_000
    assert 0.5 < time.monotonic() - start < 5    # 1,000 tokens of refill: about a second
    gate.leave(big, 10)
    await state.close()


async def test_a_large_request_is_not_starved_by_small_ones_from_another_process(redis_server):
    from xml_pipeline_llm.shared.state import RedisState

    p = prefix()
    big_side, small_side = RedisState(redis_server.url, p, lease=5), RedisState(redis_server.url, p, lease=5)
    big_gate, small_gate = big_side.gate("fair", 100, 60_000), small_side.gate("fair", 100, 60_000)
    drained = await big_gate.enter(60_000)            # 1000 tokens a second from an empty bucket
    big_gate.leave(drained, 60_000)
    stop = False

    async def small_stream() -> int:
        n = 0
        while not stop:
            t = await small_gate.enter(50)
            small_gate.leave(t, 50)
            n += 1
        return n

    smalls = asyncio.ensure_future(small_stream())
    await asyncio.sleep(0.3)
    start = time.monotonic()
    big = await asyncio.wait_for(big_gate.enter(1500), 8)   # its claim holds back the small ones
    waited = time.monotonic() - start
    stop = True
    big_gate.leave(big, 1500)
    assert await asyncio.wait_for(smalls, 5) > 3
    assert waited < 4, waited
    await big_side.close()
    await small_side.close()


async def test_rotation_and_cooldowns_are_shared_between_routers(sim, redis_server):
    p = prefix()
    backends = [backend(sim, "xai", "rdx-rr-a"), backend(sim, "xai", "rdx-rr-b")]
    r1 = shared_router(redis_server.url, p, backends, strategy="round-robin")
    r2 = shared_router(redis_server.url, p, backends, strategy="round-robin")
    served = [(await r.complete("grok-4.1", MESSAGES)).backend for r in (r1, r2) * 3]
    assert served == ["rdx-rr-a", "rdx-rr-b"] * 3          # one rotation for both routers
    fo = [backend(sim, "xai", "rdx-cd-a"), backend(sim, "xai", "rdx-cd-b", priority=2)]
    f1 = shared_router(redis_server.url, p, fo, retry_max_delay=30)
    f2 = shared_router(redis_server.url, p, fo, retry_max_delay=30)
    sim.script("rdx-cd-a", [Fault.status(429, retry_after=20)])
    assert (await f1.complete("grok-4.1", MESSAGES)).backend == "rdx-cd-b"
    assert (await f2.complete("grok-4.1", MESSAGES)).backend == "rdx-cd-b"
    assert sim.stats("rdx-cd-a").requests == 1
    left = await f2.cooldowns()
    assert set(left) == {"rdx-cd-a"} and 15 < left["rdx-cd-a"] <= 20
    await f2.state.cool_down("rdx-cd-a", 1)          # a shorter cooldown never shortens a longer one
    assert (await f1.cooldowns())["rdx-cd-a"] > 15


async def test_the_fleets_cooldowns_are_read_at_most_one_interval_late(redis_server):
    from xml_pipeline_llm.shared.state import COOLDOWN_READ_EVERY, RedisState

    p = prefix()
    one, other = RedisState(redis_server.url, p, lease=5), RedisState(redis_server.url, p, lease=5)
    assert await other.cooldowns(["cr-a"]) == {}            # read from Redis, and remembered
    await one.cool_down("cr-a", 5)
    await asyncio.sleep(COOLDOWN_READ_EVERY * 1.5)
    left = await other.cooldowns(["cr-a"])                 # the next read sees the other's cooldown
    assert 4 < left["cr-a"] <= 5
    assert await other.cooldowns(["cr-c"]) == {}
    await other.cool_down("cr-c", 3)
    assert 2 < (await other.cooldowns(["cr-c"]))["cr-c"] <= 3     # its own count at once
    await one.close()
    await other.close()


async def test_an_admission_brings_its_backends_cooldown_with_it(redis_server):
    from xml_pipeline_llm.shared.state import RedisState

    p = prefix()
    one, other = RedisState(redis_server.url, p, lease=5), RedisState(redis_server.url, p, lease=5)
    assert await other.cooldowns(["ce-a"]) == {}            # read, and good for an interval
    await one.cool_down("ce-a", 5)
    gate = other.gate("ce-a", 4, None)
    held = await gate.enter(0)                             # ENTER's answer has the cooldown in it
    left = await other.cooldowns(["ce-a"])
    assert 4 < left["ce-a"] <= 5
    gate.leave(held, 0)
    assert await until(lambda: gate.in_flight == 0)
    await one.close()
    await other.close()


async def test_keys_are_namespaced_expire_and_hold_no_secret(sim, redis_server):
    p = prefix()
    r = shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-ky-a", rate_limit_tpm=50_000),
                                            backend(sim, "xai", "rdx-ky-b")],
                      strategy="round-robin", retry_max_delay=30)
    sim.script("rdx-ky-a", [Fault.status(429, retry_after=10)])
    sim.set_latency("rdx-ky-b", 1.0)
    call = asyncio.ensure_future(r.complete("grok-4.1", MESSAGES, agent_id="keys", thread_id="th"))
    for _ in range(500):                           # rdx-ky-a said 429, rdx-ky-b holds the call
        if sim.stats("rdx-ky-b").in_flight:
            break
        await asyncio.sleep(0.01)
    db = redis_server.client()
    keys = set(db.keys(f"{p}:*"))
    assert {f"{p}:{{rdx-ky-a}}:cool", f"{p}:rr:grok-4.1", f"{p}:{{rdx-ky-a}}:bucket", f"{p}:{{rdx-ky-b}}:slots"} <= keys
    for k in (f"{p}:{{rdx-ky-a}}:cool", f"{p}:rr:grok-4.1", f"{p}:{{rdx-ky-a}}:bucket", f"{p}:{{rdx-ky-b}}:slots"):
        assert db.pttl(k) > 0, k                   # everything but the usage totals expires
    await call
    sim.set_latency("rdx-ky-b", 0)
    dump = json.dumps({k: _value(db, k) for k in db.keys(f"{p}:*")})
    assert all(secret not in dump for secret in FAKE_KEYS.values())
    assert all(k.startswith(f"{p}:") for k in db.keys(f"{p}*"))
    assert db.hget(f"{p}:usage:{{{p}}}:agent:keys", "request_count") == "1"


def _value(db: Any, key: str) -> Any:
    kind = db.type(key)
    if kind == "hash":
        return db.hgetall(key)
    if kind == "zset":
        return db.zrange(key, 0, -1)
    if kind == "set":
        return sorted(db.smembers(key))
    if kind == "stream":
        return [fields for _, fields in db.xrange(key)]
    return db.get(key)


async def test_leases_are_renewed_while_a_call_outlasts_them(sim, redis_server):
    from xml_pipeline_llm.shared.state import RedisState

    p = prefix()
    cfg = load_config({"llm": llm_block(redis_server.url, p, [backend(sim, "xai", "rdx-ln-a", max_concurrent=1)])})
    r1 = LLMRouter(cfg, state=RedisState(redis_server.url, p, lease=0.6))
    r2 = LLMRouter(cfg, state=RedisState(redis_server.url, p, lease=0.6))
    sim.set_latency("rdx-ln-a", 1.6)
    long_call = asyncio.ensure_future(r1.complete("grok-4.1", MESSAGES))
    for _ in range(500):                           # until the call is at the provider
        if sim.stats("rdx-ln-a").in_flight:
            break
        await asyncio.sleep(0.01)
    sim.set_latency("rdx-ln-a", 0)
    start = time.monotonic()
    await r2.complete("grok-4.1", MESSAGES)        # must wait for r1's slot, lease renewed meanwhile
    assert long_call.done() and time.monotonic() - start > 1.0
    assert sim.stats("rdx-ln-a").peak_in_flight == 1


async def test_redis_stopped_and_restarted_during_a_run(sim, caplog):
    server = RedisServer().start()
    try:
        p = prefix()
        r = shared_router(server.url, p, [backend(sim, "xai", "rdx-rs-a", max_concurrent=4, rate_limit_tpm=100_000)])
        caplog.set_level(logging.WARNING, logger="xml_pipeline_llm")

        async def burst(n: int) -> None:
            out = await asyncio.wait_for(asyncio.gather(
                *(r.complete("grok-4.1", MESSAGES, agent_id="restart") for _ in range(n))), 30)
            assert len(out) == n

        await burst(4)
        assert r.get_agent_usage("restart").request_count == 4
        server.stop()
        await burst(6)                                  # Redis away: calls go on with local state
        await burst(6)
        assert r.state.conn.health.down
        warnings = [m for m in caplog.messages if "unreachable" in m]
        assert len(warnings) == 1 and "***" not in warnings[0] and server.url in warnings[0]
        assert r.get_agent_usage("restart").request_count == 16     # this process's own totals meanwhile
        server.start()                                  # same port, empty (no persistence)
        after, deadline = 0, time.monotonic() + 10
        while True:                                     # Redis is tried again once a second
            await asyncio.sleep(0.3)
            await burst(2)
            after += 2
            if not r.state.conn.health.down:
                break
            assert time.monotonic() < deadline, "shared state did not resume"
        assert any("answers again" in m for m in caplog.messages)
        # shared state resumed (whichever Redis call noticed first): the next calls take their
        # slots and tokens in Redis again, and the usage recorded while it was away was written
        # when it came back (the restarted Redis had lost the rest)
        await burst(2)
        after += 2
        db = server.client()
        assert db.exists(f"{p}:{{rdx-rs-a}}:bucket")
        assert not r.state.conn.health.down, [m for m in caplog.messages if "Redis" in m]
        assert r.get_agent_usage("restart").request_count == 12 + after
        assert db.xlen(f"{p}:usage:{{{p}}}:events") == 12 + after
    finally:
        server.stop()


async def test_a_redis_that_hangs_holds_calls_only_until_the_batch_deadline(sim, caplog):
    server = RedisServer().start()
    try:
        p = prefix()
        r = shared_router(server.url, p, [backend(sim, "xai", "rdx-hang", max_concurrent=4, rate_limit_tpm=100_000)])
        caplog.set_level(logging.WARNING, logger="xml_pipeline_llm")
        await r.complete("grok-4.1", MESSAGES, agent_id="hang")
        assert server.proc is not None
        server.proc.send_signal(signal.SIGSTOP)          # up, but answering nothing
        try:
            started = time.monotonic()
            out = await asyncio.wait_for(asyncio.gather(
                *(r.complete("grok-4.1", MESSAGES, agent_id="hang") for _ in range(4))), 30)
            assert len(out) == 4 and time.monotonic() - started < 20      # one 2 s deadline, then local
            assert r.state.conn.health.down
            assert any("unreachable" in m and "TimeoutError" in m for m in caplog.messages)
        finally:
            server.proc.send_signal(signal.SIGCONT)
        deadline = time.monotonic() + 15
        while r.state.conn.health.down:                   # tried again once a second
            assert time.monotonic() < deadline, "shared state did not resume"
            await asyncio.sleep(0.3)
            await r.complete("grok-4.1", MESSAGES, agent_id="hang")
        assert await until(lambda: r.get_agent_usage("hang").request_count >= 6, timeout=10)
        await r.aclose()
    finally:
        server.stop()


# ------------------------------------------------------------------ several processes

async def test_usage_kept_while_redis_was_away_is_written_before_the_next_read():
    # The background thread may be asleep until its next lease renewal (here 20 s away) when
    # usage is kept aside; a read once Redis answers again must still see all of it.
    from xml_pipeline_llm.shared.connection import Conn
    from xml_pipeline_llm.shared.usage import RedisUsageStore
    from xml_pipeline_llm.usage import UsageEvent

    def event(n: int) -> UsageEvent:
        return UsageEvent(time.time(), "away", "", "grok-4.1", "b", "xai", 10, 5, 15, None, 1.0, "ok",
                          call_id=f"c{n}")

    server = RedisServer().start()
    conn = Conn(server.url, lease=60.0, probe=0.2)
    store = RedisUsageStore(server.url, prefix(), conn=conn)
    try:
        store.append_nowait(event(0))              # starts the thread, which then sleeps ~20 s
        store.flush()
        assert store.get("agent", "away").request_count == 1
        server.stop()
        for n in range(1, 6):
            await store.append(event(n))           # kept aside: Redis is away
        assert conn.health.down
        server.start()
        await asyncio.sleep(0.3)                   # past the probe interval
        await store.append(event(6))               # answers again
        assert not conn.health.down
        started = time.monotonic()
        found = store.get("agent", "away")
        assert found is not None and found.request_count == 6    # the restarted Redis lost event 0
        assert time.monotonic() - started < 1.9, "the read waited for its timeout"
    finally:
        await conn.aclose()
        server.stop()


def test_fleet_holds_max_concurrent_and_one_token_bucket(sim, redis_server, fleet):
    fleet_holds_max_concurrent_and_one_token_bucket(sim, redis_server, fleet)


def fleet_holds_max_concurrent_and_one_token_bucket(sim: Any, redis_server: Any, fleet: Fleet) -> None:
    """The test above, on any Redis with a ``url`` (test_redis_cluster.py runs it on a cluster)."""
    workers = fleet.workers(sim, redis_server)[:4]
    p = prefix()
    tpm = 2400                                          # 40 tokens a second
    block = llm_block(redis_server.url, p, [backend(sim, "xai", "rdx-mp-lim", max_concurrent=3, rate_limit_tpm=tpm)])
    sim.set_latency("rdx-mp-lim", 0.05)
    sim.reset_stats("rdx-mp-lim")
    start = time.time() + 0.3
    run_for = 4.0
    replies = fleet.ask([(w, {"op": "run", "llm": block, "model": "grok-4.1", "conc": 4, "max_tokens": 10,
                              "start_at": start, "until": start + run_for}) for w in workers])
    sim.set_latency("rdx-mp-lim", 0)
    assert all(not r["errors"] for r in replies), [r["errors"][:2] for r in replies]
    stats = sim.stats("rdx-mp-lim")
    used = stats.prompt_tokens + stats.completion_tokens
    elapsed = max(r["end"] for r in replies) - start
    assert used == sum(r["tokens"] for r in replies)
    # 16 tasks in 4 processes never had more than 3 calls in flight together ...
    assert stats.peak_in_flight <= 3
    assert stats.peak_in_flight >= 2
    # ... and together used one bucket: its capacity plus the refill, not 4 times that.
    allowed = tpm + tpm / 60 * elapsed
    assert used <= allowed * 1.05 + 100, (used, allowed, elapsed)
    assert used >= tpm * 0.9, (used, allowed)          # and the bucket was really used up
    assert all(r["ok"] > 0 for r in replies)           # every process got its share


def test_slots_of_a_killed_process_come_back_after_the_lease(sim, redis_server, fleet):
    from xml_pipeline_llm.shared.state import RedisState

    victim = fleet.workers(sim, redis_server)[4]
    p = prefix()
    entry = backend(sim, "xai", "rdx-mp-kill", max_concurrent=2)
    block = llm_block(redis_server.url, p, [entry])
    sim.set_latency("rdx-mp-kill", 8)
    victim.send({"op": "hold", "llm": block, "model": "grok-4.1", "backend": "rdx-mp-kill", "k": 2})
    assert victim.read()["held"] == 2
    deadline = time.monotonic() + 10
    while sim.stats("rdx-mp-kill").in_flight < 2 and time.monotonic() < deadline:
        time.sleep(0.02)                         # both calls reached the provider (and sleep there)
    sim.set_latency("rdx-mp-kill", 0)
    db = redis_server.client()
    assert db.zcard(f"{p}:{{rdx-mp-kill}}:slots") == 2

    async def scenario() -> tuple[float, float]:
        r = LLMRouter(load_config({"llm": block}), state=RedisState(redis_server.url, p, lease=LEASE))
        call = asyncio.ensure_future(r.complete("grok-4.1", MESSAGES))
        await asyncio.sleep(LEASE + 0.8)        # longer than a lease: the victim's renewals keep them
        assert not call.done()
        os.kill(victim.pid, signal.SIGKILL)
        killed = time.monotonic()
        await asyncio.wait_for(call, LEASE + 5)
        return time.monotonic() - killed, time.monotonic()

    waited, _ = asyncio.run(scenario())
    assert 0.3 < waited < LEASE + 2.5, waited
    deadline = time.monotonic() + 3
    while db.zcard(f"{p}:{{rdx-mp-kill}}:slots") and time.monotonic() < deadline:
        time.sleep(0.05)
    assert db.zcard(f"{p}:{{rdx-mp-kill}}:slots") == 0        # nothing leaked for good


def test_retry_after_seen_by_one_process_steers_the_others(sim, redis_server, fleet):
    w1, w2, w3 = fleet.workers(sim, redis_server)[:3]
    p = prefix()
    block = llm_block(redis_server.url, p, [backend(sim, "xai", "rdx-mp-ra-a"),
                                            backend(sim, "xai", "rdx-mp-ra-b", priority=2)], retry_max_delay=30)
    sim.script("rdx-mp-ra-a", [Fault.status(429, retry_after=15)])
    one = {"op": "run", "llm": block, "model": "grok-4.1", "n": 1}
    first = fleet.ask([(w1, one)])[0]
    assert first["backends"] == {"rdx-mp-ra-b": 1}          # 429 on rdx-mp-ra-a, then rdx-mp-ra-b
    others = fleet.ask([(w2, one), (w3, one)])
    assert [o["backends"] for o in others] == [{"rdx-mp-ra-b": 1}, {"rdx-mp-ra-b": 1}]
    assert sim.stats("rdx-mp-ra-a").requests == 1           # nobody else tried the cooling backend


def test_fleet_usage_totals_are_exact(sim, redis_server, fleet):
    fleet_usage_totals_are_exact(sim, redis_server, fleet)


def fleet_usage_totals_are_exact(sim: Any, redis_server: Any, fleet: Fleet) -> None:
    """The test above, on any Redis with a ``url`` (test_redis_cluster.py runs it on a cluster)."""
    workers = fleet.workers(sim, redis_server)[:4]
    p = prefix()
    block = llm_block(redis_server.url, p, [backend(sim, "xai", "rdx-mp-use", max_concurrent=50)])
    agents = [f"u{i}" for i in range(5)]
    sim.reset_stats("rdx-mp-use")
    replies = fleet.ask([(w, {"op": "run", "llm": block, "model": "grok-4.1", "n": 40, "conc": 10,
                              "agents": agents}) for w in workers])
    assert sum(r["ok"] for r in replies) == 160
    stats = sim.stats("rdx-mp-use")
    views = fleet.ask([(w, {"op": "usage", "llm": block}) for w in workers])
    assert all(v == views[0] for v in views)            # every process sees the whole fleet
    total = {k: sum(v[k] for v in views[0].values()) for k in ("prompt_tokens", "completion_tokens",
                                                                "request_count", "error_count")}
    assert total == {"prompt_tokens": stats.prompt_tokens, "completion_tokens": stats.completion_tokens,
                     "request_count": 160, "error_count": 0}
    assert sorted(views[0]) == agents and all(v["request_count"] == 32 for v in views[0].values())
    here = shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-mp-use")])
    assert {k: asdict(v) for k, v in here.get_all_usage().items()} == views[0]
    by_backend = here.get_all_usage("backend")["rdx-mp-use"]
    assert by_backend.total_tokens == stats.prompt_tokens + stats.completion_tokens
    assert sum(u.request_count for u in here.get_all_usage("thread").values()) == 160
    # the store the CLI reads (usage --store redis://...): totals and the recent events
    from xml_pipeline_llm.stores import open_store

    store = open_store(redis_server.url, p)
    assert {k: asdict(v) for k, v in store.totals("agent").items()} == views[0]
    events = [e for e in store.events() if e.outcome == "ok"]
    assert len(events) == 160 and sum(e.total_tokens for e in events) == by_backend.total_tokens
    # resetting an agent resets it for the whole fleet
    here.reset_agent_usage("u0")
    after = fleet.ask([(workers[0], {"op": "usage", "llm": block})])[0]
    assert sorted(after) == agents[1:]


async def test_fleet_totals_keep_an_unknown_cost_unknown(sim, redis_server):
    from xml_pipeline_llm.stores import open_store

    p = prefix()
    r = shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-cost")],
                      pricing={"grok-rdxpricetest-paid": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}})
    await r.complete("grok-rdxpricetest-free", MESSAGES, agent_id="unpriced")
    paid = await r.complete("grok-rdxpricetest-paid", MESSAGES, agent_id="mixed")
    await r.complete("grok-rdxpricetest-free", MESSAGES, agent_id="mixed")
    u = r.get_agent_usage("unpriced")
    assert (u.cost_usd, u.unpriced_requests, u.request_count) == (None, 1, 1)
    m = r.get_agent_usage("mixed")
    assert m.cost_usd == pytest.approx(paid.cost_usd) and (m.unpriced_requests, m.request_count) == (1, 2)
    assert r.get_agent_usage("never-seen").cost_usd is None
    store = open_store(redis_server.url, p)                # what the CLI reads
    totals = store.totals("agent")
    assert totals["unpriced"].cost_usd is None and totals["mixed"].cost_usd == pytest.approx(paid.cost_usd)
    assert store.totals("model")["grok-rdxpricetest-free"].cost_usd is None
    await store.close()
    await r.aclose()


def test_a_start_with_redis_and_first_calls_show_no_warning(sim, redis_server):
    # Every warning category shown (-W always), but ResourceWarning: Python hides it unless asked
    # (-X dev), and LiteLLM's pooled HTTP connections are still open when the interpreter exits.
    block = llm_block(redis_server.url, prefix(), [backend(sim, "xai", "rdw-a"),
                                                   backend(sim, "anthropic", "rdw-b")])
    code = textwrap.dedent(f"""
        import asyncio, json
        from xml_pipeline_llm import LLMRouter, load_config
        r = LLMRouter(load_config({{"llm": json.loads({json.dumps(json.dumps(block))})}}))
        async def go():
            print((await r.complete("grok-4.1", {MESSAGES!r}, agent_id="w", max_tokens=10)).content)
            async with r.stream("claude-sonnet-4", {MESSAGES!r}, agent_id="w", max_tokens=10) as s:
                print("".join([d async for d in s]))
            print(r.get_agent_usage("w").request_count)
            await r.aclose()
        asyncio.run(go())
    """)
    proc = subprocess.run([sys.executable, "-W", "always", "-W", "ignore::ResourceWarning", "-c", code],
                          capture_output=True, text=True, timeout=120, env={**os.environ, **FAKE_KEYS})
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip().splitlines()[-1] == "2"
    assert "Warning" not in proc.stderr, proc.stderr[-3000:]


async def test_fleet_usage_totals_carry_cache_and_reasoning_tokens(sim, redis_server):
    from xml_pipeline_llm.stores import open_store

    p = prefix()
    sim.set_usage_details("rdx-cache", cached=0.5, reasoning_tokens=2)
    r = shared_router(redis_server.url, p, [backend(sim, "openai", "rdx-cache")])
    done = await r.complete("gpt-4o", MESSAGES, agent_id="cacher", thread_id="t")
    s = r.stream("gpt-4o", MESSAGES, agent_id="cacher", thread_id="t")
    _ = [d async for d in s]
    assert s.response is not None and s.response.usage == done.usage and done.usage["cached_tokens"] > 0
    details = ("cached_tokens", "cache_write_tokens", "reasoning_tokens")
    want = {k: 2 * done.usage[k] for k in details}
    other = shared_router(redis_server.url, p, [backend(sim, "openai", "rdx-cache")])   # another process
    for u in (r.get_agent_usage("cacher"), other.get_agent_usage("cacher"), other.get_all_usage("model")["gpt-4o"],
              other.get_all_usage("thread")["t"]):
        assert {k: getattr(u, k) for k in details} == want
    assert other.get_agent_usage("cacher").cost_usd == pytest.approx(2 * done.cost_usd)
    store = open_store(redis_server.url, p)                # what the CLI reads
    assert [e.cached_tokens for e in store.events()] == [done.usage["cached_tokens"]] * 2
    assert store.totals("backend")["rdx-cache"].reasoning_tokens == want["reasoning_tokens"]
    await store.close()
    await other.aclose()
    await r.aclose()


# ------------------------------------------------------------------ budgets for a fleet

def test_two_processes_on_one_redis_budget_never_spend_more_than_it_together(sim, redis_server):
    from xml_pipeline_llm.reservation import prompt_tokens

    worst = prompt_tokens("grok-4.1", MESSAGES) + 20
    p = prefix()
    sim.reset_stats("rdb-a")
    block = llm_block(redis_server.url, p, [backend(sim, "xai", "rdb-a")],
                      budgets=[{"scope": "agent", "max_tokens": 30 * worst, "window": "1d"}])
    code = textwrap.dedent(f"""
        import asyncio, json
        from xml_pipeline_llm import BudgetExceededError, LLMRouter, load_config
        r = LLMRouter(load_config({{"llm": json.loads({json.dumps(json.dumps(block))})}}))
        async def go():
            res = await asyncio.gather(*(r.complete("grok-4.1", {MESSAGES!r}, agent_id="fleet", max_tokens=20)
                                         for _ in range(40)), return_exceptions=True)
            bad = [repr(x) for x in res if isinstance(x, BaseException) and not isinstance(x, BudgetExceededError)]
            print(json.dumps({{"ok": sum(not isinstance(x, BaseException) for x in res), "bad": bad}}))
            await r.aclose()
        asyncio.run(go())
    """)
    env = {**os.environ, **FAKE_KEYS}
    procs = [subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                              text=True, env=env) for _ in range(2)]
    outs = [proc.communicate(timeout=120) for proc in procs]
    assert all(proc.returncode == 0 for proc in procs), [err[-2000:] for _, err in outs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outs]
    assert all(not r["bad"] for r in results), results
    stats = sim.stats("rdb-a")
    assert stats.requests == sum(r["ok"] for r in results) >= 30          # the pair: what fits, no more
    assert stats.prompt_tokens + stats.completion_tokens <= 30 * worst
    r = shared_router(redis_server.url, p, [backend(sim, "xai", "rdb-a")],
                      budgets=[{"scope": "agent", "max_tokens": 30 * worst, "window": "1d"}])
    status = r.budget_status("agent", "fleet")                           # a third process sees the spend
    assert status.used_tokens == stats.prompt_tokens + stats.completion_tokens
    assert status.reserved_tokens == 0 and status.resets_at is not None


async def test_a_fleet_budget_fires_exhausted_once_across_processes_at_its_first_refusal(sim, redis_server):
    from xml_pipeline_llm import BudgetExceededError
    from xml_pipeline_llm.reservation import prompt_tokens

    worst = prompt_tokens("grok-4.1", MESSAGES) + 20
    p = prefix()
    rules = [{"scope": "agent", "max_tokens": worst + 5, "window": "1d", "warn_at": [50, 80]}]
    routers = [shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-a")], budgets=rules)
               for _ in range(2)]            # two routers: their own memory, one budget in Redis
    events: list[Any] = []
    for r in routers:
        r.on_budget(events.append)
    await routers[0].complete("grok-4.1", MESSAGES, agent_id="fleet-x", max_tokens=20)
    for i in range(6):
        with pytest.raises(BudgetExceededError):
            await routers[i % 2].complete("grok-4.1", MESSAGES, agent_id="fleet-x", max_tokens=20)
    exhausted = [e for e in events if e.severity == "exhausted"]
    used = routers[1].budget_status("agent", "fleet-x").used_tokens
    assert len(exhausted) == 1 and used < worst + 5
    assert (exhausted[0].percent, exhausted[0].used, exhausted[0].limit, exhausted[0].unit) == (
        100, used, worst + 5, "tokens")
    routers[1].reset_budget("agent", "fleet-x")      # spend back to zero: it can be exhausted again
    await routers[1].complete("grok-4.1", MESSAGES, agent_id="fleet-x", max_tokens=20)
    for i in range(4):
        with pytest.raises(BudgetExceededError):
            await routers[i % 2].complete("grok-4.1", MESSAGES, agent_id="fleet-x", max_tokens=20)
    assert [e.severity for e in events].count("exhausted") == 2
    for r in routers:
        await r.aclose()


async def test_a_fleet_budget_spent_to_its_limit_fires_exhausted_once(sim, redis_server):
    from xml_pipeline_llm import BudgetExceededError
    from xml_pipeline_llm.reservation import prompt_tokens

    estimate = prompt_tokens("grok-4.1", MESSAGES)
    p = prefix()      # no max_tokens and default_max_tokens 1: the call uses more than it reserved
    r = shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-b")], default_max_tokens=1,
                      budgets=[{"scope": "agent", "max_tokens": estimate + 1}])
    events: list[Any] = []
    r.on_budget(events.append)
    await r.complete("grok-4.1", MESSAGES, agent_id="spender")
    assert await until(lambda: any(e.severity == "exhausted" for e in events))
    assert [e.percent for e in events] == [75, 90, 95, 100]
    for _ in range(3):
        with pytest.raises(BudgetExceededError):
            await r.complete("grok-4.1", MESSAGES, agent_id="spender")
    assert [e.severity for e in events].count("exhausted") == 1
    await r.aclose()


async def test_calls_cancelled_while_admitted_give_back_their_slot_and_budget_hold(sim, redis_server):
    import random

    import redis

    p = prefix()
    rules = [{"scope": "agent", "max_tokens": 10**9, "window": "1d"}]
    r = shared_router(redis_server.url, p, [backend(sim, "xai", "rdc-a", max_concurrent=3,
                                                    rate_limit_tpm=1_000_000)], budgets=rules)
    sim.reset_stats("rdc-a")
    sim.set_latency("rdc-a", 0.02)
    rng = random.Random(11)
    try:
        tasks = []
        for _ in range(80):       # cancelled at random steps: mid RESERVE/ENTER, waiting, or sending
            tasks.append(asyncio.ensure_future(r.complete("grok-4.1", MESSAGES, agent_id="cx", max_tokens=20)))
            for _ in range(rng.randrange(4)):
                await asyncio.sleep(0)
            if rng.random() < 0.6:
                rng.choice(tasks).cancel()
        results = await asyncio.gather(*tasks, return_exceptions=True)
    finally:
        sim.set_latency("rdc-a", 0)
    served = [x for x in results if not isinstance(x, BaseException)]
    assert served and any(isinstance(x, asyncio.CancelledError) for x in results)
    assert await until(lambda: r.budget_status("agent", "cx").reserved_tokens == 0)
    stats = sim.stats("rdc-a")          # charged: what was served (a call cancelled after its answer
    used = r.budget_status("agent", "cx").used_tokens         # came back is charged too), never more
    assert sum(x.usage["total_tokens"] for x in served) <= used <= stats.prompt_tokens + stats.completion_tokens
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    assert await until(lambda: client.zcard(f"{p}:{{rdc-a}}:slots") == 0)
    client.close()
    await r.aclose()


async def test_event_log_entries_of_either_format_read_back_the_same(redis_server):
    import redis

    from xml_pipeline_llm.stores import open_store
    from xml_pipeline_llm.usage import make_event

    p = prefix()
    store = open_store(redis_server.url, p)
    new = make_event(agent_id="now", thread_id="t", model="grok-4.1", backend="b", provider="xai",
                     usage={"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}, cost_usd=None,
                     latency_ms=12.5, outcome="ok", call_id="c2", metadata={"team": "a", "n": 2})
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    client.xadd(f"{p}:usage:{{{p}}}:events", {      # an entry as versions before 0.3 wrote it
        "timestamp": repr(new.timestamp - 1), "agent_id": "before", "thread_id": "t", "model": "grok-4.1",
        "backend": "b", "provider": "xai", "prompt_tokens": "3", "completion_tokens": "4", "total_tokens": "7",
        "cost_usd": "", "latency_ms": "12.5", "outcome": "ok", "requested_model": "grok-4.1", "call_id": "c1",
        "metadata": '{"n":2,"team":"a"}'})
    await store.append(new)
    old, got = list(store.events())
    assert got == new and got.metadata == {"team": "a", "n": 2} and got.cost_usd is None
    assert old == type(new)(**{**new.__dict__, "agent_id": "before", "timestamp": new.timestamp - 1})
    client.close()
    await store.close()


def test_totals_kept_under_the_key_names_of_version_0_1_are_moved_once(sim, redis_server, caplog):
    import redis

    from xml_pipeline_llm.stores import open_store

    p = prefix()
    client = redis.Redis.from_url(redis_server.url, decode_responses=True)
    for group, name in (("agent", "veteran"), ("model", "grok-4.1"), ("backend", "rdx-old"), ("thread", "-")):
        client.hset(f"{p}:usage:{group}:{name}", mapping={       # as 0.1's ADD wrote them
            "prompt_tokens": 100, "completion_tokens": 50, "total_tokens": 150, "request_count": 3,
            "error_count": 1, "cost_usd": "0.25"})
        client.sadd(f"{p}:usage:{group}", name)
    caplog.set_level(logging.INFO, logger="xml_pipeline_llm")
    r = shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-old")])
    assert "moved 4 usage totals" in caplog.text and "key names of version 0.1" in caplog.text
    got = r.get_agent_usage("veteran")
    assert (got.total_tokens, got.request_count, got.error_count, got.cost_usd) == (150, 3, 1, 0.25)
    assert not client.keys(f"{p}:usage:agent*")                  # nothing left under the old names
    again = shared_router(redis_server.url, p, [backend(sim, "xai", "rdx-old")])     # a second process
    assert again.get_agent_usage("veteran").total_tokens == 150                     # not counted twice
    store = open_store(redis_server.url, p)
    assert store.totals("backend")["rdx-old"].request_count == 3
    client.close()
