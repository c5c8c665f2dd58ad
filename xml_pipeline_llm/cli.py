"""``xml-pipeline-llm``: the command line (contract C9).

    xml-pipeline-llm demo                      # offline tour: simulator, 3 strategies, usage tables
    xml-pipeline-llm check -c organism.yaml    # validate the llm: block, print the routing table
    xml-pipeline-llm complete -m grok-4.1 "Say hello"
    xml-pipeline-llm usage --store sqlite:///usage.db --by model
    xml-pipeline-llm simulate --port 8099      # provider simulator in the foreground

``--help`` must answer at once, so this module imports only the standard
library at import time; rich, the router, LiteLLM and the simulator are
imported inside the command that needs them.  Every user mistake ends as one
``error: ...`` line on stderr and exit status 1; ``--debug`` shows the
traceback.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import re
import sys
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .shared.connection import redact_url

if TYPE_CHECKING:
    from rich.console import Console

    from .config import RouterConfig
    from .response import LLMResponse

PROG = "xml-pipeline-llm"
CONFIG_ENV = "XML_PIPELINE_LLM_CONFIG"   # same as config.CONFIG_ENV (not imported: it pulls in pydantic)
#: Fake key variable for backends that point at the simulator (never a real secret).
SIM_KEY_ENV = "XPL_DEMO_KEY"
SIM_KEY_VALUE = "demo-not-a-secret"
GROUP_BY = ("agent", "model", "backend", "thread", "event")
STRATEGY_NAMES = ("failover", "round-robin", "least-loaded")


class CLIError(Exception):
    """A user mistake the command line itself detects; the message is the whole story."""


# ================================================================ parser

class _Parser(argparse.ArgumentParser):
    """argparse with the package's error style: one line, exit status 1."""

    def error(self, message: str) -> None:  # type: ignore[override]
        self.exit(1, f"error: {message} (see '{self.prog} --help')\n")


class _Formatter(argparse.RawDescriptionHelpFormatter):
    def __init__(self, prog: str) -> None:
        super().__init__(prog, max_help_position=30, width=min(100, _columns()))


def _columns() -> int:
    try:
        return max(60, os.get_terminal_size().columns)
    except OSError:
        return 80


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


CONFIG_HELP = f"organism file with an llm: block (default: ${CONFIG_ENV}, else ./organism.yaml)"

EPILOGS = {
    "check": """\
examples:
  xml-pipeline-llm check                     # ./organism.yaml or $XML_PIPELINE_LLM_CONFIG
  xml-pipeline-llm check -c deploy/organism.yaml

Exit status 0 when the llm: block is valid, 1 with one line per problem otherwise.
""",
    "complete": """\
examples:
  xml-pipeline-llm complete --simulate -m grok-4.1 "Say hello"      # offline, no keys
  xml-pipeline-llm complete -c organism.yaml -m claude-sonnet-4 --agent writer \\
      --system "You are terse." --stream "Write a haiku about routers"
  echo "Summarise this" | xml-pipeline-llm complete -m gpt-4o-mini --json -

The answer goes to stdout; the backend, tokens, cost and latency to stderr.
--simulate starts a local provider simulator and points every backend at it
(the backends of -c FILE, or built-in xai, anthropic and ollama backends);
it uses no key, no network and no usage store.
""",
    "usage": """\
examples:
  xml-pipeline-llm usage --store sqlite:///usage.db
  xml-pipeline-llm usage -c organism.yaml --by model --since 24h
  xml-pipeline-llm usage --store usage.db --by event --since 2025-06-01 --csv events.csv

The ledger is the organism file's llm.usage_store (sqlite:///path/usage.db),
else its llm.shared_state (Redis keeps the fleet's totals and recent calls),
or the one named by --store (a sqlite:/// URL, a plain path, or redis://).
--since takes a duration back from now (90s, 30m, 24h, 7d, 2w) or an ISO
date/time (UTC unless it names a zone).
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
    from . import __version__

    common = argparse.ArgumentParser(add_help=False)
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
               "  xml-pipeline-llm COMMAND --help")
    parser.add_argument("--version", action="version", version=f"{PROG} {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND", parser_class=_Parser)

    commands: dict[str, argparse.ArgumentParser] = {}

    def command(name: str, help: str) -> argparse.ArgumentParser:
        commands[name] = sub.add_parser(name, help=help, description=help[0].upper() + help[1:] + ".",
                                        epilog=EPILOGS[name], formatter_class=_Formatter, parents=[common])
        return commands[name]

    p = command("check", "validate the llm: block and print the routing table")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    p.set_defaults(func=cmd_check)

    p = command("complete", "send one prompt through the router and print the answer")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP)
    p.add_argument("-m", "--model", required=True, help="model name, e.g. grok-4.1 or anthropic/claude-sonnet-4")
    p.add_argument("--agent", metavar="A", help="agent id the usage is booked to")
    p.add_argument("--thread", metavar="T", help="thread id the usage is booked to")
    p.add_argument("--system", metavar="S", help="system prompt")
    p.add_argument("--max-tokens", metavar="N", type=_positive_int, help="cap on the answer's tokens")
    p.add_argument("--stream", action="store_true", help="print the answer as it arrives")
    p.add_argument("--json", action="store_true",
                   help="print the whole response as JSON (content, model, usage, backend, cost, ...)")
    p.add_argument("--simulate", action="store_true",
                   help="answer from a local provider simulator instead of the real providers")
    p.add_argument("prompt", nargs="+", metavar="PROMPT", help="the user message ('-' reads stdin)")
    p.set_defaults(func=cmd_complete)

    p = command("usage", "show token usage and cost from a usage ledger")
    p.add_argument("-c", "--config", metavar="FILE", help=CONFIG_HELP + "; its llm.usage_store is read")
    p.add_argument("--store", metavar="URL",
                   help="ledger to read: sqlite:///path/usage.db (or a path), or redis://host:port/db")
    p.add_argument("--redis-prefix", metavar="P",
                   help="key prefix of a Redis store (default: the config's llm.redis_prefix, else xpl)")
    p.add_argument("--by", choices=GROUP_BY, default="agent", help="group by (default: agent)")
    p.add_argument("--since", metavar="WHEN", help="only calls since WHEN: 24h, 7d, or 2025-06-01T12:00")
    p.add_argument("--csv", metavar="FILE", help="write CSV to FILE ('-' for stdout) instead of a table")
    p.set_defaults(func=cmd_usage)

    p = command("simulate", "run the provider simulator in the foreground")
    p.add_argument("--host", default="127.0.0.1", help="address to bind (default 127.0.0.1)")
    p.add_argument("--port", type=_port, default=8099, help="port to bind (default 8099; 0: any free port)")
    p.add_argument("--fault-rate", type=_rate, default=0.0, metavar="R",
                   help="share of calls (0..1) answered with 429/5xx/dropped/malformed (default 0)")
    p.add_argument("--latency", type=_non_negative_float, default=0.0, metavar="S",
                   help="seconds added before every answer (default 0)")
    p.set_defaults(func=cmd_simulate)

    p = command("demo", "offline tour: three simulated providers, faults, strategies, usage")
    p.add_argument("--requests", type=_positive_int, default=60, metavar="N",
                   help="requests per strategy (default 60)")
    p.add_argument("--concurrency", type=_positive_int, default=8, metavar="C",
                   help="requests in flight at once (default 8)")
    p.add_argument("--strategy", type=_strategy, default="all", metavar="S",
                   help="failover, round-robin, least-loaded or all (default all)")
    p.add_argument("--csv", metavar="FILE", default="xml-pipeline-llm-demo-usage.csv",
                   help="where to write the per-agent usage CSV (default ./xml-pipeline-llm-demo-usage.csv)")
    p.set_defaults(func=cmd_demo)
    parser.set_defaults(commands=commands)
    return parser


# ================================================================ main

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
    _setup_logging(debug, getattr(args, "verbose", False))
    if args.command is None:
        parser.print_help()
        return 0
    try:
        return int(args.func(args) or 0)
    except KeyboardInterrupt:
        _print_error("interrupted")
        return 130
    except BrokenPipeError:   # `... | head`: the reader went away; not an error
        try:   # point stdout at /dev/null so that the flush at exit does not fail again
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        except (OSError, ValueError):
            pass
        return 0
    except Exception as exc:  # every user-facing error ends here
        if debug:
            import traceback

            traceback.print_exc()
        _print_error(_describe(exc))
        return 1


def _describe(exc: BaseException) -> str:
    """The message for an error: our own errors are already user-ready."""
    from .errors import BackendError, ConfigError

    if isinstance(exc, (CLIError, ConfigError, BackendError)):
        return str(exc) or type(exc).__name__
    if isinstance(exc, OSError) and exc.filename:
        return f"{exc.filename}: {exc.strerror or exc}"
    text = " ".join(str(exc).split()) or "no details"
    return f"unexpected {type(exc).__name__}: {text} (run with --debug for the traceback)"


def _print_error(message: str) -> None:
    from rich.text import Text

    console = _console(stderr=True)
    for line in message.splitlines() or [""]:
        console.print(Text.assemble(("error: ", "bold red"), line), soft_wrap=True)


def _setup_logging(debug: bool, verbose: bool) -> None:
    import logging

    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(_LogFormatter(debug))  # type: ignore[arg-type]
    handler._xpl_cli = True  # type: ignore[attr-defined]
    log = logging.getLogger("xml_pipeline_llm")
    for old in [h for h in log.handlers if getattr(h, "_xpl_cli", False)]:
        log.removeHandler(old)   # main() called again in one process
    log.addHandler(handler)
    log.setLevel(logging.DEBUG if debug else logging.INFO if verbose else logging.WARNING)
    log.propagate = False


class _LogFormatter:
    """``warning: ...`` lines (with the logger name and time under --debug)."""

    def __init__(self, debug: bool) -> None:
        self.debug = debug

    def format(self, record: Any) -> str:
        text = record.getMessage()
        level = record.levelname.lower()
        if self.debug:
            text = f"{time.strftime('%H:%M:%S')} {record.name} {level}: {text}"
            if record.exc_info:
                import logging

                text += "\n" + logging.Formatter().formatException(record.exc_info)
            return text
        return f"{level}: {text}"


def make_table(title: str | None = None, footer: bool = False) -> Any:
    """The package's table style: no outer frame, a rule under the header (and above a footer)."""
    from rich import box
    from rich.table import Table

    return Table(box=box.SIMPLE, show_edge=False, pad_edge=False, collapse_padding=True, header_style="bold",
                 footer_style="bold", show_footer=footer, title=title, title_justify="left",
                 title_style="bold")


def show(console: Console, renderable: Any) -> None:
    """Print a table; piped, without the trailing blanks rich pads cells with."""
    if console.is_terminal:
        console.print(renderable)
        return
    with console.capture() as captured:
        console.print(renderable)
    text = "\n".join(line.rstrip() for line in captured.get().splitlines())
    console.file.write(text + "\n")
    console.file.flush()


def _console(stderr: bool = False) -> Console:
    """A rich console: colour only on a terminal (and never with NO_COLOR), 80 columns when piped."""
    from rich.console import Console

    return Console(stderr=stderr, highlight=False, emoji=False)


# ================================================================ check

def cmd_check(args: argparse.Namespace) -> int:
    from rich.text import Text

    from .config import load_config

    cfg = load_config(args.config)
    console = _console()
    n = len(cfg.backends)
    console.print(Text.assemble((cfg.source, "bold"), f": {n} backend{'s' if n != 1 else ''}, strategy "
                                f"{cfg.strategy}, retries {cfg.retries}, timeout {_num(cfg.timeout)}s"),
                  soft_wrap=True)
    console.print(f"usage store: {cfg.usage_store or 'memory'}"
                  + (f", shared state: {redact_url(cfg.shared_state)}" if cfg.shared_state else ""),
                  soft_wrap=True)
    table = make_table()
    key_width = max(len(b.key_source.split(" ")[0]) for b in cfg.backends)
    table.add_column("Backend", overflow="fold")
    table.add_column("Provider", overflow="fold")
    table.add_column("Models", overflow="fold", ratio=1, min_width=10)
    table.add_column("Prio", justify="right")
    table.add_column("TPM", justify="right")
    table.add_column("Conc", justify="right")
    table.add_column("Key", overflow="fold", min_width=min(key_width, 24))
    for b in cfg.backends:
        key = b.key_source
        key_style = "red" if "not set" in key else "green" if "(set)" in key else ""
        table.add_row(Text(b.name), Text(b.provider.name), Text(b.describe_models()),
                      str(b.priority), f"{b.rate_limit_tpm:,}" if b.rate_limit_tpm else "-",
                      str(b.max_concurrent), Text(key, style=key_style))
    show(console, table)
    for b in cfg.backends:
        if b.base_url:
            console.print(Text(f"{b.name} base_url: {redact_url(b.base_url)}", style="dim"), soft_wrap=True)
    console.print(Text("config OK", style="bold green"))
    return 0


def _num(value: float) -> str:
    return f"{value:g}"


# ================================================================ complete

def _read_prompt(words: list[str]) -> str:
    if words == ["-"]:
        text = sys.stdin.read()
    else:
        text = " ".join(words)
    if not text.strip():
        raise CLIError("empty prompt; give the text to send, e.g. complete -m grok-4.1 \"Say hello\"")
    return text


def cmd_complete(args: argparse.Namespace) -> int:
    prompt = _read_prompt(args.prompt)
    messages: list[dict[str, Any]] = []
    if args.system:
        messages.append({"role": "system", "content": args.system})
    messages.append({"role": "user", "content": prompt})
    kwargs: dict[str, Any] = {}
    if args.max_tokens:
        kwargs["max_tokens"] = args.max_tokens

    with _config_for_complete(args) as cfg:
        from .router import LLMRouter

        router = LLMRouter(cfg)
        resp = asyncio.run(_complete(router, args, messages, kwargs))
    if args.json:
        sys.stdout.write(json.dumps(response_dict(resp), indent=2, default=str) + "\n")
    elif not args.stream:
        sys.stdout.write(resp.content + ("" if resp.content.endswith("\n") else "\n"))
    sys.stdout.flush()
    _print_summary(resp)
    return 0


async def _complete(router: Any, args: argparse.Namespace, messages: list[dict[str, Any]],
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
                    if not args.json:
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
    _console(stderr=True).print(Text(line, style="dim"), soft_wrap=True)


@contextmanager
def _config_for_complete(args: argparse.Namespace) -> Iterator[RouterConfig]:
    from .config import load_config

    if not args.simulate:
        yield load_config(args.config)
        return
    from .simulator import run_simulator

    with run_simulator() as sim:
        yield load_config({"llm": simulated_block(sim, args.config)})


#: Backends of ``complete --simulate`` without ``-c``: one per provider wire format.
SIMULATED_BACKENDS = [
    {"provider": "xai", "name": "xai"},
    {"provider": "anthropic", "name": "anthropic"},
    {"provider": "ollama", "name": "ollama"},
]
_SIM_FORMATS = ("xai", "openai", "anthropic", "ollama")


def simulated_block(sim: Any, config: str | None) -> dict[str, Any]:
    """An ``llm:`` block whose backends all point at ``sim``.

    From ``config``'s backends when given (a provider without a simulated
    wire format is simulated as an OpenAI-compatible server with its
    ``supported_models``), else the built-in xai/anthropic/ollama trio.  Keys
    are replaced by a fake one, and the usage store and shared state are
    dropped so that a simulated call never lands in a real ledger.
    """
    os.environ.setdefault(SIM_KEY_ENV, SIM_KEY_VALUE)
    if config is None:
        block: dict[str, Any] = {"retry_base_delay": 0.1, "retry_max_delay": 1.0,
                                 "backends": [dict(b) for b in SIMULATED_BACKENDS]}
    else:
        from .config import read_llm_block

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


# ================================================================ usage

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|sec|m|min|h|d|w)\s*$", re.IGNORECASE)
_UNIT = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600, "d": 86400, "w": 604800}


def parse_since(text: str | None, now: float | None = None) -> float | None:
    """``7d``/``24h``/``30m``/``90s``/``2w`` back from now, or an ISO date/time (UTC if naive)."""
    if text is None:
        return None
    from datetime import datetime, timezone

    now = time.time() if now is None else now
    m = _DURATION.match(text)
    if m:
        return now - float(m.group(1)) * _UNIT[m.group(2).lower()]
    raw = text.strip()
    iso = raw[:-1] + "+00:00" if raw.endswith(("Z", "z")) else raw
    try:
        when = datetime.fromisoformat(iso)
    except ValueError:
        raise CLIError(f"--since: expected a duration such as 24h or 7d, or an ISO date such as "
                       f"2025-06-01T12:00, got {text!r}") from None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return when.timestamp()


def cmd_usage(args: argparse.Namespace) -> int:
    url, prefix = (args.store, None) if args.store else _store_from_config(args.config)
    prefix = args.redis_prefix or prefix
    if not url or url == "memory":
        where = f"{args.config} has" if args.config else "no organism file with"
        raise CLIError(f"no usage ledger to read ({where} an llm.usage_store); pass --store "
                       f"sqlite:///path/usage.db or set usage_store: sqlite:///... in the llm: block")
    since = parse_since(args.since)
    if url.startswith(_REDIS_SCHEMES):
        where, events, totals = _read_redis(url, prefix or "xpl", args.by, since)
    else:
        from .stores import read_events

        path = _ledger_path(url)
        where, events, totals = str(path), list(read_events(path, since)), None
    if totals is None and args.by != "event":
        from .usage import group_events

        totals = group_events(events, args.by)
    if args.csv:
        return _usage_csv(args.csv, args.by, events, totals)
    console = _console()
    if not (events if args.by == "event" else totals):
        when = f" since {args.since}" if args.since else ""
        console.print(f"no calls recorded in {where}{when}", soft_wrap=True)
        return 0
    if events:
        console.print(f"{where}: {len(events)} provider call{'s' if len(events) != 1 else ''}, "
                      f"{_when(events[0].timestamp)} .. {_when(events[-1].timestamp)} UTC", soft_wrap=True)
        from .usage import GROUPS, NO_AGENT

        priced = {getattr(e, GROUPS[args.by]) or NO_AGENT for e in events if e.cost_usd is not None} \
            if args.by != "event" else set()
    else:
        console.print(f"{where}: fleet totals by {args.by}", soft_wrap=True)
        priced = set(totals or {})
    table = _event_table(events) if args.by == "event" else _totals_table(args.by, totals or {}, priced)
    show(console, table)
    return 0


_REDIS_SCHEMES = ("redis://", "rediss://", "unix://")


def _read_redis(url: str, prefix: str, by: str, since: float | None) -> tuple[str, list[Any], Any]:
    """Usage kept in Redis (``shared_state``): exact totals, or the recent events for --by event / --since."""
    from .stores import open_store

    shown = redact_url(url)
    store = open_store(url, prefix)    # ConfigError when Redis does not answer
    try:
        if by == "event" or since is not None:
            return shown, list(store.events(since)), None
        totals = store.totals(by)
    except Exception as exc:   # RedisDown, connection errors: the server went away mid-read
        raise CLIError(f"usage store {shown}: Redis stopped answering ({type(exc).__name__})") from exc
    if totals is None:
        raise CLIError(f"usage store {shown}: Redis does not answer")
    return shown, [], totals


def _ledger_path(url: str) -> Path:
    from .stores import sqlite_path

    if "://" not in url:
        return Path(url)
    return sqlite_path(url)


def _store_from_config(config: str | None) -> tuple[str | None, str | None]:
    """The usage store of the organism file (-c, $XML_PIPELINE_LLM_CONFIG or ./organism.yaml).

    ``llm.usage_store``; else ``llm.shared_state`` (Redis keeps the fleet's usage
    too), with ``llm.redis_prefix``.
    """
    if config is None and not os.environ.get(CONFIG_ENV) and not Path("organism.yaml").exists():
        return None, None
    from .config import read_llm_block

    block = read_llm_block(config)
    store = block.get("usage_store")
    if store in (None, "memory") and isinstance(block.get("shared_state"), str):
        store = block["shared_state"]
    if store is not None and not isinstance(store, str):
        raise CLIError(f"llm.usage_store: expected sqlite:///path/usage.db, got {store!r}")
    prefix = block.get("redis_prefix")
    return store, prefix if isinstance(prefix, str) else None


def _usage_csv(target: str, by: str, events: list[Any], totals: Any) -> int:
    from .usage import write_csv

    if target == "-":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp) / "usage.csv"
            write_csv(tmp_path, by, totals=totals, events=events)
            sys.stdout.write(tmp_path.read_text(encoding="utf-8"))
        return 0
    rows = write_csv(target, by, totals=totals, events=events)
    _console().print(f"wrote {rows} row{'s' if rows != 1 else ''} (by {by}) to {target}", soft_wrap=True)
    return 0


def _when(ts: float) -> str:
    from datetime import datetime, timezone

    return datetime.fromtimestamp(ts, tz=timezone.utc).strftime("%Y-%m-%d %H:%M:%S")


def cost_text(value: float | None) -> str:
    if value is None:
        return "-"
    return "0" if value == 0 else f"{value:.6f}"


def _totals_table(by: str, groups: dict[str, Any], priced: set[str]) -> Any:
    """Totals per key with a totals footer; ``priced``: keys with at least one priced call.

    A cost of 0 would claim "free", so a group with no priced call shows "-".
    """
    from rich.text import Text

    from .usage import AgentUsage

    total = AgentUsage()
    for u in groups.values():
        for f in _TOTAL_FIELDS:
            setattr(total, f, getattr(total, f) + getattr(u, f))
    table = make_table(footer=True)
    table.add_column(by.capitalize(), overflow="fold", footer="total")
    for name, foot in zip(("Prompt", "Completion", "Total", "Requests", "Errors", "Cost USD"),
                          _usage_cells(total, bool(priced))):
        table.add_column(name, justify="right", footer=foot)
    for key in sorted(groups):
        table.add_row(Text(key), *_usage_cells(groups[key], key in priced))
    return table


_TOTAL_FIELDS = ("prompt_tokens", "completion_tokens", "total_tokens", "request_count", "error_count",
                 "cost_usd")


def _usage_cells(u: Any, priced: bool = True) -> list[str]:
    return [f"{u.prompt_tokens:,}", f"{u.completion_tokens:,}", f"{u.total_tokens:,}",
            f"{u.request_count:,}", f"{u.error_count:,}", cost_text(u.cost_usd if priced else None)]


def _event_table(events: list[Any]) -> Any:
    from rich.text import Text

    tokens = sum(e.total_tokens for e in events)
    costs = [e.cost_usd for e in events if e.cost_usd is not None]
    cost = sum(costs) if costs else None
    table = make_table(footer=True)
    table.add_column("Time (UTC)", no_wrap=True, footer=f"total: {len(events)}")
    table.add_column("Agent", overflow="fold")
    table.add_column("Model", overflow="fold")
    table.add_column("Backend", overflow="fold")
    table.add_column("Tokens", justify="right", footer=f"{tokens:,}")
    table.add_column("Cost USD", justify="right", footer=cost_text(cost))
    table.add_column("ms", justify="right")
    table.add_column("Outcome", no_wrap=True)
    for e in events:
        style = "" if e.outcome == "ok" else "yellow" if e.outcome.startswith("retried") else "red"
        table.add_row(_when(e.timestamp)[5:], Text(e.agent_id or "(none)"), Text(e.model), Text(e.backend),
                      f"{e.total_tokens:,}", cost_text(e.cost_usd), f"{e.latency_ms:.0f}",
                      Text(e.outcome, style=style))
    return table


# ================================================================ simulate

def cmd_simulate(args: argparse.Namespace) -> int:
    from .simulator import run_foreground

    def out(line: str) -> None:
        if line.startswith("provider simulator cannot listen"):
            _print_error(line[len("provider simulator "):] + "; choose another --port (0 picks a free one)")
        else:
            print(line, flush=True)

    out(f"starting the provider simulator (fault rate {args.fault_rate:g}, latency {args.latency:g}s); "
        f"Ctrl-C stops it")
    return run_foreground(args.host, args.port, args.fault_rate, args.latency, out=out)


# ================================================================ demo

def cmd_demo(args: argparse.Namespace) -> int:
    from .demo import run_demo

    target = Path(args.csv).expanduser()
    if target.is_dir():
        raise CLIError(f"--csv {args.csv}: is a directory; name the CSV file to write")
    if not os.access(target.parent if str(target.parent) else ".", os.W_OK):
        raise CLIError(f"--csv {args.csv}: cannot write in {target.parent.resolve()}; "
                       f"choose another path with --csv")
    return run_demo(requests=args.requests, concurrency=args.concurrency, strategy=args.strategy,
                    csv_path=args.csv, console=_console())


if __name__ == "__main__":
    sys.exit(main())
