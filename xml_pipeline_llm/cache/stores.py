"""Where the response cache keeps its entries: memory, a SQLite file, or Redis.

Every store has ``get(key, now)``, ``put(key, entry, ttl)`` and ``close()``;
an expired entry reads as absent.  Their failures are not handled here:
``serve.py`` turns any exception of a store into a miss (and one WARNING per
outage), so a broken store never fails a call.

* ``MemoryStore``: an LRU of ``max_entries`` in this process (entries are the
  ``Entry`` objects themselves: a hit decodes nothing).
* ``SqliteStore``: ``sqlite:///path/cache.db``, one table, WAL mode; kept
  across restarts and shared by the processes of one machine.  Opened on
  first use, so a damaged file never stops the router from starting.
* ``RedisStore``: the ``shared_state`` server, keys
  ``<prefix>:cache:<sha256>`` (``SET ... PX ttl``) and the single-flight locks
  ``<prefix>:cache-lock:<sha256>``; one GET per lookup.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from collections import OrderedDict
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Protocol

from ..shared.scripts import Script


@dataclass
class Entry:
    """One cached answer: what the provider answered and what it cost then."""

    content: str
    model: str
    usage: dict[str, int]
    finish_reason: str
    backend: str
    provider: str
    cost_usd: float | None
    tool_calls: list[dict[str, Any]] = field(default_factory=list)
    stored_at: float = 0.0          # UNIX time
    expires_at: float = 0.0         # UNIX time

    def dumps(self) -> str:
        return json.dumps(asdict(self), separators=(",", ":"))

    @classmethod
    def loads(cls, text: str | bytes) -> Entry:
        found = json.loads(text)
        return cls(**{k: found[k] for k in cls.__dataclass_fields__ if k in found})


class Store(Protocol):
    shown: str          # how messages name the store (no secret)

    async def get(self, key: str, now: float) -> Entry | None: ...
    async def put(self, key: str, entry: Entry, ttl: float) -> None: ...
    async def close(self) -> None: ...


class MemoryStore:
    """The newest ``max_entries`` entries of this process, least recently used first out."""

    shown = "memory"

    def __init__(self, max_entries: int) -> None:
        self.max_entries = max_entries
        self._entries: OrderedDict[str, Entry] = OrderedDict()
        self._lock = threading.Lock()       # routers serve threads running loops of their own

    def __len__(self) -> int:
        return len(self._entries)

    def peek(self, key: str, now: float) -> Entry | None:
        with self._lock:
            entry = self._entries.get(key)
            if entry is None:
                return None
            if entry.expires_at <= now:
                del self._entries[key]
                return None
            self._entries.move_to_end(key)
            return entry

    async def get(self, key: str, now: float) -> Entry | None:
        return self.peek(key, now)

    async def put(self, key: str, entry: Entry, ttl: float) -> None:
        self.keep(key, entry)

    def keep(self, key: str, entry: Entry) -> None:
        with self._lock:
            self._entries[key] = entry
            self._entries.move_to_end(key)
            while len(self._entries) > self.max_entries:
                self._entries.popitem(last=False)

    async def close(self) -> None:
        pass


_SCHEMA = """
CREATE TABLE IF NOT EXISTS response_cache (
    key TEXT PRIMARY KEY, entry TEXT NOT NULL, expires_at REAL NOT NULL
);
CREATE INDEX IF NOT EXISTS response_cache_expiry ON response_cache(expires_at);
"""
_PURGE_EVERY = 256      # writes between deletions of expired rows


class SqliteStore:
    """Entries in a SQLite file (WAL): they outlive the process and are shared on one machine.

    The file is opened on first use and again after a failure (a damaged file
    then fails each operation, which ``serve.py`` treats as a miss).
    """

    def __init__(self, path: Path) -> None:
        self.path = path
        self.shown = f"sqlite:///{path}"
        self._conn: sqlite3.Connection | None = None
        self._lock = threading.Lock()
        self._writes = 0

    def _db(self) -> sqlite3.Connection:
        if self._conn is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            conn = sqlite3.connect(self.path, check_same_thread=False, timeout=5.0)
            try:
                conn.execute("PRAGMA journal_mode=WAL")
                conn.execute("PRAGMA synchronous=NORMAL")
                conn.executescript(_SCHEMA)
            except BaseException:
                conn.close()
                raise
            self._conn = conn
        return self._conn

    def _drop(self) -> None:
        if self._conn is not None:
            try:
                self._conn.close()
            finally:
                self._conn = None

    async def get(self, key: str, now: float) -> Entry | None:
        with self._lock:
            try:
                row = self._db().execute("SELECT entry FROM response_cache WHERE key = ? AND expires_at > ?",
                                         (key, now)).fetchone()
            except BaseException:
                self._drop()
                raise
        return None if row is None else Entry.loads(row[0])

    async def put(self, key: str, entry: Entry, ttl: float) -> None:
        with self._lock:
            try:
                db = self._db()
                db.execute("INSERT OR REPLACE INTO response_cache (key, entry, expires_at) VALUES (?, ?, ?)",
                           (key, entry.dumps(), entry.expires_at))
                self._writes += 1
                if self._writes % _PURGE_EVERY == 0:
                    db.execute("DELETE FROM response_cache WHERE expires_at <= ?", (time.time(),))
                db.commit()
            except BaseException:
                self._drop()
                raise

    async def close(self) -> None:
        with self._lock:
            self._drop()


# Deletes the lock only if this call still holds it (its token), so a lock that expired and was
# taken by another call is left alone.
_UNLOCK = Script("if redis.call('GET', KEYS[1]) == ARGV[1] then return redis.call('DEL', KEYS[1]) end return 0")


class RedisStore:
    """Entries in the ``shared_state`` Redis, shared by every process using it; single flight across them."""

    def __init__(self, conn: Any, prefix: str) -> None:
        self.conn = conn
        self.prefix = prefix
        self.shown = f"redis {conn.shown}"

    def _key(self, key: str) -> str:
        return f"{self.prefix}:cache:{key}"

    def _lock_key(self, key: str) -> str:
        return f"{self.prefix}:cache-lock:{key}"

    async def get(self, key: str, now: float) -> Entry | None:
        (found,) = await self.conn.commands(("GET", self._key(key)))
        return _live(found, now)

    async def put(self, key: str, entry: Entry, ttl: float) -> None:
        await self.conn.commands(("SET", self._key(key), entry.dumps(), "PX", max(1, int(ttl * 1000))))

    async def lock(self, key: str, ms: int) -> tuple[str | None, Entry | None]:
        """Take the single-flight lock of ``key`` (its token, or None when another call holds it), and the
        entry if one was stored meanwhile: one round trip."""
        token = uuid.uuid4().hex
        got, found = await self.conn.commands(("SET", self._lock_key(key), token, "NX", "PX", ms),
                                              ("GET", self._key(key)))
        return (token if got else None), _live(found, time.time())

    async def renew(self, key: str, ms: int) -> None:
        await self.conn.commands(("PEXPIRE", self._lock_key(key), ms))

    async def unlock(self, key: str, token: str) -> None:
        await self.conn.eval(_UNLOCK, [self._lock_key(key)], [token])

    async def poll(self, key: str) -> tuple[Entry | None, bool]:
        """The entry (None: not yet), and whether another call still holds the lock."""
        found, held = await self.conn.commands(("GET", self._key(key)), ("EXISTS", self._lock_key(key)))
        return _live(found, time.time()), bool(held)

    async def close(self) -> None:
        pass        # the connection is shared state's, closed with it


def _live(found: Any, now: float) -> Entry | None:
    if not found:
        return None
    entry = Entry.loads(found)
    return entry if entry.expires_at > now else None
