"""The ``llm:`` block: every mistake is a precise ConfigError at load time,
the loading forms and ``.env``, and no secret in any message, repr or log line.

The secret tests at the end go through LiteLLM's real HTTP path to the simulator.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
import textwrap
from pathlib import Path
from typing import Any

import pytest
from conftest import FAKE_KEYS, MESSAGES, backend, make_router

from xml_pipeline_llm import BackendError, ConfigError, LLMRouter, load_config
from xml_pipeline_llm.config import CONFIG_ENV

REPO = Path(__file__).resolve().parents[1]

XAI = {"provider": "xai", "api_key_env": "TEST_XAI_KEY"}
SECRET = "sk-live-9f8e7d6c5b4a-TOPSECRET"


def problems(block: dict[str, Any]) -> list[str]:
    """The lines of the ConfigError that loading ``{"llm": block}`` raises."""
    with pytest.raises(ConfigError) as info:
        load_config({"llm": block})
    return str(info.value).splitlines()


def one_problem(block: dict[str, Any]) -> str:
    lines = problems(block)
    assert len(lines) == 1, lines
    return lines[0]


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch):
    """Unset variables now and after the test, even when .env loading sets them meanwhile."""
    def clean(*names: str) -> None:
        for name in names:
            monkeypatch.setenv(name, "placeholder")   # records the original state for teardown
            monkeypatch.delenv(name)
    return clean


# ------------------------------------------------------------ every mistake in the llm: block

def test_unknown_backend_key_names_the_path_and_suggests_the_right_key():
    line = one_problem({"backends": [XAI, {**XAI, "name": "b", "rate_limt_tpm": 1000}]})
    assert line.startswith("llm.backends[1].rate_limt_tpm: unknown key")
    assert 'did you mean "rate_limit_tpm"?' in line


def test_unknown_top_level_key_suggests_the_right_key():
    line = one_problem({"stratgy": "failover", "backends": [XAI]})
    assert line.startswith("llm.stratgy: unknown key")
    assert 'did you mean "strategy"?' in line


def test_wrong_type_message_has_the_exact_documented_form():
    line = one_problem({"backends": [XAI, {**XAI, "name": "b", "rate_limit_tpm": "fast"}]})
    assert line == 'llm.backends[1].rate_limit_tpm: expected a positive integer, got "fast"'


@pytest.mark.parametrize("key, value, path", [
    ("rate_limit_tpm", 0, "llm.backends[0].rate_limit_tpm"),
    ("rate_limit_tpm", -5, "llm.backends[0].rate_limit_tpm"),
    ("rate_limit_tpm", 1.5, "llm.backends[0].rate_limit_tpm"),
    ("rate_limit_tpm", True, "llm.backends[0].rate_limit_tpm"),
    ("max_concurrent", 0, "llm.backends[0].max_concurrent"),
    ("max_concurrent", -1, "llm.backends[0].max_concurrent"),
    ("timeout", 0, "llm.backends[0].timeout"),
    ("priority", "1", "llm.backends[0].priority"),
    ("supported_models", "llama3", "llm.backends[0].supported_models"),
])
def test_bad_backend_values_name_path_expectation_and_found_value(key, value, path):
    line = one_problem({"backends": [{**XAI, key: value}]})
    assert line.startswith(f"{path}: expected ")
    assert line.endswith(f"got {value!r}".replace("'", '"').replace("True", "true"))


@pytest.mark.parametrize("key, value", [
    ("retries", -1), ("retry_base_delay", 0), ("retry_max_delay", -1.0), ("timeout", 0),
    ("timeout", "slow"),
])
def test_bad_block_values_name_the_path(key, value):
    line = one_problem({key: value, "backends": [XAI]})
    assert line.startswith(f"llm.{key}: expected ")
    assert "got " in line


def test_unknown_strategy_lists_the_valid_ones():
    line = one_problem({"strategy": "fastest", "backends": [XAI]})
    assert line.startswith("llm.strategy:") and '"fastest"' in line
    for valid in ("failover", "round-robin", "least-loaded"):
        assert valid in line


@pytest.mark.parametrize("written, meant", [
    ("round_robin", "round-robin"), ("least_loaded", "least-loaded"), ("round-robin", "round-robin"),
    ("failover", "failover"),
])
def test_strategy_spellings_are_accepted(written, meant):
    assert load_config({"llm": {"strategy": written, "backends": [XAI]}}).strategy == meant


@pytest.mark.parametrize("written, meant", [("antropic", "anthropic"), ("olama", "ollama"), ("xia", "xai")])
def test_unknown_provider_suggests_a_known_one(written, meant):
    line = one_problem({"backends": [{"provider": written, "api_key_env": "TEST_XAI_KEY"}]})
    assert line.startswith(f'llm.backends[0].provider: unknown provider "{written}"')
    assert f'did you mean "{meant}"?' in line


def test_duplicate_backend_names_name_both_places():
    line = one_problem({"backends": [XAI, {**XAI, "priority": 2}]})
    assert line.startswith("llm.backends[1].name:")
    assert '"xai"' in line and "llm.backends[0]" in line and "duplicate" in line


def test_explicit_duplicate_names_are_caught_across_providers():
    line = one_problem({"backends": [{**XAI, "name": "main"},
                                     {"provider": "ollama", "name": "main"}]})
    assert line.startswith("llm.backends[1].name:") and '"main"' in line


@pytest.mark.parametrize("block", [{"backends": []}, {"strategy": "failover"}, {"backends": None}])
def test_empty_or_missing_backend_list(block):
    line = one_problem(block)
    assert line.startswith("llm.backends:") and "non-empty list of backends" in line


def test_retry_max_delay_below_base_delay():
    line = one_problem({"retry_base_delay": 5, "retry_max_delay": 1, "backends": [XAI]})
    assert line.startswith("llm.retry_max_delay:")
    assert "retry_base_delay" in line and "raise retry_max_delay" in line


def test_unset_api_key_env_names_the_variable_and_the_fix(clean_env):
    clean_env("XPL_TEST_UNSET_KEY")
    line = one_problem({"backends": [XAI, {"provider": "xai", "name": "b",
                                           "api_key_env": "XPL_TEST_UNSET_KEY"}]})
    assert line.startswith("llm.backends[1].api_key_env:")
    assert "XPL_TEST_UNSET_KEY is not set" in line and ".env" in line


def test_default_key_variable_of_a_provider_must_be_set(clean_env):
    clean_env("ANTHROPIC_API_KEY")
    line = one_problem({"backends": [{"provider": "anthropic"}]})
    assert line.startswith("llm.backends[0].api_key_env:") and "ANTHROPIC_API_KEY" in line


def test_keyless_local_providers_need_no_key(clean_env):
    clean_env("XPL_TEST_UNSET_KEY", "OPENAI_API_KEY")
    cfg = load_config({"llm": {"backends": [
        {"provider": "ollama", "api_key_env": "XPL_TEST_UNSET_KEY"},
        {"provider": "ollama", "name": "plain-ollama"},
        # An OpenAI-compatible local server: provider openai + base_url, no key.
        {"provider": "openai", "base_url": "http://localhost:8000/v1", "supported_models": ["my-local-model"]},
    ]}})
    assert [b.name for b in cfg.backends] == ["ollama", "plain-ollama", "openai"]


def test_missing_keys_skip_drops_the_backends_without_a_key_with_one_warning_each(clean_env, caplog):
    clean_env("XPL_TEST_UNSET_KEY", "ANTHROPIC_API_KEY")
    caplog.set_level(logging.WARNING, logger="xml_pipeline_llm")
    block = {"missing_keys": "skip", "backends": [
        {"provider": "xai", "name": "no-key", "api_key_env": "XPL_TEST_UNSET_KEY"},
        XAI, {"provider": "anthropic"}, {"provider": "ollama"}]}
    cfg = load_config({"llm": block})
    assert [b.name for b in cfg.backends] == ["xai", "ollama"]
    assert cfg.skipped == [("no-key", "XPL_TEST_UNSET_KEY not set"), ("anthropic", "ANTHROPIC_API_KEY not set")]
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert len(warnings) == 2
    assert "llm.backends[0] (no-key)" in warnings[0] and "XPL_TEST_UNSET_KEY" in warnings[0]
    assert "llm.backends[2] (anthropic)" in warnings[1] and "ANTHROPIC_API_KEY" in warnings[1]
    # the default stays an error, and the message says how to skip instead
    line = one_problem({**block, "missing_keys": "error", "backends": block["backends"][:2]})
    assert "XPL_TEST_UNSET_KEY is not set" in line and "missing_keys: skip" in line
    assert load_config({"llm": {"backends": [XAI]}}).skipped == []


def test_missing_keys_skip_with_no_backend_left_and_bad_values(clean_env, caplog):
    clean_env("XPL_TEST_UNSET_KEY", "ANTHROPIC_API_KEY")
    line = one_problem({"missing_keys": "skip", "backends": [
        {"provider": "xai", "api_key_env": "XPL_TEST_UNSET_KEY"}, {"provider": "anthropic"}]})
    assert line.startswith("llm.missing_keys: skip left no backend")
    assert "XPL_TEST_UNSET_KEY for xai" in line and "ANTHROPIC_API_KEY for anthropic" in line
    line = one_problem({"missing_keys": "ignore", "backends": [XAI]})
    assert line.startswith("llm.missing_keys:") and "error" in line and "skip" in line and '"ignore"' in line
    line = one_problem({"missing_key": "skip", "backends": [XAI]})
    assert 'did you mean "missing_keys"?' in line
    # a pasted key in api_key_env is never skipped silently
    line = one_problem({"missing_keys": "skip", "backends": [XAI, {**XAI, "name": "b", "api_key_env": SECRET}]})
    assert line.startswith("llm.backends[1].api_key_env:") and SECRET not in line


@pytest.mark.parametrize("pricing, says", [
    ({"grok-4.1": {"input_per_mtok": -1, "output_per_mtok": 15}},
     ['llm.pricing["grok-4.1"].input_per_mtok: expected a number >= 0', "got -1"]),
    ({"grok-*": {"input_per_mtok": 3, "outptu_per_mtok": 15}},
     ['llm.pricing["grok-*"].outptu_per_mtok: unknown key; did you mean "output_per_mtok"?',
      'llm.pricing["grok-*"].output_per_mtok: required key missing']),
    ({"grok-4.1": 3.0}, ['llm.pricing["grok-4.1"]: expected a mapping with input_per_mtok and output_per_mtok']),
    (["grok-4.1"], ["llm.pricing: expected a mapping of model names or patterns to prices"]),
    ({"grok-4.1": {"input_per_mtok": "cheap", "output_per_mtok": 1, "cached_input_per_mtok": -0.5}},
     ['llm.pricing["grok-4.1"].input_per_mtok: expected a number', 'got "cheap"',
      'llm.pricing["grok-4.1"].cached_input_per_mtok: expected a number >= 0']),
    ({"": {"input_per_mtok": 1, "output_per_mtok": 1}}, ["llm.pricing: an empty model name"]),
])
def test_bad_pricing_names_the_place_and_the_fix(pricing, says):
    text = "\n".join(problems({"pricing": pricing, "backends": [XAI]}))
    for fragment in says:
        assert fragment in text, text


def test_pricing_is_read_without_importing_litellm():
    import subprocess
    import sys

    code = ("import sys; from xml_pipeline_llm import load_config; "
            "c = load_config({'backends': [{'provider': 'ollama'}], 'pricing': {'grok-*': "
            "{'input_per_mtok': 3, 'output_per_mtok': 15.0, 'cached_input_per_mtok': 0.75}}}); "
            "p = c.pricing['grok-*']; assert (p.input_per_mtok, p.output_per_mtok, p.cached_input_per_mtok) "
            "== (3.0, 15.0, 0.75); assert 'litellm' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=60)
    assert out.stdout.strip() == "ok", out.stderr


def test_relative_usage_store_is_next_to_the_config_file(tmp_path: Path, monkeypatch):
    (tmp_path / "conf").mkdir()
    (tmp_path / "run").mkdir()
    path = tmp_path / "conf" / "organism.yaml"
    block = {"usage_store": "sqlite:///data/usage.db", "backends": [{"provider": "ollama"}]}
    path.write_text(__import__("yaml").safe_dump({"llm": block}))
    monkeypatch.chdir(tmp_path / "run")
    assert load_config(path).usage_store == f"sqlite:///{tmp_path / 'conf' / 'data' / 'usage.db'}"
    assert load_config("../conf/organism.yaml").usage_store == load_config(path).usage_store
    assert load_config({"llm": block}).usage_store == "sqlite:///data/usage.db"   # a dict: the working dir
    absolute = {**block, "usage_store": f"sqlite:///{tmp_path / 'abs.db'}"}
    path.write_text(__import__("yaml").safe_dump({"llm": absolute}))
    assert load_config(path).usage_store == absolute["usage_store"]


def test_provider_without_model_rule_requires_supported_models():
    line = one_problem({"backends": [{"provider": "groq", "api_key_env": "TEST_XAI_KEY"}]})
    assert line.startswith("llm.backends[0].supported_models: required for provider groq")
    cfg = load_config({"llm": {"backends": [{"provider": "groq", "api_key_env": "TEST_XAI_KEY",
                                             "supported_models": ["llama-3.3-70b"]}]}})
    assert cfg.backends[0].provider.litellm_prefix == "groq"


def test_several_mistakes_are_reported_together():
    lines = problems({"strategy": "fastest", "backends": [
        {**XAI, "rate_limit_tpm": "fast"},
        {"provider": "nope"},
        {**XAI, "name": "b", "max_concurrent": 0, "rate_limt_tpm": 5},
    ]})
    joined = "\n".join(lines)
    assert len(lines) == 5, lines
    for where in ("llm.strategy:", "llm.backends[0].rate_limit_tpm:", "llm.backends[1].provider:",
                  "llm.backends[2].max_concurrent:", "llm.backends[2].rate_limt_tpm:"):
        assert where in joined


def test_several_semantic_mistakes_are_reported_together(clean_env):
    clean_env("XPL_TEST_UNSET_KEY")
    lines = problems({"strategy": "x", "retry_base_delay": 5, "retry_max_delay": 1, "backends": [
        XAI, XAI, {"provider": "groq", "api_key_env": "XPL_TEST_UNSET_KEY"}]})
    joined = "\n".join(lines)
    for where in ("llm.strategy:", "llm.retry_max_delay:", "llm.backends[1].name:",
                  "llm.backends[2].supported_models:", "llm.backends[2].api_key_env:"):
        assert where in joined


def test_malformed_yaml_gives_file_and_line(tmp_path: Path):
    path = tmp_path / "organism.yaml"
    path.write_text("llm:\n  strategy: failover\n  backends:\n    - provider: xai\n     name: bad\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    msg = str(info.value)
    assert str(path) in msg and "line 5" in msg and "malformed YAML" in msg


def test_missing_file(tmp_path: Path):
    with pytest.raises(ConfigError) as info:
        load_config(tmp_path / "nope.yaml")
    assert "nope.yaml" in str(info.value) and "no such file" in str(info.value)


def test_file_without_llm_block(tmp_path: Path):
    path = tmp_path / "organism.yaml"
    path.write_text("name: demo\nagents:\n  - greeter\n")
    with pytest.raises(ConfigError) as info:
        load_config(path)
    assert "no llm: block" in str(info.value) and "backend" in str(info.value)


def test_llm_block_that_is_not_a_mapping():
    with pytest.raises(ConfigError) as info:
        load_config({"llm": ["xai"]})
    assert str(info.value).startswith("llm: expected a mapping")


# ------------------------------------------------------------ loading forms, .env, files

ORGANISM_YAML = """\
name: test-organism
agents: [greeter]
llm:
  strategy: round_robin
  backends:
    - provider: xai
      name: {name}
      api_key_env: {var}
"""


def test_three_loading_forms_give_the_same_config(tmp_path: Path):
    path = tmp_path / "organism.yaml"
    path.write_text(ORGANISM_YAML.format(name="forms", var="TEST_XAI_KEY"))
    block = {"strategy": "round_robin", "backends": [{"provider": "xai", "name": "forms",
                                                      "api_key_env": "TEST_XAI_KEY"}]}
    for source in (path, str(path), {"name": "o", "agents": ["greeter"], "llm": block}, block):
        cfg = load_config(source)
        assert cfg.strategy == "round-robin"
        assert [b.name for b in cfg.backends] == ["forms"]
        assert cfg.backends[0].api_key.get_secret_value() == FAKE_KEYS["TEST_XAI_KEY"]


def test_dotenv_in_working_directory_is_loaded(tmp_path: Path, monkeypatch, clean_env):
    clean_env("XPL_DOTENV_CWD_KEY")
    monkeypatch.chdir(tmp_path)
    block = {"backends": [{"provider": "xai", "api_key_env": "XPL_DOTENV_CWD_KEY"}]}
    with pytest.raises(ConfigError):
        load_config({"llm": block})
    (tmp_path / ".env").write_text("XPL_DOTENV_CWD_KEY=from-dotenv-cwd\n")
    cfg = load_config({"llm": block})
    assert cfg.backends[0].api_key.get_secret_value() == "from-dotenv-cwd"


def test_dotenv_next_to_config_file_is_loaded(tmp_path: Path, monkeypatch, clean_env):
    clean_env("XPL_DOTENV_FILE_KEY")
    conf, elsewhere = tmp_path / "conf", tmp_path / "elsewhere"
    conf.mkdir(), elsewhere.mkdir()
    monkeypatch.chdir(elsewhere)
    (conf / "organism.yaml").write_text(ORGANISM_YAML.format(name="beside", var="XPL_DOTENV_FILE_KEY"))
    (conf / ".env").write_text("XPL_DOTENV_FILE_KEY=from-dotenv-beside\n")
    cfg = load_config(conf / "organism.yaml")
    assert cfg.backends[0].api_key.get_secret_value() == "from-dotenv-beside"


def test_real_environment_wins_over_dotenv(tmp_path: Path, monkeypatch, clean_env):
    clean_env("XPL_DOTENV_REAL_KEY")
    monkeypatch.setenv("XPL_DOTENV_REAL_KEY", "from-real-env")
    monkeypatch.chdir(tmp_path)
    (tmp_path / ".env").write_text("XPL_DOTENV_REAL_KEY=from-dotenv\n")
    (tmp_path / "organism.yaml").write_text(ORGANISM_YAML.format(name="real", var="XPL_DOTENV_REAL_KEY"))
    for source in ("organism.yaml", {"llm": {"backends": [{"provider": "xai",
                                                            "api_key_env": "XPL_DOTENV_REAL_KEY"}]}}):
        assert load_config(source).backends[0].api_key.get_secret_value() == "from-real-env"


def in_a_fresh_process(code: str, cwd: Path, **env: str) -> Any:
    """Run ``code`` in a new interpreter (no process-wide router yet) in ``cwd``, without
    $XML_PIPELINE_LLM_CONFIG unless given; the JSON it prints last."""
    environ = {k: v for k, v in os.environ.items() if k != CONFIG_ENV}
    environ.update(env, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    proc = subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=cwd, env=environ,
                          capture_output=True, text=True, timeout=60)
    assert proc.returncode == 0, proc.stderr[-3000:]
    return json.loads(proc.stdout.strip().splitlines()[-1])


GET_ROUTER_TWICE = """
    import json
    from xml_pipeline_llm import ConfigError, get_router
    said = []
    for _ in range(2):
        try:
            router = get_router()
            said.append([[b.name for b in router.backends], router is get_router()])
        except ConfigError as exc:
            said.append(str(exc))
    print(json.dumps(said))
"""


def test_config_env_variable_names_the_file(tmp_path: Path, monkeypatch):
    (tmp_path / "cfgdir").mkdir()
    path = tmp_path / "cfgdir" / "my-organism.yaml"
    path.write_text(ORGANISM_YAML.format(name="via-env", var="TEST_XAI_KEY"))
    monkeypatch.chdir(tmp_path)   # no organism.yaml here
    monkeypatch.setenv(CONFIG_ENV, str(path))
    assert [b.name for b in load_config().backends] == ["via-env"]
    said = in_a_fresh_process(GET_ROUTER_TWICE, tmp_path, **{CONFIG_ENV: str(path)})
    assert said == [[["via-env"], True]] * 2


def test_get_router_reads_organism_yaml_in_working_directory(tmp_path: Path):
    (tmp_path / "organism.yaml").write_text(ORGANISM_YAML.format(name="from-cwd", var="TEST_XAI_KEY"))
    assert in_a_fresh_process(GET_ROUTER_TWICE, tmp_path) == [[["from-cwd"], True]] * 2


def test_get_router_without_any_config_says_what_to_create(tmp_path: Path):
    """Neither organism.yaml nor the variable: a ConfigError saying what to create, and no
    router left behind (asking again raises the same)."""
    first, again = in_a_fresh_process(GET_ROUTER_TWICE, tmp_path)
    assert "organism.yaml" in first and "llm:" in first and CONFIG_ENV in first
    assert again == first


@pytest.mark.parametrize("url", ["https://api.anthropic.com/v1", "https://api.anthropic.com/v1/",
                                 "https://api.anthropic.com"])
def test_anthropic_base_url_is_normalised_without_v1(url):
    cfg = load_config({"llm": {"backends": [{"provider": "anthropic", "api_key_env": "TEST_ANTHROPIC_KEY",
                                             "base_url": url}]}})
    assert cfg.backends[0].base_url == "https://api.anthropic.com"


def test_openai_compatible_base_url_keeps_v1():
    cfg = load_config({"llm": {"backends": [{"provider": "openai", "base_url": "http://localhost:8000/v1/",
                                             "supported_models": ["m"]}]}})
    assert cfg.backends[0].base_url == "http://localhost:8000/v1"


@pytest.mark.parametrize("url, says", [
    ("localhost:11434", "expected an http:// or https:// URL with a host"),
    ("ftp://files.example/v1", "expected an http:// or https:// URL with a host"),
    ("http://localhost:99999/v1", "is not a valid URL (Port out of range"),
    ("https://bob:hunter2@api.example/v1", '"https://bob:***@api.example/v1" holds a user name or password'),
])
def test_base_url_must_be_an_http_url_without_credentials(url, says):
    line = one_problem({"backends": [{"provider": "openai", "base_url": url, "supported_models": ["m"]}]})
    assert line.startswith("llm.backends[0].base_url: ") and says in line
    assert "hunter2" not in line
    assert "http://localhost:11434" in line or "api_key_env" in line    # the fix is named


# ------------------------------------------------------------ secrets

SECRET_BLOCKS = [
    {"backends": [{"provider": "xai", "api_key": SECRET, "rate_limit_tpm": "fast"}]},
    {"backends": [{"provider": "xai", "api_key": SECRET, "bogus": SECRET}]},
    {"backends": {"provider": "xai", "api_key": SECRET}},
    {"backends": [{"provider": "xai", "api_key": [SECRET]}]},
    {"backends": [{"provider": "xai", "api_key_env": SECRET}]},
    {"backends": [{"provider": "nope", "api_key": SECRET}]},
    {"strategy": "x", "backends": [{"provider": "xai", "api_key": SECRET}, {"provider": "xai", "api_key": SECRET}]},
    {"backends": [{"provider": "xai", "api_kee": SECRET}]},
    {"backends": [{"provider": "xai", "base_url": f"https://user:{SECRET}@api.x.ai/v1"}]},
    {"backends": [{"provider": "xai", "base_url": f"https://{SECRET}@api.x.ai/v1"}]},
]


@pytest.mark.parametrize("block", SECRET_BLOCKS)
def test_no_secret_in_config_errors(block, caplog):
    with caplog.at_level(logging.DEBUG):
        msg = "\n".join(problems(block))
    assert msg
    assert SECRET not in msg and SECRET[:12] not in msg
    assert SECRET not in caplog.text


def test_no_env_secret_in_config_errors():
    lines = problems({"backends": [{"provider": "xai", "api_key_env": "TEST_XAI_KEY", "rate_limit_tpm": 0},
                                   {"provider": "xai", "api_key_env": "TEST_XAI_KEY"}]})
    assert FAKE_KEYS["TEST_XAI_KEY"] not in "\n".join(lines)


def test_inline_api_key_warns_naming_api_key_env_but_not_the_key(caplog):
    with caplog.at_level(logging.WARNING, logger="xml_pipeline_llm"):
        cfg = load_config({"llm": {"backends": [{"provider": "xai", "api_key": SECRET}]}})
    warnings = [r for r in caplog.records if r.levelno == logging.WARNING]
    assert warnings, "an inline api_key must log a warning"
    text = " ".join(r.getMessage() for r in warnings)
    assert "api_key_env" in text and "llm.backends[0].api_key" in text
    assert SECRET not in text
    assert cfg.backends[0].api_key.get_secret_value() == SECRET


def test_no_secret_in_any_repr(sim):
    keys = [*FAKE_KEYS.values(), SECRET]
    router = make_router([backend(sim, "xai", "rp-xai"), backend(sim, "anthropic", "rp-ant"),
                          backend(sim, "openai", "rp-oai"),
                          {"provider": "xai", "name": "rp-inline", "api_key": SECRET}])
    cfg = router.config
    shown = [repr(cfg), str(cfg), repr(cfg.raw), str(cfg.raw), repr(router), str(router),
             *(repr(b) for b in cfg.backends), *(repr(b) for b in cfg.raw.backends),
             *(str(b) for b in cfg.backends)]
    for text in shown:
        for key in keys:
            assert key not in text, text


def _debug_everywhere(caplog) -> None:
    """DEBUG on the root logger and on LiteLLM's own loggers (restored after the test)."""
    caplog.set_level(logging.DEBUG)
    for name in ("LiteLLM", "LiteLLM Router", "LiteLLM Proxy", "httpx", "httpcore"):
        caplog.set_level(logging.DEBUG, logger=name)


def _assert_no_key_in_records(caplog, keys):
    assert caplog.records, "expected some log records at DEBUG"
    for record in caplog.records:
        text = record.getMessage() + repr(record.args) + (record.exc_text or "")
        if record.exc_info:
            text += logging.Formatter().formatException(record.exc_info)
        for key in keys:
            assert key not in text, f"{record.name}: {text[:300]}"
    for key in keys:
        assert key not in caplog.text


async def test_no_secret_in_logs_of_a_successful_call(sim, caplog):
    router = make_router([backend(sim, "xai", "lg-ok-xai"), backend(sim, "anthropic", "lg-ok-ant"),
                          backend(sim, "openai", "lg-ok-oai")])
    _debug_everywhere(caplog)
    for model in ("grok-4.1", "claude-sonnet-4", "gpt-4o"):
        resp = await router.complete(model, MESSAGES, agent_id="secret-test")
        assert resp.content
    _assert_no_key_in_records(caplog, FAKE_KEYS.values())


async def test_no_secret_in_logs_or_error_of_a_failed_401_call(sim, caplog):
    names = ["lg-401-xai", "lg-401-ant"]
    router = make_router([backend(sim, "xai", names[0]), backend(sim, "anthropic", names[1])])
    for name in names:
        sim.require_key(name, "some-other-key")
    _debug_everywhere(caplog)
    try:
        for model in ("grok-4.1", "claude-sonnet-4"):
            with pytest.raises(BackendError) as info:
                await router.complete(model, MESSAGES)
            err = info.value
            assert "401" in str(err)
            shown = str(err) + repr(err) + repr(err.attempts) + " ".join(a.detail for a in err.attempts)
            for key in FAKE_KEYS.values():
                assert key not in shown
        _assert_no_key_in_records(caplog, FAKE_KEYS.values())
    finally:
        for name in names:
            sim.require_key(name, None)


async def test_inline_api_key_is_sent_but_never_logged(sim, caplog):
    name = "lg-inline"
    sim.require_key(name, SECRET)
    try:
        _debug_everywhere(caplog)
        router = LLMRouter(load_config({"llm": {"backends": [
            {"provider": "xai", "name": name, "api_key": SECRET, "base_url": sim.base_url(name, "xai")}]}}))
        resp = await router.complete("grok-4.1", MESSAGES)
        assert resp.backend == name
        assert sim.stats(name).last_request.headers["authorization"] == f"Bearer {SECRET}"
        assert any("api_key_env" in r.getMessage() for r in caplog.records if r.levelno == logging.WARNING)
        _assert_no_key_in_records(caplog, [SECRET])
    finally:
        sim.require_key(name, None)
