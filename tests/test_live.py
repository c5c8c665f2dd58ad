"""See the swarm live: ``xml-pipeline-llm top`` under a pseudo-terminal, and the gateway's /ui in a real browser.

``top`` runs as a real process (pexpect) against a real redis-server shared
with a router in this process that makes calls through the simulator; the
page is driven in Debian's chromium by Playwright (``executable_path``: never
``playwright install``, which downloads a browser).  Both poll until what
they wait for shows, never assert after a fixed sleep.
"""

from __future__ import annotations

import asyncio
import json
import os
import shutil
import subprocess
import sys
import time
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml
from conftest import FAKE_KEYS, MESSAGES, backend
from test_gateway import KEYS, OPS, TEAM, Server, request, write_config
from test_redis import REDIS_SERVER, RedisServer

from xml_pipeline_llm import LLMRouter, load_config
from xml_pipeline_llm.snapshot import Snapshot, snapshot

ROOT = Path(__file__).resolve().parent.parent
ALICE = KEYS["GW_ALICE_KEY"]
CHROMIUM = shutil.which("chromium") or shutil.which("chromium-browser")
IN_CI = bool(os.environ.get("CI"))


def _env() -> dict[str, str]:
    return {**os.environ, **FAKE_KEYS, **KEYS, "PYTHONPATH": str(ROOT), "TERM": "xterm-256color",
            "COLUMNS": "160", "LINES": "50"}


@pytest.fixture(scope="module")
def redis_url() -> Iterator[str]:
    if REDIS_SERVER is None:
        if IN_CI:
            pytest.fail("CI=true but redis-server is not installed: .ci/run must apt-get install redis-server")
        pytest.skip("redis-server is not installed (apt-get install redis-server; CI's .ci/run does this)")
    server = RedisServer().start()
    yield server.url
    server.stop()


def _organism(path: Path, sim: Any, **llm: Any) -> Path:
    block = {"retry_base_delay": 0.02, "retry_max_delay": 0.2, "timeout": 10, **llm,
             "backends": [backend(sim, "xai", "live-x", max_concurrent=4),
                          backend(sim, "openai", "live-o", supported_models=["gpt-4o"])],
             "pricing": {"grok-4.1": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}}}
    path.write_text(yaml.safe_dump({"llm": block}))
    return path


async def _calls(router: LLMRouter, agent: str, n: int, model: str = "grok-4.1") -> None:
    await asyncio.gather(*(router.complete(model, MESSAGES, agent_id=agent, max_tokens=40) for _ in range(n)))


# ------------------------------------------------------------------ top

def test_top_follows_a_fleet_in_redis_and_leaves_on_q(sim: Any, redis_url: str, tmp_path: Path) -> None:
    import pexpect  # the test extra

    cfg = _organism(tmp_path / "organism.yaml", sim, shared_state=redis_url, redis_prefix=f"t{uuid.uuid4().hex[:6]}",
                    budgets=[{"scope": "agent", "match": "planner", "max_tokens": 100_000}])
    router = LLMRouter(load_config(cfg))
    try:
        asyncio.run(_calls(router, "planner", 3))
        snap = asyncio.run(snapshot(router))              # the fleet's budgets, in process too
        assert [b.key for b in snap.budgets] == ["planner"] and snap.agents[0].budget_percent
        child = pexpect.spawn(sys.executable, ["-m", "xml_pipeline_llm.cli", "top", "-c", str(cfg)], env=_env(),
                              cwd=str(tmp_path), dimensions=(50, 160), encoding="utf-8", timeout=60)
        try:
            child.expect("planner")
            child.expect("live-x")             # the backends, from the config, with their load
            child.expect("live-o")
            child.expect("Budgets")            # planner's, fleet-wide
            asyncio.run(_calls(router, "researcher", 2))       # calls landing while it watches
            child.expect("researcher", timeout=30)
            sim.script("live-x", [pexpect_fault()])
            asyncio.run(_calls(router, "critic", 1))
            child.expect("retried:429", timeout=30)             # the last errors
            child.send("q")
            child.expect(pexpect.EOF, timeout=30)
            assert "\x1b[?1049l" in child.before[-200:]          # left the alternate screen
        finally:
            child.close()
        assert child.exitstatus == 0, child.before
        child = pexpect.spawn(sys.executable, ["-m", "xml_pipeline_llm.cli", "top", "-c", str(cfg), "--interval",
                                               "0.3"], env=_env(), cwd=str(tmp_path), dimensions=(50, 160),
                              encoding="utf-8", timeout=60)
        try:
            child.expect("researcher")
            child.sendintr()                                    # Ctrl-C leaves cleanly too
            child.expect(pexpect.EOF, timeout=30)
        finally:
            child.close()
        assert child.exitstatus == 0 and "Traceback" not in (child.before or "")
    finally:
        router.close()


def pexpect_fault() -> Any:
    from xml_pipeline_llm.simulator import Fault

    return Fault.status(429, retry_after=20)


def test_top_once_from_a_sqlite_ledger_and_from_an_empty_one(sim: Any, tmp_path: Path) -> None:
    cfg = _organism(tmp_path / "organism.yaml", sim, usage_store="sqlite:///usage.db",
                    budgets=[{"scope": "agent", "match": "writer", "max_tokens": 50_000}])
    router = LLMRouter(load_config(cfg))
    try:
        asyncio.run(_calls(router, "writer", 2))
        asyncio.run(router.aclose())
        out = subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", "top", "-c", str(cfg), "--once"],
                             env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
        assert out.returncode == 0, out.stderr
        assert "writer" in out.stdout and "live-x" in out.stdout and "Budgets" in out.stdout
        assert "not in a SQLite ledger" in out.stdout          # no backend load there, and it says so
    finally:
        router.close()
    empty = _organism(tmp_path / "empty.yaml", sim, usage_store="sqlite:///empty.db")
    LLMRouter(load_config(empty)).close()                       # a ledger with no call yet
    out = subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", "top", "-c", str(empty), "--once"],
                         env=_env(), cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "No calls recorded yet" in out.stdout, out.stdout + out.stderr


def test_top_with_the_memory_store_says_there_is_nothing_to_watch(sim: Any, tmp_path: Path) -> None:
    cfg = _organism(tmp_path / "organism.yaml", sim)
    out = subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", "top", "-c", str(cfg)], env=_env(),
                         cwd=tmp_path, capture_output=True, text=True, timeout=60)
    assert out.returncode == 1
    assert "nothing another process can watch" in out.stderr and "--url" in out.stderr
    assert "Traceback" not in out.stderr


def test_top_url_refuses_a_non_admin_key_and_an_unreachable_gateway_clearly(tmp_path: Path,
                                                                             gateway: Server) -> None:
    base = [sys.executable, "-m", "xml_pipeline_llm.cli", "top", "--url", f"http://127.0.0.1:{gateway.port}"]
    out = subprocess.run([*base, "--once"], env={**_env(), "XML_PIPELINE_LLM_KEY": ALICE}, capture_output=True,
                         text=True, timeout=60)
    assert out.returncode == 1 and "admin: true" in out.stderr and ALICE not in out.stderr + out.stdout
    out = subprocess.run([*base, "--once", "--key", OPS], env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 0 and "Backends" in out.stdout and "live-x" in out.stdout, out.stderr
    out = subprocess.run([sys.executable, "-m", "xml_pipeline_llm.cli", "top", "--url", "http://127.0.0.1:9",
                          "--once"], env=_env(), capture_output=True, text=True, timeout=60)
    assert out.returncode == 1 and "cannot reach http://127.0.0.1:9" in out.stderr


# ------------------------------------------------------------------ the gateway: /v1/snapshot and /ui

@pytest.fixture(scope="module")
def gateway(sim: Any, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Server]:
    cfg = write_config(
        tmp_path_factory.mktemp("live") / "organism.yaml", sim,
        {"keys": [{"key_env": "GW_ALICE_KEY", "agent": "alice"},
                  {"key_env": "GW_TEAM_KEY", "agent": "*"},
                  {"key_env": "GW_OPS_KEY", "admin": True}]},
        [backend(sim, "xai", "live-x", max_concurrent=4),
         backend(sim, "openai", "live-o", supported_models=["gpt-4o"])],
        pricing={"grok-4.1": {"input_per_mtok": 3.0, "output_per_mtok": 15.0}},
        budgets=[{"scope": "agent", "match": "planner", "max_usd": 5.0}])
    srv = Server(cfg).wait_ready()
    yield srv
    assert srv.stop() == 0
    output = "".join(srv.output)
    for secret in KEYS.values():
        assert secret not in output


def _call(port: int, agent: str) -> None:
    body = json.dumps({"model": "grok-4.1", "messages": MESSAGES, "max_tokens": 40}).encode()
    status, _, text = request(port, "POST", "/v1/chat/completions", body,
                              {"Authorization": f"Bearer {TEAM}", "X-Agent-Id": agent,
                               "Content-Type": "application/json"})
    assert status == 200, text


def test_v1_snapshot_needs_an_admin_key_and_answers_a_snapshot(gateway: Server) -> None:
    _call(gateway.port, "planner")
    assert request(gateway.port, "GET", "/v1/snapshot")[0] == 401
    assert request(gateway.port, "GET", "/v1/snapshot", headers={"Authorization": f"Bearer {ALICE}"})[0] == 403
    status, headers, body = request(gateway.port, "GET", "/v1/snapshot", headers={"Authorization": f"Bearer {OPS}"})
    assert status == 200 and headers["cache-control"] == "no-store"
    snap = Snapshot.from_json(body)
    assert "planner" in {a.agent for a in snap.agents}
    assert {b.backend for b in snap.backends} == {"live-x", "live-o"}
    planner = next(a for a in snap.agents if a.agent == "planner")
    assert planner.requests_per_min >= 1 and planner.spend_usd and planner.budget_percent is not None
    # the page's JSON takes no key from the URL either
    assert request(gateway.port, "GET", f"/ui/snapshot?key={OPS}")[0] == 401


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    if CHROMIUM is None:
        message = ("chromium is not installed: apt-get install chromium (CI's .ci/run does this); the /ui tests "
                   "drive it through Playwright")
        if IN_CI:
            pytest.fail(message)
        pytest.skip(message)
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        if IN_CI:
            pytest.fail("playwright is not installed: pip install -e '.[test]'")
        pytest.skip("playwright is not installed (the test extra has it)")
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield b
        b.close()


def _until(check: Any, timeout: float = 30.0) -> bool:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return True
        time.sleep(0.1)
    return False


def test_ui_refuses_a_non_admin_key_in_the_header_and_in_the_login_form(gateway: Server, browser: Any) -> None:
    url = f"http://127.0.0.1:{gateway.port}/ui"
    ctx = browser.new_context(extra_http_headers={"Authorization": f"Bearer {ALICE}"})
    page = ctx.new_page()
    resp = page.goto(url)
    assert resp.status == 403 and "admin: true" in page.content()
    ctx.close()
    ctx = browser.new_context()
    page = ctx.new_page()
    assert page.goto(f"{url}?key={OPS}").status == 200          # a key in the URL opens nothing
    assert page.locator("form.login").count() == 1 and page.locator("#agents").count() == 0
    page.fill("#key", ALICE)
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "admin: true" in page.content() and not ctx.cookies()
    page.goto(url)
    page.fill("#key", "not-a-key")
    with page.expect_navigation():
        page.click("button[type=submit]")
    assert "not known" in page.content() and not ctx.cookies()
    ctx.close()


def test_ui_login_sets_a_strict_httponly_session_and_the_page_follows_traffic(gateway: Server, browser: Any,
                                                                                tmp_path: Path) -> None:
    url = f"http://127.0.0.1:{gateway.port}/ui"
    ctx = browser.new_context(viewport={"width": 1280, "height": 900})
    page = ctx.new_page()
    problems: list[str] = []
    page.on("console", lambda m: problems.append(f"{m.text} {m.location}") if m.type == "error" else None)
    page.on("pageerror", lambda e: problems.append(str(e)))
    page.goto(url)
    page.fill("#key", OPS)
    with page.expect_navigation():
        page.click("button[type=submit]")
    (cookie,) = ctx.cookies()
    assert cookie["name"] == "xpl_ui_session" and cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert OPS not in cookie["value"] and cookie["path"] == "/ui"
    assert page.locator("#agents").count() == 1
    _call(gateway.port, "planner")
    assert _until(lambda: page.locator('#agents tr[data-agent="planner"]').count() == 1)
    assert _until(lambda: page.locator('#backends tr[data-backend="live-x"]').count() == 1)
    points = int(page.get_attribute("#chart-agent-spend", "data-points") or 0)
    _call(gateway.port, "reviewer")
    assert _until(lambda: page.locator('#agents tr[data-agent="reviewer"]').count() == 1)
    assert _until(lambda: int(page.get_attribute("#chart-agent-spend", "data-points") or 0) > points + 1)
    assert page.locator("#chart-agent-spend canvas").count() == 1          # drawn by uPlot
    assert "reviewer" in page.inner_text("#chart-agent-tokens")             # its legend names the agents
    page.screenshot(path=str(tmp_path / "ui.png"), full_page=True)
    phone = browser.new_context(viewport={"width": 390, "height": 844}, is_mobile=True,
                                storage_state=ctx.storage_state())
    small = phone.new_page()
    small.goto(url)
    assert _until(lambda: small.locator('#agents tr[data-agent="planner"]').count() == 1)
    width = small.evaluate("document.documentElement.scrollWidth")
    assert width <= 400, f"the page is {width}px wide on a phone"         # tables scroll inside their box
    phone.close()
    with page.expect_navigation():
        page.click("header form button")                                  # log out
    assert page.locator("form.login").count() == 1 and not ctx.cookies()
    ctx.close()
    assert not problems, problems
