"""``xml-pipeline-llm check``: validate the llm: block and print the routing table."""

from __future__ import annotations

import argparse
from typing import Any

from ..config import load_config
from ..redact import redact_url
from ..routing import Routes
from .output import make_console, make_table, num, show


def _print_aliases(cfg: Any, console: Any) -> None:
    """``llm.models``: each alias, its chain of models and the backends of each (tried in this order)."""
    from rich.text import Text

    if not cfg.models:
        return
    routes = Routes(cfg.backends, cfg.skipped)
    console.print(Text("aliases (llm.models; each model's backends in brackets):", style="bold"))
    for alias, members in cfg.models.items():
        chain = " -> ".join(f"{m} [{', '.join(b.name for b in routes.route(m)[1])}]" for m in members)
        console.print(Text(f"  {alias}: {chain}"), soft_wrap=True)


def cmd_check(args: argparse.Namespace) -> int:
    from rich.text import Text

    cfg = load_config(args.config)
    console = make_console()
    n = len(cfg.backends)
    console.print(Text.assemble((cfg.source, "bold"), f": {n} backend{'s' if n != 1 else ''}, strategy "
                                f"{cfg.strategy}, retries {cfg.retries}, timeout {num(cfg.timeout)}s"),
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
    rpm = any(b.rate_limit_rpm for b in cfg.backends)   # a column only when some backend sets it
    if rpm:
        table.add_column("RPM", justify="right")
    table.add_column("Conc", justify="right")
    table.add_column("Key", overflow="fold", min_width=min(key_width, 24))
    for b in cfg.backends:
        key = b.key_source
        key_style = "red" if "not set" in key else "green" if "(set)" in key else ""
        limits = [f"{b.rate_limit_tpm:,}" if b.rate_limit_tpm else "-"]
        if rpm:
            limits.append(f"{b.rate_limit_rpm:,}" if b.rate_limit_rpm else "-")
        table.add_row(Text(b.name), Text(b.provider.name), Text(b.describe_models()),
                      str(b.priority), *limits, str(b.max_concurrent), Text(key, style=key_style))
    show(console, table)
    _print_aliases(cfg, console)
    for name, reason in cfg.skipped:    # llm.missing_keys: skip
        console.print(Text(f"{name}: skipped ({reason})", style="yellow"), soft_wrap=True)
    for b in cfg.backends:
        if b.base_url:
            console.print(Text(f"{b.name} base_url: {redact_url(b.base_url)}", style="dim"), soft_wrap=True)
    console.print(Text("config OK", style="bold green"))
    return 0
