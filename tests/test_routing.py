"""Model routing: which backends may serve a model.

``router.route(model)`` makes no network call; the simulator is only used to
show that a request for an unserved model never reaches any backend.
"""

from __future__ import annotations

import pytest
from conftest import MESSAGES, backend, make_router

from xml_pipeline_llm import BackendError, ConfigError, ModelNotFoundError


def compat(sim, provider: str, name: str, **extra):
    """A backend of a provider with no simulator format of its own: OpenAI wire format."""
    return {"provider": provider, "name": name, "base_url": sim.base_url(name, "openai"),
            "api_key_env": "TEST_OPENAI_KEY", **extra}


def names(router, model: str) -> list[str]:
    return [b.name for b in router.route(model)[1]]


@pytest.fixture
def full(sim):
    """One backend of each built-in provider, the catch-all ollama first in file order."""
    return make_router([backend(sim, "ollama", "rt-ollama"), backend(sim, "xai", "rt-xai"),
                        backend(sim, "anthropic", "rt-ant"), backend(sim, "openai", "rt-oai")])


@pytest.mark.parametrize("model, expected", [
    ("grok-4.1", "rt-xai"), ("grok-3-mini", "rt-xai"), ("grok-code-fast-1", "rt-xai"),
    ("claude-sonnet-4", "rt-ant"), ("claude-3-5-haiku-20241022", "rt-ant"), ("claude-opus-4-1", "rt-ant"),
    ("gpt-4o", "rt-oai"), ("gpt-4.1-mini", "rt-oai"), ("gpt-5", "rt-oai"),
    ("o1", "rt-oai"), ("o1-mini", "rt-oai"), ("o3", "rt-oai"), ("o3-mini", "rt-oai"),
    ("o4-mini", "rt-oai"), ("chatgpt-4o-latest", "rt-oai"),
    ("llama3", "rt-ollama"), ("mistral", "rt-ollama"), ("qwen2.5:7b", "rt-ollama"),
    ("gpt4all", "rt-ollama"), ("claude", "rt-ollama"), ("grok", "rt-ollama"),
])
def test_builtin_rules_and_catch_all(full, model, expected):
    bare, candidates = full.route(model)
    assert bare == model
    assert [b.name for b in candidates] == [expected]


def test_catch_all_never_takes_a_model_a_rule_serves(sim):
    # ollama first in the file and preferred by priority: still not a candidate for grok-4.1.
    r = make_router([backend(sim, "ollama", "ca-ollama", priority=0), backend(sim, "xai", "ca-xai", priority=5)])
    assert names(r, "grok-4.1") == ["ca-xai"]
    assert names(r, "llama3") == ["ca-ollama"]


def test_catch_all_serves_a_ruled_model_when_no_ruled_backend_exists(sim):
    r = make_router([backend(sim, "ollama", "ca2-ollama"), backend(sim, "anthropic", "ca2-ant")])
    assert names(r, "grok-4.1") == ["ca2-ollama"]
    assert names(r, "claude-sonnet-4") == ["ca2-ant"]


def test_several_backends_of_a_provider_are_all_candidates_in_file_order(sim):
    r = make_router([backend(sim, "xai", "mb-b", priority=2), backend(sim, "ollama", "mb-ollama"),
                     backend(sim, "xai", "mb-a", priority=1)])
    assert names(r, "grok-4.1") == ["mb-b", "mb-a"]


def test_supported_models_replaces_the_builtin_rule(sim):
    r = make_router([backend(sim, "xai", "sm-xai", supported_models=["grok-beta"]),
                     backend(sim, "openai", "sm-local", supported_models=["my-local-model"]),
                     backend(sim, "openai", "sm-oai")])
    assert names(r, "grok-beta") == ["sm-xai"]
    with pytest.raises(ModelNotFoundError):
        r.route("grok-4.1")                      # the grok-* rule is gone
    assert names(r, "gpt-4o") == ["sm-oai"]      # not the local server, whose list replaces gpt-*
    assert names(r, "my-local-model") == ["sm-local"]


def test_supported_models_takes_shell_patterns(sim):
    r = make_router([backend(sim, "ollama", "pt-ollama", supported_models=["llama3*", "mistral", "qwen?.5"])])
    for model in ("llama3", "llama3.1:8b", "llama3-instruct", "mistral", "qwen2.5"):
        assert names(r, model) == ["pt-ollama"], model
    for model in ("llama2", "mistral-large", "qwen2.55", "grok-4.1"):
        with pytest.raises(ModelNotFoundError):
            r.route(model)


def test_ollama_with_a_list_is_no_catch_all(sim):
    r = make_router([backend(sim, "xai", "nl-xai"), backend(sim, "ollama", "nl-ollama", supported_models=["llama3*"])])
    assert names(r, "llama3.2") == ["nl-ollama"]
    with pytest.raises(ModelNotFoundError):
        r.route("mistral")


def test_ollama_listing_a_ruled_model_is_a_candidate_beside_the_ruled_backend(sim):
    r = make_router([backend(sim, "ollama", "ol-ollama", supported_models=["grok-4.1"]),
                     backend(sim, "xai", "ol-xai")])
    assert names(r, "grok-4.1") == ["ol-ollama", "ol-xai"]


def test_provider_prefix_restricts_candidates(sim):
    r = make_router([backend(sim, "ollama", "pp-ollama"),
                     compat(sim, "openrouter", "pp-or", supported_models=["claude-*"]),
                     backend(sim, "anthropic", "pp-ant")])
    assert names(r, "claude-sonnet-4") == ["pp-or", "pp-ant"]
    bare, candidates = r.route("anthropic/claude-sonnet-4")
    assert bare == "claude-sonnet-4"
    assert [b.name for b in candidates] == ["pp-ant"]
    assert r.route("openrouter/claude-sonnet-4") == ("claude-sonnet-4", [r.backends[1]])
    assert r.route("ollama/llama3") == ("llama3", [r.backends[0]])


def test_provider_prefix_does_not_bypass_the_model_rules(sim):
    r = make_router([backend(sim, "anthropic", "pr-ant"), backend(sim, "xai", "pr-xai")])
    with pytest.raises(ModelNotFoundError):
        r.route("anthropic/grok-4.1")


def test_slash_in_a_model_name_that_is_no_provider_goes_by_the_rules(sim):
    r = make_router([backend(sim, "xai", "sl-xai"), backend(sim, "ollama", "sl-ollama")])
    assert r.route("library/llama3") == ("library/llama3", [r.backends[1]])


def test_provider_prefix_of_an_unconfigured_provider_finds_no_candidate(sim):
    r = make_router([backend(sim, "xai", "pu-xai"), backend(sim, "ollama", "pu-ollama")])
    with pytest.raises(ModelNotFoundError):
        r.route("anthropic/claude-sonnet-4")


def test_routing_is_case_insensitive(full):
    assert names(full, "GPT-4o") == ["rt-oai"]
    assert names(full, "Claude-Sonnet-4") == ["rt-ant"]


async def test_no_candidate_names_the_model_and_every_backend_and_calls_nothing(sim):
    r = make_router([backend(sim, "xai", "nf-xai"), backend(sim, "anthropic", "nf-ant"),
                     backend(sim, "ollama", "nf-ollama", supported_models=["llama3*", "mistral"]),
                     compat(sim, "groq", "nf-groq", supported_models=["llama-3.3-70b"])])
    before = sim.total_stats().requests
    with pytest.raises(ModelNotFoundError) as info:
        await r.complete("gpt-4o", MESSAGES)
    err = info.value
    assert isinstance(err, BackendError)
    msg = str(err)
    assert '"gpt-4o"' in msg
    for part in ("nf-xai", "grok-*", "nf-ant", "claude-*", "nf-ollama", "llama3*", "mistral",
                 "nf-groq", "llama-3.3-70b"):
        assert part in msg, part
    assert sim.total_stats().requests == before
    assert r.get_all_usage() == {} or all(u.request_count == 0 for u in r.get_all_usage().values())


def test_no_candidate_from_route_itself(sim):
    r = make_router([backend(sim, "xai", "nf2-xai")])
    with pytest.raises(ModelNotFoundError, match=r'"claude-sonnet-4".*nf2-xai \(xai\): grok-\*'):
        r.route("claude-sonnet-4")


async def test_a_strategy_object_from_code_picks_the_backend(sim):
    class LastReady:
        rotates = False

        def __init__(self) -> None:
            self.seen: list[list[str]] = []

        def pick(self, ready, candidates, turn, load):
            self.seen.append([b.name for b in ready])
            return ready[-1]

    mine = LastReady()
    r = make_router([backend(sim, "xai", "so-a"), backend(sim, "xai", "so-b")], strategy=mine)
    assert (await r.complete("grok-4.1", MESSAGES)).backend == "so-b"
    assert mine.seen == [["so-a", "so-b"]]
    assert "LastReady" in repr(r)


def test_a_strategy_that_is_neither_a_name_nor_an_object_is_a_config_error(sim):
    with pytest.raises(ConfigError, match="llm.strategy"):
        make_router([backend(sim, "xai", "so-c")], strategy=42)
