"""The budget API of ``LLMRouter`` (``set_budget``, ``budget_status``, ``budgets``, ...)."""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    pass
from .accounting import Budgets
from .rules import WINDOW_SECONDS, BudgetEvent, BudgetStatus, Limit


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
        """Forget a finished thread's budget (and its call count and loop window: ``guards/``); its
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
