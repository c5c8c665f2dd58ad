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
  ``shared_state`` one Lua script per request (``guards/fleet.py``) on the thread's keys,
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
import logging
import time
from collections.abc import Awaitable, Iterable, Mapping
from dataclasses import dataclass
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

from ..budgets import keys_for
from ..errors import BlockedError, CallLimitError, ConfigError, LoopDetectedError
from ..stores import sqlite_path
from ..usage import make_event

if TYPE_CHECKING:
    from ..budgets import Budgets, BudgetStatus
    from ..config import BudgetConfig, RouterConfig
    from ..usage import UsageLedger
    from .fleet import FleetCounter

from ..config.guards import EXPECTED, DegradeConfig, GuardsConfig, duration, guard_problems
from .blocks import REFRESH_EVERY, Block, BlockList, SqliteBlocks, checked_target, target_key
from .counter import ADMITTED, THREAD_IDLE_TTL, Counter, Verdict, request_digest

log = logging.getLogger("xml_pipeline_llm")


__all__ = ["EXPECTED", "REFRESH_EVERY", "THREAD_IDLE_TTL", "Block", "BlockList", "Counter", "DegradeConfig",
           "GuardMethods", "Guards", "GuardsConfig", "SqliteBlocks", "Verdict", "checked_target", "duration",
           "guard_problems", "make_guards", "open_blocks", "request_digest", "target_key"]


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

    async def passed(self, pending: Pending | None) -> None:
        """Wait for the checks a request issued alongside its admission (nothing to wait for: at once)."""
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
        reason = block.reason or "no reason given"
        exc = BlockedError(f"{block.describe()} is blocked since {when}: {reason}; nothing was sent. An "
                           f"operator lifts it with `xml-pipeline-llm unblock {block.options()}` "
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
        from .fleet import FleetCounter, RedisBlocks

        prefix = getattr(state, "prefix", config.redis_prefix)
        blocks = RedisBlocks(conn, prefix)
        if cfg.active:
            fleet = FleetCounter(conn, prefix, cfg)
    elif config.usage_store and config.usage_store.startswith("sqlite:///"):

        blocks = SqliteBlocks(sqlite_path(config.usage_store))
    else:
        blocks = BlockList()
    guards = Guards(cfg, config.budgets, ledger, budgets, blocks, fleet=fleet)
    if guards.degrade_rules:
        budgets.on_budget(guards.saw_budget_event)
    return guards


def open_blocks(config: RouterConfig) -> BlockList:
    """The kill switch's store of an organism, for the CLI (``block``, ``unblock``, ``blocked``)."""
    if config.shared_state:
        from ..shared.connection import Conn
        from .fleet import RedisBlocks

        conn = Conn(config.shared_state)
        conn.check()
        return RedisBlocks(conn, config.redis_prefix or "xpl")
    if config.usage_store and config.usage_store.startswith("sqlite:///"):
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
