"""Durable usage stores: where every usage event is kept beyond the process.

``usage_store: sqlite:///path/usage.db`` appends each event to a SQLite ledger
in WAL mode.  A single writer thread does the inserts, so the event loop never
blocks on the disk, and it commits in groups: ``complete()`` returns only once
its own event is committed, so a call that returned is in the ledger even if
the process is killed right after.  A ledger that cannot be
written does not fail calls: their rows wait in memory, retried, with an ERROR.
"""

from __future__ import annotations

import asyncio
import atexit
import json
import logging
import queue
import random
import sqlite3
import threading
import time
from collections.abc import Iterator
from pathlib import Path
from typing import TYPE_CHECKING, Any

from .budgets import metadata_key
from .circuit import Breakers, MemoryBreakers, settings
from .env import REDIS_SCHEMES
from .errors import ConfigError
from .state import MemoryState, State
from .usage import EVENT_FIELDS, UsageEvent, metadata_from, metadata_json

if TYPE_CHECKING:
    from .config import RouterConfig

log = logging.getLogger("xml_pipeline_llm")

_COLUMNS = EVENT_FIELDS
_SCHEMA = """
CREATE TABLE IF NOT EXISTS usage_events (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    timestamp REAL NOT NULL, agent_id TEXT, thread_id TEXT, model TEXT, backend TEXT,
    provider TEXT, prompt_tokens INTEGER, completion_tokens INTEGER, total_tokens INTEGER,
    cost_usd REAL, latency_ms REAL, outcome TEXT, call_id TEXT, requested_model TEXT, metadata TEXT,
    cached_tokens INTEGER DEFAULT 0, cache_write_tokens INTEGER DEFAULT 0, reasoning_tokens INTEGER DEFAULT 0,
    saved_usd REAL
);
CREATE INDEX IF NOT EXISTS usage_events_ts ON usage_events(timestamp);
"""
# Columns a ledger written by an older version may lack: added on opening (ALTER TABLE ... ADD COLUMN),
# so an old ledger opens, keeps its rows (which read back with the default) and gains the column.
_DETAIL_COLUMNS = ("cached_tokens", "cache_write_tokens", "reasoning_tokens")   # 0 in older rows
_SQL_TYPES = {"prompt_tokens": "INTEGER", "completion_tokens": "INTEGER", "total_tokens": "INTEGER",
              "timestamp": "REAL", "cost_usd": "REAL", "latency_ms": "REAL", "saved_usd": "REAL",
              **{c: "INTEGER DEFAULT 0" for c in _DETAIL_COLUMNS}}
_JSON_COLUMNS = ("metadata",)   # stored as JSON text (NULL when empty)
_INSERT = f"INSERT INTO usage_events ({', '.join(_COLUMNS)}) VALUES ({', '.join('?' * len(_COLUMNS))})"
_STOP = object()
_RETRY_SECONDS = 1.0   # how often rows a failed write kept are tried again
_REPORT_EVERY = 60.0   # seconds between ERRORs while the ledger stays unwritable
_BUSY_TIMEOUT = 30.0   # seconds a ledger operation waits for another process's lock


def sqlite_path(url: str) -> Path:
    if not url.startswith("sqlite:///"):
        raise ConfigError(f'usage store: expected sqlite:///path/usage.db, got "{url}"')
    return Path(url[len("sqlite:///"):])


def open_store(url: str | None, prefix: str = "xpl") -> Any:
    """The store named by ``url`` (None: memory only).

    ``sqlite:///path/usage.db`` is the durable SQLite ledger; ``redis://host:port/db``
    is the fleet's usage in Redis under ``prefix`` (``RedisUsageStore``: totals and
    recent events, as ``shared_state`` writes them; the CLI reads it this way).
    """
    if not url or url == "memory":
        return None
    if url.startswith(REDIS_SCHEMES):
        from .shared.usage import RedisUsageStore

        return RedisUsageStore(url, prefix)
    return SqliteStore(sqlite_path(url))


def make_state(config: RouterConfig) -> State:
    """The state for a router: ``RedisState`` with ``shared_state`` set, else ``MemoryState``.

    Building a ``RedisState`` checks that Redis answers, raising ``ConfigError``
    (naming the URL without its password) when it does not.
    """
    if not config.shared_state:
        return MemoryState(config.priority_aging)
    from .shared.state import RedisState

    return RedisState(config.shared_state, config.redis_prefix or "xpl", priority_aging=config.priority_aging)


def make_breakers(config: RouterConfig, state: State) -> Breakers:
    """The circuit breakers of a router's backends (``circuit.py``): in Redis when its state is
    (``shared_state``), else in this process.  A probe's lease is its backend's timeout and 5 s."""
    conf = settings(config)
    ttl = {b.name: b.timeout + 5.0 for b in config.backends}
    if getattr(state, "conn", None) is None or not hasattr(state, "key"):
        return MemoryBreakers(conf, ttl)
    from .shared.circuit import RedisBreakers

    return RedisBreakers(conf, state, ttl)     # type: ignore[arg-type]


def _connect(path: Path) -> sqlite3.Connection:
    """Open the ledger in WAL mode with its schema, waiting up to ``_BUSY_TIMEOUT`` for other writers.

    SQLite waits for locks through the busy timeout, except when it would risk a
    deadlock: switching a new ledger to WAL while another process holds its write
    lock (both opening it at once, say) fails at once with "database is locked".
    So the whole opening is retried, with a short random pause, until the same
    deadline; another process's lock is a wait, never an error.
    """
    deadline = time.monotonic() + _BUSY_TIMEOUT
    while True:
        conn = sqlite3.connect(path, check_same_thread=False, timeout=_BUSY_TIMEOUT)
        try:
            conn.execute("PRAGMA journal_mode=WAL")
            conn.execute("PRAGMA synchronous=NORMAL")   # a commit survives a killed process
            conn.executescript(_SCHEMA)
            _migrate(conn)
            return conn
        except sqlite3.OperationalError as exc:
            conn.close()
            if not _is_busy(exc) or time.monotonic() >= deadline:
                raise
        except BaseException:
            conn.close()
            raise
        time.sleep(random.uniform(0.005, 0.05))


def _columns(conn: sqlite3.Connection) -> list[str]:
    return [row[1] for row in conn.execute("PRAGMA table_info(usage_events)")]


def _migrate(conn: sqlite3.Connection) -> None:
    """Add the event columns an older ledger lacks (``metadata``, ...); its rows are kept."""
    have = set(_columns(conn))
    missing = [c for c in _COLUMNS if c not in have]
    for column in missing:
        try:
            conn.execute(f"ALTER TABLE usage_events ADD COLUMN {column} {_SQL_TYPES.get(column, 'TEXT')}")
        except sqlite3.OperationalError as exc:
            if "duplicate column" not in str(exc):    # another process migrated it first
                raise
    if missing:
        conn.commit()
        log.info("usage ledger: added the column(s) %s to an older ledger", ", ".join(missing))


def _is_busy(exc: sqlite3.OperationalError) -> bool:
    """Whether another connection's lock caused ``exc`` (SQLITE_BUSY or SQLITE_LOCKED)."""
    code = getattr(exc, "sqlite_errorcode", None)   # Python 3.11+
    if code is not None:
        return code & 0xFF in (5, 6)
    return "locked" in str(exc) or "busy" in str(exc)


class SqliteStore:
    """Append-only SQLite ledger written by one background thread with group commits."""

    def __init__(self, path: Path) -> None:
        self.path = path
        try:
            path.parent.mkdir(parents=True, exist_ok=True)
            _connect(path).close()
        except (OSError, sqlite3.Error) as exc:
            raise ConfigError(f"llm.usage_store: cannot open {path}: {exc}") from None
        self._queue: queue.SimpleQueue[Any] = queue.SimpleQueue()
        self._thread: threading.Thread | None = None
        self._lock = threading.Lock()
        self._unwritten: list[UsageEvent] = []   # rows a failed write kept, for the next try
        self._reported_at = float("-inf")

    def _ensure_writer(self) -> None:
        if self._thread is None:
            with self._lock:
                if self._thread is None:
                    self._thread = threading.Thread(target=self._write_loop, name="xpl-usage-sqlite",
                                                    daemon=True)
                    self._thread.start()
                    atexit.register(self._flush_at_exit)

    async def append(self, event: UsageEvent) -> None:
        """Append and wait until the row is committed (or kept for a retry if the write failed)."""
        self._ensure_writer()
        loop = asyncio.get_running_loop()
        fut = loop.create_future()
        self._queue.put((event, fut, loop))
        await fut

    def append_nowait(self, event: UsageEvent) -> None:
        """Append without waiting (callbacks, finalisers); committed within milliseconds."""
        self._ensure_writer()
        self._queue.put((event, None, None))

    def _write_loop(self) -> None:
        """Commit queued events in groups; a failed write keeps its rows and is retried.

        A ledger that cannot be written (disk full, file removed or damaged) must
        neither fail the calls that were already paid for nor lose their rows: the
        waiting calls are released, the rows stay here and are retried every
        ``_RETRY_SECONDS``, and an ERROR says so (at most once a minute).
        """
        conn: sqlite3.Connection | None = None
        while True:
            items, stop = self._next_batch(_RETRY_SECONDS if self._unwritten else None)
            rows = self._unwritten + [event for event, _, _ in items]
            try:
                if rows:
                    conn = conn or _connect(self.path)
                    conn.executemany(_INSERT, [_row(e) for e in rows])
                    conn.commit()
                    self._written_again(len(self._unwritten))
                self._unwritten = []
            except (sqlite3.Error, OSError) as exc:
                if conn is not None:
                    conn.close()    # rolls back; the next try reopens (and recreates the table)
                    conn = None
                self._unwritten = rows
                self._report_failure(exc, stop)
            for _, fut, loop in items:
                if fut is not None:
                    try:
                        loop.call_soon_threadsafe(_settle, fut)
                    except RuntimeError:   # the waiter's loop is gone; the row is kept anyway
                        pass
            if stop:
                if conn is not None:
                    conn.close()
                return

    def _next_batch(self, timeout: float | None) -> tuple[list[Any], bool]:
        """Everything queued (waiting up to ``timeout`` for the first item), and whether to stop."""
        try:
            batch = [self._queue.get(timeout=timeout)]
        except queue.Empty:
            return [], False
        while True:
            try:
                batch.append(self._queue.get_nowait())
            except queue.Empty:
                break
        return [item for item in batch if item is not _STOP], any(item is _STOP for item in batch)

    def _report_failure(self, exc: BaseException, stopping: bool) -> None:
        now = time.monotonic()
        if stopping or now - self._reported_at >= _REPORT_EVERY:
            self._reported_at = now
            fate = ("unwritten as the writer stops: lost if the process exits now" if stopping
                    else f"kept in memory and retried every {_RETRY_SECONDS:g}s")
            log.error("usage ledger %s: cannot write %d usage events (%s); they are %s",
                      self.path, len(self._unwritten), exc, fate)

    def _written_again(self, count: int) -> None:
        if count:
            self._reported_at = float("-inf")
            log.warning("usage ledger %s: writable again; wrote the %d usage events kept while it was not",
                        self.path, count)

    def flush(self) -> None:
        """Write what is queued and stop the writer (it restarts on the next append)."""
        thread, self._thread = self._thread, None
        if thread is not None and thread.is_alive():
            self._queue.put(_STOP)
            thread.join(timeout=10)

    _flush_at_exit = flush

    async def close(self) -> None:
        if self._thread is not None:
            self._queue.put(_STOP)
            await asyncio.get_running_loop().run_in_executor(None, self._thread.join, 10)
            self._thread = None

    def events(self, since: float | None = None) -> Iterator[UsageEvent]:
        """Every event in the ledger (oldest first), optionally since a UNIX time."""
        return read_events(self.path, since)

    def spend(self, scope: str, key: str | None, since: float | None) -> tuple[int, float]:
        """Tokens and dollars the ledger holds for a budget's key since a time (budgets after a restart).

        Scopes ``agent``, ``thread``, ``global`` and ``metadata.<key>`` (the calls whose
        metadata has that key, with a value whose text is ``key``).
        """
        if scope.startswith("metadata."):
            return self._metadata_spend(scope[len("metadata."):], key, since)
        column = {"agent": "agent_id", "thread": "thread_id", "global": None}.get(scope, "")
        if column == "":
            return 0, 0.0
        self.flush()
        sql = "SELECT COALESCE(SUM(total_tokens), 0), COALESCE(SUM(cost_usd), 0) FROM usage_events"
        args: list[str | float | None] = []
        where = []
        if column is not None:
            where.append(f"{column} = ?")
            args.append(key)
        if since is not None:
            where.append("timestamp >= ?")
            args.append(since)
        if where:
            sql += " WHERE " + " AND ".join(where)
        conn = _connect(self.path)
        try:
            tokens, usd = conn.execute(sql, args).fetchone()
        finally:
            conn.close()
        return int(tokens), float(usd)

    def _metadata_spend(self, name: str, value: str | None, since: float | None) -> tuple[int, float]:
        """``spend`` of a ``metadata.<name>`` budget: the rows that name it are read and their JSON compared."""
        self.flush()
        needle = json.dumps(name) + ":"          # how the key appears in the stored (compact) JSON
        sql = "SELECT total_tokens, cost_usd, metadata FROM usage_events WHERE instr(metadata, ?) > 0"
        args: list[str | float] = [needle]
        if since is not None:
            sql += " AND timestamp >= ?"
            args.append(since)
        tokens, usd = 0, 0.0
        conn = _connect(self.path)
        try:
            for row_tokens, row_usd, text in conn.execute(sql, args):
                found = metadata_from(text)
                if name in found and metadata_key(found[name]) == value:
                    tokens += int(row_tokens or 0)
                    usd += float(row_usd or 0.0)
        finally:
            conn.close()
        return tokens, usd


def read_events(path: Path, since: float | None = None) -> Iterator[UsageEvent]:
    if not path.exists():
        raise ConfigError(f"{path}: no usage ledger there; check the --store path")
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        have = set(_columns(conn))           # an older ledger, not yet migrated, lacks some columns
        columns = [c for c in _COLUMNS if c in have]
        sql = f"SELECT {', '.join(columns)} FROM usage_events"
        args: tuple[Any, ...] = ()
        if since is not None:
            sql += " WHERE timestamp >= ?"
            args = (since,)
        for row in conn.execute(sql + " ORDER BY id", args):
            found = dict(zip(columns, row))
            for name in _JSON_COLUMNS:
                found[name] = metadata_from(found.get(name))
            found["requested_model"] = found.get("requested_model") or found.get("model") or ""   # older rows
            for name in _DETAIL_COLUMNS:
                found[name] = int(found.get(name) or 0)
            yield UsageEvent(**found)
    except sqlite3.Error as exc:
        raise ConfigError(f"{path}: not a usage ledger ({exc})") from None
    finally:
        conn.close()


def _row(event: UsageEvent) -> tuple[Any, ...]:
    return tuple((metadata_json(getattr(event, c)) or None) if c in _JSON_COLUMNS else getattr(event, c)
                 for c in _COLUMNS)


def _settle(fut: asyncio.Future[None]) -> None:
    if not fut.done():
        fut.set_result(None)
