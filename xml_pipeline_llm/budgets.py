"""Budgets: stop a runaway agent, thread or tenant before it spends.

    llm:
      max_tokens_per_thread: 100000          # = budgets: [{scope: thread, max_tokens: 100000}]
      budgets:
        - {scope: agent, match: researcher, max_usd: 2.50, window: 1d}
        - {scope: metadata.org_id, max_tokens: 5000000, window: 30d}

Before a try is sent, every budget that applies to it (its agent's, its
thread's, ``global``, and each ``metadata.<key>`` whose value the call
carries) reserves the try's worst case: the prompt estimate plus
``max_tokens`` (or ``default_max_tokens``), priced with the backend's prices
for ``max_usd``.  All of them or none: if one does not fit in what is left,
``BudgetExceededError`` is raised and nothing is sent.  After the call the
reservation settles against the real usage; a failed or cancelled try gives
it back.  So the sum of real usage never exceeds a budget when every call sets
``max_tokens``.  Everything happens under one lock (exact across tasks,
threads and loops); ``shared/budgets.py`` does the same atomically in Redis for
a fleet.

Which budget applies to a key: one set at run time (``set_budget``) first,
else the first ``llm.budgets`` rule of that scope whose ``match`` matches it.

Windows are fixed and UTC: ``1h`` from each full hour, ``1d`` from 00:00 UTC,
``7d`` from Monday 00:00 UTC, ``30d`` from every 30th day since 1970-01-01
00:00 UTC; ``none`` never resets.
"""

from __future__ import annotations

import asyncio
import inspect
import logging
import threading
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from fnmatch import fnmatchcase
from typing import TYPE_CHECKING, Any, Literal

from .errors import BackendError

if TYPE_CHECKING:
    from .config import BudgetConfig

log = logging.getLogger("xml_pipeline_llm")

WINDOW_SECONDS: dict[str, int | None] = {"none": None, "1h": 3600, "1d": 86400, "7d": 7 * 86400,
                                         "30d": 30 * 86400}
_MONDAY = 4 * 86400          # 1970-01-01 was a Thursday: weeks start four days later
Unit = Literal["tokens", "usd"]
Severity = Literal["warning", "critical", "final", "exhausted", "degraded"]   # degraded: a budget's degrade.at
BudgetKey = tuple[str, "str | None"]      # (scope, key): ("agent", "researcher"), ("global", None)


def window_start(window: str, now: float) -> float | None:
    """When the window holding ``now`` began (None: a lifetime budget)."""
    seconds = WINDOW_SECONDS[window]
    if seconds is None:
        return None
    offset = _MONDAY if window == "7d" else 0
    return (now - offset) // seconds * seconds + offset


def severity(percent: int) -> Severity:
    """warning < 90 <= critical < 95 <= final; 100 is exhausted."""
    if percent >= 100:
        return "exhausted"
    return "final" if percent >= 95 else "critical" if percent >= 90 else "warning"


class BudgetExceededError(BackendError):
    """A budget would be exceeded: nothing was sent.  Never retried, never failed over.

    ``scope`` and ``key`` name the budget (``key`` None for ``global``), ``unit``
    is ``tokens`` or ``usd``, ``limit``, ``used`` (settled spend in this window)
    and ``reserved`` (held by calls in flight now) are in that unit, and
    ``resets_at`` is the UNIX time the window ends (None for a lifetime budget).
    """

    def __init__(self, message: str, scope: str, key: str | None, unit: Unit, limit: float,
                 used: float, reserved: float, resets_at: float | None) -> None:
        super().__init__(message)
        self.scope, self.key, self.unit = scope, key, unit
        self.limit, self.used, self.reserved, self.resets_at = limit, used, reserved, resets_at


@dataclass(frozen=True)
class BudgetEvent:
    """A ``warn_at`` threshold crossed (once per budget, unit and window), or the budget exhausted.

    ``exhausted`` (percent 100) fires once per budget, unit and window: when the spend reaches the
    limit, or else at the first call the budget refuses (``used`` is then the settled spend, which
    may be below the limit: the call's worst case did not fit in what was left).
    """

    scope: str
    key: str | None
    percent: int
    used: float
    limit: float
    unit: Unit
    severity: Severity


@dataclass(frozen=True)
class BudgetStatus:
    """One budget now: limits, settled spend, what calls in flight hold, what is left, when it resets."""

    scope: str
    key: str | None
    limit_tokens: int | None
    limit_usd: float | None
    used_tokens: int
    used_usd: float
    reserved_tokens: int
    reserved_usd: float
    remaining_tokens: int | None
    remaining_usd: float | None
    window: str
    resets_at: float | None


@dataclass(frozen=True)
class Limit:
    """What a budget allows: tokens and/or dollars per window, and when to warn."""

    max_tokens: int | None = None
    max_usd: float | None = None
    window: str = "none"
    warn_at: tuple[int, ...] = (75, 90, 95)
    degrade_at: int | None = None        # degrade: {at: P}: a ``degraded`` event when the spend reaches P%


@dataclass
class Account:
    """One budget's spend in its current window."""

    scope: str
    key: str | None
    limit: Limit
    start: float | None = None
    used_tokens: int = 0
    used_usd: float = 0.0
    reserved_tokens: int = 0
    reserved_usd: float = 0.0
    crossed: set[tuple[Unit, int]] = field(default_factory=set)

    def resets_at(self) -> float | None:
        seconds = WINDOW_SECONDS[self.limit.window]
        return None if seconds is None or self.start is None else self.start + seconds

    def status(self) -> BudgetStatus:
        lim = self.limit
        left_t = None if lim.max_tokens is None else max(0, lim.max_tokens - self.used_tokens - self.reserved_tokens)
        left_u = None if lim.max_usd is None else max(0.0, lim.max_usd - self.used_usd - self.reserved_usd)
        return BudgetStatus(self.scope, self.key, lim.max_tokens, lim.max_usd, self.used_tokens,
                            round(self.used_usd, 10), self.reserved_tokens, round(self.reserved_usd, 10),
                            left_t, None if left_u is None else round(left_u, 10), lim.window, self.resets_at())


@dataclass
class Hold:
    """What one try reserved, in each budget that applies to it."""

    accounts: list[Account]
    tokens: int
    usd: float


# Spend of a (scope, key) since a time, from a durable ledger: (tokens, usd).
Restore = Callable[[str, "str | None", "float | None"], tuple[int, float]]
Clock = Callable[[], float]


def metadata_key(value: Any) -> str:
    """The key a ``metadata.<name>`` budget gives a call by its metadata value: the value's text."""
    return str(value)


def keys_for(agent_id: str | None, thread_id: str | None,
             metadata: Mapping[str, Any], scopes: Iterable[str]) -> list[BudgetKey]:
    """The budgets a call could fall under: its agent's, its thread's, global, its metadata values'."""
    out: list[BudgetKey] = []
    for scope in scopes:
        if scope == "global":
            out.append(("global", None))
        elif scope == "agent" and agent_id:
            out.append(("agent", agent_id))
        elif scope == "thread" and thread_id:
            out.append(("thread", thread_id))
        elif scope.startswith("metadata.") and scope[9:] in metadata:
            out.append((scope, metadata_key(metadata[scope[9:]])))
    return out


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
                    _check(acct, tokens, usd, model)
            except BudgetExceededError as exc:
                refused, events = exc, _exhausted(acct, exc, usd)
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
                events += _crossings(current)
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


def _check(acct: Account, tokens: int, usd: float | None, model: str) -> None:
    lim, where = acct.limit, f"{acct.scope}" + (f" {acct.key!r}" if acct.key is not None else "")
    resets = acct.resets_at()
    when = f"; it resets at {time.strftime('%Y-%m-%d %H:%M UTC', time.gmtime(resets))}" if resets else ""
    if lim.max_tokens is not None and acct.used_tokens + acct.reserved_tokens + tokens > lim.max_tokens:
        raise BudgetExceededError(
            f"budget of {where} exceeded: this call may take {tokens} tokens, {acct.used_tokens} of "
            f"{lim.max_tokens} are spent and {acct.reserved_tokens} held by calls in flight{when}; "
            f"nothing was sent. Lower max_tokens, or raise the budget (set_budget or llm.budgets)",
            acct.scope, acct.key, "tokens", lim.max_tokens, acct.used_tokens, acct.reserved_tokens, resets)
    if lim.max_usd is None:
        return
    if usd is None:
        raise BudgetExceededError(
            f"budget of {where} is in dollars but model {model} has no price, so the cost of this call "
            f"is unknown; nothing was sent. Set its price in llm.pricing",
            acct.scope, acct.key, "usd", lim.max_usd, acct.used_usd, acct.reserved_usd, resets)
    if acct.used_usd + acct.reserved_usd + usd > lim.max_usd:
        raise BudgetExceededError(
            f"budget of {where} exceeded: this call may cost ${usd:.6f}, ${acct.used_usd:.6f} of "
            f"${lim.max_usd:g} are spent and ${acct.reserved_usd:.6f} held by calls in flight{when}; "
            f"nothing was sent. Lower max_tokens, or raise the budget (set_budget or llm.budgets)",
            acct.scope, acct.key, "usd", lim.max_usd, acct.used_usd, acct.reserved_usd, resets)


def _exhausted(acct: Account, refused: BudgetExceededError, usd: float | None) -> list[BudgetEvent]:
    """The ``exhausted`` event of the first call a budget refuses in a window (caller holds the lock).

    None when this budget and unit already had it in this window (its spend reached 100%, or a call
    was refused before), nor for a call refused only because its model has no price.
    """
    if refused.unit == "usd" and usd is None:
        return []
    if (refused.unit, 100) in acct.crossed:
        return []
    acct.crossed.add((refused.unit, 100))
    used = acct.used_tokens if refused.unit == "tokens" else round(acct.used_usd, 10)
    return [BudgetEvent(acct.scope, acct.key, 100, used, refused.limit, refused.unit, "exhausted")]


def _crossings(acct: Account) -> list[BudgetEvent]:
    """The thresholds this account's spend has newly crossed, in order (once per window)."""
    out: list[BudgetEvent] = []
    units: list[tuple[Unit, float, float | None]] = [("tokens", acct.used_tokens, acct.limit.max_tokens),
                                                     ("usd", acct.used_usd, acct.limit.max_usd)]
    for unit, used, limit in units:
        if not limit:
            continue
        for percent in (*acct.limit.warn_at, 100):
            at = acct.limit.degrade_at      # degrade: {at: P}, once, before the warn_at of the same percent
            if at is not None and at <= percent and used * 100 >= at * limit and (unit, -at) not in acct.crossed:
                acct.crossed.add((unit, -at))
                out.append(BudgetEvent(acct.scope, acct.key, at, used, limit, unit, "degraded"))
            if used * 100 >= percent * limit and (unit, percent) not in acct.crossed:
                acct.crossed.add((unit, percent))
                out.append(BudgetEvent(acct.scope, acct.key, percent, used, limit, unit, severity(percent)))
    return out


_TASKS: set[asyncio.Task[Any]] = set()


def _schedule(awaitable: Any) -> None:
    try:
        task = asyncio.get_running_loop().create_task(awaitable)
    except RuntimeError:            # no loop running here: run it to the end now
        asyncio.run(awaitable)
        return
    _TASKS.add(task)
    task.add_done_callback(_TASKS.discard)


class BudgetMethods:
    """The budget API of ``LLMRouter``, over its ``_budgets``."""

    _budgets: Budgets

    def set_budget(self, scope: str, key: str | None, *, max_tokens: int | None = None,
                   max_usd: float | None = None, window: str | None = None,
                   warn_at: Iterable[int] | None = None) -> None:
        """Set (or replace) the budget of one agent, thread, metadata value, or ``global`` (key None)."""
        self._budgets.set_budget(*_checked_key(scope, key), _checked_limit(max_tokens, max_usd, window, warn_at))

    def budget_status(self, scope: str, key: str | None = None) -> BudgetStatus | None:
        """One budget now (None: no budget applies to that key)."""
        return self._budgets.status(*_checked_key(scope, key))

    def budgets(self) -> list[BudgetStatus]:
        """Every budget in use (and every one set at run time)."""
        return self._budgets.all()

    def reset_budget(self, scope: str, key: str | None = None) -> None:
        """Spend back to zero for the current window; the limit is kept."""
        self._budgets.reset(*_checked_key(scope, key))

    def end_thread(self, thread_id: str) -> BudgetStatus | None:
        """Forget a finished thread's budget (and its call count and loop window: ``guards.py``); its
        final budget state (None: it had none)."""
        guards = getattr(self, "_guards", None)
        if guards is not None:
            guards.forget_thread(thread_id)
        return self._budgets.forget("thread", thread_id)

    def on_budget(self, callback: Callable[[BudgetEvent], Any]) -> Callable[[], None]:
        """Call ``callback(BudgetEvent)`` at each threshold crossed and when a budget is exhausted (the
        spend reaches it, or the first call it refuses in a window); returns the unsubscribe function."""
        return self._budgets.on_budget(callback)


def _checked_key(scope: str, key: str | None) -> tuple[str, str | None]:
    if scope not in ("agent", "thread", "global") and not (scope.startswith("metadata.") and scope[9:]):
        raise ValueError(f"scope: expected agent, thread, global or metadata.<key>, got {scope!r}")
    if scope == "global":
        return scope, None
    if not isinstance(key, str) or not key:
        raise ValueError(f"key: expected the {scope} id (a non-empty string), got {key!r}")
    return scope, key


def _checked_limit(max_tokens: int | None, max_usd: float | None, window: str | None,
                   warn_at: Iterable[int] | None) -> Limit:
    if max_tokens is None and max_usd is None:
        raise ValueError("set max_tokens, max_usd or both")
    if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int)
                                   or max_tokens <= 0):
        raise ValueError(f"max_tokens: expected a positive integer, got {max_tokens!r}")
    if max_usd is not None and (isinstance(max_usd, bool) or not isinstance(max_usd, (int, float))
                                or max_usd <= 0):
        raise ValueError(f"max_usd: expected a positive number of dollars, got {max_usd!r}")
    window = window or "none"
    if window not in WINDOW_SECONDS:
        raise ValueError(f"window: expected one of {', '.join(WINDOW_SECONDS)}, got {window!r}")
    marks = tuple(sorted(warn_at)) if warn_at is not None else (75, 90, 95)
    if any(not isinstance(p, int) or not 1 <= p <= 100 for p in marks):
        raise ValueError(f"warn_at: expected percentages from 1 to 100, got {list(marks)!r}")
    return Limit(max_tokens, None if max_usd is None else float(max_usd), window, marks)
