"""The schema of ``llm.guards`` and of a budget's ``degrade:``, and what is wrong with them (``guards/``)."""

from __future__ import annotations

import json
import re
from collections.abc import Iterable, Mapping
from typing import TYPE_CHECKING, Any

from pydantic import BaseModel, ConfigDict, Field

from ..errors import ModelNotFoundError
from ..routing import Routes

if TYPE_CHECKING:
    from ..backends import ResolvedBackend
    from .schema import BudgetConfig

_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(ms|s|m|h|d)?\s*$")
_UNITS = {None: 1.0, "ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}


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
