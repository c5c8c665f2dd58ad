"""Budgets' model and rules: windows, limits, accounts, events and statuses, what a try may reserve."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any, Literal

from ..errors import BackendError

if TYPE_CHECKING:
    pass



log = logging.getLogger("xml_pipeline_llm")

WINDOW_SECONDS: dict[str, int | None] = {"none": None, "1h": 3600, "1d": 86400, "7d": 7 * 86400,
                                         "30d": 30 * 86400}
MONDAY = 4 * 86400          # 1970-01-01 was a Thursday: weeks start four days later
Unit = Literal["tokens", "usd"]
Severity = Literal["warning", "critical", "final", "exhausted", "degraded"]   # degraded: a budget's degrade.at
BudgetKey = tuple[str, "str | None"]      # (scope, key): ("agent", "researcher"), ("global", None)


def window_start(window: str, now: float) -> float | None:
    """When the window holding ``now`` began (None: a lifetime budget)."""
    seconds = WINDOW_SECONDS[window]
    if seconds is None:
        return None
    offset = MONDAY if window == "7d" else 0
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


def check_fits(acct: Account, tokens: int, usd: float | None, model: str) -> None:
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


def exhausted_events(acct: Account, refused: BudgetExceededError, usd: float | None) -> list[BudgetEvent]:
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


def crossings(acct: Account) -> list[BudgetEvent]:
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
