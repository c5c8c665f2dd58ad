"""``Budgets``: the in-process accounting, one lock over every account (reserve, settle, give back)."""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from ..config import BudgetConfig
from .rules import (
    Account,
    BudgetEvent,
    BudgetExceededError,
    BudgetKey,
    BudgetStatus,
    Hold,
    Limit,
    Restore,
    check_fits,
    crossings,
    exhausted_events,
    window_start,
)

log = logging.getLogger("xml_pipeline_llm")


class Budgets:
    """Every budget of one router, in memory (exact under one lock)."""

    def __init__(self, rules: Iterable[BudgetConfig], clock: Callable[[], float] = time.time,
                 restore: Restore | None = None) -> None:
        self._rules = [(r.scope, r.match, Limit(r.max_tokens, r.max_usd, r.window, tuple(sorted(r.warn_at)),
                                                r.degrade.at if r.degrade is not None else None))
                       for r in rules]
        self._set: dict[BudgetKey, Limit] = {}
        self._accounts: dict[BudgetKey, Account] = {}
        self._clock = clock
        self._restore = restore
        self._lock = threading.Lock()
        self._callbacks: list[Callable[[BudgetEvent], Any]] = []
        self.scopes: tuple[str, ...] = ()      # the scopes any budget is set for (empty: nothing to do)
        self.usd = False                       # whether any budget is in dollars (prices are needed)
        self._derive()

    def _derive(self) -> None:
        limits = [(scope, limit) for scope, _, limit in self._rules] + [
            (scope, limit) for (scope, _), limit in self._set.items()]
        self.scopes = tuple(dict.fromkeys(scope for scope, _ in limits))
        self.usd = any(limit.max_usd is not None for _, limit in limits)

    # ---------------------------------------------------------- which budget

    def _limit(self, scope: str, key: str | None) -> Limit | None:
        found = self._set.get((scope, key))
        if found is not None:
            return found
        for rule_scope, match, limit in self._rules:
            if rule_scope == scope and (key is None or fnmatchcase(key, match)):
                return limit
        return None

    def _account(self, scope: str, key: str | None, now: float) -> Account | None:
        """The current window's account for a key (None: no budget applies); caller holds the lock."""
        acct = self._accounts.get((scope, key))
        if acct is None:
            limit = self._limit(scope, key)
            if limit is None:
                return None
            acct = self._accounts[(scope, key)] = Account(scope, key, limit)
            acct.start = window_start(limit.window, now)
            self._restore_spend(acct)
        elif acct.start is not None and window_start(acct.limit.window, now) != acct.start:
            acct.start = window_start(acct.limit.window, now)       # a new window: spend starts at zero
            acct.used_tokens, acct.used_usd, acct.crossed = 0, 0.0, set()
        return acct

    def _restore_spend(self, acct: Account) -> None:
        if self._restore is not None:
            acct.used_tokens, acct.used_usd = self._restore(acct.scope, acct.key, acct.start)

    # ---------------------------------------------------------- reserve, settle, release

    async def reserve(self, keys: Iterable[BudgetKey], tokens: int, usd: float | None,
                      model: str) -> Hold | None:
        """Reserve ``tokens`` (and ``usd``, None: unpriced) in every applicable budget, or raise."""
        now = self._clock()
        with self._lock:
            accounts = [a for a in (self._account(s, k, now) for s, k in keys) if a is not None]
            if not accounts:
                return None
            try:
                for acct in accounts:
                    check_fits(acct, tokens, usd, model)
            except BudgetExceededError as exc:
                refused, events = exc, exhausted_events(acct, exc, usd)
            else:
                for acct in accounts:
                    acct.reserved_tokens += tokens
                    acct.reserved_usd += usd or 0.0
                return Hold(accounts, tokens, usd or 0.0)
        self._fire(events)
        raise refused

    def settle(self, hold: Hold, tokens: int, usd: float | None) -> None:
        """The try ended: give back its reservation and charge what it really used."""
        events: list[BudgetEvent] = []
        now = self._clock()
        with self._lock:
            for acct in hold.accounts:
                acct.reserved_tokens = max(0, acct.reserved_tokens - hold.tokens)
                acct.reserved_usd = max(0.0, acct.reserved_usd - hold.usd)
                current = self._account(acct.scope, acct.key, now)   # rolls a window that ended
                if current is None:            # forgotten meanwhile (end_thread, reset)
                    continue
                current.used_tokens += tokens
                current.used_usd += usd or 0.0
                events += crossings(current)
        self._fire(events)

    # ---------------------------------------------------------- events

    def on_budget(self, callback: Callable[[BudgetEvent], Any]) -> Callable[[], None]:
        self._callbacks.append(callback)
        return lambda: self._callbacks.remove(callback) if callback in self._callbacks else None

    def _fire(self, events: list[BudgetEvent]) -> None:
        for event in events:
            log.warning("budget %s%s: %s at %d%% (%g of %g %s)", event.scope,
                        f" {event.key}" if event.key is not None else "", event.severity, event.percent,
                        event.used, event.limit, event.unit)
            for callback in list(self._callbacks):
                try:
                    result = callback(event)
                    if inspect.isawaitable(result):     # a coroutine function: run on this loop
                        _schedule(result)
                except Exception:
                    log.exception("budget callback %r failed", callback)

    # ---------------------------------------------------------- runtime API

    def set_budget(self, scope: str, key: str | None, limit: Limit) -> None:
        with self._lock:
            self._set[(scope, key)] = limit
            self._derive()
            acct = self._accounts.get((scope, key))
            if acct is not None:
                acct.limit = limit
                acct.start = window_start(limit.window, self._clock())

    def status(self, scope: str, key: str | None) -> BudgetStatus | None:
        with self._lock:
            acct = self._account(scope, key, self._clock())
            return None if acct is None else acct.status()

    def all(self) -> list[BudgetStatus]:
        now = self._clock()
        with self._lock:
            for scope, key in list(self._set):
                self._account(scope, key, now)
            if any(scope == "global" for scope, _, _ in self._rules):
                self._account("global", None, now)
            return [a.status() for a in self._accounts.values()]

    def reset(self, scope: str, key: str | None) -> None:
        with self._lock:
            acct = self._accounts.get((scope, key))
            if acct is not None:
                acct.used_tokens, acct.used_usd, acct.crossed = 0, 0.0, set()

    def forget(self, scope: str, key: str | None) -> BudgetStatus | None:
        with self._lock:
            if self._set.pop((scope, key), None) is not None:
                self._derive()
            acct = self._accounts.pop((scope, key), None)
            return None if acct is None else acct.status()


_TASKS: set[asyncio.Task[Any]] = set()


def _schedule(awaitable: Any) -> None:
    try:
        task = asyncio.get_running_loop().create_task(awaitable)
    except RuntimeError:            # no loop running here: run it to the end now
        asyncio.run(awaitable)
        return
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)
