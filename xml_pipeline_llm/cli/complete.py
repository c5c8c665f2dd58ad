"""``xml-pipeline-llm complete``: one prompt through the router (or through a local simulator)."""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import sys
from collections.abc import Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any

from ..config import config_file, load_config, read_llm_block
from ..env import CONFIG_ENV
from ..router import LLMRouter
from ..simulator import run_simulator
from .output import CLIError, make_console

if TYPE_CHECKING:
    from ..config import RouterConfig
    from ..response import LLMResponse
    from ..router import LLMRouter


#: Fake key variable for backends that point at the simulator (never a real secret).
SIM_KEY_ENV = "XPL_DEMO_KEY"
SIM_KEY_VALUE = "demo-not-a-secret"


def _read_prompt(words: list[str]) -> str:
    if words == ["-"]:
        text = sys.stdin.read()
    else:
        text = " ".join(words)
    if not text.strip():
        raise CLIError("empty prompt; give the text to send, e.g. complete -m grok-4.1 \"Say hello\"")
    return text


def cmd_complete(args: argparse.Namespace) -> int:
    if args.stream and args.json:
        raise CLIError("--stream and --json cannot be combined: --json prints the whole response once it "
                       "is complete; drop --stream for JSON, or --json to see the answer as it arrives")
    prompt = _read_prompt(args.prompt)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    kwargs: dict[str, Any] = {}
    if args.max_tokens:
        kwargs["max_tokens"] = args.max_tokens

    with _config_for_complete(args) as cfg:
        router = LLMRouter(cfg)
        resp = asyncio.run(_complete(router, args, messages, kwargs))
    if args.json:
        sys.stdout.write(json.dumps(response_dict(resp), indent=2, default=str) + "\n")
    elif not args.stream:
        sys.stdout.write(resp.content + ("" if resp.content.endswith("\n") else "\n"))
    sys.stdout.flush()
    _print_summary(resp)
    return 0


async def _complete(router: LLMRouter, args: argparse.Namespace, messages: list[dict[str, Any]],
                    kwargs: dict[str, Any]) -> LLMResponse:
    try:
        if not args.stream:
            return await router.complete(args.model, messages, agent_id=args.agent,
                                         thread_id=args.thread, **kwargs)
        async with router.stream(args.model, messages, agent_id=args.agent, thread_id=args.thread,
                                 **kwargs) as s:
            wrote = ""
            try:
                async for delta in s:
                    sys.stdout.write(delta)
                    sys.stdout.flush()
                    wrote = delta or wrote
            finally:   # end the line, also when the stream broke halfway
                if wrote and not wrote.endswith("\n"):
                    sys.stdout.write("\n")
                    sys.stdout.flush()
        assert s.response is not None
        return s.response
    finally:
        await router.aclose()


def response_dict(resp: LLMResponse) -> dict[str, Any]:
    """The response as JSON-ready data (everything but ``raw``)."""
    return {"content": resp.content, "model": resp.model, "usage": dict(resp.usage),
            "finish_reason": resp.finish_reason, "backend": resp.backend, "cost_usd": resp.cost_usd,
            "latency_ms": round(resp.latency_ms, 1), "tool_calls": resp.tool_calls}


def _print_summary(resp: LLMResponse) -> None:
    from rich.text import Text

    u = resp.usage
    cost = "cost unknown" if resp.cost_usd is None else f"${resp.cost_usd:.6f}"
    line = (f"[{resp.backend} · {resp.model} · {u.get('prompt_tokens', 0)}+{u.get('completion_tokens', 0)}"
            f"={u.get('total_tokens', 0)} tokens · {cost} · {resp.latency_ms:.0f} ms]")
    make_console(stderr=True).print(Text(line, style="dim"), soft_wrap=True)


@contextmanager
def _config_for_complete(args: argparse.Namespace) -> Iterator[RouterConfig]:
    if not args.simulate:
        yield load_config(args.config)
        return
    config = args.config
    if config is None and (os.environ.get(CONFIG_ENV) or os.path.exists("organism.yaml")):
        config = str(config_file(None))     # the organism file `check` and `complete` would read
    with run_simulator() as sim:
        yield load_config({"llm": simulated_block(sim, config)})


#: Backends of ``complete --simulate`` with no organism file: one per provider wire format.  The
#: ollama one serves a list (not any model): a model none of them serves is a ModelNotFoundError.
SIMULATED_BACKENDS: list[dict[str, Any]] = [
    {"provider": "xai", "name": "xai"},
    {"provider": "anthropic", "name": "anthropic"},
    {"provider": "openai", "name": "openai"},
    {"provider": "ollama", "name": "ollama", "supported_models": ["llama*", "mistral*", "qwen*", "gemma*", "phi*"]},
]
_SIM_FORMATS = ("xai", "openai", "anthropic", "ollama")


def simulated_block(sim: Any, config: str | None) -> dict[str, Any]:
    """An ``llm:`` block whose backends all point at ``sim``.

    From ``config``'s backends when given (a provider without a simulated
    wire format is simulated as an OpenAI-compatible server with its
    ``supported_models``), else the built-in xai/anthropic/openai/ollama set.  Keys
    are replaced by a fake one, and the usage store and shared state are
    dropped so that a simulated call never lands in a real ledger.
    """
    os.environ.setdefault(SIM_KEY_ENV, SIM_KEY_VALUE)
    if config is None:
        block: dict[str, Any] = {"retry_base_delay": 0.1, "retry_max_delay": 1.0,
                                 "backends": [dict(b) for b in SIMULATED_BACKENDS]}
    else:
        block = read_llm_block(config)
        for key in ("usage_store", "shared_state"):
            block.pop(key, None)
    backends = block.get("backends")
    if isinstance(backends, list):
        block["backends"] = [_simulated_backend(sim, b) if isinstance(b, dict) else b for b in backends]
    return block


def _simulated_backend(sim: Any, b: dict[str, Any]) -> dict[str, Any]:
    b = dict(b)
    provider = b.get("provider")
    if not isinstance(provider, str):
        return b   # let validation report it
    name = b.get("name") if isinstance(b.get("name"), str) else provider
    fmt = provider if provider in _SIM_FORMATS else "openai"
    if provider not in _SIM_FORMATS:
        b["provider"] = "openai"
    b["base_url"] = sim.base_url(name, fmt)
    b.pop("api_key", None)
    if fmt == "ollama":
        b.pop("api_key_env", None)
    else:
        b["api_key_env"] = SIM_KEY_ENV
    return b
