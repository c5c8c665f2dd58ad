"""Guards against runaway agents: loops, call caps per thread, a kill switch, degrade instead of stop.

    llm:
      guards:
        max_calls_per_thread: 200    # requests (not tries) one thread may make until end_thread()
        repeat_limit: 5              # the same request more than 5 times in one thread ...
        repeat_window: 10m           # ... within 10 minutes is a loop
      budgets:
        - {scope: agent, match: researcher, max_usd: 10, degrade: {at: 80, to: cheap}}

Every check runs once per request, before anything is sent, from one line of
the request loop (``router._request`` calls ``Guards.admit``):

* the kill switch (``router.block(...)``): a caller matching a block gets
  ``BlockedError``.  Blocks are kept in the configured store: the SQLite
  ledger (table ``guard_blocks``, re-read at most every half second) or Redis
  (a hash and a version counter, re-read at most every half second, the read
  riding along the request's admission); in memory otherwise;
* the call cap and the loop window of the request's thread: ``CallLimitError``
  and ``LoopDetectedError``.  A request is the same as another when its model
  (as asked for), messages, tools and every provider parameter are: their JSON
  with sorted keys, hashed with SHA-256.  In memory under one lock; with
  ``shared_state`` one Lua script per request (``shared/guards.py``) on the thread's keys,
  issued when the request starts so that it goes to Redis in the same pipeline
  as the admission (``Try``) and is awaited before anything is sent;
* degrade: a budget with ``degrade: {at: P, to: M}`` whose settled spend has
  reached P% sends the request to M (the model swap happens before the chain
  of models is built).

A refused request is recorded as a usage event (``refused:blocked``,
``refused:call_limit``, ``refused:loop``; no tokens, counted in
``error_count``) and counts towards neither the call cap nor the loop window.
None of these errors is retried or fails over.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import re
import sqlite3
import threading
import time
from collections import deque
from collections.abc import Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from .errors import BlockedError, CallLimitError, LoopDetectedError

if TYPE_CHECKING:
    from .budgets import Budgets, BudgetStatus
    from .config import BudgetConfig, ResolvedBackend, RouterConfig
    from .request import Request
    from .shared.guards import FleetCounter
    from .usage import UsageLedger

log = logging.getLogger("xml_pipeline_llm")

REFRESH_EVERY = 0.5          # seconds: how stale the block list (and a fleet budget's spend, for degrade) may be
THREAD_IDLE_TTL = 7 * 86400  # seconds: with Redis, a thread's call count is forgotten this long after its last call
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


# ---------------------------------------------------------------- config

class GuardsConfig(BaseModel):
    """``llm.guards``: loop detection and a call cap per thread."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    max_calls_per_thread: int | None = Field(default=None, gt=0)
    repeat_limit: int | None = Field(default=None, gt=0)
    repeat_window: Any = None           # a duration: checked by guard_problems (one clear message)

    @property
    def window_seconds(self) -> float:
        """``repeat_window`` in seconds (default ten minutes)."""
        return 600.0 if self.repeat_window is None else duration(self.repeat_window) or 600.0

    @property
    def active(self) -> bool:
        return self.max_calls_per_thread is not None or self.repeat_limit is not None


class DegradeConfig(BaseModel):
    """``degrade:`` of a budget: from ``at`` percent of its settled spend, its calls go to model ``to``."""

    model_config = ConfigDict(extra="forbid", strict=True, frozen=True)

    at: int = Field(ge=1, le=99)
    to: str


EXPECTED = {
    "guards": "a mapping with max_calls_per_thread, repeat_limit, repeat_window",
    "max_calls_per_thread": "a positive integer (requests one thread may make until end_thread())",
    "repeat_limit": "a positive integer (how many identical requests one thread may send within repeat_window)",
    "repeat_window": "a duration such as 10m, 90s, 1h or 1d, or a number of seconds",
    "degrade": "a mapping such as {at: 80, to: cheap-model}",
    "at": "a whole percentage from 1 to 99 of the budget's limit",
    "to": "a model name or an alias of llm.models",
}


def duration(value: Any) -> float | None:
    """Seconds of a duration (``10m``, ``90s``, ``1h``, ``2d``, ``500ms``, or a number of seconds); None if invalid."""
    if isinstance(value, bool):
        return None
    if isinstance(value, (int, float)):
        return float(value) if value > 0 else None
    if not isinstance(value, str):
        return None
    m = _DURATION.match(value.lower())
    if m is None:
        return None
    seconds = float(m.group(1)) * _UNITS[m.group(2)]
    return seconds if seconds > 0 else None


def guard_problems(guards: GuardsConfig, budgets: Iterable[BudgetConfig], models: Mapping[str, Any],
                   backends: list[ResolvedBackend], skipped: list[tuple[str, str]]) -> list[str]:
    """What is wrong with ``llm.guards`` and the budgets' ``degrade``, one line each with the fix."""
    from .errors import ModelNotFoundError
    from .routing import Routes

    problems = []
    if guards.repeat_window is not None:
        if duration(guards.repeat_window) is None:
            problems.append(f"llm.guards.repeat_window: expected {EXPECTED['repeat_window']}, "
                            f"got {json.dumps(guards.repeat_window)}")
        if guards.repeat_limit is None:
            problems.append("llm.guards.repeat_window: set without repeat_limit; add repeat_limit (how many "
                            "identical requests a thread may send within the window) or remove repeat_window")
    routes = Routes(backends, skipped) if backends else None
    for i, b in enumerate(budgets):
        d = b.degrade
        if d is None:
            continue
        where = f"llm.budgets[{i}].degrade"
        if not d.to.strip():
            problems.append(f'{where}.to: expected {EXPECTED["to"]}, got ""')
        elif d.to not in models and routes is not None:
            try:
                routes.route(d.to)
            except ModelNotFoundError:
                problems.append(f'{where}.to: no backend serves model "{d.to}" and it is no alias of '
                                f"llm.models; name a model a backend serves, or an alias")
    return problems


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
        parts = []
        if self.agent is not None:
            parts.append(f"agent {self.agent!r}")
        if self.thread is not None:
            parts.append(f"thread {self.thread!r}")
        parts += [f"metadata {k}={v!r}" for k, v in sorted(self.metadata.items())]
        return ", ".join(parts)

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


# ---------------------------------------------------------------- in memory: call caps and loops

@dataclass
class _Thread:
    calls: int = 0
    recent: dict[str, deque[float]] = field(default_factory=dict)   # request hash -> when sent (monotonic)


@dataclass(frozen=True)
class Verdict:
    """What the counter said: ``kind`` "" (admitted), "loop" or "call_limit", and the count."""

    kind: str
    count: int
    token: str = ""        # what undoes an admission (Redis: the member id)


ADMITTED = Verdict("", 0)


class Counter:
    """Call counts and loop windows per thread, in this process (exact under one lock)."""

    def __init__(self, cfg: GuardsConfig, clock: Callable[[], float] = time.monotonic) -> None:
        self.max_calls = cfg.max_calls_per_thread
        self.limit = cfg.repeat_limit
        self.window = cfg.window_seconds
        self._clock = clock
        self._threads: dict[str, _Thread] = {}
        self._lock = threading.Lock()
        self._swept = clock()

    def check(self, thread: str, digest: str) -> Verdict:
        """Count the request unless it is refused (then it counts towards nothing)."""
        now = self._clock()
        with self._lock:
            t = self._threads.get(thread)
            if t is None:
                t = self._threads[thread] = _Thread()
            if self.max_calls is not None and t.calls >= self.max_calls:
                return Verdict("call_limit", t.calls)
            times = None
            if self.limit is not None and digest:
                times = t.recent.get(digest)
                if times is None:
                    times = t.recent[digest] = deque()
                edge = now - self.window
                while times and times[0] <= edge:
                    times.popleft()
                if len(times) >= self.limit:
                    return Verdict("loop", len(times) + 1)
                times.append(now)
            if self.max_calls is not None:
                t.calls += 1
            if now - self._swept > max(self.window, 60.0):
                self._sweep(now)
            return Verdict("", t.calls, digest)

    def undo(self, thread: str, verdict: Verdict) -> None:
        """Take back an admission (the request was refused by something else, or cancelled)."""
        with self._lock:
            t = self._threads.get(thread)
            if t is None:
                return
            if self.max_calls is not None and t.calls:
                t.calls -= 1
            times = t.recent.get(verdict.token) if verdict.token else None
            if times:
                times.pop()

    def _sweep(self, now: float) -> None:
        """Drop loop windows that ended, and threads with nothing left to remember (caller holds the lock)."""
        self._swept = now
        edge = now - self.window
        for name in list(self._threads):
            t = self._threads[name]
            for digest in [d for d, times in t.recent.items() if not times or times[-1] <= edge]:
                del t.recent[digest]
            if not t.recent and not t.calls:
                del self._threads[name]

    def forget(self, thread: str) -> None:
        with self._lock:
            self._threads.pop(thread, None)


def request_digest(model: str, messages: list[dict[str, Any]], kwargs: Mapping[str, Any]) -> str:
    """SHA-256 of the request as the provider would get it: the model asked for, the messages and every
    provider parameter (tools included), as JSON with sorted keys (so key order does not matter)."""
    body = json.dumps({"model": model, "messages": messages, "params": kwargs}, sort_keys=True,
                      separators=(",", ":"), ensure_ascii=False, default=_jsonable)
    return hashlib.sha256(body.encode()).hexdigest()


def _jsonable(value: Any) -> Any:
    """Parameters JSON does not know (a pydantic model class as response_format, a set, bytes) as text."""
    schema = getattr(value, "model_json_schema", None)
    if callable(schema):
        try:
            return {"$schema_of": getattr(value, "__name__", ""), "schema": schema()}
        except Exception:  # noqa: BLE001 - fall back to its text
            pass
    if isinstance(value, (set, frozenset)):
        return sorted(value, key=repr)
    if isinstance(value, bytes):
        return value.hex()
    return repr(value)


# ---------------------------------------------------------------- the guards of one router

@dataclass
class Pending:
    """A request's checks still on their way (Redis): awaited before anything is sent (``Guards.passed``)."""

    who: tuple[str, str | None, str | None, dict[str, Any]]     # model asked, agent, thread, metadata
    refresh: Awaitable[None] | None = None
    counting: asyncio.Future[Verdict] | None = None
    done: bool = False


@dataclass(frozen=True)
class _DegradeRule:
    scope: str
    match: str
    at: int
    to: str


class Guards:
    """The guards of one router: its block list, counter, degrade rules, and the refusal events."""

    def __init__(self, cfg: GuardsConfig, budget_rules: Iterable[BudgetConfig], ledger: UsageLedger,
                 budgets: Budgets, blocks: BlockList, counter: Counter | None = None,
                 fleet: FleetCounter | None = None) -> None:
        self.cfg = cfg
        self.ledger = ledger
        self.budgets = budgets
        self.blocks = blocks
        self.counter = counter if counter is not None else (Counter(cfg) if cfg.active else None)
        self.fleet = fleet
        self._digest = cfg.repeat_limit is not None
        self.degrade_rules = [_DegradeRule(b.scope, b.match, d.at, d.to)
                              for b in budget_rules if (d := b.degrade) is not None]
        self._degrade_scopes = tuple(dict.fromkeys(r.scope for r in self.degrade_rules))
        self._spend: dict[tuple[str, str | None], tuple[float, BudgetStatus | None]] = {}
        self._shared_budgets = hasattr(budgets, "conn")
        self._reading: dict[tuple[str, str | None], asyncio.Future[BudgetStatus | None]] = {}
        self.checks = cfg.active or bool(self.degrade_rules)

    # ---------------------------------------------------------- the request loop's two lines

    async def admit(self, model: str, messages: list[dict[str, Any]], kwargs: Mapping[str, Any],
                    agent: str | None, thread: str | None, metadata: dict[str, Any]) -> tuple[str, Pending | None]:
        """Check a request before anything is sent: the model to send it to (degrade), and what is still
        on its way to Redis (None: nothing).  Raises ``BlockedError``, ``CallLimitError`` or
        ``LoopDetectedError`` (recorded as usage events) when the request is refused."""
        refresh = self.blocks.refresh()
        if not (self.checks or self.blocks or refresh is not None):
            return model, None
        who = (model, agent, thread, metadata)
        if self.blocks and refresh is None:       # (a list being re-read is matched once it is read: passed)
            found = self.blocks.match(agent, thread, metadata)
            if found is not None:
                await self._refuse_blocked(found, who)
        pending = Pending(who, refresh) if refresh is not None else None
        if self.counter is not None and thread:
            digest = request_digest(model, messages, kwargs) if self._digest else ""
            if self.fleet is not None:
                pending = pending or Pending(who)
                pending.counting = self.fleet.check(thread, digest, self.counter)
            else:
                verdict = self.counter.check(thread, digest)
                if verdict.kind:
                    await self._refuse_counted(verdict, who)
                if pending is not None:      # a refresh of the blocks follows: undone if it blocks
                    pending.counting = _done(verdict)
        if self.degrade_rules:
            model = await self.degrade(model, agent, thread, metadata)
        return model, pending

    async def passed(self, req: Request) -> None:
        """Wait for the checks a request issued alongside its admission (nothing to wait for: at once)."""
        pending = req.guard
        if pending is None or pending.done:
            return
        pending.done = True
        model, agent, thread, metadata = pending.who
        verdict = ADMITTED
        if pending.counting is not None:
            verdict = await pending.counting
        if pending.refresh is not None:
            await pending.refresh
            found = self.blocks.match(agent, thread, metadata)
            if found is not None:
                if not verdict.kind and thread and self.counter is not None:
                    self._undo(thread, verdict)
                await self._refuse_blocked(found, pending.who)
        if verdict.kind:
            await self._refuse_counted(verdict, pending.who)

    # ---------------------------------------------------------- refusals

    async def _refuse_blocked(self, block: Block, who: tuple[str, str | None, str | None, dict[str, Any]]) -> None:
        when = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(block.since)) if block.since else "earlier"
        args = []
        if block.agent is not None:
            args.append(f"--agent {block.agent}")
        if block.thread is not None:
            args.append(f"--thread {block.thread}")
        args += [f"--metadata {k}={v}" for k, v in sorted(block.metadata.items())]
        reason = block.reason or "no reason given"
        exc = BlockedError(f"{block.describe()} is blocked since {when}: {reason}; nothing was sent. An "
                           f"operator lifts it with `xml-pipeline-llm unblock {' '.join(args)}` "
                           f"(or router.unblock(...))", reason, block)
        await self._record(who, "refused:blocked")
        raise exc

    async def _refuse_counted(self, verdict: Verdict, who: tuple[str, str | None, str | None, dict[str, Any]]) -> None:
        model, agent, thread = who[0], who[1], who[2]
        assert thread is not None
        if verdict.kind == "call_limit":
            limit = self.cfg.max_calls_per_thread or verdict.count
            await self._record(who, "refused:call_limit")
            raise CallLimitError(f"thread {thread!r} made its {limit} calls (llm.guards.max_calls_per_thread); "
                                 f"nothing was sent. End the thread (router.end_thread) to start it again, or "
                                 f"raise the limit", thread, limit)
        window = self.cfg.window_seconds
        await self._record(who, "refused:loop")
        raise LoopDetectedError(
            f"thread {thread!r}{f' of agent {agent!r}' if agent else ''} sent the same request to {model} "
            f"{verdict.count} times within {window:g}s (llm.guards.repeat_limit "
            f"{self.cfg.repeat_limit}): a loop; nothing was sent. Change the request (a tool that keeps failing, "
            f"a plan that keeps repeating), or end the thread", thread, agent, verdict.count, window)

    async def _record(self, who: tuple[str, str | None, str | None, dict[str, Any]], outcome: str) -> None:
        from .usage import make_event

        model, agent, thread, metadata = who
        await self.ledger.record(make_event(agent_id=agent, thread_id=thread, model=model, backend="", provider="",
                                            usage=None, cost_usd=None, latency_ms=0.0, outcome=outcome,
                                            requested_model=model, metadata=metadata))

    def _undo(self, thread: str, verdict: Verdict) -> None:
        if self.fleet is not None:
            self.fleet.undo(thread, verdict)
        elif self.counter is not None:
            self.counter.undo(thread, verdict)

    # ---------------------------------------------------------- degrade

    async def degrade(self, model: str, agent: str | None, thread: str | None, metadata: Mapping[str, Any]) -> str:
        """``model``, or the ``degrade.to`` of the first budget covering the call whose spend reached ``at``%."""
        from .budgets import keys_for

        for scope, key in keys_for(agent, thread, metadata, self._degrade_scopes):
            rule = next((r for r in self.degrade_rules if r.scope == scope
                         and (key is None or fnmatchcase(key, r.match))), None)
            if rule is None or model == rule.to:
                continue
            if self._shared_budgets:
                status = await self._fleet_status(scope, key)
            else:
                status = self.budgets.status(scope, key)
            if status is not None and _reached(status, rule.at):
                return rule.to
        return model

    async def _fleet_status(self, scope: str, key: str | None) -> BudgetStatus | None:
        """A fleet budget's settled spend, read from Redis at most every half second, off the request's
        path (a worker thread; the request goes on with what was read last).  The first request of a budget
        in this process, and the one after this process's own settlement reached ``at``, wait for the read."""
        now = time.monotonic()
        bkey = (scope, key)
        seen = self._spend.get(bkey)
        if seen is None:
            return await self._read_spend(bkey)
        if now >= seen[0] and bkey not in self._reading:
            task = asyncio.ensure_future(self._read_spend(bkey))
            self._reading[bkey] = task
            task.add_done_callback(lambda _: self._reading.pop(bkey, None))
        return seen[1]

    async def _read_spend(self, bkey: tuple[str, str | None]) -> BudgetStatus | None:
        status = await asyncio.to_thread(self.budgets.status, *bkey)
        self._spend[bkey] = (time.monotonic() + REFRESH_EVERY, status)
        return status

    def saw_budget_event(self, event: Any) -> None:
        """A ``degraded`` event of this process: its budget degrades here at once (no waiting for a read)."""
        if getattr(event, "severity", "") == "degraded":
            self._spend.pop((event.scope, event.key), None)

    # ---------------------------------------------------------- runtime API

    def forget_thread(self, thread: str) -> None:
        if self.counter is not None:
            self.counter.forget(thread)
        if self.fleet is not None:
            self.fleet.forget(thread)

    async def close(self) -> None:
        await self.blocks.close()


def _reached(status: BudgetStatus, at: int) -> bool:
    if status.limit_tokens and status.used_tokens * 100 >= at * status.limit_tokens:
        return True
    return bool(status.limit_usd and status.used_usd * 100 >= at * status.limit_usd)


def _done(verdict: Verdict) -> asyncio.Future[Verdict]:
    fut: asyncio.Future[Verdict] = asyncio.get_running_loop().create_future()
    fut.set_result(verdict)
    return fut


def make_guards(config: RouterConfig, state: Any, ledger: UsageLedger, budgets: Budgets) -> Guards:
    """The guards of a router: with ``shared_state``, in Redis; else with a SQLite ledger, its blocks there."""
    cfg: GuardsConfig = getattr(config.raw, "guards", None) or GuardsConfig()
    conn = getattr(state, "conn", None)
    blocks: BlockList
    fleet = None
    if conn is not None:
        from .shared.guards import FleetCounter, RedisBlocks

        prefix = getattr(state, "prefix", config.redis_prefix)
        blocks = RedisBlocks(conn, prefix)
        if cfg.active:
            fleet = FleetCounter(conn, prefix, cfg)
    elif config.usage_store and config.usage_store.startswith("sqlite:///"):
        from .stores import sqlite_path

        blocks = SqliteBlocks(sqlite_path(config.usage_store))
    else:
        blocks = BlockList()
    guards = Guards(cfg, config.budgets, ledger, budgets, blocks, fleet=fleet)
    if guards.degrade_rules:
        budgets.on_budget(guards.saw_budget_event)
    return guards


def open_blocks(config: RouterConfig) -> BlockList:
    """The kill switch's store of an organism, for the CLI (``block``, ``unblock``, ``blocked``)."""
    from .errors import ConfigError

    if config.shared_state:
        from .shared.connection import Conn
        from .shared.guards import RedisBlocks

        conn = Conn(config.shared_state)
        conn.check()
        return RedisBlocks(conn, config.redis_prefix or "xpl")
    if config.usage_store and config.usage_store.startswith("sqlite:///"):
        from .stores import sqlite_path

        path = sqlite_path(config.usage_store)
        path.parent.mkdir(parents=True, exist_ok=True)
        return SqliteBlocks(path)
    raise ConfigError(f"{config.source}: the kill switch needs a store every process reads: set "
                      f"llm.usage_store: sqlite:///path/usage.db or llm.shared_state: redis://host:port/db "
                      f"(with neither, blocks live in one process only: router.block(...))")


class GuardMethods:
    """The kill-switch API of ``LLMRouter``, over its ``_guards``."""

    _guards: Guards

    async def block(self, *, agent: str | None = None, thread: str | None = None,
                    metadata: Mapping[str, Any] | None = None, reason: str = "") -> Block:
        """Refuse every new request of the caller matching all of ``agent``, ``thread`` and ``metadata``
        (``BlockedError``; calls in flight finish); kept in the store, seen fleet-wide within a second."""
        a, t, m = checked_target(agent, thread, metadata)
        if not isinstance(reason, str):
            raise ValueError(f"reason: expected a string, got {reason!r}")
        block = Block(a, t, m, reason, time.time())
        await self._guards.blocks.add(block)
        log.warning("guards: %s blocked: %s", block.describe(), reason or "no reason given")
        return block

    async def unblock(self, *, agent: str | None = None, thread: str | None = None,
                      metadata: Mapping[str, Any] | None = None) -> bool:
        """Lift the block set with the same arguments; whether there was one."""
        a, t, m = checked_target(agent, thread, metadata)
        removed = await self._guards.blocks.remove(target_key(a, t, m))
        if removed:
            log.warning("guards: %s unblocked", Block(a, t, m).describe())
        return removed

    async def blocked(self) -> list[Block]:
        """Everything blocked now, with its reason, oldest first."""
        return await self._guards.blocks.list()
