"""``xml-pipeline-llm``: the command line.

    xml-pipeline-llm demo                      # offline tour: simulator, 3 strategies, usage tables
    xml-pipeline-llm init                      # a commented organism.yaml and a .env template here
    xml-pipeline-llm check -c organism.yaml    # validate the llm: block, print the routing table
    xml-pipeline-llm complete -m grok-4.1 "Say hello"
    xml-pipeline-llm usage --store sqlite:///usage.db --by model
    xml-pipeline-llm simulate --port 8099      # provider simulator in the foreground
    xml-pipeline-llm top --url http://127.0.0.1:4000   # the swarm live (or -c FILE: Redis, SQLite)

One module per command (init, check, complete, usage, simulate, demo); output.py
holds how they all print.  ``--help`` must answer at once, so nothing here
imports more than the standard library and the package's light modules; a
command's module (with rich, the router, LiteLLM or the simulator) is imported
when that command runs.
Every user mistake ends as one ``error: ...`` line on stderr and exit status 1;
``--debug`` shows the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import os
import sys
import traceback
from collections.abc import Callable
from typing import Any

from .. import __version__
from ..env import CONFIG_ENV
from ..strategies import STRATEGY_NAMES
from ..usage import EXPORTS
from .output import describe, print_error, setup_logging, terminal_columns

__all__ = ["build_parser", "main"]

PROG = "xml-pipeline-llm"


def _command(name: str, module_name: str | None = None) -> Callable[[argparse.Namespace], int]:
    """The subcommand ``cmd_<name>`` of ``cli/<name>.py`` (or ``cli/<module_name>.py``), its module
    imported when it runs (so ``--help`` imports none of them)."""
    def run(args: argparse.Namespace) -> int:
        module = importlib.import_module(f"{__name__}.{module_name or name}")
        return int(getattr(module, f"cmd_{name}")(args) or 0)

    return run


class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one line, exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, terminal_columns()))


def _number(kind: type, lo: float, hi: float, what: str) -> Any:
    """An argparse type: ``kind`` in ``[lo, hi]``, else a message saying what was expected."""
    def parse(text: str) -> Any:
        try:
            value = kind(text)
        except ValueError:
            value = None
        if value is None or value != value or not lo <= value <= hi:
            raise argparse.ArgumentTypeError(f"expected {what}, got {text!r}")
        return value
    return parse


_positive_int = _number(int, 1, float("inf"), "a positive integer")


_non_negative_float = _number(float, 0.0, float("inf"), "a number of seconds >= 0")


_rate = _number(float, 0.0, 1.0, "a share between 0 and 1")


_port = _number(int, 0, 65535, "a port number 0-65535")


def _strategy(text: str) -> str:
    value = text.strip().lower().replace("_", "-")
    if value not in (*STRATEGY_NAMES, "all"):
        raise argparse.ArgumentTypeError(
            f"unknown strategy {text!r}; expected one of {', '.join(STRATEGY_NAMES)}, all")
    return value


def _by(text: str) -> str:
    if text in EXPORTS or (text.startswith("metadata.") and len(text) > len("metadata.")):
        return text
    raise argparse.ArgumentTypeError(f"invalid choice {text!r}; expected one of {', '.join(EXPORTS)} "
                                     f"or metadata.KEY (such as metadata.org_id)")


CONFIG_HELP = f"organism file with an llm: block (default: ${CONFIG_ENV}, else ./organism.yaml)"

EPILOGS = {
    "init": """\
examples:
  xml-pipeline-llm init                      # ./organism.yaml and ./.env
  xml-pipeline-llm init --force --dashboard  # overwrite them; also ./grafana-dashboard.json

organism.yaml is the commented example shipped in the package (every key of
the llm: block); .env names the key variables its backends use, empty.
Neither is overwritten without --force. Then: put your keys in .env,
xml-pipeline-llm check, then xml-pipeline-llm complete.
""",
    "check": """\
examples:
  xml-pipeline-llm check                     # ./organism.yaml or $XML_PIPELINE_LLM_CONFIG
  xml-pipeline-llm check -c deploy/organism.yaml

Exit status 0 when the llm: block is valid, 1 with one line per problem otherwise.
""",
    "complete": """\
examples:
  xml-pipeline-llm complete --simulate -m grok-4.1 "Say hello"      # offline, no keys
  xml-pipeline-llm complete --simulate -c organism.yaml -m claude-sonnet-4 "Say hello"
  xml-pipeline-llm complete -c organism.yaml -m claude-sonnet-4 --agent writer \\
      --system "You are terse." --stream "Write a haiku about routers"
  echo "Summarise this" | xml-pipeline-llm complete -m gpt-4o-mini --json -

The answer goes to stdout; the backend, tokens, cost and latency to stderr.
--simulate starts a local provider simulator and points every backend at it:
the backends of -c FILE, else of $XML_PIPELINE_LLM_CONFIG or ./organism.yaml
when there is one, else built-in xai (grok-*), anthropic (claude-*), openai
(gpt-*, o1*, o3*, o4*, chatgpt-*) and ollama (llama*, mistral*, qwen*, gemma*,
phi*) backends. A model none of them serves is an error, as without
--simulate. It uses no key, no network and no usage store.
""",
    "usage": """\
examples:
  xml-pipeline-llm usage --store sqlite:///usage.db
  xml-pipeline-llm usage -c organism.yaml --by model --since 24h
  xml-pipeline-llm usage --store usage.db --by event --since 2025-06-01 --csv events.csv

The ledger is the organism file's llm.usage_store (sqlite:///path/usage.db;
a relative path is next to the organism file),
else its llm.shared_state (Redis keeps the fleet's totals and recent calls),
or the one named by --store (a sqlite:/// URL, a plain path, or redis://).
--since takes a duration back from now (90s, 30m, 24h, 7d, 2w) or an ISO
date/time (UTC unless it names a zone).
""",
    "budgets": """\
examples:
  xml-pipeline-llm budgets                   # ./organism.yaml or $XML_PIPELINE_LLM_CONFIG
  xml-pipeline-llm budgets -c organism.yaml --csv budgets.csv

Every budget of llm.budgets (and max_tokens_per_thread) that a recorded call
falls under: the global one, and those of the agents and threads the usage
store (llm.usage_store, or the fleet's Redis) has seen, with what is spent in
the current window, what calls in flight hold (Redis), and when it resets.
""",
    "block": """\
examples:
  xml-pipeline-llm block --agent researcher --reason "loops on the search tool"
  xml-pipeline-llm block --thread t-42 --metadata org_id=acme -c organism.yaml

Every new request of the matching caller (all the options given must match)
raises BlockedError before anything is sent; calls in flight finish. Kept in
llm.shared_state (Redis: every process sees it within a second) or else the
SQLite ledger of llm.usage_store (every process using it, within a second);
survives restarts. Lift it with unblock and the same options.
""",
    "unblock": """\
examples:
  xml-pipeline-llm unblock --agent researcher
""",
    "blocked": """\
examples:
  xml-pipeline-llm blocked -c organism.yaml
""",
    "serve": """\
examples:
  xml-pipeline-llm serve                              # ./organism.yaml, http://127.0.0.1:4000/v1
  xml-pipeline-llm serve -c organism.yaml --port 8080 --workers 4 --grace 10

Any OpenAI client then works with base_url http://127.0.0.1:4000/v1 (and
api_key: one of llm.gateway.keys, or anything when no keys are configured).
Without keys the gateway listens on loopback only. --workers N > 1 needs
llm.shared_state. SIGTERM/SIGINT: stop accepting, let calls in flight finish
for up to --grace seconds, flush the ledger, exit 0. See docs/gateway.md.
""",
    "top": """\
examples:
  xml-pipeline-llm top                                  # ./organism.yaml: its Redis or SQLite ledger
  xml-pipeline-llm top --url http://127.0.0.1:4000      # a gateway (admin key: --key or $XML_PIPELINE_LLM_KEY)

Refreshed every second: per agent (by spend) requests, tokens and dollars of
the last minute, total spend, budget used; per backend calls in flight,
queued, cooling down, circuit; the budgets; the last errors. q or Ctrl-C
leaves. From llm.shared_state (Redis) it is the whole fleet; from a SQLite
ledger there is no backend load; the default in-memory store cannot be
watched from another process. See docs/live.md.
""",
    "simulate": """\
examples:
  xml-pipeline-llm simulate --port 8099
  xml-pipeline-llm simulate --port 8099 --fault-rate 0.2 --latency 0.3

Then point a backend of organism.yaml at it, e.g.
  - provider: xai
    name: xai-local
    base_url: http://127.0.0.1:8099/b/xai-local/v1
    api_key_env: ANY_SET_VARIABLE
Ctrl-C stops it.
""",
    "demo": """\
examples:
  xml-pipeline-llm demo
  xml-pipeline-llm demo --requests 200 --concurrency 16 --strategy least-loaded --csv usage.csv

Runs offline, with no keys: a local simulator plays three providers (xai,
anthropic, openai); xai-main answers some calls with 429 + Retry-After or 500.
""",
}


def build_parser() -> argparse.ArgumentParser:
    common = _Parser(add_help=False)
    # SUPPRESS: given after the subcommand, these must not overwrite the main parser's value.
    common.add_argument("--debug", action="store_true", default=argparse.SUPPRESS,
                        help="show debug logs and the full traceback of an error")
    common.add_argument("-v", "--verbose", action="store_true", default=argparse.SUPPRESS,
                        help="show each retry and failover as it happens")

    parser = _Parser(
        prog=PROG, formatter_class=_Formatter, parents=[common],
        description="One model-agnostic call for language models: routing, retries,\n"
                    "limits and per-agent accounting over LiteLLM.",
        epilog="start here:\n  xml-pipeline-llm demo          # offline tour, no keys needed\n"
               "  xml-pipeline-llm init          # organism.yaml and .env to start from\n"
               "  xml-pipeline-llm COMMAND --help")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, help: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                        epilog=EPILOGS[name], formatter_class=_Formatter, parents=[common])
        return commands[name]

    p = command("init", "write a commented organism.yaml and a .env template here")
    p.add_argument("--force", action="store_true", help="overwrite organism.yaml and .env if they exist")
    p.add_argument("--dashboard", action="store_true",
                   help="also write grafana-dashboard.json (the Grafana dashboard of the Prometheus metrics)")
    p.set_defaults(func=_command("init"))

    p = command("check", "validate the llm: block and print the routing table")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    p.set_defaults(func=_command("check"))

    p = command("complete", "send one prompt through the router and print the answer")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("-m", "--model", required=True, help="model name, e.g. grok-4.1 or anthropic/claude-sonnet-4")
    p.add_argument("--agent", metavar="A", help="agent id the usage is booked to")
    p.add_argument("--thread", metavar="T", help="thread id the usage is booked to")
    p.add_argument("--system", metavar="S", help="system prompt")
    p.add_argument("--max-tokens", metavar="N", type=_positive_int, help="cap on the answer's tokens")
    p.add_argument("--stream", action="store_true", help="print the answer as it arrives (not with --json)")
    p.add_argument("--json", action="store_true",
                   help="print the whole response as JSON once complete (content, model, usage, backend, "
                        "cost, ...)")
    p.add_argument("--simulate", action="store_true",
                   help="answer from a local provider simulator instead of the real providers (the "
                        "backends of -c FILE or ./organism.yaml, pointed at it)")
    p.add_argument("prompt", nargs="+", metavar="PROMPT", help="the user message ('-' reads stdin)")
    p.set_defaults(func=_command("complete"))

    p = command("usage", "show token usage and cost from a usage ledger")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP + "; its llm.usage_store is read")
    p.add_argument("--store", metavar="URL",
                   help="ledger to read: sqlite:///path/usage.db (or a path), or redis://host:port/db")
    p.add_argument("--redis-prefix", metavar="P",
                   help="key prefix of a Redis store (default: the config's llm.redis_prefix, else xpl)")
    p.add_argument("--by", type=_by, default="agent", metavar="BY",
                   help=f"group by {', '.join(EXPORTS)} or metadata.KEY such as metadata.org_id "
                        f"(default: agent)")
    p.add_argument("--since", metavar="WHEN", help="only calls since WHEN: 24h, 7d, or 2025-06-01T12:00")
    p.add_argument("--csv", metavar="FILE", help="write CSV to FILE ('-' for stdout) instead of a table")
    p.set_defaults(func=_command("usage"))

    p = command("budgets", "show every budget: spent / limit, reserved, when it resets")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--csv", metavar="FILE", help="write CSV to FILE ('-' for stdout) instead of a table")
    p.set_defaults(func=_command("budgets"))

    for name, help_text in (
            ("block", "stop an agent, thread or tenant across the fleet (kill switch)"),
            ("unblock", "lift a block set with the same options")):
        p = command(name, help_text)
        p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
        p.add_argument("--agent", metavar="A", help="the agent id")
        p.add_argument("--thread", metavar="T", help="the thread id")
        p.add_argument("--metadata", metavar="KEY=VALUE", action="append",
                       help="a metadata value the calls carry (repeatable)")
        if name == "block":
            p.add_argument("--reason", metavar="TEXT", default="", help="why (shown in the BlockedError)")
        p.set_defaults(func=_command(name, "guards"))

    p = command("blocked", "list what is blocked, with the reasons")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    p.set_defaults(func=_command("blocked", "guards"))

    p = command("serve", "serve the router as an OpenAI-compatible HTTP API")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("--host", default=None, help="address to bind (default: llm.gateway.host, else 127.0.0.1)")
    p.add_argument("--port", type=_port, default=None,
                   help="port to bind (default: llm.gateway.port, else 4000; 0: any free port)")
    p.add_argument("--workers", type=_positive_int, default=1, metavar="N",
                   help="worker processes on the one port (default 1; more need llm.shared_state)")
    p.add_argument("--grace", type=_non_negative_float, default=30.0, metavar="S",
                   help="on SIGTERM/SIGINT, seconds the calls in flight may take to finish (default 30)")
    p.set_defaults(func=_command("serve"))

    p = command("top", "watch the swarm live: spend, tokens, backends, budgets, errors")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP + "; its llm.shared_state or usage_store is read")
    p.add_argument("--url", metavar="GATEWAY", help="a gateway to watch instead, e.g. http://127.0.0.1:4000")
    p.add_argument("--key", metavar="KEY", default=None,
                   help="the gateway's admin key (default: $XML_PIPELINE_LLM_KEY; the variable keeps it out of ps)")
    p.add_argument("--interval", type=_number(float, 0.1, 3600, "seconds between 0.1 and 3600"), default=1.0,
                   metavar="S", help="seconds between refreshes (default 1)")
    p.add_argument("--once", action="store_true", help="print one snapshot and exit")
    p.set_defaults(func=_top)

    p = command("simulate", "run the provider simulator in the foreground")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8099, help="port to bind (default 8099; 0: any free port)")
    p.add_argument("--fault-rate", type=_rate, default=0.0, metavar="R",
                   help="share of calls (0..1) answered with 429/5xx/dropped/malformed (default 0)")
    p.add_argument("--latency", type=_non_negative_float, default=0.0, metavar="S",
                   help="seconds added before every answer (default 0)")
    p.set_defaults(func=_command("simulate"))

    p = command("demo", "offline tour: three simulated providers, faults, strategies, usage")
    p.add_argument("--requests", type=_positive_int, default=60, metavar="N",
                   help="requests per strategy (default 60)")
    p.add_argument("--concurrency", type=_positive_int, default=8, metavar="C",
                   help="requests in flight at once (default 8)")
    p.add_argument("--strategy", type=_strategy, default="all", metavar="S",
                   help="failover, round-robin, least-loaded or all (default all)")
    p.add_argument("--csv", metavar="FILE", default="xml-pipeline-llm-demo-usage.csv",
                   help="where to write the per-agent usage CSV (default ./xml-pipeline-llm-demo-usage.csv)")
    p.add_argument("--metrics-port", type=_port, default=None, metavar="PORT",
                   help="serve Prometheus /metrics on 127.0.0.1:PORT while the demo runs (0: any free port; "
                        "needs the [otel] extra)")
    p.set_defaults(func=_command("demo"))
    parser.set_defaults(commands=commands)
    return parser


def _top(args: argparse.Namespace) -> int:
    return _command("top")(args)      # rich's Live and the sources only when top runs


def main(argv: list[str] | None = None) -> int:
    """Entry point of the ``xml-pipeline-llm`` console script; returns the exit status."""
    parser = build_parser()
    try:
        args, extra = parser.parse_known_args(argv)
        if extra:   # reported by the subcommand, so that the hint names its --help
            where = args.commands.get(args.command, parser)
            where.error(f"unrecognized arguments: {' '.join(extra)}")
    except SystemExit as exc:   # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else (0 if exc.code is None else 1)
    debug = getattr(args, "debug", False)
    setup_logging(debug, getattr(args, "verbose", False))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        print_error("interrupted")
        return 130
    except BrokenPipeError:   # `... | head`: the reader went away; not an error
        try:   # point stdout at /dev/null so that the flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except Exception as exc:  # every user-facing error ends here
        if debug:
            traceback.print_exc()
        print_error(describe(exc))
        return 1
