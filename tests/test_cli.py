"""The command line, run as a user runs it: a subprocess per command.

Every command that makes a call imports LiteLLM (seconds), so those tests are
few and each checks several things.  The provider simulator the ``-c FILE``
tests talk to runs in this process (the session fixture ``sim``).
"""

from __future__ import annotations

import asyncio
import csv
import io
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest
import yaml
from conftest import FAKE_KEYS, MESSAGES

from xml_pipeline_llm.simulator import Fault

CLI = [sys.executable, "-m", "xml_pipeline_llm.cli"]
ANSI = "\x1b["


def _env(extra: dict[str, str] | None) -> dict[str, str]:
    e = {k: v for k, v in os.environ.items()
         if k not in ("XML_PIPELINE_LLM_CONFIG", "FORCE_COLOR", "TTY_COMPATIBLE")}
    e.update({"COLUMNS": "80", "PYTHONUNBUFFERED": "1"}, **(extra or {}))
    return e


def run(cwd: Path, *args: str, env: dict[str, str] | None = None, timeout: float = 90,
        stdin: str | None = None) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], cwd=cwd, env=_env(env), capture_output=True, text=True,
                          timeout=timeout, input=stdin)


def run_many(cwd: Path, *commands: tuple[str, ...], env: dict[str, str] | None = None,
             timeout: float = 90, stdin: dict[int, Path] | None = None) -> list[subprocess.CompletedProcess[str]]:
    """Several commands at once: each one that calls a provider spends seconds importing LiteLLM.

    ``stdin`` maps a command's index to a file it reads as standard input.
    """
    procs = []
    for i, args in enumerate(commands):
        source = open((stdin or {})[i], "rb") if i in (stdin or {}) else subprocess.DEVNULL
        procs.append(subprocess.Popen([*CLI, *args], cwd=cwd, env=_env(env), stdout=subprocess.PIPE,
                                      stderr=subprocess.PIPE, stdin=source, text=True))
        if source is not subprocess.DEVNULL:
            source.close()
    done = []
    for args, proc in zip(commands, procs):
        out, err = proc.communicate(timeout=timeout)
        done.append(subprocess.CompletedProcess([*CLI, *args], proc.returncode, out, err))
    return done


def assert_user_error(p: subprocess.CompletedProcess[str], *fragments: str) -> None:
    assert p.returncode == 1, (p.stdout, p.stderr)
    assert "Traceback" not in p.stderr + p.stdout
    assert p.stderr.startswith("error: "), p.stderr
    for fragment in fragments:
        assert fragment in p.stderr, p.stderr


def assert_plain(text: str, path: Path | None = None) -> None:
    """Piped output: no colour codes, and nothing wider than 80 columns (but a line naming ``path``)."""
    assert ANSI not in text
    lines = [line for line in text.splitlines() if path is None or str(path) not in line]
    assert max((len(line) for line in lines), default=0) <= 80, text


def write_config(path: Path, backends: list[dict], **llm) -> Path:
    path.write_text(yaml.safe_dump({"llm": {**llm, "backends": backends}}), encoding="utf-8")
    return path


# ---------------------------------------------------------------- help, version

@pytest.mark.parametrize("command", ["", "init", "check", "complete", "usage", "budgets", "simulate", "demo", "top"])
def test_help_answers_fast_with_an_example(tmp_path, command):
    start = time.perf_counter()
    p = run(tmp_path, *([command] if command else []), "--help")
    took = time.perf_counter() - start
    assert p.returncode == 0, p.stderr
    assert p.stdout.startswith("usage: xml-pipeline-llm")
    assert "xml-pipeline-llm demo" in p.stdout if not command else f"xml-pipeline-llm {command}" in p.stdout
    if command:
        assert "examples:" in p.stdout
    assert took < 5, took   # litellm alone takes seconds: it is not imported for --help


def test_help_imports_neither_litellm_nor_the_simulator(tmp_path):
    code = ("import sys; from xml_pipeline_llm import cli; cli.build_parser(); "
            "bad = [m for m in ('litellm', 'xml_pipeline_llm.simulator', 'rich', 'aiohttp') if m in sys.modules]; "
            "print(bad); sys.exit(1 if bad else 0)")
    p = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=30, cwd=tmp_path)
    assert p.returncode == 0, p.stdout + p.stderr


def test_version_and_usage_mistakes(tmp_path):
    from xml_pipeline_llm import __version__

    p = run(tmp_path, "--version")
    assert p.returncode == 0 and p.stdout.strip() == f"xml-pipeline-llm {__version__}"
    assert_user_error(run(tmp_path, "check", "--bogus"), "unrecognized arguments: --bogus",
                      "xml-pipeline-llm check --help")
    assert_user_error(run(tmp_path, "demo", "--requests", "0"), "--requests", "positive integer")
    assert_user_error(run(tmp_path, "simulate", "--fault-rate", "2"), "--fault-rate")
    assert_user_error(run(tmp_path, "frobnicate"), "invalid choice")
    assert_user_error(run(tmp_path, "complete", "hello"), "-m/--model")


# ---------------------------------------------------------------- init, packaged files

def _packaged(name: str) -> str:
    from importlib.resources import files

    return files("xml_pipeline_llm").joinpath("data", name).read_text(encoding="utf-8")


def test_init_writes_a_commented_organism_yaml_and_env_and_never_overwrites_without_force(tmp_path):
    p = run(tmp_path, "init")
    assert p.returncode == 0, p.stderr
    organism, env = tmp_path / "organism.yaml", tmp_path / ".env"
    assert organism.read_text(encoding="utf-8") == _packaged("organism.example.yaml")
    assert "wrote organism.yaml" in p.stdout and "wrote .env" in p.stdout
    assert "xml-pipeline-llm check" in p.stdout and "xml-pipeline-llm complete" in p.stdout
    assert_plain(p.stdout + p.stderr)
    lines = env.read_text(encoding="utf-8").splitlines()
    assert [x for x in lines if not x.startswith("#")] == ["XAI_API_KEY=", "ANTHROPIC_API_KEY=", "OPENAI_API_KEY="]
    assert lines[0].startswith("# ") and "# GROQ_API_KEY=" in lines         # a commented-out backend's
    assert env.stat().st_mode & 0o077 == 0                                  # keys go there: owner only
    assert sorted(x.name for x in tmp_path.iterdir()) == [".env", "organism.yaml"]

    organism.write_text("# mine\n", encoding="utf-8")
    again = run(tmp_path, "init")
    assert_user_error(again, "organism.yaml and .env already exist", "--force", "nothing was written")
    assert len(again.stderr.splitlines()) == 1 and again.stdout == ""
    assert organism.read_text(encoding="utf-8") == "# mine\n"
    env.unlink()                                  # one of the two there: still refused, and named
    assert_user_error(run(tmp_path, "init"), "organism.yaml already exists", "--force")
    assert not env.exists()
    p = run(tmp_path, "init", "--force", "--dashboard")
    assert p.returncode == 0, p.stderr
    assert organism.read_text(encoding="utf-8") == _packaged("organism.example.yaml") and env.exists()
    assert json.loads((tmp_path / "grafana-dashboard.json").read_text())["panels"]

    # the written files work: with keys in .env, check validates them; --simulate answers from them
    env.write_text(env.read_text().replace("XAI_API_KEY=", "XAI_API_KEY=xai-not-a-real-key")
                   .replace("ANTHROPIC_API_KEY=", "ANTHROPIC_API_KEY=sk-ant-not-real")
                   .replace("OPENAI_API_KEY=", "OPENAI_API_KEY=sk-not-real"))
    env_vars = {k: v for k, v in _env({"COLUMNS": "200"}).items()
                if k not in ("XAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_KEY")}    # from .env only
    checked = subprocess.run([*CLI, "check"], cwd=tmp_path, env=env_vars, capture_output=True, text=True,
                             timeout=90)
    assert checked.returncode == 0, checked.stderr
    assert "XAI_API_KEY (set)" in checked.stdout and "xai-not-a-real-key" not in checked.stdout


def test_complete_simulate_uses_the_organism_yaml_here_and_names_a_model_no_backend_serves(tmp_path):
    here, bare = tmp_path / "here", tmp_path / "bare"
    here.mkdir()
    bare.mkdir()
    write_config(here / "organism.yaml", [{"provider": "openai", "name": "my-openai", "api_key_env": "NOT_SET_KEY"},
                                          {"provider": "ollama", "name": "my-ollama", "supported_models": ["llama3"]}])
    other = write_config(tmp_path / "other.yaml", [{"provider": "anthropic", "name": "other-anthropic"}])
    env = {k: "" for k in ("XAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_KEY", "NOT_SET_KEY")}
    sent, local, unknown = run_many(here, ("complete", "--simulate", "-m", "gpt-4o", "hi"),
                                    ("complete", "--simulate", "-m", "llama3", "hi"),
                                    ("complete", "--simulate", "-m", "grok-4.1", "hi"),   # no xai backend there
                                    env=env)
    given, built_in, built_in_unknown = run_many(
        bare, ("complete", "--simulate", "-c", str(other), "-m", "claude-sonnet-4", "hi"),
        ("complete", "--simulate", "-m", "gpt-4o", "hi"),           # no organism.yaml: the built-in backends
        ("complete", "--simulate", "-m", "frobnicator-1", "hi"),    # none serves it: no silent catch-all
        env=env)
    assert sent.returncode == 0 and sent.stdout == "Hello from my-openai: hi\n", sent.stderr
    assert local.returncode == 0 and local.stdout == "Hello from my-ollama: hi\n", local.stderr
    assert_user_error(unknown, 'no backend serves model "grok-4.1"', "my-openai", "my-ollama")
    assert len(unknown.stderr.splitlines()) == 1
    assert given.returncode == 0 and given.stdout == "Hello from other-anthropic: hi\n", given.stderr
    assert built_in.returncode == 0 and built_in.stdout == "Hello from openai: hi\n", built_in.stderr
    assert_user_error(built_in_unknown, 'no backend serves model "frobnicator-1"', "ollama (ollama): llama*")
    assert sorted(x.name for x in here.iterdir()) == ["organism.yaml"] and not list(bare.iterdir())


def test_the_example_and_the_dashboard_ship_inside_the_package():
    example, dashboard = _packaged("organism.example.yaml"), json.loads(_packaged("grafana-dashboard.json"))
    assert yaml.safe_load(example)["llm"]["backends"] and dashboard["panels"]
    root = Path(__file__).parent.parent
    assert not (root / "organism.example.yaml").exists()         # one copy: the package's


@pytest.mark.skipif(not (Path(__file__).parent.parent / "pyproject.toml").exists(), reason="a source checkout only")
def test_a_built_wheel_holds_the_example_and_the_dashboard(tmp_path):
    import zipfile

    root, src = Path(__file__).parent.parent, tmp_path / "src"      # a clean copy: no build/ or egg-info
    src.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(root / name, src / name)
    shutil.copytree(root / "xml_pipeline_llm", src / "xml_pipeline_llm",
                    ignore=shutil.ignore_patterns("__pycache__", "*.egg-info"))
    p = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "-q", "-w", str(tmp_path), str(src)],
                       capture_output=True, text=True, timeout=180, cwd=tmp_path)
    if p.returncode != 0 and ("No matching distribution found for setuptools" in p.stderr
                              or "Could not find a version that satisfies" in p.stderr):
        pytest.skip(f"pip cannot fetch the build backend here (offline?): {p.stderr.strip()[-200:]}")
    assert p.returncode == 0, p.stderr[-3000:]
    wheel = next(tmp_path.glob("xml_pipeline_llm-*.whl"))
    with zipfile.ZipFile(wheel) as z:
        names = set(z.namelist())
        assert {"xml_pipeline_llm/data/organism.example.yaml", "xml_pipeline_llm/data/grafana-dashboard.json"} <= names
        assert z.read("xml_pipeline_llm/data/organism.example.yaml").decode() == _packaged("organism.example.yaml")


# ---------------------------------------------------------------- check

def test_check_prints_the_routing_table_without_secrets(tmp_path):
    secret = FAKE_KEYS["TEST_XAI_KEY"]
    cfg = write_config(tmp_path / "organism.yaml", [
        {"provider": "xai", "name": "xai-main", "api_key_env": "TEST_XAI_KEY", "rate_limit_tpm": 100000,
         "max_concurrent": 8},
        {"provider": "anthropic", "api_key_env": "TEST_ANTHROPIC_KEY", "base_url": "https://api.anthropic.com/v1",
         "priority": 2},
        {"provider": "ollama", "base_url": "http://localhost:11434",
         "supported_models": ["llama3", "mistral*"]},
    ], strategy="round_robin", shared_state="redis://bare-pw-not-shown@127.0.0.1:6399/0")
    p = run(tmp_path, "check")          # ./organism.yaml by default
    assert p.returncode == 0, p.stderr
    out = p.stdout
    for text in ("xai-main", "grok-*", "100,000", "TEST_XAI_KEY (set)", "anthropic", "claude-*",
                 "ollama", "llama3, mistral*", "none needed", "round-robin", "config OK"):
        assert text in out, (text, out)
    assert secret not in out + p.stderr
    assert FAKE_KEYS["TEST_ANTHROPIC_KEY"] not in out + p.stderr
    # passwords inside URLs are not printed either
    assert "http://localhost:11434" in out and "redis://***@127.0.0.1:6399/0" in out
    assert "not-shown" not in out + p.stderr
    assert_plain(out)
    # -c and $XML_PIPELINE_LLM_CONFIG name the same file
    other = tmp_path / "sub"
    other.mkdir()
    assert run(other, "check", "-c", str(cfg)).stdout == run(
        other, "check", env={"XML_PIPELINE_LLM_CONFIG": str(cfg)}).stdout


def test_check_prints_the_aliases_with_their_chains_and_the_rpm(tmp_path):
    cfg = write_config(tmp_path / "organism.yaml", [
        {"provider": "xai", "name": "xai-main", "api_key_env": "TEST_XAI_KEY", "rate_limit_rpm": 450},
        {"provider": "anthropic", "api_key_env": "TEST_ANTHROPIC_KEY"},
    ], models={"smart": ["grok-4.1", "claude-sonnet-4"]})
    p = run(tmp_path, "check", "-c", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "RPM" in p.stdout and "450" in p.stdout
    assert "smart: grok-4.1 [xai-main] -> claude-sonnet-4 [anthropic]" in p.stdout


def test_check_lists_the_backends_skipped_for_a_missing_key(tmp_path):
    cfg = write_config(tmp_path / "organism.yaml", [
        {"provider": "xai", "name": "xai-main", "api_key_env": "XPL_TEST_NEVER_SET"},
        {"provider": "anthropic", "api_key_env": "TEST_ANTHROPIC_KEY"},
    ], missing_keys="skip")
    p = run(tmp_path, "check", "-c", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "xai-main: skipped (XPL_TEST_NEVER_SET not set)" in p.stdout and "config OK" in p.stdout
    table = p.stdout.split("xai-main: skipped")[0]
    assert "anthropic" in table and "xai-main" not in table      # only the backend with a key routes
    (warning,) = [line for line in p.stderr.splitlines() if line.startswith("warning: ")]
    assert "xai-main" in warning and "XPL_TEST_NEVER_SET" in warning
    assert FAKE_KEYS["TEST_ANTHROPIC_KEY"] not in p.stdout + p.stderr
    none_left = write_config(tmp_path / "none.yaml", [
        {"provider": "xai", "name": "xai-main", "api_key_env": "XPL_TEST_NEVER_SET"}], missing_keys="skip")
    assert_user_error(run(tmp_path, "check", "-c", str(none_left)), "llm.missing_keys: skip left no backend",
                      "XPL_TEST_NEVER_SET for xai-main")


@pytest.mark.parametrize("text, fragments", [
    ("llm:\n  backends:\n    - provider: xai\n      rate_limt_tpm: 5\n      api_key_env: TEST_XAI_KEY\n",
     ["llm.backends[0].rate_limt_tpm", 'did you mean "rate_limit_tpm"']),
    ("llm:\n  strategy: fastest\n  backends:\n    - provider: ollama\n",
     ['unknown strategy "fastest"', "failover, round-robin, least-loaded"]),
    ("llm:\n  backends:\n    - provider: xai\n      api_key_env: XPL_TEST_NEVER_SET\n",
     ["XPL_TEST_NEVER_SET is not set"]),
    ("llm:\n  backends: [\n", ["malformed YAML", "line 3"]),
    ("llm:\n  backends:\n    - provider: ollama\n      max_concurrent: fast\n",
     ['llm.backends[0].max_concurrent: expected a positive integer, got "fast"']),
    ("llm:\n  backends:\n    - provider: ollama\n      base_url: http://proxy:pw-not-shown@localhost:11434\n",
     ['llm.backends[0].base_url: "http://proxy:***@localhost:11434" holds a user name or password']),
])
def test_check_broken_config_is_one_error_line_per_problem(tmp_path, text, fragments):
    (tmp_path / "bad.yaml").write_text(text, encoding="utf-8")
    p = run(tmp_path, "check", "-c", "bad.yaml")
    assert_user_error(p, *fragments)
    assert p.stdout == "" and "not-shown" not in p.stderr
    assert all(line.startswith("error: ") for line in p.stderr.splitlines())


def test_check_missing_config_and_debug_traceback(tmp_path):
    assert_user_error(run(tmp_path, "check"), "no organism.yaml in", "XML_PIPELINE_LLM_CONFIG")
    assert_user_error(run(tmp_path, "check", "-c", "nope.yaml"), "nope.yaml: no such file")
    p = run(tmp_path, "check", "-c", "nope.yaml", "--debug")
    assert p.returncode == 1 and "Traceback" in p.stderr and "ConfigError" in p.stderr


# ---------------------------------------------------------------- complete

def test_complete_simulate_needs_no_keys(tmp_path):
    env = {k: "" for k in ("XAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_KEY")}
    p = run(tmp_path, "complete", "--simulate", "-m", "grok-4.1", "Say", "hello", "to", "the", "tests", env=env)
    assert p.returncode == 0, p.stderr
    assert p.stdout == "Hello from xai: Say hello to the tests\n"
    assert "xai" in p.stderr and "tokens" in p.stderr     # the summary goes to stderr
    assert_plain(p.stdout + p.stderr)
    assert not list(tmp_path.iterdir())                    # no ledger, no files


def test_complete_with_config_then_usage_from_the_ledger(tmp_path, sim):
    ledger = tmp_path / "usage.db"
    cfg = write_config(tmp_path / "org.yaml", [
        {"provider": "xai", "name": "cli-xai", "api_key_env": "TEST_XAI_KEY",
         "base_url": sim.base_url("cli-xai", "xai")},
        {"provider": "anthropic", "name": "cli-anthropic", "api_key_env": "TEST_ANTHROPIC_KEY",
         "base_url": sim.base_url("cli-anthropic", "anthropic")},
    ], usage_store=f"sqlite:///{ledger}", retry_base_delay=0.02, retry_max_delay=0.1)
    sim.reset("cli-xai")
    sim.require_key("cli-xai", FAKE_KEYS["TEST_XAI_KEY"])   # the key from api_key_env reaches the wire

    (tmp_path / "prompt.txt").write_text("count to ten\n")
    p, streamed = run_many(
        tmp_path,
        ("complete", "-c", str(cfg), "-m", "grok-4.1", "--agent", "alice", "--thread", "t-1",
         "--max-tokens", "3", "--json", "-"),
        ("complete", "-c", str(cfg), "-m", "claude-sonnet-4-5", "--agent", "bob", "--stream",
         "--system", "Be terse.", "write", "a", "line"),
        stdin={0: tmp_path / "prompt.txt"})
    assert p.returncode == 0, p.stderr
    data = json.loads(p.stdout)
    assert data["content"] == "Hello from cli-xai:" and data["finish_reason"] == "length"
    assert data["backend"] == "cli-xai" and data["model"]
    assert data["usage"] == {"prompt_tokens": 6, "completion_tokens": 3, "total_tokens": 9,
                             "cached_tokens": 0, "cache_write_tokens": 0, "reasoning_tokens": 0}
    assert set(data) == {"content", "model", "usage", "finish_reason", "backend", "cost_usd", "latency_ms",
                         "tool_calls"}
    assert data["tool_calls"] == [] and data["latency_ms"] > 0
    assert streamed.returncode == 0, streamed.stderr
    assert streamed.stdout == "Hello from cli-anthropic: write a line\n"
    assert sim.stats("cli-anthropic").last_request.json["system"]     # --system reached the wire
    assert sim.stats("cli-xai").requests == 1 and sim.stats("cli-anthropic").requests >= 1
    secrets = list(FAKE_KEYS.values())

    # usage: the ledger named by the config, as a table with a totals row
    p = run(tmp_path, "usage", "-c", str(cfg))
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines() if line.strip()}
    assert rows["alice"][1:5] == ["6", "3", "9", "1"]
    assert rows["bob"][4] == "1"
    assert rows["total"][4] == "2" and rows["total"][5] == "0"
    assert_plain(p.stdout, tmp_path)

    # --store URL or path, --by, --since, --csv
    p = run(tmp_path, "usage", "--store", f"sqlite:///{ledger}", "--by", "backend", "--since", "1h")
    assert p.returncode == 0 and "cli-xai" in p.stdout and "cli-anthropic" in p.stdout
    p = run(tmp_path, "usage", "--store", str(ledger), "--since", "2999-01-01")
    assert p.returncode == 0 and "no calls recorded" in p.stdout
    p = run(tmp_path, "usage", "--store", str(ledger), "--by", "event", "--csv", "events.csv")
    assert p.returncode == 0, p.stderr
    with open(tmp_path / "events.csv", newline="") as fh:
        events = list(csv.DictReader(fh))
    events.sort(key=lambda e: e["agent_id"])
    assert [e["agent_id"] for e in events] == ["alice", "bob"]
    assert events[0]["thread_id"] == "t-1" and events[0]["outcome"] == "ok"
    assert events[0]["timestamp"].endswith("Z")
    p = run(tmp_path, "usage", "--store", str(ledger), "--by", "model", "--csv", "-")
    assert p.returncode == 0
    by_model = {r["model"]: r for r in csv.DictReader(p.stdout.splitlines())}
    assert by_model["grok-4.1"]["total_tokens"] == "9" and by_model["claude-sonnet-4-5"]["request_count"] == "1"
    for out in (p.stdout, p.stderr, (tmp_path / "events.csv").read_text()):
        assert not any(s in out for s in secrets)


def test_complete_user_mistakes_are_one_line(tmp_path, sim):
    cfg = write_config(tmp_path / "org.yaml", [
        {"provider": "xai", "name": "cli-down", "api_key_env": "TEST_XAI_KEY",
         "base_url": sim.base_url("cli-down", "xai")},
    ], retries=2, retry_base_delay=0.01, retry_max_delay=0.05)
    sim.reset("cli-down")
    sim.script("cli-down", [Fault.status(500)] * 3)
    down, unknown, missing, no_config = run_many(
        tmp_path,
        ("complete", "-c", str(cfg), "-m", "grok-4.1", "hi"),         # provider down: every try a 500
        ("complete", "-c", str(cfg), "-m", "claude-x", "hi"),         # unknown model: no call made
        ("complete", "--simulate", "-c", "missing.yaml", "-m", "grok-4.1", "hi"),
        ("complete", "-m", "grok-4.1", "hi"))                         # no organism.yaml here
    assert_user_error(down, "all 3 tries failed", "cli-down: server_error 500")
    assert len(down.stderr.splitlines()) == 1
    assert sim.stats("cli-down").requests == 3
    assert_user_error(unknown, 'no backend serves model "claude-x"', "cli-down (xai): grok-*")
    assert_user_error(missing, "missing.yaml: no such file")
    assert_user_error(no_config, "no organism.yaml in")
    no_key = run(tmp_path, "complete", "-c", str(cfg), "-m", "grok-4.1", "hi", env={"TEST_XAI_KEY": ""})
    assert_user_error(no_key, "TEST_XAI_KEY is not set")


def test_relative_ledger_is_next_to_the_config_file_from_any_directory(tmp_path, sim):
    project, elsewhere, third = tmp_path / "project", tmp_path / "elsewhere", tmp_path / "third"
    for d in (project, elsewhere, third):
        d.mkdir()
    cfg = write_config(project / "organism.yaml", [
        {"provider": "xai", "name": "cli-rel", "api_key_env": "TEST_XAI_KEY",
         "base_url": sim.base_url("cli-rel", "xai")}], usage_store="sqlite:///data/usage.db")
    done, both = run_many(elsewhere,
                          ("complete", "-c", "../project/organism.yaml", "-m", "grok-4.1", "--agent", "rel", "hi"),
                          ("complete", "-c", str(cfg), "-m", "grok-4.1", "--stream", "--json", "hi"))
    assert done.returncode == 0, done.stderr
    assert (project / "data" / "usage.db").is_file() and not (elsewhere / "data").exists()
    assert_user_error(both, "--stream and --json cannot be combined")
    assert len(both.stderr.splitlines()) == 1
    p = run(third, "usage", "-c", "../project/organism.yaml")      # the same ledger, found from elsewhere
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines() if line.strip()}
    assert rows["rel"][4] == "1", p.stdout
    assert str(project / "data" / "usage.db") in p.stdout


def test_usage_mistakes(tmp_path):
    assert_user_error(run(tmp_path, "usage"), "no usage ledger", "--store", "no -c FILE")
    no_store = write_config(tmp_path / "plain.yaml", [{"provider": "ollama"}])
    assert_user_error(run(tmp_path, "usage", "-c", str(no_store)),
                      f"({no_store} has no llm.usage_store or llm.shared_state)")
    assert_user_error(run(tmp_path, "usage", "--store", "sqlite:///missing.db"), "missing.db",
                      "no usage ledger there")
    assert_user_error(run(tmp_path, "usage", "--store", "postgres://x/usage"), "expected sqlite:///")
    assert_user_error(run(tmp_path, "usage", "--store", f"redis://127.0.0.1:{_free_port()}/0"), "Redis")
    (tmp_path / "u.db").write_bytes(b"")
    assert_user_error(run(tmp_path, "usage", "--store", "u.db", "--since", "yesterday"), "--since")
    assert_user_error(run(tmp_path, "usage", "--by", "color"), "invalid choice")


# ---------------------------------------------------------------- demo

def test_demo_runs_offline_and_writes_the_csv(tmp_path):
    env = {k: "" for k in ("XAI_API_KEY", "ANTHROPIC_API_KEY", "OPENAI_API_KEY")}
    start = time.perf_counter()
    p = run(tmp_path, "demo", "--requests", "12", "--concurrency", "6", env=env, timeout=60)
    took = time.perf_counter() - start
    assert p.returncode == 0, p.stdout + p.stderr
    assert took < 30, took
    out = p.stdout
    for text in ("failover:", "round-robin:", "least-loaded:", "Strategies", "Backends", "Agents",
                 "Fallback across models", "xai-main down",
                 "xai-main", "anthropic-main", "openai-main", "Peak in flight", "researcher", "writer",
                 "critic", "planner", "total", "Prompt cache: agent 'looper'", "saved"):
        assert text in out, (text, out)
    assert "Traceback" not in p.stderr
    assert_plain(out, tmp_path)
    path = tmp_path / "xml-pipeline-llm-demo-usage.csv"
    assert str(path) in out
    with open(path, newline="") as fh:
        rows = list(csv.DictReader(fh))
    assert {r["agent_id"] for r in rows} == {"researcher", "writer", "critic", "planner"}
    assert sum(int(r["request_count"]) + int(r["error_count"]) for r in rows) == 36
    assert all(int(r["total_tokens"]) > 0 for r in rows)


# ---------------------------------------------------------------- simulate

def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_simulate_answers_and_stops_on_sigint(tmp_path):
    port = _free_port()
    env = {k: v for k, v in os.environ.items() if k != "XML_PIPELINE_LLM_CONFIG"}
    proc = subprocess.Popen([*CLI, "simulate", "--port", str(port)], cwd=tmp_path, env=env,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    try:
        lines = []
        deadline = time.monotonic() + 30
        while time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line:
                break
            lines.append(line)
            if "listening on" in line:
                break
        assert any(f"127.0.0.1:{port}" in line for line in lines), lines
        body = json.dumps({"model": "grok-4.1", "messages": [{"role": "user", "content": "ping the sim"}]})
        req = urllib.request.Request(f"http://127.0.0.1:{port}/b/mine/v1/chat/completions", data=body.encode(),
                                     headers={"Content-Type": "application/json",
                                              "Authorization": "Bearer anything"})
        with urllib.request.urlopen(req, timeout=10) as resp:
            answer = json.loads(resp.read())
        assert answer["choices"][0]["message"]["content"] == "Hello from mine: ping the sim"
        assert answer["usage"]["total_tokens"] > 0
        proc.send_signal(signal.SIGINT)
        out, err = proc.communicate(timeout=15)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 0, err
    assert "Traceback" not in out + err


# ---------------------------------------------------------------- usage from Redis

@pytest.fixture
def redis_url(tmp_path):
    server = shutil.which("redis-server")
    if server is None:
        pytest.skip("redis-server is not installed")
    pytest.importorskip("redis")
    port = _free_port()
    proc = subprocess.Popen([server, "--port", str(port), "--bind", "127.0.0.1", "--save", "",
                             "--appendonly", "no", "--dir", str(tmp_path)],
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    try:
        deadline = time.monotonic() + 10
        while time.monotonic() < deadline:
            try:
                socket.create_connection(("127.0.0.1", port), timeout=0.2).close()
                break
            except OSError:
                time.sleep(0.05)
        yield f"redis://127.0.0.1:{port}/0"
    finally:
        proc.terminate()
        proc.wait(timeout=10)


def test_usage_reads_the_fleet_totals_in_redis(tmp_path, redis_url):
    import asyncio

    from xml_pipeline_llm.stores import open_store
    from xml_pipeline_llm.usage import UsageEvent

    store = open_store(redis_url, "clitest")

    async def write() -> None:
        for i, (agent, model, cost) in enumerate([("alice", "grok-4.1", None), ("bob", "gpt-4o-mini", 0.25),
                                                  ("alice", "gpt-4o-mini", 0.5)]):
            await store.append(UsageEvent(time.time(), agent, "t", model, "b1", "xai", 3, 2, 5, cost, 10.0,
                                          "ok", f"call-{i}"))
        await store.close()

    asyncio.run(write())
    cfg = write_config(tmp_path / "org.yaml", [{"provider": "ollama"}], shared_state=redis_url,
                       redis_prefix="clitest")
    p = run(tmp_path, "usage", "-c", str(cfg))             # shared_state is where the usage is
    assert p.returncode == 0, p.stderr
    rows = {line.split()[0]: line.split() for line in p.stdout.splitlines()[1:] if line.strip()}
    assert rows["alice"][1:5] == ["6", "4", "10", "2"] and rows["alice"][6] == "0.500000"
    assert rows["total"][4] == "3" and rows["total"][6] == "0.750000"
    p = run(tmp_path, "usage", "--store", redis_url, "--redis-prefix", "clitest", "--by", "event", "--csv", "-")
    assert p.returncode == 0, p.stderr
    events = list(csv.DictReader(p.stdout.splitlines()))
    assert [e["agent_id"] for e in events] == ["alice", "bob", "alice"]
    assert [e["cost_usd"] for e in events] == ["", "0.25", "0.5"]
    p = run(tmp_path, "usage", "--store", redis_url, "--by", "model")     # prefix "xpl": nothing there
    assert p.returncode == 0 and "no calls recorded" in p.stdout


def test_budgets_shows_spend_limit_and_reset_from_the_ledger(tmp_path, sim):
    from xml_pipeline_llm import LLMRouter, load_config

    ledger = tmp_path / "usage.db"
    cfg = write_config(tmp_path / "org.yaml", [
        {"provider": "xai", "name": "cli-bud", "api_key_env": "TEST_XAI_KEY",
         "base_url": sim.base_url("cli-bud", "xai")}],
        usage_store=f"sqlite:///{ledger}", budgets=[{"scope": "agent", "max_tokens": 5000, "window": "1d"},
                                                    {"scope": "global", "max_tokens": 90000}])
    router = LLMRouter(load_config(cfg))

    async def spend() -> int:
        resp = await router.complete("grok-4.1", MESSAGES, agent_id="spender", max_tokens=10)
        await router.aclose()
        return resp.usage["total_tokens"]

    used = asyncio.run(spend())
    p = run(tmp_path, "budgets", "-c", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "spender" in p.stdout and f"{used:,} / 5,000 tokens" in p.stdout
    assert "global" in p.stdout and f"{used:,} / 90,000 tokens" in p.stdout and "never" in p.stdout
    assert_plain(p.stdout, tmp_path)
    p = run(tmp_path, "budgets", "-c", str(cfg), "--csv", "-")
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert {(r["scope"], r["key"], r["used_tokens"]) for r in rows} == {("global", "", str(used)),
                                                                       ("agent", "spender", str(used))}


def test_budgets_lists_a_budget_named_by_key_before_anything_was_spent(tmp_path):
    cfg = write_config(tmp_path / "org.yaml", [{"provider": "xai", "api_key_env": "TEST_XAI_KEY"}],
                       usage_store=f"sqlite:///{tmp_path / 'usage.db'}",
                       budgets=[{"scope": "agent", "match": "researcher", "max_usd": 2.5, "window": "1d"},
                                {"scope": "agent", "match": "research-*", "max_tokens": 100},
                                {"scope": "metadata.org_id", "match": "acme", "max_tokens": 1000}])
    p = run(tmp_path, "budgets", "-c", str(cfg))
    assert p.returncode == 0, p.stderr
    assert "researcher" in p.stdout and "$0.0000 / $2.5" in p.stdout, p.stdout
    assert "acme" in p.stdout and "0 / 1,000 tokens" in p.stdout
    assert "research-*" not in p.stdout                    # a pattern names no key until one is seen
    assert_plain(p.stdout, tmp_path)
    p = run(tmp_path, "budgets", "-c", str(cfg), "--csv", "-")
    rows = list(csv.DictReader(io.StringIO(p.stdout)))
    assert {(r["scope"], r["key"], r["used_tokens"]) for r in rows} == {("agent", "researcher", "0"),
                                                                       ("metadata.org_id", "acme", "0")}


def test_usage_shows_prompt_cache_and_reasoning_tokens_when_calls_reported_some(tmp_path):
    from xml_pipeline_llm.stores import open_store
    from xml_pipeline_llm.usage import make_event

    ledger = tmp_path / "usage.db"

    async def write() -> None:
        store = open_store(f"sqlite:///{ledger}")
        for agent, cached, written, reasoning in (("looper", 900, 50, 0), ("thinker", 0, 0, 40)):
            await store.append(make_event(
                agent_id=agent, thread_id="t", model="claude-sonnet-4-5", backend="b", provider="anthropic",
                usage={"prompt_tokens": 1000, "completion_tokens": 60, "total_tokens": 1060,
                       "cached_tokens": cached, "cache_write_tokens": written, "reasoning_tokens": reasoning},
                cost_usd=0.001, latency_ms=5.0, outcome="ok"))
        await store.close()

    asyncio.run(write())
    p = run(tmp_path, "usage", "--store", f"sqlite:///{ledger}")
    assert p.returncode == 0, p.stderr
    assert "Prompt cache and reasoning" in p.stdout
    rows = {line.split()[0]: line.split() for line in p.stdout.split("Prompt cache")[1].splitlines()[2:]
            if line.strip() and not line.startswith("─")}
    assert rows["looper"][1:] == ["1,000", "900", "50", "50", "60", "0"]
    assert rows["thinker"][1:] == ["1,000", "0", "0", "1,000", "60", "40"]
    assert_plain(p.stdout, tmp_path)
    p = run(tmp_path, "usage", "--store", f"sqlite:///{ledger}", "--by", "event")
    assert "900 of 2,000 input tokens read from it, 50 written to it; 40" in " ".join(p.stdout.split())
    p = run(tmp_path, "usage", "--store", f"sqlite:///{ledger}", "--csv", "-")
    rows_csv = {r["agent_id"]: r for r in csv.DictReader(io.StringIO(p.stdout))}
    assert (rows_csv["looper"]["cached_tokens"], rows_csv["thinker"]["reasoning_tokens"]) == ("900", "40")
