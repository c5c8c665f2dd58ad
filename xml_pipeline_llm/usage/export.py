"""Usage as CSV: grouped totals or one row per event (the router's export and the CLI)."""

from __future__ import annotations

import csv
import os
from collections.abc import Iterable
from datetime import datetime, timezone
from typing import Any

from .events import (
    EVENT_COLUMNS,
    EXPORTS,
    GROUPS,
    METADATA,
    TOTAL_COLUMNS,
    AgentUsage,
    UsageEvent,
    check_by,
    metadata_json,
)


def _number(value: Any) -> Any:
    """Costs without float noise: 0.000225, not 0.00022500000000000002."""
    if isinstance(value, float):
        text = f"{value:.10f}".rstrip("0").rstrip(".")
        return text or "0"
    return "" if value is None else value


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


def event_row(event: UsageEvent) -> list[Any]:
    row = [getattr(event, c) for c in EVENT_COLUMNS]
    row[0] = iso(event.timestamp)
    row[EVENT_COLUMNS.index("latency_ms")] = round(event.latency_ms, 3)
    row[EVENT_COLUMNS.index("metadata")] = metadata_json(event.metadata)
    return [_number(v) for v in row]


def key_column(by: str) -> str:
    """The key column of a grouped CSV: ``agent_id``, ``model``, ... or ``metadata.<key>``."""
    return by if by.startswith(METADATA) else GROUPS[by]


def write_csv(path: str | os.PathLike[str], by: str, *, totals: dict[str, AgentUsage] | None = None,
              events: Iterable[UsageEvent] = ()) -> int:
    """Write a usage CSV (grouped totals, or one row per event); returns the number of rows."""
    check_by(by, EXPORTS)
    rows = 0
    with open(path, "w", newline="", encoding="utf-8") as fh:
        out = csv.writer(fh)
        if by == "event":
            out.writerow(EVENT_COLUMNS)
            for event in events:
                out.writerow(event_row(event))
                rows += 1
        else:
            out.writerow([key_column(by), *TOTAL_COLUMNS])
            for key in sorted(totals or {}):
                t = (totals or {})[key]
                out.writerow([key, *(_number(getattr(t, c)) for c in TOTAL_COLUMNS)])
                rows += 1
    return rows
