"""The kill switch's list of blocks: in memory, or in the SQLite ledger (``guard_blocks``)."""

from __future__ import annotations

import asyncio
import json
import logging
import sqlite3
import threading
import time
from collections.abc import Awaitable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass



log = logging.getLogger("xml_pipeline_llm")

REFRESH_EVERY = 0.5          # seconds: how stale the block list (and a fleet budget's spend, for degrade) may be


# ---------------------------------------------------------------- blocks

@dataclass(frozen=True)
class Block:
    """One entry of the kill switch: the calls matching every field given (agent, thread, metadata)."""

    agent: str | None = None
    thread: str | None = None
    metadata: Mapping[str, str] = field(default_factory=dict, hash=False)
    reason: str = ""
    since: float = 0.0           # UNIX time it was set

    @property
    def target(self) -> str:
        """The block's identity (what ``unblock`` with the same arguments removes)."""
        return target_key(self.agent, self.thread, self.metadata)

    def matches(self, agent: str | None, thread: str | None, metadata: Mapping[str, Any]) -> bool:
        if self.agent is not None and agent != self.agent:
            return False
        if self.thread is not None and thread != self.thread:
            return False
        return all(k in metadata and str(metadata[k]) == v for k, v in self.metadata.items())

    def describe(self) -> str:
        return ", ".join(self._parts("agent {!r}", "thread {!r}", "metadata {}={!r}"))

    def options(self) -> str:
        """The command-line options naming this block (``--agent A --thread T``)."""
        return " ".join(self._parts("--agent {}", "--thread {}", "--metadata {}={}"))

    def _parts(self, agent: str, thread: str, meta: str) -> list[str]:
        parts = [] if self.agent is None else [agent.format(self.agent)]
        if self.thread is not None:
            parts.append(thread.format(self.thread))
        return parts + [meta.format(k, v) for k, v in sorted(self.metadata.items())]

    def to_json(self) -> str:
        return json.dumps({"agent": self.agent, "thread": self.thread, "metadata": dict(self.metadata),
                           "reason": self.reason, "since": self.since}, sort_keys=True)

    @staticmethod
    def from_json(text: str) -> Block:
        d = json.loads(text)
        return Block(d.get("agent"), d.get("thread"), dict(d.get("metadata") or {}), d.get("reason") or "",
                     float(d.get("since") or 0.0))


def target_key(agent: str | None, thread: str | None, metadata: Mapping[str, Any] | None) -> str:
    return json.dumps({"agent": agent, "thread": thread,
                       "metadata": {k: str(v) for k, v in (metadata or {}).items()}},
                      sort_keys=True, separators=(",", ":"))


def checked_target(agent: Any, thread: Any, metadata: Any) -> tuple[str | None, str | None, dict[str, str]]:
    """The arguments of ``block``/``unblock``, checked: at least one, non-empty strings, str metadata."""
    for name, value in (("agent", agent), ("thread", thread)):
        if value is not None and (not isinstance(value, str) or not value):
            raise ValueError(f"{name}: expected a non-empty string (the {name} id), got {value!r}")
    if metadata is not None and (not isinstance(metadata, Mapping) or not all(
            isinstance(k, str) and k and isinstance(v, (str, int, float, bool)) for k, v in metadata.items())):
        raise ValueError(f"metadata: expected a dict of keys to strings, numbers or true/false, got {metadata!r}")
    meta = {k: str(v) for k, v in (metadata or {}).items()}
    if agent is None and thread is None and not meta:
        raise ValueError("name what to block: agent=..., thread=... and/or metadata={key: value}")
    return agent, thread, meta


class BlockList:
    """The kill switch in this process's memory (the base of the SQLite and Redis ones)."""

    def __init__(self) -> None:
        self.entries: dict[str, Block] = {}
        self._lock = threading.Lock()

    def __bool__(self) -> bool:
        return bool(self.entries)

    def match(self, agent: str | None, thread: str | None, metadata: Mapping[str, Any]) -> Block | None:
        for b in list(self.entries.values()):
            if b.matches(agent, thread, metadata):
                return b
        return None

    def refresh(self) -> Awaitable[None] | None:
        """Re-read the store if what this process knows is stale: None when done (or nothing to do), else
        what to await before the request may be sent (Redis: riding along its admission)."""
        return None

    async def add(self, block: Block) -> None:
        with self._lock:
            self.entries[block.target] = block

    async def remove(self, target: str) -> bool:
        with self._lock:
            return self.entries.pop(target, None) is not None

    async def list(self) -> list[Block]:
        return sorted(self.entries.values(), key=lambda b: b.since)

    async def close(self) -> None:
        return None


_SQL_BLOCKS = "CREATE TABLE IF NOT EXISTS guard_blocks (target TEXT PRIMARY KEY, block TEXT NOT NULL)"


class SqliteBlocks(BlockList):
    """Blocks kept in the SQLite ledger's ``guard_blocks`` table; every process using the file re-reads
    it at most every half second (a read of a few rows), so a block reaches them all that fast."""

    def __init__(self, path: Path) -> None:
        super().__init__()
        self.path = path
        self._conn: sqlite3.Connection | None = None
        self._db_lock = threading.Lock()
        self._fresh_until = 0.0
        self._read()

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self._conn = sqlite3.connect(self.path, check_same_thread=False, timeout=30.0)
            self._conn.execute(_SQL_BLOCKS)
            self._conn.commit()
        return self._conn

    def _read(self) -> None:
        with self._db_lock:
            try:
                rows = self._db().execute("SELECT target, block FROM guard_blocks").fetchall()
            except sqlite3.Error as exc:
                log.warning("guards: cannot read the blocks of %s (%s); keeping the ones known", self.path, exc)
                rows = None
            self._fresh_until = time.monotonic() + REFRESH_EVERY
        if rows is not None:
            self.entries = {t: Block.from_json(b) for t, b in rows}

    def refresh(self) -> Awaitable[None] | None:
        if time.monotonic() >= self._fresh_until:
            self._read()
        return None

    def _write(self, sql: str, args: tuple[Any, ...]) -> int:
        with self._db_lock:
            db = self._db()
            n = db.execute(sql, args).rowcount
            db.commit()
            return n

    async def add(self, block: Block) -> None:
        await asyncio.to_thread(self._write, "INSERT OR REPLACE INTO guard_blocks (target, block) VALUES (?, ?)",
                                (block.target, block.to_json()))
        self._read()

    async def remove(self, target: str) -> bool:
        n = await asyncio.to_thread(self._write, "DELETE FROM guard_blocks WHERE target = ?", (target,))
        self._read()
        return n > 0

    async def list(self) -> list[Block]:
        self._read()
        return await super().list()

    async def close(self) -> None:
        with self._db_lock:
            if self._conn is not None:
                self._conn.close()
                self._conn = None
