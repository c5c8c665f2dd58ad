"""The gateway (``xml-pipeline-llm serve``) over HTTP, with real clients against a real server process.

One server runs for the module (its start costs LiteLLM's import); it calls
the session's provider simulator, which the tests script from here.  The
official ``openai`` SDK (async and sync) and raw HTTP talk to it; processes
that must start or stop differently (SIGTERM, two workers on Redis, refusals
at start) get servers of their own.
"""

from __future__ import annotations

import asyncio
import http.client
import json
import os
import random
import re
import shutil
import signal
import subprocess
import sys
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import aiohttp
import openai
import pytest
import yaml
from conftest import FAKE_KEYS, backend

from xml_pipeline_llm.simulator import Fault

ROOT = Path(__file__).resolve().parent.parent
KEYS = {"GW_ALICE_KEY": "gw-alice-7f3a9c-secret", "GW_TEAM_KEY": "gw-team-51be0d-secret",
        "GW_OPS_KEY": "gw-ops-a8e2c4-secret"}
ALICE, TEAM, OPS = KEYS["GW_ALICE_KEY"], KEYS["GW_TEAM_KEY"], KEYS["GW_OPS_KEY"]
MESSAGES = [{"role": "user", "content": "say hello to the gateway please"}]
TOOLS = [{"type": "function", "function": {"name": "lookup", "description": "look something up",
                                           "parameters": {"type": "object",
                                                          "properties": {"input": {"type": "string"}}}}}]


class Server:
    """``python -m xml_pipeline_llm.cli serve`` in a subprocess; its output is kept (to check for secrets)."""

    def __init__(self, config: Path, *args: str, env: dict[str, str] | None = None) -> None:
        self.env = {**os.environ, **FAKE_KEYS, **KEYS, "PYTHONPATH": str(ROOT), **(env or {})}
        self.proc = subprocess.Popen([sys.executable, "-m", "xml_pipeline_llm.cli", "serve", "-c", str(config),
                                      "--port", "0", *args], env=self.env, cwd=config.parent,
                                     stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                     start_new_session=True)
        self.output: list[str] = []
        self.port = 0
        self._listening = threading.Event()
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self.output.append(line)
            found = re.search(r"listening on http://[^:]+:(\d+)/v1", line)
            if found:
                self.port = int(found.group(1))
                self._listening.set()

    def wait_ready(self, timeout: float = 60.0) -> Server:
        """Until the port is known and ``/healthz`` answers 200 (polling)."""
        deadline = time.monotonic() + timeout
        while not self._listening.wait(0.05):
            if self.proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the gateway did not start:\n" + "".join(self.output))
        while time.monotonic() < deadline:
            try:
                status, _, _ = request(self.port, "GET", "/healthz")
                if status == 200:
                    return self
            except OSError:
                pass
            time.sleep(0.05)
        raise RuntimeError("the gateway did not answer /healthz:\n" + "".join(self.output))

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def wait(self, timeout: float = 60.0) -> int:
        """The exit status of a server that stops by itself (a refusal at start)."""
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code

    def stop(self, sig: int = signal.SIGTERM, timeout: float = 30.0) -> int:
        """Signal the server (SIGKILL: its whole process group, workers included); its exit status."""
        if sig == signal.SIGKILL:
            try:
                os.killpg(self.proc.pid, signal.SIGKILL)
            except (ProcessLookupError, PermissionError):
                pass
        elif self.proc.poll() is None:
            self.proc.send_signal(sig)
        code = self.proc.wait(timeout)
        self._reader.join(5)
        return code


def request(port: int, method: str, path: str, body: bytes | None = None,
            headers: dict[str, str] | None = None) -> tuple[int, dict[str, str], bytes]:
    """One raw HTTP request (http.client): status, lower-cased headers, body."""
    conn = http.client.HTTPConnection("127.0.0.1", port, timeout=30)
    try:
        conn.request(method, path, body=body, headers=headers or {})
        resp = conn.getresponse()
        return resp.status, {k.lower(): v for k, v in resp.getheaders()}, resp.read()
    finally:
        conn.close()


def get_json(port: int, path: str, key: str | None = OPS) -> tuple[int, Any]:
    status, _, body = request(port, "GET", path, headers={"Authorization": f"Bearer {key}"} if key else {})
    return status, json.loads(body)


def write_config(path: Path, sim: Any, gateway: dict[str, Any], backends: list[dict[str, Any]],
                 **llm: Any) -> Path:
    block = {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 10, **llm, "gateway": gateway,
             "backends": backends}
    path.write_text(yaml.safe_dump({"llm": block}))
    return path


@pytest.fixture(scope="module")
def server(sim: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    """The module's gateway: keys for alice (fixed agent, grok models), a team ("*") and ops (admin)."""
    cfg = write_config(
        tmp_path_factory.mktemp("gw") / "organism.yaml", sim,
        {"max_body_mb": 1, "keys": [
            {"key_env": "GW_ALICE_KEY", "agent": "alice", "models": ["grok-*", "smart"]},
            {"key_env": "GW_TEAM_KEY", "agent": "*", "metadata": {"org_id": "acme"}},
            {"key_env": "GW_OPS_KEY", "admin": True}]},
        [backend(sim, "xai", "gw-x"), backend(sim, "xai", "gw-dc", supported_models=["dc-model"]),
         backend(sim, "openai", "gw-o", supported_models=["gpt-4o"])],
        retries=2, models={"smart": ["grok-4.1", "gpt-4o"]},
        budgets=[{"scope": "agent", "match": "capped-*", "max_tokens": 60},
                 {"scope": "agent", "match": "windowed-*", "max_tokens": 60, "window": "1h"},
                 {"scope": "agent", "match": "dc-*", "max_tokens": 10_000_000}],
        telemetry={"group_by_metadata": ["org_id"]})
    srv = Server(cfg).wait_ready()
    yield srv
    code = srv.stop()
    output = "".join(srv.output)
    for secret in [*KEYS.values(), *FAKE_KEYS.values()]:
        assert secret not in output, "a key appeared in the gateway's output"
    assert code == 0, output


def aclient(srv: Server, key: str = ALICE, **kw: Any) -> openai.AsyncOpenAI:
    return openai.AsyncOpenAI(base_url=srv.url, api_key=key, max_retries=0, **kw)



async def test_anthropic_and_ollama_backends_answer_and_stream(sim: Any, tmp_path: Path) -> None:
    """Anthropic's call setup runs on the worker's loop, Ollama's on its thread pool: both answer the same way."""
    cfg = write_config(tmp_path / "organism.yaml", sim, {},
                       [backend(sim, "anthropic", "gw-an"), backend(sim, "ollama", "gw-ol")])
    srv = Server(cfg).wait_ready()
    try:
        client = aclient(srv, "none")
        for model, name in (("claude-sonnet-4-5", "gw-an"), ("llama3", "gw-ol")):
            reply = await client.chat.completions.create(model=model, messages=MESSAGES,
                                                         extra_headers={"X-Agent-Id": f"who-{name}"})
            assert reply.choices[0].message.content == f"Hello from {name}: say hello to the gateway"
            text, usage = "", None
            async for chunk in await client.chat.completions.create(
                    model=model, messages=MESSAGES, stream=True, stream_options={"include_usage": True},
                    extra_headers={"X-Agent-Id": f"who-{name}"}):
                text += "".join(c.delta.content or "" for c in chunk.choices)
                usage = chunk.usage or usage
            assert text == reply.choices[0].message.content
            assert usage is not None and usage.total_tokens == reply.usage.total_tokens
            booked = get_json(srv.port, "/v1/usage", key=None)[1]["usage"][f"who-{name}"]
            assert booked["request_count"] == 2 and booked["total_tokens"] == 2 * usage.total_tokens
        assert srv.stop() == 0, "".join(srv.output)
    finally:
        srv.stop(signal.SIGKILL)


# ------------------------------------------------------------------ the OpenAI SDK

async def test_async_sdk_complete_stream_and_headers(server: Server, sim: Any) -> None:
    client = aclient(server)
    raw = await client.chat.completions.with_raw_response.create(model="grok-4.1", messages=MESSAGES)
    reply = raw.parse()
    assert reply.id.startswith("chatcmpl-") and reply.object == "chat.completion"
    assert reply.model == "grok-4.1"
    assert reply.choices[0].message.content == "Hello from gw-x: say hello to the gateway"
    assert reply.choices[0].finish_reason == "stop"
    assert reply.usage is not None and reply.usage.total_tokens == reply.usage.prompt_tokens + 8
    assert reply.usage.prompt_tokens_details.cached_tokens == 0
    assert reply.usage.completion_tokens_details.reasoning_tokens == 0
    assert raw.headers["x-request-id"] and raw.headers["x-xpl-backend"] == "gw-x"
    assert raw.headers["x-xpl-attempts"] == "1"
    assert "x-xpl-cost-usd" not in raw.headers            # no price for grok-4.1 here: cost unknown

    chunks = [c async for c in await client.chat.completions.create(
        model="grok-4.1", messages=MESSAGES, stream=True, stream_options={"include_usage": True})]
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == "Hello from gw-x: say hello to the gateway"
    assert all(c.object == "chat.completion.chunk" and c.id == chunks[0].id for c in chunks)
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == ["stop"]
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == 8
    # without include_usage: no usage chunk, but the usage is recorded all the same
    before = get_json(server.port, "/v1/usage")[1]["usage"]["alice"]["request_count"]
    chunks = [c async for c in await client.chat.completions.create(model="grok-4.1", messages=MESSAGES,
                                                                    stream=True)]
    assert all(c.usage is None for c in chunks) and all(c.choices for c in chunks)
    assert get_json(server.port, "/v1/usage")[1]["usage"]["alice"]["request_count"] == before + 1


async def test_retries_and_failover_show_in_attempts_and_alias_answers_with_the_model_that_answered(
        server: Server, sim: Any) -> None:
    client = aclient(server)
    sim.script("gw-x", [Fault.status(500)])
    raw = await client.chat.completions.with_raw_response.create(model="grok-4.1", messages=MESSAGES)
    assert raw.headers["x-xpl-attempts"] == "2"
    sim.script("gw-x", [Fault.status(404)])            # grok's only backend lacks it: the alias moves on
    reply = await client.chat.completions.create(model="smart", messages=MESSAGES)
    assert reply.model == "gpt-4o" and reply.choices[0].message.content.startswith("Hello from gw-o")


async def test_cost_header_when_the_model_has_a_price(server: Server) -> None:
    raw = await aclient(server, key=TEAM).chat.completions.with_raw_response.create(model="gpt-4o",
                                                                                    messages=MESSAGES)
    assert raw.headers["x-xpl-backend"] == "gw-o" and float(raw.headers["x-xpl-cost-usd"]) > 0


async def test_tools_in_openai_form_streamed_and_not(server: Server) -> None:
    client = aclient(server)
    reply = await client.chat.completions.create(model="grok-4.1", messages=MESSAGES, tools=TOOLS)
    call = reply.choices[0].message.tool_calls[0]
    assert reply.choices[0].finish_reason == "tool_calls" and call.type == "function"
    assert call.function.name == "lookup" and json.loads(call.function.arguments) == {
        "input": "say hello to the gateway please"}
    parts: dict[int, dict[str, str]] = {}
    finish = []
    async for chunk in await client.chat.completions.create(model="grok-4.1", messages=MESSAGES, tools=TOOLS,
                                                            stream=True):
        for tc in chunk.choices[0].delta.tool_calls or []:
            slot = parts.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            slot["id"] += tc.id or ""
            slot["name"] += (tc.function.name or "") if tc.function else ""
            slot["arguments"] += (tc.function.arguments or "") if tc.function else ""
        finish += [chunk.choices[0].finish_reason] if chunk.choices[0].finish_reason else []
    assert finish == ["tool_calls"] and parts[0]["name"] == "lookup" and parts[0]["id"]
    assert json.loads(parts[0]["arguments"]) == {"input": "say hello to the gateway please"}


def test_sync_sdk_extra_body_and_headers_book_agent_thread_and_metadata(server: Server, sim: Any) -> None:
    client = openai.OpenAI(base_url=server.url, api_key=TEAM, max_retries=0)
    reply = client.chat.completions.create(
        model="grok-4.1", messages=MESSAGES, max_tokens=3,
        extra_body={"metadata": {"org_id": "not-acme", "ticket": "T-1"}, "retries": 0, "timeout": 5},
        extra_headers={"X-Agent-Id": "writer", "X-Thread-Id": "gw-thread-1", "X-Metadata-Team": "blue",
                       "X-Priority": "high"})
    assert reply.choices[0].finish_reason == "length" and reply.usage.completion_tokens == 3
    assert sim.stats("gw-x").last_request.json["max_tokens"] == 3
    usage = get_json(server.port, "/v1/usage?by=thread")[1]
    assert usage["by"] == "thread" and usage["usage"]["gw-thread-1"]["request_count"] == 1
    assert get_json(server.port, "/v1/usage?by=agent")[1]["usage"]["writer"]["request_count"] == 1
    # the key's metadata wins over the caller's
    by_org = get_json(server.port, "/v1/usage?by=metadata.org_id")[1]["usage"]
    assert by_org["acme"]["request_count"] >= 1 and "not-acme" not in by_org
    # under a "*" key the body's user names the agent
    client.chat.completions.create(model="grok-4.1", messages=MESSAGES, user="reviewer")
    assert get_json(server.port, "/v1/usage")[1]["usage"]["reviewer"]["request_count"] == 1
    # under a fixed-agent key the body's user is ignored, and naming another agent is 403
    alice = openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0)
    before = get_json(server.port, "/v1/usage")[1]["usage"].get("alice", {}).get("request_count", 0)
    alice.chat.completions.create(model="grok-4.1", messages=MESSAGES, user="mallory")
    usage = get_json(server.port, "/v1/usage")[1]["usage"]
    assert usage["alice"]["request_count"] == before + 1 and "mallory" not in usage
    with pytest.raises(openai.PermissionDeniedError):
        alice.chat.completions.create(model="grok-4.1", messages=MESSAGES, extra_headers={"X-Agent-Id": "bob"})


async def test_errors_are_openai_errors_the_sdk_raises_as_its_own_classes(server: Server, sim: Any) -> None:
    client = aclient(server)
    with pytest.raises(openai.NotFoundError) as nf:
        await aclient(server, key=TEAM).chat.completions.create(model="no-such-model", messages=MESSAGES)
    assert nf.value.code == "model_not_found" and "no-such-model" in nf.value.message
    with pytest.raises(openai.AuthenticationError) as unknown:
        await aclient(server, key="not-a-key").chat.completions.create(model="grok-4.1", messages=MESSAGES)
    assert "not-a-key" not in unknown.value.response.text
    with pytest.raises(openai.BadRequestError) as priority:
        await client.chat.completions.create(model="grok-4.1", messages=MESSAGES,
                                             extra_headers={"X-Priority": "urgent"})
    assert "priority" in priority.value.message
    with pytest.raises(openai.PermissionDeniedError) as denied:      # alice may not use gpt-4o
        await client.chat.completions.create(model="gpt-4o", messages=MESSAGES)
    assert denied.value.code == "model_not_allowed"
    with pytest.raises(openai.BadRequestError) as bad:               # an argument that bypasses the config
        await client.chat.completions.create(model="grok-4.1", messages=MESSAGES, extra_body={"api_key": "x"})
    assert "api_key" in bad.value.message and bad.value.code == "bad_request"

    sim.script("gw-x", [Fault.status(429, retry_after=0.3)] * 3)
    with pytest.raises(openai.RateLimitError) as limited:
        await client.chat.completions.create(model="grok-4.1", messages=MESSAGES)
    assert limited.value.code == "rate_limit_exceeded"
    assert int(limited.value.response.headers["retry-after"]) >= 1

    sim.script("gw-x", [Fault.status(500)] * 3)
    with pytest.raises(openai.InternalServerError) as failed:
        await client.chat.completions.create(model="grok-4.1", messages=MESSAGES)
    assert failed.value.status_code == 502 and failed.value.code == "provider_error"

    sim.script("gw-x", [Fault.timeout(2.0)])
    with pytest.raises(openai.InternalServerError) as slow:
        await client.chat.completions.create(model="grok-4.1", messages=MESSAGES,
                                             extra_body={"timeout": 0.3, "retries": 0})
    assert slow.value.status_code == 504

    team = aclient(server, key=TEAM)
    with pytest.raises(openai.RateLimitError) as broke:              # capped-* agents: 60 tokens
        await team.chat.completions.create(model="grok-4.1", messages=MESSAGES, max_tokens=100,
                                           extra_headers={"X-Agent-Id": "capped-1"})
    assert broke.value.code == "budget_exceeded" and "retry-after" not in broke.value.response.headers
    with pytest.raises(openai.RateLimitError) as hourly:             # windowed-* agents: 60 tokens an hour
        await team.chat.completions.create(model="grok-4.1", messages=MESSAGES, max_tokens=100,
                                           extra_headers={"X-Agent-Id": "windowed-1"})
    assert hourly.value.code == "budget_exceeded"
    assert 1 <= int(hourly.value.response.headers["retry-after"]) <= 3600


def test_malformed_bodies_and_oversized_ones_over_raw_http(server: Server) -> None:
    auth = {"Authorization": f"Bearer {ALICE}", "Content-Type": "application/json"}
    for body, what in [(b'{"model": "grok-4.1", "messages": [', "malformed JSON"), (b"[1, 2]", "JSON object"),
                       (b"", "empty request body"), (b'{"model": "grok-4.1"}', "messages"),
                       (b'{"model": 7, "messages": []}', "model"),
                       (b'{"model": "grok-4.1", "messages": [{"role": "robot", "content": "x"}]}', "role"),
                       (b'{"model": "grok-4.1", "messages": [{"role": "user", "content": "x"}], "stream": "yes"}',
                        "stream"),
                       (b'{"model": "grok-4.1", "messages": [{"role": "user", "content": "x"}], "n": 2}', "n:")]:
        status, headers, raw = request(server.port, "POST", "/v1/chat/completions", body, auth)
        err = json.loads(raw)["error"]
        assert status == 400 and err["type"] == "invalid_request_error", raw
        assert what in err["message"] and set(err) == {"message", "type", "param", "code"}
        assert "Traceback" not in raw.decode() and headers["x-request-id"]
    big = json.dumps({"model": "grok-4.1", "messages": [{"role": "user", "content": "x" * 1_200_000}]}).encode()
    status, _, raw = request(server.port, "POST", "/v1/chat/completions", big, auth)
    assert status == 413 and json.loads(raw)["error"]["code"] == "request_too_large"
    status, _, raw = request(server.port, "GET", "/v1/nowhere")
    assert status == 404 and json.loads(raw)["error"]["message"]
    status, _, _ = request(server.port, "GET", "/v1/chat/completions")
    assert status == 405


def test_admin_endpoints_health_and_models(server: Server) -> None:
    assert get_json(server.port, "/v1/usage", key=None)[0] == 401
    assert get_json(server.port, "/v1/usage", key="wrong")[0] == 401
    assert get_json(server.port, "/v1/budgets", key=ALICE)[0] == 403
    assert request(server.port, "GET", "/metrics", headers={"Authorization": f"Bearer {TEAM}"})[0] == 403
    status, body = get_json(server.port, "/v1/usage?by=nonsense")
    assert status == 400 and "nonsense" in body["error"]["message"]
    status, body = get_json(server.port, "/v1/usage?by=model")
    assert status == 200 and body["by"] == "model"
    status, body = get_json(server.port, "/v1/budgets")
    assert status == 200 and isinstance(body["budgets"], list)
    status, headers, text = request(server.port, "GET", "/metrics", headers={"Authorization": f"Bearer {OPS}"})
    assert status == 200 and headers["content-type"].startswith("text/plain")
    assert b"gen_ai_client_token_usage" in text
    assert request(server.port, "GET", "/healthz")[0] == 200
    status, _, body = request(server.port, "GET", "/readyz")
    assert status == 200 and json.loads(body)["status"] == "ready"
    ids = {m.id for m in openai.OpenAI(base_url=server.url, api_key=OPS).models.list().data}
    assert {"smart", "grok-4.1", "gpt-4o", "dc-model"} <= ids
    alice_ids = {m.id for m in openai.OpenAI(base_url=server.url, api_key=ALICE).models.list().data}
    assert "gpt-4o" not in alice_ids and {"smart", "grok-4.1"} <= alice_ids
    alice = openai.OpenAI(base_url=server.url, api_key=ALICE, max_retries=0)
    assert alice.models.retrieve("smart").owned_by == "alias"
    with pytest.raises(openai.NotFoundError):
        alice.models.retrieve("gpt-4o")


async def test_clients_that_go_away_leave_nothing_in_flight_or_reserved(server: Server, sim: Any) -> None:
    """30 clients disconnect at random points (before the answer, during a stream): 0 in flight, 0 reserved."""
    sim.set_latency("gw-dc", 0.4, per_chunk=0.05)
    rng = random.Random(24)
    url = f"http://127.0.0.1:{server.port}/v1/chat/completions"
    headers = {"Authorization": f"Bearer {TEAM}"}

    async def client(i: int, session: aiohttp.ClientSession) -> None:
        stream = i % 2 == 0
        body = {"model": "dc-model", "messages": MESSAGES, "max_tokens": 50, "stream": stream}
        task = asyncio.ensure_future(_read(session, url, body, {**headers, "X-Agent-Id": f"dc-{i % 3}"},
                                           chunks=rng.randint(1, 4) if stream else None))
        if not stream:
            await asyncio.sleep(rng.uniform(0.0, 0.35))     # before the provider answers
            task.cancel()
        try:
            await task
        except asyncio.CancelledError:
            pass

    try:
        # force_close: a cancelled request closes its connection, as a client that goes away does
        async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(force_close=True)) as session:
            await asyncio.gather(*(client(i, session) for i in range(30)))

        def settled() -> bool:
            budgets = [b for b in get_json(server.port, "/v1/budgets")[1]["budgets"]
                       if (b["key"] or "").startswith("dc-")]
            return (sim.stats("gw-dc").in_flight == 0 and len(budgets) == 3
                    and all(b["reserved_tokens"] == 0 and b["reserved_usd"] == 0 for b in budgets))

        assert await _until(settled, 20), (sim.stats("gw-dc"), get_json(server.port, "/v1/budgets"))
        # streams cut after content were charged what they received
        usage = get_json(server.port, "/v1/usage?by=backend")[1]["usage"]
        assert usage["gw-dc"]["completion_tokens"] > 0
        assert sim.stats("gw-dc").requests >= 15
        # and the backend takes new calls
        reply = await aclient(server, key=TEAM).chat.completions.create(model="dc-model", messages=MESSAGES)
        assert reply.choices[0].message.content
    finally:
        sim.set_latency("gw-dc", 0.0)


async def _read(session: aiohttp.ClientSession, url: str, body: dict[str, Any], headers: dict[str, str],
                chunks: int | None) -> None:
    async with session.post(url, json=body, headers=headers) as resp:
        if chunks is None:
            await resp.read()
            return
        seen = 0
        async for _ in resp.content.iter_any():
            seen += 1
            if seen >= chunks:
                resp.close()                          # the client goes away mid-stream
                return


async def _until(condition: Any, timeout: float) -> bool:
    deadline = time.monotonic() + timeout
    while True:
        if await asyncio.to_thread(condition):
            return True
        if time.monotonic() > deadline:
            return False
        await asyncio.sleep(0.1)


# ------------------------------------------------------------------ processes of their own

def test_sigterm_lets_the_call_in_flight_finish_then_exits_0(sim: Any, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "organism.yaml", sim, {}, [backend(sim, "xai", "gw-drain")],
                       usage_store=f"sqlite:///{tmp_path / 'usage.db'}")
    srv = Server(cfg, "--grace", "20").wait_ready()
    sim.set_latency("gw-drain", 1.5)
    try:
        result: dict[str, Any] = {}

        def call() -> None:
            result["reply"] = request(srv.port, "POST", "/v1/chat/completions",
                                      json.dumps({"model": "grok-4.1", "messages": MESSAGES}).encode())

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 10
        while sim.stats("gw-drain").in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        assert sim.stats("gw-drain").in_flight == 1
        srv.proc.send_signal(signal.SIGTERM)
        caller.join(30)
        status, _, body = result["reply"]
        assert status == 200 and json.loads(body)["choices"][0]["message"]["content"].startswith("Hello")
        assert srv.stop() == 0, "".join(srv.output)
        with pytest.raises(OSError):                                   # no longer listening
            request(srv.port, "GET", "/healthz")
        import sqlite3

        with sqlite3.connect(tmp_path / "usage.db") as db:                # the ledger was flushed
            assert db.execute("select count(*) from usage_events where outcome = 'ok'").fetchone()[0] == 1
    finally:
        sim.set_latency("gw-drain", 0.0)
        srv.stop(signal.SIGKILL)


def test_sigterm_cancels_what_outlives_the_grace_and_still_exits_0(sim: Any, tmp_path: Path) -> None:
    cfg = write_config(tmp_path / "organism.yaml", sim, {}, [backend(sim, "xai", "gw-grace")])
    srv = Server(cfg, "--grace", "0.5").wait_ready()
    sim.set_latency("gw-grace", 30.0)
    try:
        result: dict[str, Any] = {}

        def call() -> None:
            try:
                result["reply"] = request(srv.port, "POST", "/v1/chat/completions", json.dumps(
                    {"model": "grok-4.1", "messages": MESSAGES, "stream": True}).encode())
            except Exception as exc:           # the connection closed under it: what a client sees
                result["error"] = exc

        caller = threading.Thread(target=call)
        caller.start()
        deadline = time.monotonic() + 10
        while sim.stats("gw-grace").in_flight == 0 and time.monotonic() < deadline:
            time.sleep(0.02)
        started = time.monotonic()
        assert srv.stop(timeout=20) == 0, "".join(srv.output)
        assert time.monotonic() - started < 15
        caller.join(10)
        assert not caller.is_alive() and ("error" in result or result["reply"][0] != 200)
    finally:
        sim.set_latency("gw-grace", 0.0)
        srv.stop(signal.SIGKILL)


def test_refusals_at_start_name_the_fix(sim: Any, tmp_path: Path) -> None:
    open_cfg = write_config(tmp_path / "organism.yaml", sim, {}, [backend(sim, "xai", "gw-refuse")])
    for args, what in [(["--host", "0.0.0.0"], "without keys"), (["--workers", "2"], "llm.shared_state")]:
        srv = Server(open_cfg, *args)
        assert srv.wait() == 1
        text = "".join(srv.output)
        assert what in text and "Traceback" not in text, text
    keyed = write_config(tmp_path / "keyed.yaml", sim, {"keys": [{"key_env": "GW_UNSET_KEY"}]},
                         [backend(sim, "xai", "gw-refuse")])
    srv = Server(keyed)
    assert srv.wait() == 1 and "GW_UNSET_KEY is not set" in "".join(srv.output)
    bad = tmp_path / "bad.yaml"
    bad.write_text(yaml.safe_dump({"llm": {"gateway": {"max_body": 1}, "backends": [backend(sim, "xai", "x")]}}))
    srv = Server(bad)
    assert srv.wait() == 1 and 'llm.gateway.max_body: unknown key; did you mean "max_body_mb"?' in "".join(srv.output)


REDIS = shutil.which("redis-server")


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
async def test_two_workers_on_one_redis_hold_max_concurrent_and_totals(sim: Any, tmp_path: Path) -> None:
    from test_redis import RedisServer

    redis = RedisServer().start()
    cfg = write_config(tmp_path / "organism.yaml", sim, {}, [backend(sim, "xai", "gw-fleet", max_concurrent=2)],
                       shared_state=redis.url, redis_prefix=f"gw{os.getpid()}")
    srv = Server(cfg, "--workers", "2").wait_ready()
    sim.set_latency("gw-fleet", 0.15)
    try:
        client = openai.AsyncOpenAI(base_url=srv.url, api_key="none", max_retries=0)
        replies = await asyncio.gather(*(client.chat.completions.with_raw_response.create(
            model="grok-4.1", messages=MESSAGES, extra_headers={"X-Agent-Id": f"fleet-{i % 2}"})
            for i in range(24)))
        assert all(r.parse().choices[0].message.content for r in replies)
        assert sim.stats("gw-fleet").peak_in_flight == 2
        assert sim.stats("gw-fleet").requests == 24
        workers = {r.headers["x-request-id"] for r in replies}
        assert len(workers) == 24
        usage = get_json(srv.port, "/v1/usage", key=None)[1]["usage"]        # either worker: fleet totals
        assert usage["fleet-0"]["request_count"] + usage["fleet-1"]["request_count"] == 24
        # /metrics answers for every worker (each series labelled), one block per metric family
        def requests_counted(text: bytes) -> float:
            return sum(float(m) for m in re.findall(rb"^xpl_requests_total\{[^}]*\} (\S+)$", text, re.M))

        deadline = time.monotonic() + 15
        while time.monotonic() < deadline:
            status, _, text = request(srv.port, "GET", "/metrics")
            if requests_counted(text) == 24:
                break
            time.sleep(0.2)
        assert status == 200 and b'xpl_worker="0"' in text and b'xpl_worker="1"' in text
        assert text.count(b"# TYPE gen_ai_client_token_usage ") == 1 and requests_counted(text) == 24
        per_worker = {w: sum(float(m) for m in re.findall(
            rb'^xpl_requests_total\{[^}]*xpl_worker="' + w + rb'"[^}]*\} (\S+)$', text, re.M)) for w in (b"0", b"1")}
        assert all(per_worker.values()), per_worker     # the connections were spread over both workers
        assert request(srv.port, "GET", "/readyz")[0] == 200
        redis.stop()                                                         # shared state gone: not ready
        deadline = time.monotonic() + 20
        while request(srv.port, "GET", "/readyz")[0] != 503 and time.monotonic() < deadline:
            time.sleep(0.1)
        status, _, body = request(srv.port, "GET", "/readyz")
        assert status == 503 and "shared state" in json.loads(body)["reason"]
        assert srv.stop() == 0, "".join(srv.output)
    finally:
        sim.set_latency("gw-fleet", 0.0)
        srv.stop(signal.SIGKILL)
        redis.stop()


@pytest.mark.skipif(REDIS is None, reason="redis-server is not installed")
def test_workers_stop_when_their_supervisor_is_killed(sim: Any, tmp_path: Path) -> None:
    from test_redis import RedisServer

    redis = RedisServer().start()
    cfg = write_config(tmp_path / "organism.yaml", sim, {}, [backend(sim, "xai", "gw-orphan")],
                       shared_state=redis.url, redis_prefix=f"gwo{os.getpid()}")
    srv = Server(cfg, "--workers", "2").wait_ready()
    try:
        workers = [int(p) for t in Path(f"/proc/{srv.proc.pid}/task").iterdir()
                   for p in (t / "children").read_text().split()]
        assert len(workers) == 2
        srv.proc.kill()                                  # the supervisor only, with no chance to forward
        srv.proc.wait(10)
        deadline = time.monotonic() + 20
        while any(Path(f"/proc/{w}").exists() and "Z" not in _state(w) for w in workers) \
                and time.monotonic() < deadline:
            time.sleep(0.1)
        assert all(not Path(f"/proc/{w}").exists() or "Z" in _state(w) for w in workers)
        with pytest.raises(OSError):
            request(srv.port, "GET", "/healthz")
    finally:
        srv.stop(signal.SIGKILL)
        redis.stop()


def _state(pid: int) -> str:
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0]
    except OSError:
        return "Z"
