"""``xml-pipeline-llm usage``: totals and events from a SQLite ledger or the fleet's Redis."""

from __future__ import annotations

import argparse
import os
import re
import sys
import time
from pathlib import Path
from typing import Any

from ..config import config_file, read_llm_block, resolve_store
from ..env import CONFIG_ENV, REDIS_SCHEMES
from ..redact import redact_url
from ..stores import open_store, read_events, sqlite_path
from ..usage import TOTAL_COLUMNS, AgentUsage, group_events, write_csv
from .output import CLIError, cost_text, make_console, make_table, show, when_text

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
    where, events, totals = _read(args)
    if args.csv:
        return _usage_csv(args.csv, args.by, events, totals)
    console = make_console()
    if not (events if args.by == "event" else totals):
        when = f" since {args.since}" if args.since else ""
        console.print(f"no calls recorded in {where}{when}", soft_wrap=True)
        return 0
    if events:
        console.print(f"{where}: {len(events)} provider call{'s' if len(events) != 1 else ''}, "
                      f"{when_text(events[0].timestamp)} .. {when_text(events[-1].timestamp)} UTC", soft_wrap=True)
    else:
        console.print(f"{where}: fleet totals by {args.by}", soft_wrap=True)
    if args.by == "event":
        show(console, _event_table(events))
        line = _cache_line(events)
        if line:
            console.print(line, soft_wrap=False)
        return 0
    show(console, _totals_table(args.by, totals or {}))
    details = _details_table(args.by, totals or {})
    if details is not None:
        console.print()
        show(console, details)
    return 0


def _read(args: argparse.Namespace) -> tuple[str, list[Any], Any]:
    """Where the ledger is (for the messages), its events and (unless --by event) the totals."""
    url, prefix, source = (args.store, None, None) if args.store else _store_from_config(args.config)
    prefix = args.redis_prefix or prefix
    if not url or url == "memory":
        why = (f"{source} has no llm.usage_store or llm.shared_state" if source else
               f"no -c FILE, ${CONFIG_ENV} or ./organism.yaml")
        raise CLIError(f"no usage ledger to read ({why}); pass --store sqlite:///path/usage.db "
                       f"or set usage_store: sqlite:///... in the llm: block")
    since = parse_since(args.since)
    if url.startswith(REDIS_SCHEMES):
        where, events, totals = _read_redis(url, prefix or "xpl", args.by, since)
    else:
        path = _ledger_path(url)
        where, events, totals = str(path), list(read_events(path, since)), None
    if totals is None and args.by != "event":
        totals = group_events(events, args.by)
    return where, events, totals


def _read_redis(url: str, prefix: str, by: str, since: float | None) -> tuple[str, list[Any], Any]:
    """Usage kept in Redis (``shared_state``): exact totals, or the recent events for --by event / --since."""
    shown = redact_url(url)
    store = open_store(url, prefix)    # ConfigError when Redis does not answer
    try:
        if by == "event" or since is not None:
            return shown, list(store.events(since)), None
        totals = store.totals(by)
        if by.startswith("metadata.") and not totals:
            # Not in llm.telemetry.group_by_metadata, so no fleet totals: from the recent events.
            return shown, list(store.events(None)), None
    except Exception as exc:   # RedisDown, connection errors: the server went away mid-read
        raise CLIError(f"usage store {shown}: Redis stopped answering ({type(exc).__name__})") from exc
    if totals is None:
        raise CLIError(f"usage store {shown}: Redis does not answer")
    return shown, [], totals


def _ledger_path(url: str) -> Path:
    if "://" not in url:
        return Path(url)
    return sqlite_path(url)


def _store_from_config(config: str | None) -> tuple[str | None, str | None, str | None]:
    """The usage store, Redis prefix and path of the organism file (-c, $XML_PIPELINE_LLM_CONFIG or ./organism.yaml).

    ``llm.usage_store`` (a relative SQLite path is next to the file, as the router
    resolves it); else ``llm.shared_state`` (Redis keeps the fleet's usage too),
    with ``llm.redis_prefix``.
    """
    if config is None and not os.environ.get(CONFIG_ENV) and not Path("organism.yaml").exists():
        return None, None, None
    path = config_file(config)
    block = read_llm_block(path)
    store = block.get("usage_store")
    if store in (None, "memory") and isinstance(block.get("shared_state"), str):
        store = block["shared_state"]
    if store is not None and not isinstance(store, str):
        raise CLIError(f"llm.usage_store: expected sqlite:///path/usage.db, got {store!r}")
    prefix = block.get("redis_prefix")
    return resolve_store(store, path.parent), prefix if isinstance(prefix, str) else None, str(path)


def _usage_csv(target: str, by: str, events: list[Any], totals: Any) -> int:
    if target == "-":
        import tempfile

        with tempfile.TemporaryDirectory() as tmp:
            tmp_path = Path(tmp) / "usage.csv"
            write_csv(tmp_path, by, totals=totals, events=events)
            sys.stdout.write(tmp_path.read_text(encoding="utf-8"))
        return 0
    rows = write_csv(target, by, totals=totals, events=events)
    make_console().print(f"wrote {rows} row{'s' if rows != 1 else ''} (by {by}) to {target}", soft_wrap=True)
    return 0


def _totals_table(by: str, groups: dict[str, Any]) -> Any:
    """Totals per key with a totals footer; an unknown cost (no priced call) shows "-"."""
    from rich.text import Text

    total = AgentUsage()
    for u in groups.values():
        total.merge(u)
    table = make_table(footer=True)
    table.add_column(by if by.startswith("metadata.") else by.capitalize(), overflow="fold", footer="total")
    columns = MAIN_COLUMNS if total.cache_hits else [c for c in MAIN_COLUMNS if c not in CACHE_COLUMNS]
    for column, foot in zip(columns, usage_cells(total, columns)):
        table.add_column(HEADINGS[column], justify="right", footer=foot)
    for key in sorted(groups):
        table.add_row(Text(key), *usage_cells(groups[key], columns))
    return table


def _details_table(by: str, groups: dict[str, Any]) -> Any | None:
    """Prompt-cache and reasoning tokens per key (None when no call reported any): a table of its own,
    so that the totals table stays readable on 80 columns."""
    from rich.text import Text

    if not any(getattr(u, c) for u in groups.values() for c in DETAIL_COLUMNS):
        return None
    table = make_table(title="Prompt cache and reasoning (tokens)")
    table.add_column(by if by.startswith("metadata.") else by.capitalize(), overflow="fold")
    for heading in ("Input", "Cached", "Cache write", "Uncached", "Output", "Reasoning"):
        table.add_column(heading, justify="right")
    for key in sorted(groups):
        u = groups[key]
        uncached = u.prompt_tokens - u.cached_tokens - u.cache_write_tokens
        table.add_row(Text(key), *(f"{n:,}" for n in (u.prompt_tokens, u.cached_tokens, u.cache_write_tokens,
                                                     uncached, u.completion_tokens, u.reasoning_tokens)))
    return table


#: The totals table's heading for each ``AgentUsage`` field (``TOTAL_COLUMNS``, in that order).
HEADINGS = {"prompt_tokens": "Prompt", "completion_tokens": "Completion", "total_tokens": "Total",
            "request_count": "Requests", "error_count": "Errors", "cost_usd": "Cost USD",
            "unpriced_requests": "Unpriced", "cached_tokens": "Cached", "cache_write_tokens": "Cache write",
            "reasoning_tokens": "Reasoning", "cache_hits": "Cache hits", "saved_usd": "Saved USD"}
DETAIL_COLUMNS = ("cached_tokens", "cache_write_tokens", "reasoning_tokens")   # in a table of their own
CACHE_COLUMNS = ("cache_hits", "saved_usd")    # the response cache's: shown when it answered any request
MAIN_COLUMNS = [c for c in TOTAL_COLUMNS if c not in DETAIL_COLUMNS]


def usage_cells(u: Any, columns: list[str] = MAIN_COLUMNS) -> list[str]:
    return [cost_text(getattr(u, c)) if c in ("cost_usd", "saved_usd") else f"{getattr(u, c):,}" for c in columns]


def _cache_line(events: list[Any]) -> str | None:
    """One line on the prompt cache and reasoning of these events (None when none reported any)."""
    prompt = sum(e.prompt_tokens for e in events)
    cached = sum(e.cached_tokens for e in events)
    written = sum(e.cache_write_tokens for e in events)
    reasoning = sum(e.reasoning_tokens for e in events)
    if not (cached or written or reasoning):
        return None
    return (f"Prompt cache: {cached:,} of {prompt:,} input tokens read from it, {written:,} written to it; "
            f"{reasoning:,} output tokens of reasoning.")


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
        style = "" if e.succeeded else "red" if e.ended_in_error else "yellow"
        table.add_row(when_text(e.timestamp)[5:], Text(e.agent_id or "(none)"), Text(e.model), Text(e.backend),
                      f"{e.total_tokens:,}", cost_text(e.cost_usd), f"{e.latency_ms:.0f}",
                      Text(e.outcome, style=style))
    return table
