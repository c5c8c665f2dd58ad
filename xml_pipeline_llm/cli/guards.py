"""``xml-pipeline-llm block``, ``unblock``, ``blocked``: the kill switch, on the organism's store.

The store is the one every router of the organism reads: ``llm.shared_state``
(Redis: every process sees a change within a second) or else the SQLite ledger
of ``llm.usage_store`` (every process using that file sees it within a second).
"""

from __future__ import annotations

import argparse
import asyncio
from typing import Any

from ..config import load_config
from ..guards import Block, checked_target, open_blocks, target_key
from ..redact import redact_url
from .output import CLIError, make_console, make_table, show, when_text


def _target(args: argparse.Namespace) -> dict[str, Any]:
    metadata = {}
    for item in args.metadata or []:
        key, sep, value = item.partition("=")
        if not sep or not key:
            raise CLIError(f"--metadata: expected KEY=VALUE such as org_id=acme, got {item!r}")
        metadata[key] = value
    if args.agent is None and args.thread is None and not metadata:
        raise CLIError("name what to block: --agent A, --thread T and/or --metadata KEY=VALUE")
    return {"agent": args.agent, "thread": args.thread, "metadata": metadata}


def _run(args: argparse.Namespace, what: str) -> Any:
    cfg = load_config(args.config)
    store = open_blocks(cfg)

    async def go() -> Any:
        try:
            if what == "list":
                return await store.list()
            target = _target(args)
            agent, thread, meta = checked_target(**target)
            if what == "block":
                import time

                block = Block(agent, thread, meta, args.reason or "", time.time())
                await store.add(block)
                return block
            return Block(agent, thread, meta) if await store.remove(target_key(agent, thread, meta)) else None
        finally:
            await store.close()
            conn = getattr(store, "conn", None)
            if conn is not None:
                await conn.aclose()

    return cfg, asyncio.run(go())


def cmd_block(args: argparse.Namespace) -> int:
    cfg, block = _run(args, "block")
    print(f"blocked {block.describe()}: {block.reason or 'no reason given'} ({_where(cfg)}); its new requests "
          f"raise BlockedError, calls in flight finish. Undo: xml-pipeline-llm unblock with the same options")
    return 0


def cmd_unblock(args: argparse.Namespace) -> int:
    cfg, block = _run(args, "unblock")
    if block is None:
        print(f"nothing to unblock: no block with exactly these options in {_where(cfg)} "
              f"(xml-pipeline-llm blocked lists them)")
        return 0
    print(f"unblocked {block.describe()} ({_where(cfg)})")
    return 0


def cmd_blocked(args: argparse.Namespace) -> int:
    cfg, blocks = _run(args, "list")
    console = make_console()
    if not blocks:
        console.print(f"nothing is blocked ({_where(cfg)})")
        return 0
    table = make_table(title=f"Blocked ({_where(cfg)})")
    for name in ("Agent", "Thread", "Metadata", "Reason", "Since (UTC)"):
        table.add_column(name)
    for b in blocks:
        table.add_row(b.agent or "-", b.thread or "-",
                      ", ".join(f"{k}={v}" for k, v in sorted(b.metadata.items())) or "-",
                      b.reason or "-", when_text(b.since) if b.since else "-")
    show(console, table)
    return 0


def _where(cfg: Any) -> str:
    return f"Redis {redact_url(cfg.shared_state)}" if cfg.shared_state else f"ledger {cfg.usage_store[10:]}"
