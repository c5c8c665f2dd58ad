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

``rules.py``: budgets, windows, events, the checks; ``accounting.py``: ``Budgets``, the
in-process accounting; ``methods.py``: the router's budget API.
"""

from .accounting import (
    Budgets,
)
from .methods import (
    BudgetMethods,
)
from .rules import (
    WINDOW_SECONDS,
    Account,
    BudgetEvent,
    BudgetExceededError,
    BudgetKey,
    BudgetStatus,
    Clock,
    Hold,
    Limit,
    Restore,
    Severity,
    Unit,
    check_fits,
    crossings,
    exhausted_events,
    keys_for,
    metadata_key,
    severity,
    window_start,
)

__all__ = [
    "Account",
    "BudgetEvent",
    "BudgetExceededError",
    "BudgetKey",
    "BudgetMethods",
    "BudgetStatus",
    "Budgets",
    "Clock",
    "Hold",
    "Limit",
    "Restore",
    "Severity",
    "Unit",
    "WINDOW_SECONDS",
    "check_fits",
    "crossings",
    "exhausted_events",
    "keys_for",
    "metadata_key",
    "severity",
    "window_start",
]
