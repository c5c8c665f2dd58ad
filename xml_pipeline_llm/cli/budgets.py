"""``xml-pipeline-llm budgets``: every budget of an organism, its spend, what is held, when it resets."""

from __future__ import annotations

import argparse
import csv
import sys
from typing import TYPE_CHECKING, Any

from ..config import load_config
from ..router import LLMRouter
from ..stores import open_store, read_events, sqlite_path
from .output import make_console, make_table, show, when_text

if TYPE_CHECKING:
    from ..budgets import BudgetStatus
    from ..config import RouterConfig

COLUMNS = ("scope", "key", "used_tokens", "limit_tokens", "used_usd", "limit_usd", "reserved_tokens",
           "reserved_usd", "remaining_tokens", "remaining_usd", "window", "resets_at")


def cmd_budgets(args: argparse.Namespace) -> int:
    cfg = load_config(args.config)
    router = LLMRouter(cfg)
    try:
        found = [s for s in (router.budget_status(scope, key) for scope, key in _keys(cfg)) if s is not None]
    finally:
        router.close()
    if args.csv:
        _write_csv(args.csv, found)
        return 0
    console = make_console()
    if not found:
        console.print(f"{cfg.source}: no budget to show (llm.budgets names no agent, thread or metadata "
                      f"value by name, and no recorded call falls under a pattern or max_tokens_per_thread)")
        return 0
    table = make_table(title=f"Budgets of {cfg.source}")
    for name, justify in (("Scope", "left"), ("Key", "left"), ("Used / limit", "right"),
                          ("Reserved", "right"), ("Resets at (UTC)", "left")):
        table.add_column(name, justify=justify)
    for s in found:
        table.add_row(s.scope, s.key or "-", _used(s), _reserved(s),
                      when_text(s.resets_at) if s.resets_at else "never")
    show(console, table)
    return 0


def _keys(cfg: RouterConfig) -> list[tuple[str, str | None]]:
    """The budget keys worth showing: ``global``; every key a budget names by name (a plain ``match``,
    spent against or not); and the agents and threads the store has seen."""
    scopes = {b.scope for b in cfg.budgets}
    keys: list[tuple[str, str | None]] = [("global", None)] if "global" in scopes else []
    named = {(b.scope, b.match) for b in cfg.budgets if b.scope != "global" and _plain(b.match)}
    seen = _seen(cfg)
    for scope in ("agent", "thread"):
        if scope in scopes:
            named |= {(scope, k) for k in seen.get(scope, ())}
    keys += sorted(named)
    return keys


def _plain(match: str) -> bool:
    """Whether a budget's ``match`` names one key (not a shell pattern)."""
    return not any(c in match for c in "*?[")


def _seen(cfg: RouterConfig) -> dict[str, set[str]]:
    column = {"agent": "agent_id", "thread": "thread_id"}
    out: dict[str, set[str]] = {"agent": set(), "thread": set()}
    if cfg.usage_store and cfg.usage_store.startswith("sqlite:///"):
        path = sqlite_path(cfg.usage_store)
        if path.exists():
            for e in read_events(path):
                for scope, col in column.items():
                    if getattr(e, col):
                        out[scope].add(getattr(e, col))
    if cfg.shared_state:
        store: Any = open_store(cfg.shared_state, cfg.redis_prefix)
        for group, scope in (("agent", "agent"), ("thread", "thread")):
            totals = store.totals(group) or {}
            out[scope] |= {k for k in totals if k != "(none)"}
    return out


def _used(s: BudgetStatus) -> str:
    parts = []
    if s.limit_tokens is not None:
        parts.append(f"{s.used_tokens:,} / {s.limit_tokens:,} tokens")
    if s.limit_usd is not None:
        parts.append(f"${s.used_usd:.4f} / ${s.limit_usd:g}")
    return ", ".join(parts)


def _reserved(s: BudgetStatus) -> str:
    parts = [f"{s.reserved_tokens:,}"] if s.limit_tokens is not None else []
    if s.limit_usd is not None:
        parts.append(f"${s.reserved_usd:.4f}")
    return ", ".join(parts)


def _write_csv(path: str, rows: list[BudgetStatus]) -> None:
    fh = sys.stdout if path == "-" else open(path, "w", newline="", encoding="utf-8")  # noqa: SIM115
    try:
        out = csv.writer(fh)
        out.writerow(COLUMNS)
        for s in rows:
            out.writerow(["" if getattr(s, c) is None else getattr(s, c) for c in COLUMNS])
    finally:
        if fh is not sys.stdout:
            fh.close()
