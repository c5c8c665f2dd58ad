"""Where ``xml-pipeline-llm top`` reads its snapshots from, outside the processes that make the calls.

* ``GatewaySource``: a gateway's ``GET /v1/snapshot`` (an admin key when it has keys);
* ``RedisSource``: the fleet's shared state (``llm.shared_state``): usage totals,
  the recent events of the usage stream (per-minute figures, last errors), each
  backend's slots held and cooldown (the gates' shared keys), the budgets'
  fleet-wide spend;
* ``SqliteSource``: the SQLite ledger (``llm.usage_store``): totals, the last
  minute's events and the last errors; no backend load (it is not stored there).

``open_source`` picks one; with the default in-memory store there is nothing to
watch from another process, and it says so.  Every source's ``read()`` gives a
``Snapshot`` (``snapshot.py``).
"""

from __future__ import annotations

import json
import os
import sqlite3
import time
from collections import deque
from collections.abc import Iterable
from pathlib import Path
from typing import TYPE_CHECKING, Any, Protocol

from .budgets import Budgets
from .config import load_config
from .errors import ConfigError
from .snapshot import ERRORS, WINDOW, BackendState, Snapshot, assemble, budget_keys
from .stores import SqliteStore, read_events, sqlite_path
from .usage import AgentUsage, UsageEvent

if TYPE_CHECKING:
    from .budgets import BudgetStatus
    from .config import RouterConfig

KEY_ENV = "XML_PIPELINE_LLM_KEY"


class WatchError(Exception):
    """A source cannot be read.  ``fatal``: retrying will not help (a refused key, a wrong URL)."""

    def __init__(self, message: str, fatal: bool = False) -> None:
        super().__init__(message)
        self.fatal = fatal


class Source(Protocol):
    where: str

    def read(self) -> Snapshot: ...
    def close(self) -> None: ...


# ------------------------------------------------------------------ a gateway

class GatewaySource:
    """``GET <url>/v1/snapshot`` with ``Authorization: Bearer <key>`` (never the key in the URL)."""

    def __init__(self, url: str, key: str | None, timeout: float = 5.0) -> None:
        base = url.strip().rstrip("/")
        if not base.startswith(("http://", "https://")):
            raise ConfigError(f"--url: expected the gateway's address such as http://127.0.0.1:4000, got {url!r}")
        if base.endswith("/v1"):
            base = base[:-3]
        self.url = base + "/v1/snapshot"
        self.where = base
        self._key = key
        self.timeout = timeout

    def __repr__(self) -> str:
        return f"GatewaySource({self.where!r})"

    def read(self) -> Snapshot:
        import urllib.error
        import urllib.request

        headers = {"Accept": "application/json"}
        if self._key:
            headers["Authorization"] = f"Bearer {self._key}"
        req = urllib.request.Request(self.url, headers=headers)
        try:
            with urllib.request.urlopen(req, timeout=self.timeout) as resp:     # noqa: S310 (http/https only)
                body = resp.read()
        except urllib.error.HTTPError as exc:
            message = _error_message(exc.read())
            if exc.code == 401:
                raise WatchError(f"{self.where} refused: {message}; give an admin key with --key or "
                                 f"${KEY_ENV}", fatal=True) from None
            if exc.code == 403:
                raise WatchError(f"{self.where} refused the key (403): top needs a key with admin: true in "
                                 f"llm.gateway.keys", fatal=True) from None
            if exc.code == 404:
                raise WatchError(f"{self.where} has no /v1/snapshot (404): is it an xml-pipeline-llm gateway of "
                                 f"this version?", fatal=True) from None
            raise WatchError(f"{self.where} answered {exc.code}: {message}") from None
        except (urllib.error.URLError, OSError) as exc:
            reason = getattr(exc, "reason", exc)
            raise WatchError(f"cannot reach {self.where} ({reason})") from None
        try:
            snap = Snapshot.from_json(body)
        except ValueError as exc:
            raise WatchError(f"{self.where}: {exc}", fatal=True) from None
        return snap

    def close(self) -> None:
        pass


def _error_message(body: bytes) -> str:
    try:
        return str(json.loads(body)["error"]["message"])
    except Exception:
        return body[:200].decode("utf-8", "replace") or "no details"


# ------------------------------------------------------------------ Redis

# KEYS: a backend's slots and cooldown (one hash tag).  Live slots are scored by their lease's expiry
# (server ms); a cooldown is a key that expires when it ends.  Returns {slots held, ms of cooldown}.
_LOAD = """
local t = redis.call('TIME')
local now = tonumber(t[1]) * 1000 + tonumber(t[2]) / 1000
return {redis.call('ZCOUNT', KEYS[1], '(' .. string.format('%.17g', now), '+inf'),
        math.max(0, redis.call('PTTL', KEYS[2]))}
"""


class RedisSource:
    """The fleet as ``llm.shared_state`` keeps it (read-only)."""

    def __init__(self, config: RouterConfig, url: str, prefix: str) -> None:
        from .shared.scripts import Script
        from .shared.state import RedisState

        self.config = config
        self.state = RedisState(url, prefix)       # ConfigError naming the URL (no password) if Redis is away
        self.usage = self.state.usage
        self.where = f"{self.state.conn.shown} (prefix {prefix})"
        self._load = Script(_LOAD)
        self._budgets = self.state.budgets(config.budgets, time.time, None) if config.budgets else None
        self._errors: deque[UsageEvent] = deque(maxlen=ERRORS)
        self._seen: deque[tuple[Any, ...]] = deque(maxlen=4 * ERRORS)
        self._shared = config.shared_state == url

    def read(self) -> Snapshot:
        from .shared.connection import RedisDown

        now = time.time()
        try:
            agents = self.usage.totals("agent")
            backends = self.usage.totals("backend")
            recent = list(self.usage.events(now - WINDOW))
        except RedisDown:
            raise WatchError(f"Redis at {self.where} does not answer") from None
        if agents is None or backends is None:
            raise WatchError(f"Redis at {self.where} does not answer")
        for e in recent:
            if e.outcome not in ("ok", "cache_hit"):
                mark = (e.timestamp, e.call_id, e.backend, e.outcome)
                if mark not in self._seen:
                    self._seen.append(mark)
                    self._errors.append(e)
        states = self._states() if self._shared else [
            BackendState(b.name, b.provider.name, b.max_concurrent) for b in self.config.backends]
        notes = ["queued: each process knows only its own waiters"]
        if not self._shared:
            notes.append("backend load: not shared (no llm.shared_state)")
        return assemble(agents=agents, backends=backends, states=states, recent=recent, errors=list(self._errors),
                        budgets=self._budget_statuses(agents, recent), source=self.where, now=now, notes=notes)

    def _states(self) -> list[BackendState]:
        backends = self.config.backends
        calls: list[tuple[Any, list[str], list[Any]]] = [
            (self._load, [self.state.key("slots", b.name), self.state.key("cool", b.name)], []) for b in backends]
        try:
            results = self.state.conn.sync_scripts(calls) if calls else []
        except Exception:
            results = [None] * len(backends)
        out = []
        for b, res in zip(backends, results):
            if isinstance(res, (list, tuple)):
                out.append(BackendState(b.name, b.provider.name, b.max_concurrent, int(res[0]), None,
                                        int(res[1]) / 1000.0))
            else:
                out.append(BackendState(b.name, b.provider.name, b.max_concurrent))
        return out

    def _budget_statuses(self, agents: Iterable[str], recent: list[UsageEvent]) -> list[BudgetStatus]:
        if self._budgets is None:
            return []
        try:
            return [s for s in (self._budgets.status(scope, key) for scope, key in
                                budget_keys(self.config, agents, recent)) if s is not None]
        except Exception:
            return []

    def close(self) -> None:
        import asyncio

        try:
            asyncio.run(self.state.close())
        except Exception:
            pass


# ------------------------------------------------------------------ SQLite

class SqliteSource:
    """The SQLite ledger: totals and recent events (no backend load: the ledger does not hold it)."""

    def __init__(self, config: RouterConfig, path: Path) -> None:
        if not path.exists():
            raise ConfigError(f"{path}: no usage ledger there yet (llm.usage_store); it appears with the first "
                              f"call of a router using it")

        self.config = config
        self.path = path
        self.where = str(path)
        self._store = SqliteStore(path) if config.budgets else None

    def _conn(self) -> sqlite3.Connection:
        return sqlite3.connect(f"file:{self.path}?mode=ro", uri=True, timeout=5.0)

    def _totals(self, conn: sqlite3.Connection, column: str) -> dict[str, AgentUsage]:
        sql = (f"SELECT COALESCE({column}, ''), COALESCE(SUM(total_tokens), 0), "
               f"SUM(CASE WHEN outcome = 'cache_hit' THEN NULL ELSE cost_usd END), "    # hits: not provider cost
               f"SUM(outcome = 'ok'), SUM(outcome LIKE 'error:%'), SUM(outcome = 'cache_hit') "
               f"FROM usage_events GROUP BY 1")
        return {name or "(none)": AgentUsage(total_tokens=int(tokens), cost_usd=usd, request_count=int(ok or 0),
                                             error_count=int(err or 0), cache_hits=int(hits or 0))
                for name, tokens, usd, ok, err, hits in conn.execute(sql)}

    def read(self) -> Snapshot:

        now = time.time()
        try:
            conn = self._conn()
            try:
                agents = self._totals(conn, "agent_id")
                backends = self._totals(conn, "backend")
                errors = [UsageEvent(timestamp=ts, agent_id=agent or "", thread_id="", model=model or "",
                                     backend=backend or "", provider="", prompt_tokens=0, completion_tokens=0,
                                     total_tokens=0, cost_usd=None, latency_ms=0.0, outcome=outcome)
                          for ts, agent, backend, model, outcome in conn.execute(
                              "SELECT timestamp, agent_id, backend, model, outcome FROM usage_events "
                              "WHERE outcome NOT IN ('ok', 'cache_hit') ORDER BY id DESC LIMIT ?", (ERRORS,))]
            finally:
                conn.close()
            recent = list(read_events(self.path, now - WINDOW))
        except sqlite3.Error as exc:
            raise WatchError(f"{self.path}: cannot read the ledger ({exc})") from None
        budgets: list[BudgetStatus] = []
        if self._store is not None:

            fresh = Budgets(self.config.budgets, time.time, self._store.spend)   # spend read from the ledger
            budgets = [s for s in (fresh.status(scope, key) for scope, key in
                                   budget_keys(self.config, agents, recent)) if s is not None]
        states = [BackendState(b.name, b.provider.name, b.max_concurrent) for b in self.config.backends]
        return assemble(agents=agents, backends=backends, states=states, recent=recent, errors=errors,
                        budgets=budgets, source=self.where, now=now,
                        notes=["backend load (in flight, queued, cooling down): not in a SQLite ledger; "
                               "watch a gateway (--url) or use llm.shared_state for it"])

    def close(self) -> None:
        pass


# ------------------------------------------------------------------ which one

def open_source(config_path: str | None, url: str | None, key: str | None) -> Source:
    """The source ``top`` reads: ``url`` (a gateway), else the organism file's Redis or SQLite ledger."""
    if url:
        return GatewaySource(url, key if key is not None else os.environ.get(KEY_ENV))

    config = load_config(config_path)
    if config.shared_state:
        return RedisSource(config, config.shared_state, config.redis_prefix or "xpl")
    store = config.usage_store
    if store and store.startswith("sqlite:///"):

        return SqliteSource(config, sqlite_path(store))
    g = config.gateway
    raise ConfigError(
        f"{config.source} keeps usage in the memory of each process (no llm.shared_state, no llm.usage_store), "
        f"so there is nothing another process can watch. Watch a running gateway instead: "
        f"xml-pipeline-llm top --url http://{g.host}:{g.port} (with --key or ${KEY_ENV} holding an admin key "
        f"when it has keys); or share the usage: llm.shared_state: redis://host:6379/0 (fleet-wide, with "
        f"backend load) or llm.usage_store: sqlite:///usage.db")
