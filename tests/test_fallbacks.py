"""Fallbacks across models: aliases, fallbacks=, context windows, through the simulator.

Every call goes through LiteLLM's real HTTP code to the simulator; the
timing bounds are generous (a loaded 2-core machine), and nothing is
asserted after a fixed sleep.
"""

from __future__ import annotations

import time

import pytest
from conftest import MESSAGES, backend, make_router, old_ledger, until

from xml_pipeline_llm import BadRequestError, ConfigError, load_config
from xml_pipeline_llm.errors import ModelNotFoundError
from xml_pipeline_llm.simulator import Fault

CONTEXT_400 = Fault.status(400, message="This model's maximum context length is 131072 tokens. However, "
                                        "your messages resulted in 140213 tokens. Please reduce the length "
                                        "of the messages.")


def smart(sim, x: str, a: str, **llm):
    return make_router([backend(sim, "xai", x), backend(sim, "anthropic", a)],
                       models={"smart": ["grok-4.1", "claude-sonnet-4"]}, **llm)


async def test_an_alias_answers_from_its_first_model(sim):
    r = smart(sim, "fb-first-x", "fb-first-a")
    resp = await r.complete("smart", MESSAGES, agent_id="a1")
    assert (resp.model, resp.backend) == ("grok-4.1", "fb-first-x")
    [event] = r.usage_events()
    assert (event.model, event.requested_model, event.outcome) == ("grok-4.1", "smart", "ok")
    assert sim.stats("fb-first-a").requests == 0
    assert set(r.get_all_usage("model")) == {"grok-4.1"}      # totals count the model sent


async def test_a_rate_limited_first_model_moves_on_at_once_and_comes_back_after_the_cooldown(sim):
    r = smart(sim, "fb-429-x", "fb-429-a", retry_max_delay=60)
    sim.script("fb-429-x", [Fault.status(429, retry_after=30)])
    start = time.monotonic()
    resp = await r.complete("smart", MESSAGES)
    assert time.monotonic() - start < 5                       # no 30 s sleep
    assert (resp.model, resp.backend) == ("claude-sonnet-4", "fb-429-a")
    events = r.usage_events()
    assert [(e.model, e.backend, e.outcome, e.requested_model) for e in events] == [
        ("grok-4.1", "fb-429-x", "retried:429", "smart"), ("claude-sonnet-4", "fb-429-a", "ok", "smart")]
    assert 25 < (await r.cooldowns())["fb-429-x"] <= 30
    for _ in range(3):                                        # while xai cools down: Claude, no tries on xai
        resp = await r.complete("smart", MESSAGES)
        assert resp.model == "claude-sonnet-4"
    assert sim.stats("fb-429-x").requests == 1


async def test_calls_return_to_the_first_model_once_its_cooldown_ends(sim):
    r = smart(sim, "fb-back-x", "fb-back-a", retry_max_delay=60)
    sim.script("fb-back-x", [Fault.status(429, retry_after=1)])
    assert (await r.complete("smart", MESSAGES)).model == "claude-sonnet-4"
    models: list[str] = []

    async def call() -> bool:
        models.append((await r.complete("smart", MESSAGES)).model)
        return models[-1] == "grok-4.1"

    deadline = time.monotonic() + 15
    while not await call():
        assert time.monotonic() < deadline, models
    assert set(models) <= {"claude-sonnet-4", "grok-4.1"}


async def test_fallbacks_per_call_and_the_tries_of_all_models_are_bounded(sim):
    r = make_router([backend(sim, "xai", "fb-pc-x"), backend(sim, "anthropic", "fb-pc-a"),
                     backend(sim, "openai", "fb-pc-o")], retries=2)
    sim.script("fb-pc-x", [Fault.status(503)])
    resp = await r.complete("grok-4.1", MESSAGES, fallbacks=["claude-sonnet-4"])
    assert resp.model == "claude-sonnet-4" and resp.backend == "fb-pc-a"
    assert [e.requested_model for e in r.usage_events()] == ["grok-4.1", "grok-4.1"]
    # every model failing: retries + 1 = 3 tries in all, across the three models, then one error
    for name in ("fb-pc-x", "fb-pc-a", "fb-pc-o"):
        sim.script(name, [Fault.status(500)] * 3)
    before = sum(sim.stats(n).requests for n in ("fb-pc-x", "fb-pc-a", "fb-pc-o"))
    with pytest.raises(Exception) as err:
        await r.complete("grok-4.1", MESSAGES, fallbacks=["claude-sonnet-4", "gpt-4o"])
    after = sum(sim.stats(n).requests for n in ("fb-pc-x", "fb-pc-a", "fb-pc-o"))
    assert after - before == 3
    text = str(err.value)
    assert "3 tries" in text and "(grok-4.1)" in text and "(claude-sonnet-4)" in text and "(gpt-4o)" in text
    for name in ("fb-pc-x", "fb-pc-a", "fb-pc-o"):
        sim.reset(name)


async def test_sleeps_only_when_every_backend_of_every_model_cools_down(sim):
    r = smart(sim, "fb-all-x", "fb-all-a", retry_max_delay=5, retries=3)
    sim.script("fb-all-x", [Fault.status(429, retry_after=0.6)])
    sim.script("fb-all-a", [Fault.status(429, retry_after=0.6)])
    start = time.monotonic()
    resp = await r.complete("smart", MESSAGES)
    elapsed = time.monotonic() - start
    assert resp.model == "grok-4.1"                           # back to the first model after the wait
    assert 0.5 <= elapsed < 5
    assert [e.outcome for e in r.usage_events()] == ["retried:429", "retried:429", "ok"]


@pytest.mark.parametrize("bad, fix", [
    ("gpt-9", "no backend serves model"), ("", "expected a model name"), ("x", "expected a list")])
async def test_fallbacks_are_checked_before_anything_is_sent(sim, bad, fix):
    r = make_router([backend(sim, "xai", "fb-chk-x")])
    fallbacks = bad if bad == "x" else [bad]
    with pytest.raises(BadRequestError) as err:
        await r.complete("grok-4.1", MESSAGES, fallbacks=fallbacks)
    assert fix in str(err.value) and "nothing was sent" in str(err.value)
    assert sim.stats("fb-chk-x").requests == 0 and r.usage_events() == []


async def test_an_unknown_model_with_fallbacks_is_still_model_not_found(sim):
    r = make_router([backend(sim, "xai", "fb-nf-x")])
    with pytest.raises(ModelNotFoundError):
        await r.complete("gpt-9", MESSAGES, fallbacks=["grok-4.1"])


async def test_a_context_window_400_moves_on_to_the_next_model(sim):
    r = smart(sim, "fb-cw-x", "fb-cw-a")
    sim.script("fb-cw-x", [CONTEXT_400])
    resp = await r.complete("smart", MESSAGES)
    assert resp.model == "claude-sonnet-4"
    assert [e.outcome for e in r.usage_events()] == ["retried:context_window", "ok"]


async def test_a_context_window_400_of_the_last_model_is_a_bad_request_naming_each_model(sim):
    r = smart(sim, "fb-cw2-x", "fb-cw2-a")
    sim.script("fb-cw2-x", [CONTEXT_400])
    sim.script("fb-cw2-a", [CONTEXT_400])
    with pytest.raises(BadRequestError) as err:
        await r.complete("smart", MESSAGES)
    text = str(err.value)
    assert "grok-4.1 skipped" in text and "claude-sonnet-4" in text and "context window" in text
    assert [e.outcome for e in r.usage_events()] == ["retried:context_window", "error:context_window"]


async def test_a_plain_400_is_not_retried_on_the_next_model(sim):
    r = smart(sim, "fb-400-x", "fb-400-a")
    sim.script("fb-400-x", [Fault.status(400, message="temperature: must be at most 2")])
    with pytest.raises(BadRequestError):
        await r.complete("smart", MESSAGES)
    assert sim.stats("fb-400-a").requests == 0


BIG = [{"role": "user", "content": "lorem ipsum dolor sit amet " * 4000}]    # ~20,000 tokens


async def test_a_prompt_larger_than_a_models_window_is_never_sent_to_it(sim):
    # gpt-4 has an 8,192-token window in LiteLLM's model info; claude-sonnet-4 200,000
    r = make_router([backend(sim, "openai", "fb-win-o"), backend(sim, "anthropic", "fb-win-a")],
                    models={"long": ["gpt-4", "claude-sonnet-4"]})
    resp = await r.complete("long", BIG)
    assert resp.model == "claude-sonnet-4"
    assert sim.stats("fb-win-o").requests == 0
    assert [(e.model, e.requested_model) for e in r.usage_events()] == [("claude-sonnet-4", "long")]
    small = await r.complete("long", MESSAGES)                 # a short prompt still goes to gpt-4
    assert small.model == "gpt-4"


async def test_no_model_large_enough_is_a_bad_request_before_sending(sim):
    r = make_router([backend(sim, "openai", "fb-win2-o")])
    with pytest.raises(BadRequestError) as err:
        await r.complete("gpt-4", BIG, fallbacks=["gpt-3.5-turbo"])
    text = str(err.value)
    assert "gpt-4 skipped" in text and "8,192-token" in text and "gpt-3.5-turbo skipped" in text
    assert "nothing was sent" in text
    assert sim.stats("fb-win2-o").requests == 0


async def test_a_stream_falls_back_too(sim):
    r = smart(sim, "fb-st-x", "fb-st-a", retry_max_delay=60)
    sim.script("fb-st-x", [Fault.status(429, retry_after=30)])
    s = r.stream("smart", MESSAGES)
    text = "".join([d async for d in s])
    assert text and s.response is not None and s.response.model == "claude-sonnet-4"
    assert await until(lambda: any(e.outcome == "ok" for e in r.usage_events()))
    assert {e.requested_model for e in r.usage_events()} == {"smart"}


async def test_round_robin_over_an_alias_rotates_the_first_models_backends(sim):
    r = make_router([backend(sim, "xai", "fb-rr-x1"), backend(sim, "xai", "fb-rr-x2"),
                     backend(sim, "anthropic", "fb-rr-a")], strategy="round-robin",
                    models={"smart": ["grok-4.1", "claude-sonnet-4"]})
    got = [(await r.complete("smart", MESSAGES)).backend for _ in range(4)]
    assert sorted(got) == ["fb-rr-x1", "fb-rr-x1", "fb-rr-x2", "fb-rr-x2"]


# ------------------------------------------------------------------ config

def _models(sim, models, backends=None):
    return load_config({"llm": {"models": models, "backends": backends or [
        backend(sim, "xai", "fb-cfg-x"), backend(sim, "anthropic", "fb-cfg-a")]}})


@pytest.mark.parametrize("models, place, fix", [
    ({"grok-fast": ["claude-sonnet-4"]}, 'llm.models["grok-fast"]', "fb-cfg-x serves by its model rule"),
    ({"smart": ["smart"]}, 'llm.models["smart"][0]', "names itself"),
    ({"smart": ["gpt-4o"]}, 'llm.models["smart"][0]', 'no backend serves model "gpt-4o"'),
    ({"smart": []}, 'llm.models["smart"]', "empty list"),
    ({"smart": "grok-4.1"}, 'llm.models["smart"]', "expected a non-empty list of model names"),
    ({"smart": [3]}, 'llm.models["smart"][0]', "expected a model name"),
    ({"smart": ["grok-4.1", "grok-4.1"]}, 'llm.models["smart"][1]', "listed twice"),
    ({"a": ["grok-4.1"], "b": ["a"]}, 'llm.models["b"][0]', "aliases do not nest"),
])
def test_alias_mistakes_are_config_errors_naming_the_place_and_the_fix(sim, models, place, fix):
    with pytest.raises(ConfigError) as err:
        _models(sim, models)
    assert place in str(err.value) and fix in str(err.value)


def test_an_alias_is_kept_in_the_router_config(sim):
    cfg = _models(sim, {"smart": ["grok-4.1", "claude-sonnet-4"]})
    assert cfg.models == {"smart": ("grok-4.1", "claude-sonnet-4")}


def test_a_catch_all_backend_does_not_make_every_alias_a_shadow(sim):
    cfg = _models(sim, {"local": ["llama3"]}, [backend(sim, "ollama", "fb-cfg-ol", base_url="http://127.0.0.1:9")])
    assert cfg.models == {"local": ("llama3",)}


# ------------------------------------------------------------------ accounting



async def test_an_older_sqlite_ledger_is_read_and_migrated(sim, tmp_path):
    import sqlite3

    from xml_pipeline_llm.stores import read_events

    db = tmp_path / "old.db"
    old_ledger(db, "x", (1, 2), 5.0)
    [old] = list(read_events(db))                           # read only, not migrated: model stands in
    assert (old.agent_id, old.requested_model) == ("old", "grok-4.1")
    r = smart(sim, "fb-sq-x", "fb-sq-a", usage_store=f"sqlite:///{db}", retry_max_delay=60)
    sim.script("fb-sq-x", [Fault.status(429, retry_after=30)])
    await r.complete("smart", MESSAGES, agent_id="new")
    await r.aclose()
    rows = [(e.agent_id, e.model, e.requested_model, e.outcome) for e in read_events(db)]
    assert rows == [("old", "grok-4.1", "grok-4.1", "ok"), ("new", "grok-4.1", "smart", "retried:429"),
                    ("new", "claude-sonnet-4", "smart", "ok")]
    with sqlite3.connect(db) as conn:
        assert "requested_model" in {row[1] for row in conn.execute("PRAGMA table_info(usage_events)")}


async def test_the_event_csv_has_requested_model_after_the_documented_columns(sim, tmp_path):
    import csv

    r = smart(sim, "fb-csv-x", "fb-csv-a")
    await r.complete("smart", MESSAGES, agent_id="c")
    await r.complete("claude-sonnet-4", MESSAGES, agent_id="c")
    r.export_usage_csv(tmp_path / "e.csv", by="event")
    rows = list(csv.DictReader((tmp_path / "e.csv").open()))
    header = list(rows[0])
    assert header[12] == "requested_model" and header[-1] == "metadata"   # the fallback column; metadata last
    assert [(x["model"], x["requested_model"]) for x in rows] == [("grok-4.1", "smart"),
                                                                  ("claude-sonnet-4", "claude-sonnet-4")]
